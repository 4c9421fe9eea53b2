//! Where an edge site's Service sends its clients: the site's own replicas while one is
//! ready, the cloud tier's otherwise (scaled to zero, starting, crashed, node gone).
//!
//! Why a selector switch and no activator: the Service keeps its name and address, kube-proxy
//! moves new connections within a second, and no proxy sits in the request path. Applied
//! before the site's Deployment (same reconcile), so a site scaling to zero stops getting new
//! requests before its pods get SIGTERM (their preStop sleep covers kube-proxy's lag); a site
//! waking up keeps the cloud until its first replica is ready.

use super::{ChildKind, Children};

/// Points the Service of every edge site without a ready replica at the cloud tier's pods
/// and lists those sites in `children.sites_on_cloud`. `ready`: a Deployment's ready
/// replicas as last observed (None: not created yet).
pub fn route_idle_sites(
    children: &mut Children,
    service: &str,
    ready: impl Fn(&str) -> Option<i32>,
) {
    let Some(cloud) = children
        .workloads
        .iter()
        .find(|w| matches!(w.kind, ChildKind::Cloud | ChildKind::Router))
        .map(|w| w.kind.selector_labels(service))
    else {
        return;
    };
    let mut on_cloud = Vec::new();
    for w in &mut children.workloads {
        let ChildKind::Edge(site) = &w.kind else {
            continue;
        };
        let deployment = w.deployment.metadata.name.as_deref().unwrap_or_default();
        let serving = w.desired > 0 && ready(deployment).unwrap_or(0) > 0;
        if serving {
            continue;
        }
        if let Some(spec) = w.service.as_mut().and_then(|s| s.spec.as_mut()) {
            spec.selector = Some(cloud.clone());
            on_cloud.push(site.clone());
        }
    }
    children.sites_on_cloud = on_cloud;
}
