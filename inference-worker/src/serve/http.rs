//! The HTTP API (axum): OpenAI-compatible endpoints, health, readiness, metrics.

use crate::serve::api::{ApiError, ChatRequest, Checked, CompletionRequest, Limits, Usage, parse_json};
use crate::serve::engine::{EngineHandle, EscalationMark, Event, GenRequest};
use crate::serve::escalation::{
    Continuation, ESCALATED_FROM_HEADER, ESCALATED_HEADER, ESCALATION_FAILED_HEADER,
    EscalationConfig, Escalator, Forwarded, OnCloudUnavailable, cloud_unavailable_error,
};
use crate::serve::metrics::Metrics;
use crate::model::decoder::Model;
use crate::serve::text::{ChatMessage, TextCodec};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_name: String,
    pub max_tokens: usize,
    pub max_stop: usize,
    pub body_limit: usize,
    pub retry_after_secs: u64,
    /// Set on an edge worker: where and when to escalate requests.
    pub escalation: Option<EscalationConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "tidal".into(),
            max_tokens: 2048,
            max_stop: 4,
            body_limit: 1 << 20,
            retry_after_secs: 1,
            escalation: None,
        }
    }
}

/// What exists once the model is loaded and warm.
pub struct Served {
    pub engine: EngineHandle,
    pub codec: Arc<TextCodec>,
    pub model: Arc<Model>,
}

pub struct AppState {
    pub config: ServerConfig,
    pub metrics: Arc<Metrics>,
    served: OnceLock<Served>,
    draining: AtomicBool,
    next_id: AtomicU64,
    escalator: Option<Arc<Escalator>>,
}

impl AppState {
    /// Panics when `config.escalation` is invalid; check it first with [`Escalator::new`].
    pub fn new(config: ServerConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let escalator = config.escalation.clone().map(|c| {
            Arc::new(Escalator::new(c, metrics.clone()).expect("a valid escalation config"))
        });
        Arc::new(Self {
            escalator,
            config,
            metrics,
            served: OnceLock::new(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        })
    }

    /// Makes the model available; readiness turns true.
    pub fn set_served(&self, served: Served) {
        if self.served.set(served).is_ok() {
            self.update_ready_gauge();
        }
    }

    /// Readiness turns false and new generations are refused; in-flight ones go on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.update_ready_gauge();
    }

    pub fn is_ready(&self) -> bool {
        self.served.get().is_some() && !self.draining.load(Ordering::SeqCst)
    }

    fn update_ready_gauge(&self) {
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    fn limits(&self, served: &Served) -> Limits {
        Limits {
            model_name: self.config.model_name.clone(),
            context: served.model.config().max_position_embeddings,
            max_tokens: self.config.max_tokens,
            max_stop: self.config.max_stop,
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            now_secs(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        p @ ("/v1/completions" | "/v1/chat/completions" | "/v1/models") => p.to_string(),
        _ => String::new(),
    };
    let resp = next.run(req).await;
    if !endpoint.is_empty() {
        st.metrics.record_request(&endpoint, resp.status().as_u16());
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::invalid(None, "unknown endpoint").with_status(StatusCode::NOT_FOUND)
}

async fn method_not_allowed() -> ApiError {
    ApiError::invalid(None, "method not allowed for this endpoint")
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if st.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready"})),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    if let Some(served) = st.served.get() {
        st.metrics.sync_experts(served.model.expert_counts());
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "tidal",
        }]
    }))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError::invalid(None, r.body_text()).with_status(r.status()))
}

fn served(st: &AppState) -> Result<&Served, ApiError> {
    match st.served.get() {
        Some(s) if !st.draining.load(Ordering::SeqCst) => Ok(s),
        _ => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the worker is not ready (loading or shutting down)".into(),
            kind: "service_unavailable",
            param: None,
            code: None,
            retry_after: Some(st.config.retry_after_secs),
            escalation_failed: false,
        }),
    }
}

