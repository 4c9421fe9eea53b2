//! Benchmark (not a test): time to first token with and without prefix reuse, on the
//! prompt-sharing structure of the Mooncake trace (`hash_ids`: one id per 512-token
//! block of a prompt; two prompts that start with the same ids share that prefix).
//!
//! The last `--requests` requests of the trace are replayed in order through the
//! worker's engine (continuous batching, no HTTP) at a fixed concurrency, once without
//! the prefix cache and then with it under each `--budget-mib`, all in this process on
//! the same random Mixtral checkpoint. Each hash id becomes `--block-tokens` tokens
//! (deterministic, from the id), and prompt lengths are scaled by the same factor, so
//! the prefix structure is the trace's and the sizes fit a CPU. Outputs are capped.
//!
//! Run: `cargo run --release -p tidal-worker --example prefix_bench -- --out inference-worker/BENCHMARKS.md`
//! (replaces only the section between its markers).

mod common;

use candle_core::DType;
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidal_worker::model::fixture::FixtureSpec;
use tidal_worker::serve::engine::{EngineConfig, Event, GenRequest};
use tidal_worker::serve::metrics::Metrics;
use tidal_worker::serve::prefix_cache::PrefixCacheConfig;
use tidal_worker::serve::sampling::SamplingParams;

#[derive(Parser)]
struct Args {
    #[arg(
        long,
        default_value = "../shared/traces/mooncake_synthetic_trace.jsonl"
    )]
    trace: PathBuf,
    /// Markdown file whose prefix-reuse section is (re)written; prints only if absent.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The trace's last this many requests are replayed.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Tokens per trace block (the trace's blocks are 512 tokens); also the cache's
    /// block size, so a shared trace block is a shared cache block.
    #[arg(long, default_value_t = 8)]
    block_tokens: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Generated tokens per request at most (the trace's output length, capped).
    #[arg(long, default_value_t = 4)]
    max_output: usize,
    /// Prefix-cache budgets to measure (MiB), each against the same run without reuse.
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    budget_mib: Vec<usize>,
    /// The engine's chunked prefill (0: prompts computed whole, which isolates what reuse
    /// saves from what chunking changes).
    #[arg(long, default_value_t = 0)]
    prefill_chunk_tokens: usize,
}

const BEGIN: &str = "<!-- prefix_bench:begin -->";
const END: &str = "<!-- prefix_bench:end -->";

struct TraceRequest {
    hash_ids: Vec<u64>,
    input_length: usize,
    output_length: usize,
}

fn read_trace(path: &PathBuf, last: usize) -> Vec<TraceRequest> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (pass --trace)", path.display()));
    let all: Vec<TraceRequest> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            TraceRequest {
                hash_ids: v["hash_ids"]
                    .as_array()
                    .expect("hash_ids")
                    .iter()
                    .map(|h| h.as_u64().expect("an integer hash id"))
                    .collect(),
                input_length: v["input_length"].as_u64().expect("input_length") as usize,
                output_length: v["output_length"].as_u64().expect("output_length") as usize,
            }
        })
        .collect();
    let skip = all.len().saturating_sub(last);
    all.into_iter().skip(skip).collect()
}

/// splitmix64: the tokens of one trace block, the same wherever the block appears.
fn block_tokens(id: u64, n: usize, vocab: u32) -> impl Iterator<Item = u32> {
    let mut s = id.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n).map(move |_| {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % u64::from(vocab)) as u32
    })
}

fn prompt_of(r: &TraceRequest, b: usize, vocab: u32) -> Vec<u32> {
    let len = ((r.input_length * b).div_ceil(512)).clamp(1, r.hash_ids.len() * b);
    r.hash_ids
        .iter()
        .flat_map(|&id| block_tokens(id, b, vocab))
        .take(len)
        .collect()
}

