//! The pure middle of a tick: what was observed and the core's decision in, the writes out
//! (scale patches, the status patch, Events). No I/O, so every rule here is unit-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::source::Unavailable;
use crate::autoscaler::{Decision, ReplicaCounts, Snapshot};
use crate::children::{ANNOTATION_HELD_EXPERTS, ChildKind};
use crate::crd::{
    DecisionStatus, DesiredCondition, ForecastStatus, InferenceServiceStatus, PlacementStatus,
    condition_type as ct, merge_conditions,
};

/// A Deployment of the service as the autoscaler sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeploymentState {
    /// `spec.replicas`.
    pub replicas: u32,
    pub ready: u32,
    /// The held-experts annotation of its pod template, once that template is fully rolled
    /// out (every replica updated and ready); `None` while a rollout is under way.
    pub rolled_out_holding: Option<String>,
}

impl DeploymentState {
    pub fn of(d: &Deployment) -> Self {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32;
        let st = d.status.clone().unwrap_or_default();
        let ready = st.ready_replicas.unwrap_or(0).max(0) as u32;
        let rolled_out = st.observed_generation >= d.metadata.generation
            && st.updated_replicas.unwrap_or(0).max(0) as u32 == replicas
            && st.replicas.unwrap_or(0).max(0) as u32 == replicas
            && ready == replicas;
        let rolled_out_holding = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_HELD_EXPERTS).cloned())
            .filter(|_| rolled_out);
        DeploymentState {
            replicas,
            ready,
            rolled_out_holding,
        }
    }
}

/// The service's Deployments, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deployments(pub BTreeMap<String, DeploymentState>);

impl Deployments {
    pub fn from_objects<'a>(deployments: impl IntoIterator<Item = &'a Deployment>) -> Self {
        Deployments(
            deployments
                .into_iter()
                .map(|d| (d.name_any(), DeploymentState::of(d)))
                .collect(),
        )
    }

    pub fn counts(&self, name: &str) -> ReplicaCounts {
        self.0
            .get(name)
            .map(|d| ReplicaCounts {
                desired: d.replicas,
                ready: d.ready,
            })
            .unwrap_or_default()
    }

    pub fn rolled_out_holding(&self, name: &str) -> Option<String> {
        self.0.get(name).and_then(|d| d.rolled_out_holding.clone())
    }
}

/// What the decision wants of one Deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub kind: ChildKind,
    pub replicas: u32,
    pub reason: String,
}

/// Desired replicas per Deployment name.
pub type Targets = BTreeMap<String, Target>;

/// The targets of a decision: the cloud (or router) Deployment, every edge site that is
/// up (an offline site's Deployment is left to the InferenceService controller), every shard.
pub fn targets(
    service: &str,
    cloud_kind: &ChildKind,
    decision: &Decision,
    sites_up: &BTreeMap<String, bool>,
) -> Targets {
    let mut out = Targets::new();
    let mut add = |kind: ChildKind, replicas: u32, reason: &str| {
        out.insert(
            kind.name(service),
            Target {
                kind,
                replicas,
                reason: reason.to_string(),
            },
        );
    };
    add(
        cloud_kind.clone(),
        decision.cloud.replicas,
        &decision.cloud.reason,
    );
    for (site, d) in &decision.edge {
        if sites_up.get(site).copied().unwrap_or(false) {
            add(ChildKind::Edge(site.clone()), d.replicas, &d.reason);
        }
    }
    for (i, d) in decision.shards.iter().enumerate() {
        add(ChildKind::ExpertShard(i as u32), d.replicas, &d.reason);
    }
    out
}

/// One write through a Deployment's scale subresource.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleWrite {
    pub deployment: String,
    pub kind: ChildKind,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// The scale writes a decision needs: none while metrics are unavailable (holding), none for
