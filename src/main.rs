use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = skyspool::cli::Cli::parse();
    match skyspool::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skyspool: {e:#}");
            ExitCode::FAILURE
        }
    }
}
