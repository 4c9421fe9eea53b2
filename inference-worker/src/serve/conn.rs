//! Accepting and serving HTTP connections with bounds on what a client can hold:
//! how many connections are open (one over the limit is answered 429 and closed),
//! how long a request head may take to arrive (slowloris), how large it may be (431),
//! how long a request body may take (408), and how long a connection with nothing in
//! flight stays open. HTTP/1.1 and HTTP/2 (prior knowledge, as the router's shard
//! client speaks it) on one port; with TLS, both by ALPN.

use crate::serve::api::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// What one client may hold of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections; one more is answered 429 and closed.
    pub max_connections: u32,
    /// Time for a request head to arrive. On HTTP/1.1 it also bounds how long an idle
    /// keep-alive connection is kept (the wait for the next head).
    pub header_timeout: Duration,
    /// Largest request head (HTTP/1.1 read buffer, HTTP/2 header list), in bytes.
    pub max_header_bytes: u32,
    /// Time for a request body to arrive, counted from its head; then 408.
    pub body_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is
    /// closed (HTTP/2 and connections that never sent a byte).
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// How a server listens: its client limits, and TLS when it has a certificate.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub limits: ConnLimits,
    /// Serve HTTPS with this configuration (see [`crate::serve::tls::server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl From<ConnLimits> for ServerOptions {
    fn from(limits: ConnLimits) -> Self {
        Self { limits, tls: None }
    }
}

/// The smallest read buffer hyper's HTTP/1.1 server takes.
const MIN_HEADER_BYTES: u32 = 8192;

/// At most this many over-limit connections are being answered at once; beyond it
/// they are closed without an answer (a flood must not spawn unbounded tasks).
const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` within `limits` until `stop` resolves; then stops
/// accepting, asks every connection to finish (HTTP/1.1: after its request in flight;
/// HTTP/2: GOAWAY) and returns when all have closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServerOptions,
    stop: impl Future<Output = ()>,
) {
    let limits = options.limits;
    let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits.body_timeout,
        body_deadline,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (close_tx, close_rx) = watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let (app, close_rx, tls) = (app.clone(), close_rx.clone(), tls.clone());
                tokio::spawn(async move {
                    let activity = Arc::new(Activity::new());
                    let tracked = Tracked {
                        inner: stream,
                        activity: activity.clone(),
                    };
                    match tls {
                        None => serve_connection(tracked, activity, app, limits, close_rx).await,
                        // The handshake is bounded like a request head.
                        Some(tls) => {
                            match tokio::time::timeout(limits.header_timeout, tls.accept(tracked))
                                .await
                            {
                                Ok(Ok(io)) => {
                                    serve_connection(io, activity, app, limits, close_rx).await
                                }
                                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!("TLS handshake timed out"),
                            }
                        }
                    }
                    drop(slot);
                });
            }
            Err(_) => match refusing.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(permit);
                    });
                }
                Err(_) => drop(stream),
            },
        }
    }
    drop(listener);
    let _ = close_tx.send(true);
    // Every connection holds a slot until it has closed.
    let _ = slots.acquire_many(limits.max_connections).await;
}

/// When something last happened, as a duration since then.
#[derive(Debug)]
pub(crate) struct LastActivity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl LastActivity {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn idle(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// What one connection is doing: requests in flight and when a byte last moved.
#[derive(Debug)]
struct Activity {
    last: LastActivity,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            last: LastActivity::new(),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        self.last.touch();
    }

    fn idle(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        self.last.idle()
    }
}

/// In every request's extensions: lets a handler have its connection closed once what is in
/// flight on it is answered (HTTP/2: GOAWAY, so the client opens a new connection, which
/// kube-proxy may route elsewhere; HTTP/1.1: no keep-alive).
#[derive(Clone, Debug)]
pub struct ConnectionCloser(Arc<tokio::sync::Notify>);

impl ConnectionCloser {
    pub fn close_after_response(&self) {
        self.0.notify_one();
    }
}

/// Counts a request in flight from its head until its response body is dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection<S>(
    stream: S,
    activity: Arc<Activity>,
    app: Router,
    limits: ConnLimits,
    mut close: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let asked_to_close = Arc::new(tokio::sync::Notify::new());
    let service = {
        let activity = activity.clone();
        let closer = ConnectionCloser(asked_to_close.clone());
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let (app, guard) = (app.clone(), InFlight::begin(&activity));
            req.extensions_mut().insert(closer.clone());
            async move {
                let resp = tower::ServiceExt::oneshot(app, req.map(Body::new)).await?;
                // The guard lives as long as the response body: a streamed answer is in
                // flight until its last event.
                Ok::<_, std::convert::Infallible>(resp.map(|b| {
                    Body::new(b.map_frame(move |f| {
                        let _ = &guard;
                        f
                    }))
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES) as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes);
    let mut conn = std::pin::pin!(builder.serve_connection(io, service));
    let check = (limits.idle_timeout / 4).max(Duration::from_millis(50));
    let mut closing = false;
    let mut idle_closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            changed = close.changed(), if !closing => {
                if changed.is_err() || *close.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = asked_to_close.notified(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(check) => {
                if activity.idle() < limits.idle_timeout {
                    continue;
                }
                if idle_closing {
                    // Asked to close a whole idle period ago (a client that never sent a
                    // byte, or ignores GOAWAY): drop it.
                    break;
                }
                idle_closing = true;
                activity.touch();
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The answer to a connection over the limit: a 429 in OpenAI's format, then close.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::json!({"error": {
        "message": "too many connections to this worker; retry shortly",
        "type": "rate_limit_error",
        "param": null,
        "code": "too_many_connections",
    }})
    .to_string();
    let head = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent before closing: closing with unread bytes resets
        // the connection, and the client could lose the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// The stream of one connection, noting when bytes move.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body must arrive within the deadline; a slow one is answered 408 (the
/// handler's read of it fails, and its answer is replaced).
async fn body_deadline(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    let fired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        if body.is_end_stream() {
            return body;
        }
        Body::new(Deadline {
            inner: body,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            fired: fired.clone(),
        })
    });
    let resp = next.run(req).await;
    if fired.load(Ordering::Relaxed) {
        return ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after: None,
            escalation_failed: false,
        }
        .into_response();
    }
    resp
}

/// The body timed out.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

/// A body that fails once its deadline has passed.
struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    fired: Arc<AtomicBool>,
}

impl hyper::body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.fired.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(axum::Error::new(BodyTimeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    async fn start(app: Router, limits: ConnLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, limits.into(), std::future::pending()));
        addr
    }

    async fn get_once(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_request_in_flight_keeps_its_connection_however_long_it_takes() {
        // The answer takes five idle periods without a byte moving.
        let app = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "done"
            }),
        );
        let addr = start(
            app,
            ConnLimits {
                idle_timeout: Duration::from_millis(100),
                ..ConnLimits::default()
            },
        )
        .await;
        let out = get_once(addr, "/slow").await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("done"), "{out}");
    }

    #[tokio::test]
    async fn stopping_finishes_requests_in_flight_and_refuses_new_connections() {
        let app = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, ServerOptions::default(), async {
            let _ = stop_rx.await;
        }));
        let in_flight = tokio::spawn(get_once(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(()).unwrap();
        let out = in_flight.await.unwrap();
        assert!(out.ends_with("done"), "{out}");
        server.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