/// One validated generation request, as a handler prepared it.
struct Job {
    kind: Kind,
    /// The prompt text the ids were encoded from (chat template applied).
    prompt_text: String,
    /// Chat requests' messages (forwarded as they are on overload).
    messages: Option<Vec<ChatMessage>>,
    prompt_ids: Vec<u32>,
    prompt_param: &'static str,
    checked: Checked,
    arrived: Instant,
    /// False for a request another worker escalated here: it is never escalated again.
    may_escalate: bool,
}

/// A queued (or forwarded) generation.
struct Started {
    rx: UnboundedReceiver<Event>,
    /// Set when the engine may hand the request off for low confidence.
    continuation: Option<Arc<Continuation>>,
    /// A response header known before the response starts.
    header: Option<(&'static str, &'static str)>,
}

fn queue_full(st: &AppState) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: "the request queue is full; retry later".into(),
        kind: "rate_limit_error",
        param: None,
        code: Some("rate_limit_exceeded"),
        retry_after: Some(st.config.retry_after_secs),
        escalation_failed: false,
    }
}

/// Checks the prompt against the context and queues the generation; on an edge worker
/// with a full queue, forwards it to the cloud instead.
async fn start(
    st: &AppState,
    served: &Served,
    limits: &Limits,
    job: &Job,
) -> Result<Started, ApiError> {
    let n = job.prompt_ids.len();
    let prompt_param = job.prompt_param;
    if n == 0 {
        return Err(ApiError::invalid(Some(prompt_param), "the prompt is empty"));
    }
    if n >= limits.context {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!(
                "the prompt has {n} tokens but the model's context is {} tokens",
                limits.context
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = limits.context - n;
    let checked = &job.checked;
    let max_tokens = match checked.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "prompt ({n} tokens) plus max_tokens ({m}) exceeds the context of {} tokens",
                    limits.context
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => m,
        None => room.min(limits.max_tokens),
    };
    let escalator = st.escalator.as_ref().filter(|_| job.may_escalate);
    let confidence = escalator.and_then(|e| e.config.confidence_check());
    let req = GenRequest {
        prompt_ids: job.prompt_ids.clone(),
        max_tokens,
        sampling: checked.sampling.clone(),
        stop: checked.stop.clone(),
        ignore_eos: checked.ignore_eos,
        arrived: job.arrived,
        confidence,
    };
    match served.engine.submit(req) {
        Ok(rx) => {
            let continuation = match (escalator, confidence) {
                (Some(e), Some(_)) => Some(Arc::new(Continuation {
                    escalator: e.clone(),
                    engine: served.engine.clone(),
                    prompt_text: job.prompt_text.clone(),
                    prompt_ids: job.prompt_ids.clone(),
                    max_tokens,
                    checked: checked.clone(),
                })),
                _ => None,
            };
            Ok(Started {
                rx,
                continuation,
                header: None,
            })
        }
        Err(crate::Error::QueueFull) => {
            let Some(esc) = escalator.filter(|e| e.config.on_overload) else {
                return Err(queue_full(st));
            };
            let fwd = Forwarded {
                prompt_text: &job.prompt_text,
                messages: job.messages.as_deref(),
                checked,
            };
            match esc.forward_overloaded(&fwd).await {
                Ok(rx) => Ok(Started {
                    rx,
                    continuation: None,
                    header: Some((ESCALATED_HEADER, "overloaded")),
                }),
                Err(e) => Err(match esc.config.on_cloud_unavailable {
                    OnCloudUnavailable::Fail => cloud_unavailable_error(&e.0),
                    // Serving locally is what a full queue cannot do: the usual 429.
                    OnCloudUnavailable::ServeLocally => ApiError {
                        escalation_failed: true,
                        ..queue_full(st)
                    },
                }),
            }
        }
        Err(other) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: other.to_string(),
            kind: "service_unavailable",
            param: None,
            code: None,
            retry_after: Some(st.config.retry_after_secs),
            escalation_failed: false,
        }),
    }
}

