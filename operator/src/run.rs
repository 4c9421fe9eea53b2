//! `tidal-operator run`: health server, leader election, controllers, clean shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{error, info};

use crate::children::BuildConfig;
use crate::cli::RunArgs;
use crate::controller::{self, Context};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::server::{self, Health};

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "tidal-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Runs every controller until `stop` flips to true.
async fn run_controllers(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // One watch per kind the controllers share, started once every one has subscribed.
    let mut shared = controller::caches::Shared::new(&ctx);
    let services = controller::inference_service::inputs(&mut shared);
    let edge_nodes = controller::edge_node::inputs(&mut shared);
    let autoscale = controller::autoscale::inputs(&shared);
    let watches = shared.start();
    tokio::join!(
        controller::inference_service::run(ctx.clone(), services, until(stop.clone())),
        controller::edge_node::run(ctx.clone(), edge_nodes, until(stop.clone())),
        controller::autoscale::run(ctx, autoscale, until(stop)),
    );
    drop(watches);
}

pub async fn run(args: RunArgs) -> Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::shared();
    let health = Arc::new(Health::default());
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let build = BuildConfig {
        worker_image: args.worker_image.clone(),
        cluster_domain: args.cluster_domain.clone(),
    };
    let mut ctx = Context::new(
        client.clone(),
        build,
        metrics.clone(),
        Some(identity.clone()),
    );
    {
        let c = Arc::get_mut(&mut ctx).expect("not shared yet");
        c.namespace = args.watch_namespace.clone();
        c.edge_node_selector = args.edge_node_selector.clone().filter(|s| !s.is_empty());
        c.autoscale = controller::autoscale::Settings {
            enabled: !args.disable_autoscaler,
            prometheus_url: args.prometheus_url.clone(),
            rate_window: args.rate_window.clone(),
            default_ready_time_s: args.default_ready_seconds,
            fast_path: (args.fast_path_interval_seconds > 0.0).then(|| {
                crate::autoscaler::FastPathConfig {
                    interval_s: args.fast_path_interval_seconds,
                    ..Default::default()
                }
            }),
        };
        c.controller_config = kube::runtime::controller::Config::default()
            .concurrency(args.max_concurrent_reconciles)
            .debounce(std::time::Duration::from_millis(args.reconcile_debounce_ms));
    }

    // `shutdown` flips on SIGTERM; everything stops from it.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        termination().await;
        let _ = shutdown_tx.send(true);
    });
    let mut server_stop = shutdown_rx.clone();
    let server = tokio::spawn(server::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
        async move {
            let _ = server_stop.wait_for(|s| *s).await;
        },
    ));
    health.ready.store(true, Ordering::Relaxed);
    info!(%identity, addr = %args.metrics_addr, "tidal-operator started");

    let outcome = if args.no_leader_election {
        metrics.leader.set(1);
        run_controllers(ctx, shutdown_rx.clone()).await;
        Ok(())
    } else {
        lead(&args, client, &identity, ctx, &metrics, shutdown_rx.clone()).await
    };
    health.ready.store(false, Ordering::Relaxed);
    metrics.leader.set(0);
    let _ = server.await;
    outcome
}

/// Waits for the Lease, runs the controllers while holding it. Losing it stops the controllers
/// and returns an error: a fresh process is the only way to be sure no stale write follows.
async fn lead(
    args: &RunArgs,
    client: Client,
    identity: &str,
    ctx: Arc<Context>,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let manager = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(identity)
        .with_duration(args.lease_duration_seconds)
        .with_grace((args.lease_duration_seconds / 3).max(1))
        .with_field_manager(format!("tidal-operator-lease-{identity}"))
        .build()
        .await
        .map_err(|e| Error::Leader(e.to_string()))?;
    let (mut leader, task) = manager.watch().await;
    let acquired = tokio::select! {
        _ = shutdown.wait_for(|s| *s) => false,
        r = leader.wait_for(|l| *l) => { r.map_err(|e| Error::Leader(e.to_string()))?; true }
    };
    if !acquired {
        drop(leader);
        let _ = task.await;
        return Ok(());
    }
    info!(%identity, "acquired leadership");
    metrics.leader.set(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut lost = false;
    let controllers = run_controllers(ctx, stop_rx);
    tokio::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => {}
        _ = shutdown.wait_for(|s| *s) => {}
        _ = leader.wait_for(|l| !*l) => { lost = true; }
    }
    let _ = stop_tx.send(true);
    controllers.await;
    metrics.leader.set(0);
    // Dropping the receiver makes the lease manager release the Lease.
    drop(leader);
    let _ = task.await;
    if lost {
        error!(%identity, "lost leadership; exiting");
        return Err(Error::Leader("lost leadership".into()));
    }
    info!("released leadership");
    Ok(())
}
