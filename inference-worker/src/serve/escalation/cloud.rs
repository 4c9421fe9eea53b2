//! Talking to the cloud endpoint: the [`Escalator`] (client, model discovery,
//! forwarding an overloaded request) and the pump that turns the cloud's SSE stream
//! into engine-style events.

use crate::serve::api::{ApiError, Checked};
use crate::serve::auth::ApiKeys;
use crate::serve::engine::{EscalationMark, Event, FinishReason};
use crate::serve::escalation::{ESCALATED_FROM_HEADER, EscalationConfig, OnCloudUnavailable};
use crate::serve::metrics::{EscalationReason, Metrics};
use crate::serve::stop::StopMatcher;
use crate::serve::text::ChatMessage;
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

/// Shared by all requests of an edge worker.
pub struct Escalator {
    pub config: EscalationConfig,
    base: String,
    /// The client, and the TLS configuration it was built with (rebuilt when the CA file
    /// changes).
    client: std::sync::Mutex<(Option<Arc<rustls::ClientConfig>>, reqwest::Client)>,
    model: tokio::sync::OnceCell<String>,
    metrics: Arc<Metrics>,
    /// This worker's keys: the cloud tier of the same service requires the same ones.
    api_keys: Option<Arc<ApiKeys>>,
}

/// Why the cloud could not take a request.
#[derive(Debug, Clone)]
pub struct CloudUnavailable(pub String);

impl Escalator {
    pub fn new(config: EscalationConfig, metrics: Arc<Metrics>) -> crate::Result<Self> {
        // reqwest is built without a bundled crypto provider; ring is the process's (an error
        // only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = config.ca.as_ref().map(|ca| ca.client_config());
        let client = Self::build_client(&config, tls.clone())?;
        let base = config.cloud_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(crate::Error::InvalidConfig(format!(
                "--escalate-to must be an http:// or https:// URL, got `{}`",
                config.cloud_url
            )));
        }
        Ok(Self {
            config,
            base,
            client: std::sync::Mutex::new((tls, client)),
            model: tokio::sync::OnceCell::new(),
            metrics,
            api_keys: None,
        })
    }

    fn build_client(
        config: &EscalationConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> crate::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout);
        if let Some(tls) = tls {
            b = b.tls_backend_preconfigured((*tls).clone());
        }
        b.build().map_err(crate::Error::HttpClient)
    }

    /// The client for the next request: rebuilt when the trusted CA file has changed
    /// (reqwest clients are cheap handles; connections in flight keep theirs).
    fn client(&self) -> reqwest::Client {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ca) = &self.config.ca {
            let now = ca.client_config();
            if !slot.0.as_ref().is_some_and(|c| Arc::ptr_eq(c, &now)) {
                match Self::build_client(&self.config, Some(now.clone())) {
                    Ok(c) => *slot = (Some(now), c),
                    Err(e) => tracing::warn!(error = %e, "keeping the escalation client"),
                }
            }
        }
        slot.1.clone()
    }

    /// Presents this worker's own API key to the cloud.
    pub fn with_api_keys(mut self, keys: Option<Arc<ApiKeys>>) -> Self {
        self.api_keys = keys;
        self
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_keys {
            Some(k) => req.bearer_auth(k.own_key()),
            None => req,
        }
    }

    pub(super) fn count(&self, reason: EscalationReason) {
        self.metrics.escalation(reason);
    }

    pub(super) fn unavailable(&self, reason: EscalationReason, outcome: &str, why: &str) {
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
                    self.authorized(self.client().get(&url))
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
    pub(super) async fn open(
        &self,
        path: &str,
        mut body: Value,
    ) -> Result<reqwest::Response, CloudUnavailable> {
        body["model"] = self.cloud_model().await?.into();
        body["stream"] = true.into();
        body["stream_options"] = json!({"include_usage": true});
        let url = format!("{}{path}", self.base);
        let send = self
            .authorized(self.client().post(&url))
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
                        scanner: StopMatcher::new(vec![], String::new()),
                        prompt_tokens: None,
                        edge_completion_tokens: 0,
                    };
                    // A forwarded request has no local state to go on from.
                    if let PumpEnd::Broke { why, .. } = pump.run(resp, &tx).await {
                        let _ = tx.send(Event::Error(why));
                    }
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
pub(super) fn sampling_fields(body: &mut Value, c: &Checked, max_tokens: Option<usize>) {
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

/// How a cloud stream ended.
pub(super) enum PumpEnd {
    /// The final event (`Done`) was sent, or the client left.
    Finished,
    /// The stream broke mid-way (connection lost, an error event, no end): nothing final was
    /// sent. `text` is all the cloud produced (some still held back in `scanner`), in
    /// `chunks` chunks of at least one token each.
    Broke {
        why: String,
        text: String,
        chunks: usize,
        scanner: StopMatcher,
    },
}

/// Turns the cloud's SSE stream into events.
pub(super) struct Pump<'a> {
    pub(super) escalator: &'a Escalator,
    pub(super) reason: EscalationReason,
    pub(super) started: Instant,
    pub(super) scanner: StopMatcher,
    /// The edge's prompt tokens (None: take the cloud's count, for forwarded requests).
    pub(super) prompt_tokens: Option<usize>,
    pub(super) edge_completion_tokens: usize,
}

impl Pump<'_> {
    /// Pumps the stream and sends the final event, or says how the stream broke.
    pub(super) async fn run(
        mut self,
        mut resp: reqwest::Response,
        tx: &UnboundedSender<Event>,
    ) -> PumpEnd {
        let mut buf: Vec<u8> = vec![];
        let mut first = true;
        let mut chunks = 0usize;
        let mut received = String::new();
        let mut usage: Option<(usize, usize)> = None;
        let mut finish: Option<FinishReason> = None;
        let mut cut = false;
        let mut done = false;
        'read: while !done {
            if tx.is_closed() {
                // The client left; dropping `resp` closes the connection and the cloud
                // cancels its generation.
                return PumpEnd::Finished;
            }
            let bytes = match resp.chunk().await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    let why = format!("the cloud's stream broke: {}", error_chain(&e));
                    return self.broke(why, received, chunks);
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
                    let why = format!("the cloud sent an unreadable stream event: {data}");
                    return self.broke(why, received, chunks);
                };
                if let Some(err) = v.get("error") {
                    let msg = err["message"].as_str().unwrap_or("unknown error");
                    let why = format!("the cloud failed: {msg}");
                    return self.broke(why, received, chunks);
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
                    received.push_str(text);
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
                let why = "the cloud's stream ended before the generation did".to_string();
                return self.broke(why, received, chunks);
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
        PumpEnd::Finished
    }

    fn broke(self, why: String, text: String, chunks: usize) -> PumpEnd {
        tracing::warn!(reason = self.reason.as_str(), chunks, "{why}");
        PumpEnd::Broke {
            why,
            text,
            chunks,
            scanner: self.scanner,
        }
    }

    fn observe_latency(&self) {
        self.escalator
            .metrics
            .escalation_latency(self.reason, self.started.elapsed().as_secs_f64());
    }
}