/// The whole generation (non-streaming responses).
struct Collected {
    text: String,
    finish: &'static str,
    usage: Usage,
    mark: Option<EscalationMark>,
}

/// Waits for the whole generation, following a low-confidence hand-off to its
/// continuation.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    continuation: Option<Arc<Continuation>>,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut mark = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    text,
                    finish: finish.as_str(),
                    usage: Usage::new(prompt_tokens, completion_tokens),
                    mark,
                });
            }
            Event::Error(e) => return Err(internal(e)),
            Event::LowConfidence(h) => match &continuation {
                Some(c) => rx = c.resume(*h),
                None => return Err(internal("an unexpected hand-off".into())),
            },
            Event::Escalated(m) => mark = Some(m),
            Event::CloudUnavailable(why) => return Err(cloud_unavailable_error(&why)),
        }
    }
    Err(internal("the engine dropped the request".into()))
}

fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
        code: None,
        retry_after: None,
        escalation_failed: false,
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

fn may_escalate(headers: &HeaderMap) -> bool {
    !headers.contains_key(ESCALATED_FROM_HEADER)
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let run = async {
        let body = body_bytes(body)?;
        let req: CompletionRequest = parse_json(&body)?;
        let served = served(&st)?;
        let limits = st.limits(served);
        let checked = req.common.check(&limits)?;
        let prompt = req.prompt_text()?;
        let ids = served
            .codec
            .encode(&prompt)
            .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
        let job = Job {
            kind: Kind::Completion,
            prompt_text: prompt,
            messages: None,
            prompt_ids: ids,
            prompt_param: "prompt",
            checked,
            arrived,
            may_escalate: may_escalate(&headers),
        };
        let started = start(&st, served, &limits, &job).await?;
        Ok::<_, ApiError>(respond(&st, job.kind, &job.checked, started).await)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let run = async {
        let body = body_bytes(body)?;
        let req: ChatRequest = parse_json(&body)?;
        let messages = req.messages()?;
        let served = served(&st)?;
        let limits = st.limits(served);
        let checked = req.common.check(&limits)?;
        let prompt = served
            .codec
            .render_chat(&messages)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        let ids = served
            .codec
            .encode(&prompt)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        let job = Job {
            kind: Kind::Chat,
            prompt_text: prompt,
            messages: Some(messages),
            prompt_ids: ids,
            prompt_param: "messages",
            checked,
            arrived,
            may_escalate: may_escalate(&headers),
        };
        let started = start(&st, served, &limits, &job).await?;
        Ok::<_, ApiError>(respond(&st, job.kind, &job.checked, started).await)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// The `escalation` field of an escalated response (and of its last stream chunks).
fn escalation_field(mark: &EscalationMark) -> Value {
    json!({
        "reason": mark.reason,
        "served_by": if mark.by_cloud { "cloud" } else { "edge" },
    })
}

fn set_header(resp: &mut Response, name: &'static str, value: &'static str) {
    resp.headers_mut().insert(
        HeaderName::from_static(name),
        HeaderValue::from_static(value),
    );
}

async fn respond(st: &AppState, kind: Kind, checked: &Checked, started: Started) -> Response {
    let Started {
        rx,
        continuation,
        header,
    } = started;
    let created = now_secs();
    let model = st.config.model_name.clone();
    let id = st.new_id(match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    });
    if checked.stream {
        let stream = sse_stream(
            kind,
            id,
            model,
            created,
            checked.include_usage,
            rx,
            continuation,
        );
        let mut resp = Sse::new(stream).into_response();
        if let Some((name, value)) = header {
            set_header(&mut resp, name, value);
        }
        return resp;
    }
    match collect(rx, continuation).await {
        Err(e) => e.into_response(),
        Ok(Collected {
            text,
            finish,
            usage,
            mark,
        }) => {
            let mut body = match kind {
                Kind::Completion => json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                    "usage": usage,
                }),
                Kind::Chat => json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish,
                    }],
                    "usage": usage,
                }),
            };
            if let Some(m) = &mark {
                body["escalation"] = escalation_field(m);
            }
            let mut resp = Json(body).into_response();
            if let Some(m) = mark {
                set_header(&mut resp, ESCALATED_HEADER, m.reason);
                if !m.by_cloud {
                    set_header(&mut resp, ESCALATION_FAILED_HEADER, "cloud_unavailable");
                }
            }
            resp
        }
    }
}

