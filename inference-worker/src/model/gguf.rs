//! GGUF checkpoints (llama.cpp's format): the model configuration and the tokenizer
//! from the file's metadata, weights read as quantized tensors and kept quantized.
//!
//! The model code names weights as Hugging Face checkpoints do; [`gguf_name`] maps
//! those names to llama.cpp's, so one model implementation loads both formats.

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where a Hugging Face weight name lives in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufRef {
    /// A tensor of its own.
    Whole(String),
    /// Expert `expert` of a layer's stacked `(experts, rows, cols)` tensor; older files
    /// store each expert separately (`legacy`).
    Expert {
        stacked: String,
        expert: usize,
        legacy: String,
    },
}

/// The GGUF name of the weight the model code calls `hf` (e.g.
/// `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`).
pub fn gguf_name(hf: &str) -> Option<GgufRef> {
    let whole = |s: String| Some(GgufRef::Whole(s));
    match hf {
        "model.embed_tokens.weight" => return whole("token_embd.weight".into()),
        "model.norm.weight" => return whole("output_norm.weight".into()),
        "lm_head.weight" => return whole("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |s: &str| format!("blk.{layer}.{s}");
    if let Some(rest) = rest
        .strip_prefix("block_sparse_moe.experts.")
        .or_else(|| rest.strip_prefix("mlp.experts."))
    {
        let (expert, rest) = rest.split_once('.')?;
        let expert: usize = expert.parse().ok()?;
        let part = match rest {
            "w1.weight" | "gate_proj.weight" => "gate",
            "w3.weight" | "up_proj.weight" => "up",
            "w2.weight" | "down_proj.weight" => "down",
            _ => return None,
        };
        return Some(GgufRef::Expert {
            stacked: blk(&format!("ffn_{part}_exps.weight")),
            expert,
            legacy: blk(&format!("ffn_{part}.{expert}.weight")),
        });
    }
    let (module, suffix) = rest.rsplit_once('.')?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "block_sparse_moe.gate" | "mlp.gate" => "ffn_gate_inp",
        // Qwen2-MoE's shared expert and its gate.
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        _ => return None,
    };
    whole(blk(&format!("{name}.{suffix}")))
}

/// An open GGUF file: its metadata and tensor index; tensors are read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: Mutex<std::fs::File>,
    /// The stacked expert tensors of the layer being loaded (experts are read one at a
    /// time; the stack is read once per layer, then dropped).
    stacked: Mutex<HashMap<String, Arc<QTensor>>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

/// The one `*.gguf` file a model directory holds, if any.
pub fn find_in_dir(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found = crate::model::weights::files_with_extension(dir, "gguf")?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("{n} .gguf files; point model.uri at the one to serve"),
        }),
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            stacked: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bad(&self, message: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            message,
        }
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.metadata(key)
            .ok_or_else(|| self.bad(format!("metadata {key} missing")))
    }

    fn u32_of(&self, key: &str) -> Result<Option<usize>> {
        self.metadata(key)
            .map(|v| {
                v.to_u32()
                    .map(|n| n as usize)
                    .or_else(|_| v.to_u64().map(|n| n as usize))
                    .map_err(|e| self.bad(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    fn f32_of(&self, key: &str) -> Result<Option<f32>> {
        self.metadata(key)
            .map(|v| {
                v.to_f32()
                    .map_err(|e| self.bad(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    pub fn string_of(&self, key: &str) -> Result<Option<&str>> {
        self.metadata(key)
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|e| self.bad(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    /// The elements of array-valued metadata `key`, each through `convert`.
    fn array_of<'a, T>(
        &'a self,
        v: &'a Value,
        key: &str,
        convert: impl Fn(&'a Value) -> candle_core::Result<T>,
    ) -> Result<Vec<T>> {
        let bad = |e: candle_core::Error| self.bad(format!("metadata {key}: {e}"));
        v.to_vec()
            .map_err(bad)?
            .iter()
            .map(|i| convert(i).map_err(bad))
            .collect()
    }

    /// Strings of an array-valued metadata key (e.g. the vocabulary).
    pub fn strings_of(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.required(key)?;
        self.array_of(v, key, |i| i.to_string().map(String::as_str))
    }

    /// Integers of an array-valued metadata key (e.g. token types); none when absent.
    pub fn ints_of(&self, key: &str) -> Result<Vec<i64>> {
        let Some(v) = self.metadata(key) else {
            return Ok(vec![]);
        };
        self.array_of(v, key, |i| {
            i.to_i32()
                .map(i64::from)
                .or_else(|_| i.to_u32().map(i64::from))
        })
    }

    /// The model configuration from the `{arch}.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name = self
            .string_of("general.architecture")?
            .ok_or_else(|| self.bad("metadata general.architecture missing".into()))?
            .to_string();
        let key = |k: &str| format!("{arch_name}.{k}");
        let need = |k: &str| -> Result<usize> {
            self.u32_of(&key(k))?
                .ok_or_else(|| self.bad(format!("metadata {} missing", key(k))))
        };
        let num_experts = self.u32_of(&key("expert_count"))?.unwrap_or(0);
        let arch = match (arch_name.as_str(), num_experts > 1) {
            ("llama", true) => Arch::Mixtral,
            ("llama", false) => Arch::Llama,
            ("qwen2", false) => Arch::Qwen2,
            ("qwen3", false) => Arch::Qwen3,
            ("qwen3moe", true) => Arch::Qwen3Moe,
            ("qwen2moe", true) => Arch::Qwen2Moe,
            (other, moe) => {
                return Err(Error::Unsupported(format!(
                    "GGUF architecture {other:?}{}: supported are llama (Llama, Mistral, \
                     Mixtral), qwen2, qwen2moe, qwen3 and qwen3moe",
                    if moe { " with experts" } else { "" }
                )));
            }
        };
        if let Some(kind) = self.string_of(&key("rope.scaling.type"))?
            && kind != "none"
        {
            return Err(Error::Unsupported(format!(
                "GGUF rope scaling {kind:?} is not supported"
            )));
        }
        let hidden_size = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        if heads == 0 {
            return Err(self.bad("attention.head_count is 0".into()));
        }
        let kv_heads = self
            .u32_of(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::Unsupported(
                "attention.head_count must be a multiple of attention.head_count_kv".into(),
            ));
        }
        let head_dim = match self.u32_of(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(heads) => hidden_size / heads,
            None => {
                return Err(Error::Unsupported(
                    "embedding_length must be a multiple of attention.head_count".into(),
                ));
            }
        };
        let vocab_size = match self.u32_of(&key("vocab_size"))? {
            Some(n) => n,
            None => self.strings_of("tokenizer.ggml.tokens")?.len(),
        };
        let num_experts_per_tok = if num_experts > 1 {
            let k = need("expert_used_count")?;
            if k == 0 || k > num_experts {
                return Err(Error::Unsupported(format!(
                    "expert_used_count {k} must be in 1..={num_experts}"
                )));
            }
            k
        } else {
            0
        };
        let (intermediate_size, moe_intermediate_size, shared_expert_intermediate_size) = match arch
        {
            Arch::Qwen3Moe => {
                let e = need("expert_feed_forward_length")?;
                (e, e, 0)
            }
            Arch::Qwen2Moe => {
                // llama.cpp's fallbacks when the expert widths are absent or 0.
                let ff = need("feed_forward_length")?;
                let nonzero = |k: &str| -> Result<Option<usize>> {
                    Ok(self.u32_of(&key(k))?.filter(|&n| n > 0))
                };
                (
                    ff,
                    nonzero("expert_feed_forward_length")?.unwrap_or(ff / num_experts_per_tok),
                    nonzero("expert_shared_feed_forward_length")?.unwrap_or(ff),
                )
            }
            _ => {
                let ff = need("feed_forward_length")?;
                (ff, ff, 0)
            }
        };
        let eos = self.u32_of("tokenizer.ggml.eos_token_id")?;
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            moe_intermediate_size,
            shared_expert_intermediate_size,
            dense_layers: vec![],
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.u32_of(&key("context_length"))?.unwrap_or(4096),
            rms_norm_eps: f64::from(
                self.f32_of(&key("attention.layer_norm_rms_epsilon"))?
                    .unwrap_or(1e-6),
            ),
            rope_theta: f64::from(self.f32_of(&key("rope.freq_base"))?.unwrap_or(10_000.0)),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            num_experts: if num_experts > 1 { num_experts } else { 0 },
            num_experts_per_tok,
            // llama.cpp's converter interleaves the query/key rows of Llama-family models
            // (Meta's rotary layout); Qwen files keep Hugging Face's halves.
            rope_interleaved: arch_name == "llama",
            // llama.cpp's qwen2moe keeps the top-k softmax weights, as Qwen1.5-MoE does.
            norm_topk_prob: arch != Arch::Qwen2Moe,
            routed_scaling_factor: 1.0,
            mla: None,
            rope_yarn: None,
            bos_token_id: self
                .u32_of("tokenizer.ggml.bos_token_id")?
                .map(|n| n as u32),
            eos_token_ids: eos.map(|n| vec![n as u32]).unwrap_or_default(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name` as stored (quantized or not).
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        self.content
            .tensor(&mut *f, name, &Device::Cpu)
            .map_err(|e| self.bad(format!("tensor {name}: {e}")))
    }

    /// Reads what `r` names: a whole tensor, or one expert's matrix.
    pub fn read(&self, r: &GgufRef) -> Result<QTensor> {
        match r {
            GgufRef::Whole(name) => self.tensor(name),
            GgufRef::Expert {
                stacked,
                expert,
                legacy,
            } => {
                if !self.contains(stacked) && self.contains(legacy) {
                    return self.tensor(legacy);
                }
                let stack = self.stacked(stacked)?;
                expert_slice(&stack, *expert).map_err(|e| self.bad(format!("{stacked}: {e}")))
            }
        }
    }

    fn stacked(&self, name: &str) -> Result<Arc<QTensor>> {
        let mut cache = self.stacked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(name) {
            return Ok(t.clone());
        }
        // Keep only the current layer's stacks: a model is loaded layer by layer.
        let layer = name.split('.').take(2).collect::<Vec<_>>().join(".");
        cache.retain(|k, _| k.starts_with(&format!("{layer}.")));
        let t = Arc::new(self.tensor(name)?);
        cache.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// Drops the cached expert stacks (after loading).
    pub fn release(&self) {
        self.stacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Expert `e` of a stacked `(experts, rows, cols)` quantized tensor, as its own
/// `(rows, cols)` tensor (each expert's blocks are contiguous).
pub fn expert_slice(stack: &QTensor, e: usize) -> candle_core::Result<QTensor> {
    let (n, rows, cols) = stack.shape().dims3()?;
    if e >= n {
        candle_core::bail!("expert {e} out of {n}");
    }
    let dtype: GgmlDType = stack.dtype();
    let data = stack.data()?;
    let per = data.len() / n;
    let bytes = &data[e * per..(e + 1) * per];
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        let whole = |s: &str| Some(GgufRef::Whole(s.into()));
        assert_eq!(
            gguf_name("model.embed_tokens.weight"),
            whole("token_embd.weight")
        );
        assert_eq!(gguf_name("lm_head.weight"), whole("output.weight"));
        assert_eq!(gguf_name("model.norm.weight"), whole("output_norm.weight"));
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.bias"),
            whole("blk.12.attn_q.bias")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_norm.weight"),
            whole("blk.0.attn_k_norm.weight")
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight"),
            whole("blk.3.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("model.layers.1.block_sparse_moe.gate.weight"),
            whole("blk.1.ffn_gate_inp.weight")
        );
        assert_eq!(
            gguf_name("model.layers.1.block_sparse_moe.experts.7.w2.weight"),
            Some(GgufRef::Expert {
                stacked: "blk.1.ffn_down_exps.weight".into(),
                expert: 7,
                legacy: "blk.1.ffn_down.7.weight".into(),
            })
        );
        assert_eq!(
            gguf_name("model.layers.2.mlp.experts.5.up_proj.weight"),
            Some(GgufRef::Expert {
                stacked: "blk.2.ffn_up_exps.weight".into(),
                expert: 5,
                legacy: "blk.2.ffn_up.5.weight".into(),
            })
        );
        assert_eq!(
            gguf_name("model.layers.2.mlp.gate.weight"),
            whole("blk.2.ffn_gate_inp.weight")
        );
        assert_eq!(
            gguf_name("model.layers.2.mlp.shared_expert.down_proj.weight"),
            whole("blk.2.ffn_down_shexp.weight")
        );
        assert_eq!(
            gguf_name("model.layers.2.mlp.shared_expert_gate.weight"),
            whole("blk.2.ffn_gate_inp_shexp.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.unknown.weight"), None);
    }
}
