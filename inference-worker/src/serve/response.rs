//! Turning a generation's events into the HTTP response: one JSON body, or an SSE
//! stream of OpenAI chunks (following a low-confidence hand-off to its continuation).

use crate::serve::api::{ApiError, Checked, Usage};
use crate::serve::engine::{EscalationMark, Event};
use crate::serve::escalation::cloud::cloud_unavailable_error;
use crate::serve::escalation::continuation::Continuation;
use crate::serve::escalation::{ESCALATED_HEADER, ESCALATION_FAILED_HEADER};
use crate::serve::http::{AppState, now_secs};
use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// A queued (or forwarded) generation.
pub(super) struct Started {
    pub(super) rx: UnboundedReceiver<Event>,
    /// Set when the engine may hand the request off for low confidence.
    pub(super) continuation: Option<Arc<Continuation>>,
    /// A response header known before the response starts.
    pub(super) header: Option<(&'static str, &'static str)>,
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

/// Which endpoint a generation answers.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Completion,
    Chat,
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

pub(super) async fn respond(
    st: &AppState,
    kind: Kind,
    checked: &Checked,
    started: Started,
) -> Response {
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
