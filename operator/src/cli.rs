//! Command line of `tidal-operator` (every flag also reads an environment variable).

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tidal-operator",
    version,
    about = "Tidal: forecast-driven serving of MoE LLMs across cloud and edge"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers (with leader election).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "TIDAL_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    pub metrics_addr: SocketAddr,
    /// Worker image for InferenceServices that name none.
    #[arg(
        long,
        env = "TIDAL_WORKER_IMAGE",
        default_value = "ghcr.io/tidal-rs/tidal-worker:0.1.0"
    )]
    pub worker_image: String,
    /// Cluster DNS domain used in endpoints written to placement plans.
    #[arg(long, env = "TIDAL_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "TIDAL_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "TIDAL_LEASE_NAME", default_value = "tidal-operator")]
    pub lease_name: String,
    /// Seconds a leader's Lease is valid without renewal.
    #[arg(long, env = "TIDAL_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// This replica's identity in the Lease and in Events (defaults to the hostname + pid).
    #[arg(long, env = "TIDAL_IDENTITY")]
    pub identity: Option<String>,
    /// Disable leader election (a single replica).
    #[arg(long, env = "TIDAL_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Watch InferenceServices in this namespace only (default: all namespaces).
    #[arg(long, env = "TIDAL_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Manage only the EdgeNodes these labels select (a label selector, e.g.
    /// `tidal.rs/edge-pool=eu-stores`; default: every EdgeNode). EdgeNodes are cluster-scoped:
    /// two operators in one cluster (namespace-scoped installs) need disjoint selectors, or both
    /// would publish every EdgeNode's phase.
    #[arg(long, env = "TIDAL_EDGE_NODE_SELECTOR")]
    pub edge_node_selector: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "TIDAL_LOG_JSON")]
    pub log_json: bool,
    /// Prometheus base URL for InferenceServices whose spec names none.
    #[arg(long, env = "TIDAL_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// `rate()` window of the autoscaler's queries (at least four scrape intervals).
    #[arg(long, env = "TIDAL_RATE_WINDOW", default_value = "1m")]
    pub rate_window: String,
    /// Seconds a new replica is assumed to need to become ready, until one has been measured.
    #[arg(long, env = "TIDAL_DEFAULT_READY_SECONDS", default_value_t = 60.0)]
    pub default_ready_seconds: f64,
    /// Reconciles each controller runs at once (0: unbounded). Bounds the burst of API
    /// requests when thousands of objects change together (start-up, an edge region going
    /// offline).
    #[arg(long, env = "TIDAL_MAX_CONCURRENT_RECONCILES", default_value_t = 16)]
    pub max_concurrent_reconciles: u16,
    /// Milliseconds an object's reconcile waits for further changes to it before running, so a
    /// burst of updates (a rollout's status changes) costs one reconcile.
    #[arg(long, env = "TIDAL_RECONCILE_DEBOUNCE_MS", default_value_t = 200)]
    pub reconcile_debounce_ms: u64,
    /// Seconds between the fast path's readings of every ready worker's queue depth (its own
    /// `/metrics`), which scale a target up on a backlog sustained over 6 s between the slow
    /// ticks; 0 turns the fast path off.
    #[arg(long, env = "TIDAL_FAST_PATH_INTERVAL_SECONDS", default_value_t = 2.0)]
    pub fast_path_interval_seconds: f64,
    /// Do not run the autoscaler (replicas then follow the spec).
    #[arg(long, env = "TIDAL_DISABLE_AUTOSCALER")]
    pub disable_autoscaler: bool,
}
