//! The command line's arguments (clap): what each subcommand accepts, and the
//! conversions into the plain configuration structs the rest of the crate takes.

use crate::disagg::expert_server::ExpertServerConfig;
use crate::error::{Error, Result};
use crate::model::decoder::parse_dtype;
use crate::model::fixture::FixtureSpec;
use crate::serve::conn::{ConnLimits, ServerOptions};
use crate::serve::escalation::cloud::Escalator;
use crate::serve::escalation::{EscalationConfig, OnCloudUnavailable};
use crate::serve::lifecycle::Drain;
use crate::serve::metrics::Metrics;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "tidal-worker", version, about = "Tidal's candle model server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// Write a tiny random checkpoint (for tests and benchmarks).
    GenFixture(GenFixtureArgs),
}

/// What this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The whole model in one process.
    Full,
    /// Embeddings, attention, norms, gates and any shared experts (Qwen2-MoE,
    /// DeepSeek-V2); the routed experts run on expert shards (`--placement-file`).
    /// Serves the OpenAI API.
    Router,
    /// The FFNs of this shard's experts (`--placement-file`, `--shard`). Serves
    /// only the binary expert endpoint, health, readiness and metrics.
    Expert,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Local checkpoint directory or `hf://org/name[@revision]`.
    #[arg(long, env = "TIDAL_MODEL")]
    pub model: String,
    /// Name clients use in `model`; defaults to the checkpoint directory's name.
    #[arg(long, env = "TIDAL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "TIDAL_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    #[arg(long, env = "TIDAL_ROLE", value_enum, default_value = "full")]
    pub role: Role,
    /// f32, bf16 or f16.
    #[arg(long, env = "TIDAL_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Where the model runs: cpu, or cuda / cuda:N (a worker built with the `cuda` feature;
    /// the full role only).
    #[arg(long, env = "TIDAL_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Threads for the model's kernels; unset: `RAYON_NUM_THREADS` if set, else the CPUs
    /// this process may use (its CPU limit) up to the physical cores.
    #[arg(long, env = "TIDAL_THREADS")]
    pub threads: Option<usize>,
    /// Most sequences decoded together.
    #[arg(long, env = "TIDAL_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Most requests waiting for the batch before 429s.
    #[arg(long, env = "TIDAL_QUEUE_SIZE", default_value_t = 64)]
    pub queue_size: usize,
    /// Memory for reusing shared prompt prefixes' attention cache (system prompts,
    /// earlier chat turns), least recently used blocks evicted first; 0 turns reuse off.
    #[arg(long, env = "TIDAL_PREFIX_CACHE_MIB", default_value_t = 256)]
    pub prefix_cache_mib: usize,
    /// Tokens per prefix-cache block: only whole blocks of a prompt are reused.
    #[arg(long, env = "TIDAL_PREFIX_BLOCK_TOKENS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub prefix_block_tokens: u32,
    /// Chunked prefill: prompt tokens computed per step at most, beside the running
    /// sequences' decode step (a long prompt then delays them by one chunk per step instead
    /// of by its whole prefill); 0 computes each prompt whole.
    #[arg(long, env = "TIDAL_PREFILL_CHUNK_TOKENS", default_value_t = crate::serve::engine::DEFAULT_PREFILL_CHUNK_TOKENS)]
    pub prefill_chunk_tokens: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, env = "TIDAL_MAX_TOKENS", default_value_t = 2048)]
    pub max_tokens: usize,
    #[arg(long, env = "TIDAL_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after SIGTERM.
    #[arg(long, env = "TIDAL_GRACE_SECONDS", default_value_t = 30)]
    pub grace_seconds: u64,
    /// After SIGTERM, requests that still arrive (stale kube-proxy rules, routers) are
    /// served until none has for this long; then the listener closes.
    #[arg(long, env = "TIDAL_DRAIN_QUIET_SECONDS", default_value_t = 5)]
    pub drain_quiet_seconds: u64,
    /// Most open client connections; one more is answered 429 and closed.
    #[arg(long, env = "TIDAL_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Time for a request's head to arrive; on HTTP/1.1 also how long an idle
    /// keep-alive connection is kept.
    #[arg(long, env = "TIDAL_HEADER_TIMEOUT_SECONDS", default_value_t = 30.0,
          value_parser = positive_seconds)]
    pub header_timeout_seconds: f64,
    /// Largest request head, in bytes (431 above it; at least 8192 on HTTP/1.1).
    #[arg(long, env = "TIDAL_MAX_HEADER_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_bytes: u32,
    /// Time for a request's body to arrive, from its head; 408 after it.
    #[arg(long, env = "TIDAL_BODY_TIMEOUT_SECONDS", default_value_t = 30.0,
          value_parser = positive_seconds)]
    pub body_timeout_seconds: f64,
    /// A connection with no request in flight and no bytes moving for this long is
    /// closed.
    #[arg(long, env = "TIDAL_IDLE_TIMEOUT_SECONDS", default_value_t = 60.0,
          value_parser = positive_seconds)]
    pub idle_timeout_seconds: f64,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate chain (a mounted
    /// `kubernetes.io/tls` Secret's `tls.crt`); re-read when it changes. Needs
    /// `--tls-key-file`.
    #[arg(long, env = "TIDAL_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `--tls-cert-file` (`tls.key`).
    #[arg(long, env = "TIDAL_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Router role: trust the CAs in this PEM file for `https://` shard endpoints (re-read
    /// when it changes).
    #[arg(long, env = "TIDAL_SHARD_CA_FILE")]
    pub shard_ca_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "TIDAL_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// Edge escalation to a cloud endpoint (see [`crate::serve::escalation`]).
    #[command(flatten)]
    pub escalation: EscalationArgs,
    /// Expert placement plan (plan.json) for the router and expert roles; reloaded
    /// when it changes.
    #[arg(long, env = "TIDAL_PLACEMENT_FILE")]
    pub placement_file: Option<PathBuf>,
    /// Require `Authorization: Bearer <key>` on the OpenAI endpoints, the keys being the
    /// lines of this file (a mounted Secret; re-read when it changes). Health, readiness
    /// and metrics stay open. An edge worker presents the first key to its cloud.
    #[arg(long, env = "TIDAL_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Count inference requests addressed to a host whose first DNS label starts with this
    /// (`<service>-edge-`: an edge site's Service routed to this cloud worker while the site
    /// has no ready replica) in `tidal_worker_site_requests_total{site}`. Set by the operator.
    #[arg(long, env = "TIDAL_SITE_SERVICE_PREFIX")]
    pub site_service_prefix: Option<String>,
    /// This expert shard's index in the placement plan (expert role).
    #[arg(long, env = "TIDAL_SHARD")]
    pub shard: Option<usize>,
    /// Router role: limit for one layer call on one shard replica before it is retried
    /// on another.
    #[arg(long, env = "TIDAL_SHARD_ATTEMPT_TIMEOUT_SECONDS", default_value_t = 30.0,
          value_parser = positive_seconds)]
    pub shard_attempt_timeout_seconds: f64,
    /// Router role: HTTP/2 PING period on shard connections; a replica that misses a PING
    /// for twice this long is treated as dead and its calls retried elsewhere.
    #[arg(long, env = "TIDAL_SHARD_KEEPALIVE_SECONDS", default_value_t = 5.0,
          value_parser = positive_seconds)]
    pub shard_keepalive_seconds: f64,
}

