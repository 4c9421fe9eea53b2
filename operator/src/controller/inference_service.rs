//! InferenceService controller: applies the desired children (server-side apply, one field
//! manager, owner references), prunes children no longer wanted, and writes status, conditions
//! and Events. A reconcile with nothing to change writes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::caches::{Objects, Shared};
use super::written::Written;
use super::{Context, cached, now};
use crate::children::{
    self, ChildKind, Children, EdgeFacts, FIELD_MANAGER, LABEL_SERVICE, Observed, SpecError,
    compute_status, invalid_spec_status,
};
use crate::crd::{EdgeNode, InferenceService, InferenceServiceStatus, condition_type as ct};
use crate::error::{Error, Result};

const CONTROLLER: &str = "inferenceservice";

struct State {
    ctx: Arc<Context>,
    edge_nodes: Store<EdgeNode>,
    /// Children from caches: no-op applies are skipped and pruning needs no LIST.
    deployments: Store<Deployment>,
    services: Store<Service>,
    config_maps: Store<ConfigMap>,
    /// Statuses written that the service cache may not show yet (keyed `namespace/name`): a
    /// reconcile in between compares with these, so it neither writes nor announces twice.
    status_written: Written<InferenceServiceStatus>,
    /// Applied hashes of children applied that the child caches may not show yet (keyed
    /// `kind/namespace/name`): a reconcile in between does not apply the same child again.
    children_written: Written<String>,
}

impl State {
    /// Whether every cache has had its first full list: before that, missing EdgeNodes would
    /// prune edge tiers and missing children would be applied needlessly.
    fn synced(&self) -> bool {
        super::synced(&self.edge_nodes)
            && super::synced(&self.deployments)
            && super::synced(&self.services)
            && super::synced(&self.config_maps)
    }
}

/// What an InferenceService's output depends on from an EdgeNode: other changes (the
/// heartbeat timestamp in its status) trigger no reconcile.
fn edge_facts_hash(en: &EdgeNode) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    EdgeFacts::from_edge_node(en).hash(&mut h);
    en.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// What the controller takes from the shared watches: stores and triggers.
pub struct Inputs {
    services: (Store<InferenceService>, Objects<InferenceService>),
    edge_nodes: (Store<EdgeNode>, Objects<EdgeNode>),
    deployments: (Store<Deployment>, Objects<Deployment>),
}

