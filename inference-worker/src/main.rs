use clap::Parser;
use tidal_worker::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_json);
            tidal_worker::cli::serve(args, tidal_worker::cli::shutdown_signal()).await?;
            Ok(())
        }
        Command::GenFixture(args) => {
            init_tracing(false);
            tidal_worker::model::fixture::generate(&args.spec, &args.out)?;
            println!("wrote {}", args.out.display());
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
