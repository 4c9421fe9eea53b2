//! The autoscaler's live loop: every `autoscaling.intervalSeconds` per InferenceService it
//! reads a snapshot from Prometheus and the cluster facts from the API server, asks the pure
//! core ([`crate::autoscaler::Autoscaler`]) for a decision, and writes it: replicas into the
//! service's status (`autoscaledReplicas`, which the InferenceService controller applies) and
//! through each Deployment's scale subresource, the expert placement through a staged
//! rollout, the forecast and reason into status, Events and `tidal_forecast_*` metrics.
//!
//! Missing or stale metrics never scale anything: the core holds the last decision and the
//! `MetricsAvailable` condition says why.

pub mod config;
pub mod promql;
pub mod rollout;
pub mod source;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, warn};

use self::promql::Scope;
use self::source::{Source, Unavailable};
use super::Context;
use crate::autoscaler::{Autoscaler, ClusterFacts, Config, Decision, ReplicaCounts};
use crate::children::{ANNOTATION_HELD_EXPERTS, ChildKind, LABEL_SERVICE};
use crate::crd::{
    DecisionStatus, DesiredCondition, ForecastStatus, InferenceService, condition_type as ct,
    merge_conditions,
};
use crate::error::Result;
use crate::metrics::{DecisionLabels, ServiceLabels, TargetLabels};

/// Field manager of the autoscaler's scale-subresource writes.
pub const AUTOSCALER_MANAGER: &str = "tidal-autoscaler";
/// How much history to read back from Prometheus when a service's loop starts.
const BACKFILL_SPAN_S: i64 = 2 * 3600;

/// Operator-wide autoscaler settings (flags).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    /// Used when a spec names no `autoscaling.prometheusUrl`.
    pub prometheus_url: Option<String>,
    pub rate_window: String,
    pub default_ready_time_s: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            prometheus_url: None,
            rate_window: "1m".into(),
            default_ready_time_s: 60.0,
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
    backfilled: bool,
    /// Pods whose time-to-ready has been recorded.
    seen_pods: HashSet<String>,
    /// Forecasts waiting for their horizon: (due unix time, predicted rps).
    pending_forecasts: VecDeque<(f64, f64)>,
    rollout: rollout::Tracker,
    metrics_available: Option<bool>,
}

impl Loop {
    fn new(config: Config, uid: Option<String>) -> Self {
        Loop {
            core: Autoscaler::new(config.clone()),
            config,
            uid,
            next_due: Instant::now(),
            backfilled: false,
            seen_pods: HashSet::new(),
            pending_forecasts: VecDeque::new(),
            rollout: rollout::Tracker::default(),
            metrics_available: None,
        }
    }
}

fn unix_now() -> f64 {
    Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// Runs the loop until `shutdown` resolves. Only the leader runs it.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send) {
    if !ctx.autoscale.enabled {
        info!("autoscaler disabled");
        shutdown.await;
        return;
    }
    let (store, writer) = reflector::store::<InferenceService>();
    let refl = reflector::reflector(
        writer,
        watcher(
            ctx.scoped_api::<InferenceService>(),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    let refl = tokio::spawn(refl);
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let mut loops: HashMap<ObjectRef<InferenceService>, Loop> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let services = store.state();
        let mut due = Vec::new();
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
            }
        }
        loops.retain(|k, _| live.contains(k));
        let work = due.into_iter().filter_map(|tis| {
            let key = ObjectRef::from_obj(&*tis);
            let l = loops.remove(&key)?;
            let ctx = ctx.clone();
            let recorder = &recorder;
            Some(async move {
                let mut l = l;
                if let Err(e) = tick_one(&ctx, recorder, &tis, &mut l).await {
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
    }
    refl.abort();
}

/// Deployments of one service, by name: (spec replicas, ready, the held-experts annotation
/// of its pod template when fully rolled out).
struct Deps(BTreeMap<String, (u32, u32, Option<String>)>);

impl Deps {
    fn counts(&self, name: &str) -> ReplicaCounts {
        let (desired, ready) = self.0.get(name).map(|d| (d.0, d.1)).unwrap_or_default();
        ReplicaCounts { desired, ready }
    }
    fn rolled_out_holding(&self, name: &str) -> Option<String> {
        self.0.get(name).and_then(|d| d.2.clone())
    }
}

async fn read_deployments(api: &Api<Deployment>, service: &str) -> Result<Deps> {
    let lp = ListParams::default().labels(&format!("{LABEL_SERVICE}={service}"));
    let mut out = BTreeMap::new();
    for d in api.list(&lp).await?.items {
        let spec = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32;
        let st = d.status.clone().unwrap_or_default();
        let ready = st.ready_replicas.unwrap_or(0).max(0) as u32;
        let rolled_out = st.observed_generation >= d.metadata.generation
            && st.updated_replicas.unwrap_or(0).max(0) as u32 == spec
            && st.replicas.unwrap_or(0).max(0) as u32 == spec
            && ready == spec;
        let held = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_HELD_EXPERTS).cloned())
            .filter(|_| rolled_out);
        out.insert(d.name_any(), (spec, ready, held));
    }
    Ok(Deps(out))
}

/// Seconds from creation to Ready of pods that became ready since last asked.
async fn new_ready_times(api: &Api<Pod>, service: &str, seen: &mut HashSet<String>) -> Vec<f64> {
    let lp = ListParams::default().labels(&format!("{LABEL_SERVICE}={service}"));
    let Ok(pods) = api.list(&lp).await else {
        return vec![];
    };
    let mut out = Vec::new();
    for p in pods.items {
        let Some(uid) = p.metadata.uid.clone() else {
            continue;
        };
        if seen.contains(&uid) {
            continue;
        }
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let ready_at = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0));
        if let (Some(c), Some(r)) = (created, ready_at) {
            seen.insert(uid);
            let secs = (r.as_millisecond() - c.as_millisecond()) as f64 / 1000.0;
            if secs >= 0.0 {
                out.push(secs);
            }
        }
    }
    out
}

