//! `tidal-operator`: thin wiring; the library does the work.

use clap::Parser;
use tidal_operator::cli::{Cli, Command};
use tidal_operator::crd::{all_crds, crd_yaml};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            for crd in all_crds() {
                println!("---\n{}", crd_yaml(&crd));
            }
            std::process::ExitCode::SUCCESS
        }
        Command::Run(args) => {
            tidal_operator::telemetry::init(args.log_json);
            match tidal_operator::run::run(*args).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "tidal-operator failed");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
