//! The first stage of a tick: I/O in, facts out. The service's Deployments and pods come from
//! watch caches (no LIST per service per tick), the metrics snapshot from Prometheus, and the
//! status the patch is merged onto from a fresh read.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodCondition};
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use tracing::debug;

use super::plan::Deployments;
use super::promql::Scope;
use super::source::{Histories, Source, Unavailable};
use super::{BACKFILL_DAYS_S, BACKFILL_SPAN_S, Loop, unix_now};
use crate::autoscaler::forecast::COARSE_BUCKET_S;
use crate::autoscaler::{ClusterFacts, History, Snapshot};
use crate::children::{ChildKind, LABEL_SERVICE};
use crate::controller::Context;
use crate::crd::{InferenceService, InferenceServiceStatus, PlacementStatus};
use crate::error::Result;

/// The watch caches a tick reads.
#[derive(Clone)]
pub struct Caches {
    pub deployments: Store<Deployment>,
    /// Pods stripped to what ready times need (`controller::strip::pod`).
    pub pods: Store<Pod>,
}

/// Everything a tick knows before deciding.
pub struct Observation {
    /// The Deployment the cloud tier's replicas are counted on (router for MoE with shards).
    pub cloud_kind: ChildKind,
    /// EdgeNode name -> whether the site is up (Ready or Degraded).
    pub sites_up: BTreeMap<String, bool>,
    pub deployments: Deployments,
    pub facts: ClusterFacts,
    /// The placement in force or being rolled out (disaggregated experts only).
    pub placement_now: Option<PlacementStatus>,
    pub snapshot: std::result::Result<Snapshot, Unavailable>,
    /// Read just before deciding, so conditions are merged onto the latest copy.
    pub status: InferenceServiceStatus,
    pub generation: Option<i64>,
}

pub(super) fn of_service<'a, K: kube::Resource + 'a>(
    objects: impl IntoIterator<Item = &'a std::sync::Arc<K>>,
    ns: &'a str,
    service: &'a str,
) -> impl Iterator<Item = &'a std::sync::Arc<K>> {
    objects.into_iter().filter(move |o| {
        o.meta().namespace.as_deref() == Some(ns)
            && o.meta()
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE))
                .is_some_and(|s| s == service)
    })
}

/// The pod's `Ready` condition when it is true.
pub(super) fn ready_condition(p: &Pod) -> Option<&PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
}

/// The Deployment the cloud tier's replicas are counted on: the router's for MoE with expert
/// shards, else the cloud workers'.
pub(super) fn cloud_kind(tis: &InferenceService) -> ChildKind {
    if tis.spec.cloud.experts.is_some() {
        ChildKind::Router
    } else {
        ChildKind::Cloud
    }
}

/// EdgeNode name -> whether the site is up (Ready or Degraded), from the service's status.
pub(super) fn sites_up(status: &InferenceServiceStatus) -> BTreeMap<String, bool> {
    status
        .edge
        .iter()
        .map(|e| {
            (
                e.edge_node.clone(),
                e.phase == "Ready" || e.phase == "Degraded",
            )
        })
        .collect()
}

