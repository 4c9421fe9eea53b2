//! The one lifecycle every role's HTTP server goes through: bind, serve with axum
//! while the role starts up, and on SIGTERM drain (readiness turns false, new
//! connections are refused, in-flight requests get up to a grace period).

use crate::error::{Error, Result};
use axum::Router;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Binds `addr`; returns the listener and the address it is bound to.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let bind_err = |source| Error::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
///
/// `startup` runs meanwhile (loading weights: `/health` answers, readiness waits).
/// Its failure ends the server with that error (the orchestrator restarts the
/// process, with a clear log). When `shutdown` resolves, `on_drain` gets
/// `startup`'s output (None when it had not finished; it is then dropped) and
/// must turn readiness false; the server then stops accepting connections and
/// in-flight requests have up to `grace` to finish before they are dropped.
/// Returns early, without draining, if the server itself stops.
pub async fn serve<T>(
    listener: TcpListener,
    app: Router,
    startup: impl Future<Output = Result<T>>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    on_drain: impl FnOnce(Option<T>),
) -> Result<()> {
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = drain_rx.await;
            })
            .into_future(),
    );
    let mut startup = std::pin::pin!(startup);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut started = None;
    loop {
        tokio::select! {
            res = &mut startup, if started.is_none() => started = Some(res?),
            res = &mut server => {
                res.map_err(Error::task(SERVER_TASK))?.map_err(Error::Serve)?;
                return Ok(());
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutdown requested: draining");
    on_drain(started);
    let _ = drain_tx.send(());
    match tokio::time::timeout(grace, &mut server).await {
        Ok(res) => res
            .map_err(Error::task(SERVER_TASK))?
            .map_err(Error::Serve)?,
        Err(_) => {
            tracing::warn!("grace period over; exiting with requests still in flight");
            server.abort();
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

const SERVER_TASK: &str = "a server task failed";

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
