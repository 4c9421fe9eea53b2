//! The HTTP API against a live in-process server on 127.0.0.1.

mod common;

use common::{
    MODEL, SseReader, TestServer, http, long_context_fixture, metric_value, post_json,
    server_config, start, start_with,
};
use serde_json::{Value, json};
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::http::ServerConfig;

fn greedy_completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_chat_models_health_ready_and_usage() {
    let s = start(EngineConfig::default(), server_config()).await;
    assert_eq!(http(s.addr, "GET", "/health", b"").await.status, 200);
    let ready = http(s.addr, "GET", "/ready", b"").await;
    assert_eq!(ready.status, 200);
    let models = http(s.addr, "GET", "/v1/models", b"").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);

    let r = post_json(s.addr, "/v1/completions", &greedy_completion("Hello", 8)).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 13);

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6, "temperature": 0});
    let r = post_json(s.addr, "/v1/chat/completions", &chat).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length");
    // ChatML of one user message: "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".
    assert_eq!(v["usage"]["prompt_tokens"], 1 + 5 + 2 + 1 + 1 + 1 + 10);

    let metrics = http(s.addr, "GET", "/metrics", b"").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert_eq!(
        metric_value(
            &text,
            "tidal_worker_requests_total",
            "endpoint=\"/v1/completions\",status=\"200\""
        ),
        Some(1.0)
    );
    assert!(metric_value(&text, "tidal_worker_prompt_tokens_total", "").unwrap() >= 5.0);
    assert!(metric_value(&text, "tidal_worker_generated_tokens_total", "").unwrap() >= 8.0);
    assert_eq!(metric_value(&text, "tidal_worker_ready", ""), Some(1.0));
    assert_eq!(
        metric_value(&text, "tidal_worker_running_requests", ""),
        Some(0.0)
    );
    let expert_total: f64 = text
        .lines()
        .filter(|l| l.starts_with("tidal_worker_expert_tokens_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(expert_total > 0.0, "no expert routing counted:\n{text}");
    assert!(text.contains("tidal_worker_escalations_total{reason=\"low_confidence\"} 0"));
    assert!(text.contains("tidal_worker_time_to_first_token_seconds_count"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_non_streaming_and_ends_with_done() {
    let s = start(EngineConfig::default(), server_config()).await;
    let whole = post_json(
        s.addr,
        "/v1/completions",
        &greedy_completion("Stream me", 12),
    )
    .await
    .json();
    let mut req = greedy_completion("Stream me", 12);
    req["stream"] = true.into();
    req["stream_options"] = json!({"include_usage": true});
    let sse = SseReader::open(s.addr, "/v1/completions", &req).await;
    assert_eq!(sse.status, 200);
    let events = sse.collect().await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    // One chunk per token, also for the tokens that are bytes of a character (this random
    // model's answer has several): a client times every token, as with vLLM.
    assert!(
        text.contains('\u{FFFD}'),
        "the answer has partial characters: {text:?}"
    );
    let token_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["finish_reason"].is_null() && c["choices"][0]["text"].is_string()
        })
        .count();
    assert!(
        (12..=13).contains(&token_chunks),
        "{token_chunks} text chunks for 12 tokens (a last one may flush held-back text)"
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12);

    // Chat streaming: role first, then content deltas, then an empty delta with finish_reason.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5, "temperature": 0, "stream": true});
    let events = SseReader::open(s.addr, "/v1/chat/completions", &chat)
        .await
        .collect()
        .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_their_solo_runs() {
    let s = start(
        EngineConfig {
            max_batch: 8,
            queue_size: 64,
            ..EngineConfig::default()
        },
        server_config(),
    )
    .await;
    let prompts: Vec<String> = (0..8).map(|i| format!("Prompt number {i}: ")).collect();
    let mut solo = vec![];
    for p in &prompts {
        let v = post_json(s.addr, "/v1/completions", &greedy_completion(p, 16))
            .await
            .json();
        solo.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    // Twice over, all at once: requests join and leave the running batch mid-flight.
    let mut tasks = vec![];
    for round in 0..2 {
        for (i, p) in prompts.iter().enumerate() {
            let addr = s.addr;
            let body = greedy_completion(p, 10 + 6 * ((i + round) % 2) as u32);
            tasks.push(tokio::spawn(async move {
                (
                    i,
                    body["max_tokens"].as_u64().unwrap(),
                    post_json(addr, "/v1/completions", &body).await.json(),
                )
            }));
        }
    }
    for t in tasks {
        let (i, max, v) = t.await.unwrap();
        let text = v["choices"][0]["text"].as_str().unwrap();
        if max == 16 {
            assert_eq!(text, solo[i], "prompt {i} differs under batching");
        } else {
            assert!(
                solo[i].starts_with(text),
                "prompt {i}: {text:?} is not a prefix of {:?}",
                solo[i]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_stop_sequences_cut_text() {
    let s = start(EngineConfig::default(), server_config()).await;
    let req = json!({"model": MODEL, "prompt": "abc", "max_tokens": 20, "temperature": 1.5,
        "top_p": 0.95, "top_k": 50, "seed": 42, "ignore_eos": true});
    let a = post_json(s.addr, "/v1/completions", &req).await.json();
    let b = post_json(s.addr, "/v1/completions", &req).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    let full = post_json(s.addr, "/v1/completions", &greedy_completion("xyz", 20))
        .await
        .json();
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the greedy output.
    let chars: Vec<char> = full_text.chars().collect();
    assert!(chars.len() >= 6, "output too short: {full_text:?}");
    let stop: String = chars[3..5].iter().collect();
    let expected = &full_text[..full_text.find(&stop).unwrap()];
    let mut req = greedy_completion("xyz", 20);
    req["stop"] = json!([stop]);
    let v = post_json(s.addr, "/v1/completions", &req).await.json();
    assert_eq!(v["choices"][0]["text"], expected);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streaming applies the same cut.
    req["stream"] = true.into();
    let events = SseReader::open(s.addr, "/v1/completions", &req)
        .await
        .collect()
        .await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, expected);
}

async fn expect_error(
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
    status: u16,
    param: Option<&str>,
) {
    let r = http(addr, "POST", path, body).await;
    assert_eq!(
        r.status,
        status,
        "body {:?} -> {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    let err = &v["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(err["type"].is_string(), "{v}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "{v}"
    );
    if let Some(p) = param {
        assert_eq!(err["param"], p, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_server_keeps_serving() {
    let s = start(
        EngineConfig::default(),
        ServerConfig {
            body_limit: 4096,
            max_tokens: 64,
            ..server_config()
        },
    )
    .await;
    let a = s.addr;
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    expect_error(a, chat, b"{not json", 400, None).await;
    expect_error(a, chat, b"", 400, None).await;
    expect_error(a, chat, &[0xff, 0xfe, b'{', b'}'], 400, None).await;
    expect_error(a, chat, br#"{"model":"tiny","messages":"hi"}"#, 400, None).await;
    expect_error(
        a,
        chat,
        br#"{"model":"tiny","messages":[],"max_tokens":3}"#,
        400,
        Some("messages"),
    )
    .await;
    expect_error(
        a,
        chat,
        br#"{"model":"tiny","messages":[{"role":"wizard","content":"x"}]}"#,
        400,
        Some("messages"),
    )
    .await;
    expect_error(
        a,
        chat,
        br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
        404,
        Some("model"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","max_tokens":0}"#,
        400,
        Some("max_tokens"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","max_tokens":-5}"#,
        400,
        Some("max_tokens"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","max_tokens":65}"#,
        400,
        Some("max_tokens"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","max_tokens":"ten"}"#,
        400,
        None,
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","temperature":2.5}"#,
        400,
        Some("temperature"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","temperature":-1}"#,
        400,
        Some("temperature"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","top_p":0}"#,
        400,
        Some("top_p"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","top_p":1.5}"#,
        400,
        Some("top_p"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","stop":["a","b","c","d","e"]}"#,
        400,
        Some("stop"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":"x","stop":[""]}"#,
        400,
        Some("stop"),
    )
    .await;
    expect_error(
        a,
        cmpl,
        br#"{"model":"tiny","prompt":""}"#,
        400,
        Some("prompt"),
    )
    .await;
    expect_error(a, cmpl, br#"{"model":"tiny"}"#, 400, None).await;
    // Context is 512 tokens; every byte is a token.
    let long = json!({"model": MODEL, "prompt": "a".repeat(600)}).to_string();
    expect_error(a, cmpl, long.as_bytes(), 400, Some("prompt")).await;
    let long_chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "a".repeat(600)}]});
    expect_error(
        a,
        chat,
        long_chat.to_string().as_bytes(),
        400,
        Some("messages"),
    )
    .await;
    let near = json!({"model": MODEL, "prompt": "a".repeat(500), "max_tokens": 40}).to_string();
    expect_error(a, cmpl, near.as_bytes(), 400, Some("max_tokens")).await;
    let huge = json!({"model": MODEL, "prompt": "a".repeat(5000)}).to_string();
    expect_error(a, cmpl, huge.as_bytes(), 413, None).await;
    let r = http(a, "GET", "/v1/nope", b"").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    let r = http(a, "GET", "/v1/completions", b"").await;
    assert_eq!(r.status, 405);

    let ok = post_json(a, cmpl, &greedy_completion("still alive", 3)).await;
    assert_eq!(ok.status, 200);
    let text = String::from_utf8(http(a, "GET", "/metrics", b"").await.body).unwrap();
    assert!(
        metric_value(
            &text,
            "tidal_worker_requests_total",
            "endpoint=\"/v1/completions\",status=\"400\""
        )
        .unwrap()
            >= 10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_returns_429_with_retry_after() {
    let s = start_with(
        long_context_fixture(),
        EngineConfig {
            max_batch: 1,
            queue_size: 1,
            ..EngineConfig::default()
        },
        ServerConfig {
            max_tokens: 4000,
            ..server_config()
        },
    )
    .await;
    // A long generation occupies the batch, one more fills the queue, the rest must bounce.
    let long = json!({"model": MODEL, "prompt": "x", "max_tokens": 4000, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let mut first = SseReader::open(s.addr, "/v1/completions", &long).await;
    assert_eq!(first.status, 200);
    assert!(first.next_data().await.is_some());
    let mut statuses = vec![];
    let mut keep = vec![];
    for _ in 0..3 {
        let r = SseReader::open(s.addr, "/v1/completions", &long).await;
        statuses.push(r.status);
        keep.push(r);
    }
    assert_eq!(
        statuses,
        vec![200, 429, 429],
        "one queued, the rest rejected"
    );
    let r = post_json(s.addr, "/v1/completions", &greedy_completion("y", 2)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    drop(keep);
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_client_cancels_its_generation() {
    let s = start_with(
        long_context_fixture(),
        EngineConfig::default(),
        ServerConfig {
            max_tokens: 4000,
            ..server_config()
        },
    )
    .await;
    let long = json!({"model": MODEL, "prompt": "x", "max_tokens": 4000, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let mut sse = SseReader::open(s.addr, "/v1/completions", &long).await;
    assert!(sse.next_data().await.is_some());
    drop(sse);
    // Wait (bounded) until the engine notices; it must not run all 500 tokens.
    let mut cancelled = 0.0;
    for _ in 0..600 {
        let text = String::from_utf8(http(s.addr, "GET", "/metrics", b"").await.body).unwrap();
        cancelled = metric_value(&text, "tidal_worker_cancelled_requests_total", "").unwrap();
        if cancelled >= 1.0 {
            let generated = metric_value(&text, "tidal_worker_generated_tokens_total", "").unwrap();
            assert!(generated < 4000.0, "generated {generated}");
            assert_eq!(
                metric_value(&text, "tidal_worker_running_requests", ""),
                Some(0.0)
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(cancelled, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_turns_readiness_false_and_still_serves_late_arrivals() {
    let s = start(EngineConfig::default(), server_config()).await;
    s.state.begin_drain();
    assert_eq!(http(s.addr, "GET", "/ready", b"").await.status, 503);
    assert_eq!(http(s.addr, "GET", "/health", b"").await.status, 200);
    // Sent by a route that has not seen the drain yet: served, not failed.
    let r = post_json(s.addr, "/v1/completions", &greedy_completion("x", 2)).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["choices"][0]["text"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_a_model_is_served() {
    let state = tidal_worker::serve::http::AppState::new(
        server_config(),
        std::sync::Arc::new(tidal_worker::serve::metrics::Metrics::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tidal_worker::serve::http::router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    assert_eq!(http(addr, "GET", "/health", b"").await.status, 200);
    assert_eq!(http(addr, "GET", "/ready", b"").await.status, 503);
    let r = post_json(addr, "/v1/completions", &greedy_completion("x", 2)).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    let text = String::from_utf8(http(addr, "GET", "/metrics", b"").await.body).unwrap();
    assert_eq!(metric_value(&text, "tidal_worker_ready", ""), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_non_streaming_client_cancels_too() {
    use tokio::io::AsyncWriteExt;
    let s = start_with(
        long_context_fixture(),
        EngineConfig::default(),
        ServerConfig {
            max_tokens: 4000,
            ..server_config()
        },
    )
    .await;
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 4000, "temperature": 0,
        "ignore_eos": true})
    .to_string();
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let metrics =
        || async { String::from_utf8(http(s.addr, "GET", "/metrics", b"").await.body).unwrap() };
    let mut running = false;
    for _ in 0..600 {
        if metric_value(&metrics().await, "tidal_worker_running_requests", "") == Some(1.0) {
            running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(running, "the request never started");
    drop(conn);
    let mut cancelled = 0.0;
    for _ in 0..600 {
        let text = metrics().await;
        cancelled = metric_value(&text, "tidal_worker_cancelled_requests_total", "").unwrap();
        if cancelled >= 1.0 {
            let generated = metric_value(&text, "tidal_worker_generated_tokens_total", "").unwrap();
            assert!(generated < 4000.0, "generated {generated}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(cancelled, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_metric_is_documented_in_metrics_md() {
    let s = start(EngineConfig::default(), server_config()).await;
    post_json(s.addr, "/v1/completions", &greedy_completion("doc", 2)).await;
    let text = String::from_utf8(http(s.addr, "GET", "/metrics", b"").await.body).unwrap();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/METRICS.md")).unwrap();
    let mut names = vec![];
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            let exported = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            assert!(exported.starts_with("tidal_worker_"), "{exported}");
            assert!(
                doc.contains(&format!("`{exported}`")),
                "{exported} is not in METRICS.md"
            );
            names.push(exported);
        }
    }
    assert!(names.len() >= 10, "{names:?}");
}

/// `token_logprobs` of a completion answer as numbers (None for the null first prompt token).
fn token_logprobs(v: &Value) -> Vec<Option<f64>> {
    v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(Value::as_f64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_echo_and_token_id_prompts() {
    let s = start(EngineConfig::default(), server_config()).await;

    // Completions: each generated token with its log probability and 3 alternatives; greedy
    // picks the most likely, so its log probability is the largest of the alternatives.
    let mut req = greedy_completion("Hello", 6);
    req["logprobs"] = 3.into();
    let v = post_json(s.addr, "/v1/completions", &req).await.json();
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{v}");
    // Each token's own text (a byte of a multi-byte character shows as U+FFFD, as the
    // fixture's byte-level vocabulary often gives).
    assert!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_string)
    );
    for (i, chosen) in token_logprobs(&v).into_iter().enumerate() {
        let chosen = chosen.expect("a generated token has a log probability");
        let top: Vec<f64> = lp["top_logprobs"][i]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(!top.is_empty() && top.len() <= 3, "{v}");
        let best = top.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            chosen <= 0.0 && (chosen - best).abs() < 1e-4,
            "{i}: {chosen} vs {top:?}"
        );
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));

    // A prompt of token ids; then the same ids plus the token greedy chose after them, echoed
    // with the prompt's log probabilities: the last prompt token's log probability is the
    // one the generation reported for it (the scoring loglikelihood evaluations do).
    let ids = json!([5, 6, 7]);
    let generated = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0,
                "ignore_eos": true, "logprobs": 0}),
    )
    .await
    .json();
    let chosen = token_logprobs(&generated)[0].unwrap();
    let echo = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [[5, 6, 7]], "max_tokens": 1, "temperature": 0,
                "ignore_eos": true, "logprobs": 2, "echo": true}),
    )
    .await
    .json();
    let prompt_text = echo["choices"][0]["text"].as_str().unwrap().to_string();
    let scored = token_logprobs(&echo);
    assert_eq!(scored.len(), 3 + 1, "{echo}");
    assert_eq!(
        scored[0], None,
        "the first prompt token has no log probability"
    );
    assert!(scored[1..].iter().all(|x| x.is_some_and(|x| x <= 0.0)));
    // The 4th token (the generated one) after [5, 6, 7] is the token `generated` chose, with the
    // same log probability.
    assert!(
        (scored[3].unwrap() - chosen).abs() < 1e-4,
        "{scored:?} vs {chosen}"
    );
    assert_eq!(
        echo["choices"][0]["logprobs"]["tokens"][3],
        generated["choices"][0]["logprobs"]["tokens"][0]
    );
    let gen_text = generated["choices"][0]["text"].as_str().unwrap();
    assert!(
        prompt_text.ends_with(gen_text),
        "{prompt_text:?} / {gen_text:?}"
    );
    // Ids outside the vocabulary are a 400 naming the prompt.
    let bad = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 99999999]}),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["param"], "prompt");

    // Chat: `logprobs` + `top_logprobs`, one entry per generated token, also when streamed.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5, "temperature": 0, "ignore_eos": true, "logprobs": true,
        "top_logprobs": 2});
    let v = post_json(s.addr, "/v1/chat/completions", &chat)
        .await
        .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5, "{v}");
    for e in content {
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(
            e["bytes"].as_array().unwrap().len(),
            e["token"].as_str().unwrap().len()
        );
    }
    let mut streamed = chat.clone();
    streamed["stream"] = true.into();
    let events = SseReader::open(s.addr, "/v1/chat/completions", &streamed)
        .await
        .collect()
        .await;
    let tokens: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        &tokens, content,
        "streamed log probabilities equal the whole answer's"
    );
    // Without `logprobs`, none.
    let mut plain = chat.clone();
    plain.as_object_mut().unwrap().remove("logprobs");
    plain.as_object_mut().unwrap().remove("top_logprobs");
    let v = post_json(s.addr, "/v1/chat/completions", &plain)
        .await
        .json();
    assert!(v["choices"][0]["logprobs"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_generated_side_by_side_and_streamed_by_index() {
    let s = start(EngineConfig::default(), server_config()).await;
    // Sampled with a seed: three choices, reproducible, each counted in the usage.
    let req = json!({"model": MODEL, "prompt": "Once", "max_tokens": 6, "temperature": 1.0,
                     "seed": 42, "n": 3, "ignore_eos": true});
    let a = post_json(s.addr, "/v1/completions", &req).await.json();
    let b = post_json(s.addr, "/v1/completions", &req).await.json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i, "{v}");
                c["text"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "the same seed gives the same choices");
    assert!(
        texts(&a).iter().any(|t| t != &texts(&a)[0]),
        "choices are sampled independently: {a}"
    );
    assert_eq!(a["usage"]["completion_tokens"], 18);
    assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);

    // Streamed chat, two greedy choices: chunks of both indices, one finish each, the usage
    // of both, one [DONE]; each choice's text equals the single greedy answer.
    let one = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let whole = post_json(s.addr, "/v1/chat/completions", &one).await.json();
    let answer = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let mut req = one.clone();
    req["n"] = 2.into();
    req["stream"] = true.into();
    req["stream_options"] = json!({"include_usage": true});
    let events = SseReader::open(s.addr, "/v1/chat/completions", &req)
        .await
        .collect()
        .await;
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for i in 0..2u64 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, answer, "choice {i}");
        let finishes = mine
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .count();
        assert_eq!(finishes, 1, "choice {i}");
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 10, "{usage}");

    let too_many = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "n": 9}),
    )
    .await;
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.json()["error"]["param"], "n");
}

/// A cloud worker of the `chat` service, as the operator starts it when `chat` has an edge
/// tier (its site Services are named `chat-edge-<site>`).
async fn start_cloud_worker_of_chat() -> TestServer {
    start(
        EngineConfig::default(),
        ServerConfig {
            site_service_prefix: Some("chat-edge-".into()),
            ..server_config()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_an_edge_site_service_are_counted_by_its_name() {
    let s = start_cloud_worker_of_chat().await;
    // A real client resolving Service DNS names to this server, as kube-proxy would route
    // them: a sleeping site's Service, the cloud's own, and a site name too long to be one.
    let long = format!("chat-edge-{}", "x".repeat(60));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .resolve("chat-edge-store-1.default.svc", s.addr)
        .resolve("chat-cloud.default.svc", s.addr)
        .resolve(&format!("{long}.default.svc"), s.addr)
        .build()
        .unwrap();
    let port = s.addr.port();
    let post = |host: String, path: &'static str| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("http://{host}:{port}{path}"))
                .header("content-type", "application/json")
                .body(greedy_completion("hi", 1).to_string())
                .send()
                .await
                .unwrap();
            let connection = r
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), connection)
        }
    };
    let site = "chat-edge-store-1.default.svc".to_string();
    // A site's clients get a connection per request: none stays pinned here once the site's
    // own replica is ready again.
    let close = (200, Some("close".to_string()));
    assert_eq!(post(site.clone(), "/v1/completions").await, close);
    assert_eq!(post(site.clone(), "/v1/completions").await, close);
    // A bad request still arrived through the site: demand is demand.
    let bad = client
        .post(format!("http://{site}:{port}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(json!({"model": MODEL}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    // Not inference: not counted.
    let models = client
        .get(format!("http://{site}:{port}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status().as_u16(), 200);
    assert_eq!(
        post("chat-cloud.default.svc".into(), "/v1/completions").await,
        (200, None),
        "the cloud's own clients keep their connections"
    );
    assert_eq!(
        post(format!("{long}.default.svc"), "/v1/completions").await,
        (200, None)
    );
    let text = String::from_utf8(http(s.addr, "GET", "/metrics", b"").await.body).unwrap();
    assert_eq!(
        metric_value(
            &text,
            "tidal_worker_site_requests_total",
            r#"site="chat-edge-store-1""#
        ),
        Some(3.0),
        "{text}"
    );
    let sites = text
        .lines()
        .filter(|l| l.starts_with("tidal_worker_site_requests_total"))
        .count();
    assert_eq!(sites, 1, "only the site's Service is a label: {text}");
}

/// HTTP/2 clients of a sleeping site get a GOAWAY once their request is answered, so their
/// next request opens a new connection (which kube-proxy routes to the site once it is
/// awake); the cloud's own HTTP/2 clients keep theirs.
#[tokio::test]
async fn http2_clients_of_an_edge_site_are_sent_away_after_each_answer() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let s = start_cloud_worker_of_chat().await;
    // One HTTP/2 connection (prior knowledge); `done` fires when the server ends it.
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let (tx, done) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(conn.await.is_ok());
        });
        (sender, done)
    };
    let port = s.addr.port();
    let request = |host: &str| {
        hyper::Request::post(format!("http://{host}:{port}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                greedy_completion("hi", 1).to_string(),
            )))
            .unwrap()
    };
    let (mut site, site_done) = connect().await;
    let r = site
        .send_request(request("chat-edge-store-1.default.svc"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
    // The server closes the connection cleanly (GOAWAY, then EOF), not the client.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), site_done)
        .await
        .expect("the site client's connection was ended by the server");
    assert_eq!(ended, Ok(true));
    assert!(site.ready().await.is_err(), "no further request on it");

    let (mut cloud, _done) = connect().await;
    for _ in 0..2 {
        cloud
            .ready()
            .await
            .expect("the cloud client's connection stays");
        let r = cloud
            .send_request(request("chat-cloud.default.svc"))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.into_body().collect().await.unwrap();
    }
}
