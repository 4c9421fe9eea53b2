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
//! `fail` answers a 503 `cloud_unavailable` error. When the cloud's stream of a continued
//! request breaks after it has written part of the answer (its pod died, the connection was
//! cut), `serve-locally` finishes the request on this worker from everything written so far
//! (the prompt, the edge's text and the cloud's), in the same response; `fail` ends it with
//! an error event.

pub mod cloud;
pub mod continuation;

use crate::serve::engine::ConfidenceCheck;
use crate::serve::tls::TrustedCa;
use std::sync::Arc;
use std::time::Duration;

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
    /// The CAs an `https://` cloud is verified against (`--escalation-ca-file`); None: the
    /// platform's trust store.
    pub ca: Option<Arc<TrustedCa>>,
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
            ca: None,
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

#[cfg(test)]
mod tests {
    use super::*;

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
