//! Chunk names: the BLAKE3 hash of a chunk's bytes, and its lowercase hex spelling.

use crate::ChunkError;

/// BLAKE3 of the chunk's bytes. Doubles as the chunk's name and its checksum.
pub type ChunkHash = [u8; 32];

/// Length of a hash spelled in hex.
pub(crate) const HASH_HEX_LEN: usize = 64;

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The name of a chunk holding `data`.
pub fn hash_chunk(data: &[u8]) -> ChunkHash {
    *blake3::hash(data).as_bytes()
}

/// Lowercase hex, 64 characters: the spelling used in file names and error messages.
pub fn to_hex(hash: &ChunkHash) -> String {
    let mut hex = String::with_capacity(HASH_HEX_LEN);
    for byte in hash {
        hex.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Parses 64 hex digits (either case) into a hash; anything else is `InvalidHash`.
pub fn from_hex(s: &str) -> Result<ChunkHash, ChunkError> {
    let invalid = || ChunkError::InvalidHash { input: s.chars().take(2 * HASH_HEX_LEN).collect() };
    let bytes = s.as_bytes();
    if bytes.len() != HASH_HEX_LEN {
        return Err(invalid());
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
        let high = hex_value(pair[0]).ok_or_else(invalid)?;
        let low = hex_value(pair[1]).ok_or_else(invalid)?;
        *byte = (high << 4) | low;
    }
    Ok(hash)
}

/// Parses a name only if it is exactly what `to_hex` would write, so a file called `ABCD…` or
/// `abcd….bak` is junk rather than a second spelling of a chunk.
pub(crate) fn from_canonical_hex(s: &str) -> Option<ChunkHash> {
    let hash = from_hex(s).ok()?;
    (to_hex(&hash) == s).then_some(hash)
}

/// Parses a two-digit directory name (`"0a"`) only in the spelling `to_hex` would write.
pub(crate) fn from_canonical_hex_byte(s: &str) -> Option<u8> {
    match s.as_bytes() {
        &[high, low] if !high.is_ascii_uppercase() && !low.is_ascii_uppercase() => {
            Some((hex_value(high)? << 4) | hex_value(low)?)
        }
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_every_byte_value() {
        let mut hash = [0u8; 32];
        for (idx, byte) in hash.iter_mut().enumerate() {
            *byte = (idx as u8).wrapping_mul(37).wrapping_add(201);
        }
        let hex = to_hex(&hash);
        assert_eq!(hex.len(), 64);
        assert_eq!(from_hex(&hex).expect("valid hex"), hash);
        assert_eq!(from_hex(&hex.to_uppercase()).expect("uppercase is accepted"), hash);
    }

    #[test]
    fn hash_of_empty_input_is_blake3_known_value() {
        assert_eq!(to_hex(&hash_chunk(b"")), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }

    #[test]
    fn from_hex_rejects_bad_length_and_bad_digits() {
        assert!(matches!(from_hex(""), Err(ChunkError::InvalidHash { .. })));
        assert!(matches!(from_hex(&"a".repeat(63)), Err(ChunkError::InvalidHash { .. })));
        assert!(matches!(from_hex(&"a".repeat(65)), Err(ChunkError::InvalidHash { .. })));
        assert!(matches!(from_hex(&format!("{}g", "a".repeat(63))), Err(ChunkError::InvalidHash { .. })));
        // 32 two-byte characters: 64 bytes long but not 64 hex digits; must not panic on a char boundary.
        assert!(matches!(from_hex(&"é".repeat(32)), Err(ChunkError::InvalidHash { .. })));
    }

    #[test]
    fn canonical_hex_rejects_uppercase() {
        let hex = to_hex(&hash_chunk(b"x"));
        assert!(from_canonical_hex(&hex).is_some());
        assert!(from_canonical_hex(&hex.to_uppercase()).is_none());
    }
}
