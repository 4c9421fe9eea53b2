//! `tidal-worker serve`: runs the role the flags ask for. The full and router roles
//! are wired here (model loading, shard client, engine, HTTP API); the expert role
//! runs [`crate::disagg::expert_server`].

use crate::cli::args::{Role, ServeArgs};
use crate::error::{Error, Result};
use crate::serve::auth::ApiKeys;
use crate::serve::engine::EngineConfig;
use crate::serve::http::{AppState, Served, ServerConfig};
use crate::serve::lifecycle;
use crate::serve::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Binds, loads the model in the background (health answers meanwhile), serves until
/// `shutdown` resolves, then drains for up to the grace period.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if args.role == Role::Expert {
        return crate::disagg::expert_server::serve(args.expert_config()?, shutdown).await;
    }
    let plan_path = match (args.role, &args.placement_file) {
        (Role::Router, None) => {
            return Err(Error::MissingFlag {
                role: "router",
                flag: "--placement-file",
                env: "TIDAL_PLACEMENT_FILE",
            });
        }
        (Role::Router, Some(p)) => Some(p.clone()),
        _ => None,
    };
    let dtype = crate::model::decoder::parse_dtype(&args.dtype)?;
    let device = args.device()?;
    // Certificates load before binding: a bad one fails the start, not the first client.
    let server = args.server_options()?;
    let (listener, addr) = lifecycle::bind(args.listen).await?;
    tracing::info!(%addr, "listening");
    let metrics = Arc::new(Metrics::for_model(&args.model_name()));
    let state = AppState::new(
        ServerConfig {
            model_name: args.model_name(),
            max_tokens: args.max_tokens,
            body_limit: args.max_body_bytes,
            escalation: args.escalation.to_config()?,
            api_keys: match &args.api_keys_file {
                Some(path) => Some(Arc::new(ApiKeys::open(path)?)),
                None => None,
            },
            site_service_prefix: args.site_service_prefix.clone(),
            ..ServerConfig::default()
        },
        metrics.clone(),
    );
    let engine_cfg = EngineConfig {
        max_batch: args.max_batch,
        queue_size: args.queue_size,
        prefix_cache: args.prefix_cache(),
        prefill_chunk_tokens: args.prefill_chunk_tokens,
    };
    let source = args.model.clone();
    let loader_state = state.clone();
    let shards = match plan_path {
        Some(p) => Some(
            crate::disagg::shard_client::ShardClient::start(
                &p,
                args.shard_client()?,
                metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let shard_client = shards.clone();
    let load = tokio::task::spawn_blocking(move || match shards {
        Some(client) => crate::disagg::shard_client::load_router(
            &source,
            dtype,
            client,
            Duration::from_secs(600),
        ),
        None => crate::model::loader::load(&source, dtype, &device),
    });
    let loaded = tokio::spawn(async move {
        match load.await {
            Ok(Ok(l)) => {
                let engine = crate::serve::engine::spawn(
                    l.model.clone(),
                    l.codec.clone(),
                    engine_cfg,
                    metrics,
                );
                loader_state.set_served(Served {
                    engine,
                    codec: l.codec,
                    model: l.model,
                });
                tracing::info!("ready");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(source) => Err(Error::Task {
                what: "the loader panicked",
                source,
            }),
        }
    });
    let app = crate::serve::http::router(state.clone());
    // A failed load ends the process: the orchestrator restarts it, with a clear log.
    let startup = async move { loaded.await.map_err(Error::task("a server task failed"))? };
    let on_drain = move |_: Option<()>| {
        state.begin_drain();
        if let Some(c) = &shard_client {
            // A router still waiting for its shards gives up the warm-up.
            c.close();
        }
    };
    lifecycle::serve(
        listener,
        app,
        startup,
        shutdown,
        args.drain(),
        server,
        on_drain,
    )
    .await
}
