//! Tiny random checkpoints in Hugging Face layout, for tests and benchmarks.
//!
//! Nothing is downloaded: the weights are random and the tokenizer is a byte-level BPE
//! (one token per byte, plus special tokens) built in code.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens, in id order after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 5] = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"];
/// Id of `</s>` (end of sequence).
pub const EOS_ID: u32 = 257;
/// ChatML, the fixtures' chat template.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// Id of `<|im_end|>`, which also ends generation.
pub const IM_END_ID: u32 = 259;

/// Which architecture to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FixtureArch {
    Mixtral,
    Llama,
    /// Llama layout plus q/k/v biases and tied input/output embeddings.
    Qwen2,
    /// Llama layout plus an RMSNorm on each query/key head.
    Qwen3,
    /// Qwen3 attention with Mixtral-style experts (GGUF only: `gen-fixture --gguf`).
    Qwen3Moe,
    /// Qwen2 attention (q/k/v biases), experts of half the `--intermediate` width under
    /// `mlp.experts`, top-k weights not renormalised, and a shared expert (full width)
    /// behind a sigmoid gate.
    Qwen2Moe,
    /// DeepSeek-V2 (V2-Lite layout): multi-head latent attention (q/k head width ≠ v
    /// head width), layer 0 dense, then experts of half the `--intermediate` width and
    /// two ungated shared experts, top-k weights times a routed scaling factor.
    DeepseekV2,
}

impl FixtureArch {
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Self::Mixtral | Self::Qwen3Moe | Self::Qwen2Moe | Self::DeepseekV2
        )
    }
}

/// DeepSeek-V2 fixtures: shared experts fused into one MLP (`n_shared_experts`).
pub const DEEPSEEK_SHARED_EXPERTS: usize = 2;
/// DeepSeek-V2 fixtures' `routed_scaling_factor` (V2-Lite's is 1, V2's 16): not 1, so that
/// a model that skipped it would not match.
pub const DEEPSEEK_ROUTED_SCALING: f64 = 2.5;

/// Shape of a generated checkpoint.
#[derive(Debug, Clone, clap::Args)]
pub struct FixtureSpec {
    #[arg(
        long,
        env = "TIDAL_FIXTURE_ARCH",
        value_enum,
        default_value = "mixtral"
    )]
    pub arch: FixtureArch,
    #[arg(long, env = "TIDAL_FIXTURE_HIDDEN", default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, env = "TIDAL_FIXTURE_INTERMEDIATE", default_value_t = 128)]
    pub intermediate: usize,
    #[arg(long, env = "TIDAL_FIXTURE_LAYERS", default_value_t = 2)]
    pub layers: usize,
    #[arg(long, env = "TIDAL_FIXTURE_HEADS", default_value_t = 4)]
    pub heads: usize,
    #[arg(long, env = "TIDAL_FIXTURE_KV_HEADS", default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, env = "TIDAL_FIXTURE_EXPERTS", default_value_t = 4)]
    pub experts: usize,
    #[arg(long, env = "TIDAL_FIXTURE_TOP_K", default_value_t = 2)]
    pub top_k: usize,
    #[arg(long, env = "TIDAL_FIXTURE_CONTEXT", default_value_t = 512)]
    pub context: usize,
    #[arg(long, env = "TIDAL_FIXTURE_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Split the weights over this many safetensors shards.
    #[arg(long, env = "TIDAL_FIXTURE_SHARDS", default_value_t = 1)]
    pub shards: usize,
    /// MoE only: bias every layer's router towards these experts (comma-separated ids), so
    /// per-expert load is strongly skewed whatever the prompt (for placement tests and demos).
    #[arg(long, env = "TIDAL_FIXTURE_HOT_EXPERTS", value_delimiter = ',')]
    pub hot_experts: Vec<usize>,
    /// Qwen2-MoE: layer l has experts when l + 1 is a multiple of this, else a dense
    /// MLP (`decoder_sparse_step`). DeepSeek-V2: layer l ≥ 1 has experts when l is a
    /// multiple of this (`moe_layer_freq`; `first_k_dense_replace` is 1).
    #[arg(long, env = "TIDAL_FIXTURE_SPARSE_STEP", default_value_t = 1)]
    pub sparse_step: usize,
    /// DeepSeek-V2 only: queries through a low-rank pair of this rank (`q_lora_rank`, as
    /// DeepSeek-V2); 0 for one `q_proj` (V2-Lite).
    #[arg(long, env = "TIDAL_FIXTURE_Q_LORA_RANK", default_value_t = 0)]
    pub q_lora_rank: usize,
}

