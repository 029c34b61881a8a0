//! The chunk store through its public API, on a real filesystem in a temp directory.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use mendfs_chunkstore::{ChunkError, ChunkHash, ChunkStore, QuarantineOutcome, StoreStats};
use proptest::prelude::*;

const MAX_CHUNK_BYTES: usize = 64 * 1024;

fn open(dir: &Path) -> ChunkStore {
    ChunkStore::open(dir, MAX_CHUNK_BYTES).expect("open store")
}

fn put(store: &ChunkStore, data: &[u8]) -> ChunkHash {
    let hash = ChunkHash::of(data);
    store.put(&hash, data).expect("put");
    hash
}

fn flip_byte(path: &Path, idx: usize) {
    let mut bytes = fs::read(path).expect("read chunk file");
    bytes[idx] ^= 0x01;
    fs::write(path, bytes).expect("write chunk file");
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn put_then_get_round_trips_and_uses_the_documented_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = b"hello, chunk".to_vec();
    let hash = put(&store, &data);

    assert_eq!(store.get(&hash).expect("get"), data);
    assert!(store.contains(&hash));
    let hex = hash.to_hex();
    assert_eq!(store.path_of(&hash), dir.path().join("chunks").join(&hex[0..2]).join(&hex[2..4]).join(&hex));
    assert_eq!(fs::read(store.path_of(&hash)).expect("raw file"), data);
    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: data.len() as u64 });
    assert!(dir_entries(&dir.path().join("tmp")).is_empty(), "no temp file left after a put");
}

#[test]
fn putting_the_same_chunk_twice_stores_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = vec![7u8; 1000];
    let hash = put(&store, &data);
    let modified_before = fs::metadata(store.path_of(&hash)).expect("metadata").modified().expect("mtime");

    store.put(&hash, &data).expect("second put");

    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: 1000 });
    assert_eq!(store.list().expect("list"), vec![hash]);
    let modified_after = fs::metadata(store.path_of(&hash)).expect("metadata").modified().expect("mtime");
    assert_eq!(modified_before, modified_after, "a good copy must not be rewritten");
}

#[test]
fn put_with_a_wrong_hash_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let claimed = ChunkHash::of(b"what the caller meant");

    let error = store.put(&claimed, b"what the caller sent").expect_err("mismatch");

    match error {
        ChunkError::HashMismatch { expected, actual } => {
            assert_eq!(expected, claimed.to_hex());
            assert_eq!(actual, ChunkHash::of(b"what the caller sent").to_hex());
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(!store.contains(&claimed));
    assert!(!store.contains(&ChunkHash::of(b"what the caller sent")));
    assert_eq!(store.stats(), StoreStats::default());
    assert!(store.list().expect("list").is_empty());
}

#[test]
fn get_of_a_flipped_byte_reports_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let hash = put(&store, b"some bytes that will rot");
    flip_byte(&store.path_of(&hash), 5);

    match store.get(&hash).expect_err("corrupt") {
        ChunkError::Corrupt { hash: named, actual } => {
            assert_eq!(named, hash.to_hex());
            assert_ne!(actual, named);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn get_of_a_truncated_or_emptied_file_reports_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let hash = put(&store, b"0123456789");
    fs::write(store.path_of(&hash), b"01234").expect("truncate");
    assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt { .. })));
    fs::write(store.path_of(&hash), b"").expect("empty");
    assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt { .. })));
}

#[test]
fn get_of_a_missing_chunk_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let hash = ChunkHash::of(b"never stored");
    match store.get(&hash) {
        Err(ChunkError::NotFound(hex)) => assert_eq!(hex, hash.to_hex()),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!store.contains(&hash));
}

