//! `mendfs`: the one binary. A node (`server`), the client CLI (`kv`, `cluster`), the
//! benchmarks (`bench`) and the newcomer's `demo`. Only this crate prints to the terminal.

mod auth_cmd;
mod bench;
mod chaos_cmd;
mod cli;
mod client_cmd;
mod demo;
mod files_cmd;
mod job_cmd;
mod local_cmd;
mod policy_cmd;
mod s3_cmd;
mod server;
mod telemetry_cmd;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: glibc raises its mmap threshold (up to 32 MiB) each
/// time a large block is freed, after which chunk-sized buffers come from per-thread heaps and
/// stay there, fragmented (a coordinator with 32 concurrent 64 MiB uploads peaked at 783 MiB);
/// pinning the threshold instead cost a quarter of the 1 MiB read rate in page faults.
///
/// Built without transparent huge pages (`no_thp`): mimalloc otherwise asks for them
/// (`MADV_HUGEPAGE`) on its arenas, so a touched byte makes 2 MiB resident and a partly freed
/// huge page stays so. Under 8-client load that was 20 to 30 MiB more per node (a coordinator
/// of 8 concurrent 64 MiB reads: 141 against 120 MiB) for no measurable throughput.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
        && mimalloc_options::get(MI_OPTION_PURGE_DELAY) == MI_PURGE_DELAY_DEFAULT_MS
    {
        mimalloc_options::set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
        // `tune_allocator` would silently leave the delay alone.
        assert_eq!(mimalloc_options::get(MI_OPTION_PURGE_DELAY), MI_PURGE_DELAY_DEFAULT_MS);
        tune_allocator();
        assert_eq!(mimalloc_options::get(MI_OPTION_PURGE_DELAY), ALLOCATOR_PURGE_DELAY_MS);
    }
}
