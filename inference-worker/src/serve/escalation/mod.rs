//! Edge-to-cloud escalation.
//!
//! An edge worker started with a cloud endpoint (`--escalate-to`) hands a request to the
//! cloud in two cases:
//!
//! - **low confidence**: the engine's confidence check ([`ConfidenceCheck`]) fails while the
//!   request is generating. The cloud *continues* the request: it gets a `/v1/completions`
//!   request whose prompt is the edge's rendered prompt (the chat template applied for chat
//!   requests) followed by all the text the edge generated so far, with `max_tokens` reduced
//!   by the tokens the edge already generated. The cloud's streamed text is appended to the
//!   same client response (same id, model and stream), stop sequences apply across the
//!   boundary and usage adds the edge's and the cloud's completion tokens.
//! - **overloaded**: the local queue is full (`--escalate-on-overload`). The whole request is
//!   forwarded to the cloud's endpoint of the same kind instead of answering 429.
//!
//! When the cloud cannot be reached (connection error, timeout, or a non-2xx answer before
//! any text), `--on-cloud-unavailable` decides: `serve-locally` continues the request on this
//! worker (for an overloaded worker that means the usual 429) and marks the response;
//! `fail` answers a 503 `cloud_unavailable` error.

use crate::serve::api::{ApiError, Checked};
use crate::serve::engine::{
    ConfidenceCheck, EngineHandle, EscalationMark, Event, FinishReason, GenRequest, Handoff,
};
use crate::serve::metrics::{EscalationReason, Metrics};
use crate::serve::text::ChatMessage;
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

/// Request header set on every request an edge sends to the cloud. A worker that gets it
/// never escalates that request again (no escalation chains or loops).
pub const ESCALATED_FROM_HEADER: &str = "x-tidal-escalated-from";
/// Response header naming why a response was escalated (`low_confidence`, `overloaded`);
/// set when the reason is known before the response starts (not for streamed
/// low-confidence escalations, which carry the `escalation` field instead).
pub const ESCALATED_HEADER: &str = "x-tidal-escalated";
/// Response header set to `cloud_unavailable` when escalation was wanted but the cloud
/// could not be reached.
pub const ESCALATION_FAILED_HEADER: &str = "x-tidal-escalation-failed";

/// What to do when the cloud endpoint cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnCloudUnavailable {
    /// Go on locally and mark the response (`x-tidal-escalation-failed: cloud_unavailable`).
    ServeLocally,
    /// Answer 503 with an OpenAI-style `cloud_unavailable` error.
    Fail,
}

impl OnCloudUnavailable {
    pub fn as_str(self) -> &'static str {
        match self {
            OnCloudUnavailable::ServeLocally => "serve-locally",
            OnCloudUnavailable::Fail => "fail",
        }
    }
}

/// Settings of an edge worker.
#[derive(Debug, Clone)]
pub struct EscalationConfig {
    /// The cloud's base URL, e.g. `http://svc-cloud.ns.svc:8080`.
    pub cloud_url: String,
    /// The `model` to ask the cloud for; None: the first model of the cloud's `/v1/models`.
    pub cloud_model: Option<String>,
    /// Escalate when the window's mean confidence is below this (0 disables).
    pub confidence_threshold: f32,
    /// Generated tokens the confidence is averaged over.
    pub confidence_window: usize,
    /// Forward requests to the cloud instead of answering 429 when the queue is full.
    pub on_overload: bool,
    pub on_cloud_unavailable: OnCloudUnavailable,
    /// Limit for connecting to the cloud.
    pub connect_timeout: Duration,
    /// Limit for the cloud's response headers and for each read of its stream.
    pub read_timeout: Duration,
}

impl EscalationConfig {
    pub fn new(cloud_url: impl Into<String>) -> Self {
        Self {
            cloud_url: cloud_url.into(),
            cloud_model: None,
            confidence_threshold: 0.0,
            confidence_window: 8,
            on_overload: false,
            on_cloud_unavailable: OnCloudUnavailable::ServeLocally,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(30),
        }
    }

