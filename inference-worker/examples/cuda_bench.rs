//! On an NVIDIA GPU, with a worker built for it (`deploy/cuda/build.sh --example cuda_bench`):
//! the CUDA path checked against the CPU path, and batch-1 decode measured against
//! candle-transformers on the same GPU, in one run (#15 item 7).
//!
//! 1. Reference: small random Llama, Qwen3, Mixtral and Qwen2-MoE checkpoints (f32) and a Q4_K
//!    Llama (GGUF) load on the CPU and on `cuda:0`; a prompt and 16 greedy steps run on both.
//!    Reported: the largest logit difference relative to the logits' largest magnitude, and
//!    whether the greedy tokens agree. The f32 checkpoints must agree (exit code 1 otherwise).
//! 2. Speed: a random Llama (`--hidden`, `--layers`) in f32, bf16 and Q4_K: decode tok/s at
//!    batch 1 of tidal-worker's `Model` and of candle-transformers' `llama` / `quantized_llama`
//!    on the same GPU (median of `--rounds`, alternating), tidal's aggregate tok/s at batch 16,
//!    and the weight bytes a batch-1 token reads against the GPU's measured copy bandwidth.
//!
//! `--out FILE` rewrites the `cuda_bench` section of FILE (printed when unset).

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama, quantized_llama};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tidal_worker::model::config::ModelConfig;
use tidal_worker::model::decoder::{KvCache, Model};
use tidal_worker::model::fixture::{FixtureArch, FixtureSpec};
use tidal_worker::model::gguf::GgufFile;
use tidal_worker::model::gguf_fixture::{self, Quant};
use tidal_worker::model::moe::ExpertPlacement;
use tidal_worker::serve::sampling::argmax;

#[derive(Parser)]
struct Args {
    /// Markdown file whose `cuda_bench` section is rewritten (printed when unset).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The speed checkpoint's width (a multiple of 256: K-quants pack rows of 256).
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    #[arg(long, default_value_t = 5632)]
    intermediate: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Greedy decode steps timed per round.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
}

const BEGIN: &str = "<!-- cuda_bench:begin -->";
const END: &str = "<!-- cuda_bench:end -->";
const PROMPT: usize = 16;
const CHECK_STEPS: usize = 16;

fn prompt() -> Vec<u32> {
    (0..PROMPT as u32).map(|i| 40 + 7 * i).collect()
}

