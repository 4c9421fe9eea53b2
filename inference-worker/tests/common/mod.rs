//! Shared test helpers: fixtures, an in-process server on 127.0.0.1, a tiny HTTP client,
//! free ports and kill-on-drop child processes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tidal_worker::model::fixture::{FixtureArch, FixtureSpec};
use tidal_worker::serve::conn::{ConnLimits, ServerOptions};
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::http::{AppState, Served, ServerConfig};
use tidal_worker::serve::metrics::Metrics;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub const MODEL: &str = "tiny";

/// A free TCP port on 127.0.0.1 (the OS picks it; it is free again when this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the spawned worker at `addr` is ready; panics if it exits or never is.
pub async fn wait_until_ready(child: &mut Killed, addr: SocketAddr) {
    for _ in 0..1200 {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("worker exited early: {status}");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http(addr, "GET", "/ready", b"").await.status == 200
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("worker never became ready");
}

/// The default fixture with another random seed (another model of the same shape).
pub fn fixture_seeded(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        seed,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    dir
}

pub fn fixture(arch: FixtureArch) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        arch,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    dir
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub _dir: tempfile::TempDir,
}

pub async fn start(engine: EngineConfig, config: ServerConfig) -> TestServer {
    start_with(fixture(FixtureArch::Mixtral), engine, config).await
}

pub async fn start_with(
    dir: tempfile::TempDir,
    engine: EngineConfig,
    config: ServerConfig,
) -> TestServer {
    start_limited(dir, engine, config, ConnLimits::default()).await
}

/// An in-process server with its connection limits.
pub async fn start_limited(
    dir: tempfile::TempDir,
    engine: EngineConfig,
    config: ServerConfig,
    limits: ConnLimits,
) -> TestServer {
    start_listening(dir, engine, config, limits.into()).await
}

/// An in-process server listening as `options` say (limits, TLS).
pub async fn start_listening(
    dir: tempfile::TempDir,
    engine: EngineConfig,
    config: ServerConfig,
    options: ServerOptions,
) -> TestServer {
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(config, metrics.clone());
    let loaded =
        tidal_worker::model::loader::load_dir(dir.path(), candle_core::DType::F32).unwrap();
    let engine = tidal_worker::serve::engine::spawn(
        loaded.model.clone(),
        loaded.codec.clone(),
        engine,
        metrics,
    );
    state.set_served(Served {
        engine,
        codec: loaded.codec,
        model: loaded.model,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tidal_worker::serve::http::router(state.clone());
    tokio::spawn(tidal_worker::serve::conn::serve(
        listener,
        app,
        options,
        std::future::pending(),
    ));
    TestServer {
        addr,
        state,
        _dir: dir,
    }
}

pub fn server_config() -> ServerConfig {
    ServerConfig {
        model_name: MODEL.into(),
        ..ServerConfig::default()
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A whole HTTP/1 response as read to its end.
    pub fn parse(raw: &[u8]) -> Self {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers: {}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("no status");
        Self {
            status,
            head,
            body: raw[split + 4..].to_vec(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn request_bytes(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    // HTTP/1.0: the server closes the connection after the response and sends no
    // chunked encoding, so reading to EOF gives exactly the body.
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request_bytes(method, path, body))
        .await
        .unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).await.unwrap();
    HttpResponse::parse(&raw)
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> HttpResponse {
    http(addr, "POST", path, body.to_string().as_bytes()).await
}

/// An open streaming response whose SSE `data:` payloads can be read one at a time.
pub struct SseReader {
    reader: BufReader<TcpStream>,
    pub status: u16,
}

impl SseReader {
    pub async fn open(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&request_bytes("POST", path, body.to_string().as_bytes()))
            .await
            .unwrap();
        let mut reader = BufReader::new(s);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).await.unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Self { reader, status }
    }

    /// The next `data:` payload, or None at end of stream.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            if let Some(d) = line.strip_prefix("data:") {
                return Some(d.trim().to_string());
            }
        }
    }

    /// Every remaining payload, up to and including `[DONE]`.
    pub async fn collect(mut self) -> Vec<String> {
        let mut out = vec![];
        while let Some(d) = self.next_data().await {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }
}

/// Value of an unlabelled sample (or the first labelled one matching `labels`) in
/// the metrics exposition.
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = if labels.is_empty() {
            rest.strip_prefix(' ')?
        } else {
            rest.strip_prefix(&format!("{{{labels}}} "))?
        };
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn ensure_dir(p: &Path) {
    assert!(p.is_dir(), "{} is not a directory", p.display());
}

/// A Mixtral fixture with a long context, for requests that must outlive the test's actions.
pub fn long_context_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        context: 4096,
        hidden: 32,
        intermediate: 64,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    dir
}

/// A reference model (candle-transformers) driven one call at a time: prefill, then one
/// token per call; returns the next-token logits.
pub type Reference = Box<dyn FnMut(&[u32], usize) -> Vec<f32>>;

/// A [`Reference`] from a `forward(input of shape (1, seq), offset) -> logits` call.
pub fn reference(
    mut forward: impl FnMut(&candle_core::Tensor, usize) -> candle_core::Result<candle_core::Tensor>
    + 'static,
) -> Reference {
    Box::new(move |tokens, offset| {
        let input = candle_core::Tensor::new(tokens, &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = forward(&input, offset).unwrap();
        logits.flatten_all().unwrap().to_vec1().unwrap()
    })
}

/// The largest element-wise difference of two logit vectors of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy decoding of `steps` tokens after `prompt` on our model and on the reference,
/// each fed its own choices: the largest logit difference seen, and both generations.
pub fn greedy_against(
    model: &tidal_worker::model::decoder::Model,
    reference: &mut Reference,
    prompt: &[u32],
    steps: usize,
) -> (f32, Vec<u32>, Vec<u32>) {
    use tidal_worker::serve::sampling::argmax;
    let mut cache = model.new_cache();
    let mut a = model.forward(prompt, &mut cache).unwrap();
    let mut b = reference(prompt, 0);
    let (mut gen_a, mut gen_b) = (vec![], vec![]);
    let mut worst = 0f32;
    for i in 0..steps {
        worst = worst.max(max_abs_diff(&a, &b));
        let (ta, tb) = (argmax(&a), argmax(&b));
        gen_a.push(ta);
        gen_b.push(tb);
        a = model.forward(&[ta], &mut cache).unwrap();
        b = reference(&[tb], prompt.len() + i);
    }
    (worst, gen_a, gen_b)
}
