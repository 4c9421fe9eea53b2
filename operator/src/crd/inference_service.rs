//! `InferenceService`: one served model, its cloud tier (optionally with MoE experts in their own
//! shards), its edge tier and how it is autoscaled.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired state of an InferenceService.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tidal.rs",
    version = "v1alpha1",
    kind = "InferenceService",
    plural = "inferenceservices",
    shortname = "tis",
    category = "tidal",
    namespaced,
    status = "InferenceServiceStatus",
    doc = "An LLM served by Tidal across a cloud tier (optionally with MoE experts in their own \
           shards) and an edge tier, scaled ahead of demand.",
    scale(
        spec_replicas_path = ".spec.cloud.replicas",
        status_replicas_path = ".status.cloud.replicas",
        label_selector_path = ".status.cloud.selector"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.architecture"
    ),
    printcolumn(
        name = "Cloud",
        type_ = "string",
        json_path = ".status.cloudReady",
        description = "cloud tier ready/desired replicas"
    ),
    printcolumn(
        name = "Experts",
        type_ = "string",
        json_path = ".status.expertsReady",
        description = "expert shard replicas ready/desired"
    ),
    printcolumn(
        name = "Edge",
        type_ = "string",
        json_path = ".status.edgeReady",
        description = "edge replicas ready/desired"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.cloud.experts) || self.model.architecture in ['mixtral', 'qwen2moe', 'deepseekv2']")
    .message("cloud.experts (expert shards) needs an MoE model the router and shards serve: set model.architecture to mixtral, qwen2moe or deepseekv2")
    .field_path(".cloud.experts"))]
#[x_kube(validation = Rule::new("!has(self.cloud.experts) || !has(self.model.numExperts) || self.cloud.experts.shards <= self.model.numExperts")
    .message("cloud.experts.shards cannot exceed model.numExperts: every shard must hold at least one expert")
    .field_path(".cloud.experts.shards"))]
#[x_kube(validation = Rule::new("has(self.auth) || ((!has(self.cloud.service) || !has(self.cloud.service.type) || self.cloud.service.type == 'ClusterIP') && (!has(self.edge) || !has(self.edge.service) || !has(self.edge.service.type) || self.edge.service.type == 'ClusterIP'))")
    .message("a Service of type NodePort or LoadBalancer exposes the OpenAI API outside the cluster: set spec.auth.apiKeySecret")
    .field_path(".auth"))]
pub struct InferenceServiceSpec {
    /// The model to serve in the cloud tier.
    pub model: ModelSpec,
    /// The cloud tier: a full-model (or router) Deployment, and expert shards for MoE models.
    pub cloud: CloudTier,
    /// The edge tier: a smaller model on selected EdgeNodes that escalates hard requests to
    /// the cloud tier. Omit to serve from the cloud only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgeTier>,
    /// How replicas are scaled ahead of demand. Omit to keep replicas where the spec puts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// The worker image; defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("image must not be empty"))]
    pub image: Option<String>,
    /// Require an API key (`Authorization: Bearer <key>`) on the OpenAI endpoints of every
    /// tier. Health, readiness and metrics stay open for probes and Prometheus. Omit to
    /// serve without keys (inside a trusted network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Serve HTTPS on every worker and verify it between them: edge -> cloud escalation and
    /// router -> expert shards. Omit for plain HTTP (inside a trusted network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// How each worker that answers requests (cloud full or router, edge) batches and
    /// reuses prompts. Omit for the worker's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingSpec>,
}

/// Per-worker serving settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Most sequences decoded together in one step (worker default 16). Larger batches
    /// raise throughput and each request's time per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch: Option<u32>,
    /// Memory per worker for reusing shared prompt prefixes (system prompts, earlier chat
    /// turns) instead of recomputing them; 0 turns reuse off (worker default 256). Count it
    /// in the pods' memory requests.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "prefixCacheMiB"
    )]
    #[schemars(range(min = 0, max = 1048576))]
    pub prefix_cache_mib: Option<u32>,
    /// Tokens per prefix-cache block: only whole blocks are reused (worker default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub prefix_block_tokens: Option<u32>,
    /// Prompt tokens computed per step beside the running sequences' decode step (chunked
    /// prefill, worker default 512): smaller keeps time per output token steadier under long
    /// prompts, larger gives long prompts their first token sooner; 0 computes prompts whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1048576))]
    pub prefill_chunk_tokens: Option<u32>,
}

