//! The `expert` role: serves the FFNs of the experts that the placement plan gives
//! to this shard (`POST /v1/experts/forward`, see [`crate::disagg::wire`]), plus `/health`,
//! `/ready` and `/metrics`.
//!
//! An expert's weights (all layers) are loaded from the checkpoint when the plan
//! assigns it to this shard, before the plan change takes effect here, and also on
//! demand when a router asks for one this shard does not hold (a router may act on
//! a newer or older plan than this shard for a moment; answering is always right,
//! since any holder of the weights computes the same result). Experts no longer
//! assigned are dropped once unused for [`UNLOAD_AFTER`].

use crate::disagg::placement::{Plan, PlanFile};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::GgufFile;
use crate::model::moe::{ExpertCounts, ExpertFfn, expert_prefix, run_experts};
use crate::model::source::Source;
use crate::model::weights::Checkpoint;
use crate::serve::conn::ServerOptions;
use crate::serve::lifecycle;
use crate::serve::metrics::Metrics;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long an expert that the plan no longer assigns here stays loaded after its
/// last use (routers still on the previous plan may ask for it meanwhile).
pub const UNLOAD_AFTER: Duration = Duration::from_secs(60);

/// One expert's FFN in every layer (none in the dense layers of a model that has some).
struct Slot {
    layers: Vec<Option<ExpertFfn>>,
    last_used: AtomicU64,
}

/// Where expert weights come from.
enum Weights {
    Safetensors(Checkpoint),
    /// Kept quantized, as the `full` role keeps them.
    Gguf(Arc<GgufFile>),
}

/// The experts this shard holds, and what it needs to load more.
pub struct ExpertShard {
    cfg: ModelConfig,
    dtype: DType,
    weights: Weights,
    shard: usize,
    experts: RwLock<HashMap<usize, Arc<Slot>>>,
    assigned: RwLock<Vec<usize>>,
    load_lock: Mutex<()>,
    counts: Arc<ExpertCounts>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    draining: AtomicBool,
    epoch: Instant,
}

