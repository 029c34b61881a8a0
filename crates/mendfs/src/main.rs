//! `mendfs`: the one binary. A node (`server`), the client CLI (`kv`, `cluster`), the
//! benchmarks (`bench`) and the newcomer's `demo`. Only this crate prints to the terminal.

mod auth_cmd;
mod bench;
mod chaos_cmd;
mod cli;
mod client_cmd;
mod demo;
mod files_cmd;
mod local_cmd;
mod s3_cmd;
mod server;
mod telemetry_cmd;

use std::process::ExitCode;

use clap::Parser;

/// Allocations from this size up are mapped on their own and unmapped when freed.
const MMAP_THRESHOLD_BYTES: i32 = 256 << 10;

/// Pins glibc's mmap threshold. glibc raises it (up to 32 MiB) each time a large block is
/// freed, after which chunk-sized buffers (4 MiB, freed by the thousand) come from the
/// per-thread heaps and stay there, fragmented: a coordinator with 32 concurrent uploads peaked
/// at 783 MiB against 425 MiB with the threshold pinned (`mendfs bench files --sizes 67108864
/// --clients 32`, put row).
#[allow(unsafe_code)]
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

fn main() -> ExitCode {
    pin_mmap_threshold();
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