    /// The engine-side check, or None when the threshold can never trigger.
    pub fn confidence_check(&self) -> Option<ConfidenceCheck> {
        (self.confidence_threshold > 0.0).then_some(ConfidenceCheck {
            threshold: self.confidence_threshold,
            window: self.confidence_window.max(1),
        })
    }
}

fn parse_threshold(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1], got {v}"))
    }
}

/// The `serve` flags of edge escalation (each also read from its `TIDAL_*` variable).
#[derive(Debug, Clone, clap::Args)]
pub struct EscalationArgs {
    /// Cloud base URL to escalate requests to (e.g. http://svc-cloud.ns.svc:8080); unset:
    /// no escalation and the other escalation flags are ignored.
    #[arg(long, env = "TIDAL_ESCALATE_TO")]
    pub escalate_to: Option<String>,
    /// `model` to ask the cloud for; default: the first model the cloud lists.
    #[arg(long, env = "TIDAL_ESCALATE_MODEL")]
    pub escalate_model: Option<String>,
    /// Escalate when the mean max-softmax probability over the last
    /// --confidence-window generated tokens falls below this (0 never escalates).
    #[arg(long, env = "TIDAL_CONFIDENCE_THRESHOLD", default_value_t = 0.0, value_parser = parse_threshold)]
    pub confidence_threshold: f32,
    /// Generated tokens the confidence is averaged over (checked once that many exist).
    #[arg(long, env = "TIDAL_CONFIDENCE_WINDOW", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub confidence_window: u64,
    /// Forward requests to the cloud instead of answering 429 when the queue is full.
    #[arg(long, env = "TIDAL_ESCALATE_ON_OVERLOAD", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub escalate_on_overload: bool,
    /// When the cloud cannot be reached: go on locally (and mark the response) or fail.
    #[arg(
        long,
        env = "TIDAL_ON_CLOUD_UNAVAILABLE",
        value_enum,
        default_value = "serve-locally"
    )]
    pub on_cloud_unavailable: OnCloudUnavailable,
    /// Limit for connecting to the cloud, in milliseconds.
    #[arg(
        long,
        env = "TIDAL_ESCALATION_CONNECT_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub escalation_connect_timeout_ms: u64,
    /// Limit for the cloud's response headers and each read of its stream, in milliseconds.
    #[arg(
        long,
        env = "TIDAL_ESCALATION_READ_TIMEOUT_MS",
        default_value_t = 30000
    )]
    pub escalation_read_timeout_ms: u64,
}

impl EscalationArgs {
    /// The validated configuration, or None when no cloud endpoint is set.
    pub fn to_config(&self) -> crate::Result<Option<EscalationConfig>> {
        let Some(url) = &self.escalate_to else {
            return Ok(None);
        };
        let config = EscalationConfig {
            cloud_url: url.clone(),
            cloud_model: self.escalate_model.clone(),
            confidence_threshold: self.confidence_threshold,
            confidence_window: self.confidence_window as usize,
            on_overload: self.escalate_on_overload,
            on_cloud_unavailable: self.on_cloud_unavailable,
            connect_timeout: Duration::from_millis(self.escalation_connect_timeout_ms),
            read_timeout: Duration::from_millis(self.escalation_read_timeout_ms),
        };
        // Fails here, at startup, rather than on the first escalation.
        Escalator::new(config.clone(), Arc::new(Metrics::new()))?;
        Ok(Some(config))
    }
}

/// Shared by all requests of an edge worker.
pub struct Escalator {
    pub config: EscalationConfig,
    base: String,
    client: reqwest::Client,
    model: tokio::sync::OnceCell<String>,
    metrics: Arc<Metrics>,
}

/// Why the cloud could not take a request.
#[derive(Debug, Clone)]
pub struct CloudUnavailable(pub String);

