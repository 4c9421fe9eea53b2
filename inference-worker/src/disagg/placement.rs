//! The expert placement plan (`plan.json`, written by the operator into a
//! ConfigMap): which shard serves which experts, and where its replicas are.
//!
//! ```json
//! {"version": 1, "numExperts": 8, "shards": [
//!   {"shard": 0, "experts": [0, 4], "endpoint": "http://svc-experts-0.ns.svc:8080", "replicas": 2},
//!   {"shard": 1, "experts": [1, 5], "endpoints": ["http://127.0.0.1:9101", "http://127.0.0.1:9102"]}
//! ]}
//! ```
//!
//! An expert may be listed by several shards (redundant copies of a hot expert);
//! the router then splits its tokens across them. `endpoints`, when present, lists
//! the replica addresses; otherwise the `endpoint` host is resolved through DNS to
//! all of its addresses (a headless Service), one replica each.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardSpec {
    pub shard: usize,
    pub experts: Vec<usize>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub replicas: Option<usize>,
    /// Experts the shard must load beyond `experts` while a new plan rolls out (the operator
    /// warms a shard before routers send it an expert, and keeps an expert loaded until
    /// routers have moved off it). Routers ignore it.
    #[serde(default)]
    pub held: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    #[serde(default)]
    pub version: u64,
    pub num_experts: usize,
    pub shards: Vec<ShardSpec>,
}

