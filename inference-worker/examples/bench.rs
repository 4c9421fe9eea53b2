//! Benchmark (not a test): a hidden-1024, 8-layer, 8-expert top-2 random Mixtral.
//!
//! Measures, in one run on one machine:
//! - decode tok/s at batch 1 of candle-transformers' Mixtral driven directly (the baseline),
//!   and of our model driven directly;
//! - aggregate tok/s through HTTP (streaming completions) at concurrency 1, 4 and 16,
//!   as a ratio to the baseline;
//! - client-side p50/p99 time to first token and time per output token;
//! - the bytes of weights each generated token reads vs the machine's memory bandwidth,
//!   measured in the same run with a large-buffer read (decode is memory-bound: at batch 1
//!   every token streams all dense weights and its top-k experts from RAM).
//!
//! Run: `cargo run --release -p tidal-worker --example bench -- --out inference-worker/BENCHMARKS.md`

mod common;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidal_worker::model::fixture::{FixtureArch, FixtureSpec};
use tidal_worker::model::loader::Loaded;
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::http::{AppState, Served, ServerConfig};
use tidal_worker::serve::metrics::Metrics;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Args {
    /// Where to write the Markdown report.
    #[arg(long, default_value = "inference-worker/BENCHMARKS.md")]
    out: std::path::PathBuf,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 1024)]
    intermediate: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Prompt length in tokens (bytes of the prompt text).
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// The long prompts' length in the long-prompt mix (sized so that 2 CPU threads keep up:
    /// 1024 saturated them, and every TTFT became queueing).
    #[arg(long, default_value_t = 256)]
    long_prompt: usize,
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let idx = ((xs.len() - 1) as f64 * p).round() as usize;
    xs[idx]
}