#[test]
fn quarantine_moves_the_bad_copy_aside_and_keeps_every_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = b"chunk that goes bad twice";
    let hash = put(&store, data);
    flip_byte(&store.path_of(&hash), 0);
    let bad_bytes = fs::read(store.path_of(&hash)).expect("read");

    assert_eq!(store.quarantine(&hash).expect("quarantine"), QuarantineOutcome::MovedAside);

    assert!(!store.contains(&hash));
    assert!(matches!(store.get(&hash), Err(ChunkError::NotFound(_))));
    assert_eq!(store.stats(), StoreStats::default());
    assert!(store.list().expect("list").is_empty());
    let hex = hash.to_hex();
    let quarantine_dir = dir.path().join("quarantine");
    assert_eq!(dir_entries(&quarantine_dir), vec![format!("{hex}.0")]);
    assert_eq!(fs::read(quarantine_dir.join(format!("{hex}.0"))).expect("read"), bad_bytes);

    // A second bad copy of the same chunk gets the next number instead of overwriting the first.
    put(&store, data);
    flip_byte(&store.path_of(&hash), 1);
    assert_eq!(store.quarantine(&hash).expect("quarantine again"), QuarantineOutcome::MovedAside);
    assert_eq!(dir_entries(&quarantine_dir), vec![format!("{hex}.0"), format!("{hex}.1")]);

    // Quarantined copies survive a reopen and are not counted as chunks.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.stats(), StoreStats::default());
    assert!(matches!(store.quarantine(&hash), Err(ChunkError::NotFound(_))));
}

#[test]
fn quarantine_leaves_a_good_copy_that_a_put_brought_since_the_read_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = b"a chunk a reader finds rotted".to_vec();
    let hash = put(&store, &data);
    flip_byte(&store.path_of(&hash), 0);
    // The reader's evidence...
    assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt { .. })));
    // ...goes stale: a prepare (or repair) of the same chunk replaces the bad copy first.
    store.put(&hash, &data).expect("put over the corrupt copy");

    assert_eq!(store.quarantine(&hash).expect("quarantine"), QuarantineOutcome::CopyIsGood);

    assert_eq!(store.get(&hash).expect("the good copy is still served"), data);
    assert!(dir_entries(&dir.path().join("quarantine")).is_empty(), "nothing was moved aside");
    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: data.len() as u64 });
    assert_eq!(store.list().expect("list"), vec![hash]);
}

#[test]
fn quarantine_moves_a_truncated_copy_but_leaves_a_good_empty_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = b"twenty bytes of data".to_vec();
    let hash = put(&store, &data);
    fs::write(store.path_of(&hash), b"").expect("truncate");
    assert_eq!(store.quarantine(&hash).expect("quarantine"), QuarantineOutcome::MovedAside);
    assert!(!store.contains(&hash));

    // The empty chunk is good when empty: there is nothing to move.
    let empty = put(&store, b"");
    assert_eq!(store.quarantine(&empty).expect("quarantine"), QuarantineOutcome::CopyIsGood);
    assert!(store.contains(&empty));
}

#[test]
fn verify_rehashes_the_copy_instead_of_trusting_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = vec![3u8; 50_000];
    let hash = put(&store, &data);
    store.verify(&hash).expect("a good copy verifies");

    flip_byte(&store.path_of(&hash), 49_999);
    assert!(store.contains(&hash), "the name is still there");
    match store.verify(&hash) {
        Err(ChunkError::Corrupt { hash: hex, actual }) => {
            assert_eq!(hex, hash.to_hex());
            assert_ne!(actual, hash.to_hex());
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let absent = ChunkHash::of(b"never stored");
    assert!(matches!(store.verify(&absent), Err(ChunkError::NotFound(_))));
}

#[test]
fn put_replaces_a_corrupt_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = b"the real contents".to_vec();
    let hash = put(&store, &data);
    flip_byte(&store.path_of(&hash), 3);

    store.put(&hash, &data).expect("put over a corrupt copy");

    assert_eq!(store.get(&hash).expect("get"), data);
    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: data.len() as u64 });
}

