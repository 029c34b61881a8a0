//! The snapshot's byte format, written and read as a stream so that no node ever holds a whole
//! snapshot in memory: the builder writes rows straight from a redb read transaction to a file,
//! a receiving node checks a peer's chunks as they arrive, and an install reads rows from the
//! file straight into a redb write transaction. Only one row is held at a time.
//!
//! ```text
//! magic        "MENDFS-SNAPSHOT" 0x01                      16 bytes
//! meta length  u32 LE, then the postcard SnapshotMeta      at most META_BYTES_MAX
//! rows         table index u8 (position in Table::ALL), key length u32 LE, value length u32 LE,
//!              key, value                                  any number
//! end          0xFF, then the BLAKE3 of every byte before it (magic through 0xFF)
//! ```
//!
//! Nothing may follow the hash. The hash catches a snapshot cut short or damaged on disk or in
//! transit; the structure check lets a node refuse a bad snapshot before openraft installs it
//! (a failed install is fatal to openraft).

use std::io::Write;

use crate::schema::Table;

const MAGIC: &[u8; 16] = b"MENDFS-SNAPSHOT\x01";
const END_TAG: u8 = 0xFF;
/// The meta is a log id and a membership: small. The bound keeps a crafted length from making
/// a receiver buffer much before it finds the snapshot bad.
const META_BYTES_MAX: usize = 1 << 20;
const HASH_BYTES: usize = 32;

/// Writes a snapshot to `W` (buffer it: rows are written field by field).
pub struct SnapshotWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(mut inner: W, meta: &[u8]) -> std::io::Result<Self> {
        let meta_len = u32::try_from(meta.len())
            .ok()
            .filter(|len| *len as usize <= META_BYTES_MAX)
            .ok_or_else(|| std::io::Error::other(format!("snapshot meta of {} bytes", meta.len())))?;
        let mut hasher = blake3::Hasher::new();
        for part in [&MAGIC[..], &meta_len.to_le_bytes(), meta] {
            hasher.update(part);
            inner.write_all(part)?;
        }
        Ok(Self { inner, hasher })
    }

    pub fn row(&mut self, table: Table, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let too_long = |what: &str, len: usize| std::io::Error::other(format!("a {what} of {len} bytes"));
        let key_len = u32::try_from(key.len()).map_err(|_| too_long("key", key.len()))?;
        let value_len = u32::try_from(value.len()).map_err(|_| too_long("value", value.len()))?;
        let mut head = [0u8; 9];
        head[0] = table as u8;
        head[1..5].copy_from_slice(&key_len.to_le_bytes());
        head[5..].copy_from_slice(&value_len.to_le_bytes());
        for part in [&head[..], key, value] {
            self.hasher.update(part);
            self.inner.write_all(part)?;
        }
        Ok(())
    }

    /// Writes the end mark and the hash; returns the writer (flush and fsync it).
    pub fn finish(mut self) -> std::io::Result<W> {
        self.hasher.update(&[END_TAG]);
        self.inner.write_all(&[END_TAG])?;
        self.inner.write_all(self.hasher.finalize().as_bytes())?;
        Ok(self.inner)
    }
}

/// What the parser found, in order: the meta once, then every row.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Meta(Vec<u8>),
    Row { table: Table, key: Vec<u8>, value: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    MetaLen,
    Meta,
    Tag,
    Lengths(Table),
    Row { table: Table, key_len: usize },
    Hash,
    Nothing,
}

/// Parses a snapshot fed in pieces of any size (a peer's chunks, or reads of a file), holding
/// at most one row. Errors name the byte offset; after an error the parser is of no further use.
pub struct SnapshotParser {
    expect: Expect,
    /// How many bytes `expect` needs in `buffer`.
    need: usize,
    buffer: Vec<u8>,
    hasher: blake3::Hasher,
    offset: u64,
}

impl Default for SnapshotParser {
    fn default() -> Self {
        Self { expect: Expect::Magic, need: MAGIC.len(), buffer: Vec::new(), hasher: blake3::Hasher::new(), offset: 0 }
    }
}

