//! The autoscaler's live loop: every `autoscaling.intervalSeconds` per InferenceService it
//! reads a snapshot from Prometheus and the cluster facts from the API server, asks the pure
//! core ([`crate::autoscaler::Autoscaler`]) for a decision, and writes it: replicas into the
//! service's status (`autoscaledReplicas`, which the InferenceService controller applies) and
//! through each Deployment's scale subresource, the expert placement through a staged
//! rollout, the forecast and reason into status, Events and `tidal_forecast_*` metrics.
//!
//! Missing or stale metrics never scale anything: the core holds the last decision and the
//! `MetricsAvailable` condition says why.

pub mod apply;
pub mod config;
pub mod fast;
pub mod observe;
pub mod plan;
pub mod promql;
pub mod rollout;
pub mod source;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tracing::{info, warn};

use self::observe::Caches;
use self::plan::{Deployments, Target, Targets, target_label};
use super::Context;
use crate::autoscaler::{Autoscaler, Config, Decision, FastPathConfig};
use crate::children::{ChildKind, LABEL_SERVICE};
use crate::crd::InferenceService;
use crate::error::Result;
use crate::metrics::{DecisionLabels, ServiceLabels, TargetLabels};

/// Field manager of the autoscaler's scale-subresource writes.
pub const AUTOSCALER_MANAGER: &str = "tidal-autoscaler";
/// How much history to read back from Prometheus at the loop's interval when a service's loop
/// starts (the forecaster's fine window).
const BACKFILL_SPAN_S: i64 = 2 * 3600;
/// Days of 10-minute buckets read back before that (the forecaster's coarse window: 4,032
/// points a series, well inside Prometheus' 11,000-point limit).
const BACKFILL_DAYS_S: i64 = 28 * 86400;

/// Operator-wide autoscaler settings (flags).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    /// Used when a spec names no `autoscaling.prometheusUrl`.
    pub prometheus_url: Option<String>,
    pub rate_window: String,
    pub default_ready_time_s: f64,
    /// The fast path on the workers' queues (`None`: off).
    pub fast_path: Option<FastPathConfig>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            prometheus_url: None,
            rate_window: "1m".into(),
            default_ready_time_s: 60.0,
            fast_path: Some(FastPathConfig::default()),
        }
    }
}

/// One service's loop state.
struct Loop {
    config: Config,
    /// The service's uid: one deleted and created again under its name starts afresh.
    uid: Option<String>,
    core: Autoscaler,
    next_due: Instant,
    /// When the fast path reads the workers next.
    next_fast: Instant,
    backfilled: bool,
    /// Pods whose time-to-ready has been recorded.
    seen_pods: HashSet<String>,
    /// Forecasts waiting for their horizon: (due unix time, predicted rps).
    pending_forecasts: VecDeque<(f64, f64)>,
    rollout: rollout::Tracker,
    metrics_available: Option<bool>,
    /// Advisory mode: the recommendations announced last tick (deployment -> (from, to)).
    announced: std::collections::BTreeMap<String, (u32, u32)>,
}

impl Loop {
    fn new(config: Config, uid: Option<String>) -> Self {
        Loop {
            core: Autoscaler::new(config.clone()),
            config,
            uid,
            next_due: Instant::now(),
            next_fast: Instant::now(),
            backfilled: false,
            seen_pods: HashSet::new(),
            pending_forecasts: VecDeque::new(),
            rollout: rollout::Tracker::default(),
            metrics_available: None,
            announced: Default::default(),
        }
    }
}

