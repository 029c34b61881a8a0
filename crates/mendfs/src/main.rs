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

fn main() -> ExitCode {
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