impl Escalator {
    pub fn new(config: EscalationConfig, metrics: Arc<Metrics>) -> crate::Result<Self> {
        // reqwest is built without a bundled crypto provider; ring is the process's (an error
        // only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .build()
            .map_err(|e| crate::Error::Other(format!("cannot build the escalation client: {e}")))?;
        let base = config.cloud_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(crate::Error::Other(format!(
                "--escalate-to must be an http:// or https:// URL, got `{}`",
                config.cloud_url
            )));
        }
        Ok(Self {
            config,
            base,
            client,
            model: tokio::sync::OnceCell::new(),
            metrics,
        })
    }

    fn count(&self, reason: EscalationReason) {
        self.metrics.escalation(reason);
    }

    fn unavailable(&self, reason: EscalationReason, outcome: &str, why: &str) {
        tracing::warn!(
            reason = reason.as_str(),
            outcome,
            "escalation failed: the cloud is unavailable: {why}"
        );
        self.metrics.escalation_unavailable(reason, outcome);
    }

    async fn cloud_model(&self) -> Result<String, CloudUnavailable> {
        if let Some(m) = &self.config.cloud_model {
            return Ok(m.clone());
        }
        self.model
            .get_or_try_init(|| async {
                let url = format!("{}/v1/models", self.base);
                let resp = tokio::time::timeout(
                    self.config.read_timeout,
                    self.client
                        .get(&url)
                        .header(ESCALATED_FROM_HEADER, "edge")
                        .send(),
                )
                .await
                .map_err(|_| CloudUnavailable(format!("GET {url} timed out")))?
                .map_err(|e| CloudUnavailable(format!("GET {url}: {}", error_chain(&e))))?;
                if !resp.status().is_success() {
                    return Err(CloudUnavailable(format!("GET {url}: {}", resp.status())));
                }
                let v: Value = serde_json::from_str(
                    &resp
                        .text()
                        .await
                        .map_err(|e| CloudUnavailable(format!("GET {url}: {e}")))?,
                )
                .map_err(|e| CloudUnavailable(format!("GET {url}: bad JSON: {e}")))?;
                v["data"][0]["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| CloudUnavailable(format!("GET {url}: no model listed")))
            })
            .await
            .cloned()
    }

    /// POSTs a streaming request to the cloud and waits for a 2xx answer's headers.
    async fn open(
        &self,
        path: &str,
        mut body: Value,
    ) -> Result<reqwest::Response, CloudUnavailable> {
        body["model"] = self.cloud_model().await?.into();
        body["stream"] = true.into();
        body["stream_options"] = json!({"include_usage": true});
        let url = format!("{}{path}", self.base);
        let send = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ESCALATED_FROM_HEADER, "edge")
            .body(body.to_string())
            .send();
        let resp = tokio::time::timeout(self.config.read_timeout, send)
            .await
            .map_err(|_| CloudUnavailable(format!("POST {url} timed out")))?
            .map_err(|e| CloudUnavailable(format!("POST {url}: {}", error_chain(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(CloudUnavailable(format!("POST {url}: {status}: {msg}")));
        }
        Ok(resp)
    }

    /// Forwards a whole request the full local queue cannot take. Ok: the events of the
    /// cloud's answer (the first is [`Event::Escalated`]); Err: the cloud is unavailable
    /// (already counted; the caller applies the policy).
    pub async fn forward_overloaded(
        self: &Arc<Self>,
        req: &Forwarded<'_>,
    ) -> Result<UnboundedReceiver<Event>, CloudUnavailable> {
        let reason = EscalationReason::Overloaded;
        self.count(reason);
        let started = Instant::now();
        let (path, mut body) = match req.messages {
            Some(messages) => ("/v1/chat/completions", json!({"messages": messages})),
            None => ("/v1/completions", json!({"prompt": req.prompt_text})),
        };
        sampling_fields(&mut body, req.checked, req.checked.max_tokens);
        match self.open(path, body).await {
            Ok(resp) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(Event::Escalated(EscalationMark {
                    reason: reason.as_str(),
                    by_cloud: true,
                }));
                let this = self.clone();
                tokio::spawn(async move {
                    let pump = Pump {
                        escalator: &this,
                        reason,
                        started,
                        scanner: StopScanner::new(vec![], String::new()),
                        prompt_tokens: None,
                        edge_completion_tokens: 0,
                    };
                    pump.run(resp, &tx).await;
                });
                Ok(rx)
            }
            Err(e) => {
                let outcome = match self.config.on_cloud_unavailable {
                    OnCloudUnavailable::ServeLocally => "rejected",
                    OnCloudUnavailable::Fail => "failed",
                };
                self.unavailable(reason, outcome, &e.0);
                Err(e)
            }
        }
    }
}

/// The 503 answered when the cloud is unavailable and the policy is `fail`.
pub fn cloud_unavailable_error(why: &str) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "escalation to the cloud failed ({why}) and this worker is configured not to \
             serve the request itself (on-cloud-unavailable=fail)"
        ),
        kind: "service_unavailable",
        param: None,
        code: Some("cloud_unavailable"),
        retry_after: Some(1),
        escalation_failed: true,
    }
}