#[test]
fn put_replaces_a_corrupt_copy_of_another_length_and_reopen_recounts_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = b"the real contents".to_vec();
    let hash = put(&store, &data);
    let other = put(&store, &[9u8; 4000]);

    for corruption in [b"short".to_vec(), vec![0u8; 3000], Vec::new()] {
        fs::write(store.path_of(&hash), &corruption).expect("corrupt");
        store.put(&hash, &data).expect("put over a corrupt copy");
        assert_eq!(store.get(&hash).expect("get"), data);
        assert_eq!(store.get(&other).expect("get"), vec![9u8; 4000]);
        // chunk_bytes may drift by the length change made behind the store's back (see
        // `ChunkStore::stats`), but the count is exact.
        assert_eq!(store.stats().chunk_count, 2);
    }

    drop(store);
    let store = open(dir.path());
    assert_eq!(store.stats(), StoreStats { chunk_count: 2, chunk_bytes: data.len() as u64 + 4000 });
}

#[test]
fn delete_removes_the_chunk_and_reports_whether_it_was_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let kept = put(&store, b"kept");
    let deleted = put(&store, b"deleted");

    assert!(store.delete(&deleted).expect("delete"));
    assert!(!store.delete(&deleted).expect("delete again"), "second delete finds nothing");

    assert!(!store.contains(&deleted));
    assert!(matches!(store.get(&deleted), Err(ChunkError::NotFound(_))));
    assert_eq!(store.get(&kept).expect("get"), b"kept");
    assert_eq!(store.list().expect("list"), vec![kept]);
    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: 4 });
}

#[test]
fn leftover_temp_files_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hash = {
        let store = open(dir.path());
        put(&store, b"survivor")
    };
    let tmp = dir.path().join("tmp");
    fs::write(tmp.join(format!("{}.1234.0.tmp", hash.to_hex())), b"half a chu").expect("leftover");
    fs::write(tmp.join("anything-else"), b"junk").expect("leftover");

    let store = open(dir.path());

    assert!(dir_entries(&tmp).is_empty());
    assert_eq!(store.get(&hash).expect("get"), b"survivor");
    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: 8 });
}

#[test]
fn open_counts_existing_chunks_and_skips_junk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = {
        let store = open(dir.path());
        (put(&store, b"aaaa"), put(&store, b"bbbbbbbb"))
    };
    let chunks = dir.path().join("chunks");
    let a_path = {
        let hex = a.to_hex();
        chunks.join(&hex[0..2]).join(&hex[2..4])
    };
    // Junk that must not count as chunks: a stray file, an uppercase name, a hash in the wrong
    // directory, a non-hex directory, and a directory named like a chunk.
    fs::write(a_path.join("notes.txt"), b"x").expect("junk");
    fs::write(a_path.join(a.to_hex().to_uppercase()), b"x").expect("junk");
    fs::write(a_path.join(ChunkHash::of(b"elsewhere").to_hex()), b"x").expect("junk");
    fs::create_dir_all(chunks.join("zz").join("00")).expect("junk dir");
    fs::write(chunks.join("zz").join("00").join(ChunkHash::of(b"zz").to_hex()), b"x").expect("junk");
    fs::write(chunks.join("README"), b"x").expect("junk");
    fs::create_dir(a_path.join(ChunkHash::of(b"dir").to_hex())).ok();

    let store = open(dir.path());

    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(store.list().expect("list"), expected);
    assert_eq!(store.stats(), StoreStats { chunk_count: 2, chunk_bytes: 12 });
    // A slice at a time, scans see the same chunks and skip the same junk.
    assert_eq!(slices_listed(&store), expected);
    assert_eq!(slices_counted(&store), StoreStats { chunk_count: 2, chunk_bytes: 12 });
}