/// Baseline: candle-transformers' Mixtral, prefill then `n` greedy decode steps.
fn baseline_tok_s(dir: &std::path::Path, prompt: &[u32], n: usize) -> f64 {
    use candle_transformers::models::mixtral;
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["use_flash_attn"] = false.into();
    let cfg: mixtral::Config = serde_json::from_value(json).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = mixtral::Model::new(&cfg, vb).unwrap();
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, 0).unwrap();
    let mut next =
        tidal_worker::serve::sampling::argmax(&logits.flatten_all().unwrap().to_vec1().unwrap());
    let start = Instant::now();
    for i in 0..n {
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, prompt.len() + i).unwrap();
        next = tidal_worker::serve::sampling::argmax(
            &logits.flatten_all().unwrap().to_vec1().unwrap(),
        );
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn ours_tok_s(model: &tidal_worker::model::decoder::Model, prompt: &[u32], n: usize) -> f64 {
    let mut cache = model.new_cache();
    let logits = model.forward(prompt, &mut cache).unwrap();
    let mut next = tidal_worker::serve::sampling::argmax(&logits);
    let start = Instant::now();
    for _ in 0..n {
        next = tidal_worker::serve::sampling::argmax(&model.forward(&[next], &mut cache).unwrap());
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Bytes of weights a decode step reads, from the checkpoint's tensors.
struct WeightBytes {
    /// Everything but the experts (one embedding row per token), read once per step.
    dense: f64,
    /// One expert's weights summed over all layers.
    per_expert: f64,
    experts: usize,
    top_k: usize,
    /// The whole checkpoint.
    total: f64,
}

impl WeightBytes {
    fn new(dir: &std::path::Path, spec: &FixtureSpec) -> Self {
        let tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let (mut dense, mut experts, mut total) = (0usize, 0usize, 0usize);
        for (name, t) in &tensors {
            let bytes = t.elem_count() * t.dtype().size_in_bytes();
            total += bytes;
            if name.contains("embed_tokens") {
                dense += t.dims()[1] * t.dtype().size_in_bytes();
            } else if name.contains(".experts.") {
                experts += bytes;
            } else {
                dense += bytes;
            }
        }
        Self {
            dense: dense as f64,
            per_expert: experts as f64 / spec.experts.max(1) as f64,
            experts: spec.experts,
            top_k: spec.top_k,
            total: total as f64,
        }
    }

    /// Weights read per generated token when `rows` sequences decode in one step: the
    /// dense part once, plus every expert some row routes to (expected number of distinct
    /// experts under uniform top-k routing), shared by the rows.
    fn per_token(&self, rows: usize) -> f64 {
        let e = self.experts as f64;
        let distinct = if self.experts == 0 {
            0.0
        } else {
            e * (1.0 - ((e - self.top_k as f64) / e).powi(rows as i32))
        };
        (self.dense + distinct * self.per_expert) / rows as f64
    }
}

/// Read bandwidth in bytes/s: the best of several passes summing a buffer far larger
/// than any cache, split over `threads` threads.
fn read_bandwidth(threads: usize) -> f64 {
    let n = (512usize << 20) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let chunk = n.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut acc = [0u64; 4];
                        for q in part.chunks_exact(4) {
                            acc[0] = acc[0].wrapping_add(q[0]);
                            acc[1] = acc[1].wrapping_add(q[1]);
                            acc[2] = acc[2].wrapping_add(q[2]);
                            acc[3] = acc[3].wrapping_add(q[3]);
                        }
                        acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                    })
                })
                .collect();
            handles
                .into_iter()
                .fold(0u64, |a, h| a.wrapping_add(h.join().unwrap()))
        });
        std::hint::black_box(sum);
        best = best.max((n * 8) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

struct Timing {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
}

/// Serves `loaded` over HTTP on a free loopback port, batch up to 16, and the rest of `cfg`.
async fn serve(loaded: &Loaded, cfg: EngineConfig) -> SocketAddr {
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(
        ServerConfig {
            model_name: "bench".into(),
            ..ServerConfig::default()
        },
        metrics.clone(),
    );
    let engine = tidal_worker::serve::engine::spawn(
        loaded.model.clone(),
        loaded.codec.clone(),
        EngineConfig {
            max_batch: 16,
            queue_size: 64,
            ..cfg
        },
        metrics,
    );
    state.set_served(Served {
        engine,
        codec: loaded.codec.clone(),
        model: loaded.model.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        async move { axum::serve(listener, tidal_worker::serve::http::router(state)).await },
    );
    addr
}

/// Prompt lengths of the batch-1 decode after a long prompt.
const LONG_CONTEXTS: [usize; 2] = [1024, 2048];

/// Clients in the long-prompt mix, and requests each sends one after another.
const MIX_CLIENTS: usize = 16;
const MIX_ROUNDS: usize = 4;

/// [`MIX_CLIENTS`] clients each send [`MIX_ROUNDS`] requests in turn; one request in four has
/// a `long`-token prompt, the rest `short` ones. Every prompt starts with its own number, so no
/// prefix is reused. Returns (is long, timing) per request.
async fn long_prompt_mix(
    addr: SocketAddr,
    short: usize,
    long: usize,
    max_tokens: usize,
) -> Vec<(bool, Timing)> {
    let tasks: Vec<_> = (0..MIX_CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let mut out = vec![];
                for r in 0..MIX_ROUNDS {
                    let is_long = (c + r) % 4 == 0;
                    let n = if is_long { long } else { short };
                    let text: String = format!("{c}.{r}: ")
                        .chars()
                        .chain("The tide comes in. ".chars().cycle())
                        .take(n)
                        .collect();
                    out.push((is_long, one_request(addr, &text, max_tokens).await));
                }
                out
            })
        })
        .collect();
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// One streaming completion; returns client-side TTFT and inter-chunk gaps.
async fn one_request(addr: SocketAddr, prompt: &str, max_tokens: usize) -> Timing {
    let body = serde_json::json!({"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}})
    .to_string();
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let (mut first, mut last, mut gaps, mut tokens) = (None, None::<Instant>, vec![], 0);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap() == 0 {
            break;
        }
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            tokens = u as usize;
            continue;
        }
        let now = Instant::now();
        match last {
            None => first = Some(now - start),
            Some(t) => gaps.push((now - t).as_secs_f64()),
        }
        last = Some(now);
    }
    Timing {
        ttft: first.unwrap_or(Duration::ZERO).as_secs_f64(),
        gaps,
        tokens,
    }
}

fn main() {
    common::run_tokio(None, run());
}

