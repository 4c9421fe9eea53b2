//! Hostile HTTP clients are bounded (#17): a head or a body that trickles in, a head too
//! large, more connections than the limit and connections left idle are each answered
//! (408, 431, 429) or closed, and the worker keeps serving everyone else.

mod common;

use common::{HttpResponse, MODEL, http, server_config};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tidal_worker::model::fixture::FixtureArch;
use tidal_worker::serve::conn::ConnLimits;
use tidal_worker::serve::engine::EngineConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any bound under test: a read that outlasts it means the server held the
/// connection open, which is the failure.
const NEVER: Duration = Duration::from_secs(60);

async fn start(limits: ConnLimits) -> common::TestServer {
    common::start_limited(
        common::fixture(FixtureArch::Mixtral),
        EngineConfig::default(),
        server_config(),
        limits,
    )
    .await
}

/// Everything the server sends until it closes the connection (panics if it never does).
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = vec![];
    match tokio::time::timeout(NEVER, s.read_to_end(&mut raw)).await {
        Ok(Ok(_)) | Ok(Err(_)) => raw,
        Err(_) => panic!(
            "the server held the connection open; it sent {:?}",
            String::from_utf8_lossy(&raw)
        ),
    }
}

async fn models_ok(addr: SocketAddr) {
    let r = http(addr, "GET", "/v1/models", b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_trickles_in_is_cut_off() {
    let srv = start(ConnLimits {
        header_timeout: Duration::from_millis(300),
        ..ConnLimits::default()
    })
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Never finished: the server closes the connection without waiting for the rest.
    let got = read_until_closed(&mut s).await;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "served a partial head");
    models_ok(srv.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_answered_408() {
    let srv = start(ConnLimits {
        body_timeout: Duration::from_millis(300),
        ..ConnLimits::default()
    })
    .await;
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2}).to_string();
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..5]).await.unwrap();
    let r = HttpResponse::parse(&read_until_closed(&mut s).await);
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // A body sent at once is within the same deadline.
    let r = http(srv.addr, "POST", "/v1/completions", body.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_is_answered_431() {
    let srv = start(ConnLimits {
        max_header_bytes: 16 << 10,
        ..ConnLimits::default()
    })
    .await;
    let send = |extra: usize| async move {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let head = format!(
            "GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: {}\r\n\r\n",
            "a".repeat(extra)
        );
        // The server may answer and close before it has read everything.
        let _ = s.write_all(head.as_bytes()).await;
        HttpResponse::parse(&read_until_closed(&mut s).await).status
    };
    assert_eq!(send(4 << 10).await, 200, "a 4 KiB head is fine");
    // hyper alone would take this one (its default buffer is about 400 KiB).
    assert_eq!(send(64 << 10).await, 431, "a 64 KiB head");
    models_ok(srv.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_429_and_idle_ones_are_closed() {
    let srv = start(ConnLimits {
        max_connections: 4,
        idle_timeout: Duration::from_millis(500),
        ..ConnLimits::default()
    })
    .await;
    // Four clients connect and send nothing.
    let mut idle = vec![];
    for _ in 0..4 {
        idle.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    // The fifth is answered at once, in OpenAI's format.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let r = HttpResponse::parse(&read_until_closed(&mut s).await);
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    // The idle ones are closed by the server, which frees their slots.
    for s in &mut idle {
        read_until_closed(s).await;
    }
    models_ok(srv.addr).await;
}