/// Builds OpenAI's chunk objects; `delta` None means the role-only opening chunk (chat).
fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    text: Option<&str>,
    finish: Option<&str>,
) -> Value {
    match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
        }),
        Kind::Chat => {
            let delta = match (text, finish) {
                (None, None) => json!({"role": "assistant", "content": ""}),
                (Some(t), _) => json!({"content": t}),
                (None, Some(_)) => json!({}),
            };
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        }
    }
}

struct StreamState {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
    continuation: Option<Arc<Continuation>>,
    mark: Option<EscalationMark>,
    pending: std::collections::VecDeque<String>,
    started: bool,
    done: bool,
}

fn sse_stream(
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
    continuation: Option<Arc<Continuation>>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let state = StreamState {
        kind,
        id,
        model,
        created,
        include_usage,
        rx,
        continuation,
        mark: None,
        pending: Default::default(),
        started: false,
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            if !s.started {
                s.started = true;
                if matches!(s.kind, Kind::Chat) {
                    let c = chunk(s.kind, &s.id, &s.model, s.created, None, None);
                    s.pending.push_back(c.to_string());
                }
                continue;
            }
            match s.rx.recv().await {
                Some(Event::Delta(d)) => {
                    let c = chunk(s.kind, &s.id, &s.model, s.created, Some(&d), None);
                    s.pending.push_back(c.to_string());
                }
                Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let mut c = chunk(
                        s.kind,
                        &s.id,
                        &s.model,
                        s.created,
                        None,
                        Some(finish.as_str()),
                    );
                    if let Some(m) = &s.mark {
                        c["escalation"] = escalation_field(m);
                    }
                    s.pending.push_back(c.to_string());
                    if s.include_usage {
                        let object = match s.kind {
                            Kind::Completion => "text_completion",
                            Kind::Chat => "chat.completion.chunk",
                        };
                        let mut u = json!({
                            "id": s.id, "object": object, "created": s.created, "model": s.model,
                            "choices": [], "usage": Usage::new(prompt_tokens, completion_tokens),
                        });
                        if let Some(m) = &s.mark {
                            u["escalation"] = escalation_field(m);
                        }
                        s.pending.push_back(u.to_string());
                    }
                    s.pending.push_back("[DONE]".into());
                    s.done = true;
                }
                Some(Event::Error(e)) => {
                    s.pending.push_back(internal(e).body().to_string());
                    s.pending.push_back("[DONE]".into());
                    s.done = true;
                }
                Some(Event::LowConfidence(h)) => match &s.continuation {
                    // The rest of the stream comes from the continuation, re-wrapped in
                    // this response's chunks (same id, model and created).
                    Some(c) => s.rx = c.resume(*h),
                    None => {
                        let e = internal("an unexpected hand-off".into());
                        s.pending.push_back(e.body().to_string());
                        s.pending.push_back("[DONE]".into());
                        s.done = true;
                    }
                },
                Some(Event::Escalated(m)) => s.mark = Some(m),
                Some(Event::CloudUnavailable(why)) => {
                    s.pending
                        .push_back(cloud_unavailable_error(&why).body().to_string());
                    s.pending.push_back("[DONE]".into());
                    s.done = true;
                }
                None => return None,
            }
        }
    })
}