fn unix_now() -> f64 {
    Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// What the loop reads from the shared watches (stores only: it runs on a clock, not on
/// changes).
pub struct Inputs {
    services: Store<InferenceService>,
    deployments: Store<Deployment>,
}

pub fn inputs(shared: &super::caches::Shared) -> Inputs {
    Inputs {
        services: shared.inference_services.store(),
        deployments: shared.deployments.store(),
    }
}

/// Runs the loop until `shutdown` resolves. Only the leader runs it.
pub async fn run(
    ctx: Arc<Context>,
    inputs: Inputs,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    if !ctx.autoscale.enabled {
        info!("autoscaler disabled");
        shutdown.await;
        return;
    }
    let store = inputs.services;
    // Pods from a watch cache (only the autoscaler reads them), not a LIST per service per tick.
    let children = watcher::Config::default().labels(LABEL_SERVICE);
    let (pods, pod_stream) = super::cached(ctx.scoped_api::<Pod>(), children, super::strip::pod);
    let caches = Caches {
        deployments: inputs.deployments,
        pods,
    };
    let watches = [tokio::spawn(
        pod_stream.for_each(|_| futures::future::ready(())),
    )];
    let http = fast::http_client();
    let mut loops: HashMap<ObjectRef<InferenceService>, Loop> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        // Before the first full list an empty cache would read as "no replicas".
        if !super::synced(&caches.deployments) || !super::synced(&caches.pods) {
            continue;
        }
        let services = store.state();
        let mut due = Vec::new();
        let mut fast_due = Vec::new();
        let mut live = HashSet::new();
        for tis in services {
            let key = ObjectRef::from_obj(&*tis);
            let Some(cfg) = config::from_spec(&tis.spec, ctx.autoscale.default_ready_time_s) else {
                continue;
            };
            live.insert(key.clone());
            let uid = tis.metadata.uid.clone();
            let l = loops
                .entry(key.clone())
                .or_insert_with(|| Loop::new(cfg.clone(), uid.clone()));
            if l.config != cfg || l.uid != uid {
                // New settings (or a new object): a fresh core, history read back again.
                info!(service = %key, "autoscaling settings changed; restarting its loop");
                *l = Loop::new(cfg, uid);
            }
            if l.next_due <= Instant::now() {
                l.next_due = Instant::now() + Duration::from_secs_f64(l.config.interval_s);
                due.push(tis);
            } else if let Some(f) = ctx.autoscale.fast_path
                && l.next_fast <= Instant::now()
            {
                // Between slow ticks (the first tick is a slow one). It needs no Prometheus:
                // it also acts while the slow path holds for missing metrics (only upwards).
                l.next_fast = Instant::now() + Duration::from_secs_f64(f.interval_s);
                fast_due.push(tis);
            }
        }
        loops.retain(|k, _| live.contains(k));
        let work = due.into_iter().filter_map(|tis| {
            let key = ObjectRef::from_obj(&*tis);
            let l = loops.remove(&key)?;
            let ctx = ctx.clone();
            let caches = &caches;
            Some(async move {
                let mut l = l;
                if let Err(e) = tick_one(&ctx, caches, &tis, &mut l).await {
                    warn!(service = %key, error = %e, "autoscaler tick failed");
                    ctx.metrics
                        .observe_reconcile("autoscaler", Duration::ZERO, Some(e.reason()));
                }
                (key, l)
            })
        });
        let done: Vec<_> = futures::stream::iter(work)
            .buffer_unordered(8)
            .collect()
            .await;
        loops.extend(done);
        let fast = fast_due.into_iter().filter_map(|tis| {
            let key = ObjectRef::from_obj(&*tis);
            let mut l = loops.remove(&key)?;
            let (ctx, http, caches) = (ctx.clone(), &http, &caches);
            let cfg = ctx.autoscale.fast_path?;
            Some(async move {
                if let Err(e) = fast::tick(&ctx, http, &cfg, caches, &tis, &mut l).await {
                    warn!(service = %key, error = %e, "autoscaler fast path failed");
                    ctx.metrics.observe_reconcile(
                        "autoscaler-fast",
                        Duration::ZERO,
                        Some(e.reason()),
                    );
                }
                (key, l)
            })
        });
        let done: Vec<_> = futures::stream::iter(fast)
            .buffer_unordered(8)
            .collect()
            .await;
        loops.extend(done);
    }
    for w in watches {
        w.abort();
    }
}

/// One tick of one service, in three stages: observe (I/O -> facts), decide and plan (pure),
/// apply (the writes, status first).
async fn tick_one(
    ctx: &Context,
    caches: &Caches,
    tis: &InferenceService,
    l: &mut Loop,
) -> Result<()> {
    let name = tis.name_any();
    let obs = observe::observe(ctx, caches, tis, l).await?;
    let now = unix_now();
    let decision = l.core.step(now, obs.snapshot.as_ref().ok(), &obs.facts);

    let targets = plan::targets(&name, &obs.cloud_kind, &decision, &obs.sites_up);
    let advisory = config::advisory(&tis.spec);
    // Placement rollout: one stage per tick, gated on the shard Deployments' rollout; an
    // advisory autoscaler rolls out nothing (its plan is in the decision's reason).
    let shards = obs.facts.shards.len() as u32;
    let shards_ready: Vec<Option<String>> = (0..shards)
        .map(|k| {
            obs.deployments
                .rolled_out_holding(&ChildKind::ExpertShard(k).name(&name))
        })
        .collect();
    let placement = obs
        .placement_now
        .as_ref()
        .filter(|_| !advisory)
        .and_then(|current| {
            l.rollout.advance(
                current,
                decision.plan.as_ref(),
                &shards_ready,
                Instant::now(),
                Duration::from_secs_f64(l.config.interval_s.max(30.0)),
            )
        });
    let status = plan::status_patch(
        &obs.status,
        obs.generation,
        &super::now(),
        &decision,
        &obs.snapshot,
        &targets,
        placement.as_ref(),
        advisory,
    );
    let mut scales = plan::scale_writes(&decision, &targets, &obs.deployments);
    let notes = if advisory {
        // Recommended, announced, never written.
        let would_write = std::mem::take(&mut scales);
        let mut notes = plan::events(&[], None, l.metrics_available, &decision);
        notes.extend(plan::recommendations(&would_write, &mut l.announced));
        notes
    } else {
        l.announced.clear();
        plan::events(&scales, placement.as_ref(), l.metrics_available, &decision)
    };

    apply::status(ctx, tis, &status).await?;
    if let Some(p) = &placement {
        l.rollout.wrote(p);
    }
    apply::scales(ctx, tis, &scales).await?;
    apply::events(ctx, tis, &notes).await;
    l.metrics_available = Some(decision.metrics_available);
    record_metrics(ctx, tis, &decision, &targets, &obs.deployments, l, now);
    Ok(())
}

