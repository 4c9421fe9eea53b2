//! OpenAI request/response types and request validation.

use crate::error::Error;
use crate::serve::sampling::SamplingParams;
use crate::serve::text::ChatMessage;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error in OpenAI's format: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// Adds `x-tidal-escalation-failed: cloud_unavailable` (an edge worker could not
    /// reach its cloud endpoint).
    pub escalation_failed: bool,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
            escalation_failed: false,
        }
    }

    /// The answer to a worker error that reaches a client, chosen by the error's
    /// [`Error::reason`]: 429 for a full queue, 503 (with `Retry-After`) while the
    /// worker or its expert shards cannot serve, 400 for input the model cannot
    /// take, 500 for the rest.
    pub fn from_error(e: &Error, retry_after: u64) -> Self {
        let unavailable = (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable");
        let invalid = (StatusCode::BAD_REQUEST, "invalid_request_error");
        let ((status, kind), code) = match e.reason() {
            "queue_full" => (
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
                Some("rate_limit_exceeded"),
            ),
            "engine_stopped" | "shard_unreachable" | "shard_unavailable" => (unavailable, None),
            "context_length_exceeded" => (invalid, Some("context_length_exceeded")),
            "invalid_input" | "tokenizer" | "template" | "wire" => (invalid, None),
            _ => ((StatusCode::INTERNAL_SERVER_ERROR, "server_error"), None),
        };
        Self {
            status,
            message: e.to_string(),
            kind,
            param: None,
            code,
            retry_after: (status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(retry_after),
            escalation_failed: false,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        if self.escalation_failed {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_static("x-tidal-escalation-failed"),
                axum::http::HeaderValue::from_static("cloud_unavailable"),
            );
        }
        resp
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of /v1/completions: text, or token ids (what lm-evaluation-harness and
/// other tools that tokenize themselves send), one or a list of one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

/// A prompt as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Most choices one request may ask for (`n`).
pub const MAX_N: i64 = 8;

/// Most alternatives a response reports per token (vLLM's and OpenAI's chat limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentField>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonParams {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; vLLM's extension.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<i64>,
    /// vLLM's extension: keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// How many alternatives to report with each token's log probability (0: the chosen
    /// token's only); omitted: none.
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Return the prompt before the completion (with its tokens' log probabilities when
    /// `logprobs` is set: what loglikelihood evaluations read).
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<MessageIn>,
    /// Report each generated token's log probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`, how many alternatives to report per token.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

fn top_count(param: &'static str, n: i64) -> Result<usize, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&n) {
        Ok(n as usize)
    } else {
        Err(ApiError::invalid(
            Some(param),
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
        ))
    }
}

/// Server-side limits requests are checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub model_name: String,
    pub context: usize,
    pub max_tokens: usize,
    pub max_stop: usize,
}

/// Validated common parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// Report generated tokens' log probabilities with this many alternatives each.
    pub logprobs: Option<usize>,
    /// Completions: return the prompt (and, with `logprobs`, its tokens' log probabilities).
    pub echo: bool,
    /// How many choices to generate (each its own sequence in the batch).
    pub n: usize,
}

/// Parses a JSON body, mapping every failure to a 400 in OpenAI's format.
pub fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(None, format!("request body is not valid UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| {
        let msg = if e.is_data() {
            format!("invalid request: {e}")
        } else {
            format!("request body is not valid JSON: {e}")
        };
        ApiError::invalid(None, msg)
    })
}

impl CommonParams {
    pub fn check(&self, limits: &Limits) -> Result<Checked, ApiError> {
        if self.model != limits.model_name {
            return Err(ApiError::invalid(
                Some("model"),
                format!("the model `{}` does not exist", self.model),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m <= 0 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!("max_tokens must be at least 1, got {m}"),
                ));
            }
            Some(m) if m as u64 > limits.max_tokens as u64 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!("max_tokens must be at most {}, got {m}", limits.max_tokens),
                ));
            }
            Some(m) => Some(m as usize),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("top_k must be >= 0, got {top_k}"),
            ));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > limits.max_stop {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("at most {} stop sequences are allowed", limits.max_stop),
            ));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid(
                Some("stop"),
                "stop sequences must not be empty",
            ));
        }
        Ok(Checked {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k: top_k as usize,
                seed: self.seed,
            },
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs: None,
            echo: false,
            n: n as usize,
        })
    }
}

impl CompletionRequest {
    /// The common checks plus `logprobs` and `echo`.
    pub fn check(&self, limits: &Limits) -> Result<Checked, ApiError> {
        let mut checked = self.common.check(limits)?;
        checked.logprobs = self
            .logprobs
            .map(|n| top_count("logprobs", n))
            .transpose()?;
        checked.echo = self.echo.unwrap_or(false);
        if checked.echo && checked.stream {
            return Err(ApiError::invalid(
                Some("echo"),
                "echo is not supported with stream",
            ));
        }
        Ok(checked)
    }

