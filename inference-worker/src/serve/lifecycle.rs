//! The one lifecycle every role's HTTP server goes through: bind, serve with axum
//! while the role starts up, and on SIGTERM drain: readiness turns false, requests
//! that still arrive are served until none has for a quiet period (kube-proxy and
//! routers learn of a terminating pod late), then new connections are refused and
//! in-flight requests finish within the grace period.

use crate::error::{Error, Result};
use crate::serve::conn::{self, LastActivity, ServerOptions};
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How a server stops once shutdown is requested.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// How long the whole drain may take (the pod's grace period minus its preStop).
    pub grace: Duration,
    /// Requests keep being accepted and served until none has arrived for this long.
    pub quiet: Duration,
}

/// Paths the orchestrator and Prometheus call: they are not traffic and must not hold
/// a drain open.
const HOUSEKEEPING: [&str; 3] = ["/health", "/ready", "/metrics"];

/// Notes when the last request began, probes and scrapes aside.
async fn track(State(activity): State<Arc<LastActivity>>, req: Request, next: Next) -> Response {
    if !HOUSEKEEPING.contains(&req.uri().path()) {
        activity.touch();
    }
    next.run(req).await
}

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
/// must turn readiness false. Requests that still arrive are served until none
/// has for `drain.quiet`; the server then stops accepting connections, and
/// in-flight requests finish or are dropped when `drain.grace` (counted from
/// shutdown) is over. Returns early, without draining, if the server itself stops.
pub async fn serve<T>(
    listener: TcpListener,
    app: Router,
    startup: impl Future<Output = Result<T>>,
    shutdown: impl Future<Output = ()>,
    drain: Drain,
    options: ServerOptions,
    on_drain: impl FnOnce(Option<T>),
) -> Result<()> {
    let activity = Arc::new(LastActivity::new());
    let app = app.layer(middleware::from_fn_with_state(activity.clone(), track));
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(conn::serve(listener, app, options, async {
        let _ = drain_rx.await;
    }));
    let mut startup = std::pin::pin!(startup);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut started = None;
    loop {
        tokio::select! {
            res = &mut startup, if started.is_none() => started = Some(res?),
            res = &mut server => {
                res.map_err(Error::task(SERVER_TASK))?;
                return Ok(());
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutdown requested: draining");
    let deadline = tokio::time::Instant::now() + drain.grace;
    on_drain(started);
    // A terminating pod stays in some routes for a while (kube-proxy's rules, a
    // router's list): refusing those requests would fail them, so serve them.
    loop {
        let idle = activity.idle();
        if idle >= drain.quiet {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(drain.quiet - idle) => {}
            () = tokio::time::sleep_until(deadline) => break,
            res = &mut server => {
                res.map_err(Error::task(SERVER_TASK))?;
                return Ok(());
            }
        }
    }
    tracing::info!("no new requests: closing the listener");
    let _ = drain_tx.send(());
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(res) => res.map_err(Error::task(SERVER_TASK))?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 request on a new connection; the status code, or the connect error.
    async fn status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }

    struct Running {
        addr: SocketAddr,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        drained: Arc<std::sync::atomic::AtomicBool>,
        done: tokio::task::JoinHandle<Result<()>>,
    }

    async fn start(drain: Drain) -> Running {
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let app = Router::new()
            .route("/v1/work", get(|| async { "done" }))
            .route("/ready", get(|| async { "ok" }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = drained.clone();
        let done = tokio::spawn(serve(
            listener,
            app,
            async { Ok(()) },
            async {
                let _ = rx.await;
            },
            drain,
            ServerOptions::default(),
            move |_| d.store(true, Ordering::SeqCst),
        ));
        Running {
            addr,
            shutdown: Some(tx),
            drained,
            done,
        }
    }

    impl Running {
        async fn request_shutdown(&mut self) {
            let _ = self.shutdown.take().unwrap().send(());
            while !self.drained.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn requests_arriving_after_shutdown_are_served_until_they_stop() {
        let mut s = start(Drain {
            grace: Duration::from_secs(60),
            quiet: Duration::from_secs(2),
        })
        .await;
        assert_eq!(status(s.addr, "/v1/work").await.unwrap(), 200);
        s.request_shutdown().await;
        // A stale route keeps sending: every request is served, none refused.
        for _ in 0..10 {
            assert_eq!(status(s.addr, "/v1/work").await.unwrap(), 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !s.done.is_finished(),
            "the server closed while requests arrived"
        );
        // Probes alone do not hold the drain open: the server ends by itself.
        let probes = tokio::spawn(async move {
            loop {
                let _ = status(s.addr, "/ready").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let ended = tokio::time::timeout(Duration::from_secs(60), s.done).await;
        probes.abort();
        ended.expect("drain ended").unwrap().unwrap();
        let refused = status(s.addr, "/v1/work").await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn the_grace_period_bounds_a_drain_that_never_goes_quiet() {
        let mut s = start(Drain {
            grace: Duration::from_millis(500),
            quiet: Duration::from_secs(3600),
        })
        .await;
        assert_eq!(status(s.addr, "/v1/work").await.unwrap(), 200);
        s.request_shutdown().await;
        let ended = tokio::time::timeout(Duration::from_secs(60), s.done).await;
        ended
            .expect("the grace period ended the drain")
            .unwrap()
            .unwrap();
    }
}
