//! Names and labels of the children an InferenceService owns.

use std::collections::BTreeMap;

/// Label every child carries: the owning InferenceService's name.
pub const LABEL_SERVICE: &str = "tidal.rs/inference-service";
/// Tier of a child: `cloud` or `edge`.
pub const LABEL_TIER: &str = "tidal.rs/tier";
/// Role of the worker: `full`, `router`, `expert`.
pub const LABEL_ROLE: &str = "tidal.rs/role";
/// Expert shard index.
pub const LABEL_SHARD: &str = "tidal.rs/shard";
/// EdgeNode an edge child runs on.
pub const LABEL_EDGE_NODE: &str = "tidal.rs/edge-node";
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "tidal-operator";
/// Container port of the worker's HTTP API and metrics.
pub const WORKER_PORT: i32 = 8080;
/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";

/// Kubernetes names of Services are DNS-1035 labels: at most 63 characters.
pub const MAX_NAME_LEN: usize = 63;

/// What a child is, which decides its name and labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChildKind {
    /// The whole model in one process (no expert shards).
    Cloud,
    /// Embeddings, attention and gates; experts are remote.
    Router,
    /// One expert shard.
    ExpertShard(u32),
    /// The edge tier on one EdgeNode.
    Edge(String),
}

impl ChildKind {
    /// Whether this kind's Service is headless (`clusterIP: None`).
    pub fn is_headless(&self) -> bool {
        matches!(self, ChildKind::ExpertShard(_))
    }

    pub fn name(&self, service: &str) -> String {
        match self {
            ChildKind::Cloud => format!("{service}-cloud"),
            ChildKind::Router => format!("{service}-router"),
            ChildKind::ExpertShard(k) => format!("{service}-experts-{k}"),
            ChildKind::Edge(node) => format!("{service}-edge-{node}"),
        }
    }

    /// The name of its Service: [`Self::name`] as a DNS-1035 label. An EdgeNode may be named
    /// like its node (`store-1.example.com`), which a Deployment accepts and a Service does not.
    pub fn service_name(&self, service: &str) -> String {
        self.name(service).replace('.', "-")
    }

    pub fn tier(&self) -> &'static str {
        match self {
            ChildKind::Edge(_) => "edge",
            _ => "cloud",
        }
    }

    pub fn role(&self) -> &'static str {
        match self {
            ChildKind::Cloud | ChildKind::Edge(_) => "full",
            ChildKind::Router => "router",
            ChildKind::ExpertShard(_) => "expert",
        }
    }

    /// `app.kubernetes.io/component`.
    pub fn component(&self) -> &'static str {
        match self {
            ChildKind::Cloud => "cloud",
            ChildKind::Router => "router",
            ChildKind::ExpertShard(_) => "expert-shard",
            ChildKind::Edge(_) => "edge",
        }
    }

    /// Labels that select this child's pods (stable: Deployment selectors are immutable).
    pub fn selector_labels(&self, service: &str) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_string(),
                "tidal-worker".to_string(),
            ),
            (
                "app.kubernetes.io/instance".to_string(),
                service.to_string(),
            ),
            (
                "app.kubernetes.io/component".to_string(),
                self.component().to_string(),
            ),
        ]);
        match self {
            ChildKind::ExpertShard(k) => {
                l.insert(LABEL_SHARD.to_string(), k.to_string());
            }
            ChildKind::Edge(node) => {
                l.insert(LABEL_EDGE_NODE.to_string(), node.clone());
            }
            _ => {}
        }
        l
    }

    /// All labels of the child and its pods.
    pub fn labels(&self, service: &str) -> BTreeMap<String, String> {
        let mut l = self.selector_labels(service);
        l.insert("app.kubernetes.io/part-of".into(), "tidal".into());
        l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        l.insert(LABEL_SERVICE.into(), service.into());
        l.insert(LABEL_TIER.into(), self.tier().into());
        l.insert(LABEL_ROLE.into(), self.role().into());
        l
    }
}

/// Renders a label map as a selector string (`a=b,c=d`), as the scale subresource wants.
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