/// A whole request forwarded on overload.
pub struct Forwarded<'a> {
    pub prompt_text: &'a str,
    /// Set for chat requests (sent to the cloud's chat endpoint as they are).
    pub messages: Option<&'a [ChatMessage]>,
    pub checked: &'a Checked,
}

/// Adds the request's sampling settings to a cloud request body.
fn sampling_fields(body: &mut Value, c: &Checked, max_tokens: Option<usize>) {
    if let Some(m) = max_tokens {
        body["max_tokens"] = m.into();
    }
    body["temperature"] = f64::from(c.sampling.temperature).into();
    body["top_p"] = f64::from(c.sampling.top_p).into();
    if c.sampling.top_k > 0 {
        body["top_k"] = c.sampling.top_k.into();
    }
    if let Some(seed) = c.sampling.seed {
        body["seed"] = seed.into();
    }
    if !c.stop.is_empty() {
        body["stop"] = c.stop.clone().into();
    }
    if c.ignore_eos {
        body["ignore_eos"] = true.into();
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One request's state for continuing it after a low-confidence hand-off.
pub struct Continuation {
    pub escalator: Arc<Escalator>,
    pub engine: EngineHandle,
    /// The prompt exactly as the edge tokenized it (chat template applied).
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    /// The local generation's max_tokens (explicit or the default that fits the context).
    pub max_tokens: usize,
    pub checked: Checked,
}

impl Continuation {
    /// Continues a handed-off request in the background; the returned receiver yields
    /// [`Event::Escalated`] then the rest of the response's events, ending like an engine
    /// stream (`Done` with the combined usage, `Error` or `CloudUnavailable`).
    pub fn resume(self: &Arc<Self>, handoff: Handoff) -> UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move { this.run(handoff, tx).await });
        rx
    }

    async fn run(&self, h: Handoff, tx: UnboundedSender<Event>) {
        let esc = &self.escalator;
        let reason = EscalationReason::LowConfidence;
        esc.count(reason);
        let started = Instant::now();
        tracing::debug!(
            confidence = h.confidence,
            edge_tokens = h.completion_tokens,
            "escalating for low confidence"
        );
        let remaining = self.max_tokens.saturating_sub(h.completion_tokens).max(1);
        let held_back = h.text.get(h.sent..).unwrap_or_default().to_string();
        let scanner = StopScanner::new(self.checked.stop.clone(), held_back);
        if tx.is_closed() {
            return; // the client left while the edge was deciding
        }
        let mut body = json!({"prompt": format!("{}{}", self.prompt_text, h.text)});
        let cloud_max = self
            .checked
            .max_tokens
            .map(|m| m.saturating_sub(h.completion_tokens).max(1));
        sampling_fields(&mut body, &self.checked, cloud_max);
        match esc.open("/v1/completions", body).await {
            Ok(resp) => {
                let _ = tx.send(Event::Escalated(EscalationMark {
                    reason: reason.as_str(),
                    by_cloud: true,
                }));
                let pump = Pump {
                    escalator: esc,
                    reason,
                    started,
                    scanner,
                    prompt_tokens: Some(h.prompt_tokens),
                    edge_completion_tokens: h.completion_tokens,
                };
                pump.run(resp, &tx).await;
            }
            Err(e) => match esc.config.on_cloud_unavailable {
                OnCloudUnavailable::Fail => {
                    esc.unavailable(reason, "failed", &e.0);
                    let _ = tx.send(Event::CloudUnavailable(e.0));
                }
                OnCloudUnavailable::ServeLocally => {
                    esc.unavailable(reason, "served_locally", &e.0);
                    let _ = tx.send(Event::Escalated(EscalationMark {
                        reason: reason.as_str(),
                        by_cloud: false,
                    }));
                    self.serve_locally(h, remaining, scanner, &tx).await;
                }
            },
        }
    }

    /// Goes on generating on this worker: prompt + the edge's own tokens, no more checks.
    async fn serve_locally(
        &self,
        h: Handoff,
        remaining: usize,
        mut scanner: StopScanner,
        tx: &UnboundedSender<Event>,
    ) {
        let mut ids = self.prompt_ids.clone();
        ids.extend_from_slice(&h.ids);
        let req = GenRequest {
            prompt_ids: ids,
            max_tokens: remaining,
            sampling: self.checked.sampling.clone(),
            stop: self.checked.stop.clone(),
            ignore_eos: self.checked.ignore_eos,
            arrived: Instant::now(),
            confidence: None,
        };
        let mut rx = match self.engine.submit(req) {
            Ok(rx) => rx,
            Err(e) => {
                let _ = tx.send(Event::Error(format!(
                    "the cloud is unavailable and the request cannot go on locally: {e}"
                )));
                return;
            }
        };
        let mut deltas = 0;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Delta(d) => {
                    deltas += 1;
                    let (out, stopped) = scanner.push(&d);
                    if !out.is_empty() {
                        let _ = tx.send(Event::Delta(out));
                    }
                    if stopped {
                        // Dropping `rx` cancels the local generation; each delta came
                        // from at least one token.
                        let _ = tx.send(Event::Done {
                            finish: FinishReason::Stop,
                            prompt_tokens: h.prompt_tokens,
                            completion_tokens: h.completion_tokens + deltas,
                        });
                        return;
                    }
                }
                Event::Done {
                    finish,
                    completion_tokens,
                    ..
                } => {
                    let rest = scanner.flush();
                    if !rest.is_empty() {
                        let _ = tx.send(Event::Delta(rest));
                    }
                    let _ = tx.send(Event::Done {
                        finish,
                        prompt_tokens: h.prompt_tokens,
                        completion_tokens: h.completion_tokens + completion_tokens,
                    });
                    return;
                }
                other => {
                    let _ = tx.send(other);
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
        let _ = tx.send(Event::Error("the engine dropped the request".into()));
    }
}

/// Turns the cloud's SSE stream into events.
struct Pump<'a> {
    escalator: &'a Escalator,
    reason: EscalationReason,
    started: Instant,
    scanner: StopScanner,
    /// The edge's prompt tokens (None: take the cloud's count, for forwarded requests).
    prompt_tokens: Option<usize>,
    edge_completion_tokens: usize,
}

