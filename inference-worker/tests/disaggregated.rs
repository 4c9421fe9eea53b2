//! Expert disaggregation: a `router` (in process) with `expert` shards (spawned
//! `tidal-worker serve --role expert` processes on 127.0.0.1) against the `full`
//! role on the same checkpoint: same logits, same greedy tokens, no failed request
//! when a replica dies or hangs, or the placement plan changes under load.

mod common;

use common::{free_port, http, metric_value, post_json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tidal_worker::disagg::shard_client::{ClientConfig, ShardClient};
use tidal_worker::model::decoder::Model;
use tidal_worker::model::fixture::FixtureSpec;
use tidal_worker::model::loader::Loaded;
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::http::{AppState, Served};
use tidal_worker::serve::metrics::Metrics;

const BIN: &str = env!("CARGO_BIN_EXE_tidal-worker");
const EXPERTS: usize = 6;

fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        experts: EXPERTS,
        layers: 3,
        context: 1024,
        seed: 7,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    dir
}

/// A spawned expert shard process, killed on drop.
struct ShardProc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ShardProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ShardProc {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn spawn_shard(model: &Path, plan: &Path, shard: usize) -> ShardProc {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--role", "expert", "--dtype", "f32", "--model"])
        .arg(model)
        .args(["--listen", &addr.to_string()])
        .env("TIDAL_PLACEMENT_FILE", plan)
        .env("TIDAL_SHARD", shard.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ShardProc { child, addr }
}

async fn wait_ready(p: &mut ShardProc) {
    for _ in 0..1200 {
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!("expert shard exited early: {status}");
        }
        if tokio::net::TcpStream::connect(p.addr).await.is_ok()
            && http(p.addr, "GET", "/ready", b"").await.status == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("expert shard never became ready");
}

/// `(shard, experts, replica urls, by_dns)`: `by_dns` gives the shard one
/// `endpoint` (resolved through DNS) instead of an `endpoints` list.
type ShardLayout = (usize, Vec<usize>, Vec<String>, bool);

fn write_plan(path: &Path, version: u64, shards: &[ShardLayout]) {
    let shards: Vec<_> = shards
        .iter()
        .map(|(s, experts, urls, by_dns)| {
            if *by_dns {
                serde_json::json!({"shard": s, "experts": experts, "endpoint": urls[0], "replicas": 1})
            } else {
                serde_json::json!({"shard": s, "experts": experts, "endpoint": "http://unused.invalid:1",
                    "replicas": urls.len(), "endpoints": urls})
            }
        })
        .collect();
    let plan = serde_json::json!({"version": version, "numExperts": EXPERTS, "shards": shards});
    // Replace atomically, as a ConfigMap update does.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, plan.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Three shards: 0 (experts 0, 1; two replicas), 1 (experts 2, 3 and a redundant copy
/// of 0; one replica, found through DNS), 2 (experts 4, 5; two replicas).
struct Cluster {
    plan: PathBuf,
    procs: BTreeMap<usize, Vec<ShardProc>>,
}

impl Cluster {
    async fn start(model: &Path, work: &Path) -> Self {
        let plan = work.join("plan.json");
        // Addresses first (the plan must exist when the shards start).
        let layout: [(usize, Vec<usize>, usize); 3] = [
            (0, vec![0, 1], 2),
            (1, vec![2, 3, 0], 1),
            (2, vec![4, 5], 2),
        ];
        let mut procs = BTreeMap::new();
        write_plan(
            &plan,
            1,
            &layout
                .iter()
                .map(|(s, e, _)| (*s, e.clone(), vec!["http://127.0.0.1:1".into()], false))
                .collect::<Vec<_>>(),
        );
        for (s, _, replicas) in &layout {
            let mut v = vec![];
            for _ in 0..*replicas {
                v.push(spawn_shard(model, &plan, *s));
            }
            procs.insert(*s, v);
        }
        for v in procs.values_mut() {
            for p in v.iter_mut() {
                wait_ready(p).await;
            }
        }
        let c = Self { plan, procs };
        c.write(1, &[(0, vec![0, 1]), (1, vec![2, 3, 0]), (2, vec![4, 5])]);
        c
    }

    fn write(&self, version: u64, assignment: &[(usize, Vec<usize>)]) {
        let shards: Vec<ShardLayout> = assignment
            .iter()
            .map(|(s, experts)| {
                let by_dns = *s == 1;
                let urls = self.procs[s]
                    .iter()
                    .map(|p| {
                        if by_dns {
                            format!("http://localhost:{}", p.addr.port())
                        } else {
                            p.url()
                        }
                    })
                    .collect();
                (*s, experts.clone(), urls, by_dns)
            })
            .collect();
        write_plan(&self.plan, version, &shards);
    }

    async fn metrics(&self, shard: usize, replica: usize) -> String {
        let r = http(self.procs[&shard][replica].addr, "GET", "/metrics", b"").await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).unwrap()
    }
}

async fn start_client(plan: &Path, metrics: Arc<Metrics>) -> Arc<ShardClient> {
    let cfg = ClientConfig {
        poll_every: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    ShardClient::start(plan, cfg, metrics).await.unwrap()
}

async fn load_router(model: &Path, client: Arc<ShardClient>) -> Loaded {
    let dir = model.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        tidal_worker::disagg::shard_client::load_router(
            &dir,
            candle_core::DType::F32,
            client,
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap()
    .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 40, 41, 42, 43, 44],
        vec![1, 100, 7],
        vec![1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209],
        vec![1, 5],
        vec![1, 77, 78, 79, 80, 81, 82, 83],
    ]
}

/// Prefill every prompt, then `steps` batched greedy decode steps: every row of
/// logits produced, and the greedy tokens.
fn run(model: &Model, steps: usize) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let ps = prompts();
    let mut caches: Vec<_> = ps.iter().map(|_| model.new_cache()).collect();
    let mut all = vec![];
    let mut last = vec![];
    // Prefill as one batch of chunks.
    let mut batch: Vec<(&[u32], &mut _)> = ps
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| (p.as_slice(), c))
        .collect();
    for l in model.forward_batch(&mut batch).unwrap() {
        last.push(argmax(&l));
        all.push(l);
    }
    let mut tokens: Vec<Vec<u32>> = last.iter().map(|t| vec![*t]).collect();
    for _ in 0..steps {
        let mut batch: Vec<(&[u32], &mut _)> = last
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| (std::slice::from_ref(t), c))
            .collect();
        let logits = model.forward_batch(&mut batch).unwrap();
        last = logits.iter().map(|l| argmax(l)).collect();
        for (i, t) in last.iter().enumerate() {
            tokens[i].push(*t);
        }
        all.extend(logits);
    }
    (all, tokens)
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_with_shards_matches_full_logits_and_greedy_tokens() {
    let dir = fixture();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), work.path()).await;
    let metrics = Arc::new(Metrics::new());
    let client = start_client(&cluster.plan, metrics.clone()).await;
    let replicas = client.replicas();
    assert_eq!(replicas[&0].len(), 2);
    let shard1 = cluster.procs[&1][0].addr.to_string();
    assert!(
        replicas[&1].contains(&shard1),
        "shard 1 (localhost) resolved through DNS: {replicas:?}"
    );
    assert_eq!(replicas[&2].len(), 2);
    let router = load_router(dir.path(), client.clone()).await;
    let full = tidal_worker::model::loader::load_dir(dir.path(), candle_core::DType::F32).unwrap();

    let (rm, fm) = (router.model.clone(), full.model.clone());
    let ((r_logits, r_tokens), (f_logits, f_tokens)) =
        tokio::task::spawn_blocking(move || (run(&rm, 20), run(&fm, 20)))
            .await
            .unwrap();
    assert_eq!(r_tokens, f_tokens, "greedy tokens differ");
    assert_eq!(r_logits.len(), f_logits.len());
    let mut max_diff = 0f32;
    for (a, b) in r_logits.iter().zip(&f_logits) {
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    assert!(max_diff <= 1e-4, "logits differ by up to {max_diff}");
    // Stronger than the tolerance: with top-2 routing and row-invariant matmuls the
    // partial sums add up in the same order, so the logits are bitwise equal.
    assert_eq!(max_diff, 0.0, "logits are close but not bitwise equal");

    // The shards report what they computed: per (layer, expert) their counts add
    // up to the tokens the router routed (redundant expert 0 split over shards 0 and 1).
    let mut shard_sum: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for (s, v) in &cluster.procs {
        for r in 0..v.len() {
            let text = cluster.metrics(*s, r).await;
            for l in 0..3 {
                for e in 0..EXPERTS {
                    let labels = format!("layer=\"{l}\",expert=\"{e}\"");
                    if let Some(n) =
                        metric_value(&text, "tidal_worker_expert_tokens_total", &labels)
                    {
                        *shard_sum.entry((l, e)).or_default() += n;
                    }
                }
            }
        }
    }
    let counts = router.model.expert_counts();
    for l in 0..3 {
        for e in 0..EXPERTS {
            assert_eq!(
                shard_sum.get(&(l, e)).copied().unwrap_or(0.0),
                counts.get(l, e) as f64,
                "layer {l} expert {e}"
            );
        }
    }
    let e0_on_1 = metric_value(
        &cluster.metrics(1, 0).await,
        "tidal_worker_expert_tokens_total",
        "layer=\"0\",expert=\"0\"",
    );
    assert!(
        e0_on_1.unwrap_or(0.0) > 0.0,
        "redundant expert 0 never ran on shard 1"
    );
    metrics.sync_experts(counts);
    let text = metrics.encode();
    assert!(text.contains("tidal_worker_expert_wire_bytes_total{direction=\"sent\"}"));
    assert!(text.contains("tidal_worker_shard_request_seconds_bucket"));
}

