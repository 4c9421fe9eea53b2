//! The fast path's I/O (the decision is the core's, `tidal_autoscaler::fast`): every
//! `--fast-path-interval-seconds` between the slow ticks, each ready worker pod's own
//! `/metrics` is read for its queue depth (`tidal_worker_queue_depth`), summed per target
//! (the cloud tier, each edge site), and a sustained backlog scales that target up at once —
//! status, scale subresource and an `Autoscaled` Event as the slow path writes them (in
//! advisory mode a `Recommendation` only). Seconds instead of a Prometheus rate window.
//!
//! Workers that serve TLS are skipped (the operator holds no client certificate of theirs):
//! such services keep the slow path alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::observe::{Caches, cloud_kind, of_service, ready_condition, sites_up};
use super::plan::{self, Deployments, ScaleWrite};
use super::{Loop, apply, unix_now};
use crate::autoscaler::{FastPathConfig, WorkerLoad};
use crate::children::{ChildKind, LABEL_EDGE_NODE, LABEL_ROLE, LABEL_TIER, WORKER_PORT};
use crate::controller::Context;
use crate::crd::InferenceService;
use crate::error::Result;
use crate::metrics::TargetLabels;

/// One worker's `/metrics` must answer within this (a hung pod must not stall the loop).
const READ_TIMEOUT: Duration = Duration::from_millis(800);
/// Workers read at once per target.
const READS_IN_FLIGHT: usize = 16;
/// The gauge read.
const QUEUE_GAUGE: &str = "tidal_worker_queue_depth";

/// Ready pod IPs of one service, per target: the cloud tier (full or router workers) and
/// each edge site.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workers {
    pub cloud: Vec<String>,
    pub sites: BTreeMap<String, Vec<String>>,
}

/// The service's ready worker pods with an IP, grouped by target (expert shards are not
/// request queues: left out).
pub fn workers<'a>(pods: impl IntoIterator<Item = &'a Arc<Pod>>) -> Workers {
    let mut out = Workers::default();
    for p in pods {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        let (Some(ip), true) = (ip, ready_condition(p).is_some()) else {
            continue;
        };
        let labels = p.labels();
        if labels.get(LABEL_ROLE).is_some_and(|r| r == "expert") {
            continue;
        }
        match labels.get(LABEL_TIER).map(String::as_str) {
            Some("cloud") => out.cloud.push(ip),
            Some("edge") => {
                if let Some(site) = labels.get(LABEL_EDGE_NODE) {
                    out.sites.entry(site.clone()).or_default().push(ip);
                }
            }
            _ => {}
        }
    }
    out.cloud.sort();
    for ips in out.sites.values_mut() {
        ips.sort();
    }
    out
}

/// The client the fast path reads workers with (plain HTTP inside the cluster).
pub(super) fn http_client() -> reqwest::Client {
    // reqwest is built without a bundled crypto provider; ring (kube's) is the process's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(READ_TIMEOUT)
        .build()
        .expect("a reqwest client with the process's crypto provider")
}

/// The queue depth in one worker's Prometheus text exposition, if it has the gauge.
pub fn queue_depth(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(QUEUE_GAUGE)?;
        // The exact name (not a longer one sharing the prefix), with or without labels.
        let rest = match rest.as_bytes().first()? {
            b' ' => rest,
            b'{' => &rest[rest.find('}')? + 1..],
            _ => return None,
        };
        rest.split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
    })
}

/// Reads the workers at `ips` on `port`: (requests waiting, workers that answered). `None`
/// when none answered (nothing is decided on no data).
async fn read(http: &reqwest::Client, ips: &[String], port: i32) -> Option<(f64, u32)> {
    // Owned addresses and client per read: a stream of futures borrowing from the slice would
    // make the loop's future `Send` only for some lifetimes (it is spawned).
    let reads = futures::stream::iter(ips.iter().cloned().map(|ip| {
        let http = http.clone();
        async move {
            let url = if ip.contains(':') {
                format!("http://[{ip}]:{port}/metrics")
            } else {
                format!("http://{ip}:{port}/metrics")
            };
            let text = tokio::time::timeout(READ_TIMEOUT, async {
                http.get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            })
            .await
            .ok()?
            .ok()?;
            queue_depth(&text)
        }
    }))
    .buffer_unordered(READS_IN_FLIGHT)
    .collect::<Vec<_>>()
    .await;
    let got: Vec<f64> = reads.into_iter().flatten().collect();
    (!got.is_empty()).then(|| (got.iter().sum(), got.len() as u32))
}