#[test]
fn writes_during_a_slice_at_a_time_recount_stay_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let kept = put(&store, b"there before the recount");
    // Contents whose slices the recount passes before they are written, or after they are
    // deleted.
    let early: Vec<Vec<u8>> = (0u32..)
        .map(|i| format!("early {i}").into_bytes())
        .filter(|data| ChunkHash::of(data)[0] < 100)
        .take(3)
        .collect();
    let gone =
        (0u32..).map(|i| format!("gone {i}").into_bytes()).find(|data| ChunkHash::of(data)[0] > 200).expect("data");
    let gone = put(&store, &gone);
    for byte0 in 0..=u8::MAX {
        store.recount_slice(byte0).expect("recount a slice");
        if byte0 == 150 {
            for data in &early {
                put(&store, data);
            }
            assert!(store.delete(&gone).expect("delete"));
        }
    }
    let bytes = b"there before the recount".len() + early.iter().map(Vec::len).sum::<usize>();
    assert_eq!(store.stats(), StoreStats { chunk_count: 4, chunk_bytes: bytes as u64 });
    assert_eq!(store.recount().expect("recount"), store.stats(), "a whole recount finds the same");
    assert!(store.contains(&kept));
}

/// Every chunk, listed one slice of the store at a time.
fn slices_listed(store: &ChunkStore) -> Vec<ChunkHash> {
    (0..=u8::MAX).flat_map(|byte0| store.list_slice(byte0).expect("list a slice")).collect()
}

/// The store's chunks and bytes, recounted one slice at a time.
fn slices_counted(store: &ChunkStore) -> StoreStats {
    (0..=u8::MAX).map(|byte0| store.recount_slice(byte0).expect("recount a slice")).fold(
        StoreStats::default(),
        |sum, slice| StoreStats {
            chunk_count: sum.chunk_count + slice.chunk_count,
            chunk_bytes: sum.chunk_bytes + slice.chunk_bytes,
        },
    )
}

#[test]
fn a_second_open_of_the_same_root_is_refused_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = open(dir.path());
    assert!(matches!(ChunkStore::open(dir.path(), MAX_CHUNK_BYTES), Err(ChunkError::Io { .. })));
    drop(first);
    open(dir.path());
}

#[test]
fn chunks_larger_than_the_limit_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let at_limit = vec![1u8; MAX_CHUNK_BYTES];
    let over_limit = vec![1u8; MAX_CHUNK_BYTES + 1];

    put(&store, &at_limit);
    match store.put(&ChunkHash::of(&over_limit), &over_limit) {
        Err(ChunkError::TooLarge { len, max }) => assert_eq!((len, max), (MAX_CHUNK_BYTES + 1, MAX_CHUNK_BYTES)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(!store.contains(&ChunkHash::of(&over_limit)));
    assert_eq!(store.stats().chunk_count, 1);
}

#[test]
fn the_empty_chunk_is_a_valid_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let hash = put(&store, b"");
    store.put(&hash, b"").expect("idempotent put of the empty chunk");

    assert_eq!(store.get(&hash).expect("get"), Vec::<u8>::new());
    assert_eq!(store.list().expect("list"), vec![hash]);
    assert_eq!(store.stats(), StoreStats { chunk_count: 1, chunk_bytes: 0 });

    // An empty chunk that gained bytes is corrupt, and put repairs it.
    fs::write(store.path_of(&hash), b"x").expect("corrupt");
    assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt { .. })));
    store.put(&hash, b"").expect("repair");
    assert_eq!(store.get(&hash).expect("get"), Vec::<u8>::new());
    assert_eq!(store.stats().chunk_count, 1);
    drop(store);
    assert_eq!(open(dir.path()).stats(), StoreStats { chunk_count: 1, chunk_bytes: 0 });
}

#[test]
fn concurrent_puts_of_the_same_and_different_chunks_count_each_chunk_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path()));
    let chunks: Vec<Vec<u8>> = (0..16u8).map(|idx| vec![idx; 100 + usize::from(idx)]).collect();

    std::thread::scope(|scope| {
        for _ in 0..8 {
            let store = Arc::clone(&store);
            let chunks = &chunks;
            scope.spawn(move || {
                for data in chunks {
                    store.put(&ChunkHash::of(data), data).expect("put");
                }
            });
        }
    });

    let expected_bytes: u64 = chunks.iter().map(|data| data.len() as u64).sum();
    assert_eq!(store.stats(), StoreStats { chunk_count: 16, chunk_bytes: expected_bytes });
    assert_eq!(store.list().expect("list").len(), 16);
}