impl Default for FixtureSpec {
    fn default() -> Self {
        Self {
            arch: FixtureArch::Mixtral,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            experts: 4,
            top_k: 2,
            context: 512,
            seed: 0,
            shards: 1,
            hot_experts: Vec::new(),
            sparse_step: 1,
            q_lora_rank: 0,
        }
    }
}

/// A DeepSeek-V2 fixture's attention widths, from `hidden / heads` (`d`): keys and queries
/// `d` + `d / 2` (rotary) wide, values `3d / 4`, the latent `hidden / 2`.
#[derive(Debug, Clone, Copy)]
pub struct MlaDims {
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl FixtureSpec {
    pub fn vocab_size(&self) -> usize {
        256 + SPECIAL_TOKENS.len()
    }

    /// Width of each routed expert's FFN: Qwen2-MoE's experts are narrower than its
    /// dense MLPs and shared expert, so a width mixed up at load fails on shapes.
    pub fn moe_intermediate(&self) -> usize {
        match self.arch {
            FixtureArch::Qwen2Moe | FixtureArch::DeepseekV2 => (self.intermediate / 2).max(1),
            _ => self.intermediate,
        }
    }

    /// Whether layer `l` has experts.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        match self.arch {
            FixtureArch::Qwen2Moe => (l + 1).is_multiple_of(self.sparse_step.max(1)),
            FixtureArch::DeepseekV2 => l >= 1 && l.is_multiple_of(self.sparse_step.max(1)),
            arch => arch.is_moe(),
        }
    }

    /// DeepSeek-V2's attention widths (see [`MlaDims`]).
    pub fn mla(&self) -> MlaDims {
        let d = (self.hidden / self.heads).max(4);
        MlaDims {
            kv_lora_rank: (self.hidden / 2).max(1),
            qk_nope_head_dim: d,
            // Rotary pairs: an even width.
            qk_rope_head_dim: (d / 2).max(2) & !1,
            v_head_dim: (3 * d / 4).max(1),
        }
    }
}

