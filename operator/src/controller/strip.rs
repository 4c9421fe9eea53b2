//! What the watch caches keep of each object: only what the reconcilers read. At thousands of
//! EdgeNodes the caches are most of the operator's memory, and `managedFields` alone are often
//! half of an object.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use crate::children::FIELD_MANAGER;

/// Drops `managedFields` (no reconciler reads them, except the Node case below).
pub fn managed_fields<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// A Node as the EdgeNode controller reads it: identity and labels, the operator's own
/// server-side-apply entry of `managedFields` (it tells which labels the operator owns),
/// `spec.unschedulable` and the Ready condition's status and message. The rest (images,
/// addresses, capacity, kubelet heartbeats in the other conditions) is most of a real Node.
pub fn node(n: &mut Node) {
    let mut meta = std::mem::take(&mut n.metadata);
    let owned = meta.managed_fields.take().map(|mut mf| {
        mf.retain(|m| m.manager.as_deref() == Some(FIELD_MANAGER));
        mf
    });
    n.metadata = ObjectMeta {
        managed_fields: owned,
        ..identity(meta)
    };
    n.spec = n.spec.take().map(|s| NodeSpec {
        unschedulable: s.unschedulable,
        ..Default::default()
    });
    n.status = n.status.take().map(|s| NodeStatus {
        conditions: ready_only(
            s.conditions,
            |c| &c.type_,
            |c| NodeCondition {
                type_: c.type_,
                status: c.status,
                message: c.message,
                ..Default::default()
            },
        ),
        ..Default::default()
    });
}

/// A node heartbeat Lease: its identity and spec (renewal time and duration are what count).
pub fn lease(l: &mut Lease) {
    l.metadata = identity(std::mem::take(&mut l.metadata));
    l.metadata.labels = None;
}

/// The metadata a stripped object keeps: identity, labels, generation and creation time.
fn identity(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        labels: m.labels,
        generation: m.generation,
        creation_timestamp: m.creation_timestamp,
        resource_version: m.resource_version,
        ..Default::default()
    }
}

/// The Ready condition alone, cut down to the fields `keep` leaves.
fn ready_only<C>(
    conditions: Option<Vec<C>>,
    type_of: fn(&C) -> &String,
    keep: fn(C) -> C,
) -> Option<Vec<C>> {
    conditions.map(|cs| {
        cs.into_iter()
            .filter(|c| type_of(c) == "Ready")
            .map(keep)
            .collect()
    })
}

/// A pod as the autoscaler reads it: identity, labels, creation time and its Ready condition.
pub fn pod(p: &mut Pod) {
    p.metadata = identity(std::mem::take(&mut p.metadata));
    p.spec = None;
    p.status = p.status.take().map(|s| PodStatus {
        conditions: ready_only(
            s.conditions,
            |c| &c.type_,
            |c| PodCondition {
                type_: c.type_,
                status: c.status,
                last_transition_time: c.last_transition_time,
                ..Default::default()
            },
        ),
        // The fast path reads each ready worker's /metrics at its IP.
        pod_ip: s.pod_ip,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_keep_the_operators_own_field_ownership() {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "edge-1", "labels": {"tidal.rs/edge-node": "edge-1"},
                "managedFields": [
                    {"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {}}},
                    {"manager": "tidal-operator", "operation": "Apply",
                     "fieldsV1": {"f:metadata": {"f:labels": {"f:tidal.rs/edge-node": {}}}}}]},
            "status": {"images": [{"names": ["registry/worker:1"], "sizeBytes": 1}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        node(&mut n);
        let mf = n.metadata.managed_fields.as_ref().unwrap();
        assert_eq!(mf.len(), 1);
        assert_eq!(mf[0].manager.as_deref(), Some("tidal-operator"));
        let st = n.status.as_ref().unwrap();
        assert!(st.images.is_none() && st.conditions.as_ref().unwrap().len() == 1);
        assert_eq!(
            n.metadata.labels.as_ref().unwrap()["tidal.rs/edge-node"],
            "edge-1"
        );
    }

    #[test]
    fn nodes_keep_what_the_edge_node_controller_reads() {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "edge-1", "uid": "u", "resourceVersion": "7",
                "labels": {"site": "a"}, "annotations": {"big": "x"}},
            "spec": {"unschedulable": true, "podCIDR": "198.18.1.0/24",
                     "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": "False", "message": "kubelet stopped",
                     "reason": "KubeletNotReady", "lastHeartbeatTime": "2026-12-02T00:00:00Z"}],
                "addresses": [{"type": "InternalIP", "address": "198.18.0.2"}],
                "capacity": {"cpu": "8"}}
        }))
        .unwrap();
        node(&mut n);
        assert_eq!(
            serde_json::to_value(&n).unwrap(),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "edge-1", "uid": "u", "resourceVersion": "7",
                    "labels": {"site": "a"}},
                "spec": {"unschedulable": true},
                "status": {"conditions": [
                    {"type": "Ready", "status": "False", "message": "kubelet stopped"}]}
            })
        );
    }

    #[test]
    fn leases_keep_identity_and_spec() {
        let mut l: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "edge-1", "namespace": "kube-node-lease", "resourceVersion": "9",
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "edge-1",
                                     "uid": "u"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"holderIdentity": "edge-1", "leaseDurationSeconds": 40,
                     "renewTime": "2026-12-02T00:00:00.000000Z"}
        }))
        .unwrap();
        lease(&mut l);
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(
            v["metadata"],
            serde_json::json!({"name": "edge-1", "namespace": "kube-node-lease",
                               "resourceVersion": "9"})
        );
        assert_eq!(v["spec"]["leaseDurationSeconds"], 40);
        assert!(v["spec"]["renewTime"].is_string());
    }
}