impl ExpertShard {
    /// Reads the checkpoint's config and index, or a GGUF file's header (no weights yet).
    /// GGUF experts compute in f32 on their quantized weights, whatever `dtype` says.
    pub fn open(
        dir: &Path,
        dtype: DType,
        shard: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let (cfg, weights, dtype) = match crate::model::loader::open_gguf(dir)? {
            Some(file) => (file.config()?, Weights::Gguf(file), DType::F32),
            None => (
                ModelConfig::from_file(&dir.join("config.json"))?,
                Weights::Safetensors(Checkpoint::open(dir)?),
                dtype,
            ),
        };
        if !cfg.is_moe() {
            return Err(Error::Unsupported(
                "the expert role needs a MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2)"
                    .into(),
            ));
        }
        Ok(Arc::new(Self {
            counts: Arc::new(ExpertCounts::for_model(&cfg)),
            cfg,
            dtype,
            weights,
            shard,
            experts: RwLock::new(HashMap::new()),
            assigned: RwLock::new(vec![]),
            load_lock: Mutex::new(()),
            metrics,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            epoch: Instant::now(),
        }))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn expert_counts(&self) -> &Arc<ExpertCounts> {
        &self.counts
    }

    /// Experts whose weights are loaded, ascending.
    pub fn loaded(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .experts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    /// Readiness turns false; layer calls that still arrive (a router that has not
    /// yet seen the drain) are served.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Loads every expert of `experts` not loaded yet (blocking).
    pub fn ensure_loaded(&self, experts: &[usize]) -> Result<()> {
        let missing = |me: &Self| -> Vec<usize> {
            let have = me.experts.read().unwrap_or_else(|e| e.into_inner());
            let mut m: Vec<usize> = experts
                .iter()
                .copied()
                .filter(|e| !have.contains_key(e))
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if missing(self).is_empty() {
            return Ok(());
        }
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        let todo = missing(self);
        if todo.is_empty() {
            return Ok(());
        }
        if let Some(e) = todo.iter().find(|&&e| e >= self.cfg.num_experts) {
            return Err(Error::ExpertOutOfRange {
                expert: *e,
                num_experts: self.cfg.num_experts,
            });
        }
        let arch = self.cfg.arch;
        let moe_layers: Vec<usize> = (0..self.cfg.num_hidden_layers)
            .filter(|&l| self.cfg.is_moe_layer(l))
            .collect();
        let mut ffns: Vec<Vec<Option<ExpertFfn>>> = todo
            .iter()
            .map(|_| (0..self.cfg.num_hidden_layers).map(|_| None).collect())
            .collect();
        match &self.weights {
            Weights::Safetensors(checkpoint) => {
                let prefixes: HashSet<String> = todo
                    .iter()
                    .flat_map(|&e| moe_layers.iter().map(move |&l| expert_prefix(arch, l, e)))
                    .collect();
                let tensors = checkpoint.load_where(|name| {
                    name.rsplitn(3, '.')
                        .nth(2)
                        .is_some_and(|p| prefixes.contains(p))
                })?;
                let vb = VarBuilder::from_tensors(tensors, self.dtype, &Device::Cpu);
                for &l in &moe_layers {
                    for (i, &e) in todo.iter().enumerate() {
                        let src = Source::Safetensors(vb.pp(expert_prefix(arch, l, e)));
                        ffns[i][l] = Some(ExpertFfn::load(&self.cfg, src)?);
                    }
                }
            }
            Weights::Gguf(file) => {
                // Layer by layer: the file caches one layer's stacked expert tensors.
                let loaded = (|| {
                    for &l in &moe_layers {
                        for (i, &e) in todo.iter().enumerate() {
                            let src = Source::gguf(file.clone()).pp(expert_prefix(arch, l, e));
                            ffns[i][l] = Some(ExpertFfn::load(&self.cfg, src)?);
                        }
                    }
                    Ok::<_, Error>(())
                })();
                file.release();
                loaded?;
            }
        }
        let loaded: Vec<(usize, Arc<Slot>)> = todo
            .iter()
            .zip(ffns)
            .map(|(&e, layers)| {
                let slot = Slot {
                    layers,
                    last_used: AtomicU64::new(self.now_secs()),
                };
                (e, Arc::new(slot))
            })
            .collect();
        self.experts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(loaded);
        tracing::info!(shard = self.shard, experts = ?todo, "expert weights loaded");
        Ok(())
    }

    /// Takes `plan`'s assignment for this shard: loads the new experts first.
    pub fn apply_plan(&self, plan: &Plan) -> Result<()> {
        let mine = plan.loads_of(self.shard);
        if plan.shard(self.shard).is_none() {
            tracing::warn!(
                shard = self.shard,
                version = plan.version,
                "the placement plan does not list this shard"
            );
        }
        self.ensure_loaded(&mine)?;
        *self.assigned.write().unwrap_or_else(|e| e.into_inner()) = mine;
        self.metrics
            .shards
            .placement_version
            .set(plan.version as i64);
        Ok(())
    }

    /// Drops experts neither assigned nor used for `idle`.
    pub fn evict_unassigned(&self, idle: Duration) {
        let assigned = self
            .assigned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = self.now_secs();
        let mut experts = self.experts.write().unwrap_or_else(|e| e.into_inner());
        let before = experts.len();
        experts.retain(|e, slot| {
            assigned.contains(e)
                || now.saturating_sub(slot.last_used.load(Ordering::Relaxed)) < idle.as_secs()
        });
        if experts.len() != before {
            tracing::info!(
                shard = self.shard,
                loaded = experts.len(),
                "unassigned experts unloaded"
            );
        }
    }

    /// Computes one request message (blocking).
    pub fn compute(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, (StatusCode, String)> {
        let bad = |e: Error| (StatusCode::BAD_REQUEST, e.to_string());
        let internal = |e: Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        let req = crate::disagg::wire::decode_request(msg).map_err(bad)?;
        let (_, hidden) = req.xs.dims2().map_err(|e| bad(e.into()))?;
        if req.layer >= self.cfg.num_hidden_layers || hidden != self.cfg.hidden_size {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "layer {} / hidden {hidden} do not fit this checkpoint ({} layers, hidden {})",
                    req.layer, self.cfg.num_hidden_layers, self.cfg.hidden_size
                ),
            ));
        }
        if !self.cfg.is_moe_layer(req.layer) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("layer {} of this checkpoint has no experts", req.layer),
            ));
        }
        let mut wanted: Vec<usize> = req.routes.iter().flatten().map(|&(e, _)| e).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if let Some(e) = wanted.iter().find(|&&e| e >= self.cfg.num_experts) {
            return Err((StatusCode::BAD_REQUEST, format!("expert {e} out of range")));
        }
        self.ensure_loaded(&wanted).map_err(internal)?;
        let slots: HashMap<usize, Arc<Slot>> = {
            let have = self.experts.read().unwrap_or_else(|e| e.into_inner());
            wanted
                .iter()
                .filter_map(|e| have.get(e).map(|s| (*e, s.clone())))
                .collect()
        };
        let now = self.now_secs();
        for s in slots.values() {
            s.last_used.store(now, Ordering::Relaxed);
        }
        let in_dtype = req.xs.dtype();
        let xs = req
            .xs
            .to_dtype(self.dtype)
            .map_err(|e| internal(e.into()))?;
        let layer = req.layer;
        let ys = run_experts(
            &xs,
            &req.routes,
            self.cfg.num_experts,
            |e| {
                slots
                    .get(&e)
                    .and_then(|s| s.layers[layer].as_ref())
                    .ok_or(Error::ExpertNotLoaded(e))
            },
            |e, n| self.counts.add(layer, e, n as u64),
        )
        .and_then(|ys| Ok(ys.to_dtype(in_dtype)?))
        .map_err(internal)?;
        crate::disagg::wire::encode_response(&ys).map_err(internal)
    }
}