/// Writes `config.json`, `model*.safetensors`, `tokenizer.json` and `tokenizer_config.json`.
pub fn generate(spec: &FixtureSpec, out: &Path) -> Result<()> {
    if spec.arch == FixtureArch::Qwen3Moe {
        return Err(Error::Unsupported(
            "qwen3-moe fixtures are written as GGUF only (gen-fixture --gguf)".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors = tensors(spec)?;
    let vocab = spec.vocab_size();
    let h = spec.hidden;
    write_rest(spec, out, tensors, vocab, h)
}

/// The random weights of `spec`, in Hugging Face names (f32).
pub fn tensors(spec: &FixtureSpec) -> Result<Vec<(String, Tensor)>> {
    let vocab = spec.vocab_size();
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let head_dim = spec.hidden / spec.heads;
    let mut tensors: Vec<(String, Tensor)> = vec![];
    let mut add = |tensors: &mut Vec<(String, Tensor)>,
                   name: String,
                   shape: (usize, usize),
                   scale: f32|
     -> Result<()> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        tensors.push((name, Tensor::from_vec(data, shape, &Device::Cpu)?));
        Ok(())
    };
    let h = spec.hidden;
    // Scales keep activations O(1) so that logits are well separated and argmax is stable.
    let s_in = 1.0 / (h as f32).sqrt();
    let s_mid = 1.0 / (spec.intermediate as f32).sqrt();
    let moe_mid = spec.moe_intermediate();
    add(
        &mut tensors,
        "model.embed_tokens.weight".into(),
        (vocab, h),
        1.0,
    )?;
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        if spec.arch == FixtureArch::DeepseekV2 {
            let d = spec.mla();
            let q_dim = spec.heads * (d.qk_nope_head_dim + d.qk_rope_head_dim);
            let a = format!("{p}.self_attn");
            let mut mats = vec![];
            if spec.q_lora_rank > 0 {
                let r = spec.q_lora_rank;
                mats.push(("q_a_proj", (r, h), s_in));
                mats.push(("q_b_proj", (q_dim, r), 1.0 / (r as f32).sqrt()));
            } else {
                mats.push(("q_proj", (q_dim, h), s_in));
            }
            let (lora, kv_b) = (
                d.kv_lora_rank,
                spec.heads * (d.qk_nope_head_dim + d.v_head_dim),
            );
            let o_in = spec.heads * d.v_head_dim;
            mats.extend([
                ("kv_a_proj_with_mqa", (lora + d.qk_rope_head_dim, h), s_in),
                ("kv_b_proj", (kv_b, lora), 1.0 / (lora as f32).sqrt()),
                ("o_proj", (h, o_in), 1.0 / (o_in as f32).sqrt()),
            ]);
            for (name, shape, scale) in mats {
                add(&mut tensors, format!("{a}.{name}.weight"), shape, scale)?;
            }
            let mut norms = vec![("kv_a_layernorm", lora)];
            if spec.q_lora_rank > 0 {
                norms.push(("q_a_layernorm", spec.q_lora_rank));
            }
            for (norm, n) in norms {
                add(&mut tensors, format!("{a}.{norm}.weight"), (1, n), 0.1)?;
                let (name, t) = tensors.pop().expect("just pushed");
                tensors.push((name, (t.reshape(n)? + 1.0)?));
            }
        } else {
            add(
                &mut tensors,
                format!("{p}.self_attn.q_proj.weight"),
                (spec.heads * head_dim, h),
                s_in,
            )?;
            add(
                &mut tensors,
                format!("{p}.self_attn.k_proj.weight"),
                (spec.kv_heads * head_dim, h),
                s_in,
            )?;
            add(
                &mut tensors,
                format!("{p}.self_attn.v_proj.weight"),
                (spec.kv_heads * head_dim, h),
                s_in,
            )?;
            add(
                &mut tensors,
                format!("{p}.self_attn.o_proj.weight"),
                (h, spec.heads * head_dim),
                s_in,
            )?;
        }
        match spec.arch {
            FixtureArch::DeepseekV2 if spec.is_moe_layer(l) => {
                let q = format!("{p}.mlp");
                add(
                    &mut tensors,
                    format!("{q}.gate.weight"),
                    (spec.experts, h),
                    1.0,
                )?;
                let shared = moe_mid * DEEPSEEK_SHARED_EXPERTS;
                let experts = (0..spec.experts)
                    .map(|e| (format!("{q}.experts.{e}"), moe_mid))
                    .chain([(format!("{q}.shared_experts"), shared)]);
                for (m, mid) in experts {
                    for (name, shape, scale) in [
                        ("gate_proj", (mid, h), s_in),
                        ("up_proj", (mid, h), s_in),
                        ("down_proj", (h, mid), 1.0 / (mid as f32).sqrt()),
                    ] {
                        add(&mut tensors, format!("{m}.{name}.weight"), shape, scale)?;
                    }
                }
            }
            FixtureArch::Qwen2Moe if spec.is_moe_layer(l) => {
                let q = format!("{p}.mlp");
                add(
                    &mut tensors,
                    format!("{q}.gate.weight"),
                    (spec.experts, h),
                    1.0,
                )?;
                for e in 0..spec.experts {
                    let m = format!("{q}.experts.{e}");
                    for (name, shape, scale) in [
                        ("gate_proj", (moe_mid, h), s_in),
                        ("up_proj", (moe_mid, h), s_in),
                        ("down_proj", (h, moe_mid), 1.0 / (moe_mid as f32).sqrt()),
                    ] {
                        add(&mut tensors, format!("{m}.{name}.weight"), shape, scale)?;
                    }
                }
                for (name, shape, scale) in [
                    ("gate_proj", (spec.intermediate, h), s_in),
                    ("up_proj", (spec.intermediate, h), s_in),
                    ("down_proj", (h, spec.intermediate), s_mid),
                ] {
                    add(
                        &mut tensors,
                        format!("{q}.shared_expert.{name}.weight"),
                        shape,
                        scale,
                    )?;
                }
                // Scale 1: gate logits of a few units, so sigmoid(gate) spreads over most
                // of (0, 1) from token to token instead of sitting near 1/2.
                add(
                    &mut tensors,
                    format!("{q}.shared_expert_gate.weight"),
                    (1, h),
                    1.0,
                )?;
            }
            FixtureArch::Mixtral | FixtureArch::Qwen3Moe => {
                add(
                    &mut tensors,
                    format!("{p}.block_sparse_moe.gate.weight"),
                    (spec.experts, h),
                    1.0,
                )?;
                for e in 0..spec.experts {
                    let q = format!("{p}.block_sparse_moe.experts.{e}");
                    add(
                        &mut tensors,
                        format!("{q}.w1.weight"),
                        (spec.intermediate, h),
                        s_in,
                    )?;
                    add(
                        &mut tensors,
                        format!("{q}.w3.weight"),
                        (spec.intermediate, h),
                        s_in,
                    )?;
                    add(
                        &mut tensors,
                        format!("{q}.w2.weight"),
                        (h, spec.intermediate),
                        s_mid,
                    )?;
                }
            }
            FixtureArch::Llama
            | FixtureArch::Qwen2
            | FixtureArch::Qwen3
            | FixtureArch::Qwen2Moe
            | FixtureArch::DeepseekV2 => {
                add(
                    &mut tensors,
                    format!("{p}.mlp.gate_proj.weight"),
                    (spec.intermediate, h),
                    s_in,
                )?;
                add(
                    &mut tensors,
                    format!("{p}.mlp.up_proj.weight"),
                    (spec.intermediate, h),
                    s_in,
                )?;
                add(
                    &mut tensors,
                    format!("{p}.mlp.down_proj.weight"),
                    (h, spec.intermediate),
                    s_mid,
                )?;
            }
        }
        if matches!(spec.arch, FixtureArch::Qwen2 | FixtureArch::Qwen2Moe) {
            for (proj, heads) in [
                ("q", spec.heads),
                ("k", spec.kv_heads),
                ("v", spec.kv_heads),
            ] {
                let n = heads * head_dim;
                add(
                    &mut tensors,
                    format!("{p}.self_attn.{proj}_proj.bias"),
                    (1, n),
                    0.5,
                )?;
                let (name, t) = tensors.pop().expect("just pushed");
                tensors.push((name, t.reshape(n)?));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            // Ones plus noise, so a wrong norm weight would show up in the logits.
            add(&mut tensors, format!("{p}.{norm}.weight"), (1, h), 0.1)?;
            let (name, t) = tensors.pop().expect("just pushed");
            tensors.push((name, (t.reshape(h)? + 1.0)?));
        }
        // Drawn last, so the other architectures' weights do not change.
        if matches!(spec.arch, FixtureArch::Qwen3 | FixtureArch::Qwen3Moe) {
            for norm in ["q_norm", "k_norm"] {
                add(
                    &mut tensors,
                    format!("{p}.self_attn.{norm}.weight"),
                    (1, head_dim),
                    0.1,
                )?;
                let (name, t) = tensors.pop().expect("just pushed");
                tensors.push((name, (t.reshape(head_dim)? + 1.0)?));
            }
        }
    }
    tensors.push((
        "model.norm.weight".into(),
        Tensor::ones(h, DType::F32, &Device::Cpu)?,
    ));
    add(
        &mut tensors,
        "lm_head.weight".into(),
        (vocab, h),
        3.0 * s_in,
    )?;

    if spec.arch.is_moe() && !spec.hot_experts.is_empty() {
        skew_router(&mut tensors, spec)?;
    }
    Ok(tensors)
}

fn write_rest(
    spec: &FixtureSpec,
    out: &Path,
    tensors: Vec<(String, Tensor)>,
    vocab: usize,
    h: usize,
) -> Result<()> {
    let shards = spec.shards.max(1);
    let per = tensors.len().div_ceil(shards);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        candle_core::safetensors::save(&map, out.join(name))?;
    }

    let (model_type, class) = match spec.arch {
        FixtureArch::Mixtral => ("mixtral", "MixtralForCausalLM"),
        FixtureArch::Llama => ("llama", "LlamaForCausalLM"),
        FixtureArch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        FixtureArch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        FixtureArch::Qwen2Moe => ("qwen2_moe", "Qwen2MoeForCausalLM"),
        FixtureArch::DeepseekV2 => ("deepseek_v2", "DeepseekV2ForCausalLM"),
        FixtureArch::Qwen3Moe => unreachable!("refused above"),
    };
    let mut config = serde_json::json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 256,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": spec.arch == FixtureArch::Qwen2,
        "torch_dtype": "float32",
    });
    if spec.arch == FixtureArch::Qwen3 {
        config["head_dim"] = (h / spec.heads).into();
        config["attention_bias"] = false.into();
    }
    if matches!(
        spec.arch,
        FixtureArch::Qwen2 | FixtureArch::Qwen3 | FixtureArch::Qwen2Moe
    ) {
        config["sliding_window"] = spec.context.into();
        config["max_window_layers"] = spec.layers.into();
        config["use_sliding_window"] = false.into();
    }
    if spec.arch == FixtureArch::Qwen2Moe {
        config["num_experts"] = spec.experts.into();
        config["num_experts_per_tok"] = spec.top_k.into();
        config["moe_intermediate_size"] = spec.moe_intermediate().into();
        config["shared_expert_intermediate_size"] = spec.intermediate.into();
        config["norm_topk_prob"] = false.into();
        config["decoder_sparse_step"] = spec.sparse_step.max(1).into();
        config["mlp_only_layers"] = serde_json::json!([]);
    }
    if spec.arch == FixtureArch::DeepseekV2 {
        let d = spec.mla();
        let extra = serde_json::json!({
            "num_key_value_heads": spec.heads,
            "n_routed_experts": spec.experts,
            "n_shared_experts": DEEPSEEK_SHARED_EXPERTS,
            "num_experts_per_tok": spec.top_k,
            "moe_intermediate_size": spec.moe_intermediate(),
            "first_k_dense_replace": 1,
            "moe_layer_freq": spec.sparse_step.max(1),
            "routed_scaling_factor": DEEPSEEK_ROUTED_SCALING,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": false,
            "scoring_func": "softmax",
            "q_lora_rank": (spec.q_lora_rank > 0).then_some(spec.q_lora_rank),
            "kv_lora_rank": d.kv_lora_rank,
            "qk_nope_head_dim": d.qk_nope_head_dim,
            "qk_rope_head_dim": d.qk_rope_head_dim,
            "v_head_dim": d.v_head_dim,
            "attention_bias": false,
            "rope_scaling": null,
        });
        for (k, v) in extra.as_object().expect("an object") {
            config[k] = v.clone();
        }
    }
    if spec.arch == FixtureArch::Mixtral {
        config["num_local_experts"] = spec.experts.into();
        config["num_experts_per_tok"] = spec.top_k.into();
        config["sliding_window"] = spec.context.into();
    }
    write_json(&out.join("config.json"), &config)?;
    build_tokenizer()?
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &serde_json::json!({
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "chat_template": CHAT_TEMPLATE,
        }),
    )?;
    Ok(())
}