fn logits_vec(t: Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Greedy decode: the logits after the prompt and after each of `steps` chosen tokens.
fn greedy(model: &Model, steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out = vec![model.forward(&prompt(), &mut cache).unwrap()];
    for _ in 0..steps {
        let next = argmax(out.last().unwrap());
        out.push(model.forward(&[next], &mut cache).unwrap());
    }
    out
}

struct Check {
    name: String,
    rel_diff: f32,
    same_tokens: bool,
    must_agree: bool,
}

fn check(name: &str, cpu: &Model, gpu: &Model, must_agree: bool) -> Check {
    let (a, b) = (greedy(cpu, CHECK_STEPS), greedy(gpu, CHECK_STEPS));
    let same_tokens = a.iter().map(|l| argmax(l)).eq(b.iter().map(|l| argmax(l)));
    let mut rel_diff = 0f32;
    for (x, y) in a.iter().zip(&b) {
        let scale = x
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        rel_diff = rel_diff.max(diff / scale);
    }
    eprintln!(
        "[cuda_bench] {name}: relative logit difference {rel_diff:.2e}, same tokens {same_tokens}"
    );
    Check {
        name: name.into(),
        rel_diff,
        same_tokens,
        must_agree,
    }
}

fn small(arch: FixtureArch) -> FixtureSpec {
    FixtureSpec {
        arch,
        hidden: 256,
        intermediate: 512,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        experts: if arch.is_moe() { 8 } else { 0 },
        top_k: 2,
        seed: 11,
        ..FixtureSpec::default()
    }
}

fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Model {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Model::load_dir_on(dir, cfg, dtype, ExpertPlacement::Local, device).unwrap()
}

fn load_gguf(path: &Path, device: &Device) -> Model {
    let file = Arc::new(GgufFile::open(path).unwrap());
    Model::load_gguf_on(file, ExpertPlacement::Local, device).unwrap()
}

/// Batch-1 decode tok/s of `step` (tokens in, logits out), after the prompt.
fn decode(tokens: usize, device: &Device, mut step: impl FnMut(&[u32], usize) -> Vec<f32>) -> f64 {
    let mut next = argmax(&step(&prompt(), 0));
    device.synchronize().unwrap();
    let start = Instant::now();
    for i in 0..tokens {
        next = argmax(&step(&[next], PROMPT + i));
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// Aggregate decode tok/s of 16 sequences advanced together.
fn batch16(model: &Model, tokens: usize) -> f64 {
    let mut caches: Vec<KvCache> = (0..16).map(|_| model.new_cache()).collect();
    let prompts: Vec<Vec<u32>> = (0..16u32)
        .map(|s| prompt().iter().map(|t| (t + s) % 250).collect())
        .collect();
    let mut next: Vec<u32> = caches
        .iter_mut()
        .zip(&prompts)
        .map(|(c, p)| argmax(&model.forward(p, c).unwrap()))
        .collect();
    let start = Instant::now();
    for _ in 0..tokens {
        let inputs: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let mut batch: Vec<(&[u32], &mut KvCache)> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| (&t[..], c))
            .collect();
        next = model
            .forward_batch(&mut batch)
            .unwrap()
            .iter()
            .map(|l| argmax(l))
            .collect();
    }
    (16 * tokens) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Speed {
    name: String,
    candle: f64,
    ours: f64,
    ours_b16: f64,
    bytes_per_token: f64,
}

/// Bytes per second of a device-to-device pass over a 1 GiB buffer (read + write counted).
fn copy_bandwidth(device: &Device) -> f64 {
    let n = 1usize << 28;
    let t = Tensor::ones(n, DType::F32, device).unwrap();
    let mut best = 0f64;
    for _ in 0..5 {
        device.synchronize().unwrap();
        let start = Instant::now();
        let u = t.affine(1.0, 0.0).unwrap();
        device.synchronize().unwrap();
        best = best.max((2 * 4 * n) as f64 / start.elapsed().as_secs_f64());
        drop(u);
    }
    best
}

fn main() {
    common::settle_threads();
    let args = Args::parse();
    let gpu = Device::new_cuda(args.gpu).expect("a CUDA device (built with --features cuda?)");
    let dir = tempfile::tempdir().unwrap();

    // 1. The CUDA path against the CPU path.
    let mut checks = vec![];
    for arch in [
        FixtureArch::Llama,
        FixtureArch::Qwen3,
        FixtureArch::Mixtral,
        FixtureArch::Qwen2Moe,
    ] {
        let d = dir.path().join(format!("{arch:?}"));
        tidal_worker::model::fixture::generate(&small(arch), &d).unwrap();
        let cpu = load_dir(&d, DType::F32, &Device::Cpu);
        let on_gpu = load_dir(&d, DType::F32, &gpu);
        checks.push(check(&format!("{arch:?}, f32"), &cpu, &on_gpu, true));
    }
    let q = dir.path().join("q4k-small");
    let small_q = FixtureSpec {
        hidden: 256,
        intermediate: 768,
        ..small(FixtureArch::Llama)
    };
    let q = gguf_fixture::write(&small_q, Quant::Q4k, &q).unwrap();
    checks.push(check(
        "Llama, Q4_K (GGUF)",
        &load_gguf(&q, &Device::Cpu),
        &load_gguf(&q, &gpu),
        false,
    ));

    // 2. Speed on a larger Llama.
    let spec = FixtureSpec {
        arch: FixtureArch::Llama,
        hidden: args.hidden,
        intermediate: args.intermediate,
        layers: args.layers,
        heads: 16,
        kv_heads: 8,
        seed: 3,
        ..FixtureSpec::default()
    };
    let big = dir.path().join("big");
    eprintln!("[cuda_bench] writing the speed checkpoint");
    tidal_worker::model::fixture::generate(&spec, &big).unwrap();
    let params = {
        let h = spec.hidden as f64;
        let kv = h * spec.kv_heads as f64 / spec.heads as f64;
        spec.layers as f64 * (2.0 * h * h + 2.0 * h * kv + 3.0 * h * spec.intermediate as f64)
    };
    let bandwidth = copy_bandwidth(&gpu);
    let mut speeds = vec![];
    for (name, dtype, bytes) in [("f32", DType::F32, 4.0), ("bf16", DType::BF16, 2.0)] {
        eprintln!("[cuda_bench] speed, {name}");
        let ours = load_dir(&big, dtype, &gpu);
        let text = std::fs::read_to_string(big.join("config.json")).unwrap();
        let cfg: llama::LlamaConfig = serde_json::from_str(&text).unwrap();
        let cfg = cfg.into_config(false);
        let mut tensors = std::collections::HashMap::new();
        for f in tidal_worker::model::weights::files_with_extension(&big, "safetensors").unwrap() {
            tensors.extend(candle_core::safetensors::load(&f, &gpu).unwrap());
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, &gpu);
        let reference = llama::Llama::load(vb, &cfg).unwrap();
        let (mut a, mut b) = (vec![], vec![]);
        for _ in 0..args.rounds {
            let mut cache = ours.new_cache();
            a.push(decode(args.tokens, &gpu, |t, _| {
                ours.forward(t, &mut cache).unwrap()
            }));
            let mut cache = llama::Cache::new(true, dtype, &cfg, &gpu).unwrap();
            b.push(decode(args.tokens, &gpu, |t, pos| {
                let x = Tensor::new(t, &gpu).unwrap().unsqueeze(0).unwrap();
                logits_vec(reference.forward(&x, pos, &mut cache).unwrap())
            }));
        }
        speeds.push(Speed {
            name: format!("{name} safetensors"),
            candle: median(b),
            ours: median(a),
            ours_b16: batch16(&ours, args.tokens),
            bytes_per_token: params * bytes,
        });
    }
    eprintln!("[cuda_bench] speed, Q4_K");
    let big_q = gguf_fixture::write(&spec, Quant::Q4k, &dir.path().join("big-q4k")).unwrap();
    let ours = load_gguf(&big_q, &gpu);
    let mut f = std::fs::File::open(&big_q).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = quantized_llama::ModelWeights::from_gguf(content, &mut f, &gpu).unwrap();
    let (mut a, mut b) = (vec![], vec![]);
    for _ in 0..args.rounds {
        let mut cache = ours.new_cache();
        a.push(decode(args.tokens, &gpu, |t, _| {
            ours.forward(t, &mut cache).unwrap()
        }));
        b.push(decode(args.tokens, &gpu, |t, pos| {
            let x = Tensor::new(t, &gpu).unwrap().unsqueeze(0).unwrap();
            logits_vec(reference.forward(&x, pos).unwrap())
        }));
    }
    speeds.push(Speed {
        name: "Q4_K GGUF".into(),
        candle: median(b),
        ours: median(a),
        ours_b16: batch16(&ours, args.tokens),
        // Q4_K: 144 bytes per 256 weights.
        bytes_per_token: params * 144.0 / 256.0,
    });

    let check_rows: Vec<String> = checks
        .iter()
        .map(|c| {
            format!(
                "| {} | {:.1e} | {} |",
                c.name,
                c.rel_diff,
                if c.same_tokens { "yes" } else { "no" }
            )
        })
        .collect();
    let speed_rows: Vec<String> = speeds
        .iter()
        .map(|s| {
            format!(
                "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.0} % |",
                s.name,
                s.candle,
                s.ours,
                s.ours / s.candle,
                s.ours_b16,
                100.0 * s.ours * s.bytes_per_token / bandwidth
            )
        })
        .collect();
    let md = format!(
        "{BEGIN}\n## On an NVIDIA GPU (`--features cuda`)\n\n\
Generated by `cuda_bench` (`deploy/cuda/build.sh --example cuda_bench`, run on the GPU machine; \
{build}). GPU copy bandwidth measured in the same run: {bw:.0} GB/s.\n\n\
The CUDA path against the CPU path (prompt {PROMPT} tokens, then {CHECK_STEPS} greedy steps; \
largest logit difference over the largest logit magnitude):\n\n\
| Checkpoint (small random) | relative logit difference | same greedy tokens |\n|---|---|---|\n{checks}\n\n\
Batch-1 decode on a random Llama (hidden {h}, intermediate {i}, {l} layers, {p:.0} M parameters), \
{n} timed greedy steps after a {PROMPT}-token prompt, median of {r} rounds alternating; against \
candle-transformers' `llama` (safetensors) and `quantized_llama` (GGUF) on the same GPU. Bandwidth \
share: weight bytes per batch-1 token times tok/s, over the copy bandwidth.\n\n\
| Weights | candle-transformers tok/s | tidal-worker tok/s | ratio | tidal batch 16, tok/s | bandwidth share (batch 1) |\n\
|---|---|---|---|---|---|\n{speeds}\n{END}\n",
        build = if cfg!(debug_assertions) {
            "dev profile"
        } else {
            "release build"
        },
        bw = bandwidth / 1e9,
        checks = check_rows.join("\n"),
        h = spec.hidden,
        i = spec.intermediate,
        l = spec.layers,
        p = params / 1e6,
        n = args.tokens,
        r = args.rounds,
        speeds = speed_rows.join("\n"),
    );
    common::write_section(args.out.as_deref(), BEGIN, END, &md);
    let bad: Vec<&str> = checks
        .iter()
        .filter(|c| c.must_agree && (!c.same_tokens || c.rel_diff > 1e-3))
        .map(|c| c.name.as_str())
        .collect();
    if !bad.is_empty() {
        eprintln!("[cuda_bench] the CUDA path disagrees with the CPU path on: {bad:?}");
        std::process::exit(1);
    }
}
