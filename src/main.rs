//! The `temper` binary: parse arguments, run the command, map errors to an exit code.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    cli::device::quiet_vulkan_loader();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