/// Hidden dimension that carries the router bias.
const BIAS_DIM: usize = 0;

/// Every token's embedding gets a large constant in one dimension, and every router scores
/// that dimension high for the hot experts and low for the others: after the RMS norm it
/// dominates the random part of the gate logits, so top-k picks the hot experts for (nearly)
/// every token in every layer. Applied after the random draws, so the other weights do not
/// change.
fn skew_router(tensors: &mut [(String, Tensor)], spec: &FixtureSpec) -> Result<()> {
    if let Some(&e) = spec.hot_experts.iter().find(|&&e| e >= spec.experts) {
        return Err(Error::InvalidConfig(format!(
            "hot expert {e} does not exist ({} experts)",
            spec.experts
        )));
    }
    let h = spec.hidden;
    for (name, t) in tensors.iter_mut() {
        let is_embedding = name == "model.embed_tokens.weight";
        if !is_embedding
            && !name.ends_with(".block_sparse_moe.gate.weight")
            && !name.ends_with(".mlp.gate.weight")
        {
            continue;
        }
        let (rows, cols) = t.dims2()?;
        let mut data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if is_embedding {
            for r in 0..rows {
                data[r * cols + BIAS_DIM] = 4.0;
            }
        } else {
            for e in 0..rows {
                data[e * cols + BIAS_DIM] = if spec.hot_experts.contains(&e) {
                    3.0
                } else {
                    -3.0
                };
            }
        }
        debug_assert_eq!(cols, h);
        *t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Byte-level BPE with no merges: every byte is one token, so any text is encodable.
pub fn build_tokenizer() -> Result<Tokenizer> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    // Order the byte tokens by the byte they stand for, as GPT-2 does.
    alphabet.sort_by_key(|c| byte_of(*c));
    let vocab: Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .chain(
            SPECIAL_TOKENS
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), 256 + i as u32)),
        )
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .unk_token("<unk>".into())
        .build()?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tok.add_special_tokens(specials)?;
    Ok(tok)
}

/// GPT-2's byte-to-char map, inverted: the byte a ByteLevel alphabet char stands for.
fn byte_of(c: char) -> u32 {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let cp = c as u32;
    if cp < 256 && printable(cp) {
        cp
    } else {
        // Non-printable bytes were shifted to 256 + n in order.
        let mut n = 0;
        for b in 0..256u32 {
            if !printable(b) {
                if 256 + n == cp {
                    return b;
                }
                n += 1;
            }
        }
        cp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_any_text() {
        let tok = build_tokenizer().unwrap();
        let text = "Hello, wörld! 你好 <|im_end|>";
        let enc = tok.encode(text, true).unwrap();
        assert!(enc.get_ids().contains(&IM_END_ID));
        assert_eq!(tok.encode("A", false).unwrap().get_ids(), &[65]);
        let dec = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(dec, text);
    }
}
