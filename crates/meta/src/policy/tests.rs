//! Policies through `state::apply` over [`MemoryStore`], the longest-prefix lookup against a
//! brute-force reference, and how a committed version's content is said to be kept.

use proptest::prelude::*;

use super::*;
use crate::files::{CommitFile, CommittedChunk, InlineChunk};
use crate::schema::MemoryStore;
use crate::state::{apply as apply_proposal, Command, Proposal};
use crate::stripes::{ShardCommit, StripeCommit};
use mendfs_types::ChunkHash;

fn at(store: &mut MemoryStore, clock_ms: u64, command: Command) -> CommandResult {
    apply_proposal(store, &Proposal { request_id: None, proposed_at_ms: clock_ms, command }).expect("memory store")
}

fn set(store: &mut MemoryStore, target: PolicyTarget, redundancy: &str) -> CommandResult {
    let redundancy = redundancy.parse().expect("redundancy");
    at(store, 1_000, Command::Policy(PolicyCommand::Set { target, redundancy }))
}

fn unset(store: &mut MemoryStore, target: PolicyTarget) -> CommandResult {
    at(store, 1_000, Command::Policy(PolicyCommand::Unset { target }))
}

fn prefix(path: &str) -> PolicyTarget {
    PolicyTarget::Prefix(path.into())
}

fn ec(text: &str) -> Redundancy {
    text.parse().expect("scheme")
}

#[test]
fn redundancy_parses_replicate_and_schemes_and_says_what_is_wrong() {
    assert_eq!("replicate".parse(), Ok(Redundancy::Replicate));
    assert_eq!(" ec:4+2 ".parse::<Redundancy>().map(|r| r.to_string()), Ok("ec:4+2".to_string()));
    assert_eq!(ec("ec:8+3").to_string(), "ec:8+3");
    assert_eq!(Redundancy::Replicate.to_string(), "replicate");
    for (bad, why) in [
        ("ec:0+2", "1 <= K"),
        ("ec:4", "e.g. ec:4+2"),
        ("ec:4+0", "1 <= M"),
        ("ec:40+2", "K <= 32"),
        ("replicate:3", "replication factor"),
        ("", "`replicate` or `ec:K+M`"),
        ("mirror", "`replicate` or `ec:K+M`"),
    ] {
        let error = bad.parse::<Redundancy>().expect_err(bad);
        assert!(error.contains(why), "{bad:?}: {error} should say {why:?}");
    }
}

#[test]
fn prefixes_are_absolute_normalized_and_bounded() {
    assert_eq!(normalize_prefix("/"), Ok("/".into()));
    assert_eq!(normalize_prefix("///"), Ok("/".into()));
    assert_eq!(normalize_prefix("/cold/"), Ok("/cold".into()));
    assert_eq!(normalize_prefix("/a/b"), Ok("/a/b".into()));
    for (bad, why) in [
        ("cold", "not an absolute path"),
        ("", "not an absolute path"),
        ("/a//b", "empty segment"),
        ("/a/../b", ". or .."),
        ("/a\0", "NUL"),
    ] {
        let error = normalize_prefix(bad).expect_err(bad);
        assert!(error.contains(why), "{bad:?}: {error} should say {why:?}");
    }
    let long = format!("/{}", "x".repeat(crate::files::PATH_BYTES_MAX));
    assert!(normalize_prefix(&long).expect_err("long").contains("longer than"));
    // The leader takes only the normal form (a forwarded command skipped the service).
    assert!(prefix("/cold/").check().expect_err("trailing /").contains("normal form"));
    assert!(PolicyTarget::Bucket(String::new()).check().is_err());
    assert!(PolicyTarget::Bucket("photos".into()).check().is_ok());
}

#[test]
fn a_prefix_matches_on_component_boundaries() {
    assert!(prefix_matches("/a/b", "/a/b"));
    assert!(prefix_matches("/a/b", "/a/b/c"));
    assert!(!prefix_matches("/a/b", "/a/bc"));
    assert!(!prefix_matches("/a/b", "/a"));
    assert!(prefix_matches("/", "/anything/at/all"));
    assert_eq!(candidate_prefixes("/a/b/c").collect::<Vec<_>>(), ["/a/b/c", "/a/b", "/a", "/"]);
    assert_eq!(candidate_prefixes("/").collect::<Vec<_>>(), ["/"]);
    assert_eq!(candidate_prefixes("relative").count(), 0);
}