async fn run() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        arch: FixtureArch::Mixtral,
        hidden: args.hidden,
        intermediate: args.intermediate,
        layers: args.layers,
        heads: 16,
        kv_heads: 8,
        experts: args.experts,
        top_k: 2,
        context: 4096,
        seed: 0,
        shards: 1,
        hot_experts: Vec::new(),
        sparse_step: 1,
        q_lora_rank: 0,
    };
    eprintln!("generating the checkpoint in {}", dir.path().display());
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    let prompt_text: String = "The tide comes in. "
        .chars()
        .cycle()
        .take(args.prompt)
        .collect();
    let prompt_ids: Vec<u32> = prompt_text.bytes().map(u32::from).collect();

    let weights = WeightBytes::new(dir.path(), &spec);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("memory bandwidth: large-buffer reads");
    let bw_one = read_bandwidth(1);
    let bw_all = read_bandwidth(cpus);

    eprintln!("baseline: candle-transformers Mixtral, batch 1");
    let base = baseline_tok_s(dir.path(), &prompt_ids, args.tokens);
    let loaded = tidal_worker::model::loader::load_dir(dir.path(), DType::F32).unwrap();
    eprintln!("ours, direct, batch 1");
    let direct = ours_tok_s(&loaded.model, &prompt_ids, args.tokens);
    // Decode after a long prompt: each step also reads the whole attention cache (and
    // whatever copies of it an implementation makes per step).
    let long_ctx: Vec<String> = LONG_CONTEXTS
        .iter()
        .map(|&ctx| {
            eprintln!("batch 1 after a {ctx}-token prompt: baseline, then ours");
            let p: Vec<u32> = prompt_text
                .bytes()
                .cycle()
                .take(ctx)
                .map(u32::from)
                .collect();
            let b = baseline_tok_s(dir.path(), &p, args.tokens);
            let o = ours_tok_s(&loaded.model, &p, args.tokens);
            format!("| {ctx} | {b:.1} | {o:.1} | {:.2} |", o / b)
        })
        .collect();

    let addr = serve(&loaded, EngineConfig::default()).await;

    let mut rows = vec![];
    let mut aggs = vec![];
    let gb = |bytes_per_s: f64| bytes_per_s / 1e9;
    let b1 = weights.per_token(1);
    let mut bw_rows = vec![
        format!(
            "| candle-transformers baseline, batch 1 | {:.1} | {base:.1} | {:.2} | {:.0}% |",
            b1 / 1e6,
            gb(b1 * base),
            100.0 * b1 * base / bw_all
        ),
        format!(
            "| tidal-worker `Model`, batch 1 | {:.1} | {direct:.1} | {:.2} | {:.0}% |",
            b1 / 1e6,
            gb(b1 * direct),
            100.0 * b1 * direct / bw_all
        ),
    ];
    for conc in [1usize, 4, 16] {
        eprintln!("HTTP, concurrency {conc}");
        let start = Instant::now();
        let tasks: Vec<_> = (0..conc)
            .map(|_| {
                let p = prompt_text.clone();
                tokio::spawn(async move { one_request(addr, &p, args.tokens).await })
            })
            .collect();
        let mut timings = vec![];
        for t in tasks {
            timings.push(t.await.unwrap());
        }
        let wall = start.elapsed().as_secs_f64();
        let total: usize = timings.iter().map(|t| t.tokens).sum();
        let mut ttfts: Vec<f64> = timings.iter().map(|t| t.ttft).collect();
        let mut gaps: Vec<f64> = timings.iter().flat_map(|t| t.gaps.clone()).collect();
        let agg = total as f64 / wall;
        aggs.push((conc, agg));
        let bt = weights.per_token(conc);
        bw_rows.push(format!(
            "| HTTP, concurrency {conc} | {:.1} | {agg:.1} | {:.2} | {:.0}% |",
            bt / 1e6,
            gb(bt * agg),
            100.0 * bt * agg / bw_all
        ));
        rows.push(format!(
            "| {conc} | {total} | {agg:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
            agg / base,
            percentile(&mut ttfts, 0.5) * 1e3,
            percentile(&mut ttfts, 0.99) * 1e3,
            percentile(&mut gaps, 0.5) * 1e3,
            percentile(&mut gaps, 0.99) * 1e3,
        ));
    }

    // Long prompts among short ones at concurrency 16: what chunked prefill buys the requests
    // that queue behind a long prefill (their TTFT) and the sequences decoding beside it (TPOT).
    let mut mix_rows = vec![];
    for chunk in [0usize, 128, 64] {
        eprintln!("HTTP, long-prompt mix, prefill chunk {chunk}");
        let addr = serve(
            &loaded,
            EngineConfig {
                prefill_chunk_tokens: chunk,
                ..EngineConfig::default()
            },
        )
        .await;
        let start = Instant::now();
        let timings = long_prompt_mix(addr, args.prompt, args.long_prompt, args.tokens).await;
        let wall = start.elapsed().as_secs_f64();
        let ttfts = |pick: Option<bool>| -> Vec<f64> {
            timings
                .iter()
                .filter(|(l, _)| pick.is_none_or(|p| p == *l))
                .map(|(_, t)| t.ttft)
                .collect()
        };
        let (mut all, mut short, mut long) = (ttfts(None), ttfts(Some(false)), ttfts(Some(true)));
        let mut gaps: Vec<f64> = timings.iter().flat_map(|(_, t)| t.gaps.clone()).collect();
        let total: usize = timings.iter().map(|(_, t)| t.tokens).sum();
        let (p50, p99) = (percentile(&mut all, 0.5), percentile(&mut all, 0.99));
        let (s50, s99) = (percentile(&mut short, 0.5), percentile(&mut short, 0.99));
        mix_rows.push(format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} |",
            if chunk == 0 { "off".to_string() } else { chunk.to_string() },
            p50 * 1e3,
            p99 * 1e3,
            p99 / p50,
            s50 * 1e3,
            s99 * 1e3,
            s99 / s50,
            percentile(&mut long, 0.5) * 1e3,
            percentile(&mut gaps, 0.99) * 1e3,
            percentile(&mut gaps, 0.5) * 1e3,
            total as f64 / wall,
        ));
    }

    let solo_agg = aggs[0].1;
    let scaling = aggs
        .iter()
        .map(|(conc, agg)| {
            format!(
                "- Concurrency {conc}: aggregate tok/s / concurrency-1 aggregate = {:.2}",
                agg / solo_agg
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let report = format!(
        "# tidal-worker benchmarks\n\n\
Generated by `cargo run {release}-p tidal-worker --example bench -- --out inference-worker/BENCHMARKS.md`.\n\
Numbers are from one run on the machine that produced this file; compare ratios, not absolute values.\n\n\
Machine: {cpus} CPU threads, {build}, no GPU.\n\
Model: random Mixtral checkpoint, hidden {h}, intermediate {i}, {l} layers, {e} experts top-2, 16 heads / 8 KV heads, f32, CPU.\n\
Prompt {p} tokens, {n} generated tokens per request (greedy, `ignore_eos`).\n\n\
## Batch 1, driven directly (no HTTP)\n\n\
| Implementation | decode tok/s | ratio to baseline |\n|---|---|---|\n\
| candle-transformers `models::mixtral` (baseline) | {base:.1} | 1.00 |\n\
| tidal-worker `Model` | {direct:.1} | {r:.2} |\n\n\
After a long prompt (the same greedy decode steps, each also reading the whole attention \
cache; grouped-query heads read their key head's cache in place rather than a copy per \
query head):\n\n\
| prompt tokens | candle-transformers tok/s | tidal-worker tok/s | ratio |\n|---|---|---|---|\n\
{long_ctx}\n\n\
## Through HTTP (streaming `/v1/completions`, client on the same machine)\n\n\
Aggregate tok/s = completion tokens of all requests / wall time from first send to last `[DONE]`.\n\
TTFT and TPOT are client-side (time to first SSE chunk; gap between chunks).\n\n\
| Concurrency | tokens | aggregate tok/s | ratio to baseline | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |\n\
|---|---|---|---|---|---|---|---|\n{rows}\n\n\
{scaling}\n\n\
## Long prompts among short ones, concurrency 16\n\n\
{mc} clients each send {mr} requests one after another; one request in four has a {lp}-token \
prompt, the others {p} tokens (each prompt starts with its own number: no prefix is reused), \
{n} generated tokens each; batch up to 16. The same requests for each `--prefill-chunk-tokens` \
setting, each on a fresh engine in this process (prompts get their chunks least remaining work \
first, each step waited counting as a chunk done: `pick_chunks`). TTFT is client-side, so it \
includes the wait for a place in the batch and for the steps ahead of the prompt; a long \
prompt's own TTFT includes its whole prefill however it is cut. Every token is one SSE chunk \
(with empty text while it is part of a character), so TTFT and TPOT are per token.\n\n\
| prefill chunk | TTFT p50 ms | TTFT p99 ms | p99/p50 | short prompts' TTFT p50 ms | short p99 ms | short p99/p50 | long prompts' TTFT p50 ms | TPOT p99 ms | TPOT p50 ms | aggregate tok/s |\n\
|---|---|---|---|---|---|---|---|---|---|---|\n{mix_rows}\n\n\
## Weights read per token vs memory bandwidth\n\n\
Decode is memory-bound: each step streams the weights it uses from RAM. Measured in this run \
with a large-buffer read (512 MiB of `u64`s summed, best of 5): **{bw1:.1} GB/s** on one thread, \
**{bwa:.1} GB/s** on {cpus} threads. Checkpoint: {total:.1} MB of weights; a batch-1 token reads \
the dense part ({dense:.1} MB: attention, norms, router, LM head, one embedding row) plus its \
top-{k} experts in every layer ({expert:.1} MB each over all layers) = **{b1m:.1} MB per token**, \
so the bandwidth roofline at batch 1 is {roof:.1} tok/s. With several sequences per step the \
dense weights and every expert any row routes to are read once for the whole step (expected \
distinct experts under uniform top-{k} routing), so the bytes per token fall.\n\n\
| Run | weights read per token (MB) | tok/s | weights read (GB/s) | share of measured {cpus}-thread bandwidth |\n\
|---|---|---|---|---|\n{bw_rows}\n\n\
Note: every decode step runs all running sequences in one forward pass: projections, MLPs and \
experts take the stacked `[batch, hidden]` rows (each expert runs once on the rows routed to it \
from the whole batch) while attention stays per sequence. The f32 projections use the worker's \
own matmul (`src/model/matmul.rs`): each output element is one dot product of an input row and a \
weight row, reduced in an order that depends only on the width, so a row's result is bitwise the \
same in any batch (greedy outputs under batching match solo runs exactly) without padding; at \
batch 1 it streams each weight once, with no copy. candle's matmul (the baseline's) takes gemm's \
matrix-vector kernel for one row and its blocked kernels, packing the weight, for more.\n",
        release = if cfg!(debug_assertions) {
            ""
        } else {
            "--release "
        },
        build = if cfg!(debug_assertions) {
            "dev profile (this crate opt-level 1, dependencies 2)"
        } else {
            "release build"
        },
        bw1 = gb(bw_one),
        bwa = gb(bw_all),
        total = weights.total / 1e6,
        dense = weights.dense / 1e6,
        expert = weights.per_expert / 1e6,
        k = weights.top_k,
        b1m = b1 / 1e6,
        roof = bw_all / b1,
        bw_rows = bw_rows.join("\n"),
        h = args.hidden,
        i = args.intermediate,
        l = args.layers,
        e = args.experts,
        p = prompt_ids.len(),
        n = args.tokens,
        r = direct / base,
        rows = rows.join("\n"),
        mix_rows = mix_rows.join("\n"),
        long_ctx = long_ctx.join("\n"),
        mc = MIX_CLIENTS,
        mr = MIX_ROUNDS,
        lp = args.long_prompt,
    );
    // Keep the sections other benches maintain between their markers (`disagg_bench`,
    // `prefix_bench`, ...): everything from the first `<!-- NAME:begin -->` on.
    let kept = std::fs::read_to_string(&args.out).ok().and_then(|old| {
        let start = old
            .find("<!-- ")
            .filter(|&i| old[i..].contains(":begin -->"))?;
        Some(old[start..].trim_end().to_string())
    });
    let full = match kept {
        Some(sections) => format!("{}\n\n{sections}\n", report.trim_end()),
        None => report.clone(),
    };
    std::fs::write(&args.out, &full).unwrap();
    println!("{report}");
}