/// Seconds from creation to Ready of the service's pods that became ready since last asked.
pub fn new_ready_times<'a>(
    pods: impl IntoIterator<Item = &'a std::sync::Arc<Pod>>,
    seen: &mut HashSet<String>,
) -> Vec<f64> {
    let mut out = Vec::new();
    for p in pods {
        let Some(uid) = p.metadata.uid.clone() else {
            continue;
        };
        if seen.contains(&uid) {
            continue;
        }
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let ready_at =
            ready_condition(p).and_then(|c| c.last_transition_time.as_ref().map(|t| t.0));
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

pub(super) async fn observe(
    ctx: &Context,
    caches: &Caches,
    tis: &InferenceService,
    l: &mut Loop,
) -> Result<Observation> {
    let name = tis.name_any();
    let ns = tis.namespace().unwrap_or_default();
    let cloud_kind = cloud_kind(tis);
    let status = tis.status.clone().unwrap_or_default();
    let sites_up = sites_up(&status);
    let shards = l.config.experts.as_ref().map(|x| x.shards).unwrap_or(0);

    let all_deployments = caches.deployments.state();
    let deployments =
        Deployments::from_objects(of_service(&all_deployments, &ns, &name).map(|d| &**d));
    let all_pods = caches.pods.state();
    let ready_times_s = new_ready_times(of_service(&all_pods, &ns, &name), &mut l.seen_pods);
    let mut facts = ClusterFacts {
        cloud: deployments.counts(&cloud_kind.name(&name)),
        edge: sites_up
            .keys()
            .map(|s| {
                (
                    s.clone(),
                    deployments.counts(&ChildKind::Edge(s.clone()).name(&name)),
                )
            })
            .collect(),
        shards: (0..shards)
            .map(|k| deployments.counts(&ChildKind::ExpertShard(k).name(&name)))
            .collect(),
        ready_times_s,
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
    facts.placement = placement_now.as_ref().map(super::rollout::facts);

    let snapshot = snapshot(ctx, tis, l, &sites_up).await;

    let fresh = Api::<InferenceService>::namespaced(ctx.client.clone(), &ns)
        .get_status(&name)
        .await?;
    Ok(Observation {
        cloud_kind,
        sites_up,
        deployments,
        facts,
        placement_now,
        snapshot,
        status: fresh.status.unwrap_or_default(),
        generation: fresh.metadata.generation,
    })
}

/// Seeds the loop's forecasters once: [`BACKFILL_DAYS_S`] of 10-minute buckets (the daily and
/// weekly seasons, so a restart does not cost days of wake-ahead), then [`BACKFILL_SPAN_S`] at
/// the loop's interval. Retried on the next tick while the samples cannot be read; the days
/// are best effort (a Prometheus that keeps less returns less).
async fn backfill(src: &Source, scope: &Scope, l: &mut Loop, sites_up: &BTreeMap<String, bool>) {
    let now = unix_now() as i64;
    let fine_from = now - BACKFILL_SPAN_S;
    let bucket = COARSE_BUCKET_S as i64;
    // Bucket ends on multiples of the width, as the forecaster counts them.
    let days_to = fine_from.div_euclid(bucket) * bucket;
    let sites: Vec<String> = sites_up.keys().cloned().collect();
    let coarse_scope = Scope {
        window: format!("{bucket}s"),
        ..scope.clone()
    };
    let days = src
        .history(
            &coarse_scope,
            &sites,
            days_to - BACKFILL_DAYS_S,
            days_to,
            bucket as f64,
        )
        .await
        .unwrap_or_else(|e| {
            debug!(service = %scope.service, error = %e.message, "no days of history");
            Histories::default()
        });
    let Ok(mut recent) = src
        .history(scope, &sites, fine_from, now, l.config.interval_s)
        .await
    else {
        return;
    };
    debug!(
        service = %scope.service,
        buckets = days.cloud.len(),
        points = recent.cloud.len(),
        sites = recent.sites.len(),
        "history read back"
    );
    l.core.backfill(&History {
        buckets: days.cloud,
        samples: std::mem::take(&mut recent.cloud),
    });
    for site in &sites {
        let h = History {
            buckets: days.sites.get(site).cloned().unwrap_or_default(),
            samples: recent.sites.remove(site).unwrap_or_default(),
        };
        if !h.buckets.is_empty() || !h.samples.is_empty() {
            l.core.backfill_site(site, &h);
        }
    }
    l.backfilled = true;
}

/// The metrics snapshot, or why there is none (history is read back once per loop first).
async fn snapshot(
    ctx: &Context,
    tis: &InferenceService,
    l: &mut Loop,
    sites_up: &BTreeMap<String, bool>,
) -> std::result::Result<Snapshot, Unavailable> {
    let name = tis.name_any();
    let scope = Scope {
        namespace: tis.namespace().unwrap_or_default(),
        service: name.clone(),
        window: ctx.autoscale.rate_window.clone(),
    };
    let url = tis
        .spec
        .autoscaling
        .as_ref()
        .and_then(|a| a.prometheus_url.clone())
        .or_else(|| ctx.autoscale.prometheus_url.clone())
        .ok_or_else(|| Unavailable {
            reason: "NoPrometheusUrl",
            message: "set spec.autoscaling.prometheusUrl or the operator's --prometheus-url".into(),
        })?;
    let src = Source::new(&url)?;
    if !l.backfilled {
        backfill(&src, &scope, l, sites_up).await;
    }
    let experts = l.config.experts.as_ref().map(|x| x.num_experts);
    src.snapshot(&scope, sites_up, experts).await
}
