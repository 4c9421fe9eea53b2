//! API-key authentication (`--api-keys-file`): the OpenAI endpoints need a key, probes and
//! metrics do not; an edge worker presents its key to the cloud tier it escalates to.

mod common;

use common::{Killed, MODEL, free_port, http, metric_value, server_config, start_with};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use tidal_worker::serve::auth::ApiKeys;
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::escalation::{EscalationConfig, OnCloudUnavailable};
use tidal_worker::serve::http::ServerConfig;

const BIN: &str = env!("CARGO_BIN_EXE_tidal-worker");
const KEY: &str = "sk-tidal-test-0123456789";

fn fixture(seed: u64) -> tempfile::TempDir {
    common::fixture_seeded(seed)
}

fn keys_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("api-keys");
    std::fs::write(&path, format!("{KEY}\nsk-second\n")).unwrap();
    path
}

fn completion() -> Value {
    json!({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0,
        "ignore_eos": true})
}

/// `(status, body)` of a request with an optional bearer key.
async fn call(base: &str, path: &str, body: Option<&Value>, key: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = match body {
        Some(b) => client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(b.to_string()),
        None => client.get(format!("{base}{path}")),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_requires_a_key_on_the_api_and_not_on_probes_or_metrics() {
    let dir = fixture(0);
    let secret = tempfile::tempdir().unwrap();
    let keys = keys_file(secret.path());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .env("TIDAL_MODEL", dir.path())
        .env("TIDAL_SERVED_MODEL_NAME", MODEL)
        .env("TIDAL_LISTEN", addr.to_string())
        .env("TIDAL_API_KEYS_FILE", &keys)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    // Readiness needs no key.
    common::wait_until_ready(&mut child, addr).await;
    let base = format!("http://{addr}");

    for (path, body) in [
        ("/v1/models", None),
        ("/v1/completions", Some(completion())),
        (
            "/v1/chat/completions",
            Some(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}),
            ),
        ),
    ] {
        let (status, v) = call(&base, path, body.as_ref(), None).await;
        assert_eq!(status, 401, "{path} without a key: {v}");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let (status, v) = call(&base, path, body.as_ref(), Some("sk-wrong")).await;
        assert_eq!(status, 401, "{path} with a wrong key: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Incorrect")
        );
        let (status, v) = call(&base, path, body.as_ref(), Some(KEY)).await;
        assert_eq!(status, 200, "{path} with the key: {v}");
    }
    // Every key of the file works.
    let (status, _) = call(&base, "/v1/models", None, Some("sk-second")).await;
    assert_eq!(status, 200);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(http(addr, "GET", open, b"").await.status, 200, "{open}");
    }
    // Refused requests are counted by status, like any other.
    let m = String::from_utf8(http(addr, "GET", "/metrics", b"").await.body).unwrap();
    let refused = metric_value(
        &m,
        "tidal_worker_requests_total",
        "endpoint=\"/v1/models\",status=\"401\"",
    );
    assert_eq!(refused, Some(2.0), "{m}");

    // A rotated Secret applies without a restart.
    std::fs::write(&keys, "sk-rotated-key\n").unwrap();
    let (status, _) = call(&base, "/v1/models", None, Some(KEY)).await;
    assert_eq!(status, 401);
    let (status, _) = call(&base, "/v1/models", None, Some("sk-rotated-key")).await;
    assert_eq!(status, 200);
}

#[test]
fn a_worker_whose_keys_file_is_missing_does_not_start() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "/nonexistent",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--api-keys-file", "/nonexistent/api-keys"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/api-keys"), "{err}");
}

fn keyed(config: ServerConfig, keys: &Path) -> ServerConfig {
    ServerConfig {
        api_keys: Some(Arc::new(ApiKeys::open(keys).unwrap())),
        ..config
    }
}

fn edge_config(cloud: String) -> ServerConfig {
    ServerConfig {
        escalation: Some(EscalationConfig {
            // Escalates every request once a few tokens exist.
            confidence_threshold: 1.0,
            confidence_window: 2,
            on_cloud_unavailable: OnCloudUnavailable::Fail,
            ..EscalationConfig::new(cloud)
        }),
        ..server_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_worker_presents_its_key_to_the_cloud() {
    let secret = tempfile::tempdir().unwrap();
    let keys = keys_file(secret.path());
    let cloud = start_with(
        fixture(7),
        EngineConfig::default(),
        keyed(server_config(), &keys),
    )
    .await;
    let cloud_url = format!("http://{}", cloud.addr);

    // An edge with the service's keys: escalations are accepted by the cloud.
    let edge = start_with(
        fixture(0),
        EngineConfig::default(),
        keyed(edge_config(cloud_url.clone()), &keys),
    )
    .await;
    let (status, v) = call(
        &format!("http://{}", edge.addr),
        "/v1/completions",
        Some(&completion()),
        Some(KEY),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["escalation"]["served_by"], "cloud", "{v}");

    // An edge without them: the cloud refuses, and the policy (fail) says so.
    let open_edge = start_with(fixture(0), EngineConfig::default(), edge_config(cloud_url)).await;
    let (status, v) = call(
        &format!("http://{}", open_edge.addr),
        "/v1/completions",
        Some(&completion()),
        None,
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "cloud_unavailable", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("401"),
        "{v}"
    );
}
