//! The HTTP API (axum): routes, shared state, and the OpenAI endpoints' request
//! handling up to a queued generation (see [`super::response`] for the answer).

use crate::model::decoder::Model;
use crate::serve::api::{
    ApiError, ChatRequest, Checked, CompletionRequest, Limits, Prompt, parse_json,
};
use crate::serve::auth::ApiKeys;
use crate::serve::conn::ConnectionCloser;
use crate::serve::engine::{EngineHandle, GenRequest};
use crate::serve::escalation::cloud::{Escalator, Forwarded, cloud_unavailable_error};
use crate::serve::escalation::continuation::Continuation;
use crate::serve::escalation::{
    ESCALATED_FROM_HEADER, ESCALATED_HEADER, EscalationConfig, OnCloudUnavailable,
};
use crate::serve::metrics::Metrics;
use crate::serve::response::{Kind, Started, respond};
use crate::serve::sampling::SamplingParams;
use crate::serve::text::{ChatMessage, TextCodec};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
    /// When set, `/v1/*` requires one of these keys (see [`crate::serve::auth`]).
    pub api_keys: Option<Arc<ApiKeys>>,
    /// Inference requests addressed to a host whose first DNS label starts with this (an
    /// edge site's Service, `<service>-edge-`) are counted by that name: a site with no
    /// ready replica routes its clients here, and the autoscaler still sees its demand.
    pub site_service_prefix: Option<String>,
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
            api_keys: None,
            site_service_prefix: None,
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
            let e = Escalator::new(c, metrics.clone()).expect("a valid escalation config");
            Arc::new(e.with_api_keys(config.api_keys.clone()))
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

    /// Readiness turns false. Generations still go on, new ones too: a request that
    /// arrives now was routed by someone who has not yet seen the drain.
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

    pub(super) fn new_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            now_secs(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

pub(super) fn now_secs() -> u64 {
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
            require_api_key,
        ))
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
    let via_site = endpoint.ends_with("completions")
        && st
            .config
            .site_service_prefix
            .as_deref()
            .and_then(|prefix| site_service(&req, prefix))
            .inspect(|site| st.metrics.record_site_request(site))
            .is_some();
    let http1 = req.version() < axum::http::Version::HTTP_2;
    let closer = req.extensions().get::<ConnectionCloser>().cloned();
    let mut resp = next.run(req).await;
    if via_site {
        // A site's clients reach this worker only while the site has no ready replica: a
        // kept-alive connection would stay pinned here after it wakes (kube-proxy balances
        // connections, not requests), so each of their requests gets its own (HTTP/2: a
        // GOAWAY once the connection's streams are answered).
        if http1 {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if let Some(c) = closer {
            c.close_after_response();
        }
    }
    if !endpoint.is_empty() {
        st.metrics.record_request(&endpoint, resp.status().as_u16());
    }
    resp
}

/// The edge site Service a request was addressed to: its host's first DNS label
/// (`chat-edge-store-1` of `chat-edge-store-1.ns.svc:8080`), when it starts with `prefix`
/// and is a valid Service name. HTTP/2 carries the host in the URI, HTTP/1.1 in `Host`.
fn site_service<'a>(req: &'a Request, prefix: &str) -> Option<&'a str> {
    let host = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(axum::http::header::HOST)?.to_str().ok()?,
    };
    let label = host.split([':', '.']).next()?;
    let valid = label.len() > prefix.len()
        && label.len() <= 63
        && label.starts_with(prefix)
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(label)
}

/// `/v1/*` needs a key when the worker has keys; probes and metrics never do.
async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(keys) = &st.config.api_keys
        && req.uri().path().starts_with("/v1/")
        && let Err(e) = keys.check(req.headers())
    {
        return e.into_response();
    }
    next.run(req).await
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
        Some(s) => Ok(s),
        None => Err(ApiError {
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

fn queue_full(st: &AppState) -> ApiError {
    ApiError {
        message: "the request queue is full; retry later".into(),
        ..ApiError::from_error(&crate::Error::QueueFull, st.config.retry_after_secs)
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
    // Several choices are generated here, never escalated (a hand-off continues one answer).
    let escalator = st
        .escalator
        .as_ref()
        .filter(|_| job.may_escalate && checked.n == 1);
    let confidence = escalator.and_then(|e| e.config.confidence_check());
    let request = |choice: usize| GenRequest {
        prompt_ids: job.prompt_ids.clone(),
        max_tokens,
        sampling: SamplingParams {
            // Each choice its own reproducible stream of random numbers.
            seed: checked.sampling.seed.map(|s| s.wrapping_add(choice as u64)),
            ..checked.sampling.clone()
        },
        stop: checked.stop.clone(),
        ignore_eos: checked.ignore_eos,
        arrived: job.arrived,
        confidence,
        logprobs: checked.logprobs,
        prompt_logprobs: checked.echo && checked.logprobs.is_some(),
    };
    let mut more = Vec::with_capacity(checked.n.saturating_sub(1));
    for choice in 1..checked.n {
        // A full queue refuses the whole request (the choices queued so far are dropped,
        // which cancels them).
        more.push(served.engine.submit(request(choice)).map_err(|e| match e {
            crate::Error::QueueFull => queue_full(st),
            other => ApiError::from_error(&other, st.config.retry_after_secs),
        })?);
    }
    match served.engine.submit(request(0)) {
        Ok(rx) => {
            let continuation = match (escalator, confidence) {
                (Some(e), Some(_)) => Some(Arc::new(Continuation {
                    escalator: e.clone(),
                    engine: served.engine.clone(),
                    codec: served.codec.clone(),
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
                more,
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
                    more: vec![],
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
        // The engine has stopped: 503.
        Err(other) => Err(ApiError::from_error(&other, st.config.retry_after_secs)),
    }
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
        let checked = req.check(&limits)?;
        let invalid = |e: crate::Error| ApiError::invalid(Some("prompt"), e.to_string());
        let (prompt, ids) = match req.prompt(served.model.config().vocab_size)? {
            Prompt::Text(text) => {
                let ids = served.codec.encode(&text).map_err(invalid)?;
                (text, ids)
            }
            Prompt::Ids(ids) => (served.codec.decode(&ids).map_err(invalid)?, ids),
        };
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
        let echo = job.checked.echo.then_some(job.prompt_text.as_str());
        Ok::<_, ApiError>(respond(&st, job.kind, &job.checked, echo, started).await)
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
        let checked = req.check(&limits)?;
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
        Ok::<_, ApiError>(respond(&st, job.kind, &job.checked, None, started).await)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
