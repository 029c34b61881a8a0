//! The process's memory allocator: mimalloc, with two settings of ours.
//!
//! mimalloc rather than glibc's malloc: glibc raises its mmap threshold (up to 32 MiB) each
//! time a large block is freed, after which chunk-sized buffers come from per-thread heaps and
//! stay there, fragmented (a coordinator with 32 concurrent 64 MiB uploads peaked at 783 MiB);
//! pinning the threshold instead cost a quarter of the 1 MiB read rate in page faults.
//!
//! Built without transparent huge pages (`no_thp`): mimalloc otherwise asks for them
//! (`MADV_HUGEPAGE`) on its arenas, so a touched byte makes 2 MiB resident and a partly freed
//! huge page stays so. Under 8-client load that was 20 to 30 MiB more per node (a coordinator
//! of 8 concurrent 64 MiB reads: 141 against 120 MiB) for no measurable throughput.
//!
//! **Mid-sized blocks get pages of their own** ([`NodeAllocator`]). mimalloc v3 keeps blocks of
//! about 84 KiB to 512 KiB in 4 MiB "large" pages, one set per thread and size class, and a page
//! goes back to the OS only once every block in it is free. The data path makes such blocks on
//! every thread, all the time: a client's 256 KiB upload messages and the slices forwarded to
//! replicas, each decoded or encoded into a buffer of its own, and the buffers of the
//! connections that carry them. So a few that live on (a connection's buffer, a slice queued
//! for a slow replica) each pin a 4 MiB page of freed ones. In `mendfs bench files`, once the
//! 1 MiB rows had run, a coordinator's RSS sat 55 to 90 MiB above the bytes it had allocated
//! (22 of them the program's code), and forcing mimalloc to purge what it held freed gave back
//! almost nothing: the memory was in pages that threads still owned. Blocks above 512 KiB get a
//! page of their own, handed back to the arena when the block is freed and to the OS after the
//! purge delay below; so these are asked for as 512 KiB + 1. Only the bytes a block touches
//! become resident, so a 256 KiB message still costs 256 KiB.
//!
//! Measured with the metadata reads' own bound in place (`mendfs_meta`'s `blocking_work`), in
//! full runs of `mendfs bench files --seconds 4`, the coordinator's peak RSS on the 8-client
//! 64 MiB rows: put 97–103 MiB, get 109–113, against 105–106 and 133–135 without this; the
//! other two nodes stayed at or under 63 MiB in every 8-client row, against up to 70. The price
//! is in 1 MiB puts, whose 256 KiB pieces each take a trip through the arena now: 10 to 14 % of
//! their rate at 8 and 32 clients on average (alternated runs of `bench files --sizes 1048576
//! --clients 8,32`; 7 to 16 % in single runs); 4 KiB and 64 MiB files, and every get, ran as
//! fast.
//!
//! **A short purge delay** ([`tune`]): see `ALLOCATOR_PURGE_DELAY_MS`.

use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static ALLOCATOR: NodeAllocator = NodeAllocator;

/// The largest block mimalloc v3 puts in a page shared with other blocks ("large" pages of 4 MiB:
/// `MI_LARGE_MAX_OBJ_SIZE` in its `types.h`).
const SHARED_PAGE_BLOCK_MAX: usize = 512 << 10;
/// The smallest block mimalloc v3 puts in a large page rather than a 512 KiB medium one
/// (`MI_MEDIUM_MAX_OBJ_SIZE`, about 84.7 KiB), rounded down: medium pages stay as they are, as
/// the 64 KiB messages of a read are made and freed thousands of times a second, and a page of
/// their own each would cost a trip through the arena apiece.
const LARGE_PAGE_BLOCK_MIN: usize = 84 << 10;

/// mimalloc, with blocks that would share a large page asked for as blocks of a page of their
/// own (see the module's notes).
pub struct NodeAllocator;

/// The size to ask mimalloc for, for a block of `size` bytes.
fn size_to_ask(size: usize) -> usize {
    if (LARGE_PAGE_BLOCK_MIN..=SHARED_PAGE_BLOCK_MAX).contains(&size) {
        SHARED_PAGE_BLOCK_MAX + 1
    } else {
        size
    }
}

