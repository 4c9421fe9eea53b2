//! Status of an InferenceService, computed from its desired children and what the cluster
//! reports about them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::labels::{ChildKind, selector_string};
use super::{Children, SpecError};
use crate::crd::{
    DesiredCondition, EdgeSiteStatus, InferenceServiceStatus, ShardStatus, TierStatus,
    condition_type as ct, merge_conditions,
};

/// Observed replicas of one Deployment: (status.replicas, status.readyReplicas).
pub type Observed = BTreeMap<String, (i32, i32)>;

fn tier_status(service: &str, kind: &ChildKind, desired: i32, observed: &Observed) -> TierStatus {
    let deployment = kind.name(service);
    let (replicas, ready) = observed.get(&deployment).copied().unwrap_or((0, 0));
    TierStatus {
        deployment,
        desired,
        replicas,
        ready_replicas: ready,
        selector: Some(selector_string(&kind.selector_labels(service))),
    }
}

fn ratio(items: &[&TierStatus]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let ready: i32 = items.iter().map(|t| t.ready_replicas.min(t.desired)).sum();
    let desired: i32 = items.iter().map(|t| t.desired).sum();
    Some(format!("{ready}/{desired}"))
}

/// The status after a successful build. Conditions other than Ready/Progressing/Degraded
/// (the autoscaler's) and the autoscaler's forecast and decision are carried over.
pub fn compute_status(
    service: &str,
    generation: Option<i64>,
    children: &Children,
    observed: &Observed,
    previous: Option<&InferenceServiceStatus>,
    now: &Time,
) -> InferenceServiceStatus {
    let mut cloud = None;
    let mut experts = Vec::new();
    let mut edge = Vec::new();
    for w in &children.workloads {
        let t = tier_status(service, &w.kind, w.desired, observed);
        match &w.kind {
            ChildKind::Cloud | ChildKind::Router => cloud = Some(t),
            ChildKind::ExpertShard(k) => experts.push(ShardStatus {
                shard: *k,
                experts: w.experts.clone(),
                replicas: t,
            }),
            ChildKind::Edge(node) => edge.push(EdgeSiteStatus {
                edge_node: node.clone(),
                phase: w.edge_phase.map(|p| p.as_str()).unwrap_or("Unknown").into(),
                served_by: w.service.as_ref().map(|_| {
                    if children.sites_on_cloud.contains(node) {
                        "cloud".into()
                    } else {
                        "edge".into()
                    }
                }),
                replicas: t,
            }),
        }
    }
    let all: Vec<&TierStatus> = cloud
        .iter()
        .chain(experts.iter().map(|s| &s.replicas))
        .chain(edge.iter().map(|e| &e.replicas))
        .collect();
    let short: Vec<String> = all
        .iter()
        .filter(|t| t.ready_replicas < t.desired)
        .map(|t| format!("{} {}/{}", t.deployment, t.ready_replicas, t.desired))
        .collect();
    let rolling = all
        .iter()
        .any(|t| t.replicas != t.desired || t.ready_replicas < t.desired);

    // A site its EdgeNode controller has not assessed yet is not out of service: the service
    // is still being set up there (Progressing says so).
    let sites_in = |phases: &[&str]| -> Vec<&str> {
        edge.iter()
            .filter(|e| phases.contains(&e.phase.as_str()))
            .map(|e| e.edge_node.as_str())
            .collect()
    };
    let unassessed = sites_in(&["Unknown"]);
    let offline = sites_in(&["Offline", "Cordoned"]);
    let mut desired_conditions = vec![
        if short.is_empty() {
            DesiredCondition::new(
                ct::READY,
                true,
                "AllReplicasReady",
                "every desired replica is ready",
            )
        } else {
            DesiredCondition::new(
                ct::READY,
                false,
                "ReplicasNotReady",
                format!("not ready: {}", short.join(", ")),
            )
        },
        if rolling {
            DesiredCondition::new(
                ct::PROGRESSING,
                true,
                "ScalingOrRollingOut",
                "replicas are being created, removed or updated",
            )
        } else if !unassessed.is_empty() {
            DesiredCondition::new(
                ct::PROGRESSING,
                true,
                "EdgeSitesNotAssessed",
                format!(
                    "edge sites not assessed yet (no EdgeNode phase): {}",
                    unassessed.join(", ")
                ),
            )
        } else {
            DesiredCondition::new(
                ct::PROGRESSING,
                false,
                "Stable",
                "every Deployment has its desired replicas",
            )
        },
    ];
    desired_conditions.push(if offline.is_empty() {
        DesiredCondition::new(
            ct::DEGRADED,
            false,
            "AsExpected",
            "no edge site is out of service",
        )
    } else {
        let moved = if children.failed_over_sites.is_empty() {
            String::new()
        } else {
            format!(
                "; cloud tier took over the load of {}",
                children.failed_over_sites.join(", ")
            )
        };
        DesiredCondition::new(
            ct::DEGRADED,
            true,
            "EdgeSiteOffline",
            format!("edge sites out of service: {}{moved}", offline.join(", ")),
        )
    });

    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    InferenceServiceStatus {
        observed_generation: generation,
        conditions: merge_conditions(previous_conditions, &desired_conditions, generation, now),
        cloud_ready: cloud.as_ref().and_then(|c| ratio(&[c])),
        experts_ready: ratio(&experts.iter().map(|s| &s.replicas).collect::<Vec<_>>()),
        edge_ready: ratio(&edge.iter().map(|e| &e.replicas).collect::<Vec<_>>()),
        cloud,
        experts,
        edge,
        last_forecast: previous.and_then(|p| p.last_forecast.clone()),
        last_decision: previous.and_then(|p| p.last_decision.clone()),
        autoscaled_replicas: previous
            .map(|p| p.autoscaled_replicas.clone())
            .unwrap_or_default(),
        recommended_replicas: previous
            .map(|p| p.recommended_replicas.clone())
            .unwrap_or_default(),
        placement: previous.and_then(|p| p.placement.clone()),
    }
}

/// The status when the spec cannot be built: children stay as they are; say why.
pub fn invalid_spec_status(
    generation: Option<i64>,
    error: &SpecError,
    previous: Option<&InferenceServiceStatus>,
    now: &Time,
) -> InferenceServiceStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let conds = [
        DesiredCondition::new(ct::READY, false, error.reason, error.message.clone()),
        DesiredCondition::new(
            ct::DEGRADED,
            true,
            error.reason,
            format!("{}; existing children are left unchanged", error.message),
        ),
    ];
    status.conditions = merge_conditions(&status.conditions, &conds, generation, now);
    status.observed_generation = generation;
    status
}
