//! Optional API-key authentication of the OpenAI endpoints (`/v1/*`): a request must carry
//! `Authorization: Bearer <key>` with one of the keys in a file (one per line; blank lines
//! and `#` comments ignored), typically a mounted Kubernetes Secret. Health, readiness and
//! metrics stay open for probes and Prometheus.
//!
//! The file is re-read when it changes ([`Reloading`]), so a rotated Secret takes effect
//! without a restart; a file that becomes unreadable or empty keeps the previous keys.

use crate::error::{Error, Result};
use crate::serve::api::ApiError;
use crate::serve::reload::Reloading;
use axum::http::{HeaderMap, StatusCode, header};
use std::path::{Path, PathBuf};

pub struct ApiKeys {
    keys: Reloading<Vec<String>>,
}

impl std::fmt::Debug for ApiKeys {
    // Never the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("path", &self.keys.paths[0])
            .finish_non_exhaustive()
    }
}

fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn read(paths: &[PathBuf]) -> Result<Vec<String>> {
    let path = &paths[0];
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let keys = parse(&text);
    if keys.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "the API keys file {} holds no key",
            path.display()
        )));
    }
    Ok(keys)
}

/// Compares without an early exit on the first differing byte, so the time taken does not
/// tell how much of a guessed key was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    /// Reads the keys; a missing, unreadable or empty file is an error (a worker told to
    /// require keys must not start open).
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            keys: Reloading::open("API keys", vec![path.to_path_buf()], read)?,
        })
    }

    /// Whether `key` is one of the current keys.
    pub fn accepts(&self, key: &str) -> bool {
        // Every key is compared (no early exit), like each byte.
        self.keys
            .get()
            .iter()
            .fold(false, |ok, k| same(k.as_bytes(), key.as_bytes()) | ok)
    }

    /// The key this worker presents to another Tidal worker (edge -> cloud escalation):
    /// the first in the file, which both tiers of a service share.
    pub fn own_key(&self) -> String {
        self.keys.get().first().cloned().unwrap_or_default()
    }

    /// Checks a request's headers: `Ok` when they carry an accepted bearer key.
    pub fn check(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match presented {
            None => Err(unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            )),
            Some(k) if self.accepts(k) => Ok(()),
            Some(_) => Err(unauthorized("Incorrect API key provided.")),
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: Some("invalid_api_key"),
        ..ApiError::invalid(None, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn keys_are_checked_rotated_and_kept_when_the_file_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# service keys\nsk-one\n\n  sk-two  \n").unwrap();
        let keys = ApiKeys::open(&path).unwrap();
        assert!(keys.check(&headers(Some("Bearer sk-one"))).is_ok());
        assert!(keys.check(&headers(Some("Bearer sk-two"))).is_ok());
        let e = keys.check(&headers(None)).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
        );
        for bad in [
            "Bearer sk-on",
            "Bearer sk-one1",
            "Basic sk-one",
            "sk-one",
            "Bearer ",
        ] {
            assert!(keys.check(&headers(Some(bad))).is_err(), "{bad}");
        }
        assert_eq!(keys.own_key(), "sk-one");

        // Rotation: a new file content (other size) is taken at the next check.
        std::fs::write(&path, "sk-three-new\n").unwrap();
        assert!(keys.check(&headers(Some("Bearer sk-three-new"))).is_ok());
        assert!(keys.check(&headers(Some("Bearer sk-one"))).is_err());
        // An emptied or removed file keeps the last keys rather than opening the API.
        std::fs::write(&path, "\n# none\n").unwrap();
        assert!(keys.check(&headers(Some("Bearer sk-three-new"))).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(keys.check(&headers(Some("Bearer sk-three-new"))).is_ok());
        assert!(keys.check(&headers(None)).is_err());
    }

    #[test]
    fn a_worker_told_to_require_keys_does_not_start_without_any() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        assert!(ApiKeys::open(&path).is_err());
        std::fs::write(&path, "# nothing yet\n").unwrap();
        let e = ApiKeys::open(&path).err().unwrap().to_string();
        assert!(e.contains("holds no key"), "{e}");
    }
}