fn positive_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct GenFixtureArgs {
    #[arg(long, env = "TIDAL_FIXTURE_OUT")]
    pub out: PathBuf,
    /// Write `{out}/model.gguf` (weights in this quantization, vocabulary in the
    /// metadata) instead of a safetensors checkpoint.
    #[arg(long, env = "TIDAL_FIXTURE_GGUF", value_enum)]
    pub gguf: Option<crate::model::gguf_fixture::Quant>,
    #[command(flatten)]
    pub spec: FixtureSpec,
}

impl ServeArgs {
    /// The router role's shard client settings.
    pub fn shard_client(&self) -> Result<crate::disagg::shard_client::ClientConfig> {
        let keepalive = Duration::from_secs_f64(self.shard_keepalive_seconds);
        Ok(crate::disagg::shard_client::ClientConfig {
            attempt_timeout: Duration::from_secs_f64(self.shard_attempt_timeout_seconds),
            keepalive_interval: keepalive,
            keepalive_timeout: keepalive * 2,
            tls: match &self.shard_ca_file {
                Some(ca) => Some(crate::serve::tls::TrustedCa::open(
                    ca,
                    crate::serve::tls::Alpn::H2,
                )?),
                None => None,
            },
            ..Default::default()
        })
    }

    /// The engine's prefix cache, None when its budget is 0.
    pub fn prefix_cache(&self) -> Option<crate::serve::prefix_cache::PrefixCacheConfig> {
        (self.prefix_cache_mib > 0).then_some(crate::serve::prefix_cache::PrefixCacheConfig {
            block_tokens: self.prefix_block_tokens as usize,
            budget_bytes: self.prefix_cache_mib << 20,
        })
    }

