//! [`ChunkHash`]: the BLAKE3 hash of a chunk's bytes, which is at once the chunk's name, its
//! checksum and its key in the chunk map.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// BLAKE3 of a chunk's bytes. 32 bytes by construction: a hash of another length cannot be
/// built, decoded from disk or taken off the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkHash([u8; 32]);

/// Bytes or text that are not a chunk hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHash {
    #[error("a chunk hash is 32 bytes, not {0}")]
    Length(usize),
    #[error("{input:?} is not 64 hex digits")]
    Hex { input: String },
}

impl ChunkHash {
    pub const LEN: usize = 32;

    /// The hash, and so the name, of a chunk holding `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters: the spelling in chunk file names and error messages.
    pub fn to_hex(&self) -> String {
        crate::hex(&self.0)
    }

    /// The first 8 bytes in hex: enough to recognize a chunk in a trace or a log line.
    pub fn short(&self) -> String {
        crate::hex(&self.0[..8])
    }

    /// Parses 64 hex digits, in either case.
    pub fn from_hex(text: &str) -> Result<Self, InvalidHash> {
        let invalid = || InvalidHash::Hex { input: text.chars().take(2 * Self::LEN).collect() };
        let digits = text.as_bytes();
        if digits.len() != 2 * Self::LEN {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (hex_value(pair[0]).ok_or_else(invalid)? << 4) | hex_value(pair[1]).ok_or_else(invalid)?;
        }
        Ok(Self(bytes))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Reads like the bytes it holds (`hash[0]`, `&hash[..]`), which is what most callers want.
impl std::ops::Deref for ChunkHash {
    type Target = [u8; 32];
    fn deref(&self) -> &[u8; 32] {
        &self.0
    }
}

impl AsRef<[u8]> for ChunkHash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<[u8; 32]> for ChunkHash {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl TryFrom<&[u8]> for ChunkHash {
    type Error = InvalidHash;
    fn try_from(bytes: &[u8]) -> Result<Self, InvalidHash> {
        <[u8; 32]>::try_from(bytes).map(Self).map_err(|_| InvalidHash::Length(bytes.len()))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

/// Serialized as a byte string, which postcard writes exactly as it wrote the `Vec<u8>` hashes
/// of earlier versions (a length, then the bytes): state on disk and messages between nodes of
/// mixed versions keep their meaning.
impl Serialize for ChunkHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HashVisitor;
        impl<'de> Visitor<'de> for HashVisitor {
            type Value = ChunkHash;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes of a chunk hash")
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<ChunkHash, E> {
                ChunkHash::try_from(bytes).map_err(E::custom)
            }
            // Self-describing formats (JSON) hand a byte string over as a sequence of numbers.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChunkHash, A::Error> {
                let mut bytes = [0u8; 32];
                let mut len = 0;
                while let Some(byte) = seq.next_element::<u8>()? {
                    if len == bytes.len() {
                        return Err(de::Error::custom(InvalidHash::Length(len + 1)));
                    }
                    bytes[len] = byte;
                    len += 1;
                }
                if len != bytes.len() {
                    return Err(de::Error::custom(InvalidHash::Length(len)));
                }
                Ok(ChunkHash(bytes))
            }
        }
        deserializer.deserialize_bytes(HashVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_hash_of_nothing_is_blake3s_known_value() {
        assert_eq!(ChunkHash::of(b"").to_hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        assert_eq!(ChunkHash::of(b"").short(), "af1349b9f5f9a1a6");
    }

    #[test]
    fn postcard_spells_a_hash_as_the_vec_it_replaced() {
        let hash = ChunkHash::of(b"chunk");
        let as_vec = postcard::to_allocvec(&hash.to_vec()).expect("encode vec");
        assert_eq!(postcard::to_allocvec(&hash).expect("encode hash"), as_vec);
        assert_eq!(postcard::from_bytes::<ChunkHash>(&as_vec).expect("decode"), hash);
    }

    #[test]
    fn a_hash_of_the_wrong_length_does_not_decode() {
        for len in [0usize, 3, 31, 33] {
            let bytes = postcard::to_allocvec(&vec![7u8; len]).expect("encode");
            assert!(postcard::from_bytes::<ChunkHash>(&bytes).is_err(), "{len} bytes");
            assert_eq!(ChunkHash::try_from(&vec![7u8; len][..]), Err(InvalidHash::Length(len)));
        }
    }

    #[test]
    fn json_round_trips() {
        let hash = ChunkHash::of(b"json");
        let text = serde_json::to_string(&hash).expect("encode");
        assert_eq!(serde_json::from_str::<ChunkHash>(&text).expect("decode"), hash);
        assert!(serde_json::from_str::<ChunkHash>("[1,2,3]").is_err());
    }

    #[test]
    fn from_hex_refuses_bad_lengths_and_digits_without_panicking() {
        for bad in ["", "a", &"a".repeat(63), &"a".repeat(65), &format!("{}g", "a".repeat(63)), &"é".repeat(32)] {
            assert!(matches!(ChunkHash::from_hex(bad), Err(InvalidHash::Hex { .. })), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes in any::<[u8; 32]>()) {
            let hash = ChunkHash::from_bytes(bytes);
            prop_assert_eq!(ChunkHash::from_hex(&hash.to_hex()).unwrap(), hash);
            prop_assert_eq!(ChunkHash::from_hex(&hash.to_hex().to_uppercase()).unwrap(), hash);
            prop_assert_eq!(hash.to_string(), hash.to_hex());
        }
    }
}
