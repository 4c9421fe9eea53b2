//! Turning a generation's events into the HTTP response: one JSON body, or an SSE
//! stream of OpenAI chunks (following a low-confidence hand-off to its continuation).

use crate::serve::api::{ApiError, Checked, Usage};
use crate::serve::engine::{EscalationMark, Event, TokenLogprob};
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
    /// The other choices' generations when the request asked for `n` > 1.
    pub(super) more: Vec<UnboundedReceiver<Event>>,
}

/// The whole generation (non-streaming responses).
struct Collected {
    text: String,
    finish: &'static str,
    usage: Usage,
    mark: Option<EscalationMark>,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Option<(String, Vec<TokenLogprob>)>,
}

/// `logprobs` of a chat choice or chunk: one entry per token.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |text: &str, logprob: f32| json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()});
    json!({
        "content": tokens.iter().map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(a, lp)| entry(a, *lp)).collect();
            e
        }).collect::<Vec<_>>(),
        "refusal": null,
    })
}

/// `logprobs` of a completion choice or chunk (the legacy format): parallel lists of the
/// tokens (text, and log probability unless it has none), with character offsets into the
/// returned text counted from `offset`; also the offset after the last token.
fn completion_logprobs(tokens: &[(&str, Option<&TokenLogprob>)], offset: usize) -> (Value, usize) {
    let mut at = offset;
    let mut text_offset = Vec::with_capacity(tokens.len());
    for (text, _) in tokens {
        text_offset.push(at);
        at += text.chars().count();
    }
    let lp = json!({
        "tokens": tokens.iter().map(|(text, _)| text).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|(_, t)| t.map(|t| t.logprob)).collect::<Vec<_>>(),
        // Keyed by text: tokens with the same text keep the likeliest (listed first).
        "top_logprobs": tokens.iter().map(|(_, t)| t.map(|t| {
            let mut m = serde_json::Map::new();
            for (a, lp) in &t.top {
                m.entry(a.clone()).or_insert(json!(lp));
            }
            m
        })).collect::<Vec<_>>(),
        "text_offset": text_offset,
    });
    (lp, at)
}

/// A generated token as a completion `logprobs` entry.
fn generated(t: &TokenLogprob) -> (&str, Option<&TokenLogprob>) {
    (&t.token, Some(t))
}

/// The generated tokens' completion `logprobs`, after `echo`'s prompt tokens when given.
fn completion_choice_logprobs(
    prompt: Option<&(String, Vec<TokenLogprob>)>,
    tokens: &[TokenLogprob],
) -> Value {
    let mut entries: Vec<(&str, Option<&TokenLogprob>)> = vec![];
    if let Some((first, rest)) = prompt {
        entries.push((first, None));
        entries.extend(rest.iter().map(generated));
    }
    entries.extend(tokens.iter().map(generated));
    completion_logprobs(&entries, 0).0
}

/// Waits for the whole generation, following a low-confidence hand-off to its
/// continuation.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    continuation: Option<Arc<Continuation>>,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut mark = None;
    let mut logprobs = vec![];
    let mut prompt_logprobs = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Logprob(l) => logprobs.push(l),
            Event::PromptLogprobs { first, rest } => prompt_logprobs = Some((first, rest)),
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
                    logprobs,
                    prompt_logprobs,
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
    echo: Option<&str>,
    started: Started,
) -> Response {
    let Started {
        rx,
        continuation,
        header,
        more,
    } = started;
    let created = now_secs();
    let model = st.config.model_name.clone();
    let id = st.new_id(match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    });
    if checked.stream {
        // (`echo` is refused with `stream` when the request is checked.)
        let state = |index, rx, continuation, tail| StreamState {
            kind,
            index,
            id: id.clone(),
            model: model.clone(),
            created,
            include_usage: checked.include_usage,
            rx,
            continuation,
            mark: None,
            pending: Default::default(),
            started: false,
            done: false,
            tail,
            wants_logprobs: checked.logprobs.is_some(),
            logprobs: vec![],
            offset: 0,
        };
        let mut resp = if more.is_empty() {
            Sse::new(sse_stream(state(0, rx, continuation, None))).into_response()
        } else {
            // Every choice's chunks as they come, then one usage chunk and [DONE].
            let totals = Arc::new(std::sync::Mutex::new(Usage::new(0, 0)));
            let choices = std::iter::once(rx)
                .chain(more)
                .enumerate()
                .map(|(i, rx)| Box::pin(sse_stream(state(i, rx, None, Some(totals.clone())))));
            let merged = futures::stream::select_all(choices);
            let (object, include_usage) = (chunk_object(kind), checked.include_usage);
            let (id, model) = (id.clone(), model.clone());
            let tail = futures::stream::once(async move {
                let usage = totals.lock().expect("usage totals").clone();
                let u = json!({
                    "id": id, "object": object, "created": created, "model": model,
                    "choices": [], "usage": usage,
                });
                futures::stream::iter(
                    include_usage
                        .then(|| u.to_string())
                        .into_iter()
                        .chain(["[DONE]".to_string()])
                        .map(|d| Ok(SseEvent::default().data(d))),
                )
            });
            Sse::new(futures::StreamExt::chain(
                merged,
                futures::StreamExt::flatten(tail),
            ))
            .into_response()
        };
        if let Some((name, value)) = header {
            set_header(&mut resp, name, value);
        }
        return resp;
    }
    let mut collected = vec![collect(rx, continuation).await];
    for rx in more {
        collected.push(collect(rx, None).await);
    }
    let collected = match collected.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let wants = checked.logprobs.is_some();
    // The prompt counts once, every choice's tokens count.
    let usage = Usage::new(
        collected[0].usage.prompt_tokens,
        collected.iter().map(|c| c.usage.completion_tokens).sum(),
    );
    let mark = collected[0].mark;
    let choices: Vec<Value> = collected
        .into_iter()
        .enumerate()
        .map(|(index, c)| match kind {
            Kind::Completion => {
                let lp = wants.then(|| {
                    completion_choice_logprobs(
                        c.prompt_logprobs.as_ref().filter(|_| echo.is_some()),
                        &c.logprobs,
                    )
                });
                let text = match echo {
                    Some(p) => format!("{p}{}", c.text),
                    None => c.text,
                };
                json!({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish})
            }
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": wants.then(|| chat_logprobs(&c.logprobs)),
                "finish_reason": c.finish,
            }),
        })
        .collect();
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    let mut body = json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": choices, "usage": usage,
    });
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

