//! Deployment, Service and ConfigMap builders for worker pods.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ImageVolumeSource, KeyToPath, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    SleepAction, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::labels::{ChildKind, HEADLESS, WORKER_PORT};
use super::placement::PlacementPlan;
use crate::crd::{
    EdgeModel, EscalationPolicy, ModelSpec, SecretKeyRef, ServiceExposure, ServingSpec,
};

/// Where the placement ConfigMap is mounted in router and expert pods.
pub const PLACEMENT_DIR: &str = "/etc/tidal/placement";
/// How long a terminating worker keeps serving before SIGTERM: long enough for kube-proxy and
/// the routers to stop sending it requests once its pod is terminating. 5 s was not always
/// enough on a busy 2-core node (a CI run saw one connection refused after a scale-down).
pub const PRE_STOP_SLEEP_SECONDS: i64 = 10;
const PROBE_TIMEOUT_SECONDS: i32 = 3;

/// What every child of one InferenceService shares.
pub(super) struct Base<'a> {
    pub service: &'a str,
    pub namespace: &'a str,
    pub owner: &'a OwnerReference,
    pub image: &'a str,
    pub served_name: &'a str,
    /// The Secret key holding the API keys the OpenAI endpoints require, if any.
    pub api_keys: Option<&'a SecretKeyRef>,
    /// The `kubernetes.io/tls` Secret (with `ca.crt`) the workers serve and verify with.
    pub tls_secret: Option<&'a str>,
    /// Batching and prefix reuse of the workers that answer requests.
    pub serving: Option<&'a ServingSpec>,
}

impl Base<'_> {
    /// `http` or, with TLS, `https`: the scheme of every URL between workers.
    pub fn scheme(&self) -> &'static str {
        if self.tls_secret.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// The worker's command line and environment (the contract with `tidal-worker serve`).
/// Required settings are flags, so a worker that lacks one fails loudly at start; settings a
/// role may ignore are `TIDAL_*` environment variables.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct WorkerArgs {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Where the API keys Secret is mounted, and the file in it the worker reads.
pub const AUTH_DIR: &str = "/etc/tidal/auth";
pub const API_KEYS_FILE: &str = "api-keys";

/// Where the TLS Secret is mounted, and its files (cert-manager's names).
pub const TLS_DIR: &str = "/etc/tidal/tls";
pub const TLS_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// The extended resource NVIDIA's device plugin advertises.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Where an `oci://` model is mounted in the worker (an image volume, read-only).
pub const MODEL_MOUNT: &str = "/models/model";

/// The image reference of an `oci://` model URI.
pub fn oci_model_reference(uri: &str) -> Option<&str> {
    uri.strip_prefix("oci://")
}

impl WorkerArgs {
    fn model(uri: &str, dtype: &str, role: &str) -> Self {
        // An OCI artifact reaches the pod as an image volume; the worker reads the files.
        let uri = if oci_model_reference(uri).is_some() {
            MODEL_MOUNT
        } else {
            uri
        };
        let args = [
            "serve",
            "--model",
            uri,
            "--dtype",
            dtype,
            "--role",
            role,
            // The pod IP (downward API), not 0.0.0.0: the worker listens only where it is reached.
            "--listen",
            "$(POD_IP):8080",
        ];
        WorkerArgs {
            args: args.into_iter().map(String::from).collect(),
            env: vec![],
        }
    }
    pub(super) fn with_env(mut self, name: &str, value: impl ToString) -> Self {
        self.env.push((name.into(), value.to_string()));
        self
    }
    /// A full worker whose limits grant a GPU (`nvidia.com/gpu`) runs its model there
    /// (`TIDAL_DEVICE=cuda`; the image must be the worker's CUDA build, deploy/cuda/). A
    /// router or expert shard keeps to the CPU: they exchange CPU tensors, and the worker
    /// refuses a GPU in those roles.
    pub(super) fn with_gpu_from(self, resources: Option<&ResourceRequirements>) -> Self {
        let gpus = resources
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(GPU_RESOURCE))
            .is_some_and(|q| !matches!(q.0.trim(), "" | "0"));
        let full = self.args.windows(2).any(|p| p == ["--role", "full"]);
        if gpus && full {
            self.with_env("TIDAL_DEVICE", "cuda")
        } else {
            self
        }
    }
    pub fn full(m: &ModelSpec) -> Self {
        let a = Self::model(&m.uri, m.dtype.as_str(), "full");
        match m.context_length {
            Some(c) => a.with_env("TIDAL_CONTEXT_LENGTH", c),
            None => a,
        }
    }
    pub fn router(m: &ModelSpec) -> Self {
        let mut a = Self::full(m);
        a.args[6] = "router".into();
        a.with_env("TIDAL_PLACEMENT_FILE", format!("{PLACEMENT_DIR}/plan.json"))
    }
    pub fn expert(m: &ModelSpec, shard: u32) -> Self {
        Self::model(&m.uri, m.dtype.as_str(), "expert")
            .with_env("TIDAL_PLACEMENT_FILE", format!("{PLACEMENT_DIR}/plan.json"))
            .with_env("TIDAL_SHARD", shard)
    }
    pub fn edge(m: &EdgeModel, cloud_url: &str, e: &EscalationPolicy) -> Self {
        Self::model(&m.uri, m.dtype.as_str(), "full")
            .with_env("TIDAL_ESCALATE_TO", cloud_url)
            .with_env("TIDAL_CONFIDENCE_THRESHOLD", e.confidence_threshold)
            .with_env("TIDAL_ESCALATE_ON_OVERLOAD", e.escalate_on_overload)
            .with_env(
                "TIDAL_ON_CLOUD_UNAVAILABLE",
                e.on_cloud_unavailable.as_str(),
            )
    }
}

