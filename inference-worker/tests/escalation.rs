//! Edge-to-cloud escalation: an edge worker and a cloud worker (different random
//! checkpoints) on 127.0.0.1.

mod common;

use common::{
    Killed, MODEL, SseReader, TestServer, http, long_context_fixture, metric_value, post_json,
    server_config, start_with,
};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::escalation::{EscalationConfig, OnCloudUnavailable};
use tidal_worker::serve::http::ServerConfig;

/// Generated tokens the edge's confidence is averaged over in these tests.
const WINDOW: usize = 4;

fn fixture(seed: u64) -> tempfile::TempDir {
    common::fixture_seeded(seed)
}

/// The edge's checkpoint; the cloud's differs so that its continuation is its own.
const EDGE_SEED: u64 = 0;
const CLOUD_SEED: u64 = 7;

async fn cloud() -> TestServer {
    start_with(
        fixture(CLOUD_SEED),
        EngineConfig::default(),
        server_config(),
    )
    .await
}

/// A plain (non-edge) server on the edge's checkpoint: what the edge alone would say.
async fn edge_alone() -> TestServer {
    start_with(fixture(EDGE_SEED), EngineConfig::default(), server_config()).await
}

fn url(s: &TestServer) -> String {
    format!("http://{}", s.addr)
}

/// A URL nothing listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn edge_config(cloud_url: String, threshold: f32, policy: OnCloudUnavailable) -> ServerConfig {
    ServerConfig {
        escalation: Some(EscalationConfig {
            confidence_threshold: threshold,
            confidence_window: WINDOW,
            on_cloud_unavailable: policy,
            ..EscalationConfig::new(cloud_url)
        }),
        ..server_config()
    }
}

async fn edge(cfg: ServerConfig) -> TestServer {
    start_with(fixture(EDGE_SEED), EngineConfig::default(), cfg).await
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true})
}

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

async fn metrics(s: &TestServer) -> String {
    String::from_utf8(http(s.addr, "GET", "/metrics", b"").await.body).unwrap()
}

fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or_else(|| c["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

/// Opens a stream, checks it is one well-formed stream (every chunk with the same id and
/// the edge's model, `[DONE]` last) and returns (text, chunks).
async fn stream(s: &TestServer, path: &str, mut req: Value) -> (String, Vec<Value>) {
    req["stream"] = true.into();
    req["stream_options"] = json!({"include_usage": true});
    let sse = SseReader::open(s.addr, path, &req).await;
    assert_eq!(sse.status, 200);
    let events = sse.collect().await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    for c in &chunks {
        assert!(c.get("error").is_none(), "error in stream: {c}");
        assert_eq!(c["id"], id.as_str(), "one stream, one id: {c}");
        assert_eq!(c["model"], MODEL);
    }
    let text = chunks
        .iter()
        .filter_map(|c| {
            let ch = &c["choices"][0];
            ch["text"]
                .as_str()
                .or_else(|| ch["delta"]["content"].as_str())
        })
        .collect();
    (text, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_confidence_escalates_and_the_cloud_continues_the_edge_text() {
    let cloud = cloud().await;
    // No distribution of a random model puts all its mass on one token, so a threshold
    // of 1 escalates every request once WINDOW tokens exist.
    let edge = edge(edge_config(url(&cloud), 1.0, OnCloudUnavailable::Fail)).await;
    let (prompt, max_tokens) = ("Hello", 12);

    // The edge's part: a request ending at WINDOW tokens finishes before the check fires.
    let part = post_json(edge.addr, "/v1/completions", &completion(prompt, WINDOW)).await;
    assert_eq!(part.status, 200);
    assert_eq!(part.header("x-tidal-escalated"), None);
    let edge_text = text_of(&part.json());
    // The cloud's own greedy continuation of prompt + the edge's text.
    let cont = post_json(
        cloud.addr,
        "/v1/completions",
        &completion(&format!("{prompt}{edge_text}"), max_tokens - WINDOW),
    )
    .await
    .json();
    let cloud_text = text_of(&cont);
    let own = post_json(
        edge_alone().await.addr,
        "/v1/completions",
        &completion(prompt, max_tokens),
    )
    .await
    .json();
    assert_ne!(
        text_of(&own),
        format!("{edge_text}{cloud_text}"),
        "the checkpoints must differ for this test to mean anything"
    );

    let r = post_json(
        edge.addr,
        "/v1/completions",
        &completion(prompt, max_tokens),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("x-tidal-escalated").as_deref(),
        Some("low_confidence")
    );
    assert_eq!(r.header("x-tidal-escalation-failed"), None);
    let v = r.json();
    assert_eq!(text_of(&v), format!("{edge_text}{cloud_text}"));
    assert_eq!(v["model"], MODEL);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["escalation"]["reason"], "low_confidence");
    assert_eq!(v["escalation"]["served_by"], "cloud");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    assert_eq!(
        cont["usage"]["completion_tokens"],
        max_tokens - WINDOW,
        "the cloud generated the rest"
    );
    assert_eq!(v["usage"]["total_tokens"], 5 + max_tokens);

    // Streaming: one uninterrupted stream with the same text and usage.
    let (text, chunks) = stream(&edge, "/v1/completions", completion(prompt, max_tokens)).await;
    assert_eq!(text, format!("{edge_text}{cloud_text}"));
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    assert_eq!(finish[0]["escalation"]["served_by"], "cloud");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], max_tokens);
    assert_eq!(usage["prompt_tokens"], 5);

    // Chat: the edge renders the template; the cloud continues the raw prompt.
    let part = post_json(edge.addr, "/v1/chat/completions", &chat("Hi", WINDOW)).await;
    let edge_text = text_of(&part.json());
    let rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    let cont = post_json(
        cloud.addr,
        "/v1/completions",
        &completion(&format!("{rendered}{edge_text}"), 10 - WINDOW),
    )
    .await
    .json();
    let r = post_json(edge.addr, "/v1/chat/completions", &chat("Hi", 10)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-tidal-escalated").as_deref(),
        Some("low_confidence")
    );
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(text_of(&v), format!("{edge_text}{}", text_of(&cont)));
    assert_eq!(v["usage"]["completion_tokens"], 10);
    let (text, chunks) = stream(&edge, "/v1/chat/completions", chat("Hi", 10)).await;
    assert_eq!(text, text_of(&v));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );

    let m = metrics(&edge).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalations_total",
            "reason=\"low_confidence\""
        ),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalations_total",
            "reason=\"overloaded\""
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalation_duration_seconds_count",
            "reason=\"low_confidence\""
        ),
        Some(4.0)
    );
    assert_eq!(
        metric_value(&m, "tidal_worker_running_requests", ""),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_zero_never_escalates() {
    let cloud = cloud().await;
    let edge = edge(edge_config(url(&cloud), 0.0, OnCloudUnavailable::Fail)).await;
    let alone = edge_alone().await;
    let req = completion("Hello", 16);
    let r = post_json(edge.addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tidal-escalated"), None);
    let v = r.json();
    assert!(v.get("escalation").is_none());
    let own = post_json(alone.addr, "/v1/completions", &req).await.json();
    assert_eq!(text_of(&v), text_of(&own));
    let (text, chunks) = stream(&edge, "/v1/completions", req).await;
    assert_eq!(text, text_of(&own));
    assert!(chunks.iter().all(|c| c.get("escalation").is_none()));
    let m = metrics(&edge).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalations_total",
            "reason=\"low_confidence\""
        ),
        Some(0.0)
    );
    // The cloud saw nothing.
    let m = metrics(&cloud).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_requests_total",
            "endpoint=\"/v1/completions\",status=\"200\""
        ),
        None
    );
}

/// An edge whose one batch slot and one queue slot are taken by long generations.
async fn busy_edge(cloud_url: String, policy: OnCloudUnavailable) -> (TestServer, Vec<SseReader>) {
    busy_edge_with(cloud_url, policy, true).await
}