/// `layout` with the size to ask mimalloc for, and the same alignment.
fn layout_to_ask(layout: Layout) -> Layout {
    let size = size_to_ask(layout.size());
    if size == layout.size() {
        return layout;
    }
    // Cannot fail: the size only grows, to well below `isize::MAX` rounded to the alignment.
    Layout::from_size_align(size, layout.align()).unwrap_or(layout)
}

// SAFETY: every call goes to mimalloc with a layout whose size is at least the caller's and
// whose alignment is the caller's, so each block is as big and as aligned as asked. A block is
// freed or resized with the same layout it was made with: `layout_to_ask` is a function of the
// size alone, and the caller's layout is the one it allocated (or last resized) with.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for NodeAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above; the layout has a non-zero size, as the caller's did.
        unsafe { mimalloc::MiMalloc.alloc(layout_to_ask(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let asked = layout_to_ask(layout);
        if asked.size() == layout.size() {
            // SAFETY: as for `alloc`.
            return unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        }
        // Only the caller's bytes are zeroed: mimalloc would zero the whole 512 KiB block of
        // reused memory, making resident bytes that no one uses.
        // SAFETY: as for `alloc`; the block holds at least `layout.size()` bytes.
        unsafe {
            let block = mimalloc::MiMalloc.alloc(asked);
            if !block.is_null() {
                std::ptr::write_bytes(block, 0, layout.size());
            }
            block
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` with `layout`, so from mimalloc with
        // `layout_to_ask(layout)`.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout_to_ask(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the new size is non-zero and, rounded up to the alignment,
        // within `isize::MAX`, as the caller's was (the rounded size stays far below it).
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout_to_ask(layout), size_to_ask(new_size)) }
    }
}

/// How long mimalloc keeps freed memory before it gives it back to the OS. Its own default (1 s
/// in v3) let a coordinator streaming 8 clients' 64 MiB reads hold 40 to 90 MiB of freed
/// memory above the 35 to 50 MiB it had in use (119 to 173 MiB peak RSS against the 128 MiB a
/// node under 8-client load must stay within): at a GB/s of reads, a second of freed buffers is
/// most of a GB to recycle, and some of it is not. 25 ms brought the peak to 92 to 105 MiB; 0
/// (purge at once) to 99 MiB for 14 to 25 % of that row's rate, in page faults on memory handed
/// back and taken again (`mendfs bench files --sizes 67108864 --clients 8`). Those faults are
/// why local reads reuse their chunk buffers (the data crate's `BufferPool`): without it 25 ms
/// cost 12 to 17 % of 8 clients' 1 MiB GETs, with it 3 to 9 % of the 64 MiB rows.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides, when set.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 25;
/// `mi_option_purge_delay`'s place in mimalloc v3's `mi_option_t` (`mimalloc.h`), and the
/// default it holds there: the option is set only if that place holds that default, so a
/// mimalloc whose options moved is left alone rather than mis-set
/// (`tests::the_purge_delay_option_is_where_it_was`).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
const MI_PURGE_DELAY_DEFAULT_MS: std::ffi::c_long = 1000;

#[allow(unsafe_code)]
mod mimalloc_options {
    use std::ffi::{c_int, c_long};

    // Linked in by the `mimalloc` crate, which does not export its options.
    unsafe extern "C" {
        fn mi_option_get(option: c_int) -> c_long;
        fn mi_option_set(option: c_int, value: c_long);
    }

    pub fn get(option: c_int) -> c_long {
        // SAFETY: takes and returns plain integers; mimalloc checks the option's range, and its
        // options are initialized when the process loads, before `main`.
        unsafe { mi_option_get(option) }
    }

    pub fn set(option: c_int, value: c_long) {
        // SAFETY: as for `get`; the store is a plain word that mimalloc's threads read racily by
        // design (an option is a hint, read again on each purge).
        unsafe { mi_option_set(option, value) }
    }
}

/// Sets mimalloc's purge delay to `ALLOCATOR_PURGE_DELAY_MS`, unless the environment chose one.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
        && mimalloc_options::get(MI_OPTION_PURGE_DELAY) == MI_PURGE_DELAY_DEFAULT_MS
    {
        mimalloc_options::set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_where_it_was() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // A mimalloc upgrade that moved the option (or changed its default) fails here, where
        // `tune` would silently leave the delay alone.
        assert_eq!(mimalloc_options::get(MI_OPTION_PURGE_DELAY), MI_PURGE_DELAY_DEFAULT_MS);
        tune();
        assert_eq!(mimalloc_options::get(MI_OPTION_PURGE_DELAY), ALLOCATOR_PURGE_DELAY_MS);
    }

    #[test]
    fn only_blocks_that_would_share_a_large_page_are_asked_for_bigger() {
        assert_eq!(size_to_ask(1), 1);
        assert_eq!(size_to_ask((64 << 10) + 5), (64 << 10) + 5, "a read's 64 KiB message stays medium");
        assert_eq!(size_to_ask(LARGE_PAGE_BLOCK_MIN - 1), LARGE_PAGE_BLOCK_MIN - 1);
        assert_eq!(size_to_ask(LARGE_PAGE_BLOCK_MIN), SHARED_PAGE_BLOCK_MAX + 1);
        assert_eq!(size_to_ask((256 << 10) + 5), SHARED_PAGE_BLOCK_MAX + 1);
        assert_eq!(size_to_ask(SHARED_PAGE_BLOCK_MAX), SHARED_PAGE_BLOCK_MAX + 1);
        assert_eq!(size_to_ask(SHARED_PAGE_BLOCK_MAX + 1), SHARED_PAGE_BLOCK_MAX + 1);
        assert_eq!(size_to_ask(4 << 20), 4 << 20);
        let aligned = layout_to_ask(Layout::from_size_align(100 << 10, 4096).unwrap());
        assert_eq!((aligned.size(), aligned.align()), (SHARED_PAGE_BLOCK_MAX + 1, 4096));
    }

    /// The tests run on this allocator too; this drives a block through every size range and
    /// back, checking that its bytes survive each move and its alignment holds.
    #[test]
    fn a_block_keeps_its_bytes_as_it_grows_and_shrinks_through_every_range() {
        let mut buffer: Vec<u8> = Vec::new();
        for size in [1usize, 5_000, 70 << 10, 90 << 10, 300 << 10, 600 << 10, 5 << 20] {
            let from = buffer.len();
            buffer.resize(size, 0);
            for (i, byte) in buffer[from..].iter_mut().enumerate() {
                *byte = ((from + i) % 251) as u8;
            }
            assert!(buffer.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "at {size} bytes");
        }
        for size in [400 << 10, 80 << 10, 100] {
            buffer.truncate(size);
            buffer.shrink_to_fit();
            assert!(buffer.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "shrunk to {size} bytes");
        }
    }

    #[test]
    fn a_zeroed_block_is_zero_where_the_caller_asked_even_in_reused_memory() {
        let layout = Layout::from_size_align(200 << 10, 64 << 10).unwrap();
        // SAFETY: non-zero sizes; each block is freed with the layout it was made with.
        #[allow(unsafe_code)]
        unsafe {
            for _ in 0..8 {
                // Dirty memory of the block's size class first, so that the zeroed block is
                // likely to reuse it rather than come fresh (and zero) from the OS.
                let dirty = ALLOCATOR.alloc(layout);
                assert!(!dirty.is_null());
                std::ptr::write_bytes(dirty, 0xa5, layout.size());
                ALLOCATOR.dealloc(dirty, layout);
                let block = ALLOCATOR.alloc_zeroed(layout);
                assert!(!block.is_null());
                assert_eq!(block as usize % (64 << 10), 0, "the alignment asked for holds");
                assert!(std::slice::from_raw_parts(block, layout.size()).iter().all(|b| *b == 0));
                ALLOCATOR.dealloc(block, layout);
            }
        }
    }
}
