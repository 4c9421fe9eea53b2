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
}

impl Arch {
    pub fn attention_bias(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen2Moe)
    }

    /// The checkpoint module of a MoE layer's gate and experts. Qwen2-MoE keeps Hugging
    /// Face's `mlp`; Qwen3-MoE (GGUF only, so its names are ours) shares Mixtral's.
    pub fn moe_block(self) -> &'static str {
        match self {
            Arch::Qwen2Moe => "mlp",
            _ => "block_sparse_moe",
        }
    }

    /// An expert's gate, up and down projections, below `{moe_block}.experts.{e}`.
    pub fn expert_projections(self) -> [&'static str; 3] {
        match self {
            Arch::Qwen2Moe => ["gate_proj", "up_proj", "down_proj"],
            _ => ["w1", "w3", "w2"],
        }
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
    /// (Qwen2-MoE); 0 when there is none.
    pub shared_expert_intermediate_size: usize,
    /// Layers of a MoE model that have a dense MLP instead of experts (Qwen2-MoE's
    /// `mlp_only_layers` and the layers off its `decoder_sparse_step`), ascending.
    pub dense_layers: Vec<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
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
        } else {
            return Err(Error::Unsupported(format!(
                "model_type {name:?}: supported are mixtral, llama, mistral, qwen2, qwen2_moe, \
                 qwen3 (and GGUF files of these and of qwen3moe)"
            )));
        };
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(Error::Unsupported(format!(
                "hidden_act {act:?} (only silu)"
            )));
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::Unsupported("rope_scaling is not supported".into()));
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
        let eos_token_ids = match raw.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(t)) => vec![t],
            Some(OneOrMany::Many(v)) => v,
        };
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
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        })
    }

    pub fn is_moe(&self) -> bool {
        self.num_experts > 0
    }

    /// Whether decoder layer `layer` routes to experts (else it has a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.is_moe() && !self.dense_layers.contains(&layer)
    }
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
}