impl ServingSpec {
    /// The worker environment these settings become.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        [
            ("TIDAL_MAX_BATCH", self.max_batch),
            ("TIDAL_PREFIX_CACHE_MIB", self.prefix_cache_mib),
            ("TIDAL_PREFIX_BLOCK_TOKENS", self.prefix_block_tokens),
            ("TIDAL_PREFILL_CHUNK_TOKENS", self.prefill_chunk_tokens),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v.to_string())))
        .collect()
    }
}

/// TLS of the workers, from one Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in the service's namespace with `tls.crt`, `tls.key` and `ca.crt` (the layout
    /// cert-manager writes). The certificate must name the service's Services, e.g.
    /// `*.<namespace>.svc.cluster.local`; `ca.crt` is the CA the workers verify each other
    /// with. Mounted into the workers, never read by the operator; a renewed Secret applies
    /// without a restart.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && self.size() <= 253")
        .message("secretName must be a Secret name (lowercase DNS subdomain)"))]
    pub secret_name: String,
}

/// API-key authentication of the workers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// The Secret (in the service's namespace) holding the accepted keys, one per line.
    /// Mounted into the workers, never read by the operator; a rotated Secret applies
    /// without a restart. Edge workers present the first key to the cloud tier.
    pub api_key_secret: SecretKeyRef,
}

/// A key of a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && self.size() <= 253")
        .message("name must be a Secret name (lowercase DNS subdomain)"))]
    pub name: String,
    /// The key within the Secret; `api-keys` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$') && self.size() <= 253")
        .message("key must consist of alphanumerics, '-', '_' or '.'"))]
    pub key: Option<String>,
}

impl SecretKeyRef {
    pub const DEFAULT_KEY: &'static str = "api-keys";

    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(Self::DEFAULT_KEY)
    }
}

/// What to serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the worker loads the checkpoint from (Hugging Face layout: config.json,
    /// *.safetensors, tokenizer.json; or a GGUF file, kept quantized: a path ending in
    /// `.gguf`, or a directory or OCI artifact holding one `.gguf`): an absolute path (e.g. on a PVC mounted at /models),
    /// `file:///path`, `hf://org/name[@revision]` (downloaded by the worker at start), or
    /// `oci://registry/repository:tag` — an OCI artifact whose files are the checkpoint, pulled
    /// by the kubelet and mounted read-only as an image volume (modelcar style).
    #[x_kube(validation = Rule::new("self.startsWith('/') || self.startsWith('file:///') || self.matches('^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$') || self.matches('^oci://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|@sha256:[a-f0-9]{64})$')")
        .message("model uri must be an absolute path, file:///path, hf://org/name[@revision] or oci://registry/repository:tag (or @sha256:digest)"))]
    #[schemars(length(min = 1, max = 1024))]
    pub uri: String,
    /// Model family: `mixtral`, `qwen2moe`, `deepseekv2` or `qwen3moe` (MoE; expert shards
    /// for the first three), or the dense `llama`, `mistral`, `qwen2`, `qwen3`.
    pub architecture: Architecture,
    /// Number of routed experts per MoE layer (MoE models only; read from config.json when
    /// omitted). Used to plan expert shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub num_experts: Option<u32>,
    /// Maximum context length (prompt + generated tokens) the worker accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 128, max = 1048576))]
    pub context_length: Option<u32>,
    /// Weight data type on the worker.
    #[serde(default)]
    pub dtype: DType,
    /// Name clients use in the OpenAI API's `model` field; defaults to the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 128").message("servedName must be 1 to 128 characters"))]
    pub served_name: Option<String>,
}

/// Supported model families.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Mixture-of-Experts decoder (Mixtral family): top-k softmax gating over N experts.
    Mixtral,
    /// Dense Llama-family decoder.
    Llama,
    /// Dense Mistral decoder.
    Mistral,
    /// Dense Qwen2 decoder.
    Qwen2,
    /// Dense Qwen3 decoder.
    Qwen3,
    /// Qwen3-MoE decoder (GGUF checkpoints).
    Qwen3moe,
    /// Qwen2-MoE decoder (Qwen1.5-MoE): routed experts plus a gated shared expert.
    Qwen2moe,
    /// DeepSeek-V2 (V2-Lite): multi-head latent attention, routed plus shared experts
    /// (safetensors checkpoints).
    Deepseekv2,
}

impl Architecture {
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Architecture::Mixtral
                | Architecture::Qwen3moe
                | Architecture::Qwen2moe
                | Architecture::Deepseekv2
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Mixtral => "mixtral",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3moe => "qwen3moe",
            Architecture::Qwen2moe => "qwen2moe",
            Architecture::Deepseekv2 => "deepseekv2",
        }
    }
}

/// Weight data type.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    #[default]
    Bf16,
}

