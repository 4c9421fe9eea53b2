//! The `tidal-worker` binary: parses the command line and runs the command.

use clap::Parser;
use tidal_worker::cli::commands::{gen_fixture::gen_fixture, serve::serve};
use tidal_worker::cli::{Cli, Command};
use tidal_worker::serve::lifecycle::shutdown_signal;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            // Before any thread starts (the runtime is built below).
            let threads = tidal_worker::model::threads::configure(args.threads)?;
            init_tracing(args.log_json);
            tracing::info!(threads, "kernel threads");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(*args, shutdown_signal()))?;
            Ok(())
        }
        Command::GenFixture(args) => {
            init_tracing(false);
            gen_fixture(&args)?;
            Ok(())
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