impl Pump<'_> {
    async fn run(mut self, mut resp: reqwest::Response, tx: &UnboundedSender<Event>) {
        let mut buf: Vec<u8> = vec![];
        let mut first = true;
        let mut chunks = 0usize;
        let mut usage: Option<(usize, usize)> = None;
        let mut finish: Option<FinishReason> = None;
        let mut cut = false;
        let mut done = false;
        'read: while !done {
            if tx.is_closed() {
                // The client left; dropping `resp` closes the connection and the cloud
                // cancels its generation.
                return;
            }
            let bytes = match resp.chunk().await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Event::Error(format!(
                        "the cloud's stream broke: {}",
                        error_chain(&e)
                    )));
                    return;
                }
            };
            buf.extend_from_slice(&bytes);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    let _ = tx.send(Event::Error(format!(
                        "the cloud sent an unreadable stream event: {data}"
                    )));
                    return;
                };
                if let Some(err) = v.get("error") {
                    let msg = err["message"].as_str().unwrap_or("unknown error");
                    let _ = tx.send(Event::Error(format!("the cloud failed: {msg}")));
                    return;
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    usage = Some((
                        u["prompt_tokens"].as_u64().unwrap_or(0) as usize,
                        u["completion_tokens"].as_u64().unwrap_or(0) as usize,
                    ));
                }
                let choice = &v["choices"][0];
                let text = choice["text"]
                    .as_str()
                    .or_else(|| choice["delta"]["content"].as_str())
                    .unwrap_or("");
                if !text.is_empty() {
                    chunks += 1;
                    if first {
                        first = false;
                        self.observe_latency();
                    }
                    let (out, stopped) = self.scanner.push(text);
                    if !out.is_empty() {
                        let _ = tx.send(Event::Delta(out));
                    }
                    if stopped {
                        cut = true;
                        finish = Some(FinishReason::Stop);
                        break 'read;
                    }
                }
                match choice["finish_reason"].as_str() {
                    Some("length") => finish = Some(FinishReason::Length),
                    Some(_) => finish = Some(FinishReason::Stop),
                    None => {}
                }
            }
        }
        if first {
            self.observe_latency();
        }
        if !cut {
            if !done && finish.is_none() {
                let _ = tx.send(Event::Error(
                    "the cloud's stream ended before the generation did".into(),
                ));
                return;
            }
            let rest = self.scanner.flush();
            if !rest.is_empty() {
                let _ = tx.send(Event::Delta(rest));
            }
        }
        // Cut at a stop sequence that straddles the edge/cloud boundary, the cloud's own
        // usage never arrives: each streamed chunk carries at least one token.
        let cloud_completion = match usage {
            Some((_, c)) if !cut => c,
            _ => chunks,
        };
        let prompt_tokens = self
            .prompt_tokens
            .unwrap_or_else(|| usage.map(|u| u.0).unwrap_or(0));
        let _ = tx.send(Event::Done {
            finish: finish.unwrap_or(FinishReason::Stop),
            prompt_tokens,
            completion_tokens: self.edge_completion_tokens + cloud_completion,
        });
    }

    fn observe_latency(&self) {
        self.escalator
            .metrics
            .escalation_latency(self.reason, self.started.elapsed().as_secs_f64());
    }
}

