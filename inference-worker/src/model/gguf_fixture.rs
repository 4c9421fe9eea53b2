//! Tiny random GGUF files, written as llama.cpp's converter writes real ones: the
//! fixture's weights under llama.cpp's names, experts stacked per layer, Llama-family
//! query/key rows interleaved, matrices quantized, vocabulary in the metadata.

use crate::error::{Error, Result};
use crate::model::fixture::{self, EOS_ID, FixtureArch, FixtureSpec, SPECIAL_TOKENS};
use crate::model::gguf::{GgufRef, gguf_name};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The quantization types a fixture can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    F32,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4k,
    Q5k,
    Q6k,
}

impl Quant {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Quant::F32 => GgmlDType::F32,
            Quant::Q4_0 => GgmlDType::Q4_0,
            Quant::Q4_1 => GgmlDType::Q4_1,
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4k => GgmlDType::Q4K,
            Quant::Q5k => GgmlDType::Q5K,
            Quant::Q6k => GgmlDType::Q6K,
        }
    }
}

fn arch_name(arch: FixtureArch) -> &'static str {
    match arch {
        FixtureArch::Llama | FixtureArch::Mixtral => "llama",
        FixtureArch::Qwen3 => "qwen3",
        FixtureArch::Qwen3Moe => "qwen3moe",
        FixtureArch::Qwen2 => "qwen2",
        FixtureArch::Qwen2Moe => "qwen2moe",
        FixtureArch::DeepseekV2 => "deepseek2",
    }
}

/// llama.cpp's `permute` of query/key rows: each head's two halves interleaved, so
/// that Meta's pairwise rotary applies (the inverse of Hugging Face's conversion).
fn interleave_heads(w: &Tensor, heads: usize) -> Result<Tensor> {
    let rows = w.dim(0)?;
    let d = rows / heads;
    let idx: Vec<u32> = (0..heads)
        .flat_map(|h| (0..d / 2).flat_map(move |j| [h * d + j, h * d + d / 2 + j]))
        .map(|r| r as u32)
        .collect();
    Ok(w.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?)
}

/// Writes `spec`'s weights as `{out}/model.gguf` with matrices in `quant` (those whose
/// rows are not a whole number of blocks stay f32) and returns the file's path.
pub fn write(spec: &FixtureSpec, quant: Quant, out: &Path) -> Result<PathBuf> {
    write_with(spec, quant, out, false)
}

/// [`write`], with each expert as a tensor of its own (`blk.N.ffn_gate.E.weight`, as
/// older Mixtral files) when `legacy_experts`.
pub fn write_with(
    spec: &FixtureSpec,
    quant: Quant,
    out: &Path,
    legacy_experts: bool,
) -> Result<PathBuf> {
    let arch = arch_name(spec.arch);
    if spec.arch == FixtureArch::DeepseekV2 {
        return Err(Error::Unsupported(
            "deepseek_v2 fixtures are written as safetensors only (the worker reads no \
             deepseek2 GGUF files)"
                .into(),
        ));
    }
    if spec.arch == FixtureArch::Qwen2Moe && spec.sparse_step > 1 {
        return Err(Error::Unsupported(
            "llama.cpp's qwen2moe has experts in every layer: no --sparse-step".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let head_dim = spec.hidden / spec.heads;
    let interleave = arch == "llama";
    let mut whole: Vec<(String, QTensor)> = vec![];
    // (layer stack name) -> experts in order.
    let mut stacks: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    let ggml = quant.ggml();
    let quantize = |t: &Tensor, matrix: bool| -> Result<QTensor> {
        let cols = *t.dims().last().expect("a tensor with dims");
        let dtype = if matrix && cols.is_multiple_of(ggml.block_size()) {
            ggml
        } else {
            GgmlDType::F32
        };
        Ok(QTensor::quantize(t, dtype)?)
    };
    for (name, t) in fixture::tensors(spec)? {
        let r = gguf_name(&name)
            .ok_or_else(|| Error::Unsupported(format!("fixture tensor {name} has no GGUF name")))?;
        match r {
            GgufRef::Expert { legacy, .. } if legacy_experts => {
                whole.push((legacy, quantize(&t, true)?));
            }
            GgufRef::Expert {
                stacked, expert, ..
            } => stacks.entry(stacked).or_default().push((expert, t)),
            GgufRef::Whole(gname) => {
                let t = match name.rsplit('.').nth(1) {
                    Some("q_proj") if interleave => interleave_heads(&t, spec.heads)?,
                    Some("k_proj") if interleave => interleave_heads(&t, spec.kv_heads)?,
                    // llama.cpp stores the shared expert's one-row gate as a vector.
                    Some("shared_expert_gate") => t.flatten_all()?,
                    _ => t,
                };
                // The router stays f32 (as llama.cpp keeps small, precision-critical
                // tensors); norms and biases are vectors.
                let matrix = t.rank() == 2 && !gname.ends_with("ffn_gate_inp.weight");
                whole.push((gname, quantize(&t, matrix)?));
            }
        }
    }
    for (name, mut experts) in stacks {
        experts.sort_by_key(|(e, _)| *e);
        let ts: Vec<Tensor> = experts.into_iter().map(|(_, t)| t).collect();
        whole.push((name, quantize(&Tensor::stack(&ts, 0)?, true)?));
    }

    let tok = fixture::build_tokenizer()?;
    let vocab = spec.vocab_size();
    let tokens: Vec<Value> = (0..vocab as u32)
        .map(|i| Value::String(tok.id_to_token(i).unwrap_or_default()))
        .collect();
    let types: Vec<Value> = (0..vocab)
        .map(|i| Value::I32(if i >= 256 { 3 } else { 1 }))
        .collect();
    let k = |s: &str| format!("{arch}.{s}");
    let u = |n: usize| Value::U32(n as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tidal-fixture".into())),
        // candle-transformers' quantized Qwen3 computes in this dtype (0: f32), else f16.
        ("general.dtype".into(), Value::U32(0)),
        (k("context_length"), u(spec.context)),
        (k("embedding_length"), u(spec.hidden)),
        (k("feed_forward_length"), u(spec.intermediate)),
        (k("block_count"), u(spec.layers)),
        (k("attention.head_count"), u(spec.heads)),
        (k("attention.head_count_kv"), u(spec.kv_heads)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("rope.freq_base"), Value::F32(10_000.0)),
        (k("rope.dimension_count"), u(head_dim)),
        (k("vocab_size"), u(vocab)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(EOS_ID)),
        (
            "tokenizer.chat_template".into(),
            Value::String(fixture::CHAT_TEMPLATE.into()),
        ),
    ];
    if matches!(spec.arch, FixtureArch::Qwen3 | FixtureArch::Qwen3Moe) {
        md.push((k("attention.key_length"), u(head_dim)));
        md.push((k("attention.value_length"), u(head_dim)));
    }
    if spec.arch.is_moe() {
        md.push((k("expert_count"), u(spec.experts)));
        md.push((k("expert_used_count"), u(spec.top_k)));
    }
    if spec.arch == FixtureArch::Qwen3Moe {
        md.push((k("expert_feed_forward_length"), u(spec.intermediate)));
    }
    if spec.arch == FixtureArch::Qwen2Moe {
        md.push((k("expert_feed_forward_length"), u(spec.moe_intermediate())));
        md.push((k("expert_shared_feed_forward_length"), u(spec.intermediate)));
    }
    debug_assert_eq!(SPECIAL_TOKENS.len() + 256, vocab);

    let path = out.join("model.gguf");
    let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = whole.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(path)
}