impl Plan {
    pub fn parse(text: &str) -> Result<Self> {
        let plan: Plan =
            serde_json::from_str(text).map_err(|e| Error::InvalidPlan(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| e.in_file(path))
    }

    fn validate(&self) -> Result<()> {
        // Expert ids travel as u16 on the wire (one value marks an empty slot); a larger
        // count is a corrupt plan, and would size per-expert tables by it.
        let max = usize::from(crate::disagg::wire::EMPTY_SLOT);
        if self.num_experts == 0 || self.num_experts > max {
            return Err(Error::InvalidPlan(format!(
                "numExperts {} is outside 1..={max}",
                self.num_experts
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.shards {
            if !seen.insert(s.shard) {
                return Err(Error::InvalidPlan(format!(
                    "shard {} listed twice",
                    s.shard
                )));
            }
            if let Some(e) = s
                .experts
                .iter()
                .chain(&s.held)
                .find(|&&e| e >= self.num_experts)
            {
                return Err(Error::InvalidPlan(format!(
                    "shard {} lists expert {e} but numExperts is {}",
                    s.shard, self.num_experts
                )));
            }
            let has_endpoints = s.endpoints.as_ref().is_some_and(|v| !v.is_empty());
            if !has_endpoints && s.endpoint.as_deref().is_none_or(str::is_empty) {
                return Err(Error::InvalidPlan(format!(
                    "shard {} has no endpoint",
                    s.shard
                )));
            }
        }
        Ok(())
    }

    /// Checks that every expert of a model with `num_experts` experts is served.
    pub fn check_covers(&self, num_experts: usize) -> Result<()> {
        if self.num_experts != num_experts {
            return Err(Error::PlanMismatch(format!(
                "placement plan is for {} experts but the model has {num_experts}",
                self.num_experts
            )));
        }
        let missing: Vec<usize> = (0..num_experts)
            .filter(|e| self.holders(*e).is_empty())
            .collect();
        if !missing.is_empty() {
            return Err(Error::PlanMismatch(format!(
                "placement plan version {} assigns no shard to experts {missing:?}",
                self.version
            )));
        }
        Ok(())
    }

    /// Shards (ascending) that serve `expert`.
    pub fn holders(&self, expert: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .shards
            .iter()
            .filter(|s| s.experts.contains(&expert))
            .map(|s| s.shard)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn shard(&self, shard: usize) -> Option<&ShardSpec> {
        self.shards.iter().find(|s| s.shard == shard)
    }

    /// The experts shard `shard` keeps loaded: the ones it serves plus any it holds for a
    /// plan rollout.
    pub fn loads_of(&self, shard: usize) -> Vec<usize> {
        let mut v = self.experts_of(shard);
        if let Some(s) = self.shard(shard) {
            v.extend(s.held.iter().copied());
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The experts shard `shard` serves (empty when the plan does not list it).
    pub fn experts_of(&self, shard: usize) -> Vec<usize> {
        let mut v = self
            .shard(shard)
            .map(|s| s.experts.clone())
            .unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Where a shard endpoint URL points: `host:port` to connect to, and for `https://` the
/// host name the shard's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub authority: String,
    pub tls_host: Option<String>,
}

/// Parses `http://host[:port][/...]` (port 80 by default) or `https://...` (port 443).
pub fn endpoint(url: &str) -> Result<Endpoint> {
    let (rest, tls, port) = if let Some(r) = url.strip_prefix("http://") {
        (r, false, 80)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, true, 443)
    } else {
        return Err(Error::InvalidEndpoint {
            url: url.to_string(),
            problem: "must start with http:// or https://",
        });
    };
    let auth = rest.split('/').next().unwrap_or_default();
    if auth.is_empty() {
        return Err(Error::InvalidEndpoint {
            url: url.to_string(),
            problem: "has no host",
        });
    }
    let (host, has_port) = if let Some(after) = auth.strip_prefix('[') {
        let host = after.split(']').next().unwrap_or_default();
        (host, after.contains("]:"))
    } else {
        let mut parts = auth.splitn(2, ':');
        (parts.next().unwrap_or_default(), auth.contains(':'))
    };
    Ok(Endpoint {
        authority: if has_port {
            auth.to_string()
        } else {
            format!("{auth}:{port}")
        },
        tls_host: tls.then(|| host.to_string()),
    })
}

/// Watches a plan file: polls its content (following symlinks, as Kubernetes swaps
/// a ConfigMap volume's `..data` link) and swaps in every valid new version. An
/// invalid or unreadable file keeps the previous plan.
pub struct PlanFile {
    path: PathBuf,
    current: RwLock<(Arc<Plan>, String)>,
}

impl PlanFile {
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let plan = Plan::parse(&text).map_err(|e| e.in_file(path))?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            current: RwLock::new((Arc::new(plan), text)),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Arc<Plan> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Re-reads the file; `Ok(Some(plan))` when it changed to a valid new plan that
    /// `accept` agrees to.
    pub fn poll(&self, accept: impl Fn(&Plan) -> Result<()>) -> Result<Option<Arc<Plan>>> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| Error::io(&self.path, e))?;
        if text == self.current.read().unwrap_or_else(|e| e.into_inner()).1 {
            return Ok(None);
        }
        let plan = Plan::parse(&text)?;
        accept(&plan)?;
        let plan = Arc::new(plan);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (plan.clone(), text);
        Ok(Some(plan))
    }

    /// Polls every `every` on the current tokio runtime and calls `on_change` with
    /// each new plan until the returned task is aborted.
    pub fn watch<F, A>(
        self: &Arc<Self>,
        every: Duration,
        accept: A,
        on_change: F,
    ) -> tokio::task::JoinHandle<()>
    where
        A: Fn(&Plan) -> Result<()> + Send + Sync + 'static,
        F: Fn(Arc<Plan>) + Send + Sync + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last_err = String::new();
            loop {
                tokio::time::sleep(every).await;
                match me.poll(&accept) {
                    Ok(Some(plan)) => {
                        tracing::info!(version = plan.version, path = %me.path.display(), "placement plan reloaded");
                        last_err.clear();
                        on_change(plan);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_err {
                            tracing::warn!(error = %msg, "placement plan not reloaded; keeping the previous one");
                            last_err = msg;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_operator_format_and_checks_coverage() {
        let p = Plan::parse(
            r#"{"version": 3, "numExperts": 4, "shards": [
            {"shard": 0, "experts": [0, 2], "endpoint": "http://svc-0.ns.svc:8080", "replicas": 2},
            {"shard": 1, "experts": [1, 3, 2], "endpoints": ["http://127.0.0.1:9101"]}]}"#,
        )
        .unwrap();
        assert_eq!(p.holders(2), vec![0, 1]);
        assert_eq!(p.experts_of(1), vec![1, 2, 3]);
        let rolling = Plan::parse(
            r#"{"numExperts": 4, "shards": [
            {"shard": 0, "experts": [0, 1], "held": [0, 1, 2], "endpoint": "http://a"},
            {"shard": 1, "experts": [2, 3], "endpoint": "http://b"}]}"#,
        )
        .unwrap();
        assert_eq!(
            rolling.loads_of(0),
            vec![0, 1, 2],
            "held experts are loaded"
        );
        assert_eq!(rolling.holders(2), vec![1], "but not routed to");
        p.check_covers(4).unwrap();
        assert!(p.check_covers(5).is_err());
        let missing = Plan::parse(
            r#"{"numExperts": 2, "shards": [{"shard": 0, "experts": [0], "endpoint": "http://a"}]}"#,
        )
        .unwrap();
        assert!(
            missing
                .check_covers(2)
                .unwrap_err()
                .to_string()
                .contains("[1]")
        );
        assert!(Plan::parse(r#"{"numExperts": 2, "shards": [{"shard": 0, "experts": [2], "endpoint": "http://a"}]}"#).is_err());
        let authority = |url: &str| endpoint(url).map(|e| e.authority);
        assert_eq!(
            authority("http://svc-0.ns.svc:8080/x").unwrap(),
            "svc-0.ns.svc:8080"
        );
        assert_eq!(authority("http://svc").unwrap(), "svc:80");
        assert_eq!(authority("http://[::1]:9").unwrap(), "[::1]:9");
        assert!(authority("ftp://x").is_err());
        assert_eq!(
            endpoint("https://svc-0.ns.svc:8443/x").unwrap(),
            Endpoint {
                authority: "svc-0.ns.svc:8443".into(),
                tls_host: Some("svc-0.ns.svc".into())
            }
        );
        assert_eq!(authority("https://svc").unwrap(), "svc:443");
        assert_eq!(endpoint("http://svc").unwrap().tls_host, None);
    }
}
