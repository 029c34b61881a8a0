//! The words every MendFS crate shares, defined once: a node's id, a chunk's hash, the hex
//! spelling of bytes, and the wall clock in milliseconds.
//!
//! Architecture invariant: this crate is the bottom of the graph. It depends on no other MendFS
//! crate and does no I/O, so any crate may use it without pulling in the network or a disk.

mod hash;

pub use hash::{ChunkHash, InvalidHash};

/// A node's identifier: the same id in the Raft membership, the storage node table, the ring
/// and every log line. 0 is reserved (never a node).
pub type NodeId = u64;

/// Lowercase hex of `bytes`: the one spelling of binary ids in names, logs and errors.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Milliseconds since the Unix epoch on this machine's clock (0 if the clock is before 1970).
/// For timestamps people read and for deadlines that cross machines; never for measuring
/// durations, which use `Instant`.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_spells_every_byte_in_lowercase() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