/// The expert role's HTTP endpoints.
pub fn router(shard: Arc<ExpertShard>) -> Router {
    Router::new()
        .route(crate::disagg::wire::PATH, post(forward))
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(1 << 30))
        .with_state(shard)
}

async fn forward(State(shard): State<Arc<ExpertShard>>, body: Bytes) -> Response {
    if !shard.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "expert shard not ready (loading its experts)",
        )
            .into_response();
    }
    shard.metrics.shards.add_bytes("received", body.len());
    let t0 = Instant::now();
    let s = shard.clone();
    let result = tokio::task::spawn_blocking(move || s.compute(&body)).await;
    shard
        .metrics
        .shards
        .compute_seconds
        .observe(t0.elapsed().as_secs_f64());
    match result {
        Ok(Ok(bytes)) => {
            shard.metrics.shards.add_bytes("sent", bytes.len());
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    crate::disagg::wire::CONTENT_TYPE,
                )],
                bytes,
            )
                .into_response()
        }
        Ok(Err((status, msg))) => (status, msg).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("expert computation panicked: {e}"),
        )
            .into_response(),
    }
}

async fn ready(State(shard): State<Arc<ExpertShard>>) -> Response {
    if shard.is_ready() {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready"})),
        )
            .into_response()
    }
}

async fn metrics(State(shard): State<Arc<ExpertShard>>) -> Response {
    shard.metrics.sync_experts(&shard.counts);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shard.metrics.encode(),
    )
        .into_response()
}

/// Loads the shard's assigned experts, marks it ready and starts the plan watcher
/// and the eviction sweep. Returns the watcher tasks (abort them to stop).
pub async fn activate(
    shard: Arc<ExpertShard>,
    plan_file: Arc<PlanFile>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let plan = plan_file.current();
    let s = shard.clone();
    tokio::task::spawn_blocking(move || s.apply_plan(&plan))
        .await
        .map_err(Error::task("loading experts panicked"))??;
    shard.ready.store(true, Ordering::SeqCst);
    shard.metrics.ready.set(i64::from(shard.is_ready()));
    tracing::info!(shard = shard.shard, experts = ?shard.loaded(), "expert shard ready");
    let s = shard.clone();
    let watch = plan_file.watch(
        Duration::from_secs(1),
        |_| Ok(()),
        move |plan| {
            let s = s.clone();
            // Load before answering as the new plan says (the answer is right anyway:
            // unknown experts load on demand).
            tokio::task::spawn_blocking(move || {
                if let Err(e) = s.apply_plan(&plan) {
                    tracing::error!(error = %e, "cannot load the experts of the new placement plan");
                }
            });
        },
    );
    let s = shard.clone();
    let sweep = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            s.evict_unassigned(UNLOAD_AFTER);
        }
    });
    Ok(vec![watch, sweep])
}

/// What [`serve`] needs to run an expert shard (the CLI builds it from its flags).
#[derive(Debug, Clone)]
pub struct ExpertServerConfig {
    /// Local checkpoint directory or `hf://org/name[@revision]`.
    pub model: String,
    pub listen: SocketAddr,
    pub dtype: DType,
    /// The placement plan (`plan.json`); reloaded when it changes.
    pub placement_file: PathBuf,
    /// This shard's index in the placement plan.
    pub shard: usize,
    /// How the shard stops after `shutdown`.
    pub drain: lifecycle::Drain,
    /// Client limits and TLS of the listener.
    pub server: ServerOptions,
}

/// `tidal-worker serve --role expert`: binds, loads this shard's experts, serves
/// until `shutdown`, then drains for up to the grace period.
pub async fn serve(
    cfg: ExpertServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (plan_path, shard_idx, dtype) = (&cfg.placement_file, cfg.shard, cfg.dtype);
    let plan_file = PlanFile::open(plan_path)?;
    let (listener, addr) = lifecycle::bind(cfg.listen).await?;
    tracing::info!(%addr, shard = shard_idx, "expert shard listening");
    let metrics = Arc::new(Metrics::new());
    let source = cfg.model.clone();
    let m = metrics.clone();
    let shard = tokio::task::spawn_blocking(move || {
        let dir = crate::model::hub::resolve(&source)?;
        ExpertShard::open(&dir, dtype, shard_idx, m)
    })
    .await
    .map_err(Error::task("the loader panicked"))??;
    let app = router(shard.clone());
    let startup = activate(shard.clone(), plan_file);
    let on_drain = move |tasks: Option<Vec<tokio::task::JoinHandle<()>>>| {
        shard.begin_drain();
        for t in tasks.into_iter().flatten() {
            t.abort();
        }
    };
    lifecycle::serve(
        listener, app, startup, shutdown, cfg.drain, cfg.server, on_drain,
    )
    .await
}
