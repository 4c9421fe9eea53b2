//! Optional API-key authentication of the OpenAI endpoints (`/v1/*`): a request must carry
//! `Authorization: Bearer <key>` with one of the keys in a file (one per line; blank lines
//! and `#` comments ignored), typically a mounted Kubernetes Secret. Health, readiness and
//! metrics stay open for probes and Prometheus.
//!
//! The file is re-read when its modification time or size changes (checked on each
//! request, a `stat`), so a rotated Secret takes effect without a restart; a file that
//! becomes unreadable or empty keeps the previous keys.

use crate::error::{Error, Result};
use crate::serve::api::ApiError;
use axum::http::{HeaderMap, StatusCode, header};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

/// What identifies a version of the keys file.
type Stamp = Option<(SystemTime, u64)>;

pub struct ApiKeys {
    path: PathBuf,
    state: RwLock<(Stamp, Vec<String>)>,
}

impl std::fmt::Debug for ApiKeys {
    // Never the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn read(path: &Path) -> Result<Vec<String>> {
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
        let keys = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            state: RwLock::new((stamp(path), keys)),
        })
    }

    fn refresh(&self) {
        let now = stamp(&self.path);
        if now == self.state.read().unwrap_or_else(|e| e.into_inner()).0 {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match read(&self.path) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "API keys reloaded");
                *state = (now, keys);
            }
            Err(e) => {
                // Remembered, so the warning comes once per change of the file.
                state.0 = now;
                tracing::warn!(error = %e, "API keys not reloaded; keeping the previous ones");
            }
        }
    }

    /// Whether `key` is one of the current keys.
    pub fn accepts(&self, key: &str) -> bool {
        self.refresh();
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        // Every key is compared (no early exit), like each byte.
        state
            .1
            .iter()
            .fold(false, |ok, k| same(k.as_bytes(), key.as_bytes()) | ok)
    }

    /// The key this worker presents to another Tidal worker (edge -> cloud escalation):
    /// the first in the file, which both tiers of a service share.
    pub fn own_key(&self) -> String {
        self.refresh();
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.1.first().cloned().unwrap_or_default()
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
