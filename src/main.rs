//! The `hotfolder` binary: parse arguments, run, map errors to exit codes
//! (0 success, 1 run-time failure, 2 usage or configuration error).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    hotfolder::failpoint::setup();
    hotfolder::memory::tune_allocator();
    let cli = match hotfolder::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match hotfolder::cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
