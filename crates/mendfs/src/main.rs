//! `mendfs`: the one binary. A node (`server`), the client CLI (`kv`, `cluster`), the
//! benchmarks (`bench`) and the newcomer's `demo`. Only this crate prints to the terminal.

mod allocator;
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

fn main() -> ExitCode {
    allocator::tune();
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