    pub fn model_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            let trimmed = self.model.trim_end_matches('/');
            let name = trimmed.strip_prefix("hf://").unwrap_or(trimmed);
            match name.rsplit_once('/') {
                Some((_, last)) if !self.model.starts_with("hf://") => last.to_string(),
                _ => name.to_string(),
            }
        })
    }
    /// The expert role's configuration: needs `--placement-file` and `--shard`.
    /// The device the model runs on. Shards and routers exchange CPU tensors with each
    /// other, so only the full role takes a GPU.
    pub fn device(&self) -> Result<candle_core::Device> {
        if self.device != "cpu" && self.role != Role::Full {
            return Err(Error::Unsupported(format!(
                "--device {} with --role {}: only the full role runs on a GPU",
                self.device,
                format!("{:?}", self.role).to_lowercase()
            )));
        }
        crate::model::device::parse_device(&self.device)
    }

    pub fn expert_config(&self) -> Result<ExpertServerConfig> {
        let placement_file = self.placement_file.clone().ok_or(Error::MissingFlag {
            role: "expert",
            flag: "--placement-file",
            env: "TIDAL_PLACEMENT_FILE",
        })?;
        let shard = self.shard.ok_or(Error::MissingFlag {
            role: "expert",
            flag: "--shard",
            env: "TIDAL_SHARD",
        })?;
        // Refuses a GPU here rather than serving on the CPU it was not asked for.
        self.device()?;
        Ok(ExpertServerConfig {
            model: self.model.clone(),
            listen: self.listen,
            dtype: parse_dtype(&self.dtype)?,
            placement_file,
            shard,
            drain: self.drain(),
            server: self.server_options()?,
        })
    }

    /// Limits and, with `--tls-cert-file`, TLS: how this process listens.
    pub fn server_options(&self) -> Result<ServerOptions> {
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(crate::serve::tls::server_config(cert, key)?),
            _ => None,
        };
        Ok(ServerOptions {
            limits: self.conn_limits(),
            tls,
        })
    }

    /// What one client may hold of this server.
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_secs_f64(self.header_timeout_seconds),
            max_header_bytes: self.max_header_bytes,
            body_timeout: Duration::from_secs_f64(self.body_timeout_seconds),
            idle_timeout: Duration::from_secs_f64(self.idle_timeout_seconds),
        }
    }

    /// How the server stops on SIGTERM.
    pub fn drain(&self) -> Drain {
        Drain {
            grace: Duration::from_secs(self.grace_seconds),
            quiet: Duration::from_secs(self.drain_quiet_seconds),
        }
    }
}

fn parse_threshold(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1], got {v}"))
    }
}

