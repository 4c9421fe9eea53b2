//! EdgeNode controller: follows each EdgeNode's Kubernetes Node and its Lease heartbeat, sets
//! phase and conditions (pure logic in `crate::edge`), labels the Node for placement, counts
//! the edge replicas placed on it, and emits an Event when the phase changes. A reconcile with
//! nothing to change writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Error as FinalizerError, Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::caches::{Objects, Shared};
use super::written::Written;
use super::{Context, cached};
use crate::children::{FIELD_MANAGER, LABEL_EDGE_NODE, LABEL_SERVICE};
use crate::crd::{EdgeNode, EdgeNodeStatus, EdgePhase, EdgeServiceRef, merge_conditions};
use crate::edge::{self, NodeFacts, Observation};
use crate::error::{Error, Result};

pub use crate::edge::edge_facts;

const CONTROLLER: &str = "edgenode";
/// Namespace of the Node heartbeat Leases.
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Re-check when no deadline is pending (Offline, Cordoned...): events normally come first.
const RESYNC: Duration = Duration::from_secs(300);

struct State {
    ctx: Arc<Context>,
    recorder: Recorder,
    /// The services' Deployments, to count edge replicas per EdgeNode without a LIST.
    deployments: Store<Deployment>,
    /// The controller's own EdgeNode cache: which EdgeNode holds which Node.
    edge_nodes: Store<EdgeNode>,
    /// Nodes and their heartbeat Leases from caches: no GET per reconcile (thousands of sites,
    /// a Lease renewal every ~10 s each).
    nodes: Store<Node>,
    leases: Store<Lease>,
    /// Placement labels applied per Node and statuses written per EdgeNode that the caches
    /// may not show yet: a reconcile in between compares with these and writes nothing again.
    labels_written: Written<BTreeMap<String, String>>,
    status_written: Written<EdgeNodeStatus>,
}

/// What the controller takes from the shared watches: stores and triggers.
pub struct Inputs {
    edge_nodes: (Store<EdgeNode>, Objects<EdgeNode>),
    deployments: (Store<Deployment>, Objects<Deployment>),
}

/// Subscribes to the shared watches this controller reads and is triggered by.
pub fn inputs(shared: &mut Shared) -> Inputs {
    Inputs {
        edge_nodes: shared.edge_nodes.input(),
        deployments: shared.deployments.input(),
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    inputs: Inputs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let client = ctx.client.clone();
    // Nodes and Leases only this controller reads; EdgeNodes and Deployments come shared (the
    // Deployment store holds every service's; replicas are counted from the edge ones).
    let (deployments, dep_stream) = inputs.deployments;
    let (nodes, node_stream) = cached(
        Api::<Node>::all(client.clone()),
        Default::default(),
        super::strip::node,
    );
    let (leases, lease_stream) = cached(
        Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE),
        Default::default(),
        super::strip::lease,
    );
    // graceful_shutdown_on wants a Sync future; a watch receiver is one whatever `shutdown` is.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_task = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (edge_nodes, en_stream) = inputs.edge_nodes;
    let controller =
        Controller::for_stream(en_stream, edge_nodes).with_config(ctx.controller_config.clone());
    let by_node = controller.store();
    let by_lease = controller.store();
    let state = Arc::new(State {
        recorder: Recorder::new(client.clone(), ctx.reporter.clone()),
        ctx: ctx.clone(),
        deployments,
        edge_nodes: controller.store(),
        nodes,
        leases,
        labels_written: Written::default(),
        status_written: Written::default(),
    });
    controller
        .watches_stream(node_stream, move |node| {
            let name = node.name_any();
            refs(&by_node, |en| {
                edge::refers_to_node(en, &name, Some(node.labels()))
            })
        })
        // Every renewal: lastHeartbeat moves, and a late heartbeat recovers without waiting.
        .watches_stream(lease_stream, move |lease| {
            let name = lease.name_any();
            refs(&by_lease, |en| edge::refers_to_node(en, &name, None))
        })
        .watches_stream(dep_stream, |d| {
            // Only edge Deployments carry the EdgeNode they run on.
            d.labels()
                .get(LABEL_EDGE_NODE)
                .map(|en| ObjectRef::<EdgeNode>::new(en))
        })
        .graceful_shutdown_on(stopped(stop_rx))
        .run(reconcile, error_policy, state)
        .for_each(|res| {
            match res {
                // Already logged by error_policy.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) | Ok(_) => {}
                // Watch failures (RBAC, a CRD not installed): the loop retries with backoff.
                Err(e) => warn!(error = %e, "edgenode controller stream error"),
            }
            futures::future::ready(())
        })
        .await;
    stop_task.abort();
}