impl SnapshotParser {
    /// Feeds the next bytes; `on_item` gets every complete item (its error stops the parse).
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_item: impl FnMut(Item) -> Result<(), String>,
    ) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.expect == Expect::Nothing {
                return Err(format!("snapshot: {} bytes after its end at byte {}", bytes.len(), self.offset));
            }
            let take = (self.need - self.buffer.len()).min(bytes.len());
            self.buffer.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buffer.len() == self.need {
                self.step(&mut on_item)?;
            }
        }
        Ok(())
    }

    /// Whether the snapshot ended where it should, with the right hash.
    pub fn finish(&self) -> Result<(), String> {
        if self.expect == Expect::Nothing {
            Ok(())
        } else {
            Err(format!(
                "snapshot: cut short at byte {} (expecting {:?})",
                self.offset + self.buffer.len() as u64,
                self.expect
            ))
        }
    }

    fn step(&mut self, on_item: &mut impl FnMut(Item) -> Result<(), String>) -> Result<(), String> {
        let at = self.offset;
        let item = std::mem::take(&mut self.buffer);
        if self.expect != Expect::Hash {
            self.hasher.update(&item);
        }
        self.offset += item.len() as u64;
        let le_u32 = |bytes: &[u8]| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        (self.expect, self.need) = match self.expect {
            Expect::Magic => {
                if item.as_slice() != MAGIC {
                    return Err("snapshot: not a MendFS snapshot (bad magic)".into());
                }
                (Expect::MetaLen, 4)
            }
            Expect::MetaLen => {
                let len = le_u32(&item);
                if len > META_BYTES_MAX {
                    return Err(format!("snapshot: a meta of {len} bytes at byte {at}"));
                }
                (Expect::Meta, len)
            }
            Expect::Meta => {
                on_item(Item::Meta(item))?;
                (Expect::Tag, 1)
            }
            Expect::Tag if item[0] == END_TAG => (Expect::Hash, HASH_BYTES),
            Expect::Tag => {
                let table = *Table::ALL
                    .get(item[0] as usize)
                    .ok_or_else(|| format!("snapshot: unknown table {} at byte {at}", item[0]))?;
                (Expect::Lengths(table), 8)
            }
            Expect::Lengths(table) => {
                let (key_len, value_len) = (le_u32(&item[..4]), le_u32(&item[4..]));
                (Expect::Row { table, key_len }, key_len + value_len)
            }
            Expect::Row { table, key_len } => {
                let mut key = item;
                let value = key.split_off(key_len);
                on_item(Item::Row { table, key, value })?;
                (Expect::Tag, 1)
            }
            Expect::Hash => {
                if self.hasher.finalize().as_bytes() != item.as_slice() {
                    return Err("snapshot: its hash does not match its contents".into());
                }
                (Expect::Nothing, 0)
            }
            Expect::Nothing => return Err("snapshot: bytes after its end".into()),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut writer = SnapshotWriter::new(Vec::new(), b"meta").expect("header");
        writer.row(Table::Keys, b"k", b"value").expect("row");
        writer.row(Table::Tokens, b"", &[]).expect("row");
        writer.row(Table::Meta, &[0xFF; 3], &[1; 300]).expect("row");
        writer.finish().expect("end")
    }

    fn parse(bytes: &[u8], piece: usize) -> Result<Vec<Item>, String> {
        let mut parser = SnapshotParser::default();
        let mut items = Vec::new();
        for part in bytes.chunks(piece.max(1)) {
            parser.feed(part, |item| {
                items.push(item);
                Ok(())
            })?;
        }
        parser.finish()?;
        Ok(items)
    }

    #[test]
    fn a_snapshot_reads_back_whatever_the_pieces() {
        let bytes = sample();
        let expected = vec![
            Item::Meta(b"meta".to_vec()),
            Item::Row { table: Table::Keys, key: b"k".to_vec(), value: b"value".to_vec() },
            Item::Row { table: Table::Tokens, key: vec![], value: vec![] },
            Item::Row { table: Table::Meta, key: vec![0xFF; 3], value: vec![1; 300] },
        ];
        for piece in [1, 2, 7, 64, bytes.len()] {
            assert_eq!(parse(&bytes, piece).expect("parses"), expected, "in pieces of {piece}");
        }
    }

    #[test]
    fn cut_flipped_or_extended_snapshots_are_refused() {
        let bytes = sample();
        for cut in [0, 5, 16, 30, bytes.len() - 33, bytes.len() - 1] {
            assert!(parse(&bytes[..cut], 3).expect_err("cut").contains("cut short"), "cut at {cut}");
        }
        for flip in [20, 40, bytes.len() - 40, bytes.len() - 2] {
            let mut damaged = bytes.clone();
            damaged[flip] ^= 0x10;
            assert!(parse(&damaged, 5).is_err(), "a flipped byte at {flip} passed");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse(&longer, 8).expect_err("extended").contains("after its end"));
        let mut unknown_table = SnapshotWriter::new(Vec::new(), b"m").expect("header").finish().expect("end");
        unknown_table.splice(21..22, [Table::ALL.len() as u8]);
        assert!(parse(&unknown_table, 4).expect_err("table").contains("unknown table"));
    }

    proptest! {
        #[test]
        fn any_bytes_in_any_pieces_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), piece in 1usize..50) {
            let _ = parse(&bytes, piece);
            let mut prefixed = MAGIC.to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = parse(&prefixed, piece);
        }
    }
}