struct RunResult {
    ttft_ms: Vec<f64>,
    wall: Duration,
    queried: u64,
    hits: u64,
    evicted: u64,
    peak_bytes: i64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(
    loaded: &tidal_worker::model::loader::Loaded,
    prompts: &[(Vec<u32>, usize)],
    cache: Option<PrefixCacheConfig>,
    args: &Args,
) -> RunResult {
    let concurrency = args.concurrency;
    let metrics = Arc::new(Metrics::new());
    let engine = tidal_worker::serve::engine::spawn(
        loaded.model.clone(),
        loaded.codec.clone(),
        EngineConfig {
            max_batch: 16,
            queue_size: 1024,
            prefix_cache: cache,
            prefill_chunk_tokens: args.prefill_chunk_tokens,
        },
        metrics.clone(),
    );
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut tasks = Vec::with_capacity(prompts.len());
    for (prompt, max_tokens) in prompts {
        // In trace order: a request is sent once one of the `concurrency` slots frees.
        let permit = sem.clone().acquire_owned().await.expect("open semaphore");
        let req = GenRequest {
            prompt_ids: prompt.clone(),
            max_tokens: *max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: vec![],
            ignore_eos: true,
            arrived: Instant::now(),
            confidence: None,
            // A log probability arrives with every token, before any text: the first
            // one marks the first token even when its bytes are not yet valid UTF-8.
            logprobs: Some(0),
            prompt_logprobs: false,
        };
        let sent = req.arrived;
        let mut rx = engine.submit(req).expect("queue has room");
        let (metrics, peak) = (metrics.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            let mut ttft = None;
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Logprob(_) if ttft.is_none() => {
                        ttft = Some(sent.elapsed().as_secs_f64() * 1e3);
                        peak.fetch_max(
                            metrics.prefix_cache_bytes.get(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    Event::Done { .. } => break,
                    Event::Error(e) => panic!("request failed: {e}"),
                    _ => {}
                }
            }
            drop(permit);
            ttft.expect("a first token")
        }));
    }
    let mut ttft_ms = Vec::with_capacity(tasks.len());
    for t in tasks {
        ttft_ms.push(t.await.expect("request task"));
    }
    let wall = start.elapsed();
    ttft_ms.sort_by(f64::total_cmp);
    RunResult {
        ttft_ms,
        wall,
        queried: metrics.prefix_cache_queried_tokens.get(),
        hits: metrics.prefix_cache_hit_tokens.get(),
        evicted: metrics.prefix_cache_evicted_blocks.get(),
        peak_bytes: peak.load(std::sync::atomic::Ordering::Relaxed),
    }
}

fn main() {
    common::run_tokio(Some(2), bench());
}