/// Subscribes to the shared watches this controller reads and is triggered by.
pub fn inputs(shared: &mut Shared) -> Inputs {
    Inputs {
        services: shared.inference_services.input(),
        edge_nodes: shared.edge_nodes.input(),
        deployments: shared.deployments.input(),
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    inputs: Inputs,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let children_cfg = watcher::Config::default().labels(LABEL_SERVICE);
    // Services and ConfigMaps only this controller reads; the rest comes shared. Children are
    // cached whole (applies compare against them), less their managedFields.
    use super::strip::managed_fields as strip;
    let (edge_nodes, en_stream) = inputs.edge_nodes;
    let (deployments, dep_stream) = inputs.deployments;
    let (services_cache, svc_stream) = cached(
        ctx.scoped_api::<Service>(),
        children_cfg.clone(),
        strip::<Service>,
    );
    let (config_maps, cm_stream) = cached(
        ctx.scoped_api::<ConfigMap>(),
        children_cfg,
        strip::<ConfigMap>,
    );

    let controller = Controller::for_stream(inputs.services.1, inputs.services.0)
        .with_config(ctx.controller_config.clone());
    let services = controller.store();
    let state = Arc::new(State {
        ctx,
        edge_nodes,
        deployments,
        services: services_cache,
        config_maps,
        status_written: Written::default(),
        children_written: Written::default(),
    });
    controller
        .owns_stream(dep_stream)
        .owns_stream(svc_stream)
        .owns_stream(cm_stream)
        // An EdgeNode changing what the services see of it (phase, labels, node) re-reconciles
        // the services whose edge tier selects it or runs on it.
        .watches_stream(
            en_stream.predicate_filter(edge_facts_hash, Default::default()),
            move |en| {
                let labels = en.metadata.labels.clone().unwrap_or_default();
                services
                    .state()
                    .into_iter()
                    .filter(|s| {
                        s.spec.edge.as_ref().is_some_and(|e| {
                            children::selector_matches(&e.edge_node_selector, &labels)
                        }) || s.status.as_ref().is_some_and(|st| {
                            st.edge
                                .iter()
                                .any(|site| Some(&site.edge_node) == en.metadata.name.as_ref())
                        })
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, state)
        .for_each(|res| {
            if let Err(e) = res {
                warn!(error = %e, "inferenceservice controller stream error");
            }
            futures::future::ready(())
        })
        .await;
}

fn error_policy(_tis: Arc<InferenceService>, err: &Error, _state: Arc<State>) -> Action {
    warn!(error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

async fn reconcile(tis: Arc<InferenceService>, state: Arc<State>) -> Result<Action> {
    let start = Instant::now();
    let result = reconcile_inner(&tis, &state).await;
    let reason = result.as_ref().err().map(Error::reason);
    state
        .ctx
        .metrics
        .observe_reconcile(CONTROLLER, start.elapsed(), reason);
    result
}

async fn reconcile_inner(tis: &InferenceService, state: &State) -> Result<Action> {
    let ctx = &state.ctx;
    let name = tis.name_any();
    let ns = tis
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    if tis.metadata.deletion_timestamp.is_some() {
        state.status_written.forget(&format!("{ns}/{name}"));
        return Ok(Action::await_change()); // owner references let the GC remove children
    }
    if !state.synced() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    // Facts of the EdgeNodes the edge tier selects only: thousands of sites, a handful each.
    let edge: Vec<EdgeFacts> = match &tis.spec.edge {
        Some(e) => state
            .edge_nodes
            .state()
            .iter()
            .filter(|en| children::selector_matches(&e.edge_node_selector, en.labels()))
            .map(|en| EdgeFacts::from_edge_node(en))
            .collect(),
        None => Vec::new(),
    };
    let key = format!("{ns}/{name}");
    let version = tis.resource_version();
    let pending = state.status_written.pending(&key, version.as_deref());
    let previous = pending.as_ref().or(tis.status.as_ref());

    let mut children = match children::desired_children(tis, &edge, &ctx.build) {
        Ok(c) => c,
        Err(spec_error) => {
            let status =
                invalid_spec_status(tis.metadata.generation, &spec_error, previous, &now());
            report_invalid(tis, state, &spec_error, previous).await;
            write_status(tis, &ns, previous, status, state).await?;
            return Ok(Action::await_change());
        }
    };

    // Sites with no ready replica of their own serve from the cloud tier.
    children::route_idle_sites(&mut children, &name, |d| {
        let live = state.deployments.get(&ObjectRef::new(d).within(&ns))?;
        Some(replica_counts(&live).1)
    });
    let observed = apply_children(&children, &ns, state).await?;
    prune(tis, &ns, &children, state).await?;
    let status = compute_status(
        &name,
        tis.metadata.generation,
        &children,
        &observed,
        previous,
        &now(),
    );
    publish_changes(tis, state, &children, previous, &status).await;
    write_status(tis, &ns, previous, status, state).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Server-side applies `desired` unless the cached child already holds it; returns the
/// child as applied or cached.
async fn apply<K>(api: &Api<K>, desired: &K, cache: &Store<K>, state: &State) -> Result<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut desired = desired.clone();
    children::stamp(&mut desired);
    let name = desired
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let ns = desired.meta().namespace.clone().unwrap_or_default();
    let key = ObjectRef::<K>::new(&name).within(&ns);
    let cached = cache.get(&key);
    let version = cached
        .as_ref()
        .and_then(|l| l.meta().resource_version.clone());
    let hash = children::applied_hash(desired.meta()).cloned();
    let written_key = format!("{}/{ns}/{name}", K::kind(&()));
    // Applied already, and the cache has not caught up with that apply yet.
    if hash.is_some()
        && state
            .children_written
            .pending(&written_key, version.as_deref())
            .as_ref()
            == hash.as_ref()
    {
        state.ctx.metrics.apply_skipped(CONTROLLER);
        return Ok(cached.unwrap_or_else(|| Arc::new(desired)));
    }
    if let Some(live) = cached {
        match children::why_apply(&desired, &live) {
            None => {
                state.ctx.metrics.apply_skipped(CONTROLLER);
                return Ok(live);
            }
            Some(why) => debug!(kind = K::kind(&()).as_ref(), %name, %why, "applying"),
        }
    }
    state.children_written.forget(&written_key);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api.patch(&name, &pp, &Patch::Apply(&desired)).await?;
    // Counted as a write request even when the API server persists nothing.
    state.ctx.metrics.write(CONTROLLER, "apply");
    if let Some(hash) = hash {
        state
            .children_written
            .record(&written_key, version.as_deref(), hash);
    }
    Ok(Arc::new(applied))
}

async fn apply_children(children: &Children, ns: &str, state: &State) -> Result<Observed> {
    let client = &state.ctx.client;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    // The plan first: new shards must be known before the router reads it.
    for cm in &children.config_maps {
        apply(&cms, cm, &state.config_maps, state).await?;
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut observed = Observed::new();
    for w in &children.workloads {
        if w.awaits_assessment() {
            // Left as it is (if it exists) until its EdgeNode has a phase; still reported.
            let name = w.deployment.metadata.name.as_deref().unwrap_or_default();
            if let Some(live) = state.deployments.get(&ObjectRef::new(name).within(ns)) {
                observed.insert(name.to_string(), replica_counts(&live));
            }
            continue;
        }
        if let Some(svc) = &w.service {
            replace_if_immutable(&svcs, svc, ns, state).await?;
            apply(&svcs, svc, &state.services, state).await?;
        }
        let applied = apply(&deps, &w.deployment, &state.deployments, state).await?;
        observed.insert(applied.name_any(), replica_counts(&applied));
    }
    Ok(observed)
}

/// Deletes the live Service when `desired` changes an immutable field of it (a shard Service
/// created by an older operator with a ClusterIP, now headless), so the apply can recreate it.
async fn replace_if_immutable(
    svcs: &Api<Service>,
    desired: &Service,
    ns: &str,
    state: &State,
) -> Result<()> {
    let name = desired.name_any();
    let Some(live) = state.services.get(&ObjectRef::new(&name).within(ns)) else {
        return Ok(());
    };
    if !children::service_needs_replacing(desired, &live) {
        return Ok(());
    }
    info!(%name, "replacing Service: spec.clusterIP cannot change in place");
    match svcs.delete(&name, &DeleteParams::background()).await {
        Ok(_) => state.ctx.metrics.write(CONTROLLER, "delete"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// A Deployment's (replicas, ready replicas) as its status reports them.
fn replica_counts(d: &Deployment) -> (i32, i32) {
    let st = d.status.as_ref();
    (
        st.and_then(|s| s.replicas).unwrap_or(0),
        st.and_then(|s| s.ready_replicas).unwrap_or(0),
    )
}

/// Deletes children of this service that the desired state no longer has (a removed shard,
/// an EdgeNode no longer selected). Only objects this service controls are touched; they are
/// found in the caches, not by listing.
async fn prune(tis: &InferenceService, ns: &str, children: &Children, state: &State) -> Result<()> {
    let (deps, svcs, cms) = children.names();
    prune_kind(tis, ns, &state.deployments, &deps, state).await?;
    prune_kind(tis, ns, &state.services, &svcs, state).await?;
    prune_kind(tis, ns, &state.config_maps, &cms, state).await
}

async fn prune_kind<K>(
    tis: &InferenceService,
    ns: &str,
    cache: &Store<K>,
    keep: &[String],
    state: &State,
) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(state.ctx.client.clone(), ns);
    let keep: BTreeSet<&String> = keep.iter().collect();
    let name = tis.name_any();
    let uid = tis.metadata.uid.as_ref();
    let stale = cache.state_filter(|obj| {
        obj.meta().namespace.as_deref() == Some(ns)
            && obj.labels().get(LABEL_SERVICE) == Some(&name)
            && obj.meta().deletion_timestamp.is_none()
            && !keep.contains(&obj.name_any())
            && obj
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid && o.controller == Some(true))
    });
    for obj in stale {
        let child = obj.name_any();
        info!(name = %child, kind = K::kind(&()).as_ref(), "pruning child no longer desired");
        state
            .children_written
            .forget(&format!("{}/{ns}/{child}", K::kind(&())));
        match api.delete(&child, &DeleteParams::background()).await {
            Ok(_) => state.ctx.metrics.write(CONTROLLER, "delete"),
            // Already gone (the cache lags the API server).
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Status fields only the autoscaler writes (this controller reads them).
const AUTOSCALER_OWNED_STATUS: &[&str] = &[
    "placement",
    "lastForecast",
    "lastDecision",
    "autoscaledReplicas",
];

/// Writes `status` unless the service already holds it (`previous`: cached, or as last written).
async fn write_status(
    tis: &InferenceService,
    ns: &str,
    previous: Option<&InferenceServiceStatus>,
    status: InferenceServiceStatus,
    state: &State,
) -> Result<()> {
    if previous == Some(&status) {
        return Ok(());
    }
    let name = tis.name_any();
    let key = format!("{ns}/{name}");
    state.status_written.forget(&key);
    let api: Api<InferenceService> = Api::namespaced(state.ctx.client.clone(), ns);
    let written = status.clone();
    let mut status = serde_json::to_value(&status)?;
    // The autoscaler owns these; a merge patch from this (possibly stale) copy would undo its
    // writes, e.g. put back a placement rollout stage it has already moved past.
    if let Some(obj) = status.as_object_mut() {
        for key in AUTOSCALER_OWNED_STATUS {
            obj.remove(*key);
        }
    }
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    state.ctx.metrics.write(CONTROLLER, "status");
    state
        .status_written
        .record(&key, tis.resource_version().as_deref(), written);
    Ok(())
}

async fn publish(
    tis: &InferenceService,
    state: &State,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    secondary: Option<ObjectReference>,
) {
    // Events with the same (reason, action, related object) form a series in kube's Recorder.
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary,
    };
    // A recorder per Event: kube's folds one alike in (reason, action, objects) to an Event of
    // the last 6 minutes into a series that keeps the first note, and each of these is a
    // change of its own ("2 -> 3" must not show as a second "1 -> 2").
    let recorder = Recorder::new(state.ctx.client.clone(), state.ctx.reporter.clone());
    match recorder.publish(&event, &tis.object_ref(&())).await {
        Ok(()) => state.ctx.metrics.write(CONTROLLER, "event"),
        Err(e) => warn!(error = %e, "failed to publish event"),
    }
}

/// Events for every change of desired replicas and of the Ready condition.
async fn publish_changes(
    tis: &InferenceService,
    state: &State,
    children: &Children,
    previous: Option<&InferenceServiceStatus>,
    status: &InferenceServiceStatus,
) {
    let before = |deployment: &str| -> Option<i32> {
        let p = previous?;
        p.cloud
            .iter()
            .chain(p.experts.iter().map(|s| &s.replicas))
            .chain(p.edge.iter().map(|e| &e.replicas))
            .find(|t| t.deployment == deployment)
            .map(|t| t.desired)
    };
    // New children are announced together: one Event per reconcile, not one per
    // Deployment (a service with many edge sites would otherwise write dozens at once).
    let mut created = vec![];
    for w in children.workloads.iter().filter(|w| !w.awaits_assessment()) {
        let name = w.kind.name(&tis.name_any());
        let old = before(&name);
        if old == Some(w.desired) {
            continue;
        }
        let Some(old) = old else {
            created.push(format!("{name} {}", w.desired));
            continue;
        };
        let why = if !children.failed_over_sites.is_empty() && w.kind.tier() == "cloud" {
            format!(
                " (edge sites out of service: {})",
                children.failed_over_sites.join(", ")
            )
        } else {
            String::new()
        };
        let action = if old < w.desired {
            "ScaleUp"
        } else {
            "ScaleDown"
        };
        let note = format!("{name}: desired replicas {old} -> {}{why}", w.desired);
        let related = child_ref(tis, "apps/v1", "Deployment", name.clone());
        publish(
            tis,
            state,
            EventType::Normal,
            "DesiredReplicas",
            action,
            note,
            Some(related),
        )
        .await;
    }
    if !created.is_empty() {
        publish(
            tis,
            state,
            EventType::Normal,
            "DesiredReplicas",
            "Create",
            created_note(&created),
            None,
        )
        .await;
    }
    for (site, to_cloud, note) in routing_changes(previous, status, &tis.name_any()) {
        let svc = ChildKind::Edge(site).service_name(&tis.name_any());
        let related = child_ref(tis, "v1", "Service", svc);
        publish(
            tis,
            state,
            EventType::Normal,
            "EdgeSiteRouting",
            // Distinct actions: Events alike in (reason, action, object) form one series,
            // which keeps only its first note.
            if to_cloud {
                "RouteToCloud"
            } else {
                "RouteToEdge"
            },
            note,
            Some(related),
        )
        .await;
    }
    let ready = |s: Option<&InferenceServiceStatus>| {
        s.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == ct::READY)
                .map(|c| (c.status.clone(), c.reason.clone()))
        })
    };
    let (old, new) = (ready(previous), ready(Some(status)));
    if old != new
        && let Some((st, reason)) = new
    {
        let type_ = if st == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(
            tis,
            state,
            type_,
            &reason,
            "Reconcile",
            format!("Ready={st}"),
            None,
        )
        .await;
    }
}

/// A child of `tis`, as an Event's related object.
fn child_ref(
    tis: &InferenceService,
    api_version: &str,
    kind: &str,
    name: String,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        name: Some(name),
        namespace: tis.namespace(),
        ..Default::default()
    }
}

/// Sites whose Service changed target since `previous`: (site, now on the cloud tier, what an
/// Event says of it).
fn routing_changes(
    previous: Option<&InferenceServiceStatus>,
    status: &InferenceServiceStatus,
    service: &str,
) -> Vec<(String, bool, String)> {
    let before = |site: &str| {
        previous?
            .edge
            .iter()
            .find(|e| e.edge_node == site)?
            .served_by
            .clone()
    };
    status
        .edge
        .iter()
        .filter_map(|e| {
            let now = e.served_by.as_deref()?;
            // A new site starts on the cloud until its first replica is ready: no news.
            let was = before(&e.edge_node)?;
            if was == now {
                return None;
            }
            let svc = ChildKind::Edge(e.edge_node.clone()).service_name(service);
            let note = if now == "cloud" {
                format!(
                    "edge site {} has no ready replica ({}/{} ready): Service {svc} routes to the cloud tier",
                    e.edge_node, e.replicas.ready_replicas, e.replicas.desired
                )
            } else {
                format!(
                    "edge site {} has {} ready replica(s): Service {svc} routes to them again",
                    e.edge_node, e.replicas.ready_replicas
                )
            };
            Some((e.edge_node.clone(), now == "cloud", note))
        })
        .collect()
}

/// "desired replicas of new workloads: a 1, b 2", cut to fit an Event's note.
fn created_note(created: &[String]) -> String {
    let mut note = String::from("desired replicas of new workloads:");
    for (i, c) in created.iter().enumerate() {
        let more = format!(" ... and {} more", created.len() - i);
        if note.len() + c.len() + 2 + more.len() > EVENT_NOTE_MAX {
            note.push_str(&more);
            break;
        }
        note.push_str(if i == 0 { " " } else { ", " });
        note.push_str(c);
    }
    note
}

/// events.k8s.io/v1 rejects longer notes.
const EVENT_NOTE_MAX: usize = 1024;

async fn report_invalid(
    tis: &InferenceService,
    state: &State,
    e: &SpecError,
    previous: Option<&InferenceServiceStatus>,
) {
    let already = previous
        .map(|p| {
            p.conditions
                .iter()
                .any(|c| c.type_ == ct::READY && c.reason == e.reason && c.message == e.message)
        })
        .unwrap_or(false);
    if !already {
        publish(
            tis,
            state,
            EventType::Warning,
            e.reason,
            "Reconcile",
            e.message.clone(),
            None,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    //! Reconcile flows against a mocked API server (tower-test): which requests are made.

    use super::*;
    use crate::children::BuildConfig;
    use crate::controller::test_support::{Calls, context, mock_client, store_with, synced_store};

    /// A mock API server that answers status patches with `object` and every other request
    /// with its own body.
    fn mock_state(object: &InferenceService) -> (Arc<State>, Calls) {
        let object = serde_json::to_value(object).unwrap();
        let (client, calls) = mock_client(move |call| {
            if call.path.ends_with("/status") {
                object.clone()
            } else {
                call.body.clone()
            }
        });
        let ctx = context(client.clone());
        let state = State {
            ctx,
            edge_nodes: synced_store(),
            deployments: synced_store(),
            services: synced_store(),
            config_maps: synced_store(),
            status_written: Written::default(),
            children_written: Written::default(),
        };
        (Arc::new(state), calls)
    }

    fn moe_without_num_experts() -> InferenceService {
        let mut t: InferenceService = serde_json::from_value(serde_json::json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "prod", "uid": "u1", "generation": 2},
            "spec": {"model": {"uri": "/m", "architecture": "mixtral"},
                     "cloud": {"minReplicas": 1, "maxReplicas": 2, "experts": {"shards": 2}}}
        }))
        .unwrap();
        t.status = None;
        t
    }

    #[tokio::test]
    async fn invalid_spec_writes_condition_and_event_but_no_children() {
        let tis = moe_without_num_experts();
        let (state, calls) = mock_state(&tis);
        reconcile_inner(&tis, &state).await.unwrap();
        let calls: Vec<(String, String)> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.method.clone(), c.path.clone()))
            .collect();
        assert!(
            calls
                .iter()
                .all(|(_, p)| !p.contains("/deployments") && !p.contains("/services")),
            "{calls:?}"
        );
        assert!(
            calls
                .iter()
                .any(|(m, p)| m == "POST" && p.contains("/events")),
            "{calls:?}"
        );
        assert!(
            calls.iter().any(|(m, p)| m == "PATCH"
                && p == "/apis/tidal.rs/v1alpha1/namespaces/prod/inferenceservices/m/status"),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn a_reconcile_before_the_cache_shows_the_written_status_writes_and_announces_nothing() {
        let mut tis = moe_without_num_experts();
        tis.metadata.resource_version = Some("7".into());
        let (state, calls) = mock_state(&tis);
        reconcile_inner(&tis, &state).await.unwrap();
        let first = calls.lock().unwrap().len();
        assert!(first >= 2, "a status write and an Event first");
        // The same cached object again (its watch event has not arrived): nothing new is sent.
        reconcile_inner(&tis, &state).await.unwrap();
        assert_eq!(calls.lock().unwrap().len(), first);
        // A newer version without the condition (someone cleared the status): written again.
        tis.metadata.resource_version = Some("8".into());
        reconcile_inner(&tis, &state).await.unwrap();
        assert!(calls.lock().unwrap().len() > first);
    }

    #[tokio::test]
    async fn children_applied_before_their_caches_show_them_are_not_applied_again() {
        let tis: InferenceService = serde_json::from_value(serde_json::json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "prod", "uid": "u1", "generation": 1,
                         "resourceVersion": "3"},
            "spec": {"model": {"uri": "/m", "architecture": "llama"},
                     "cloud": {"minReplicas": 1, "maxReplicas": 2}}
        }))
        .unwrap();
        let (state, calls) = mock_state(&tis);
        let applies = || {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.method == "PATCH" && !c.path.ends_with("/status"))
                .count()
        };
        reconcile_inner(&tis, &state).await.unwrap();
        let first = applies();
        assert!(first >= 2, "a Deployment and a Service at least: {first}");
        // A child's event triggers the next reconcile before any watch delivered the applies
        // (the caches are still empty): nothing is applied again.
        let total = calls.lock().unwrap().len();
        reconcile_inner(&tis, &state).await.unwrap();
        assert_eq!(applies(), first);
        assert_eq!(calls.lock().unwrap().len(), total);
    }

    #[tokio::test]
    async fn edge_sites_not_yet_assessed_get_no_deployment_and_no_event() {
        let tis: InferenceService = serde_json::from_value(serde_json::json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "prod", "uid": "u1", "generation": 1},
            "spec": {"model": {"uri": "/m", "architecture": "llama"},
                     "cloud": {"minReplicas": 1, "maxReplicas": 2},
                     "edge": {"model": {"uri": "/e", "architecture": "qwen2"},
                              "edgeNodeSelector": {"matchLabels": {"pool": "a"}}}}
        }))
        .unwrap();
        let edge_node = |name: &str, status: Option<serde_json::Value>| -> EdgeNode {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tidal.rs/v1alpha1", "kind": "EdgeNode",
                "metadata": {"name": name, "labels": {"pool": "a"}},
                "spec": {"nodeName": name, "site": name}, "status": status
            }))
            .unwrap()
        };
        let (state, calls) = mock_state(&tis);
        let mut state = Arc::into_inner(state).unwrap();
        state.edge_nodes = store_with(vec![
            edge_node("new", None),
            edge_node(
                "ready",
                Some(serde_json::json!({"phase": "Ready", "nodeName": "ready"})),
            ),
        ]);
        reconcile_inner(&tis, &state).await.unwrap();
        let calls = calls.lock().unwrap().clone();
        let applied: Vec<&str> = calls
            .iter()
            .filter(|c| c.method == "PATCH" && c.path.contains("/deployments/"))
            .map(|c| c.path.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(applied, ["m-cloud", "m-edge-ready"], "{calls:?}");
        let notes: Vec<&str> = calls
            .iter()
            .filter(|c| c.path.contains("/events"))
            .filter_map(|c| c.body["note"].as_str())
            .collect();
        assert!(notes.iter().all(|n| !n.contains("m-edge-new")), "{notes:?}");
        // The new Deployments are announced in one Event, not one each.
        let created: Vec<&&str> = notes
            .iter()
            .filter(|n| n.starts_with("desired replicas of new workloads"))
            .collect();
        assert_eq!(created.len(), 1, "{notes:?}");
        assert!(
            created[0].contains("m-cloud 1") && created[0].contains("m-edge-ready 1"),
            "{created:?}"
        );
        // The site is still reported, as not assessed, and not as out of service.
        let status = calls
            .iter()
            .find(|c| c.path.ends_with("/status"))
            .map(|c| c.body["status"].clone())
            .unwrap();
        let degraded = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Degraded")
            .unwrap();
        assert_eq!(degraded["status"], "False", "{degraded}");
        assert!(
            status["edge"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["edgeNode"] == "new" && e["phase"] == "Unknown"),
            "{status}"
        );
    }

    #[test]
    fn a_site_changing_what_serves_it_is_told_once_each_way() {
        use crate::crd::{EdgeSiteStatus, TierStatus};
        let site = |by: Option<&str>, ready: i32, desired: i32| InferenceServiceStatus {
            edge: vec![EdgeSiteStatus {
                edge_node: "store.1".into(),
                phase: "Ready".into(),
                served_by: by.map(String::from),
                replicas: TierStatus {
                    ready_replicas: ready,
                    desired,
                    ..Default::default()
                },
            }],
            ..Default::default()
        };
        let edge = site(Some("edge"), 1, 1);
        let cloud = site(Some("cloud"), 0, 0);
        let to_cloud = routing_changes(Some(&edge), &cloud, "chat");
        assert_eq!(to_cloud.len(), 1);
        assert_eq!(to_cloud[0].0, "store.1");
        assert!(to_cloud[0].1);
        assert!(
            to_cloud[0].2.contains(
                "no ready replica (0/0 ready): Service chat-edge-store-1 routes to the cloud tier"
            ),
            "{to_cloud:?}"
        );
        let back = routing_changes(Some(&cloud), &site(Some("edge"), 1, 1), "chat");
        assert!(
            !back[0].1 && back[0].2.contains("routes to them again"),
            "{back:?}"
        );
        assert!(routing_changes(Some(&cloud), &cloud, "chat").is_empty());
        // A new site (or one from before the field existed) starts without news.
        assert!(routing_changes(None, &cloud, "chat").is_empty());
        assert!(routing_changes(Some(&site(None, 0, 0)), &cloud, "chat").is_empty());
    }

    #[test]
    fn a_long_list_of_new_workloads_is_cut_to_fit_an_event() {
        let few = created_note(&["a 1".into(), "b 2".into()]);
        assert_eq!(few, "desired replicas of new workloads: a 1, b 2");
        let many: Vec<String> = (0..200)
            .map(|i| format!("svc-edge-site-{i:03} 1"))
            .collect();
        let note = created_note(&many);
        assert!(note.len() <= EVENT_NOTE_MAX, "{}", note.len());
        assert!(note.contains("svc-edge-site-000 1"), "{note}");
        let shown = note.matches("svc-edge-site-").count();
        assert!(
            note.ends_with(&format!(" ... and {} more", 200 - shown)),
            "{note}"
        );
    }

    #[tokio::test]
    async fn invalid_spec_already_reported_makes_no_requests() {
        let mut tis = moe_without_num_experts();
        let (state, calls) = mock_state(&tis);
        let error = children::desired_children(&tis, &[], &BuildConfig::default()).unwrap_err();
        tis.status = Some(invalid_spec_status(Some(2), &error, None, &now()));
        reconcile_inner(&tis, &state).await.unwrap();
        assert_eq!(
            calls.lock().unwrap().len(),
            0,
            "{:?}",
            calls.lock().unwrap()
        );
    }
}