async fn busy_edge_with(
    cloud_url: String,
    policy: OnCloudUnavailable,
    on_overload: bool,
) -> (TestServer, Vec<SseReader>) {
    let mut cfg = edge_config(cloud_url, 0.0, policy);
    cfg.max_tokens = 4000;
    if let Some(e) = cfg.escalation.as_mut() {
        e.on_overload = on_overload;
    }
    let edge = start_with(
        long_context_fixture(),
        EngineConfig {
            max_batch: 1,
            queue_size: 1,
            ..EngineConfig::default()
        },
        cfg,
    )
    .await;
    let long = json!({"model": MODEL, "prompt": "x", "max_tokens": 4000, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let mut first = SseReader::open(edge.addr, "/v1/completions", &long).await;
    assert_eq!(first.status, 200);
    assert!(first.next_data().await.is_some());
    let second = SseReader::open(edge.addr, "/v1/completions", &long).await;
    assert_eq!(second.status, 200);
    (edge, vec![first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_escalates_instead_of_rejecting() {
    let cloud = cloud().await;
    let (edge, keep) = busy_edge(url(&cloud), OnCloudUnavailable::Fail).await;
    let req = completion("Hello", 6);
    let r = post_json(edge.addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-tidal-escalated").as_deref(), Some("overloaded"));
    let v = r.json();
    assert_eq!(v["escalation"]["reason"], "overloaded");
    assert_eq!(v["model"], MODEL);
    // The whole request was the cloud's.
    let by_cloud = post_json(cloud.addr, "/v1/completions", &req).await.json();
    assert_eq!(text_of(&v), text_of(&by_cloud));
    assert_eq!(v["usage"], by_cloud["usage"]);

    // Chat goes to the cloud's chat endpoint (its own template), streamed as one stream.
    let sse_req = chat("Hi", 5);
    let (text, chunks) = stream(&edge, "/v1/chat/completions", sse_req.clone()).await;
    let by_cloud = post_json(cloud.addr, "/v1/chat/completions", &sse_req)
        .await
        .json();
    assert_eq!(text, text_of(&by_cloud));
    assert_eq!(chunks.last().unwrap()["usage"], by_cloud["usage"]);
    assert!(chunks[0]["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let m = metrics(&edge).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalations_total",
            "reason=\"overloaded\""
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_requests_total",
            "endpoint=\"/v1/completions\",status=\"429\""
        ),
        None
    );
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalation_duration_seconds_count",
            "reason=\"overloaded\""
        ),
        Some(2.0)
    );
    drop(keep);

    // Without --escalate-on-overload an edge rejects as any worker does.
    let (edge, keep) = busy_edge_with(url(&cloud), OnCloudUnavailable::Fail, false).await;
    let r = post_json(edge.addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-tidal-escalated"), None);
    let m = metrics(&edge).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalations_total",
            "reason=\"overloaded\""
        ),
        Some(0.0)
    );
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_down_with_serve_locally_serves_and_marks_the_response() {
    let edge = edge(edge_config(
        dead_url(),
        1.0,
        OnCloudUnavailable::ServeLocally,
    ))
    .await;
    let alone = edge_alone().await;
    let req = completion("Hello", 12);
    let r = post_json(edge.addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("x-tidal-escalated").as_deref(),
        Some("low_confidence")
    );
    assert_eq!(
        r.header("x-tidal-escalation-failed").as_deref(),
        Some("cloud_unavailable")
    );
    let v = r.json();
    assert_eq!(v["escalation"]["served_by"], "edge");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let own = post_json(alone.addr, "/v1/completions", &req).await.json();
    let part = post_json(alone.addr, "/v1/completions", &completion("Hello", WINDOW))
        .await
        .json();
    let text = text_of(&v);
    assert!(
        text.starts_with(&text_of(&part)),
        "{text:?} does not continue {:?}",
        text_of(&part)
    );
    assert_eq!(text, text_of(&own), "the edge finished the request itself");

    let (stream_text, chunks) = stream(&edge, "/v1/completions", req).await;
    assert_eq!(stream_text, text);
    let last = chunks
        .iter()
        .rfind(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(last["escalation"]["served_by"], "edge");

    let m = metrics(&edge).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalation_cloud_unavailable_total",
            "reason=\"low_confidence\",outcome=\"served_locally\""
        ),
        Some(2.0),
        "{m}"
    );

    // Overloaded with the cloud down: serving locally is impossible, so the usual 429.
    let (busy, keep) = busy_edge(dead_url(), OnCloudUnavailable::ServeLocally).await;
    let r = post_json(busy.addr, "/v1/completions", &completion("y", 2)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        r.header("x-tidal-escalation-failed").as_deref(),
        Some("cloud_unavailable")
    );
    let m = metrics(&busy).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalation_cloud_unavailable_total",
            "reason=\"overloaded\",outcome=\"rejected\""
        ),
        Some(1.0)
    );
    drop(keep);
}

fn assert_cloud_unavailable(v: &Value) {
    assert_eq!(v["error"]["type"], "service_unavailable", "{v}");
    assert_eq!(v["error"]["code"], "cloud_unavailable");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("escalation to the cloud failed") && msg.contains("127.0.0.1"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_down_with_fail_answers_a_clear_error() {
    let edge = edge(edge_config(dead_url(), 1.0, OnCloudUnavailable::Fail)).await;
    let r = post_json(edge.addr, "/v1/completions", &completion("Hello", 12)).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-tidal-escalation-failed").as_deref(),
        Some("cloud_unavailable")
    );
    assert_cloud_unavailable(&r.json());

    // Streaming: the headers are out when the edge loses confidence, so the stream ends
    // with the error object, then [DONE].
    let mut req = completion("Hello", 12);
    req["stream"] = true.into();
    let sse = SseReader::open(edge.addr, "/v1/completions", &req).await;
    assert_eq!(sse.status, 200);
    let events = sse.collect().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_cloud_unavailable(&err);

    // A request needing no escalation is still served.
    let r = post_json(edge.addr, "/v1/completions", &completion("Hello", 2)).await;
    assert_eq!(r.status, 200);

    let m = metrics(&edge).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalation_cloud_unavailable_total",
            "reason=\"low_confidence\",outcome=\"failed\""
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_requests_total",
            "endpoint=\"/v1/completions\",status=\"503\""
        ),
        Some(1.0)
    );

    let (busy, keep) = busy_edge(dead_url(), OnCloudUnavailable::Fail).await;
    let r = post_json(busy.addr, "/v1/completions", &completion("y", 2)).await;
    assert_eq!(r.status, 503);
    assert_cloud_unavailable(&r.json());
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_apply_across_the_edge_cloud_boundary() {
    let cloud = cloud().await;
    let edge = edge(edge_config(url(&cloud), 1.0, OnCloudUnavailable::Fail)).await;
    let (prompt, max_tokens) = ("Hello", 16);
    let part = post_json(edge.addr, "/v1/completions", &completion(prompt, WINDOW)).await;
    let edge_text = text_of(&part.json());
    let cont = post_json(
        cloud.addr,
        "/v1/completions",
        &completion(&format!("{prompt}{edge_text}"), max_tokens - WINDOW),
    )
    .await
    .json();
    let full = format!("{edge_text}{}", text_of(&cont));
    // A stop string made of the edge's last character and the cloud's first one: neither
    // side sees it alone. (Skipped if the texts are too short to build one.)
    let (Some(last), Some(first)) = (edge_text.chars().last(), text_of(&cont).chars().next())
    else {
        panic!("empty parts: {edge_text:?} {cont}");
    };
    let stop = format!("{last}{first}");
    let cut = full.find(&stop).unwrap();
    let mut req = completion(prompt, max_tokens);
    req["stop"] = json!([stop]);
    let r = post_json(edge.addr, "/v1/completions", &req).await.json();
    assert_eq!(text_of(&r), full[..cut]);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["escalation"]["reason"], "low_confidence");
    let (text, _) = stream(&edge, "/v1/completions", req).await;
    assert_eq!(text, full[..cut]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_escalated_once_is_never_escalated_again() {
    // Two edges pointing at each other: without the loop guard, requests would bounce.
    let second = edge(edge_config(dead_url(), 1.0, OnCloudUnavailable::Fail)).await;
    let first = edge(edge_config(url(&second), 1.0, OnCloudUnavailable::Fail)).await;
    let r = post_json(first.addr, "/v1/completions", &completion("Hello", 8)).await;
    // The second edge must answer the escalated request itself (its own cloud is down
    // and its policy is fail, so a second escalation would have failed the request).
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["escalation"]["served_by"], "cloud");
    let m = metrics(&second).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalations_total",
            "reason=\"low_confidence\""
        ),
        Some(0.0)
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_tidal-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_the_operators_escalation_environment() {
    let dir = fixture(EDGE_SEED);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .env("TIDAL_MODEL", dir.path())
        .env("TIDAL_SERVED_MODEL_NAME", MODEL)
        .env("TIDAL_LISTEN", addr.to_string())
        .env("TIDAL_ESCALATE_TO", dead_url())
        .env("TIDAL_CONFIDENCE_THRESHOLD", "1.0")
        .env("TIDAL_CONFIDENCE_WINDOW", "2")
        .env("TIDAL_ESCALATE_ON_OVERLOAD", "true")
        .env("TIDAL_ON_CLOUD_UNAVAILABLE", "fail")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    common::wait_until_ready(&mut child, addr).await;
    // Window 2: a 2-token request finishes before the check; a 3-token one escalates.
    let r = post_json(addr, "/v1/completions", &completion("Hello", 2)).await;
    assert_eq!(r.status, 200);
    let r = post_json(addr, "/v1/completions", &completion("Hello", 3)).await;
    assert_eq!(r.status, 503);
    assert_cloud_unavailable(&r.json());

    // A threshold outside [0, 1] is refused at startup.
    let out = Command::new(BIN)
        .arg("serve")
        .env("TIDAL_MODEL", dir.path())
        .env("TIDAL_ESCALATE_TO", "http://127.0.0.1:1")
        .env("TIDAL_CONFIDENCE_THRESHOLD", "1.5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("confidence-threshold"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cloud whose completions stream writes `chunks` pieces of text and then dies (the
/// connection is cut, no `[DONE]`): a cloud pod killed mid-answer.
async fn cloud_dying_mid_stream(chunks: &'static [&'static str]) -> String {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "cloud"}]})) }),
        )
        .route(
            "/v1/completions",
            post(move || async move {
                let parts: Vec<Result<axum::body::Bytes, std::io::Error>> = chunks
                    .iter()
                    .map(|t| {
                        let ev =
                            json!({"choices": [{"index": 0, "text": t, "finish_reason": null}]});
                        Ok(format!("data: {ev}\n\n").into())
                    })
                    .collect();
                // The text goes out (the server flushes while the body is pending), then
                // the connection is cut.
                let death = futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Err(std::io::Error::other("the cloud pod died"))
                });
                let body = futures::StreamExt::chain(futures::stream::iter(parts), death);
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(axum::body::Body::from_stream(body))
                    .unwrap()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_dying_mid_stream_is_finished_locally_or_reported() {
    const CLOUD: [&str; 2] = [" CLOUD-ONE", " CLOUD-TWO"];
    let cloud = cloud_dying_mid_stream(&CLOUD).await;
    let max_tokens = 16;
    let req = completion("Hello", max_tokens);

    // serve-locally: the answer goes on here from everything written, edge's and cloud's.
    let edge_srv = edge(edge_config(
        cloud.clone(),
        1.0,
        OnCloudUnavailable::ServeLocally,
    ))
    .await;
    let r = post_json(edge_srv.addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let text = text_of(&v);
    let cloud_text = CLOUD.concat();
    let at = text
        .find(&cloud_text)
        .unwrap_or_else(|| panic!("the cloud's text is kept: {text:?} {v}"));
    assert!(at > 0, "the edge's own text comes first: {text:?}");
    assert!(
        text.len() > at + cloud_text.len(),
        "the edge went on after the cloud died: {text:?}"
    );
    // Every token is counted once: edge + cloud (a token per chunk) + local = max_tokens.
    assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    let (stream_text, _) = stream(&edge_srv, "/v1/completions", req.clone()).await;
    assert!(stream_text.contains(&cloud_text), "{stream_text:?}");
    let m = metrics(&edge_srv).await;
    assert_eq!(
        metric_value(
            &m,
            "tidal_worker_escalation_cloud_unavailable_total",
            "reason=\"low_confidence\",outcome=\"finished_locally\""
        ),
        Some(2.0),
        "{m}"
    );

    // fail: the stream ends with a clear error event rather than hanging.
    let strict = edge(edge_config(cloud, 1.0, OnCloudUnavailable::Fail)).await;
    let mut sreq = req;
    sreq["stream"] = true.into();
    let sse = SseReader::open(strict.addr, "/v1/completions", &sreq).await;
    assert_eq!(sse.status, 200);
    let events = sse.collect().await;
    let error = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|e| e.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event: {events:?}"));
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream broke"),
        "{error}"
    );
}