fn refs(store: &Store<EdgeNode>, pred: impl Fn(&EdgeNode) -> bool) -> Vec<ObjectRef<EdgeNode>> {
    store
        .state()
        .iter()
        .filter(|en| pred(en))
        .map(|en| ObjectRef::from_obj(&**en))
        .collect()
}

fn error_policy(_en: Arc<EdgeNode>, err: &Error, _state: Arc<State>) -> Action {
    warn!(error = %err, "edgenode reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Finalizer that removes the operator's placement labels from the Node when its EdgeNode is
/// deleted.
pub const FINALIZER: &str = "tidal.rs/node-labels";

async fn reconcile(en: Arc<EdgeNode>, state: Arc<State>) -> Result<Action> {
    // Both the status and the finalizer's label cleanup read the caches.
    if !synced(&state) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let start = Instant::now();
    let api = Api::<EdgeNode>::all(state.ctx.client.clone());
    let result = finalizer(&api, FINALIZER, en, |event| async {
        match event {
            FinalizerEvent::Apply(en) => reconcile_inner(&en, &state).await,
            FinalizerEvent::Cleanup(en) => cleanup(&en, &state).await,
        }
    })
    .await
    .map_err(|e| match e {
        FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e) => e,
        FinalizerError::AddFinalizer(e) | FinalizerError::RemoveFinalizer(e) => Error::Kube(e),
        FinalizerError::UnnamedObject => Error::MissingField("metadata.name"),
        FinalizerError::InvalidFinalizer => Error::InvalidSpec("invalid finalizer name".into()),
    });
    let reason = result.as_ref().err().map(Error::reason);
    state
        .ctx
        .metrics
        .observe_reconcile(CONTROLLER, start.elapsed(), reason);
    result
}

fn node_facts(node: &Node) -> NodeFacts {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    NodeFacts {
        name: node.name_any(),
        ready: ready.map(|c| c.status == "True"),
        ready_message: ready
            .and_then(|c| c.message.clone())
            .filter(|m| !m.is_empty()),
        unschedulable: node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
    }
}

/// Label keys the operator's server-side apply owns on `node`.
fn owned_labels(node: &Node) -> BTreeSet<String> {
    node.managed_fields()
        .iter()
        .filter(|m| {
            m.manager.as_deref() == Some(FIELD_MANAGER)
                && m.operation.as_deref() == Some("Apply")
                && m.subresource.as_deref().unwrap_or_default().is_empty()
        })
        .filter_map(|m| m.fields_v1.as_ref())
        .flat_map(|f| edge::owned_label_keys(&f.0))
        .collect()
}

/// Edge replicas on EdgeNode `name`, per InferenceService (sorted), and their sum.
fn services_on(deployments: &Store<Deployment>, name: &str) -> (i32, Vec<EdgeServiceRef>) {
    let mut services: Vec<EdgeServiceRef> = deployments
        .state()
        .iter()
        .filter(|d| d.labels().get(LABEL_EDGE_NODE).map(String::as_str) == Some(name))
        .map(|d| EdgeServiceRef {
            namespace: d.namespace().unwrap_or_default(),
            name: d
                .labels()
                .get(LABEL_SERVICE)
                .cloned()
                .unwrap_or_else(|| d.name_any()),
            replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            ready_replicas: d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (services.iter().map(|s| s.replicas).sum(), services)
}

/// Whether the Node, Lease and Deployment caches have had their first full list: a reconcile
/// before that would report existing Nodes as missing.
fn synced(state: &State) -> bool {
    super::synced(&state.nodes) && super::synced(&state.leases) && super::synced(&state.deployments)
}

async fn reconcile_inner(en: &EdgeNode, state: &State) -> Result<Action> {
    let ctx = &state.ctx;
    let name = en.name_any();
    let nodes = Api::<Node>::all(ctx.client.clone());
    let en_version = en.resource_version();
    // The status as last written, if the cache has not caught up with that write yet.
    let en_status = state
        .status_written
        .pending(&name, en_version.as_deref())
        .or_else(|| en.status.clone());

    // Resolve the Node from the candidates the spec names (from the Node cache).
    let candidates: Vec<Arc<Node>> = match (&en.spec.node_name, &en.spec.node_selector) {
        (Some(node), _) => state.nodes.get(&ObjectRef::new(node)).into_iter().collect(),
        (None, Some(sel)) => state
            .nodes
            .state()
            .into_iter()
            .filter(|n| {
                let labels = n.labels();
                sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect(),
        (None, None) => {
            return Err(Error::InvalidSpec(
                "neither nodeName nor nodeSelector is set".into(),
            ));
        }
    };
    let empty = BTreeMap::new();
    let resolution = edge::resolve(
        &en.spec,
        candidates.iter().map(|n| {
            (
                n.metadata.name.as_deref().unwrap_or_default(),
                n.metadata.labels.as_ref().unwrap_or(&empty),
            )
        }),
    );
    let node = resolution
        .as_ref()
        .ok()
        .and_then(|r| candidates.iter().find(|n| n.name_any() == *r));

    let lease_spec = node
        .and_then(|n| {
            state
                .leases
                .get(&ObjectRef::new(&n.name_any()).within(NODE_LEASE_NAMESPACE))
        })
        .and_then(|l| l.spec.clone());
    let lease_missing = node.is_some() && lease_spec.is_none();
    let renew_time = lease_spec
        .as_ref()
        .and_then(|s| s.renew_time.clone())
        .map(|t| t.0);
    let lease_duration_seconds = lease_spec
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|d| u32::try_from(d).ok());

    // Another EdgeNode already on this Node: report it instead of fighting over its label.
    let claimed_by = node.and_then(|n| {
        let node_name = n.name_any();
        edge::claimed_by_other(
            &name,
            n.metadata.labels.as_ref().unwrap_or(&empty),
            |other| {
                state
                    .edge_nodes
                    .get(&ObjectRef::new(other))
                    .is_some_and(|o| {
                        o.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node_name)
                    })
            },
        )
    });

    let assessment = edge::assess(&Observation {
        node: match (resolution, node) {
            (Ok(_), Some(n)) => Ok(node_facts(n)),
            (Ok(r), None) => Err(edge::Unresolved::NotFound(format!(
                "Node {r} does not exist"
            ))),
            (Err(e), _) => Err(e),
        },
        renew_time,
        lease_duration_seconds,
        now: Timestamp::now(),
        heartbeat_timeout_seconds: en.spec.offline_policy.heartbeat_timeout_seconds,
        cordoned: en.spec.cordoned,
        claimed_by: claimed_by.clone(),
        // Only a heartbeat reported while healthy may be kept; coming back from Offline or a
        // late heartbeat always reports the real renewal.
        reported_heartbeat: en_status
            .as_ref()
            .filter(|s| {
                s.phase == EdgePhase::Ready
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Heartbeat" && c.reason == edge::reason::LEASE_RENEWED)
            })
            .and_then(|s| s.last_heartbeat.as_ref())
            .map(|t| t.0),
        paired_since: node.and_then(|n| {
            let created = |m: &kube::api::ObjectMeta| m.creation_timestamp.as_ref().map(|t| t.0);
            created(&en.metadata).max(created(&n.metadata))
        }),
    });

    // Placement labels on the Node: only the labels, only when they differ (no write otherwise).
    if let Some(n) = node.filter(|_| claimed_by.is_none()) {
        let desired = edge::node_labels(&name, &en.spec);
        let node_name = n.name_any();
        let node_version = n.resource_version();
        let applied = state
            .labels_written
            .pending(&node_name, node_version.as_deref());
        if applied.as_ref() != Some(&desired)
            && edge::labels_need_apply(
                &desired,
                n.metadata.labels.as_ref().unwrap_or(&empty),
                &owned_labels(n),
            )
        {
            let patch = json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": { "name": n.name_any(), "labels": desired },
            });
            state.labels_written.forget(&node_name);
            nodes
                .patch(
                    &node_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await?;
            ctx.metrics.write(CONTROLLER, "apply");
            state
                .labels_written
                .record(&node_name, node_version.as_deref(), desired);
        }
    }

    let current = en_status.clone().unwrap_or_default();
    let (replicas, services) = services_on(&state.deployments, &name);
    let now = super::now();
    let status = EdgeNodeStatus {
        observed_generation: en.metadata.generation,
        phase: assessment.phase,
        node_name: assessment.node_name.clone(),
        last_heartbeat: assessment.last_heartbeat.map(Time),
        conditions: merge_conditions(
            &current.conditions,
            &assessment.conditions,
            en.metadata.generation,
            &now,
        ),
        replicas,
        services,
    };
    if en_status.as_ref() != Some(&status) {
        // Server-side apply of the whole status: fields that became empty are removed too.
        let patch = json!({
            "apiVersion": EdgeNode::api_version(&()),
            "kind": EdgeNode::kind(&()),
            "status": status,
        });
        state.status_written.forget(&name);
        Api::<EdgeNode>::all(ctx.client.clone())
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.metrics.write(CONTROLLER, "status");
        state
            .status_written
            .record(&name, en_version.as_deref(), status.clone());
    }

    if edge::phase_change_is_news(current.phase, status.phase) {
        if lease_missing {
            // Once per change, not per reconcile: what the Lease cache held.
            info!(
                edgenode = %name,
                phase = status.phase.as_str(),
                leases_cached = state.leases.state().len(),
                "no heartbeat Lease cached for the EdgeNode's Node"
            );
        }
        publish_phase_change(state, en, current.phase, &status).await;
    }

    Ok(Action::requeue(assessment.next_check.unwrap_or(RESYNC)))
}

/// The EdgeNode is being deleted: take the operator's labels off its Node (only if the Node is
/// still labelled as this EdgeNode's; another EdgeNode may hold it now).
async fn cleanup(en: &EdgeNode, state: &State) -> Result<Action> {
    let name = en.name_any();
    state.status_written.forget(&name);
    let node_name = en.status.as_ref().and_then(|s| s.node_name.clone());
    if let Some(n) = &node_name {
        state.labels_written.forget(n);
    }
    let node = node_name.and_then(|n| state.nodes.get(&ObjectRef::new(&n)));
    if let Some(n) = node.filter(|n| n.labels().get(LABEL_EDGE_NODE) == Some(&name))
        && !owned_labels(&n).is_empty()
    {
        // Applying no labels under our field manager removes the ones it owns.
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": n.name_any(), "labels": {} },
        });
        Api::<Node>::all(state.ctx.client.clone())
            .patch(
                &n.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        state.ctx.metrics.write(CONTROLLER, "apply");
    }
    Ok(Action::await_change())
}

/// An Event on the EdgeNode saying what its phase became and why. Failing to publish it is
/// logged, not retried: the status already says the same.
async fn publish_phase_change(
    state: &State,
    en: &EdgeNode,
    from: EdgePhase,
    status: &EdgeNodeStatus,
) {
    let why = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let type_ = match status.phase {
        EdgePhase::Ready | EdgePhase::Cordoned => EventType::Normal,
        _ => EventType::Warning,
    };
    let event = Event {
        type_,
        reason: status.phase.as_str().to_string(),
        note: Some(format!(
            "phase {} -> {}: {why}",
            from.as_str(),
            status.phase.as_str()
        )),
        action: "PhaseChange".into(),
        secondary: None,
    };
    match state.recorder.publish(&event, &en.object_ref(&())).await {
        Ok(()) => state.ctx.metrics.write(CONTROLLER, "event"),
        Err(e) => warn!(error = %e, edgenode = %en.name_any(), "cannot publish phase Event"),
    }
}

#[cfg(test)]
mod tests {
    //! Reconcile flows against a mocked API server (tower-test): which requests are made.

    use super::*;
    use crate::controller::test_support::{context, mock_client, store_with, synced_store};

    #[tokio::test]
    async fn a_reconcile_before_the_caches_show_its_writes_sends_them_no_second_time() {
        let (client, calls) = mock_client(|call| {
            let mut reply = call.body.clone();
            // A status apply carries no metadata; the answer is an object all the same.
            reply["metadata"]["name"] = json!("reply");
            if call.path.ends_with("/status") {
                reply["spec"] = json!({"nodeName": "n1", "site": "a"});
            }
            reply
        });
        let ctx = context(client.clone());
        let mut node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "resourceVersion": "3"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let mut en: EdgeNode = serde_json::from_value(json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "EdgeNode",
            "metadata": {"name": "site-a", "resourceVersion": "5", "generation": 1},
            "spec": {"nodeName": "n1", "site": "a"}
        }))
        .unwrap();
        let state = |node: &Node| State {
            recorder: Recorder::new(client.clone(), ctx.reporter.clone()),
            ctx: ctx.clone(),
            deployments: synced_store(),
            edge_nodes: synced_store(),
            nodes: store_with(vec![node.clone()]),
            leases: synced_store(),
            labels_written: Written::default(),
            status_written: Written::default(),
        };
        let writes = |path: &str| {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.method == "PATCH" && c.path == path)
                .count()
        };
        let labels = "/api/v1/nodes/n1";
        let status = "/apis/tidal.rs/v1alpha1/edgenodes/site-a/status";

        let s = state(&node);
        reconcile_inner(&en, &s).await.unwrap();
        assert_eq!((writes(labels), writes(status)), (1, 1));
        // A Lease renewal triggers another reconcile before the watches bring either write back.
        reconcile_inner(&en, &s).await.unwrap();
        assert_eq!((writes(labels), writes(status)), (1, 1));

        // Someone removes the labels (a newer Node version) and clears the status: both are
        // written again.
        node.metadata.resource_version = Some("4".into());
        en.metadata.resource_version = Some("6".into());
        let State {
            labels_written,
            status_written,
            ..
        } = s;
        let s = State {
            labels_written,
            status_written,
            ..state(&node)
        };
        reconcile_inner(&en, &s).await.unwrap();
        assert_eq!((writes(labels), writes(status)), (2, 2));
    }
}