impl DType {
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    4
}

/// The cloud tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("cloud.minReplicas must be less than or equal to cloud.maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.replicas) || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)")
    .message("cloud.replicas must lie within [minReplicas, maxReplicas]")
    .field_path(".replicas"))]
pub struct CloudTier {
    /// Current target replicas of the full-model (or router) Deployment. `kubectl scale`
    /// writes it; the autoscaler updates it. Defaults to minReplicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: Option<i32>,
    /// Fewest replicas the cloud tier runs (0 allows scale to zero).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,
    /// Most replicas the cloud tier runs.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// Compute resources of each cloud worker (e.g. `nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels cloud workers must run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of cloud workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Serve MoE experts from their own Deployments ("expert shards"), separate from the
    /// router pods that hold embeddings, attention and gates. MoE models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertsSpec>,
    /// How the cloud tier's Service (the OpenAI API) is reached. Omit for a ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceExposure>,
}

/// The Service in front of a tier's OpenAI API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExposure {
    /// `ClusterIP` (inside the cluster), or `NodePort` / `LoadBalancer`, which reach outside
    /// it and so require `spec.auth`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations of the Service (e.g. a cloud load balancer's settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A Kubernetes Service type.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

fn default_one_i32() -> i32 {
    1
}

/// Expert shards of an MoE model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicasPerShard <= self.maxReplicasPerShard")
    .message("experts.minReplicasPerShard must be less than or equal to experts.maxReplicasPerShard"))]
pub struct ExpertsSpec {
    /// Number of expert shards (Deployments); experts are spread over them by the placement
    /// policy.
    #[schemars(range(min = 1, max = 256))]
    pub shards: u32,
    /// Fewest replicas of each shard.
    #[serde(default = "default_one_i32")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas_per_shard: i32,
    /// Most replicas of each shard (hot experts get the extra replicas).
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas_per_shard: i32,
    /// How experts are assigned to shards.
    #[serde(default)]
    pub placement: PlacementPolicy,
    /// Compute resources of each expert-shard worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Routed tokens per second (summed over layers) one shard replica sustains; the
    /// autoscaler sizes shards from per-expert token-rate forecasts with it. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 100000000.0))]
    pub target_tokens_per_second_per_replica: Option<f64>,
    /// Experts one shard can hold (memory). Slots beyond an even split hold redundant copies
    /// of hot experts. Default: an even split plus one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub slots_per_shard: Option<u32>,
}

/// Expert placement policy.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum PlacementPolicy {
    /// Experts i..j in shard k, in order; the starting plan before any load is measured.
    Contiguous,
    /// EPLB-style: balance forecast per-expert load over shards, with redundant replicas of
    /// hot experts (the autoscaler refines the plan from metrics).
    #[default]
    Balanced,
}

/// The edge tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicasPerNode <= self.maxReplicasPerNode")
    .message("edge.minReplicasPerNode must be less than or equal to edge.maxReplicasPerNode"))]
pub struct EdgeTier {
    /// The (smaller) model edge workers serve.
    pub model: EdgeModel,
    /// Which EdgeNodes run this service (labels of the EdgeNode objects).
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)")
        .message("edge.edgeNodeSelector must select EdgeNodes with matchLabels or matchExpressions"))]
    pub edge_node_selector: LabelSelector,
    /// Fewest replicas on each selected, online EdgeNode. 0 lets a quiet site sleep (under
    /// one request per autoscaling interval for its scale-down window): its Service then routes
    /// its clients to the cloud tier, whose workers count their requests as the site's, and
    /// the autoscaler brings a replica back when its forecast or that demand asks for one.
    #[serde(default = "default_one_i32")]
    #[schemars(range(min = 0, max = 64))]
    pub min_replicas_per_node: i32,
    /// Most replicas on each selected EdgeNode.
    #[serde(default = "default_one_i32")]
    #[schemars(range(min = 1, max = 64))]
    pub max_replicas_per_node: i32,
    /// When edge workers hand a request to the cloud tier.
    #[serde(default)]
    pub escalation: EscalationPolicy,
    /// Compute resources of each edge worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// How each site's Service is reached (e.g. `NodePort` for clients on the site's own
    /// network). Omit for a ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceExposure>,
}

/// The edge tier's model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeModel {
    /// Checkpoint location, as for `model.uri`.
    #[x_kube(validation = Rule::new("self.startsWith('/') || self.startsWith('file:///') || self.matches('^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$') || self.matches('^oci://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|@sha256:[a-f0-9]{64})$')")
        .message("edge model uri must be an absolute path, file:///path, hf://org/name[@revision] or oci://registry/repository:tag (or @sha256:digest)"))]
    #[schemars(length(min = 1, max = 1024))]
    pub uri: String,
    /// Model family.
    pub architecture: Architecture,
    /// Weight data type.
    #[serde(default)]
    pub dtype: DType,
}