fn target_label(kind: &ChildKind) -> String {
    match kind {
        ChildKind::Cloud | ChildKind::Router => "cloud".into(),
        ChildKind::Edge(n) => format!("edge/{n}"),
        ChildKind::ExpertShard(k) => format!("shard/{k}"),
    }
}

async fn tick_one(
    ctx: &Context,
    recorder: &Recorder,
    tis: &InferenceService,
    l: &mut Loop,
) -> Result<()> {
    let name = tis.name_any();
    let ns = tis.namespace().unwrap_or_default();
    let client = &ctx.client;
    let deps_api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let tis_api: Api<InferenceService> = Api::namespaced(client.clone(), &ns);

    // Which Deployment is which target.
    let cloud_kind = if tis.spec.cloud.experts.is_some() {
        ChildKind::Router
    } else {
        ChildKind::Cloud
    };
    let status = tis.status.clone().unwrap_or_default();
    let sites: BTreeMap<String, bool> = status
        .edge
        .iter()
        .map(|e| {
            (
                e.edge_node.clone(),
                e.phase == "Ready" || e.phase == "Degraded",
            )
        })
        .collect();
    let shards = l.config.experts.as_ref().map(|x| x.shards).unwrap_or(0);

    let deps = read_deployments(&deps_api, &name).await?;
    let mut facts = ClusterFacts {
        cloud: deps.counts(&cloud_kind.name(&name)),
        edge: sites
            .keys()
            .map(|s| {
                (
                    s.clone(),
                    deps.counts(&ChildKind::Edge(s.clone()).name(&name)),
                )
            })
            .collect(),
        shards: (0..shards)
            .map(|k| deps.counts(&ChildKind::ExpertShard(k).name(&name)))
            .collect(),
        ready_times_s: new_ready_times(&pods_api, &name, &mut l.seen_pods).await,
        placement: None,
    };
    // The placement in force (or being rolled out): the core judges new plans against it.
    let placement_now = l.config.experts.as_ref().map(|x| {
        l.rollout.current(
            status.placement.as_ref(),
            x,
            tis.spec.cloud.experts.as_ref().map(|e| e.placement),
        )
    });
    facts.placement = placement_now.as_ref().map(rollout::facts);

    // The snapshot, or why there is none.
    let scope = Scope {
        namespace: ns.clone(),
        service: name.clone(),
        window: ctx.autoscale.rate_window.clone(),
    };
    let url = tis
        .spec
        .autoscaling
        .as_ref()
        .and_then(|a| a.prometheus_url.clone())
        .or_else(|| ctx.autoscale.prometheus_url.clone());
    let snapshot: std::result::Result<_, Unavailable> = match &url {
        None => Err(Unavailable {
            reason: "NoPrometheusUrl",
            message: "set spec.autoscaling.prometheusUrl or the operator's --prometheus-url".into(),
        }),
        Some(url) => match Source::new(url) {
            Err(e) => Err(e),
            Ok(src) => {
                if !l.backfilled {
                    let now = unix_now() as i64;
                    if let Ok(h) = src
                        .history(&scope, now, BACKFILL_SPAN_S, l.config.interval_s)
                        .await
                    {
                        debug!(service = %name, points = h.len(), "history read back");
                        l.core.backfill(&h);
                        l.backfilled = true;
                    }
                }
                let experts = l.config.experts.as_ref().map(|x| x.num_experts);
                src.snapshot(&scope, &sites, experts).await
            }
        },
    };
    let now = unix_now();
    let decision = l.core.step(now, snapshot.as_ref().ok(), &facts);

    // Desired replicas per Deployment.
    let mut desired: BTreeMap<String, (ChildKind, u32, String)> = BTreeMap::new();
    desired.insert(
        cloud_kind.name(&name),
        (
            cloud_kind.clone(),
            decision.cloud.replicas,
            decision.cloud.reason.clone(),
        ),
    );
    for (site, d) in &decision.edge {
        let k = ChildKind::Edge(site.clone());
        if sites.get(site).copied().unwrap_or(false) {
            desired.insert(k.name(&name), (k, d.replicas, d.reason.clone()));
        }
    }
    for (i, d) in decision.shards.iter().enumerate() {
        let k = ChildKind::ExpertShard(i as u32);
        desired.insert(k.name(&name), (k, d.replicas, d.reason.clone()));
    }

    // Placement rollout: one stage per tick, gated on the shard Deployments' rollout.
    let shards_ready: Vec<Option<String>> = (0..shards)
        .map(|k| deps.rolled_out_holding(&ChildKind::ExpertShard(k).name(&name)))
        .collect();
    let placement = placement_now.as_ref().and_then(|current| {
        l.rollout.advance(
            current,
            decision.plan.as_ref(),
            &shards_ready,
            Instant::now(),
            Duration::from_secs_f64(l.config.interval_s.max(30.0)),
        )
    });

    write_status(
        &tis_api,
        &name,
        &decision,
        &snapshot,
        &desired,
        placement.as_ref(),
    )
    .await?;
    if let Some(p) = &placement {
        l.rollout.wrote(p);
    }
    ctx.metrics.write("autoscaler", "status");

    // Scale subresource writes (after status, so the controller applies the same numbers).
    let mut changed = Vec::new();
    if decision.metrics_available {
        for (dep, (kind, replicas, reason)) in &desired {
            let current = deps.0.get(dep).map(|d| d.0);
            if current.is_none() || current == Some(*replicas) {
                continue;
            }
            let patch = serde_json::json!({ "spec": { "replicas": replicas } });
            let pp = PatchParams {
                field_manager: Some(AUTOSCALER_MANAGER.into()),
                ..Default::default()
            };
            deps_api
                .patch_scale(dep, &pp, &Patch::Merge(&patch))
                .await?;
            ctx.metrics.write("autoscaler", "scale");
            changed.push((
                kind.clone(),
                dep.clone(),
                current.unwrap_or(0),
                *replicas,
                reason.clone(),
            ));
        }
    }

    // Events and metrics.
    for (kind, dep, from, to, reason) in &changed {
        let action = if to > from { "ScaleUp" } else { "ScaleDown" };
        info!(service = %name, deployment = %dep, from, to, %reason, "autoscaled");
        publish(
            recorder,
            tis,
            EventType::Normal,
            "Autoscaled",
            action,
            format!("{} {from} -> {to}: {reason}", target_label(kind)),
        )
        .await;
        ctx.metrics.write("autoscaler", "event");
    }
    if let Some(p) = &placement {
        let why = p.message.as_deref().unwrap_or("");
        publish(
            recorder,
            tis,
            EventType::Normal,
            "ExpertPlacement",
            p.phase.as_str(),
            format!("plan {} {}: {why}", p.version, p.phase),
        )
        .await;
        ctx.metrics.write("autoscaler", "event");
    }
    if l.metrics_available != Some(decision.metrics_available) {
        let (t, reason, note) = if decision.metrics_available {
            (
                EventType::Normal,
                "MetricsAvailable",
                "metrics are fresh again; autoscaling resumed".to_string(),
            )
        } else {
            (
                EventType::Warning,
                "MetricsUnavailable",
                format!(
                    "holding replicas: {}",
                    decision.hold_reason.clone().unwrap_or_default()
                ),
            )
        };
        if l.metrics_available.is_some() || !decision.metrics_available {
            publish(recorder, tis, t, reason, "Autoscale", note).await;
        }
        l.metrics_available = Some(decision.metrics_available);
    }
    record_metrics(ctx, &ns, &name, &decision, &desired, &deps, l, now);
    Ok(())
}

