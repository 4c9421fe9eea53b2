//! Benchmark (not a test): the `full` role vs `router` + expert shards on the same
//! random Mixtral checkpoint, driven directly (no OpenAI HTTP layer), at batch
//! 1, 8 and 32.
//!
//! The shards run in this process as real HTTP/2 servers on 127.0.0.1 (the same
//! code as `tidal-worker serve --role expert`): 4 shards of 2 experts, shard 0 with
//! 2 replicas. Every process shares the same CPUs, so this measures the
//! disaggregation overhead (encoding, loopback HTTP/2, decoding, one round trip per
//! MoE layer), not any gain from spreading experts over machines.
//!
//! Per batch size: decode tokens/s of each, their ratio, the added latency per
//! decode step (= per generated token of a sequence), and the bytes on the wire
//! (request + response bodies) per token per MoE layer.
//!
//! Run: `cargo run --release -p tidal-worker --example disagg_bench -- --out inference-worker/BENCHMARKS.md`
//! (replaces only the section between its markers).

mod common;

use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidal_worker::disagg::expert_server::{ExpertShard, activate};
use tidal_worker::disagg::placement::PlanFile;
use tidal_worker::disagg::shard_client::{ClientConfig, ShardClient};
use tidal_worker::model::decoder::Model;
use tidal_worker::model::fixture::FixtureSpec;
use tidal_worker::serve::metrics::Metrics;

#[derive(Parser)]
struct Args {
    /// Markdown file whose disaggregation section is (re)written; prints only if absent.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 1024)]
    intermediate: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Decode steps measured per batch size.
    #[arg(long, default_value_t = 24)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// Alternating full / router measurements per batch size; the median is reported
    /// (damps other load on the machine).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const EXPERTS: usize = 8;
const BEGIN: &str = "<!-- disagg_bench:begin -->";
const END: &str = "<!-- disagg_bench:end -->";

/// Prefills `batch` prompts, then times `steps` batched greedy decode steps;
/// also returns how much `bytes()` grew during those steps.
fn decode(
    model: &Model,
    batch: usize,
    prompt: usize,
    steps: usize,
    bytes: &dyn Fn() -> u64,
) -> (Duration, u64, Vec<Vec<u32>>) {
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt)
                .map(|i| ((b * 31 + i * 7) % 250 + 3) as u32)
                .collect()
        })
        .collect();
    let mut last = vec![];
    for (p, c) in prompts.iter().zip(caches.iter_mut()) {
        let l = model.forward(p, c).unwrap();
        last.push(argmax(&l));
    }
    let mut out: Vec<Vec<u32>> = last.iter().map(|t| vec![*t]).collect();
    let b0 = bytes();
    let t0 = Instant::now();
    for _ in 0..steps {
        let mut b: Vec<(&[u32], &mut _)> = last
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| (std::slice::from_ref(t), c))
            .collect();
        let logits = model.forward_batch(&mut b).unwrap();
        last = logits.iter().map(|l| argmax(l)).collect();
        for (o, t) in out.iter_mut().zip(&last) {
            o.push(*t);
        }
    }
    let elapsed = t0.elapsed();
    (elapsed, bytes() - b0, out)
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

fn wire_bytes(m: &Metrics) -> u64 {
    ["sent", "received"]
        .iter()
        .map(|d| {
            m.shards
                .wire_bytes
                .get_or_create(&tidal_worker::disagg::metrics::DirectionLabels {
                    direction: (*d).into(),
                })
                .get()
        })
        .sum()
}

fn main() {
    common::run_tokio(None, run());
}