#[test]
fn the_longest_matching_prefix_governs_a_path() {
    let mut store = MemoryStore::default();
    assert_eq!(set(&mut store, prefix("/cold"), "ec:4+2"), Ok(Outcome::PolicyChanged { previous: None }));
    set(&mut store, prefix("/cold/hot"), "replicate").expect("set");
    set(&mut store, prefix("/"), "ec:8+3").expect("set");
    let lookup = |path: &str| policy_for_path(&store, path).expect("lookup");
    assert_eq!(lookup("/cold/a"), Some(("/cold".into(), ec("ec:4+2"))));
    assert_eq!(lookup("/cold"), Some(("/cold".into(), ec("ec:4+2"))));
    assert_eq!(lookup("/cold/hot/x"), Some(("/cold/hot".into(), Redundancy::Replicate)));
    assert_eq!(lookup("/coldish"), Some(("/".into(), ec("ec:8+3"))), "not on a component boundary");
    assert_eq!(lookup("/elsewhere/f"), Some(("/".into(), ec("ec:8+3"))));
    assert_eq!(
        unset(&mut store, prefix("/")),
        Ok(Outcome::PolicyChanged { previous: Some(ec("ec:8+3")) }),
        "unset answers what it removed"
    );
    assert_eq!(policy_for_path(&store, "/elsewhere/f").expect("lookup"), None);
    assert_eq!(unset(&mut store, prefix("/")), Ok(Outcome::PolicyChanged { previous: None }));
    // Replacing answers the old one; the listing has paths in order.
    assert_eq!(set(&mut store, prefix("/cold"), "ec:6+3"), Ok(Outcome::PolicyChanged { previous: Some(ec("ec:4+2")) }));
    let listed: Vec<(PolicyTarget, Redundancy, u64)> = list_policies(&store)
        .expect("list")
        .into_iter()
        .map(|(target, record)| (target, record.redundancy(), record.set_ms()))
        .collect();
    assert_eq!(listed, [(prefix("/cold"), ec("ec:6+3"), 1_000), (prefix("/cold/hot"), Redundancy::Replicate, 1_000)]);
}

#[test]
fn a_bucket_policy_needs_the_bucket_and_goes_with_it() {
    let mut store = MemoryStore::default();
    let bucket = || PolicyTarget::Bucket("photos".into());
    assert_eq!(
        set(&mut store, bucket(), "ec:4+2"),
        Err(CommandError::NoSuchBucket { bucket: "photos".into() }),
        "no bucket, no policy"
    );
    at(&mut store, 1, Command::S3CreateBucket { bucket: "photos".into(), owner: None }).expect("bucket");
    set(&mut store, bucket(), "ec:4+2").expect("set");
    // A path and a bucket of the same name are apart.
    set(&mut store, prefix("/photos"), "replicate").expect("set");
    assert_eq!(policy_for_bucket(&store, "photos").expect("lookup"), Some(ec("ec:4+2")));
    assert_eq!(policy_for_path(&store, "/photos").expect("lookup"), Some(("/photos".into(), Redundancy::Replicate)));
    let listed: Vec<PolicyTarget> = list_policies(&store).expect("list").into_iter().map(|(t, _)| t).collect();
    assert_eq!(listed, [prefix("/photos"), bucket()], "paths first, then buckets");
    at(&mut store, 1, Command::S3DeleteBucket { bucket: "photos".into() }).expect("delete bucket");
    assert_eq!(policy_for_bucket(&store, "photos").expect("lookup"), None, "a deleted bucket's policy goes");
    at(&mut store, 1, Command::S3CreateBucket { bucket: "photos".into(), owner: None }).expect("bucket");
    assert_eq!(policy_for_bucket(&store, "photos").expect("lookup"), None, "a new bucket of that name has none");
}

#[test]
fn policies_are_bounded_but_one_may_always_be_replaced() {
    let mut store = MemoryStore::default();
    for i in 0..POLICIES_MAX {
        set(&mut store, prefix(&format!("/p{i}")), "ec:4+2").expect("within the bound");
    }
    let refused = set(&mut store, prefix("/one-more"), "ec:4+2").expect_err("beyond the bound");
    assert!(matches!(&refused, CommandError::TooMany { limit, .. } if *limit == POLICIES_MAX as u64), "{refused:?}");
    assert!(refused.to_string().contains("mendfs policy unset"), "{refused}");
    set(&mut store, prefix("/p7"), "replicate").expect("a replacement adds none");
    unset(&mut store, prefix("/p0")).expect("unset");
    set(&mut store, prefix("/one-more"), "ec:4+2").expect("room again");
    assert_eq!(list_policies(&store).expect("list").len(), POLICIES_MAX);
}

fn commit(path: &str, chunks: Vec<CommittedChunk>, size: u64) -> Command {
    Command::CommitFile(CommitFile {
        path: path.into(),
        size,
        mtime_ms: 0,
        content_hash: vec![0; 32],
        chunks,
        upload_id: None,
        first_index: 0,
        expected_version: None,
        prepared_at_ms: 1_000,
        grace_ms: 60_000,
    })
}

fn file(store: &MemoryStore, path: &str) -> FileRecord {
    crate::files::get_file(store, path).expect("read").expect("committed")
}