    /// The one prompt, as text or token ids; ids must lie in the vocabulary.
    pub fn prompt(&self, vocab_size: usize) -> Result<Prompt, ApiError> {
        let one = || {
            ApiError::invalid(
                Some("prompt"),
                "exactly one prompt per request is supported",
            )
        };
        let prompt = match &self.prompt {
            PromptField::One(s) => Prompt::Text(s.clone()),
            PromptField::Many(v) if v.len() == 1 => Prompt::Text(v[0].clone()),
            PromptField::Ids(ids) => Prompt::Ids(ids.clone()),
            PromptField::ManyIds(v) if v.len() == 1 => Prompt::Ids(v[0].clone()),
            PromptField::Many(_) | PromptField::ManyIds(_) => return Err(one()),
        };
        if let Prompt::Ids(ids) = &prompt
            && let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size)
        {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!("token id {bad} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        Ok(prompt)
    }
}

impl ChatRequest {
    /// The common checks plus `logprobs` and `top_logprobs`.
    pub fn check(&self, limits: &Limits) -> Result<Checked, ApiError> {
        let mut checked = self.common.check(limits)?;
        let top = self
            .top_logprobs
            .map(|n| top_count("top_logprobs", n))
            .transpose()?;
        checked.logprobs = match (self.logprobs.unwrap_or(false), top) {
            (true, top) => Some(top.unwrap_or(0)),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    "top_logprobs needs logprobs set to true",
                ));
            }
        };
        Ok(checked)
    }

    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages must not be empty",
            ));
        }
        self.messages
            .iter()
            .map(|m| {
                if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str())
                {
                    return Err(ApiError::invalid(
                        Some("messages"),
                        format!("unknown message role `{}`", m.role),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(ContentField::Text(t)) => t.clone(),
                    Some(ContentField::Parts(parts)) => {
                        let mut out = String::new();
                        for p in parts {
                            match (&*p.kind, &p.text) {
                                ("text", Some(t)) => out.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        Some("messages"),
                                        format!("unsupported content part `{}`", p.kind),
                                    ));
                                }
                            }
                        }
                        out
                    }
                };
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            model_name: "m".into(),
            context: 64,
            max_tokens: 16,
            max_stop: 4,
        }
    }

    #[test]
    fn logprobs_echo_and_token_id_prompts_are_checked() {
        let req: CompletionRequest =
            parse_json(br#"{"model":"m","prompt":[[1,2,3]],"logprobs":3,"echo":true}"#).unwrap();
        let c = req.check(&limits()).unwrap();
        assert_eq!((c.logprobs, c.echo), (Some(3), true));
        assert_eq!(req.prompt(10).unwrap(), Prompt::Ids(vec![1, 2, 3]));
        let e = req.prompt(3).unwrap_err();
        assert!(e.message.contains("token id 3 is outside"), "{}", e.message);
        let req: CompletionRequest =
            parse_json(br#"{"model":"m","prompt":[4,5],"logprobs":21}"#).unwrap();
        assert_eq!(req.prompt(10).unwrap(), Prompt::Ids(vec![4, 5]));
        assert_eq!(req.check(&limits()).unwrap_err().param, Some("logprobs"));
        let req: CompletionRequest =
            parse_json(br#"{"model":"m","prompt":"x","echo":true,"stream":true}"#).unwrap();
        assert_eq!(req.check(&limits()).unwrap_err().param, Some("echo"));
        let req: CompletionRequest = parse_json(br#"{"model":"m","prompt":[[1],[2]]}"#).unwrap();
        assert!(req.prompt(10).is_err());

        let chat = |body: &[u8]| {
            parse_json::<ChatRequest>(body)
                .unwrap()
                .check(&limits())
                .map(|c| c.logprobs)
        };
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(
            chat(format!(r#"{{"model":"m",{msgs},"logprobs":true,"top_logprobs":5}}"#).as_bytes())
                .unwrap(),
            Some(5)
        );
        assert_eq!(
            chat(format!(r#"{{"model":"m",{msgs},"logprobs":true}}"#).as_bytes()).unwrap(),
            Some(0)
        );
        assert_eq!(
            chat(format!(r#"{{"model":"m",{msgs}}}"#).as_bytes()).unwrap(),
            None
        );
        let e = chat(format!(r#"{{"model":"m",{msgs},"top_logprobs":2}}"#).as_bytes()).unwrap_err();
        assert_eq!(e.param, Some("top_logprobs"));
    }

    #[test]
    fn worker_errors_map_to_openai_errors_by_reason() {
        let full = ApiError::from_error(&Error::QueueFull, 7);
        assert_eq!(
            (full.status, full.kind, full.code, full.retry_after),
            (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                Some(7)
            )
        );
        let stopped = ApiError::from_error(&Error::EngineStopped, 1);
        assert_eq!(
            (stopped.status, stopped.kind, stopped.retry_after),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some(1)
            )
        );
        assert_eq!(stopped.message, "the engine has stopped");
        let long = ApiError::from_error(
            &Error::ContextExceeded {
                tokens: 9,
                context: 8,
            },
            1,
        );
        assert_eq!(
            (long.status, long.code, long.retry_after),
            (
                StatusCode::BAD_REQUEST,
                Some("context_length_exceeded"),
                None
            )
        );
        let other = ApiError::from_error(&Error::Template("x".into()).in_file("t"), 1);
        assert_eq!(other.status, StatusCode::BAD_REQUEST);
        let other = ApiError::from_error(&Error::ExpertNotLoaded(3), 1);
        assert_eq!(
            (other.status, other.kind),
            (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
        );
    }
}
