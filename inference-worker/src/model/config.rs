//! The model configuration read from a Hugging Face `config.json`.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Which decoder family a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Sparse MoE (Mixtral family): top-k softmax gating over N experts.
    Mixtral,
    /// Dense decoders: Llama, Mistral (no attention bias).
    Llama,
    /// Dense Qwen2 (bias on the q/k/v projections).
    Qwen2,
    /// Dense Qwen3 (RMSNorm on each query/key head, no bias).
    Qwen3,
    /// Qwen3-MoE: Qwen3 attention, top-k over many experts.
    Qwen3Moe,
    /// Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention, top-k over many experts plus a shared
    /// expert that every token goes through, scaled by a sigmoid gate.
    Qwen2Moe,
    /// DeepSeek-V2 (V2-Lite): multi-head latent attention ([`MlaConfig`]), top-k over
    /// many experts plus ungated shared experts, the first layers dense.
    DeepseekV2,
}

impl Arch {
    pub fn attention_bias(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen2Moe)
    }

    /// The checkpoint module of a MoE layer's gate and experts. Qwen2-MoE keeps Hugging
    /// Face's `mlp`; Qwen3-MoE (GGUF only, so its names are ours) shares Mixtral's.
    pub fn moe_block(self) -> &'static str {
        match self {
            Arch::Qwen2Moe | Arch::DeepseekV2 => "mlp",
            _ => "block_sparse_moe",
        }
    }

    /// An expert's gate, up and down projections, below `{moe_block}.experts.{e}`.
    pub fn expert_projections(self) -> [&'static str; 3] {
        match self {
            Arch::Qwen2Moe | Arch::DeepseekV2 => ["gate_proj", "up_proj", "down_proj"],
            _ => ["w1", "w3", "w2"],
        }
    }

    /// The shared expert's module below `{moe_block}`, and its sigmoid gate's if it has
    /// one (Qwen2-MoE's `shared_expert` and `shared_expert_gate`; DeepSeek-V2's
    /// `shared_experts`, several experts fused into one MLP, ungated).
    pub fn shared_expert(self) -> (&'static str, Option<&'static str>) {
        match self {
            Arch::DeepseekV2 => ("shared_experts", None),
            _ => ("shared_expert", Some("shared_expert_gate")),
        }
    }

    /// Whether the MoE gate's logits are computed in f32 whatever the serving dtype
    /// (transformers' and candle's DeepSeek-V2 gate).
    pub fn gate_in_f32(self) -> bool {
        self == Arch::DeepseekV2
    }

    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Qwen3Moe)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    // Qwen2-MoE.
    num_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    #[serde(default)]
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    // DeepSeek-V2.
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    routed_scaling_factor: Option<f64>,
    topk_method: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    scoring_func: Option<String>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
}

fn default_max_pos() -> usize {
    4096
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}

/// DeepSeek-V2's multi-head latent attention: keys and values decompressed per head
/// from one shared latent (`kv_lora_rank`) plus one shared rotary key (`qk_rope_head_dim`).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Queries through a low-rank pair (`q_a_proj`, `q_a_layernorm`, `q_b_proj`); None
    /// for one `q_proj` (V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// YaRN rotary scaling (DeepSeek-V2's `rope_scaling` with `type: yarn`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

impl Yarn {
    /// transformers' `yarn_get_mscale`.
    pub fn get_mscale(&self, mscale: f64) -> f64 {
        if self.factor <= 1.0 {
            1.0
        } else {
            0.1 * mscale * self.factor.ln() + 1.0
        }
    }

