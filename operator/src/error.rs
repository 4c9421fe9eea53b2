//! The operator's one error type. `reason()` is a bounded label for metrics.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("serialization error: {0}")]
    Serde(#[from] serde_json::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("leader election: {0}")]
    Leader(String),
}

impl Error {
    /// A short, bounded reason for metric labels (never a free-form message).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 => "invalid",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::MissingField(_) => "missing_field",
            Error::Serde(_) => "serde",
            Error::Io(_) => "io",
            Error::Leader(_) => "leader_election",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