#[test]
fn the_store_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChunkStore>();
    assert_send_sync::<ChunkError>();
}

#[derive(Debug, Clone)]
enum Op {
    Put(usize),
    Delete(usize),
    CorruptAndQuarantine(usize),
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CONTENTS.len()).prop_map(Op::Put),
        3 => (0..CONTENTS.len()).prop_map(Op::Delete),
        1 => (0..CONTENTS.len()).prop_map(Op::CorruptAndQuarantine),
        1 => Just(Op::Reopen),
    ]
}

const CONTENTS: [&[u8]; 6] = [b"", b"a", b"bb", b"ccccccccccc", b"the quick brown fox", &[0xff; 300]];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After any sequence of puts, deletes, quarantines and reopens, `list`, `contains` and the
    /// incrementally kept `stats` agree with a model set, and with a fresh count at reopen.
    #[test]
    fn list_and_stats_follow_a_model_set(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(dir.path());
        let mut model: HashSet<usize> = HashSet::new();

        for op in ops {
            match op {
                Op::Put(idx) => {
                    put(&store, CONTENTS[idx]);
                    model.insert(idx);
                }
                Op::Delete(idx) => {
                    let existed = store.delete(&ChunkHash::of(CONTENTS[idx])).expect("delete");
                    prop_assert_eq!(existed, model.remove(&idx));
                }
                Op::CorruptAndQuarantine(idx) => {
                    let hash = ChunkHash::of(CONTENTS[idx]);
                    if CONTENTS[idx].is_empty() && model.contains(&idx) {
                        // The empty chunk cannot rot in place (rot of another length would put the
                        // byte counter off, see `ChunkStore::stats`), so this is a quarantine of a
                        // good copy: it stays.
                        prop_assert_eq!(store.quarantine(&hash).expect("quarantine"), QuarantineOutcome::CopyIsGood);
                    } else if model.remove(&idx) {
                        // Rot that keeps the length, so the byte counter stays exact.
                        flip_byte(&store.path_of(&hash), 0);
                        prop_assert!(
                            matches!(store.get(&hash), Err(ChunkError::Corrupt { .. })),
                            "a rotted copy must not be served"
                        );
                        prop_assert_eq!(store.quarantine(&hash).expect("quarantine"), QuarantineOutcome::MovedAside);
                    } else {
                        prop_assert!(matches!(store.quarantine(&hash), Err(ChunkError::NotFound(_))));
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = open(dir.path());
                }
            }

            let mut expected: Vec<ChunkHash> = model.iter().map(|&idx| ChunkHash::of(CONTENTS[idx])).collect();
            expected.sort();
            prop_assert_eq!(store.list().expect("list"), expected.clone());
            prop_assert_eq!(slices_listed(&store), expected);
            let expected_stats = StoreStats {
                chunk_count: model.len() as u64,
                chunk_bytes: model.iter().map(|&idx| CONTENTS[idx].len() as u64).sum(),
            };
            prop_assert_eq!(store.stats(), expected_stats);
            prop_assert_eq!(slices_counted(&store), expected_stats);
            for (idx, data) in CONTENTS.iter().enumerate() {
                prop_assert_eq!(store.contains(&ChunkHash::of(data)), model.contains(&idx));
            }
        }

        drop(store);
        let reopened = open(dir.path());
        let expected_stats = StoreStats {
            chunk_count: model.len() as u64,
            chunk_bytes: model.iter().map(|&idx| CONTENTS[idx].len() as u64).sum(),
        };
        prop_assert_eq!(reopened.stats(), expected_stats, "a fresh count at open matches the model");
    }
}
