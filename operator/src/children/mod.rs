//! Desired state: the Kubernetes objects an InferenceService should own, built by pure
//! functions from the spec and what is known about EdgeNodes (no client, no I/O).

mod applied;
mod labels;
mod placement;
mod routing;
mod selection;
mod status;
mod workload;

pub use applied::{ANNOTATION_APPLIED_HASH, applied_hash, stamp, why_apply};
pub use labels::*;
pub use placement::*;
pub use routing::route_idle_sites;
pub use selection::matches as selector_matches;
pub use status::*;
pub use workload::{MODEL_MOUNT, WorkerArgs, oci_model_reference, service_needs_replacing};

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::crd::{EdgePhase, InferenceService};

/// Operator-wide settings the builders need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildConfig {
    /// Worker image when the spec names none.
    pub worker_image: String,
    /// Cluster DNS suffix for endpoints in the placement plan.
    pub cluster_domain: String,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            worker_image: "ghcr.io/tidal-rs/tidal-worker:0.1.0".into(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// What the controller knows about one EdgeNode.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EdgeFacts {
    /// The EdgeNode's name.
    pub name: String,
    /// Its labels (the edge tier's selector matches these).
    pub labels: BTreeMap<String, String>,
    /// The Kubernetes Node it resolved to, if any.
    pub node_name: Option<String>,
    pub phase: EdgePhase,
    /// Whether the cloud should take over its load while it is out of service.
    pub failover_to_cloud: bool,
}

impl EdgeFacts {
    /// Facts from an EdgeNode object as its controller last reported them.
    pub fn from_edge_node(en: &crate::crd::EdgeNode) -> Self {
        let status = en.status.as_ref();
        EdgeFacts {
            name: en.metadata.name.clone().unwrap_or_default(),
            labels: en.metadata.labels.clone().unwrap_or_default(),
            node_name: status.and_then(|s| s.node_name.clone()),
            phase: status.map(|s| s.phase).unwrap_or_default(),
            failover_to_cloud: en.spec.offline_policy.failover_to_cloud,
        }
    }
}

/// One Deployment the service should have, with what it is and how many replicas it wants.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub kind: ChildKind,
    pub deployment: Deployment,
    /// Its Service. An edge site's selects that site's pods only: clients at the site reach
    /// their local replicas by a stable name, and scaling the site never strands them on a
    /// pod that is going away.
    pub service: Option<Service>,
    pub desired: i32,
    /// For edge workloads: the EdgeNode's phase.
    pub edge_phase: Option<EdgePhase>,
    /// For expert shards: the experts they hold.
    pub experts: Vec<u32>,
}

impl Workload {
    /// An edge site the EdgeNode controller has not assessed yet: its Deployment is neither
    /// created nor changed until it has. At start-up thousands of sites are unassessed at once,
    /// and each would otherwise be written twice (with 0 replicas, then with its own), with an
    /// Event each time.
    pub fn awaits_assessment(&self) -> bool {
        self.edge_phase == Some(EdgePhase::Unknown)
    }

    /// The pod spec of its Deployment (the builders always set one).
    pub fn pod_spec(&self) -> &PodSpec {
        self.deployment
            .spec
            .as_ref()
            .and_then(|d| d.template.spec.as_ref())
            .expect("workload Deployments carry a pod spec")
    }

    /// One annotation of its pod template.
    pub fn pod_annotation(&self, key: &str) -> Option<&str> {
        self.deployment
            .spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

/// Everything an InferenceService should own.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub workloads: Vec<Workload>,
    pub config_maps: Vec<ConfigMap>,
    pub plan: Option<PlacementPlan>,
    /// Edge sites out of service whose load the cloud took over (for status and events).
    pub failed_over_sites: Vec<String>,
    /// Edge sites whose Service routes to the cloud tier (no ready replica of their own);
    /// filled by [`route_idle_sites`].
    pub sites_on_cloud: Vec<String>,
}

impl Children {
    /// Names of every Deployment, Service and ConfigMap, for pruning what is no longer wanted.
    pub fn names(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let name = |m: &ObjectMeta| m.name.clone().unwrap_or_default();
        (
            self.workloads
                .iter()
                .map(|w| name(&w.deployment.metadata))
                .collect(),
            self.workloads
                .iter()
                .filter_map(|w| w.service.as_ref())
                .map(|s| name(&s.metadata))
                .collect(),
            self.config_maps.iter().map(|c| name(&c.metadata)).collect(),
        )
    }
}

/// A spec that passed the schema but cannot be built; reported in a condition, and existing
/// children are left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    pub message: String,
}