async fn bench() {
    let args = Args::parse();
    let trace = read_trace(&args.trace, args.requests);
    assert!(!trace.is_empty(), "no requests in {}", args.trace.display());
    let b = args.block_tokens.max(1);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let spec = FixtureSpec {
        hidden: 256,
        intermediate: 512,
        layers: 4,
        heads: 8,
        kv_heads: 2,
        experts: 8,
        top_k: 2,
        context: 8192,
        seed: 11,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).expect("writing the checkpoint");
    let loaded = tidal_worker::model::loader::load_dir(dir.path(), DType::F32).expect("loading it");
    let vocab = spec.vocab_size() as u32;
    let prompts: Vec<(Vec<u32>, usize)> = trace
        .iter()
        .map(|r| {
            (
                prompt_of(r, b, vocab),
                r.output_length.clamp(1, args.max_output),
            )
        })
        .collect();
    let prompt_tokens: usize = prompts.iter().map(|(p, _)| p.len()).sum();
    // The reuse an unbounded cache could get: each request's leading trace blocks seen
    // in an earlier request of the slice, whole blocks only, never its last two tokens.
    let ideal = {
        let mut seen: std::collections::HashSet<Vec<u64>> = Default::default();
        let mut reusable = 0usize;
        for (r, (p, _)) in trace.iter().zip(&prompts) {
            let most = (p.len().saturating_sub(2) / b).min(r.hash_ids.len());
            let hit = (0..most)
                .take_while(|&i| seen.contains(&r.hash_ids[..=i]))
                .count();
            reusable += hit * b;
            for i in 0..(p.len() / b).min(r.hash_ids.len()) {
                seen.insert(r.hash_ids[..=i].to_vec());
            }
        }
        reusable
    };
    eprintln!(
        "{} requests, {prompt_tokens} prompt tokens ({b} per trace block), {:.1}% reusable in principle",
        prompts.len(),
        100.0 * ideal as f64 / prompt_tokens as f64
    );

    let base = run(&loaded, &prompts, None, &args).await;
    eprintln!(
        "no reuse: {:.1} s, TTFT p50 {:.0} ms",
        base.wall.as_secs_f64(),
        percentile(&base.ttft_ms, 0.5)
    );
    let mut rows = vec![("off".to_string(), base)];
    for mib in &args.budget_mib {
        let r = run(
            &loaded,
            &prompts,
            Some(PrefixCacheConfig {
                block_tokens: b,
                budget_bytes: mib << 20,
            }),
            &args,
        )
        .await;
        eprintln!(
            "{mib} MiB: {:.1} s, TTFT p50 {:.0} ms, hit {:.1}%",
            r.wall.as_secs_f64(),
            percentile(&r.ttft_ms, 0.5),
            100.0 * r.hits as f64 / r.queried.max(1) as f64
        );
        rows.push((format!("{mib} MiB"), r));
    }

    let profile = if cfg!(debug_assertions) {
        "dev profile (this crate opt-level 1, dependencies 2)"
    } else {
        "release profile"
    };
    let base_p50 = percentile(&rows[0].1.ttft_ms, 0.5);
    let base_p95 = percentile(&rows[0].1.ttft_ms, 0.95);
    let base_mean = rows[0].1.ttft_ms.iter().sum::<f64>() / rows[0].1.ttft_ms.len() as f64;
    let kv_per_token = 2 * spec.layers * spec.kv_heads * (spec.hidden / spec.heads) * 4;
    let mut md = format!(
        "{BEGIN}\n## Prefix reuse on the Mooncake trace\n\n\
Generated by `cargo run {rel}-p tidal-worker --example prefix_bench -- --out inference-worker/BENCHMARKS.md` in the {profile} \
on 2 CPU threads. Trace: the last {n} requests of `mooncake_synthetic_trace.jsonl` in order; each 512-token \
trace block (`hash_ids`) becomes {b} tokens derived from its id and prompt lengths are scaled by {b}/512, so \
{prompt_tokens} prompt tokens in all, of which {ideal_pct:.1}% are whole blocks an unbounded cache could reuse \
(a prefix of trace blocks seen in an earlier request, never a prompt's last two tokens). Outputs capped at {out} \
tokens. Driven through the engine (continuous batching, max batch 16, {chunking}) with {c} requests in \
flight, sent in trace order. Model: random Mixtral, hidden {h}, 4 layers, 8 experts top-2, 8 heads / 2 KV heads, f32 \
({kv} bytes of keys and values per token). Cache blocks of {b} tokens. Every run in the same process.\n\n\
| Prefix cache | hit rate (reused / prompt tokens) | blocks evicted | peak cache MiB | TTFT p50 ms | TTFT p95 ms | TTFT mean ms | mean ratio to no reuse | wall s |\n\
|---|---|---|---|---|---|---|---|---|\n",
        rel = if cfg!(debug_assertions) {
            ""
        } else {
            "--release "
        },
        n = prompts.len(),
        ideal_pct = 100.0 * ideal as f64 / prompt_tokens as f64,
        out = args.max_output,
        c = args.concurrency,
        chunking = match args.prefill_chunk_tokens {
            0 => "prompts computed whole".to_string(),
            n => format!("chunked prefill of {n} tokens per step"),
        },
        h = spec.hidden,
        kv = kv_per_token,
    );
    for (name, r) in &rows {
        let mean = r.ttft_ms.iter().sum::<f64>() / r.ttft_ms.len() as f64;
        md.push_str(&format!(
            "| {name} | {:.1}% | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} |\n",
            100.0 * r.hits as f64 / r.queried.max(1) as f64,
            r.evicted,
            r.peak_bytes as f64 / (1 << 20) as f64,
            percentile(&r.ttft_ms, 0.5),
            percentile(&r.ttft_ms, 0.95),
            mean,
            mean / base_mean,
            r.wall.as_secs_f64(),
        ));
    }
    md.push_str(&format!(
        "\nWithout reuse: TTFT p50 {base_p50:.0} ms, p95 {base_p95:.0} ms. TTFT includes queueing behind \
the other requests in flight, so time saved on one prompt's prefill also shortens the others' waits.\n{END}\n"
    ));
    common::write_section(args.out.as_deref(), BEGIN, END, &md);
}