/// a Deployment that does not exist yet (the controller creates it with the status' count),
/// none where the count is already right.
pub fn scale_writes(decision: &Decision, targets: &Targets, deps: &Deployments) -> Vec<ScaleWrite> {
    if !decision.metrics_available {
        return vec![];
    }
    targets
        .iter()
        .filter_map(|(dep, t)| {
            let current = deps.0.get(dep)?.replicas;
            (current != t.replicas).then(|| ScaleWrite {
                deployment: dep.clone(),
                kind: t.kind.clone(),
                from: current,
                to: t.replicas,
                reason: t.reason.clone(),
            })
        })
        .collect()
}

/// The label of a target in Events, status reasons and metrics.
pub fn target_label(kind: &ChildKind) -> String {
    match kind {
        ChildKind::Cloud | ChildKind::Router => "cloud".into(),
        ChildKind::Edge(n) => format!("edge/{n}"),
        ChildKind::ExpertShard(k) => format!("shard/{k}"),
    }
}

/// An Event to publish on the InferenceService.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub action: String,
    pub note: String,
}

/// One `Autoscaled` Event per scale write.
pub fn scale_notes(scales: &[ScaleWrite]) -> Vec<Note> {
    scales
        .iter()
        .map(|s| Note {
            warning: false,
            reason: "Autoscaled",
            action: if s.to > s.from {
                "ScaleUp"
            } else {
                "ScaleDown"
            }
            .into(),
            note: fit_note(format!(
                "{} {} -> {}: {}",
                target_label(&s.kind),
                s.from,
                s.to,
                s.reason
            )),
        })
        .collect()
}

/// The Events of a tick: one per scale write, one per placement stage written, and one when
/// metrics availability changes (a first tick with fresh metrics says nothing).
pub fn events(
    scales: &[ScaleWrite],
    placement: Option<&PlacementStatus>,
    metrics_available_before: Option<bool>,
    decision: &Decision,
) -> Vec<Note> {
    let mut out = scale_notes(scales);
    if let Some(p) = placement {
        let why = p.message.as_deref().unwrap_or("");
        out.push(Note {
            warning: false,
            reason: "ExpertPlacement",
            action: p.phase.as_str().into(),
            note: fit_note(format!("plan {} {}: {why}", p.version, p.phase)),
        });
    }
    let now = decision.metrics_available;
    if metrics_available_before != Some(now) && (metrics_available_before.is_some() || !now) {
        out.push(if now {
            Note {
                warning: false,
                reason: "MetricsAvailable",
                action: "Autoscale".into(),
                note: "metrics are fresh again; autoscaling resumed".into(),
            }
        } else {
            Note {
                warning: true,
                reason: "MetricsUnavailable",
                action: "Autoscale".into(),
                note: fit_note(format!(
                    "holding replicas: {}",
                    decision.hold_reason.clone().unwrap_or_default()
                )),
            }
        });
    }
    out
}

/// Advisory mode: the writes it would make, announced once each (while a recommendation
/// stays the same it is not repeated every tick); `announced` holds those of the last tick,
/// and is replaced by this tick's.
pub fn recommendations(
    would_write: &[ScaleWrite],
    announced: &mut BTreeMap<String, (u32, u32)>,
) -> Vec<Note> {
    let notes = would_write
        .iter()
        .filter(|w| announced.get(&w.deployment) != Some(&(w.from, w.to)))
        .map(|w| Note {
            warning: false,
            reason: "Recommendation",
            action: if w.to > w.from {
                "RecommendScaleUp"
            } else {
                "RecommendScaleDown"
            }
            .into(),
            note: fit_note(format!(
                "{} {} -> {} (advisory, not applied): {}",
                target_label(&w.kind),
                w.from,
                w.to,
                w.reason
            )),
        })
        .collect();
    *announced = would_write
        .iter()
        .map(|w| (w.deployment.clone(), (w.from, w.to)))
        .collect();
    notes
}

