//! What the watch caches keep of each object: only what the reconcilers read. At thousands of
//! EdgeNodes the caches are most of the operator's memory, and `managedFields` alone are often
//! half of an object.

use k8s_openapi::api::core::v1::{Node, Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use crate::children::FIELD_MANAGER;

/// Drops `managedFields` (no reconciler reads them, except the Node case below).
pub fn managed_fields<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// A Node keeps only the operator's own server-side-apply entry of `managedFields` (it tells
/// which labels the operator owns) and drops its image list.
pub fn node(n: &mut Node) {
    if let Some(mf) = n.metadata.managed_fields.as_mut() {
        mf.retain(|m| m.manager.as_deref() == Some(FIELD_MANAGER));
    }
    if let Some(st) = n.status.as_mut() {
        st.images = None;
    }
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

/// A pod as the autoscaler reads it: identity, labels, creation time and its Ready condition.
pub fn pod(p: &mut Pod) {
    p.metadata = identity(std::mem::take(&mut p.metadata));
    p.spec = None;
    p.status = p.status.take().map(|s| PodStatus {
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    last_transition_time: c.last_transition_time,
                    ..Default::default()
                })
                .collect()
        }),
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
    }
}