/// Applies stop sequences to text that continues text held back at the boundary (a
/// possible stop prefix the edge had not sent yet).
pub struct StopScanner {
    stop: Vec<String>,
    pending: String,
}

impl StopScanner {
    pub fn new(stop: Vec<String>, held_back: String) -> Self {
        Self {
            stop,
            pending: held_back,
        }
    }

    /// Appends `text`; returns the text safe to send now and whether a stop sequence
    /// matched (then the returned text ends right before it and nothing more follows).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        let mut keep = 0;
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.pending.ends_with(&s[..k]) {
                    keep = keep.max(k);
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out: String = self.pending.drain(..cut).collect();
        (out, false)
    }

    /// The held-back rest, when the text ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_straddling_the_boundary_cut_the_text() {
        // The edge held back "wo" (a prefix of "world"); the cloud continues with "rld!".
        let mut s = StopScanner::new(vec!["world".into()], "wo".into());
        assert_eq!(s.push("rl"), (String::new(), false));
        assert_eq!(s.push("d!"), (String::new(), true));

        let mut s = StopScanner::new(vec!["world".into()], "wo".into());
        assert_eq!(s.push("n"), ("won".to_string(), false));
        assert_eq!(s.push("der w"), ("der ".to_string(), false));
        assert_eq!(s.flush(), "w");

        let mut s = StopScanner::new(vec!["ab".into(), "xyz".into()], String::new());
        assert_eq!(s.push("1x"), ("1".to_string(), false));
        assert_eq!(s.push("yab"), ("xy".to_string(), true));
        let mut s = StopScanner::new(vec![], "kept".into());
        assert_eq!(s.push("é"), ("kepté".to_string(), false));
    }

    #[test]
    fn threshold_zero_disables_the_check() {
        let mut c = EscalationConfig::new("http://127.0.0.1:1");
        assert_eq!(c.confidence_check(), None);
        c.confidence_threshold = 0.5;
        c.confidence_window = 0;
        assert_eq!(
            c.confidence_check(),
            Some(ConfidenceCheck {
                threshold: 0.5,
                window: 1
            })
        );
    }
}
