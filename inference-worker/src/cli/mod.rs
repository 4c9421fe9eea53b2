//! Command line (clap) and the `serve` lifecycle: bind, load, serve, drain on SIGTERM.

use crate::serve::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::model::fixture::FixtureSpec;
use crate::serve::metrics::Metrics;
use crate::serve::http::{AppState, Served, ServerConfig};
use clap::{Parser, Subcommand, ValueEnum};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "tidal-worker", version, about = "Tidal's candle model server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Write a tiny random checkpoint (for tests and benchmarks).
    GenFixture(GenFixtureArgs),
}

/// What this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The whole model in one process.
    Full,
    /// Embeddings, attention, norms and gates; the experts run on expert shards
    /// (`--placement-file`). Serves the OpenAI API.
    Router,
    /// The FFNs of this shard's experts (`--placement-file`, `--shard`). Serves
    /// only the binary expert endpoint, health, readiness and metrics.
    Expert,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Local checkpoint directory or `hf://org/name[@revision]`.
    #[arg(long, env = "TIDAL_MODEL")]
    pub model: String,
    /// Name clients use in `model`; defaults to the checkpoint directory's name.
    #[arg(long, env = "TIDAL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "TIDAL_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    #[arg(long, env = "TIDAL_ROLE", value_enum, default_value = "full")]
    pub role: Role,
    /// f32, bf16 or f16.
    #[arg(long, env = "TIDAL_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Most sequences decoded together.
    #[arg(long, env = "TIDAL_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Most requests waiting for the batch before 429s.
    #[arg(long, env = "TIDAL_QUEUE_SIZE", default_value_t = 64)]
    pub queue_size: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, env = "TIDAL_MAX_TOKENS", default_value_t = 2048)]
    pub max_tokens: usize,
    #[arg(long, env = "TIDAL_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM.
    #[arg(long, env = "TIDAL_GRACE_SECONDS", default_value_t = 30)]
    pub grace_seconds: u64,
    /// Log as JSON lines.
    #[arg(long, env = "TIDAL_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// Edge escalation to a cloud endpoint (see crate::serve::escalation).
    #[command(flatten)]
    pub escalation: crate::serve::escalation::EscalationArgs,
    /// Expert placement plan (plan.json) for the router and expert roles; reloaded
    /// when it changes.
    #[arg(long, env = "TIDAL_PLACEMENT_FILE")]
    pub placement_file: Option<PathBuf>,
    /// This expert shard's index in the placement plan (expert role).
    #[arg(long, env = "TIDAL_SHARD")]
    pub shard: Option<usize>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GenFixtureArgs {
    #[arg(long, env = "TIDAL_FIXTURE_OUT")]
    pub out: PathBuf,
    #[command(flatten)]
    pub spec: FixtureSpec,
}

impl ServeArgs {
    pub fn model_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            let trimmed = self.model.trim_end_matches('/');
            let name = trimmed.strip_prefix("hf://").unwrap_or(trimmed);
            match name.rsplit_once('/') {
                Some((_, last)) if !self.model.starts_with("hf://") => last.to_string(),
                _ => name.to_string(),
            }
        })
    }
}

/// Binds, loads the model in the background (health answers meanwhile), serves until
/// `shutdown` resolves, then drains for up to the grace period.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if args.role == Role::Expert {
        return crate::disagg::expert_server::serve(args, shutdown).await;
    }
    let plan_path = match (args.role, &args.placement_file) {
        (Role::Router, None) => {
            return Err(Error::Other(
                "the router role needs --placement-file (TIDAL_PLACEMENT_FILE)".into(),
            ));
        }
        (Role::Router, Some(p)) => Some(p.clone()),
        _ => None,
    };
    let dtype = crate::model::decoder::parse_dtype(&args.dtype)?;
    let bind_err = |source| Error::Bind {
        addr: args.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(bind_err)?;
    tracing::info!(addr = %listener.local_addr().map_err(bind_err)?, "listening");
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(
        ServerConfig {
            model_name: args.model_name(),
            max_tokens: args.max_tokens,
            body_limit: args.max_body_bytes,
            escalation: args.escalation.to_config()?,
            ..ServerConfig::default()
        },
        metrics.clone(),
    );
    let engine_cfg = EngineConfig {
        max_batch: args.max_batch,
        queue_size: args.queue_size,
    };
    let source = args.model.clone();
    let loader_state = state.clone();
    let shards = match plan_path {
        Some(p) => Some(
            crate::disagg::shard_client::ShardClient::start(&p, Default::default(), metrics.clone())
                .await?,
        ),
        None => None,
    };
    let shard_client = shards.clone();
    let load = tokio::task::spawn_blocking(move || match shards {
        Some(client) => {
            crate::disagg::shard_client::load_router(&source, dtype, client, Duration::from_secs(600))
        }
        None => crate::model::loader::load(&source, dtype),
    });
    let loaded = tokio::spawn(async move {
        match load.await {
            Ok(Ok(l)) => {
                let engine =
                    crate::serve::engine::spawn(l.model.clone(), l.codec.clone(), engine_cfg, metrics);
                loader_state.set_served(Served {
                    engine,
                    codec: l.codec,
                    model: l.model,
                });
                tracing::info!("ready");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Other(format!("the loader panicked: {e}"))),
        }
    });
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let app = crate::serve::http::router(state.clone());
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = drain_rx.await;
            })
            .into_future(),
    );
    let mut loaded = loaded;
    let mut load_pending = true;
    let mut shutdown = Box::pin(shutdown);
    loop {
        tokio::select! {
            // A failed load ends the process: the orchestrator restarts it, with a clear log.
            res = &mut loaded, if load_pending => {
                load_pending = false;
                res.map_err(join_err)??;
            }
            res = &mut server => {
                res.map_err(join_err)?.map_err(Error::Serve)?;
                return Ok(());
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutdown requested: draining");
    state.begin_drain();
    if let Some(c) = &shard_client {
        // A router still waiting for its shards gives up the warm-up.
        c.close();
    }
    let _ = drain_tx.send(());
    match tokio::time::timeout(Duration::from_secs(args.grace_seconds), &mut server).await {
        Ok(res) => res.map_err(join_err)?.map_err(Error::Serve)?,
        Err(_) => {
            tracing::warn!("grace period over; exiting with requests still in flight");
            server.abort();
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Other(format!("a server task failed: {e}"))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
