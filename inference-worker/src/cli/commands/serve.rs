//! `tidal-worker serve`: runs the role the flags ask for. The full and router roles
//! are wired here (model loading, shard client, engine, HTTP API); the expert role
//! runs [`crate::disagg::expert_server`].

use crate::cli::args::{Role, ServeArgs};
use crate::error::{Error, Result};
use crate::serve::engine::EngineConfig;
use crate::serve::http::{AppState, Served, ServerConfig};
use crate::serve::metrics::Metrics;
use std::future::{Future, IntoFuture};
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
