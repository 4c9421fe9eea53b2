//! The HTTP API (axum): OpenAI-compatible endpoints, health, readiness, metrics.

use crate::api::{ApiError, ChatRequest, Checked, CompletionRequest, Limits, Usage, parse_json};
use crate::engine::{EngineHandle, Event, GenRequest};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::text::TextCodec;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "tidal".into(),
            max_tokens: 2048,
            max_stop: 4,
            body_limit: 1 << 20,
            retry_after_secs: 1,
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
}

impl AppState {
    pub fn new(config: ServerConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
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
        }),
    }
}

/// Checks the prompt against the context and queues the generation.
fn start(
    st: &AppState,
    served: &Served,
    limits: &Limits,
    prompt_ids: Vec<u32>,
    prompt_param: &'static str,
    checked: &Checked,
    arrived: Instant,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let n = prompt_ids.len();
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
    let req = GenRequest {
        prompt_ids,
        max_tokens,
        sampling: checked.sampling.clone(),
        stop: checked.stop.clone(),
        ignore_eos: checked.ignore_eos,
        arrived,
    };
    served.engine.submit(req).map_err(|e| match e {
        crate::Error::QueueFull => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the request queue is full; retry later".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(st.config.retry_after_secs),
        },
        other => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: other.to_string(),
            kind: "service_unavailable",
            param: None,
            code: None,
            retry_after: Some(st.config.retry_after_secs),
        },
    })
}

/// Waits for the whole generation (non-streaming responses).
async fn collect(
    mut rx: UnboundedReceiver<Event>,
) -> Result<(String, &'static str, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok((
                    text,
                    finish.as_str(),
                    Usage::new(prompt_tokens, completion_tokens),
                ));
            }
            Event::Error(e) => return Err(internal(e)),
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
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(st): State<Arc<AppState>>,
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
        let rx = start(&st, served, &limits, ids, "prompt", &checked, arrived)?;
        Ok::<_, ApiError>(respond(&st, Kind::Completion, &checked, rx).await)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
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
        let rx = start(&st, served, &limits, ids, "messages", &checked, arrived)?;
        Ok::<_, ApiError>(respond(&st, Kind::Chat, &checked, rx).await)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    st: &AppState,
    kind: Kind,
    checked: &Checked,
    rx: UnboundedReceiver<Event>,
) -> Response {
    let created = now_secs();
    let model = st.config.model_name.clone();
    let id = st.new_id(match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    });
    if checked.stream {
        let stream = sse_stream(kind, id, model, created, checked.include_usage, rx);
        return Sse::new(stream).into_response();
    }
    match collect(rx).await {
        Err(e) => e.into_response(),
        Ok((text, finish, usage)) => {
            let body = match kind {
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
            Json(body).into_response()
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
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let state = StreamState {
        kind,
        id,
        model,
        created,
        include_usage,
        rx,
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
                    let c = chunk(
                        s.kind,
                        &s.id,
                        &s.model,
                        s.created,
                        None,
                        Some(finish.as_str()),
                    );
                    s.pending.push_back(c.to_string());
                    if s.include_usage {
                        let object = match s.kind {
                            Kind::Completion => "text_completion",
                            Kind::Chat => "chat.completion.chunk",
                        };
                        let u = json!({
                            "id": s.id, "object": object, "created": s.created, "model": s.model,
                            "choices": [], "usage": Usage::new(prompt_tokens, completion_tokens),
                        });
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
                None => return None,
            }
        }
    })
}
