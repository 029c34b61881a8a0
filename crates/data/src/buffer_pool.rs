//! Chunk-sized read buffers, kept for the next read instead of handed back to the allocator.
//!
//! A coordinator streaming reads at a GB/s reads a chunk (up to 4 MiB) into a fresh buffer
//! hundreds of times a second and frees each once its last slice is sent. The allocator either
//! keeps freed memory a while, so the node's RSS sits 40 to 90 MiB above what it uses (mimalloc's
//! default, a 1 s purge delay), or gives it back at once and pays a page fault per 4 KiB when it
//! is taken again (a 25 ms delay: 12 to 17 % of the read rate). Handing a chunk's buffer straight
//! to the next read does neither: 8 clients' 1 MiB GETs ran at the same rate as with the long
//! delay, with the node 25 to 40 MiB lower (`mendfs bench s3`, `bench files`).
//!
//! The pool holds at most `max_bytes` of idle buffers, so it is a bounded part of the node's
//! memory even after a burst of reads; buffers are only pooled from `MIN_POOLED_BYTES` up
//! (smaller ones come from the allocator's own per-size free lists, reused at once), and a
//! read takes a pooled buffer only if it would fill at least half of it, so a small chunk never
//! pins a big buffer while it waits for its client (the read budget counts chunk sizes, not
//! buffer capacities).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers smaller than this are not pooled.
pub(crate) const MIN_POOLED_BYTES: usize = 64 << 10;

#[derive(Debug)]
pub(crate) struct BufferPool {
    idle: Mutex<Idle>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    /// The capacities of `buffers`, added up.
    bytes: usize,
}

/// A pooled buffer behind a [`Bytes`]: goes back to its pool when the last slice is dropped.
struct Pooled {
    buffer: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buffer));
    }
}

impl BufferPool {
    pub(crate) fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self { idle: Mutex::new(Idle::default()), max_bytes })
    }

    /// An empty buffer with room for `len` bytes: a pooled one that `len` fills at least half
    /// of, else a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED_BYTES / 2 {
            let mut idle = self.lock();
            let fits = idle.buffers.iter().position(|b| b.capacity() >= len && b.capacity() / 2 <= len);
            if let Some(at) = fits {
                let buffer = idle.buffers.swap_remove(at);
                idle.bytes -= buffer.capacity();
                return buffer;
            }
        }
        Vec::with_capacity(len)
    }

    /// `buffer`'s bytes, as a [`Bytes`] that gives the buffer back to this pool once the last
    /// of its slices is dropped.
    pub(crate) fn freeze(self: &Arc<Self>, buffer: Vec<u8>) -> Bytes {
        if buffer.capacity() < MIN_POOLED_BYTES {
            return Bytes::from(buffer);
        }
        Bytes::from_owner(Pooled { buffer, pool: self.clone() })
    }

    /// Idle bytes held now (for the node's metrics).
    pub(crate) fn idle_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn give_back(&self, mut buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity < MIN_POOLED_BYTES {
            return;
        }
        let mut idle = self.lock();
        if idle.bytes + capacity <= self.max_bytes {
            buffer.clear();
            idle.bytes += capacity;
            idle.buffers.push(buffer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        // Poisoned only by a panic inside these few lines, which leave `Idle` consistent.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn filled(pool: &Arc<BufferPool>, len: usize) -> Bytes {
        let mut buffer = pool.take(len);
        buffer.resize(len, 7);
        pool.freeze(buffer)
    }

    #[test]
    fn a_buffer_comes_back_once_its_last_slice_is_dropped_and_is_reused() {
        let pool = BufferPool::new(16 * MIB);
        let chunk = filled(&pool, 4 * MIB);
        let address = chunk.as_ptr();
        let slice = chunk.slice(MIB..2 * MIB);
        drop(chunk);
        assert_eq!(pool.idle_bytes(), 0, "a slice still uses the buffer");
        drop(slice);
        assert!(pool.idle_bytes() >= 4 * MIB);
        let again = pool.take(4 * MIB);
        assert_eq!(again.as_ptr(), address, "the same buffer is handed out again");
        assert!(again.is_empty(), "no stale bytes are handed out as data");
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn idle_buffers_stay_within_the_byte_limit() {
        let pool = BufferPool::new(10 * MIB);
        let chunks: Vec<Bytes> = (0..5).map(|_| filled(&pool, 4 * MIB)).collect();
        drop(chunks);
        assert!(pool.idle_bytes() <= 10 * MIB, "{} idle bytes", pool.idle_bytes());
        assert!(pool.idle_bytes() >= 8 * MIB, "two of the five buffers fit and are kept");
    }

    #[test]
    fn a_small_read_does_not_take_a_big_buffer_and_small_buffers_are_not_pooled() {
        let pool = BufferPool::new(16 * MIB);
        drop(filled(&pool, 4 * MIB));
        let idle = pool.idle_bytes();
        let small = pool.take(MIB);
        assert!(small.capacity() < 2 * MIB, "a 1 MiB read got a {} byte buffer", small.capacity());
        assert_eq!(pool.idle_bytes(), idle, "the 4 MiB buffer stays for a read that fills it");
        drop(filled(&pool, 4 << 10));
        assert_eq!(pool.idle_bytes(), idle, "a 4 KiB buffer is left to the allocator");
    }
}