/// The `object` of a streamed chunk.
fn chunk_object(kind: Kind) -> &'static str {
    match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    }
}

/// Builds OpenAI's chunk objects for `s`'s choice; `text` and `finish` None mean the
/// role-only opening chunk (chat).
fn chunk(s: &StreamState, text: Option<&str>, finish: Option<&str>) -> Value {
    let (id, model, created, index) = (&s.id, &s.model, s.created, s.index);
    let object = chunk_object(s.kind);
    let choice = match s.kind {
        Kind::Completion => {
            json!({"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        }
        Kind::Chat => {
            let delta = match (text, finish) {
                (None, None) => json!({"role": "assistant", "content": ""}),
                (Some(t), _) => json!({"content": t}),
                (None, Some(_)) => json!({}),
            };
            json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
}

struct StreamState {
    kind: Kind,
    /// The choice this stream carries.
    index: usize,
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
    /// One of several choices: its usage is added here, and the merged stream ends with the
    /// usage chunk and [DONE] (None: this stream ends itself).
    tail: Option<Arc<std::sync::Mutex<Usage>>>,
    /// Whether the request asked for log probabilities; those of tokens whose text has
    /// not been sent yet; the completion text's length in characters so far.
    wants_logprobs: bool,
    logprobs: Vec<TokenLogprob>,
    offset: usize,
}

impl StreamState {
    /// Ends this stream after what is pending ([DONE] unless a merged stream adds it).
    fn end(&mut self) {
        if self.tail.is_none() {
            self.pending.push_back("[DONE]".into());
        }
        self.done = true;
    }

    /// A chunk carrying the log probabilities gathered since the last one.
    fn chunk(&mut self, text: Option<&str>, finish: Option<&str>) -> Value {
        let mut c = chunk(self, text, finish);
        if self.wants_logprobs {
            let tokens = std::mem::take(&mut self.logprobs);
            c["choices"][0]["logprobs"] = match self.kind {
                Kind::Chat => chat_logprobs(&tokens),
                Kind::Completion => {
                    let entries: Vec<_> = tokens.iter().map(generated).collect();
                    let (lp, end) = completion_logprobs(&entries, self.offset);
                    self.offset = end;
                    lp
                }
            };
        }
        c
    }
}

fn sse_stream(state: StreamState) -> impl Stream<Item = Result<SseEvent, Infallible>> {
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
                    let c = chunk(&s, None, None);
                    s.pending.push_back(c.to_string());
                }
                continue;
            }
            match s.rx.recv().await {
                Some(Event::Delta(d)) => {
                    let c = s.chunk(Some(&d), None);
                    s.pending.push_back(c.to_string());
                }
                Some(Event::Logprob(l)) => s.logprobs.push(l),
                // `echo` is refused with `stream`: nothing asks for these here.
                Some(Event::PromptLogprobs { .. }) => {}
                Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let mut c = s.chunk(None, Some(finish.as_str()));
                    if let Some(m) = &s.mark {
                        c["escalation"] = escalation_field(m);
                    }
                    s.pending.push_back(c.to_string());
                    if let Some(totals) = &s.tail {
                        let mut t = totals.lock().expect("usage totals");
                        *t = Usage::new(prompt_tokens, t.completion_tokens + completion_tokens);
                        s.done = true;
                        continue;
                    }
                    if s.include_usage {
                        let object = chunk_object(s.kind);
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
                    s.end();
                }
                Some(Event::LowConfidence(h)) => match &s.continuation {
                    // The rest of the stream comes from the continuation, re-wrapped in
                    // this response's chunks (same id, model and created).
                    Some(c) => s.rx = c.resume(*h),
                    None => {
                        let e = internal("an unexpected hand-off".into());
                        s.pending.push_back(e.body().to_string());
                        s.end();
                    }
                },
                Some(Event::Escalated(m)) => s.mark = Some(m),
                Some(Event::CloudUnavailable(why)) => {
                    s.pending
                        .push_back(cloud_unavailable_error(&why).body().to_string());
                    s.end();
                }
                None => return None,
            }
        }
    })
}
