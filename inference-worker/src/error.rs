//! The crate's one error type. `reason()` is a bounded label for metrics and for
//! mapping errors that reach a client to HTTP statuses and OpenAI error types.

use std::path::PathBuf;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// An error about the file at `path` (e.g. an invalid placement plan file).
    #[error("{}: {source}", path.display())]
    InFile { path: PathBuf, source: Box<Error> },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A checkpoint file that cannot be what it claims to be.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("cannot fetch model {source_uri} from the Hugging Face Hub: {message}")]
    Hub { source_uri: String, message: String },
    #[error("chat template error: {0}")]
    Template(String),
    /// A flag a role cannot run without.
    #[error("the {role} role needs {flag} ({env})")]
    MissingFlag {
        role: &'static str,
        flag: &'static str,
        env: &'static str,
    },
    /// A setting (flag, fixture spec) with a value that cannot work.
    /// A certificate, key or CA file that does not load.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("cannot build the escalation client: {0}")]
    HttpClient(reqwest::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// A background task (loader, server) panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        source: tokio::task::JoinError,
    },
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("forward needs at least one token")]
    EmptyInput,
    #[error("sequence of {tokens} tokens exceeds the context of {context}")]
    ContextExceeded { tokens: usize, context: usize },
    #[error("expert {expert} out of range (the model has {num_experts})")]
    ExpertOutOfRange { expert: usize, num_experts: usize },
    #[error("expert {0} is not loaded")]
    ExpertNotLoaded(usize),
    /// A placement plan that does not parse or is inconsistent in itself.
    #[error("invalid placement plan: {0}")]
    InvalidPlan(String),
    #[error("endpoint {url:?} {problem}")]
    InvalidEndpoint { url: String, problem: &'static str },
    /// A valid placement plan that does not fit the model or the request.
    #[error("{0}")]
    PlanMismatch(String),
    /// A router <-> expert shard message that is malformed or does not fit.
    #[error("{0}")]
    Wire(String),
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake { addr: String, source: hyper::Error },
    #[error("expert shard {shard} has no replica (none resolved from the placement plan)")]
    NoReplica { shard: usize },
    #[error("expert shard {shard} unavailable: {errors}")]
    ShardUnavailable { shard: usize, errors: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// For `map_err` on a task's `JoinHandle`: `what` says which task, e.g. "the
    /// loader panicked".
    pub(crate) fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Self {
        move |source| Error::Task { what, source }
    }

    /// Attributes `self` to the file at `path`.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        Error::InFile {
            path: path.into(),
            source: Box::new(self),
        }
    }

    /// A short, bounded reason for metric labels and for choosing the HTTP status
    /// and OpenAI error type (never a free-form message; see [`Error::REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Candle(_) => "model",
            Error::Tokenizer(_) => "tokenizer",
            Error::Io { .. } => "io",
            Error::Json { .. } => "json",
            Error::InFile { source, .. } => source.reason(),
            Error::Unsupported(_) => "unsupported",
            Error::Checkpoint { .. } => "invalid_checkpoint",
            Error::Hub { .. } => "hub",
            Error::Template(_) => "template",
            Error::Tls(_) => "tls",
            Error::MissingFlag { .. } | Error::InvalidConfig(_) | Error::HttpClient(_) => {
                "invalid_config"
            }
            Error::Bind { .. } => "bind",
            Error::Task { .. } => "task_failed",
            Error::QueueFull => "queue_full",
            Error::EngineStopped => "engine_stopped",
            Error::EmptyInput | Error::ExpertOutOfRange { .. } => "invalid_input",
            Error::ContextExceeded { .. } => "context_length_exceeded",
            Error::ExpertNotLoaded(_) => "expert_not_loaded",
            Error::InvalidPlan(_) | Error::InvalidEndpoint { .. } => "invalid_plan",
            Error::PlanMismatch(_) => "plan_mismatch",
            Error::Wire(_) => "wire",
            Error::ConnectTimeout { .. } | Error::Connect { .. } | Error::Handshake { .. } => {
                "shard_unreachable"
            }
            Error::NoReplica { .. } | Error::ShardUnavailable { .. } => "shard_unavailable",
        }
    }

    /// Every value [`Error::reason`] returns.
    pub const REASONS: &[&str] = &[
        "model",
        "tokenizer",
        "io",
        "json",
        "unsupported",
        "invalid_checkpoint",
        "hub",
        "template",
        "invalid_config",
        "bind",
        "serve",
        "task_failed",
        "queue_full",
        "engine_stopped",
        "invalid_input",
        "context_length_exceeded",
        "expert_not_loaded",
        "invalid_plan",
        "plan_mismatch",
        "wire",
        "shard_unreachable",
        "shard_unavailable",
    ];
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_bounded_snake_case_labels() {
        for r in Error::REASONS {
            assert!(
                !r.is_empty() && r.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{r}"
            );
        }
        let samples = [
            Error::QueueFull,
            Error::EngineStopped,
            Error::EmptyInput,
            Error::Wire("x".into()),
            Error::InvalidPlan("x".into()).in_file("plan.json"),
            Error::ContextExceeded {
                tokens: 3,
                context: 2,
            },
            Error::NoReplica { shard: 1 },
        ];
        for e in &samples {
            assert!(Error::REASONS.contains(&e.reason()), "{e:?}");
        }
        assert_eq!(
            Error::InvalidPlan("shard 1 listed twice".into())
                .in_file("/p/plan.json")
                .to_string(),
            "/p/plan.json: invalid placement plan: shard 1 listed twice"
        );
    }
}