/// Qwen2-MoE (routed experts plus a gated shared expert) as a router and two expert
/// shards: the shared expert runs on the router like attention (every token needs
/// it), the shards compute only routed experts, and the greedy tokens are the full
/// role's. With all layers sparse, and with dense layers between them
/// (`decoder_sparse_step` 2: the shards hold no weights and get no call for those).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_moe_router_with_two_shards_matches_full_greedy_tokens() {
    use tidal_worker::model::fixture::FixtureArch;
    for (layers, sparse_step, seed) in [(3, 1, 12), (4, 2, 13)] {
        let spec = FixtureSpec {
            arch: FixtureArch::Qwen2Moe,
            experts: EXPERTS,
            top_k: 4,
            layers,
            sparse_step,
            seed,
            ..FixtureSpec::default()
        };
        router_with_two_shards_matches_full(spec).await;
    }
}

/// DeepSeek-V2 as a router and two expert shards: multi-head latent attention and the
/// shared experts run on the router, the shards get the routed experts' rows with their
/// top-k weights already multiplied by `routed_scaling_factor` (2.5 in the fixture), and
/// the greedy tokens are the full role's. Layer 0 is dense (`first_k_dense_replace`);
/// then experts in every layer, and with query LoRA every other layer (`moe_layer_freq` 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek_v2_router_with_two_shards_matches_full_greedy_tokens() {
    use tidal_worker::model::fixture::FixtureArch;
    for (layers, sparse_step, q_lora_rank, seed) in [(3, 1, 0, 14), (4, 2, 16, 15)] {
        let spec = FixtureSpec {
            arch: FixtureArch::DeepseekV2,
            experts: EXPERTS,
            top_k: 3,
            layers,
            sparse_step,
            q_lora_rank,
            seed,
            ..FixtureSpec::default()
        };
        router_with_two_shards_matches_full(spec).await;
    }
}

