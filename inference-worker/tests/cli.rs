//! The `tidal-worker` binary: gen-fixture, env-var configuration, hf:// errors, SIGTERM drain.

mod common;

use common::{Killed, SseReader, free_port, http, metric_value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tidal-worker");

async fn wait_ready(addr: std::net::SocketAddr, child: &mut Child) {
    for _ in 0..1200 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("worker exited early: {status}");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http(addr, "GET", "/ready", b"").await.status == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_from_env_config_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-moe");
    let out = Command::new(BIN)
        .args([
            "gen-fixture",
            "--arch",
            "mixtral",
            "--hidden",
            "32",
            "--intermediate",
            "64",
        ])
        .args(["--context", "2048", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(model.join(f).is_file(), "{f} missing");
    }

    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Every setting through the environment, none as flags.
    let child = Command::new(BIN)
        .arg("serve")
        .env("TIDAL_MODEL", &model)
        .env("TIDAL_LISTEN", addr.to_string())
        .env("TIDAL_GRACE_SECONDS", "300")
        .env("TIDAL_MAX_TOKENS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    wait_ready(addr, &mut child.0).await;
    let models = http(addr, "GET", "/v1/models", b"").await.json();
    assert_eq!(
        models["data"][0]["id"], "tiny-moe",
        "name defaults to the directory's"
    );

    let req = serde_json::json!({"model": "tiny-moe", "prompt": "x", "max_tokens": 1500,
        "temperature": 0, "ignore_eos": true, "stream": true});
    let mut sse = SseReader::open(addr, "/v1/completions", &req).await;
    assert_eq!(sse.status, 200);
    assert!(sse.next_data().await.is_some());
    // While it streams, the metrics vLLM exports read the same under vLLM's names, so
    // tools that read vLLM (Inference Extension schedulers, KEDA, llm-d) work unchanged.
    let text = String::from_utf8(http(addr, "GET", "/metrics", b"").await.body).unwrap();
    let model = r#"model_name="tiny-moe""#;
    assert_eq!(
        metric_value(&text, "vllm:num_requests_running", model),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "vllm:num_requests_waiting", model),
        Some(0.0)
    );
    let kv = metric_value(&text, "vllm:kv_cache_usage_perc", model).unwrap();
    assert!(kv > 0.0 && kv < 1.0, "{kv}");
    assert_eq!(
        metric_value(&text, "tidal_worker_kv_cache_usage_ratio", ""),
        Some(kv)
    );
    assert_eq!(
        metric_value(&text, "vllm:time_to_first_token_seconds_count", model),
        Some(1.0)
    );
    assert!(metric_value(&text, "vllm:prompt_tokens_total", model).unwrap() >= 1.0);
    let pid = child.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    // The in-flight stream still runs to completion.
    let mut rest = vec![];
    while let Some(d) = sse.next_data().await {
        rest.push(d);
    }
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let finish = rest
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["finish_reason"].as_str().map(String::from))
        .next_back();
    assert_eq!(finish.as_deref(), Some("length"));
    let status = tokio::task::spawn_blocking(move || {
        let s = child.0.wait().unwrap();
        let mut err = String::new();
        use std::io::Read;
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (s, err)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit {:?}: {}", status.0, status.1);
    assert!(status.1.contains("draining"), "{}", status.1);
}

#[test]
fn hf_source_without_network_fails_with_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "hf://tidal-test/nothing",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("HF_ENDPOINT", "http://127.0.0.1:1")
        .env("HF_HOME", home.path())
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hf://tidal-test/nothing"), "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn unsupported_role_and_missing_model_are_rejected() {
    let out = Command::new(BIN)
        .args(["serve", "--model", "/nonexistent", "--role", "router"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("router"));
    let out = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "/nonexistent/model",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}