fn owner_reference(tis: &InferenceService) -> Result<OwnerReference, SpecError> {
    let uid = tis.metadata.uid.clone().ok_or(SpecError {
        reason: "NotPersisted",
        message: "the InferenceService has no uid yet".into(),
    })?;
    Ok(OwnerReference {
        api_version: "tidal.rs/v1alpha1".into(),
        kind: "InferenceService".into(),
        name: tis.metadata.name.clone().unwrap_or_default(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Replicas the autoscaler decided for a Deployment, while autoscaling is enabled and active
/// (an advisory autoscaler only recommends).
fn autoscaled(tis: &InferenceService, deployment: &str) -> Option<i32> {
    let active = tis
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.enabled && a.mode == crate::crd::AutoscalingMode::Active);
    if !active {
        return None;
    }
    tis.status
        .as_ref()
        .and_then(|s| s.autoscaled_replicas.get(deployment).copied())
}

/// The autoscaler's placement, when it fits the spec (same shard and expert counts).
fn autoscaled_placement(
    tis: &InferenceService,
    num_experts: u32,
    shards: u32,
) -> Option<&crate::crd::PlacementStatus> {
    let p = tis.status.as_ref()?.placement.as_ref()?;
    let fits = p.shards.len() == shards as usize
        && p.shards
            .iter()
            .enumerate()
            .all(|(k, s)| s.shard == k as u32)
        && {
            let mut all: Vec<u32> = p.shards.iter().flat_map(|s| s.experts.clone()).collect();
            all.sort_unstable();
            all.dedup();
            all == (0..num_experts).collect::<Vec<_>>()
        };
    fits.then_some(p)
}

/// Pod-template annotation listing the experts a shard loads: changing it rolls the shard's
/// pods, so the Deployment's rollout status says when every replica holds the new experts.
pub const ANNOTATION_HELD_EXPERTS: &str = "tidal.rs/held-experts";

/// Builds the desired children of `tis` given the EdgeNodes the cluster has.
pub fn desired_children(
    tis: &InferenceService,
    edge_nodes: &[EdgeFacts],
    cfg: &BuildConfig,
) -> Result<Children, SpecError> {
    let name = tis.metadata.name.clone().unwrap_or_default();
    let namespace = tis
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let owner = owner_reference(tis)?;
    let spec = &tis.spec;
    let cloud = &spec.cloud;
    let base = workload::Base {
        service: &name,
        namespace: &namespace,
        owner: &owner,
        image: spec.image.as_deref().unwrap_or(&cfg.worker_image),
        served_name: spec.model.served_name.as_deref().unwrap_or(&name),
        api_keys: spec.auth.as_ref().map(|a| &a.api_key_secret),
        tls_secret: spec.tls.as_ref().map(|t| t.secret_name.as_str()),
        serving: spec.serving.as_ref(),
    };

    let mut workloads = Vec::new();
    let mut config_maps = Vec::new();
    let mut plan = None;

    // Edge first: sites out of service move their replicas to the cloud tier.
    let mut failed_over_sites = Vec::new();
    let mut failover_replicas = 0;
    let cloud_kind = if cloud.experts.is_some() {
        ChildKind::Router
    } else {
        ChildKind::Cloud
    };
    let cloud_url = format!(
        "{}://{}.{namespace}.svc.{}:{WORKER_PORT}",
        base.scheme(),
        cloud_kind.name(&name),
        cfg.cluster_domain
    );
    if let Some(edge) = &spec.edge {
        let mut selected: Vec<&EdgeFacts> = edge_nodes
            .iter()
            .filter(|e| selector_matches(&edge.edge_node_selector, &e.labels))
            .collect();
        selected.sort_by(|a, b| a.name.cmp(&b.name));
        for site in selected {
            let in_service = site.phase.schedulable() && site.node_name.is_some();
            let kind = ChildKind::Edge(site.name.clone());
            let desired = if in_service {
                autoscaled(tis, &kind.name(&name))
                    .unwrap_or(edge.min_replicas_per_node)
                    .clamp(edge.min_replicas_per_node, edge.max_replicas_per_node)
            } else {
                0
            };
            if !in_service && site.failover_to_cloud && site.phase != EdgePhase::Unknown {
                failed_over_sites.push(site.name.clone());
                failover_replicas += edge.min_replicas_per_node.max(1);
            }
            let args = WorkerArgs::edge(&edge.model, &cloud_url, &edge.escalation)
                .with_gpu_from(edge.resources.as_ref());
            let deployment = workload::deployment(
                &base,
                &kind,
                desired,
                &edge.model.uri,
                args,
                edge.resources.clone(),
                site.node_name
                    .as_ref()
                    .map(|n| BTreeMap::from([("kubernetes.io/hostname".to_string(), n.clone())])),
                None,
                None,
            );
            workloads.push(Workload {
                service: Some(workload::service(&base, &kind, edge.service.as_ref())),
                kind,
                deployment,
                desired,
                edge_phase: Some(site.phase),
                experts: vec![],
            });
        }
    }

    let cloud_desired = match autoscaled(tis, &cloud_kind.name(&name)) {
        // The autoscaler already adds an offline site's forecast load when told to.
        Some(r)
            if spec
                .autoscaling
                .as_ref()
                .is_some_and(|a| a.prescale_cloud_for_edge) =>
        {
            r
        }
        Some(r) => r + failover_replicas,
        None => cloud.replicas.unwrap_or(cloud.min_replicas) + failover_replicas,
    };
    let cloud_desired = cloud_desired.clamp(cloud.min_replicas, cloud.max_replicas);

    let placement_cm = if let Some(experts) = &cloud.experts {
        let num_experts = spec.model.num_experts.ok_or(SpecError {
            reason: "NumExpertsUnknown",
            message: "cloud.experts needs model.numExperts to plan expert shards".into(),
        })?;
        // Per shard: (experts routed to it, experts it loads).
        type Assignment = Vec<(Vec<u32>, Vec<u32>)>;
        let (version, assignment): (u32, Assignment) =
            match autoscaled_placement(tis, num_experts, experts.shards) {
                Some(p) => (
                    p.version,
                    p.shards
                        .iter()
                        .map(|s| (s.experts.clone(), s.held.clone()))
                        .collect(),
                ),
                None => (
                    1,
                    initial_assignment(num_experts, experts.shards, experts.placement)
                        .into_iter()
                        .map(|e| (e.clone(), e))
                        .collect(),
                ),
            };
        let cm_name = format!("{name}-placement");
        let mut shards = Vec::new();
        for (k, (routed, held)) in assignment.into_iter().enumerate() {
            let kind = ChildKind::ExpertShard(k as u32);
            let desired = autoscaled(tis, &kind.name(&name))
                .unwrap_or(experts.min_replicas_per_shard)
                .clamp(
                    experts.min_replicas_per_shard,
                    experts.max_replicas_per_shard,
                );
            let endpoint = format!(
                "{}://{}.{namespace}.svc.{}:{WORKER_PORT}",
                base.scheme(),
                kind.name(&name),
                cfg.cluster_domain
            );
            shards.push(ShardPlan {
                shard: k as u32,
                experts: routed.clone(),
                held: if held == routed { vec![] } else { held.clone() },
                endpoint,
                replicas: desired,
            });
            let args = WorkerArgs::expert(&spec.model, k as u32);
            let mut deployment = workload::deployment(
                &base,
                &kind,
                desired,
                &spec.model.uri,
                args,
                experts.resources.clone(),
                cloud.node_selector.clone(),
                cloud.tolerations.clone(),
                Some(&cm_name),
            );
            if let Some(t) = deployment
                .spec
                .as_mut()
                .and_then(|s| s.template.metadata.as_mut())
            {
                let held_list: Vec<String> = held.iter().map(u32::to_string).collect();
                t.annotations
                    .get_or_insert_with(Default::default)
                    .insert(ANNOTATION_HELD_EXPERTS.into(), held_list.join(","));
            }
            workloads.push(Workload {
                service: Some(workload::service(&base, &kind, None)),
                kind,
                deployment,
                desired,
                edge_phase: None,
                experts: routed,
            });
        }
        let p = PlacementPlan {
            version,
            num_experts,
            shards,
        };
        config_maps.push(workload::placement_config_map(&base, &cm_name, &p));
        plan = Some(p);
        Some(cm_name)
    } else {
        None
    };

    // The cloud tier's own workload: the full model, or the router in front of the shards.
    let mut args = match &placement_cm {
        Some(_) => WorkerArgs::router(&spec.model),
        None => WorkerArgs::full(&spec.model),
    };
    args = args.with_gpu_from(cloud.resources.as_ref());
    if spec.edge.is_some() {
        // A site with no ready replica routes its clients here: count them by its Service.
        args = args.with_env(
            "TIDAL_SITE_SERVICE_PREFIX",
            ChildKind::Edge(String::new()).service_name(&name),
        );
    }
    let deployment = workload::deployment(
        &base,
        &cloud_kind,
        cloud_desired,
        &spec.model.uri,
        args,
        cloud.resources.clone(),
        cloud.node_selector.clone(),
        cloud.tolerations.clone(),
        placement_cm.as_deref(),
    );
    workloads.push(Workload {
        service: Some(workload::service(
            &base,
            &cloud_kind,
            cloud.service.as_ref(),
        )),
        kind: cloud_kind,
        deployment,
        desired: cloud_desired,
        edge_phase: None,
        experts: vec![],
    });

    workloads.sort_by(|a, b| a.kind.cmp(&b.kind));
    let children = Children {
        workloads,
        config_maps,
        plan,
        failed_over_sites,
        sites_on_cloud: Vec::new(),
    };
    let (deps, svcs, cms) = children.names();
    // Two EdgeNodes whose names differ only by '.' and '-' would share one Service.
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = svcs.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(SpecError {
            reason: "NameConflict",
            message: format!(
                "two children would share the Service name {dup:?} (EdgeNode names that differ only by '.' and '-'): rename one EdgeNode"
            ),
        });
    }
    if let Some(long) = deps
        .iter()
        .chain(&svcs)
        .chain(&cms)
        .find(|n| n.len() > MAX_NAME_LEN)
    {
        return Err(SpecError {
            reason: "NameTooLong",
            message: format!(
                "child name {long:?} is longer than {MAX_NAME_LEN} characters: shorten the InferenceService or EdgeNode name"
            ),
        });
    }
    Ok(children)
}

#[cfg(test)]
mod tests;