async fn run() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        hidden: args.hidden,
        intermediate: args.intermediate,
        layers: args.layers,
        heads: 16,
        kv_heads: 8,
        experts: EXPERTS,
        top_k: 2,
        context: 1024,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();

    // Shards: 4 x 2 experts; shard 0 has two replicas.
    let assignment: [(usize, Vec<usize>, usize); 4] = [
        (0, vec![0, 1], 2),
        (1, vec![2, 3], 1),
        (2, vec![4, 5], 1),
        (3, vec![6, 7], 1),
    ];
    let mut listeners = vec![];
    let mut shards_json = vec![];
    for (s, experts, replicas) in &assignment {
        let mut urls = vec![];
        for _ in 0..*replicas {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.push(format!("http://{}", l.local_addr().unwrap()));
            listeners.push((*s, l));
        }
        shards_json.push(serde_json::json!({"shard": s, "experts": experts,
            "endpoint": "http://unused.invalid:1", "replicas": replicas, "endpoints": urls}));
    }
    let plan_path = dir.path().join("plan.json");
    std::fs::write(
        &plan_path,
        serde_json::json!({"version": 1, "numExperts": EXPERTS, "shards": shards_json}).to_string(),
    )
    .unwrap();
    for (s, listener) in listeners {
        let shard = ExpertShard::open(
            dir.path(),
            candle_core::DType::F32,
            s,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let plan = PlanFile::open(&plan_path).unwrap();
        let tasks = activate(shard.clone(), plan).await.unwrap();
        std::mem::forget(tasks);
        let app = tidal_worker::disagg::expert_server::router(shard);
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let metrics = Arc::new(Metrics::new());
    let client = ShardClient::start(&plan_path, ClientConfig::default(), metrics.clone())
        .await
        .unwrap();
    let src = dir.path().to_str().unwrap().to_string();
    let d2 = dir.path().to_path_buf();
    let steps = args.steps;
    let prompt = args.prompt;
    let m2 = metrics.clone();
    let rounds = args.rounds.max(1);
    let rows = tokio::task::spawn_blocking(move || {
        let router = tidal_worker::disagg::shard_client::load_router(
            &src,
            candle_core::DType::F32,
            client,
            Duration::from_secs(60),
        )
        .unwrap();
        let full = tidal_worker::model::loader::load_dir(&d2, candle_core::DType::F32).unwrap();
        let mut rows = vec![];
        for batch in [1usize, 8, 32] {
            // Warm both once at this batch size.
            let count = || wire_bytes(&m2);
            decode(&full.model, batch, prompt, 2, &count);
            decode(&router.model, batch, prompt, 2, &count);
            let (mut tfs, mut trs, mut bytes) = (vec![], vec![], 0);
            for _ in 0..rounds {
                let (tf, _, out_f) = decode(&full.model, batch, prompt, steps, &count);
                let (tr, b, out_r) = decode(&router.model, batch, prompt, steps, &count);
                assert_eq!(out_f, out_r, "greedy tokens differ at batch {batch}");
                tfs.push(tf);
                trs.push(tr);
                bytes += b;
            }
            tfs.sort();
            trs.sort();
            let (tf, tr) = (tfs[rounds / 2], trs[rounds / 2]);
            let bytes = bytes / rounds as u64;
            let tokens = (batch * steps) as f64;
            let (full_tps, router_tps) = (tokens / tf.as_secs_f64(), tokens / tr.as_secs_f64());
            let added_ms = (tr.as_secs_f64() - tf.as_secs_f64()) / steps as f64 * 1e3;
            let per_tok_layer = bytes as f64 / tokens / spec.layers as f64;
            eprintln!(
                "batch {batch}: full {full_tps:.1} tok/s, router {router_tps:.1} tok/s, +{added_ms:.2} ms/token, {per_tok_layer:.0} B/token/layer"
            );
            rows.push((batch, full_tps, router_tps, added_ms, per_tok_layer));
        }
        rows
    })
    .await
    .unwrap();

    let mut md = String::new();
    md.push_str(&format!(
        "{BEGIN}\n## Expert disaggregation: `full` vs `router` + expert shards\n\n"
    ));
    md.push_str(&format!(
        "Generated by `{}`{}. Model: random Mixtral, hidden {}, intermediate {}, {} layers, {EXPERTS} experts top-2, \
16 heads / 8 KV heads, f32, CPU. Driven directly (`Model::forward_batch`, no OpenAI HTTP layer): prompt {} tokens, \
then {} timed greedy decode steps per batch size, measured {} times alternating full and router (median \
reported); router and full produced the same greedy tokens in every run.\n\n",
        if cfg!(debug_assertions) {
            "TMPDIR=/dev/shm cargo run -p tidal-worker --example disagg_bench -- --out inference-worker/BENCHMARKS.md"
        } else {
            "cargo run --release -p tidal-worker --example disagg_bench -- --out inference-worker/BENCHMARKS.md"
        },
        if cfg!(debug_assertions) {
            " (the dev profile: dependencies such as candle and gemm at opt-level 2, this crate at 1; \
`--release` gives the same comparison with this crate fully optimised)"
        } else {
            " (release build)"
        },
        args.hidden, args.intermediate, args.layers, args.prompt, args.steps, rounds
    ));
    md.push_str(
        "Shards: 4 expert shards of 2 experts each (shard 0 with 2 replicas, balanced round-robin), served over \
HTTP/2 (h2c) on 127.0.0.1 by the `expert` role's code in the same process: all of them share the machine's CPUs \
with the router, so the numbers show the cost of disaggregation (encode, one loopback round trip per MoE layer \
with all shards called concurrently, decode), not the gain of spreading experts across machines.\n\n",
    );
    md.push_str("| Batch | full tok/s | router+shards tok/s | ratio | added latency per token (ms) | wire bytes per token per layer |\n|---|---|---|---|---|---|\n");
    for (b, f, r, add, bytes) in &rows {
        md.push_str(&format!(
            "| {b} | {f:.1} | {r:.1} | {:.2} | {add:.2} | {bytes:.0} |\n",
            r / f
        ));
    }
    md.push_str(&format!(
        "\nWire bytes = request + response bodies (headers of HTTP/2 frames excluded). Per token per layer the \
router sends its hidden state once per shard holding one of the token's 2 experts (1 or 2 shards) plus 6 bytes \
of routing per expert, and gets back one hidden-state row per shard: at f32 and hidden {h} that is between \
{lo} and {hi} bytes plus the per-message headers (20 + 16 bytes per shard per layer, amortised over the batch).\n{END}\n",
        h = args.hidden,
        lo = 2 * 4 * args.hidden + 12,
        hi = 4 * 4 * args.hidden + 12,
    ));
    common::write_section(args.out.as_deref(), BEGIN, END, &md);
}