/// `spec`'s checkpoint served by a router with shards 0 (experts 0-2) and 1 (3-5) gives
/// the full role's greedy tokens and logits (to rounding); the routers' per-expert
/// counts are the shards' sums, for routed experts of MoE layers only; a shard refuses
/// a dense layer.
async fn router_with_two_shards_matches_full(spec: FixtureSpec) {
    let what = format!("{:?} seed {}", spec.arch, spec.seed);
    let dir = tempfile::tempdir().unwrap();
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    let layers = spec.layers;
    let moe_layers: Vec<usize> = (0..layers).filter(|&l| spec.is_moe_layer(l)).collect();
    let work = tempfile::tempdir().unwrap();
    let plan = work.path().join("plan.json");
    let assignment = [(0, vec![0, 1, 2]), (1, vec![3, 4, 5])];
    let layout = |urls: &[String]| -> Vec<ShardLayout> {
        assignment
            .iter()
            .zip(urls)
            .map(|((s, e), u)| (*s, e.clone(), vec![u.clone()], false))
            .collect()
    };
    write_plan(
        &plan,
        1,
        &layout(&vec!["http://127.0.0.1:1".to_string(); 2]),
    );
    let mut shards: Vec<ShardProc> = assignment
        .iter()
        .map(|(s, _)| spawn_shard(dir.path(), &plan, *s))
        .collect();
    for p in shards.iter_mut() {
        wait_ready(p).await;
    }
    let urls: Vec<String> = shards.iter().map(ShardProc::url).collect();
    write_plan(&plan, 1, &layout(&urls));

    let client = start_client(&plan, Arc::new(Metrics::new())).await;
    let router = load_router(dir.path(), client).await;
    let full = tidal_worker::model::loader::load_dir(dir.path(), candle_core::DType::F32).unwrap();
    // The router holds everything but the routed experts: the shared experts (and
    // Qwen2-MoE's gates) are among its projections.
    let ((_, rd), (_, fd)) = (
        router.model.projection_kinds(),
        full.model.projection_kinds(),
    );
    assert_eq!(fd - rd, EXPERTS * 3 * moe_layers.len());
    let (rm, fm) = (router.model.clone(), full.model.clone());
    let ((r_logits, r_tokens), (f_logits, f_tokens)) =
        tokio::task::spawn_blocking(move || (run(&rm, 16), run(&fm, 16)))
            .await
            .unwrap();
    assert_eq!(r_tokens, f_tokens, "{what}: greedy tokens differ");
    // Top-k > 2 routing: the shards' partial sums may add up in another order than the
    // full role's, so the logits agree to rounding rather than bitwise.
    let max_diff = r_logits
        .iter()
        .zip(&f_logits)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    eprintln!("{what}: router vs full max |logit diff| {max_diff:e}");
    assert!(
        max_diff <= 1e-4,
        "{what}: logits differ by up to {max_diff}"
    );

    // Routed experts only are counted, in the MoE layers only, and what the shards
    // computed adds up to what the router routed.
    let counts = router.model.expert_counts();
    let mut shard_sum: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for p in &shards {
        let r = http(p.addr, "GET", "/metrics", b"").await;
        let text = String::from_utf8(r.body).unwrap();
        for l in 0..layers {
            for e in 0..EXPERTS {
                let labels = format!("layer=\"{l}\",expert=\"{e}\"");
                if let Some(n) = metric_value(&text, "tidal_worker_expert_tokens_total", &labels) {
                    assert!(moe_layers.contains(&l), "a counter for dense layer {l}");
                    *shard_sum.entry((l, e)).or_default() += n;
                }
            }
        }
    }
    let routed: Vec<(usize, usize, u64)> = counts.snapshot();
    assert!(routed.iter().all(|(l, _, _)| moe_layers.contains(l)));
    for (l, e, n) in routed {
        assert_eq!(
            shard_sum.get(&(l, e)).copied().unwrap_or(0.0),
            n as f64,
            "layer {l} expert {e}"
        );
    }
    // A dense layer has no experts to ask a shard for.
    if let Some(dense) = (0..layers).find(|l| !moe_layers.contains(l)) {
        let xs = candle_core::Tensor::zeros(
            (1, spec.hidden),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let body =
            tidal_worker::disagg::wire::encode_request(dense, &xs, &[vec![(0, 1.0)]]).unwrap();
        let r = http(
            shards[0].addr,
            "POST",
            tidal_worker::disagg::wire::PATH,
            &body,
        )
        .await;
        assert_eq!(r.status, 400);
        let msg = String::from_utf8_lossy(&r.body);
        assert!(msg.contains("has no experts"), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_shards_serve_a_gguf_checkpoint_as_the_full_role_does() {
    use tidal_worker::model::gguf_fixture::{self, Quant};
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        experts: EXPERTS,
        layers: 3,
        seed: 11,
        ..FixtureSpec::default()
    };
    // Stacked expert tensors (as llama.cpp writes Mixtral today), quantized.
    let file = gguf_fixture::write(&spec, Quant::Q8_0, dir.path()).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let work = tempfile::tempdir().unwrap();
    // The shards are given the file itself, the router its directory.
    let cluster = Cluster::start(&file, work.path()).await;
    let metrics = Arc::new(Metrics::new());
    let client = start_client(&cluster.plan, metrics.clone()).await;
    let router = load_router(dir.path(), client).await;
    let full = tidal_worker::model::loader::load_dir(dir.path(), candle_core::DType::F32).unwrap();
    // The router keeps its weights quantized as the full role does, less the experts'
    // (3 projections each, in every layer).
    let ((rq, rd), (fq, fd)) = (
        router.model.projection_kinds(),
        full.model.projection_kinds(),
    );
    assert!(rq > 0);
    assert_eq!((fq - rq, fd), (EXPERTS * 3 * 3, rd));
    let (rm, fm) = (router.model.clone(), full.model.clone());
    let ((r_logits, r_tokens), (f_logits, f_tokens)) =
        tokio::task::spawn_blocking(move || (run(&rm, 12), run(&fm, 12)))
            .await
            .unwrap();
    assert_eq!(r_tokens, f_tokens, "greedy tokens differ");
    let max_diff = r_logits
        .iter()
        .zip(&f_logits)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(max_diff <= 1e-4, "logits differ by up to {max_diff}");
    // The text side comes from the file's metadata on the router too.
    let addr = serve(router, metrics.clone()).await;
    let r = post_json(addr, "/v1/completions", &request(0)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = cluster.metrics(0, 0).await + &cluster.metrics(0, 1).await;
    assert!(counter_sum(&text, "tidal_worker_expert_tokens_total") > 0.0);
}

/// An in-process router HTTP server on 127.0.0.1.
async fn serve(loaded: Loaded, metrics: Arc<Metrics>) -> SocketAddr {
    let state = AppState::new(common::server_config(), metrics.clone());
    let engine = tidal_worker::serve::engine::spawn(
        loaded.model.clone(),
        loaded.codec.clone(),
        EngineConfig {
            max_batch: 8,
            queue_size: 64,
            ..EngineConfig::default()
        },
        metrics,
    );
    state.set_served(Served {
        engine,
        codec: loaded.codec,
        model: loaded.model,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tidal_worker::serve::http::router(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn request(i: usize) -> serde_json::Value {
    serde_json::json!({"model": common::MODEL, "prompt": format!("load {i}: the quick brown fox"),
        "max_tokens": 24, "temperature": 0, "ignore_eos": true})
}

/// Greedy completions from the full role, for comparison.
async fn expected(model: &Path, n: usize) -> Vec<String> {
    let full = tidal_worker::model::loader::load_dir(model, candle_core::DType::F32).unwrap();
    let addr = serve(full, Arc::new(Metrics::new())).await;
    let mut out = vec![];
    for i in 0..n {
        let r = post_json(addr, "/v1/completions", &request(i)).await;
        assert_eq!(r.status, 200);
        out.push(r.json()["choices"][0]["text"].as_str().unwrap().to_string());
    }
    out
}

/// `clients` concurrent clients each sending sequential requests until `stop` is
/// set (at least one each, at most 200); returns `(request index, status, text or body)`.
async fn load(
    addr: SocketAddr,
    clients: usize,
    n_distinct: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(usize, u16, String)> {
    let mut tasks = vec![];
    for c in 0..clients {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            for k in 0..200 {
                if k > 0 && stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = (c * 7 + k) % n_distinct;
                let r = post_json(addr, "/v1/completions", &request(i)).await;
                let text = if r.status == 200 {
                    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
                } else {
                    String::from_utf8_lossy(&r.body).to_string()
                };
                out.push((i, r.status, text));
            }
            out
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Every request answered 200 with the full role's text; prints the figure for RELIABILITY.md.
fn check_all_ok(fault: &str, results: &[(usize, u16, String)], want: &[String]) {
    for (i, status, text) in results {
        assert_eq!(*status, 200, "request {i} failed: {text}");
        assert_eq!(
            text, &want[*i],
            "request {i}: router output differs from full"
        );
    }
    eprintln!(
        "[fault] {fault}: {} requests, none failed, every answer equal to the full role's",
        results.len()
    );
}

/// Waits (up to 4 s) until the load is flowing: the router has generated some tokens.
async fn until_flowing(metrics: &Metrics) {
    for _ in 0..400 {
        if metrics.generated_tokens.get() >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the router has generated `n` more tokens than `from` (load still
/// flowing after an action), then sets `stop`.
async fn keep_loading(metrics: &Metrics, from: u64, n: u64, stop: &AtomicBool) {
    for _ in 0..6000 {
        if metrics.generated_tokens.get() >= from + n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics.generated_tokens.get() >= from + n,
        "the load stalled after the action"
    );
    stop.store(true, Ordering::SeqCst);
}

fn counter_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_load_fails_no_request() {
    let dir = fixture();
    let work = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), work.path()).await;
    let want = expected(dir.path(), 8).await;
    let metrics = Arc::new(Metrics::new());
    let client = start_client(&cluster.plan, metrics.clone()).await;
    let router = load_router(dir.path(), client).await;
    let addr = serve(router, metrics.clone()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(addr, 6, 8, stop.clone()));
    // Kill replica 0 of shard 0 and replica 1 of shard 2 once load is flowing.
    until_flowing(&metrics).await;
    for (s, r) in [(0, 0), (2, 1)] {
        let p = &mut cluster.procs.get_mut(&s).unwrap()[r];
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
    let generated_at_kill = metrics.generated_tokens.get();
    keep_loading(&metrics, generated_at_kill, 150, &stop).await;
    let results = running.await.unwrap();
    check_all_ok("two shard replicas killed under load", &results, &want);
    let text = metrics.encode();
    assert!(
        counter_sum(&text, "tidal_worker_shard_retries_total") >= 1.0,
        "no retry recorded: {text}"
    );

    // With every replica of shard 0 gone, requests fail with a clear 5xx.
    let p = &mut cluster.procs.get_mut(&0).unwrap()[1];
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let r = post_json(addr, "/v1/completions", &request(0)).await;
    assert!(r.status >= 500, "status {}", r.status);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("expert shard 0 unavailable"), "{body}");
}

/// A TCP balancer in front of a shard's replicas, like a Service's ClusterIP: each new
/// connection goes to the next backend not marked dead. Marking a backend dead ("its pod
/// crashed") cuts its open connections as soon as the router sends on them, so the request
/// in flight fails, as on a real crash.
struct Balancer {
    addr: SocketAddr,
    dead: Arc<Vec<AtomicBool>>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dead: Arc<Vec<AtomicBool>> =
            Arc::new(backends.iter().map(|_| AtomicBool::new(false)).collect());
        let state = dead.clone();
        tokio::spawn(async move {
            let mut next = 0;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let n = backends.len();
                let Some(b) = (0..n)
                    .map(|i| (next + i) % n)
                    .find(|&b| !state[b].load(Ordering::SeqCst))
                else {
                    continue;
                };
                next = b + 1;
                let (target, dead) = (backends[b], state.clone());
                tokio::spawn(async move {
                    let Ok(backend) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut br, mut bw) = backend.into_split();
                    let up = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 || dead[b].load(Ordering::SeqCst) {
                                return;
                            }
                            if bw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut br, &mut cw);
                    // Whichever side ends first, both sockets close.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self { addr, dead }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_behind_one_balancing_address_survives_its_pod_crashing() {
    let dir = fixture();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), work.path()).await;
    let want = expected(dir.path(), 8).await;
    // Shard 0's two replicas behind one address: the router sees a single replica, its one
    // HTTP/2 connection reaching replica 0.
    let lb = Balancer::start(cluster.procs[&0].iter().map(|p| p.addr).collect()).await;
    let urls = |s: usize| cluster.procs[&s].iter().map(ShardProc::url).collect();
    write_plan(
        &cluster.plan,
        1,
        &[
            (0, vec![0, 1], vec![format!("http://{}", lb.addr)], true),
            (1, vec![2, 3, 0], urls(1), false),
            (2, vec![4, 5], urls(2), false),
        ],
    );
    let metrics = Arc::new(Metrics::new());
    let client = start_client(&cluster.plan, metrics.clone()).await;
    assert_eq!(client.replicas()[&0], vec![lb.addr.to_string()]);
    let router = load_router(dir.path(), client).await;
    let addr = serve(router, metrics.clone()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(addr, 6, 8, stop.clone()));
    until_flowing(&metrics).await;
    lb.dead[0].store(true, Ordering::SeqCst);
    keep_loading(&metrics, metrics.generated_tokens.get(), 150, &stop).await;
    let results = running.await.unwrap();
    // The layer call cut off was retried on a new connection, which reached replica 1.
    check_all_ok(
        "a shard replica crashing behind one balancing address",
        &results,
        &want,
    );
    let text = metrics.encode();
    assert!(
        counter_sum(&text, "tidal_worker_shard_retries_total") >= 1.0,
        "no retry recorded: {text}"
    );
    assert!(
        counter_sum(
            &cluster.metrics(0, 1).await,
            "tidal_worker_expert_tokens_total"
        ) > 0.0,
        "replica 1 never served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_hangs_is_left_through_keepalive_pings() {
    let dir = fixture();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), work.path()).await;
    let want = expected(dir.path(), 8).await;
    let metrics = Arc::new(Metrics::new());
    // Calls wait for an answer far longer than the load waits for progress: only a missed
    // PING can get them off the frozen replica in time.
    let cfg = ClientConfig {
        poll_every: Duration::from_millis(200),
        attempt_timeout: Duration::from_secs(600),
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_secs(1),
        ..ClientConfig::default()
    };
    let client = ShardClient::start(&cluster.plan, cfg, metrics.clone())
        .await
        .unwrap();
    let router = load_router(dir.path(), client).await;
    let addr = serve(router, metrics.clone()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(addr, 6, 8, stop.clone()));
    until_flowing(&metrics).await;
    // Freeze replica 0 of shard 0: its socket still accepts, nothing answers.
    let frozen = cluster.procs[&0][0].child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &frozen])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {frozen}");
    };
    signal("-STOP");
    keep_loading(&metrics, metrics.generated_tokens.get(), 150, &stop).await;
    let results = running.await.unwrap();
    signal("-CONT");
    check_all_ok("a shard replica hung (SIGSTOP) under load", &results, &want);
    assert!(
        counter_sum(&metrics.encode(), "tidal_worker_shard_retries_total") >= 1.0,
        "no retry recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_placement_plan_under_load_fails_no_request() {
    let dir = fixture();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), work.path()).await;
    let want = expected(dir.path(), 8).await;
    let metrics = Arc::new(Metrics::new());
    let client = start_client(&cluster.plan, metrics.clone()).await;
    let router = load_router(dir.path(), client.clone()).await;
    let addr = serve(router, metrics.clone()).await;

    let before = cluster.metrics(2, 0).await + &cluster.metrics(2, 1).await;
    assert_eq!(
        counter_sum(
            &before
                .lines()
                .filter(|l| l.contains("expert=\"1\""))
                .collect::<Vec<_>>()
                .join("\n"),
            "tidal_worker_expert_tokens_total"
        ),
        0.0
    );
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(addr, 6, 8, stop.clone()));
    until_flowing(&metrics).await;
    // Move expert 1 from shard 0 to shard 2, and expert 0's copy off shard 1.
    cluster.write(2, &[(0, vec![0]), (1, vec![2, 3]), (2, vec![4, 5, 1])]);
    for _ in 0..100 {
        if client.plan().version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        client.plan().version,
        2,
        "the router never reloaded the plan"
    );
    // And again, still under load.
    let not_yet = AtomicBool::new(false);
    keep_loading(&metrics, metrics.generated_tokens.get(), 100, &not_yet).await;
    cluster.write(
        3,
        &[(0, vec![0, 1]), (1, vec![2, 3, 0]), (2, vec![4, 5, 1])],
    );
    for _ in 0..100 {
        if client.plan().version == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        client.plan().version,
        3,
        "the router never reloaded the plan"
    );
    keep_loading(&metrics, metrics.generated_tokens.get(), 150, &stop).await;
    let results = running.await.unwrap();
    check_all_ok("the placement plan changed under load", &results, &want);
    let after = cluster.metrics(2, 0).await + &cluster.metrics(2, 1).await;
    let e1: f64 = after
        .lines()
        .filter(|l| l.starts_with("tidal_worker_expert_tokens_total") && l.contains("expert=\"1\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(e1 > 0.0, "shard 2 never computed expert 1 after the move");
    assert!(
        metrics
            .encode()
            .contains("tidal_worker_placement_version 3"),
        "router did not take plan version 3"
    );
}

#[test]
fn expert_and_router_roles_need_their_flags() {
    let out = Command::new(BIN)
        .args(["serve", "--model", "/nonexistent", "--role", "expert"])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("TIDAL_PLACEMENT_FILE")
        .env_remove("TIDAL_SHARD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--placement-file"), "{err}");
    let out = Command::new(BIN)
        .args(["serve", "--model", "/nonexistent", "--role", "router"])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("TIDAL_PLACEMENT_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TIDAL_PLACEMENT_FILE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_binary_serves_the_openai_api_from_shard_processes() {
    let dir = fixture();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), work.path()).await;
    let want = expected(dir.path(), 2).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--role", "router", "--model"])
        .arg(dir.path())
        .args(["--served-model-name", common::MODEL])
        .args(["--listen", &addr.to_string()])
        .env("TIDAL_PLACEMENT_FILE", &cluster.plan)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut router = ShardProc { child, addr };
    wait_ready(&mut router).await;
    for (i, w) in want.iter().enumerate() {
        let r = post_json(addr, "/v1/completions", &request(i)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["choices"][0]["text"].as_str().unwrap(), w);
    }
    let m = http(addr, "GET", "/metrics", b"").await;
    let text = String::from_utf8(m.body).unwrap();
    assert!(text.contains("tidal_worker_placement_version 1"), "{text}");
    assert!(
        counter_sum(&text, "tidal_worker_expert_tokens_total") > 0.0,
        "{text}"
    );
    // The expert role serves no OpenAI API.
    let r = post_json(cluster.procs[&0][0].addr, "/v1/completions", &request(0)).await;
    assert_eq!(r.status, 404);
}