#[test]
fn a_version_is_said_to_be_kept_as_its_first_chunk_is() {
    let mut store = MemoryStore::default();
    let hash = |n: u8| ChunkHash::of(&[n; 8]);
    // Replicated: a chunk with copies, and a short tail.
    let replicated = vec![
        CommittedChunk { hash: hash(1), size: 100, replicas: vec![1, 2, 3] },
        CommittedChunk { hash: hash(2), size: 10, replicas: vec![1, 2, 3] },
    ];
    at(&mut store, 1_000, commit("/r", replicated, 110)).expect("commit");
    assert_eq!(stored_as(&store, &file(&store, "/r")).expect("read"), Some(StoredAs::Replicated));
    // Striped: the first chunk's stripe says its scheme, whatever the tail is.
    let scheme: Scheme = "ec:2+1".parse().expect("scheme");
    let shards = (0..3u8).map(|i| ShardCommit { hash: ChunkHash::of(&[30 + i]), node: u64::from(i) + 1 }).collect();
    let stripe = StripeCommit { chunk: hash(3), size: 100, scheme, shards };
    let striped = vec![
        CommittedChunk { hash: hash(3), size: 100, replicas: vec![] },
        CommittedChunk { hash: hash(4), size: 10, replicas: vec![1, 2, 3] },
    ];
    let command = Command::WithStripes { stripes: vec![stripe], command: Box::new(commit("/s", striped, 110)) };
    at(&mut store, 1_000, command).expect("commit");
    assert_eq!(stored_as(&store, &file(&store, "/s")).expect("read"), Some(StoredAs::Striped(scheme)));
    // Inline, and empty.
    let data = b"small".to_vec();
    let inline = vec![CommittedChunk { hash: ChunkHash::of(&data), size: 5, replicas: vec![] }];
    let command =
        Command::WithInlineChunks { inline: vec![InlineChunk { data }], command: Box::new(commit("/i", inline, 5)) };
    at(&mut store, 1_000, command).expect("commit");
    assert_eq!(stored_as(&store, &file(&store, "/i")).expect("read"), Some(StoredAs::Inline));
    at(&mut store, 1_000, commit("/e", vec![], 0)).expect("commit");
    assert_eq!(stored_as(&store, &file(&store, "/e")).expect("read"), Some(StoredAs::Inline));
    // A version this state does not hold (released, or not applied yet): not known here.
    let released = file(&store, "/r");
    at(&mut store, 1_000, Command::DeleteFile { path: "/r".into(), expected_version: None }).expect("delete");
    assert_eq!(stored_as(&store, &released).expect("read"), None);
}

/// Normalized prefixes over a small alphabet, so that `/a` and `/ab` and `/a/b` all occur.
fn path_strategy(max_depth: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "ba", "a.b"]), 0..=max_depth).prop_map(|parts| {
        if parts.is_empty() {
            "/".to_string()
        } else {
            format!("/{}", parts.join("/"))
        }
    })
}

/// What a policy lookup must answer, by its definition: of every prefix that matches, the
/// longest.
fn brute_force<'a>(policies: &'a BTreeMap<String, Redundancy>, path: &str) -> Option<(&'a str, &'a Redundancy)> {
    policies
        .iter()
        .filter(|(prefix, _)| prefix_matches(prefix, path))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(prefix, redundancy)| (prefix.as_str(), redundancy))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_lookup_agrees_with_the_brute_force_reference(
        policies in prop::collection::btree_map(path_strategy(4), prop::bool::ANY, 0..12),
        paths in prop::collection::vec(path_strategy(5), 1..16),
    ) {
        let scheme = ec("ec:4+2");
        let policies: BTreeMap<String, Redundancy> = policies
            .into_iter()
            .map(|(prefix, striped)| (prefix, if striped { scheme } else { Redundancy::Replicate }))
            .collect();
        let mut store = MemoryStore::default();
        for (prefix, redundancy) in &policies {
            let target = PolicyTarget::Prefix(prefix.clone());
            at(&mut store, 1, Command::Policy(PolicyCommand::Set { target, redundancy: *redundancy }))
                .expect("set");
        }
        for path in &paths {
            let expected = brute_force(&policies, path);
            prop_assert_eq!(longest_match(&policies, path), expected, "in memory, {}", path);
            let stored = policy_for_path(&store, path).expect("lookup");
            prop_assert_eq!(
                stored.as_ref().map(|(prefix, redundancy)| (prefix.as_str(), redundancy)),
                expected,
                "in the store, {}",
                path
            );
        }
    }

    #[test]
    fn a_policy_survives_a_postcard_round_trip(
        data in 1u8..=32, parity in 1u8..=16, set_ms in any::<u64>(), striped in any::<bool>()
    ) {
        let redundancy = if striped {
            Redundancy::Erasure(Scheme::new(data, parity).expect("in bounds"))
        } else {
            Redundancy::Replicate
        };
        let record = PolicyRecord::V1 { redundancy, set_ms };
        prop_assert_eq!(decode::<PolicyRecord>(&encode(&record).expect("encode")).expect("decode"), record);
        prop_assert_eq!(redundancy.to_string().parse::<Redundancy>(), Ok(redundancy));
    }
}
