//! `EdgeNode`: an edge site or device that runs edge replicas of InferenceServices.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired state of an EdgeNode.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tidal.rs",
    version = "v1alpha1",
    kind = "EdgeNode",
    plural = "edgenodes",
    shortname = "en",
    shortname = "edgenode",
    category = "tidal",
    status = "EdgeNodeStatus",
    doc = "An edge site or device that runs edge replicas of InferenceServices, backed by one \
           Kubernetes Node.",
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Site", type_ = "string", json_path = ".spec.site"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "edge replicas placed on this node"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.nodeName) != has(self.nodeSelector)")
    .message("set exactly one of nodeName and nodeSelector to name the Kubernetes Node this EdgeNode is"))]
pub struct EdgeNodeSpec {
    /// The Kubernetes Node this EdgeNode is, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && self.size() <= 253")
        .message("nodeName must be a valid Kubernetes node name (lowercase DNS subdomain)"))]
    pub node_name: Option<String>,
    /// The Kubernetes Node this EdgeNode is, by labels (must match exactly one Node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0").message("nodeSelector must not be empty"))]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Site name (e.g. a store, a factory, a base station); copied to the Node as a label.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && self.size() <= 63")
        .message("site must be a lowercase DNS label (a-z, 0-9, '-'), at most 63 characters"))]
    pub site: String,
    /// Region the site belongs to (copied to the Node as `topology.kubernetes.io/region`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && self.size() <= 63")
        .message("region must be a lowercase DNS label"))]
    pub region: Option<String>,
    /// What the site can run.
    #[serde(default)]
    pub capacity: EdgeCapacity,
    /// The network link to the cloud tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<CloudLink>,
    /// What happens when the site loses its heartbeat.
    #[serde(default)]
    pub offline_policy: OfflinePolicy,
    /// Take the site out of service: no new edge replicas are placed and existing ones are
    /// removed (traffic fails over to the cloud).
    #[serde(default)]
    pub cordoned: bool,
}

/// Inference capacity of an edge site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EdgeCapacity {
    /// Accelerators, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<Accelerator>,
    /// CPU available to inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory available to inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Largest model (weights in bytes, e.g. `16Gi`) the site can hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_size: Option<Quantity>,
}

/// An accelerator type.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Accelerator {
    /// Extended resource name, e.g. `nvidia.com/gpu`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9.-]+/[a-zA-Z0-9._-]+$')")
        .message("accelerator.resourceName must be an extended resource name such as nvidia.com/gpu"))]
    pub resource_name: String,
    /// Product, e.g. `NVIDIA-Jetson-AGX-Orin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// How many.
    #[schemars(range(min = 1, max = 64))]
    pub count: u32,
    /// Memory per accelerator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// The link between an edge site and the cloud.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudLink {
    /// Bandwidth in megabits per second.
    #[schemars(range(min = 0.001, max = 1000000.0))]
    pub bandwidth_mbps: f64,
    /// Round-trip time in milliseconds.
    #[schemars(range(min = 0.0, max = 60000.0))]
    pub rtt_ms: f64,
}

fn default_heartbeat_timeout() -> u32 {
    60
}
fn default_serve_locally() -> u32 {
    3600
}
fn default_true() -> bool {
    true
}

/// Offline behaviour.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OfflinePolicy {
    /// Seconds without a Node Lease renewal before the site counts as Offline (it is Degraded
    /// once its Lease has expired, and not before a third of that).
    #[serde(default = "default_heartbeat_timeout")]
    #[schemars(range(min = 10, max = 86400))]
    pub heartbeat_timeout_seconds: u32,
    /// How long edge workers keep serving locally while cut off from the cloud.
    #[serde(default = "default_serve_locally")]
    #[schemars(range(min = 0, max = 604800))]
    pub serve_locally_seconds: u32,
    /// While the site is offline, pre-scale the cloud tier for its load.
    #[serde(default = "default_true")]
    pub failover_to_cloud: bool,
}

impl Default for OfflinePolicy {
    fn default() -> Self {
        OfflinePolicy {
            heartbeat_timeout_seconds: default_heartbeat_timeout(),
            serve_locally_seconds: default_serve_locally(),
            failover_to_cloud: true,
        }
    }
}

/// Phase of an edge site.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default,
)]
pub enum EdgePhase {
    /// The Node heartbeats and is Ready.
    Ready,
    /// The Node's heartbeat is late or the Node is not Ready.
    Degraded,
    /// No heartbeat for longer than the offline policy allows, or the Node is gone.
    Offline,
    /// Taken out of service by `spec.cordoned`.
    Cordoned,
    /// Not yet assessed, or its Node has no heartbeat yet (for at most the heartbeat timeout
    /// after the EdgeNode and its Node first met; Offline after that).
    #[default]
    Unknown,
}

impl EdgePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgePhase::Ready => "Ready",
            EdgePhase::Degraded => "Degraded",
            EdgePhase::Offline => "Offline",
            EdgePhase::Cordoned => "Cordoned",
            EdgePhase::Unknown => "Unknown",
        }
    }
    /// Whether edge replicas should run here.
    pub fn schedulable(self) -> bool {
        matches!(self, EdgePhase::Ready | EdgePhase::Degraded)
    }
}

/// Observed state of an EdgeNode.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNodeStatus {
    /// The generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Degraded, Offline, Cordoned or Unknown.
    #[serde(default)]
    pub phase: EdgePhase,
    /// The Kubernetes Node this EdgeNode resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Last renewal of the Node's Lease (kube-node-lease namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// Ready, Heartbeat.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Edge replicas placed here, summed over services.
    #[serde(default)]
    pub replicas: i32,
    /// InferenceServices with edge replicas here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<EdgeServiceRef>,
}

/// An InferenceService's presence on an EdgeNode.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EdgeServiceRef {
    pub namespace: String,
    pub name: String,
    pub replicas: i32,
    pub ready_replicas: i32,
}