/// One fast-path reading of one service and the writes a sustained backlog asks for.
pub(super) async fn tick(
    ctx: &Context,
    http: &reqwest::Client,
    cfg: &FastPathConfig,
    caches: &Caches,
    tis: &InferenceService,
    l: &mut Loop,
) -> Result<()> {
    if tis.spec.tls.is_some() {
        return Ok(());
    }
    let (name, ns) = (tis.name_any(), tis.namespace().unwrap_or_default());
    let cloud_kind = cloud_kind(tis);
    let all_pods = caches.pods.state();
    let mut w = workers(of_service(&all_pods, &ns, &name));
    // A site that is not up is not read (its pods would only time out) nor scaled, as in the
    // slow path.
    let up = sites_up(tis.status.as_ref().unwrap_or(&Default::default()));
    w.sites
        .retain(|site, _| up.get(site).copied().unwrap_or(false));
    let all_deployments = caches.deployments.state();
    let deps = Deployments::from_objects(of_service(&all_deployments, &ns, &name).map(|d| &**d));
    let now = unix_now();
    let load = |read: Option<(f64, u32)>, kind: &ChildKind| {
        read.map(|(waiting, answered)| WorkerLoad {
            time_s: now,
            waiting,
            ready: answered,
            desired: deps.counts(&kind.name(&name)).desired,
        })
    };
    // Every target at once: a silent one costs one timeout, not one per target.
    let (cloud, sites) = futures::join!(
        read(http, &w.cloud, WORKER_PORT),
        futures::future::join_all(w.sites.values().map(|ips| read(http, ips, WORKER_PORT)))
    );
    let cloud = load(cloud, &cloud_kind);
    let sites: BTreeMap<String, WorkerLoad> = w
        .sites
        .keys()
        .zip(sites)
        .filter_map(|(site, r)| Some((site.clone(), load(r, &ChildKind::Edge(site.clone()))?)))
        .collect();
    let d = l.core.fast_step(now, cfg, cloud, &sites);
    let raises = d
        .cloud
        .map(|s| (cloud_kind.clone(), s))
        .into_iter()
        .chain(d.edge.into_iter().map(|(n, s)| (ChildKind::Edge(n), s)));
    let writes: Vec<ScaleWrite> = raises
        .filter_map(|(kind, s)| {
            let dep = kind.name(&name);
            let current = deps.0.get(&dep)?.replicas;
            (s.replicas > current).then_some(ScaleWrite {
                deployment: dep,
                kind,
                from: current,
                to: s.replicas,
                reason: s.reason,
            })
        })
        .collect();
    if writes.is_empty() {
        return Ok(());
    }
    let advisory = super::config::advisory(&tis.spec);
    let field = if advisory {
        "recommendedReplicas"
    } else {
        "autoscaledReplicas"
    };
    let replicas: BTreeMap<&str, u32> = writes
        .iter()
        .map(|w| (w.deployment.as_str(), w.to))
        .collect();
    let patch = serde_json::json!({ "status": { field: replicas } });
    apply::status(ctx, tis, &patch).await?;
    let notes = if advisory {
        plan::recommendations(&writes, &mut l.announced)
    } else {
        apply::scales(ctx, tis, &writes).await?;
        plan::scale_notes(&writes)
    };
    apply::events(ctx, tis, &notes).await;
    for w in &writes {
        ctx.metrics
            .autoscaler
            .fast_scale_ups
            .get_or_create(&TargetLabels {
                namespace: ns.clone(),
                inference_service: name.clone(),
                target: plan::target_label(&w.kind),
            })
            .inc();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gauge_is_read_by_its_exact_name() {
        let text = "# HELP tidal_worker_queue_depth_max x\n\
                    tidal_worker_queue_depth_max 99\n\
                    # TYPE tidal_worker_queue_depth gauge\n\
                    tidal_worker_queue_depth 7\n\
                    vllm:num_requests_waiting 7\n";
        assert_eq!(queue_depth(text), Some(7.0));
        assert_eq!(
            queue_depth("tidal_worker_queue_depth{pod=\"a\"} 3.5\n"),
            Some(3.5)
        );
        assert_eq!(queue_depth("tidal_worker_running_requests 4\n"), None);
        assert_eq!(queue_depth("tidal_worker_queue_depth NaN\n"), None);
    }

    #[test]
    fn ready_workers_are_grouped_by_target_and_shards_left_out() {
        let pod = |name: &str, labels: serde_json::Value, ip: Option<&str>, ready: bool| {
            let p: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "prod", "labels": labels},
                "status": {"podIP": ip, "conditions": [
                    {"type": "Ready", "status": if ready { "True" } else { "False" }}]}
            }))
            .unwrap();
            Arc::new(p)
        };
        let pods = [
            pod(
                "c1",
                serde_json::json!({"tidal.rs/tier": "cloud", "tidal.rs/role": "full"}),
                Some("198.18.0.9"),
                true,
            ),
            pod(
                "c0",
                serde_json::json!({"tidal.rs/tier": "cloud", "tidal.rs/role": "router"}),
                Some("198.18.0.8"),
                true,
            ),
            pod(
                "c2",
                serde_json::json!({"tidal.rs/tier": "cloud"}),
                Some("198.18.0.7"),
                false,
            ),
            pod(
                "c3",
                serde_json::json!({"tidal.rs/tier": "cloud"}),
                None,
                true,
            ),
            pod(
                "x",
                serde_json::json!({"tidal.rs/tier": "cloud", "tidal.rs/role": "expert"}),
                Some("198.18.0.6"),
                true,
            ),
            pod(
                "e",
                serde_json::json!({"tidal.rs/tier": "edge", "tidal.rs/edge-node": "store-1"}),
                Some("198.18.1.2"),
                true,
            ),
        ];
        let w = workers(&pods);
        assert_eq!(w.cloud, ["198.18.0.8", "198.18.0.9"]);
        assert_eq!(
            w.sites,
            BTreeMap::from([("store-1".to_string(), vec!["198.18.1.2".to_string()])])
        );
    }

    #[tokio::test]
    async fn workers_are_read_over_http_and_silent_ones_skipped() {
        // Two real HTTP servers on loopback addresses sharing one port (as worker pods share
        // theirs), a third address where nothing listens.
        let serve = |addr: String, depth: u32| async move {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || async move {
                    format!(
                        "# TYPE tidal_worker_queue_depth gauge\ntidal_worker_queue_depth {depth}\n"
                    )
                }),
            );
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
            i32::from(port)
        };
        let port = serve("127.0.0.2:0".into(), 3).await;
        serve(format!("127.0.0.3:{port}"), 5).await;
        let http = http_client();
        let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"].map(String::from);
        assert_eq!(read(&http, &ips, port).await, Some((8.0, 2)));
        assert_eq!(read(&http, &ips[2..], port).await, None);
    }
}