fn default_confidence() -> f64 {
    0.5
}
fn default_true() -> bool {
    true
}

/// Edge-to-cloud escalation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EscalationPolicy {
    /// Escalate when the edge model's confidence (mean max-softmax probability over the
    /// recent generated tokens) falls below this value. 0 never escalates on confidence.
    #[serde(default = "default_confidence")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub confidence_threshold: f64,
    /// Escalate instead of answering 429 when the edge worker's queue is full.
    #[serde(default = "default_true")]
    pub escalate_on_overload: bool,
    /// What an edge worker does when it should escalate but the cloud is unreachable.
    #[serde(default)]
    pub on_cloud_unavailable: CloudUnavailable,
}

impl Default for EscalationPolicy {
    fn default() -> Self {
        EscalationPolicy {
            confidence_threshold: default_confidence(),
            escalate_on_overload: true,
            on_cloud_unavailable: CloudUnavailable::default(),
        }
    }
}

/// Behaviour when the cloud tier cannot be reached.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum CloudUnavailable {
    /// Answer locally and mark the response as not escalated.
    #[default]
    ServeLocally,
    /// Fail the request with a clear error.
    Fail,
}

impl CloudUnavailable {
    pub fn as_str(self) -> &'static str {
        match self {
            CloudUnavailable::ServeLocally => "serve-locally",
            CloudUnavailable::Fail => "fail",
        }
    }
}

/// Whether the autoscaler's decisions are applied.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum AutoscalingMode {
    /// Decisions change replicas (and roll out expert placements).
    #[default]
    Active,
    /// Decisions are published, never applied.
    Advisory,
}

fn default_interval() -> u32 {
    15
}
fn default_quantile() -> f64 {
    0.9
}

/// Forecast-driven autoscaling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Turn the autoscaler off to keep replicas where the spec puts them.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `Active` scales the service; `Advisory` computes and publishes every decision (status
    /// `recommendedReplicas`, Events, metrics: recommended vs actual) and leaves replicas where
    /// the spec puts them: how to trial the autoscaler before trusting it.
    #[serde(default)]
    pub mode: AutoscalingMode,
    /// Prometheus base URL the autoscaler queries (defaults to the operator's --prometheus-url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^\\\\s]+$')").message("prometheusUrl must be an http(s) URL"))]
    pub prometheus_url: Option<String>,
    /// Seconds between autoscaler decisions.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 5, max = 3600))]
    pub interval_seconds: u32,
    /// Service-level objectives: the autoscaler keeps enough spare capacity for queueing to stay
    /// within what the TTFT with no queue leaves of `ttftP95Ms`, and a breach it cannot explain
    /// by bursty arrivals lowers its capacity estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// Requests per second one cloud replica sustains within the SLO (refined online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 1000000.0))]
    pub target_rps_per_replica: Option<f64>,
    /// Forecast settings.
    #[serde(default)]
    pub forecast: ForecastSpec,
    /// How fast replicas are added.
    #[serde(default = "ScalingBehavior::default_up")]
    pub scale_up: ScalingBehavior,
    /// How fast replicas are removed.
    #[serde(default = "ScalingBehavior::default_down")]
    pub scale_down: ScalingBehavior,
    /// Add cloud replicas for an edge site's forecast load while that site is offline.
    #[serde(default = "default_true")]
    pub prescale_cloud_for_edge: bool,
}

/// Service-level objectives.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Target p95 time to first token, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub ttft_p95_ms: Option<u32>,
    /// Target p95 time per output token, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub tpot_p95_ms: Option<u32>,
}

/// Forecast settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ForecastSpec {
    /// Forecasting method.
    #[serde(default)]
    pub method: ForecastMethod,
    /// How far ahead to provision, in seconds. Defaults to the measured p90 time a new
    /// replica needs to become ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub horizon_seconds: Option<u32>,
    /// Quantile of the predicted load to provision for (0.5 = the median forecast).
    #[serde(default = "default_quantile")]
    #[schemars(range(min = 0.5, max = 0.999))]
    pub quantile: f64,
}

impl Default for ForecastSpec {
    fn default() -> Self {
        ForecastSpec {
            method: ForecastMethod::default(),
            horizon_seconds: None,
            quantile: default_quantile(),
        }
    }
}

