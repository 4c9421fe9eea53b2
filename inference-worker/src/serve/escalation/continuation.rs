//! Continuing a request after a low-confidence hand-off: on the cloud, or on this
//! worker again when the cloud is unavailable and the policy allows it.

use crate::serve::api::Checked;
use crate::serve::engine::{
    EngineHandle, EscalationMark, Event, FinishReason, GenRequest, Handoff,
};
use crate::serve::escalation::OnCloudUnavailable;
use crate::serve::escalation::cloud::{Escalator, Pump, PumpEnd, sampling_fields};
use crate::serve::metrics::EscalationReason;
use crate::serve::stop::StopMatcher;
use crate::serve::text::TextCodec;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

/// One request's state for continuing it after a low-confidence hand-off.
pub struct Continuation {
    pub escalator: Arc<Escalator>,
    pub engine: EngineHandle,
    /// To re-tokenize what the cloud wrote when this worker must finish the request.
    pub codec: Arc<TextCodec>,
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
        let scanner = StopMatcher::new(self.checked.stop.clone(), held_back);
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
                let PumpEnd::Broke {
                    why,
                    text,
                    chunks,
                    scanner,
                } = pump.run(resp, &tx).await
                else {
                    return;
                };
                // The cloud died mid-stream. The client already has part of the answer:
                // finish it here if the policy allows, from everything written so far.
                match esc.config.on_cloud_unavailable {
                    OnCloudUnavailable::Fail => {
                        esc.unavailable(reason, "failed", &why);
                        let _ = tx.send(Event::Error(why));
                    }
                    OnCloudUnavailable::ServeLocally => {
                        esc.unavailable(reason, "finished_locally", &why);
                        let so_far = format!("{}{}{text}", self.prompt_text, h.text);
                        let ids = match self.codec.encode(&so_far) {
                            Ok(ids) => ids,
                            Err(e) => {
                                let _ =
                                    tx.send(Event::Error(format!("{why}; going on locally: {e}")));
                                return;
                            }
                        };
                        let done = h.completion_tokens + chunks;
                        let local = Local {
                            ids,
                            prompt_tokens: h.prompt_tokens,
                            done_tokens: done,
                            remaining: self.max_tokens.saturating_sub(done).max(1),
                        };
                        self.serve_locally(local, scanner, &tx).await;
                    }
                }
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
                    let mut ids = self.prompt_ids.clone();
                    ids.extend_from_slice(&h.ids);
                    let local = Local {
                        ids,
                        prompt_tokens: h.prompt_tokens,
                        done_tokens: h.completion_tokens,
                        remaining,
                    };
                    self.serve_locally(local, scanner, &tx).await;
                }
            },
        }
    }

    /// Goes on generating on this worker from `local.ids` (the prompt and everything
    /// generated so far), no more confidence checks.
    async fn serve_locally(
        &self,
        local: Local,
        mut scanner: StopMatcher,
        tx: &UnboundedSender<Event>,
    ) {
        let Local {
            ids,
            prompt_tokens,
            done_tokens,
            remaining,
        } = local;
        let req = GenRequest {
            prompt_ids: ids,
            max_tokens: remaining,
            sampling: self.checked.sampling.clone(),
            stop: self.checked.stop.clone(),
            ignore_eos: self.checked.ignore_eos,
            arrived: Instant::now(),
            confidence: None,
            // The tokens generated here are reported as the first ones were.
            logprobs: self.checked.logprobs,
            prompt_logprobs: false,
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
                            prompt_tokens,
                            completion_tokens: done_tokens + deltas,
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
                        prompt_tokens,
                        completion_tokens: done_tokens + completion_tokens,
                    });
                    return;
                }
                Event::Logprob(l) => {
                    let _ = tx.send(Event::Logprob(l));
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

/// Where a local continuation starts.
struct Local {
    /// Prompt and generated tokens so far.
    ids: Vec<u32>,
    /// The original prompt's tokens (for usage).
    prompt_tokens: usize,
    /// Completion tokens already produced (edge and cloud).
    done_tokens: usize,
    remaining: usize,
}