/// The `serve` flags of edge escalation (each also read from its `TIDAL_*` variable).
#[derive(Debug, Clone, clap::Args)]
pub struct EscalationArgs {
    /// Cloud base URL to escalate requests to (e.g. http://svc-cloud.ns.svc:8080); unset:
    /// no escalation and the other escalation flags are ignored.
    #[arg(long, env = "TIDAL_ESCALATE_TO")]
    pub escalate_to: Option<String>,
    /// `model` to ask the cloud for; default: the first model the cloud lists.
    #[arg(long, env = "TIDAL_ESCALATE_MODEL")]
    pub escalate_model: Option<String>,
    /// Escalate when the mean max-softmax probability over the last
    /// --confidence-window generated tokens falls below this (0 never escalates).
    #[arg(long, env = "TIDAL_CONFIDENCE_THRESHOLD", default_value_t = 0.0, value_parser = parse_threshold)]
    pub confidence_threshold: f32,
    /// Generated tokens the confidence is averaged over (checked once that many exist).
    #[arg(long, env = "TIDAL_CONFIDENCE_WINDOW", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub confidence_window: u64,
    /// Forward requests to the cloud instead of answering 429 when the queue is full.
    #[arg(long, env = "TIDAL_ESCALATE_ON_OVERLOAD", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub escalate_on_overload: bool,
    /// When the cloud cannot be reached: go on locally (and mark the response) or fail.
    #[arg(
        long,
        env = "TIDAL_ON_CLOUD_UNAVAILABLE",
        value_enum,
        default_value = "serve-locally"
    )]
    pub on_cloud_unavailable: OnCloudUnavailable,
    /// Limit for connecting to the cloud, in milliseconds.
    #[arg(
        long,
        env = "TIDAL_ESCALATION_CONNECT_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub escalation_connect_timeout_ms: u64,
    /// Limit for the cloud's response headers and each read of its stream, in milliseconds.
    #[arg(
        long,
        env = "TIDAL_ESCALATION_READ_TIMEOUT_MS",
        default_value_t = 30000
    )]
    pub escalation_read_timeout_ms: u64,
    /// Trust the CAs in this PEM file for an `https://` cloud (a mounted Secret's `ca.crt`;
    /// re-read when it changes). Unset: the platform's trust store.
    #[arg(long, env = "TIDAL_ESCALATION_CA_FILE")]
    pub escalation_ca_file: Option<PathBuf>,
}

impl EscalationArgs {
    /// The validated configuration, or None when no cloud endpoint is set.
    pub fn to_config(&self) -> crate::Result<Option<EscalationConfig>> {
        let Some(url) = &self.escalate_to else {
            return Ok(None);
        };
        let config = EscalationConfig {
            cloud_url: url.clone(),
            cloud_model: self.escalate_model.clone(),
            confidence_threshold: self.confidence_threshold,
            confidence_window: self.confidence_window as usize,
            on_overload: self.escalate_on_overload,
            on_cloud_unavailable: self.on_cloud_unavailable,
            connect_timeout: Duration::from_millis(self.escalation_connect_timeout_ms),
            read_timeout: Duration::from_millis(self.escalation_read_timeout_ms),
            ca: match &self.escalation_ca_file {
                Some(ca) => Some(crate::serve::tls::TrustedCa::open(
                    ca,
                    crate::serve::tls::Alpn::Http11,
                )?),
                None => None,
            },
        };
        // Fails here, at startup, rather than on the first escalation.
        Escalator::new(config.clone(), Arc::new(Metrics::new()))?;
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let argv = ["tidal-worker", "serve", "--model", "m"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_device_defaults_to_the_cpu_and_a_gpu_is_for_the_full_role_only() {
        assert!(serve(&[]).device().unwrap().is_cpu());
        for role in ["router", "expert"] {
            let e = serve(&["--role", role, "--device", "cuda:0"])
                .device()
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("--role {role}")), "{e}");
            assert!(e.contains("only the full role runs on a GPU"), "{e}");
        }
        let e = serve(&["--device", "tpu"])
            .device()
            .unwrap_err()
            .to_string();
        assert!(e.contains("use cpu, cuda or cuda:N"), "{e}");
    }
}