    fn parse(v: &serde_json::Value) -> Result<Self> {
        let kind = v
            .get("type")
            .or_else(|| v.get("rope_type"))
            .and_then(|t| t.as_str())
            .unwrap_or_default();
        if kind != "yarn" {
            return Err(Error::Unsupported(format!(
                "rope_scaling type {kind:?} (only yarn, for deepseek_v2)"
            )));
        }
        let num = |k: &str, default: Option<f64>| {
            v.get(k)
                .and_then(|x| x.as_f64())
                .or(default)
                .ok_or_else(|| Error::Unsupported(format!("yarn rope_scaling without {k}")))
        };
        // transformers' DeepseekV2YarnRotaryEmbedding defaults.
        Ok(Self {
            factor: num("factor", None)?,
            original_max_position_embeddings: num("original_max_position_embeddings", None)?
                as usize,
            beta_fast: num("beta_fast", Some(32.0))?,
            beta_slow: num("beta_slow", Some(1.0))?,
            mscale: num("mscale", Some(1.0))?,
            mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
        })
    }
}

/// The subset of `config.json` the worker's models use.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLPs (dense models, and the dense layers of a MoE model).
    pub intermediate_size: usize,
    /// Width of each routed expert's FFN (MoE models).
    pub moe_intermediate_size: usize,
    /// Width of the shared expert every token goes through beside its routed experts
    /// (Qwen2-MoE; DeepSeek-V2's `n_shared_experts` fused); 0 when there is none.
    pub shared_expert_intermediate_size: usize,
    /// Layers of a MoE model that have a dense MLP instead of experts (Qwen2-MoE's
    /// `mlp_only_layers` and the layers off its `decoder_sparse_step`; DeepSeek-V2's
    /// first `first_k_dense_replace` and those off `moe_layer_freq`), ascending.
    pub dense_layers: Vec<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// With MLA, as many as query heads: the cache holds each head's decompressed key
    /// and value.
    pub num_key_value_heads: usize,
    /// Query/key head width (with MLA `qk_nope_head_dim + qk_rope_head_dim`; values are
    /// `v_head_dim` wide).
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Experts per MoE layer (0 for dense models).
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Rotary pairs `(2i, 2i+1)` instead of `(i, i + d/2)` (llama.cpp's Llama files).
    pub rope_interleaved: bool,
    /// Renormalise the chosen experts' gate weights to sum to one.
    pub norm_topk_prob: bool,
    /// Factor on the chosen experts' gate weights (DeepSeek-V2's `routed_scaling_factor`:
    /// transformers and candle apply it to the weights, and only when they are not
    /// renormalised, so it is 1 whenever `norm_topk_prob`); 1 for the other archs.
    pub routed_scaling_factor: f32,
    /// Multi-head latent attention (DeepSeek-V2); None for grouped-query attention.
    pub mla: Option<MlaConfig>,
    /// YaRN rotary scaling (DeepSeek-V2 only).
    pub rope_yarn: Option<Yarn>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Json { source, .. } => Error::Json {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| Error::Json {
            path: "config.json".into(),
            source,
        })?;
        let name = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.first().cloned())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let arch = if name.contains("mixtral") {
            Arch::Mixtral
        } else if name.contains("qwen2") && name.contains("moe") {
            Arch::Qwen2Moe
        } else if name.contains("qwen2") && !name.contains("moe") {
            Arch::Qwen2
        } else if name.contains("qwen3") && !name.contains("moe") {
            Arch::Qwen3
        } else if name.contains("llama") || name.contains("mistral") {
            Arch::Llama
        } else if name.contains("deepseek") && name.replace('_', "").contains("v2") {
            Arch::DeepseekV2
        } else {
            return Err(Error::Unsupported(format!(
                "model_type {name:?}: supported are mixtral, llama, mistral, qwen2, qwen2_moe, \
                 qwen3, deepseek_v2 (and GGUF files of these but deepseek_v2, and of qwen3moe)"
            )));
        };
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(Error::Unsupported(format!(
                "hidden_act {act:?} (only silu)"
            )));
        }
        let rope_scaling = raw.rope_scaling.as_ref().filter(|v| !v.is_null());
        let rope_yarn = match (arch, rope_scaling) {
            (_, None) => None,
            (Arch::DeepseekV2, Some(v)) => Some(Yarn::parse(v)?),
            (_, Some(_)) => return Err(Error::Unsupported("rope_scaling is not supported".into())),
        };
        if arch == Arch::DeepseekV2 {
            return deepseek_v2(raw, rope_yarn);
        }
        if raw.num_attention_heads == 0
            || (raw.head_dim.is_none() && !raw.hidden_size.is_multiple_of(raw.num_attention_heads))
        {
            return Err(Error::Unsupported(
                "hidden_size must be a multiple of num_attention_heads".into(),
            ));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(Error::Unsupported(
                "num_attention_heads must be a multiple of num_key_value_heads".into(),
            ));
        }
        // Hugging Face's defaults where a field may be absent.
        let (num_experts, num_experts_per_tok) = match arch {
            Arch::Mixtral => (
                raw.num_local_experts.unwrap_or(8),
                raw.num_experts_per_tok.unwrap_or(2),
            ),
            Arch::Qwen2Moe => (
                raw.num_experts.unwrap_or(60),
                raw.num_experts_per_tok.unwrap_or(4),
            ),
            _ => (0, 0),
        };
        if num_experts > 0 && (num_experts_per_tok == 0 || num_experts_per_tok > num_experts) {
            return Err(Error::Unsupported(format!(
                "num_experts_per_tok {num_experts_per_tok} must be in 1..={num_experts}"
            )));
        }
        let (moe_intermediate_size, shared_expert_intermediate_size, dense_layers) = match arch {
            Arch::Qwen2Moe => {
                let need = |v: Option<usize>, field: &str| {
                    v.ok_or_else(|| Error::Unsupported(format!("qwen2_moe config without {field}")))
                };
                // As transformers' Qwen2MoeDecoderLayer: a layer has experts unless listed
                // in mlp_only_layers or off the sparse step.
                let step = raw.decoder_sparse_step.unwrap_or(1).max(1);
                let dense = (0..raw.num_hidden_layers)
                    .filter(|l| raw.mlp_only_layers.contains(l) || !(l + 1).is_multiple_of(step))
                    .collect();
                (
                    need(raw.moe_intermediate_size, "moe_intermediate_size")?,
                    need(
                        raw.shared_expert_intermediate_size,
                        "shared_expert_intermediate_size",
                    )?,
                    dense,
                )
            }
            _ => (raw.intermediate_size, 0, vec![]),
        };
        let eos_token_ids = eos_ids(raw.eos_token_id);
        Ok(Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size,
            shared_expert_intermediate_size,
            dense_layers,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads),
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            tie_word_embeddings: raw.tie_word_embeddings,
            num_experts,
            num_experts_per_tok,
            rope_interleaved: false,
            // Qwen1.5-MoE keeps the softmax weights of its top-k (transformers' default).
            norm_topk_prob: arch != Arch::Qwen2Moe || raw.norm_topk_prob.unwrap_or(false),
            routed_scaling_factor: 1.0,
            mla: None,
            rope_yarn,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        })
    }

    /// Width of the rotated part of each query/key head.
    pub fn rope_dim(&self) -> usize {
        self.mla
            .as_ref()
            .map_or(self.head_dim, |m| m.qk_rope_head_dim)
    }

    pub fn is_moe(&self) -> bool {
        self.num_experts > 0
    }

    /// Whether decoder layer `layer` routes to experts (else it has a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.is_moe() && !self.dense_layers.contains(&layer)
    }
}

