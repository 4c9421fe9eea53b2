//! What a controller last wrote to an object, until its cache shows it.
//!
//! Under load a watch event can trail the write that caused it by seconds, and a reconcile
//! triggered meanwhile (a Lease renewal, a child's event) would compare against the old cached
//! object and send the same write again (at 2,000 sites: hundreds of repeated Node label applies
//! and status writes, each one a request the API server must serve). Each write is remembered
//! with the resourceVersion the cached object had when it was decided; while the cache still
//! holds that version, the remembered value is what the object holds. Any other version (the
//! write's own echo, or a later change by anyone) supersedes it.

use std::collections::HashMap;
use std::sync::Mutex;

pub struct Written<T> {
    entries: Mutex<HashMap<String, Entry<T>>>,
}

struct Entry<T> {
    decided_at: Option<String>,
    value: T,
}

impl<T: Clone> Default for Written<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone> Written<T> {
    /// The value written to `key` while the cache is still at the version it was decided on
    /// (`cached_version`); `None` when the cache is to be believed.
    pub fn pending(&self, key: &str, cached_version: Option<&str>) -> Option<T> {
        let mut entries = self.entries.lock().expect("written: poisoned");
        match entries.get(key) {
            Some(e) if e.decided_at.as_deref() == cached_version => Some(e.value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers that `value` was written to `key`, decided on the cached version `decided_at`.
    pub fn record(&self, key: &str, decided_at: Option<&str>, value: T) {
        self.entries.lock().expect("written: poisoned").insert(
            key.to_owned(),
            Entry {
                decided_at: decided_at.map(str::to_owned),
                value,
            },
        );
    }

    /// Drops what was remembered for `key` (the object is gone, or a write failed).
    pub fn forget(&self, key: &str) {
        self.entries.lock().expect("written: poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::Written;

    #[test]
    fn a_write_stands_until_the_cache_moves_past_the_version_it_was_decided_on() {
        let w = Written::default();
        assert_eq!(w.pending("a", Some("1")), None::<u32>);
        w.record("a", Some("1"), 7);
        // The cache still shows version 1: the write has not come back yet.
        assert_eq!(w.pending("a", Some("1")), Some(7));
        assert_eq!(w.pending("b", Some("1")), None);
        // Version 2 is the write's echo (or someone else's later change): the cache wins, and
        // the entry is gone even if the cache went back to an old version somehow.
        assert_eq!(w.pending("a", Some("2")), None);
        assert_eq!(w.pending("a", Some("1")), None);
    }

    #[test]
    fn forgetting_makes_the_cache_authoritative_again() {
        let w = Written::default();
        w.record("a", Some("1"), "x");
        w.forget("a");
        assert_eq!(w.pending("a", Some("1")), None);
    }
}