/// Forecasting method.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ForecastMethod {
    /// Seasonal (MSTL) when history is long enough, ETS otherwise, naive while it is short.
    #[default]
    Auto,
    /// Exponential smoothing with prediction intervals.
    Ets,
    /// Multiple seasonal-trend decomposition with an ETS trend model.
    Mstl,
    /// Last value plus recent variability (no forecasting).
    Naive,
}

/// Scale-up or scale-down behaviour.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingBehavior {
    /// Act on the most conservative recommendation of this many past seconds.
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: u32,
    /// Most replicas added or removed per decision, per tier/site/shard.
    #[schemars(range(min = 1, max = 1000))]
    pub max_step: u32,
}

impl ScalingBehavior {
    pub fn default_up() -> Self {
        ScalingBehavior {
            stabilization_window_seconds: 0,
            max_step: 4,
        }
    }
    pub fn default_down() -> Self {
        ScalingBehavior {
            stabilization_window_seconds: 300,
            max_step: 1,
        }
    }
}

/// Observed state of an InferenceService.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceStatus {
    /// The generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, MetricsAvailable, ScalingLimited.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The cloud tier's full-model or router Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<TierStatus>,
    /// Expert shards, one entry per shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ShardStatus>,
    /// Edge sites, one entry per selected EdgeNode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edge: Vec<EdgeSiteStatus>,
    /// Cloud tier `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_ready: Option<String>,
    /// Expert shards `ready/desired` replicas summed over shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_ready: Option<String>,
    /// Edge `ready/desired` replicas summed over sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_ready: Option<String>,
    /// The autoscaler's last forecast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_forecast: Option<ForecastStatus>,
    /// The autoscaler's last scaling decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<DecisionStatus>,
    /// Replicas the autoscaler decided, by Deployment name; the controller applies these
    /// instead of the spec's while autoscaling is enabled.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub autoscaled_replicas: BTreeMap<String, i32>,
    /// `autoscaling.mode: Advisory`: the replicas the autoscaler would set, by Deployment
    /// name (not applied; compare with each Deployment's replicas).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recommended_replicas: BTreeMap<String, i32>,
    /// The expert placement the autoscaler chose, and how far its rollout has got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
}

/// An expert placement plan being rolled out: shards first load the experts they will hold
/// (`held`), and only once every shard Deployment is rolled out does the router switch to
/// `experts`; experts no longer routed to a shard are dropped after that.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// Increases with every new plan.
    pub version: u32,
    /// `Warming` (shards loading new experts; routing unchanged), `Switching` (router uses the
    /// new plan; shards still hold the old experts) or `Active`.
    pub phase: String,
    /// One entry per shard.
    pub shards: Vec<ShardPlacement>,
    /// Why this plan was made, or why the rollout before it was superseded or settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One shard of a placement plan.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlacement {
    pub shard: u32,
    /// Experts the router sends to this shard.
    pub experts: Vec<u32>,
    /// Experts this shard loads (a superset of `experts` during a rollout).
    pub held: Vec<u32>,
    /// While `Warming`: the experts the router will send to this shard once every shard
    /// holds them. Kept in status so a restarted or new leader finishes the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<u32>>,
}

/// Replicas of one Deployment.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// The Deployment's name.
    pub deployment: String,
    /// Replicas the operator wants.
    pub desired: i32,
    /// Replicas that exist (the scale subresource's status).
    pub replicas: i32,
    /// Replicas that are ready.
    pub ready_replicas: i32,
    /// Label selector of the pods (for the scale subresource / HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// One expert shard.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard index.
    pub shard: u32,
    /// Experts this shard holds.
    pub experts: Vec<u32>,
    #[serde(flatten)]
    pub replicas: TierStatus,
}

/// One edge site.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EdgeSiteStatus {
    /// The EdgeNode.
    pub edge_node: String,
    /// The EdgeNode's phase when last seen.
    pub phase: String,
    /// What the site's Service routes to: `edge` (its own replicas, while one is ready) or
    /// `cloud` (the cloud tier's, while none is: scaled to zero, starting, or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    #[serde(flatten)]
    pub replicas: TierStatus,
}

/// A forecast of the request rate.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ForecastStatus {
    /// When it was made.
    pub time: Option<Time>,
    /// Observed requests per second now.
    pub now: f64,
    /// Point forecast at the horizon.
    pub predicted: f64,
    /// Upper bound at the configured quantile.
    pub upper: f64,
    /// Horizon in seconds.
    pub horizon_seconds: u32,
}

/// A scaling decision.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DecisionStatus {
    /// When it was made.
    pub time: Option<Time>,
    /// Why, in words.
    pub reason: String,
}