fn meta(base: &Base, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(base.namespace.to_string()),
        labels: Some(labels),
        owner_references: Some(vec![base.owner.clone()]),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32, failures: i32, scheme: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            // The kubelet does not verify the certificate of an HTTPS probe. HTTP is the
            // default and left unset, so templates without TLS stay as they were.
            scheme: (scheme == "https").then(|| "HTTPS".to_string()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        // A worker decoding at full load on a shared node may answer a probe late:
        // that is not a reason to drop it from its Service (1 s by default).
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
        ..Default::default()
    }
}

fn volume(name: &str, mount: &str, source: Volume) -> (Volume, VolumeMount) {
    // Only scratch (emptyDir) is writable: plan, model and keys are read-only.
    let read_only = source.empty_dir.is_none();
    (
        Volume {
            name: name.into(),
            ..source
        },
        VolumeMount {
            name: name.into(),
            mount_path: mount.into(),
            read_only: Some(read_only),
            ..Default::default()
        },
    )
}

fn empty_dir(name: &str, mount: &str) -> (Volume, VolumeMount) {
    volume(
        name,
        mount,
        Volume {
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn deployment(
    base: &Base,
    kind: &ChildKind,
    replicas: i32,
    model_uri: &str,
    args: WorkerArgs,
    resources: Option<ResourceRequirements>,
    node_selector: Option<BTreeMap<String, String>>,
    tolerations: Option<Vec<Toleration>>,
    placement_config_map: Option<&str>,
) -> Deployment {
    let labels = kind.labels(base.service);
    // Writable scratch and the model cache on emptyDirs: the root filesystem is read-only.
    let mut vols = vec![
        empty_dir("tmp", "/tmp"),
        empty_dir("model-cache", "/var/cache/tidal"),
    ];
    if let Some(cm) = placement_config_map {
        vols.push(volume(
            "placement",
            PLACEMENT_DIR,
            Volume {
                config_map: Some(ConfigMapVolumeSource {
                    name: cm.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ));
    }
    if let Some(reference) = oci_model_reference(model_uri) {
        // Modelcar style: the checkpoint is an OCI artifact the kubelet pulls and mounts like
        // an image, so models move through registries, mirrors and caches like images do.
        vols.push(volume(
            "model",
            MODEL_MOUNT,
            Volume {
                image: Some(ImageVolumeSource {
                    reference: Some(reference.into()),
                    pull_policy: Some("IfNotPresent".into()),
                }),
                ..Default::default()
            },
        ));
    }
    // Workers that serve the OpenAI API (not expert shards) require the service's keys.
    let api_keys = base
        .api_keys
        .filter(|_| !matches!(kind, ChildKind::ExpertShard(_)));
    if let Some(secret) = api_keys {
        vols.push(volume(
            "api-keys",
            AUTH_DIR,
            Volume {
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    items: Some(vec![KeyToPath {
                        key: secret.key().into(),
                        path: API_KEYS_FILE.into(),
                        ..Default::default()
                    }]),
                    // Only the worker's user reads it.
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ));
    }
    if let Some(secret) = base.tls_secret {
        vols.push(volume(
            "tls",
            TLS_DIR,
            Volume {
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.into()),
                    items: Some(
                        TLS_FILES
                            .iter()
                            .map(|f| KeyToPath {
                                key: (*f).into(),
                                path: (*f).into(),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ));
    }
    let (volumes, mounts): (Vec<_>, Vec<_>) = vols.into_iter().unzip();
    let mut env = vec![
        EnvVar {
            name: "POD_IP".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        EnvVar {
            name: "TIDAL_SERVED_MODEL_NAME".into(),
            value: Some(base.served_name.into()),
            ..Default::default()
        },
        EnvVar {
            name: "HF_HOME".into(),
            value: Some("/var/cache/tidal/hf".into()),
            ..Default::default()
        },
    ];
    if let (Some(serving), false) = (base.serving, matches!(kind, ChildKind::ExpertShard(_))) {
        // Expert shards run no engine: batching and prompts are the router's.
        env.extend(serving.env().into_iter().map(|(name, value)| EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        }));
    }
    if api_keys.is_some() {
        env.push(EnvVar {
            name: "TIDAL_API_KEYS_FILE".into(),
            value: Some(format!("{AUTH_DIR}/{API_KEYS_FILE}")),
            ..Default::default()
        });
    }
    if base.tls_secret.is_some() {
        let mut tls_env = vec![
            ("TIDAL_TLS_CERT_FILE", "tls.crt"),
            ("TIDAL_TLS_KEY_FILE", "tls.key"),
        ];
        match kind {
            // The router verifies its shards, an edge worker its cloud, with the same CA.
            ChildKind::Router => tls_env.push(("TIDAL_SHARD_CA_FILE", "ca.crt")),
            ChildKind::Edge(_) => tls_env.push(("TIDAL_ESCALATION_CA_FILE", "ca.crt")),
            ChildKind::Cloud | ChildKind::ExpertShard(_) => {}
        }
        env.extend(tls_env.into_iter().map(|(name, file)| EnvVar {
            name: name.into(),
            value: Some(format!("{TLS_DIR}/{file}")),
            ..Default::default()
        }));
    }
    env.extend(args.env.into_iter().map(|(name, value)| EnvVar {
        name,
        value: Some(value),
        ..Default::default()
    }));
    let container = Container {
        name: "worker".into(),
        image: Some(base.image.into()),
        args: Some(args.args),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: WORKER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(env),
        resources,
        // Ready only once the model is loaded and warm; a long start is not a liveness failure.
        readiness_probe: Some(probe("/ready", 5, 3, base.scheme())),
        liveness_probe: Some(probe("/health", 10, 6, base.scheme())),
        startup_probe: Some(probe("/health", 5, 120, base.scheme())),
        // SIGTERM makes the worker refuse new generations, while kube-proxy and routers may
        // still send it some until the EndpointSlice drops the pod: wait that out first, so a
        // scale-down fails no request. Kubernetes' own sleep (the image has no shell).
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), WORKER_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    if base.tls_secret.is_some() {
        // The chart's scrape config reads the scheme from here.
        annotations.insert("prometheus.io/scheme".into(), "https".into());
    }
    if let ChildKind::Edge(node) = kind {
        annotations.insert("tidal.rs/edge-node".into(), node.clone());
    }
    Deployment {
        metadata: meta(base, kind.name(base.service), labels.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(kind.selector_labels(base.service)),
                ..Default::default()
            },
            // Never drop below the desired capacity while rolling out a new model or plan.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    node_selector,
                    tolerations,
                    volumes: Some(volumes),
                    automount_service_account_token: Some(false),
                    // In-flight generations finish on SIGTERM (the worker drains); give them time
                    // (the grace period includes the preStop sleep).
                    termination_grace_period_seconds: Some(60 + PRE_STOP_SLEEP_SECONDS),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// A workload's Service; `exposure` sets its type (left unset, i.e. ClusterIP, without one,
/// so Services from before the field existed are not rewritten).
pub(super) fn service(
    base: &Base,
    kind: &ChildKind,
    exposure: Option<&ServiceExposure>,
) -> Service {
    let mut metadata = meta(
        base,
        kind.service_name(base.service),
        kind.labels(base.service),
    );
    if let Some(a) = exposure.and_then(|e| e.annotations.clone()) {
        metadata
            .annotations
            .get_or_insert_with(Default::default)
            .extend(a);
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: exposure.map(|e| e.type_.as_str().to_string()),
            // A shard's Service is headless: its DNS name resolves to the Ready pods, which
            // the router balances and fails over between itself. Behind a ClusterIP its one
            // long-lived HTTP/2 connection would stick to one pod (the others idle) and a
            // crash of that pod would fail the layer calls in flight with nowhere to retry.
            cluster_ip: kind.is_headless().then(|| HEADLESS.to_string()),
            selector: Some(kind.selector_labels(base.service)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: WORKER_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether `live` must be deleted before `desired` can be applied: `spec.clusterIP` cannot
/// change, so a Service turning headless (or back) is replaced. Its DNS name stays; clients
/// re-resolve it.
pub fn service_needs_replacing(desired: &Service, live: &Service) -> bool {
    let headless =
        |s: &Service| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some(HEADLESS);
    let has_ip = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .is_some_and(|ip| !ip.is_empty())
    };
    // A live Service always has an address or "None"; one not yet allocated never conflicts.
    has_ip(live) && headless(desired) != headless(live)
}

pub(super) fn placement_config_map(base: &Base, name: &str, plan: &PlacementPlan) -> ConfigMap {
    let mut labels = ChildKind::Router.labels(base.service);
    labels.insert("app.kubernetes.io/component".into(), "placement".into());
    ConfigMap {
        metadata: meta(base, name.into(), labels),
        data: Some(BTreeMap::from([(
            "plan.json".to_string(),
            serde_json::to_string_pretty(plan).expect("plan serialises"),
        )])),
        ..Default::default()
    }
}
