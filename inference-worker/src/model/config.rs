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
}

impl Arch {
    pub fn attention_bias(self) -> bool {
        self == Arch::Qwen2
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
    pub intermediate_size: usize,
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
        } else if name.contains("qwen2") && !name.contains("moe") {
            Arch::Qwen2
        } else if name.contains("qwen3") && !name.contains("moe") {
            Arch::Qwen3
        } else if name.contains("llama") || name.contains("mistral") {
            Arch::Llama
        } else {
            return Err(Error::Unsupported(format!(
                "model_type {name:?}: supported are mixtral, llama, mistral, qwen2, qwen3 \
                 (and GGUF files of these and of qwen3moe)"
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
        let (num_experts, num_experts_per_tok) = match arch {
            Arch::Mixtral => {
                let n = raw.num_local_experts.unwrap_or(8);
                let k = raw.num_experts_per_tok.unwrap_or(2);
                if k == 0 || k > n {
                    return Err(Error::Unsupported(format!(
                        "num_experts_per_tok {k} must be in 1..={n}"
                    )));
                }
                (n, k)
            }
            _ => (0, 0),
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
            norm_topk_prob: true,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        })
    }

    pub fn is_moe(&self) -> bool {
        self.num_experts > 0
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
}
