//! A value loaded from files that a mounted Kubernetes Secret keeps current (API keys,
//! certificates): re-read on use when a file's size or modification time has changed (a
//! `stat` each), so a rotated Secret applies without a restart. A change that does not load
//! (a bad or empty file) keeps the last good value and is reported once per change.

use crate::error::Result;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// What the files looked like when last read.
type Stamp = Vec<Option<(u64, Option<SystemTime>)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        })
        .collect()
}

pub struct Reloading<T> {
    /// For the log lines: what is being reloaded.
    what: &'static str,
    pub(crate) paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<T>,
    current: RwLock<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    /// Loads now; an error here is the caller's (a worker must not start without it).
    pub fn open(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<T>,
    ) -> Result<Self> {
        let seen = stamp(&paths);
        let value = load(&paths)?;
        Ok(Self {
            what,
            paths,
            load,
            current: RwLock::new((seen, Arc::new(value))),
        })
    }

    /// The current value, re-read first if the files changed.
    pub fn get(&self) -> Arc<T> {
        let now = stamp(&self.paths);
        let changed = self.current.read().unwrap_or_else(|e| e.into_inner()).0 != now;
        if changed {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            if current.0 != now {
                match (self.load)(&self.paths) {
                    Ok(v) => {
                        tracing::info!(files = ?self.paths, "{} reloaded", self.what);
                        current.1 = Arc::new(v);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{} changed but do not load; keeping the last good ones", self.what)
                    }
                }
                // Remembered either way: a bad change is reported once, and a later write
                // (the key after the certificate) changes the stamp again.
                current.0 = now;
            }
        }
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}
