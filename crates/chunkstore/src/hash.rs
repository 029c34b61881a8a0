//! The spelling of chunk file names: exactly what [`ChunkHash::to_hex`] writes, nothing else.

use mendfs_types::ChunkHash;

/// Parses a name only if it is exactly what `to_hex` would write, so a file called `ABCD…` or
/// `abcd….bak` is junk rather than a second spelling of a chunk.
pub(crate) fn from_canonical_hex(s: &str) -> Option<ChunkHash> {
    let hash = ChunkHash::from_hex(s).ok()?;
    (hash.to_hex() == s).then_some(hash)
}

/// Parses a two-digit directory name (`"0a"`) only in the spelling `to_hex` would write.
pub(crate) fn from_canonical_hex_byte(s: &str) -> Option<u8> {
    let byte = u8::from_str_radix(s, 16).ok()?;
    (s.len() == 2 && mendfs_types::hex(&[byte]) == s).then_some(byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_hex_rejects_uppercase() {
        let hex = ChunkHash::of(b"x").to_hex();
        assert!(from_canonical_hex(&hex).is_some());
        assert!(from_canonical_hex(&hex.to_uppercase()).is_none());
        assert_eq!(from_canonical_hex_byte("0a"), Some(10));
        for bad in ["0A", "a", "+a", "000", "zz"] {
            assert_eq!(from_canonical_hex_byte(bad), None, "{bad:?}");
        }
    }
}