/// The API server rejects an Event whose note is over 1 kB (and the Event is lost): a long
/// decision reason (many offline sites, every term noted) is cut at a character boundary.
pub fn fit_note(mut note: String) -> String {
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

/// The replicas map of a status patch: the targets (or, while metrics are unavailable, what
/// was there before), and null for Deployments no longer targeted (removed by the merge).
fn replicas_map(
    previous: &BTreeMap<String, i32>,
    targets: &Targets,
    available: bool,
) -> BTreeMap<String, Option<i32>> {
    let mut replicas: BTreeMap<String, Option<i32>> = previous
        .keys()
        .filter(|k| !targets.contains_key(*k))
        .map(|k| (k.clone(), None))
        .collect();
    if available {
        for (dep, t) in targets {
            replicas.insert(dep.clone(), Some(t.replicas as i32));
        }
    } else {
        // Holding: keep what was decided before.
        for (k, v) in previous {
            replicas.insert(k.clone(), Some(*v));
        }
    }
    replicas
}

/// Every entry of `previous` removed (null in a merge patch).
fn cleared(previous: &BTreeMap<String, i32>) -> BTreeMap<String, Option<i32>> {
    previous.keys().map(|k| (k.clone(), None)).collect()
}

/// The status patch of a tick, merged onto `current` (read fresh, so conditions are merged
/// and not overwritten with a stale copy): `MetricsAvailable` and `ScalingLimited`, the
/// replicas the InferenceService controller applies (`autoscaledReplicas`; held while metrics
/// are unavailable) or, in advisory mode, only recommends (`recommendedReplicas`), the
/// forecast, the decision's reason and the placement stage written.
#[allow(clippy::too_many_arguments)]
pub fn status_patch(
    current: &InferenceServiceStatus,
    generation: Option<i64>,
    now: &Time,
    decision: &Decision,
    snapshot: &Result<Snapshot, Unavailable>,
    targets: &Targets,
    placement: Option<&PlacementStatus>,
    advisory: bool,
) -> serde_json::Value {
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
    let conditions = merge_conditions(&current.conditions, &conds, generation, now);

    let available = decision.metrics_available;
    let (autoscaled, recommended) = if advisory {
        (
            cleared(&current.autoscaled_replicas),
            replicas_map(&current.recommended_replicas, targets, available),
        )
    } else {
        (
            replicas_map(&current.autoscaled_replicas, targets, available),
            cleared(&current.recommended_replicas),
        )
    };
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
    let reason = if advisory {
        format!("advisory, not applied: {reason}")
    } else {
        reason
    };
    let mut patch = serde_json::json!({
        "status": {
            "conditions": conditions,
            "autoscaledReplicas": autoscaled,
            "recommendedReplicas": recommended,
            "lastDecision": DecisionStatus { time: Some(now.clone()), reason },
        }
    });
    if let Some(f) = decision.forecast {
        patch["status"]["lastForecast"] = serde_json::json!(ForecastStatus {
            time: Some(now.clone()),
            now: round2(f.now),
            predicted: round2(f.predicted),
            upper: round2(f.upper),
            horizon_seconds: f.horizon_s.round().max(0.0) as u32,
        });
    }
    if let Some(p) = placement {
        patch["status"]["placement"] = serde_json::json!(p);
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::TargetDecision;

    fn decision(available: bool) -> Decision {
        let t = |replicas: u32, reason: &str| TargetDecision {
            replicas,
            previous: 1,
            reason: reason.into(),
            limited: None,
        };
        Decision {
            time_s: 0.0,
            metrics_available: available,
            hold_reason: (!available).then(|| "the snapshot is 90 s old".to_string()),
            forecast: None,
            cloud: t(3, "forecast 2.4 rps"),
            edge: [
                ("store-1".to_string(), t(2, "local demand")),
                ("store-2".to_string(), t(1, "offline")),
            ]
            .into(),
            shards: vec![t(1, "expert load"), t(2, "hot experts")],
            plan: None,
        }
    }

    fn deps(entries: &[(&str, u32)]) -> Deployments {
        Deployments(
            entries
                .iter()
                .map(|(n, r)| {
                    (
                        n.to_string(),
                        DeploymentState {
                            replicas: *r,
                            ready: *r,
                            rolled_out_holding: None,
                        },
                    )
                })
                .collect(),
        )
    }

    fn sites() -> BTreeMap<String, bool> {
        [
            ("store-1".to_string(), true),
            ("store-2".to_string(), false),
        ]
        .into()
    }

    #[test]
    fn targets_name_every_deployment_but_offline_sites() {
        let t = targets("m", &ChildKind::Router, &decision(true), &sites());
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["m-edge-store-1", "m-experts-0", "m-experts-1", "m-router"]
        );
        assert_eq!(t["m-router"].replicas, 3);
        assert_eq!(t["m-experts-1"].reason, "hot experts");
    }

    #[test]
    fn scale_writes_only_change_existing_deployments_and_nothing_while_holding() {
        let d = decision(true);
        let t = targets("m", &ChildKind::Router, &d, &sites());
        // The router is right already, shard 1 does not exist yet.
        let existing = deps(&[("m-router", 3), ("m-edge-store-1", 1), ("m-experts-0", 2)]);
        let writes = scale_writes(&d, &t, &existing);
        let got: Vec<(&str, u32, u32)> = writes
            .iter()
            .map(|w| (w.deployment.as_str(), w.from, w.to))
            .collect();
        assert_eq!(got, [("m-edge-store-1", 1, 2), ("m-experts-0", 2, 1)]);
        assert!(scale_writes(&decision(false), &t, &existing).is_empty());
    }

    #[test]
    fn events_say_what_scaled_and_when_metrics_come_and_go() {
        let d = decision(true);
        let t = targets("m", &ChildKind::Router, &d, &sites());
        let writes = scale_writes(&d, &t, &deps(&[("m-router", 1)]));
        let notes = events(&writes, None, Some(true), &d);
        assert_eq!(notes.len(), 1);
        assert_eq!(
            (notes[0].action.as_str(), notes[0].note.as_str()),
            ("ScaleUp", "cloud 1 -> 3: forecast 2.4 rps")
        );
        // The first tick with fresh metrics is not news; losing them is, and so is recovery.
        assert!(events(&[], None, None, &d).is_empty());
        let lost = events(&[], None, Some(true), &decision(false));
        assert!(lost[0].warning && lost[0].reason == "MetricsUnavailable");
        assert!(lost[0].note.contains("90 s old"), "{lost:?}");
        let first_unavailable = events(&[], None, None, &decision(false));
        assert_eq!(first_unavailable.len(), 1);
        let back = events(&[], None, Some(false), &d);
        assert!(!back[0].warning && back[0].reason == "MetricsAvailable");
        assert!(events(&[], None, Some(false), &decision(false)).is_empty());
    }

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

    #[test]
    fn status_patch_publishes_targets_or_holds_what_was_decided() {
        let now = crate::controller::now();
        let current = InferenceServiceStatus {
            autoscaled_replicas: [("m-router".to_string(), 5), ("m-old".to_string(), 2)].into(),
            ..Default::default()
        };
        let d = decision(true);
        let t = targets("m", &ChildKind::Router, &d, &sites());
        let snapshot: Result<Snapshot, Unavailable> = Ok(Snapshot::default());
        let p = status_patch(&current, Some(4), &now, &d, &snapshot, &t, None, false);
        let r = &p["status"]["autoscaledReplicas"];
        assert_eq!(r["m-router"], 3);
        assert_eq!(r["m-experts-1"], 2);
        assert!(r["m-old"].is_null() && r.get("m-old").is_some(), "{r}");
        let reason = p["status"]["lastDecision"]["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("cloud 3: forecast 2.4 rps; edge/store-1 2"),
            "{reason}"
        );
        let cond = |p: &serde_json::Value, t: &str| {
            p["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == t)
                .cloned()
                .unwrap()
        };
        assert_eq!(cond(&p, "MetricsAvailable")["status"], "True");
        assert_eq!(cond(&p, "ScalingLimited")["status"], "False");

        // Prometheus unreachable: the condition says why, replicas stay as decided before.
        let gone: Result<Snapshot, Unavailable> = Err(Unavailable {
            reason: "PrometheusUnavailable",
            message: "connection refused".into(),
        });
        let p = status_patch(
            &current,
            Some(4),
            &now,
            &decision(false),
            &gone,
            &t,
            None,
            false,
        );
        let r = &p["status"]["autoscaledReplicas"];
        assert_eq!(
            (r["m-router"].as_i64(), r["m-old"].as_i64()),
            (Some(5), Some(2))
        );
        let c = cond(&p, "MetricsAvailable");
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("PrometheusUnavailable"))
        );
        assert!(
            p["status"]["lastDecision"]["reason"]
                .as_str()
                .unwrap()
                .starts_with("holding: ")
        );
    }

    #[test]
    fn advisory_publishes_recommendations_and_clears_what_the_controller_would_apply() {
        let now = crate::controller::now();
        let current = InferenceServiceStatus {
            autoscaled_replicas: [("m-router".to_string(), 5)].into(),
            recommended_replicas: [("m-gone".to_string(), 1)].into(),
            ..Default::default()
        };
        let d = decision(true);
        let t = targets("m", &ChildKind::Router, &d, &sites());
        let snapshot: Result<Snapshot, Unavailable> = Ok(Snapshot::default());
        let p = status_patch(&current, Some(4), &now, &d, &snapshot, &t, None, true);
        let st = &p["status"];
        assert_eq!(st["recommendedReplicas"]["m-router"], 3);
        assert_eq!(st["recommendedReplicas"]["m-experts-1"], 2);
        assert!(st["recommendedReplicas"]["m-gone"].is_null());
        // An Active decision left over from before is withdrawn: the spec decides again.
        assert_eq!(
            st["autoscaledReplicas"],
            serde_json::json!({"m-router": null})
        );
        let reason = st["lastDecision"]["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("advisory, not applied: cloud 3"),
            "{reason}"
        );
        // And back to Active: the recommendations are withdrawn.
        let advisory_before = InferenceServiceStatus {
            recommended_replicas: [("m-router".to_string(), 3)].into(),
            ..Default::default()
        };
        let p = status_patch(
            &advisory_before,
            Some(5),
            &now,
            &d,
            &snapshot,
            &t,
            None,
            false,
        );
        assert_eq!(
            p["status"]["recommendedReplicas"],
            serde_json::json!({"m-router": null})
        );
        assert_eq!(p["status"]["autoscaledReplicas"]["m-router"], 3);
    }

    #[test]
    fn a_recommendation_is_announced_once_until_it_changes() {
        let d = decision(true);
        let t = targets("m", &ChildKind::Router, &d, &sites());
        let mut announced = BTreeMap::new();
        let would = scale_writes(&d, &t, &deps(&[("m-router", 1), ("m-experts-0", 2)]));
        let notes = recommendations(&would, &mut announced);
        let got: Vec<(&str, &str, &str)> = notes
            .iter()
            .map(|n| (n.reason, n.action.as_str(), n.note.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "Recommendation",
                    "RecommendScaleDown",
                    "shard/0 2 -> 1 (advisory, not applied): expert load"
                ),
                (
                    "Recommendation",
                    "RecommendScaleUp",
                    "cloud 1 -> 3 (advisory, not applied): forecast 2.4 rps"
                ),
            ]
        );
        // The same recommendation on the next tick is not news.
        assert!(recommendations(&would, &mut announced).is_empty());
        // Someone scaled the router by hand: the recommendation against it is.
        let would = scale_writes(&d, &t, &deps(&[("m-router", 2), ("m-experts-0", 2)]));
        let notes = recommendations(&would, &mut announced);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].note.starts_with("cloud 2 -> 3"), "{notes:?}");
        // Actual and recommended agree: nothing to say, and a later divergence is news again.
        assert!(recommendations(&[], &mut announced).is_empty());
        assert_eq!(recommendations(&would, &mut announced).len(), 2);
    }
}
