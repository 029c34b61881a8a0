//! A peer's snapshot chunks at arbitrary offsets and lengths: the receiver refuses gaps and
//! oversize snapshots, and never panics.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: (Vec<u8>, Vec<(u64, u16)>)| {
    let (data, cuts) = input;
    if let Ok(held) = mendfs_meta::crafted::receive_snapshot(&data, &cuts) {
        assert!(held <= 1 << 20, "the receiver held {held} bytes past its limit");
    }
});