async fn publish(
    recorder: &Recorder,
    tis: &InferenceService,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(fit_note(note)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &tis.object_ref(&())).await {
        warn!(error = %e, "failed to publish event");
    }
}

/// The API server rejects an Event whose note is over 1 kB (and the Event is lost): a long
/// decision reason (many offline sites, every term noted) is cut at a character boundary.
fn fit_note(mut note: String) -> String {
    const MAX: usize = 1024;
    const MORE: &str = " …";
    if note.len() > MAX {
        let mut end = MAX - MORE.len();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str(MORE);
    }
    note
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn write_status(
    api: &Api<InferenceService>,
    name: &str,
    decision: &Decision,
    snapshot: &std::result::Result<crate::autoscaler::Snapshot, Unavailable>,
    desired: &BTreeMap<String, (ChildKind, u32, String)>,
    placement: Option<&crate::crd::PlacementStatus>,
) -> Result<()> {
    // A fresh read: conditions are merged, not overwritten with a stale copy.
    let fresh = api.get_status(name).await?;
    let current = fresh.status.unwrap_or_default();
    let now = super::now();
    let mut conds = vec![match snapshot {
        Ok(_) if decision.metrics_available => DesiredCondition::new(
            ct::METRICS_AVAILABLE,
            true,
            "MetricsFresh",
            "the last Prometheus snapshot was fresh",
        ),
        Ok(_) => DesiredCondition::new(
            ct::METRICS_AVAILABLE,
            false,
            "MetricsStale",
            format!(
                "holding replicas: {}",
                decision.hold_reason.clone().unwrap_or_default()
            ),
        ),
        Err(u) => DesiredCondition::new(
            ct::METRICS_AVAILABLE,
            false,
            u.reason,
            format!("holding replicas: {}", u.message),
        ),
    }];
    let limited: Vec<String> = std::iter::once(("cloud".to_string(), &decision.cloud))
        .chain(decision.edge.iter().map(|(s, d)| (format!("edge/{s}"), d)))
        .chain(
            decision
                .shards
                .iter()
                .enumerate()
                .map(|(k, d)| (format!("shard/{k}"), d)),
        )
        .filter_map(|(t, d)| d.limited.as_ref().map(|why| format!("{t}: {why}")))
        .collect();
    conds.push(if limited.is_empty() {
        DesiredCondition::new(
            ct::SCALING_LIMITED,
            false,
            "WithinLimits",
            "no bound or step limit held a decision back",
        )
    } else {
        DesiredCondition::new(
            ct::SCALING_LIMITED,
            true,
            "LimitReached",
            limited.join("; "),
        )
    });
    let conditions = merge_conditions(&current.conditions, &conds, fresh.metadata.generation, &now);

    let mut replicas: BTreeMap<String, Option<i32>> = current
        .autoscaled_replicas
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .map(|k| (k.clone(), None))
        .collect();
    if decision.metrics_available {
        for (dep, (_, r, _)) in desired {
            replicas.insert(dep.clone(), Some(*r as i32));
        }
    } else {
        // Holding: keep what was decided before.
        for (k, v) in &current.autoscaled_replicas {
            replicas.insert(k.clone(), Some(*v));
        }
    }
    let forecast = decision.forecast.map(|f| ForecastStatus {
        time: Some(now.clone()),
        now: round2(f.now),
        predicted: round2(f.predicted),
        upper: round2(f.upper),
        horizon_seconds: f.horizon_s.round().max(0.0) as u32,
    });
    let reason = match &decision.hold_reason {
        Some(h) => format!("holding: {h}"),
        None => {
            let mut parts = vec![format!(
                "cloud {}: {}",
                decision.cloud.replicas, decision.cloud.reason
            )];
            parts.extend(
                decision
                    .edge
                    .iter()
                    .map(|(s, d)| format!("edge/{s} {}: {}", d.replicas, d.reason)),
            );
            parts.extend(
                decision
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(k, d)| format!("shard/{k} {}: {}", d.replicas, d.reason)),
            );
            parts.join("; ")
        }
    };
    let mut patch = serde_json::json!({
        "status": {
            "conditions": conditions,
            "autoscaledReplicas": replicas,
            "lastDecision": DecisionStatus { time: Some(now.clone()), reason },
        }
    });
    if let Some(f) = forecast {
        patch["status"]["lastForecast"] = serde_json::to_value(f)?;
    }
    if let Some(p) = placement {
        patch["status"]["placement"] = serde_json::to_value(p)?;
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn record_metrics(
    ctx: &Context,
    ns: &str,
    name: &str,
    decision: &Decision,
    desired: &BTreeMap<String, (ChildKind, u32, String)>,
    deps: &Deps,
    l: &mut Loop,
    now: f64,
) {
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
    let mut direction = "hold";
    for (dep, (kind, r, _)) in desired {
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
    use super::fit_note;

    #[test]
    fn event_notes_fit_the_api_limit() {
        assert_eq!(fit_note("short".into()), "short");
        let exact = "x".repeat(1024);
        assert_eq!(fit_note(exact.clone()), exact);
        // Multi-byte characters straddling the cut are not split.
        let long = "é".repeat(700);
        let cut = fit_note(long);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.ends_with(" …") && cut.starts_with("éé"));
    }
}