fn record_metrics(
    ctx: &Context,
    tis: &InferenceService,
    decision: &Decision,
    targets: &Targets,
    deps: &Deployments,
    l: &mut Loop,
    now: f64,
) {
    let (ns, name) = (tis.namespace().unwrap_or_default(), tis.name_any());
    let (ns, name) = (ns.as_str(), name.as_str());
    let m = &ctx.metrics.autoscaler;
    let svc = ServiceLabels {
        namespace: ns.into(),
        inference_service: name.into(),
    };
    let target = |t: &str| TargetLabels {
        namespace: ns.into(),
        inference_service: name.into(),
        target: t.into(),
    };
    m.metrics_available
        .get_or_create(&svc)
        .set(i64::from(decision.metrics_available));
    m.advisory
        .get_or_create(&svc)
        .set(i64::from(config::advisory(&tis.spec)));
    let mut direction = "hold";
    for (dep, Target { kind, replicas, .. }) in targets {
        let r = replicas;
        let t = target(&target_label(kind));
        m.desired_replicas.get_or_create(&t).set(i64::from(*r));
        let bound = match kind {
            ChildKind::Cloud | ChildKind::Router => Some(l.config.cloud.max),
            ChildKind::Edge(_) => l.config.edge.as_ref().map(|e| e.per_site.max),
            ChildKind::ExpertShard(_) => l.config.experts.as_ref().map(|x| x.per_shard.max),
        };
        if let Some(b) = bound {
            m.max_replicas.get_or_create(&t).set(i64::from(b));
        }
        let counts = deps.counts(dep);
        m.current_replicas
            .get_or_create(&t)
            .set(i64::from(counts.ready));
        if *r > counts.desired {
            direction = "up";
        } else if *r < counts.desired && direction == "hold" {
            direction = "down";
        }
    }
    if !decision.metrics_available {
        direction = "hold";
    }
    m.decisions
        .get_or_create(&DecisionLabels {
            namespace: ns.into(),
            inference_service: name.into(),
            direction,
        })
        .inc();
    if let Some(f) = decision.forecast {
        let t = target("cloud");
        m.observed_rps.get_or_create(&t).set(f.now);
        m.predicted_rps.get_or_create(&t).set(f.predicted);
        m.lower_rps.get_or_create(&t).set(f.lower);
        m.upper_rps.get_or_create(&t).set(f.upper);
        m.horizon_seconds.get_or_create(&t).set(f.horizon_s);
        if let Some(c) = f.calibration {
            m.upper_exceeded_ratio.get_or_create(&t).set(c.exceeded);
            m.band_coverage_ratio.get_or_create(&t).set(c.covered);
            m.upper_level.get_or_create(&t).set(c.upper_level);
        }
        // Score forecasts whose horizon has come.
        while let Some(&(due, predicted)) = l.pending_forecasts.front() {
            if due > now {
                break;
            }
            l.pending_forecasts.pop_front();
            if f.now > 0.05 {
                m.error_ratio
                    .get_or_create(&t)
                    .set((predicted - f.now).abs() / f.now);
            }
        }
        l.pending_forecasts
            .push_back((now + f.horizon_s, f.predicted));
        while l.pending_forecasts.len() > 10_000 {
            l.pending_forecasts.pop_front();
        }
    }
    if let Some(p) = &decision.plan {
        m.plan_imbalance.get_or_create(&svc).set(p.imbalance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripped_pods_keep_what_ready_times_and_the_fast_path_need() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m-cloud-1", "namespace": "prod", "uid": "p1",
                         "labels": {"tidal.rs/inference-service": "m"},
                         "annotations": {"big": "x".repeat(4096)},
                         "creationTimestamp": "2026-12-01T10:00:00Z",
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"containers": [{"name": "worker", "image": "tidal-worker"}]},
            "status": {"phase": "Running", "podIP": "198.18.0.7", "conditions": [
                {"type": "PodScheduled", "status": "True",
                 "lastTransitionTime": "2026-12-01T10:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T10:00:42Z",
                 "message": "ok"}]}
        }))
        .unwrap();
        super::super::strip::pod(&mut pod);
        assert!(pod.spec.is_none() && pod.metadata.annotations.is_none());
        assert!(pod.metadata.managed_fields.is_none());
        assert_eq!(pod.labels()["tidal.rs/inference-service"], "m");
        let conditions = pod.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1);
        // The fast path reads the worker at its IP.
        assert_eq!(
            pod.status.as_ref().unwrap().pod_ip.as_deref(),
            Some("198.18.0.7")
        );

        let pods = [Arc::new(pod)];
        let mut seen = HashSet::new();
        assert_eq!(observe::new_ready_times(&pods, &mut seen), [42.0]);
        // Counted once.
        assert!(observe::new_ready_times(&pods, &mut seen).is_empty());
    }
}