fn eos_ids(eos: Option<OneOrMany>) -> Vec<u32> {
    match eos {
        None => vec![],
        Some(OneOrMany::One(t)) => vec![t],
        Some(OneOrMany::Many(v)) => v,
    }
}

/// DeepSeek-V2's `config.json`, as transformers' `DeepseekV2Config` and candle's
/// `deepseek2` read it; what they would compute differently or not at all is refused.
fn deepseek_v2(raw: RawConfig, rope_yarn: Option<Yarn>) -> Result<ModelConfig> {
    let need = |v: Option<usize>, field: &str| {
        v.ok_or_else(|| Error::Unsupported(format!("deepseek_v2 config without {field}")))
    };
    let unsupported = |what: String| Err(Error::Unsupported(format!("deepseek_v2: {what}")));
    if raw.attention_bias {
        return unsupported("attention_bias true".into());
    }
    if let Some(f) = raw.scoring_func.as_deref()
        && f != "softmax"
    {
        return unsupported(format!("scoring_func {f:?} (only softmax)"));
    }
    let top_k = raw.num_experts_per_tok.unwrap_or(0);
    let (n_group, topk_group) = (raw.n_group.unwrap_or(1), raw.topk_group.unwrap_or(1));
    match raw.topk_method.as_deref().unwrap_or("greedy") {
        "greedy" => {}
        // With every group kept, the group limit selects as greedy does.
        "group_limited_greedy" if topk_group >= n_group => {}
        "group_limited_greedy" => {
            return unsupported(format!(
                "topk_method group_limited_greedy with topk_group {topk_group} of n_group \
                 {n_group} (only greedy, as DeepSeek-V2-Lite)"
            ));
        }
        m => return unsupported(format!("topk_method {m:?} (only greedy)")),
    }
    let mla = MlaConfig {
        q_lora_rank: raw.q_lora_rank,
        kv_lora_rank: need(raw.kv_lora_rank, "kv_lora_rank")?,
        qk_nope_head_dim: need(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
        qk_rope_head_dim: need(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
        v_head_dim: need(raw.v_head_dim, "v_head_dim")?,
    };
    if raw.num_attention_heads == 0 || !mla.qk_rope_head_dim.is_multiple_of(2) {
        return unsupported("num_attention_heads 0 or an odd qk_rope_head_dim".into());
    }
    let num_experts = raw.n_routed_experts.unwrap_or(0);
    if num_experts > 0 && (top_k == 0 || top_k > num_experts) {
        return Err(Error::Unsupported(format!(
            "num_experts_per_tok {top_k} must be in 1..={num_experts}"
        )));
    }
    let moe_intermediate_size = match num_experts {
        0 => raw.intermediate_size,
        _ => need(raw.moe_intermediate_size, "moe_intermediate_size")?,
    };
    // As transformers' DeepseekV2DecoderLayer: experts from layer first_k_dense_replace
    // on, every moe_layer_freq-th layer.
    let (first_dense, freq) = (
        raw.first_k_dense_replace.unwrap_or(0),
        raw.moe_layer_freq.unwrap_or(1),
    );
    if freq == 0 {
        return unsupported("moe_layer_freq 0".into());
    }
    let dense_layers = (0..raw.num_hidden_layers)
        .filter(|l| num_experts > 0 && (*l < first_dense || !l.is_multiple_of(freq)))
        .collect();
    // The top-k weights: renormalised (top-k > 1 and norm_topk_prob), else multiplied by
    // routed_scaling_factor, never both (transformers' and candle's MoEGate).
    let norm_topk_prob = top_k > 1 && raw.norm_topk_prob.unwrap_or(false);
    let routed_scaling_factor = if norm_topk_prob {
        1.0
    } else {
        raw.routed_scaling_factor.unwrap_or(1.0) as f32
    };
    Ok(ModelConfig {
        arch: Arch::DeepseekV2,
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        moe_intermediate_size,
        shared_expert_intermediate_size: match num_experts {
            0 => 0,
            _ => moe_intermediate_size * raw.n_shared_experts.unwrap_or(0),
        },
        dense_layers,
        num_hidden_layers: raw.num_hidden_layers,
        num_attention_heads: raw.num_attention_heads,
        num_key_value_heads: raw.num_attention_heads,
        head_dim: mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        max_position_embeddings: raw.max_position_embeddings,
        rms_norm_eps: raw.rms_norm_eps,
        rope_theta: raw.rope_theta,
        tie_word_embeddings: raw.tie_word_embeddings,
        num_experts,
        num_experts_per_tok: if num_experts > 0 { top_k } else { 0 },
        // transformers permutes each rotary part into halves before rotating; candle
        // rotates the pairs in place: the same scores either way.
        rope_interleaved: true,
        norm_topk_prob,
        routed_scaling_factor,
        mla: Some(mla),
        rope_yarn,
        bos_token_id: raw.bos_token_id,
        eos_token_ids: eos_ids(raw.eos_token_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixtral_and_rejects_unknown() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type":"mixtral","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "num_local_experts":4,"num_experts_per_tok":2,"eos_token_id":2}"#,
        )
        .unwrap();
        assert_eq!(cfg.arch, Arch::Mixtral);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.eos_token_ids, vec![2]);
        let err = ModelConfig::from_json(
            r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }

    #[test]
    fn parses_qwen2_moe_with_its_shared_expert_and_dense_layers() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures":["Qwen2MoeForCausalLM"],"model_type":"qwen2_moe",
            "vocab_size":10,"hidden_size":8,"intermediate_size":32,"num_hidden_layers":6,
            "num_attention_heads":2,"num_key_value_heads":1,"num_experts":8,
            "num_experts_per_tok":4,"moe_intermediate_size":12,
            "shared_expert_intermediate_size":24,"norm_topk_prob":false,
            "decoder_sparse_step":2,"mlp_only_layers":[3]}"#,
        )
        .unwrap();
        assert_eq!(cfg.arch, Arch::Qwen2Moe);
        assert!(cfg.arch.attention_bias());
        assert_eq!((cfg.num_experts, cfg.num_experts_per_tok), (8, 4));
        assert_eq!(
            (
                cfg.intermediate_size,
                cfg.moe_intermediate_size,
                cfg.shared_expert_intermediate_size
            ),
            (32, 12, 24)
        );
        assert!(!cfg.norm_topk_prob);
        // Layers 1, 3, 5 are on the step; 3 is listed as dense.
        assert_eq!(cfg.dense_layers, vec![0, 2, 3, 4]);
        assert!(cfg.is_moe_layer(1) && cfg.is_moe_layer(5) && !cfg.is_moe_layer(3));
        let no_shared = r#"{"model_type":"qwen2_moe","vocab_size":10,"hidden_size":8,
            "intermediate_size":32,"num_hidden_layers":1,"num_attention_heads":2,
            "moe_intermediate_size":12}"#;
        let err = ModelConfig::from_json(no_shared).unwrap_err();
        assert!(
            err.to_string().contains("shared_expert_intermediate_size"),
            "{err}"
        );
    }
    /// DeepSeek-V2-Lite's config.json (as published, less auto_map and training fields).
    const V2_LITE: &str = r#"{"architectures":["DeepseekV2ForCausalLM"],
        "attention_bias":false,"bos_token_id":100000,"eos_token_id":100001,
        "first_k_dense_replace":1,"hidden_act":"silu","hidden_size":2048,
        "intermediate_size":10944,"kv_lora_rank":512,"max_position_embeddings":163840,
        "model_type":"deepseek_v2","moe_intermediate_size":1408,"moe_layer_freq":1,
        "n_group":1,"n_routed_experts":64,"n_shared_experts":2,"norm_topk_prob":false,
        "num_attention_heads":16,"num_experts_per_tok":6,"num_hidden_layers":27,
        "num_key_value_heads":16,"q_lora_rank":null,"qk_nope_head_dim":128,
        "qk_rope_head_dim":64,"rms_norm_eps":1e-06,
        "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":0.707,
            "mscale_all_dim":0.707,"original_max_position_embeddings":4096,"type":"yarn"},
        "rope_theta":10000,"routed_scaling_factor":1.0,"scoring_func":"softmax",
        "tie_word_embeddings":false,"topk_group":1,"topk_method":"greedy",
        "v_head_dim":128,"vocab_size":102400}"#;

    fn v2_lite_with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<ModelConfig> {
        let mut v: serde_json::Value = serde_json::from_str(V2_LITE).unwrap();
        edit(&mut v);
        ModelConfig::from_json(&v.to_string())
    }

    #[test]
    fn parses_deepseek_v2_lite() {
        let cfg = ModelConfig::from_json(V2_LITE).unwrap();
        assert_eq!(cfg.arch, Arch::DeepseekV2);
        assert_eq!(
            cfg.mla,
            Some(MlaConfig {
                q_lora_rank: None,
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
            })
        );
        // Per-head keys are 192 wide, one per query head; rotation over 64 of them.
        assert_eq!(
            (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_dim()),
            (192, 16, 64)
        );
        assert!(cfg.rope_interleaved);
        assert_eq!((cfg.num_experts, cfg.num_experts_per_tok), (64, 6));
        assert_eq!(
            (
                cfg.intermediate_size,
                cfg.moe_intermediate_size,
                cfg.shared_expert_intermediate_size
            ),
            (10944, 1408, 2 * 1408)
        );
        assert_eq!(cfg.dense_layers, vec![0]);
        assert!(!cfg.norm_topk_prob);
        assert_eq!(cfg.routed_scaling_factor, 1.0);
        let y = cfg.rope_yarn.as_ref().unwrap();
        assert_eq!(
            (
                y.factor,
                y.original_max_position_embeddings,
                y.mscale_all_dim
            ),
            (40.0, 4096, 0.707)
        );
        assert_eq!(cfg.arch.shared_expert(), ("shared_experts", None));
    }

    #[test]
    fn deepseek_v2_scales_top_k_weights_only_when_not_renormalising() {
        let scaled = v2_lite_with(|v| v["routed_scaling_factor"] = 16.0.into()).unwrap();
        assert_eq!(
            (scaled.norm_topk_prob, scaled.routed_scaling_factor),
            (false, 16.0)
        );
        let renorm = v2_lite_with(|v| {
            v["routed_scaling_factor"] = 16.0.into();
            v["norm_topk_prob"] = true.into();
        })
        .unwrap();
        assert_eq!(
            (renorm.norm_topk_prob, renorm.routed_scaling_factor),
            (true, 1.0)
        );
        // One expert per token: candle and transformers scale instead of renormalising.
        let single = v2_lite_with(|v| {
            v["routed_scaling_factor"] = 16.0.into();
            v["norm_topk_prob"] = true.into();
            v["num_experts_per_tok"] = 1.into();
        })
        .unwrap();
        assert_eq!(
            (single.norm_topk_prob, single.routed_scaling_factor),
            (false, 16.0)
        );
        let sparse = v2_lite_with(|v| {
            v["first_k_dense_replace"] = 2.into();
            v["moe_layer_freq"] = 3.into();
            v["num_hidden_layers"] = 7.into();
        })
        .unwrap();
        assert_eq!(sparse.dense_layers, vec![0, 1, 2, 4, 5]);
    }

    #[test]
    fn deepseek_v2_options_it_would_compute_differently_are_refused() {
        type Edit = fn(&mut serde_json::Value);
        let refused: [(&str, Edit); 7] = [
            ("noaux_tc", |v| v["topk_method"] = "noaux_tc".into()),
            ("group_limited_greedy", |v| {
                v["topk_method"] = "group_limited_greedy".into();
                v["n_group"] = 8.into();
                v["topk_group"] = 3.into();
            }),
            ("sigmoid", |v| v["scoring_func"] = "sigmoid".into()),
            ("attention_bias", |v| v["attention_bias"] = true.into()),
            ("linear", |v| {
                v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})
            }),
            ("kv_lora_rank", |v| {
                v.as_object_mut().unwrap().remove("kv_lora_rank");
            }),
            ("deepseek_v3", |v| v["model_type"] = "deepseek_v3".into()),
        ];
        for (what, edit) in refused {
            let err = v2_lite_with(edit).unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{what}: {err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        // Group-limited with every group kept selects as greedy does.
        let all_groups = v2_lite_with(|v| {
            v["topk_method"] = "group_limited_greedy".into();
            v["n_group"] = 2.into();
            v["topk_group"] = 2.into();
        });
        assert!(all_groups.is_ok());
        // The other archs still refuse any rope scaling.
        let err = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,
            "rope_scaling":{"type":"yarn","factor":4.0,"original_max_position_embeddings":8}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rope_scaling"), "{err}");
    }
}
