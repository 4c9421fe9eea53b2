//! The decoder model (Mixtral-family, Qwen2 and Qwen3 MoE; Llama/Mistral/Qwen2/Qwen3
//! dense) on candle, from safetensors or GGUF weights.
//!
//! Weights are shared; the KV cache lives outside the model in a [`KvCache`] per
//! sequence so that one model can serve many sequences (continuous batching).

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::GgufFile;
use crate::model::layers::{Attention, Chunk, Mlp, Proj, Rotary};
use crate::model::moe::{ExpertCounts, ExpertPlacement, Moe, is_routed_expert_tensor};
use crate::model::source::Source;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use std::path::Path;
use std::sync::Arc;

/// Per-sequence attention cache: one (key, value) pair per layer.
#[derive(Debug)]
pub struct KvCache {
    /// Each layer's keys and values of the `len` positions held: views of `room`'s start
    /// where this cache has room, shared tensors otherwise (a reused prefix, a clone).
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    /// Buffers with room to grow (see [`crate::model::layers::append_kv`]): new positions
    /// are written in place rather than the whole cache copied every step. Only this cache
    /// writes into them, at positions past every view handed out, so the views others hold
    /// never change.
    pub(crate) room: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) len: usize,
    /// Most positions the model takes: room never grows past it.
    pub(crate) limit: usize,
}

impl Clone for KvCache {
    /// The clone shares the positions held but not the room: it copies into a buffer of its
    /// own when it grows, so two sequences never write into one buffer.
    fn clone(&self) -> Self {
        Self {
            layers: self.layers.clone(),
            room: vec![None; self.room.len()],
            len: self.len,
            limit: self.limit,
        }
    }
}

impl KvCache {
    /// A cache holding `layers` (keys and values of `len` positions), with no room yet.
    #[cfg(test)]
    pub(crate) fn holding(layers: Vec<Option<(Tensor, Tensor)>>, len: usize) -> Self {
        Self {
            room: vec![None; layers.len()],
            layers,
            len,
            limit: usize::MAX,
        }
    }

    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

struct Layer {
    attn: Attention,
    ffn: Ffn,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// A loaded decoder model. Immutable after load: all per-sequence state is in [`KvCache`].
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    counts: Arc<ExpertCounts>,
    device: Device,
    dtype: DType,
}

impl Model {
    /// Loads every `*.safetensors` file in `dir` with the given config.
    pub fn load_dir(dir: &Path, cfg: ModelConfig, dtype: DType) -> Result<Self> {
        Self::load_dir_with(dir, cfg, dtype, ExpertPlacement::Local)
    }

    /// As [`Model::load_dir`], with the expert FFNs where `placement` says. With
    /// remote experts only the tensors of the routed experts are left unread (a shared
    /// expert is loaded: it runs here).
    pub fn load_dir_with(
        dir: &Path,
        cfg: ModelConfig,
        dtype: DType,
        placement: ExpertPlacement,
    ) -> Result<Self> {
        Self::load_dir_on(dir, cfg, dtype, placement, &Device::Cpu)
    }

    /// As [`Model::load_dir_with`], weights, cache and activations on `device`.
    pub fn load_dir_on(
        dir: &Path,
        cfg: ModelConfig,
        dtype: DType,
        placement: ExpertPlacement,
        device: &Device,
    ) -> Result<Self> {
        if let ExpertPlacement::Remote(_) = placement {
            let index = crate::model::weights::Checkpoint::open(dir)?;
            let tensors = index.load_where(|name| !is_routed_expert_tensor(cfg.arch, name))?;
            let vb = VarBuilder::from_tensors(tensors, dtype, device);
            return Self::load_with(cfg, Source::Safetensors(vb), placement);
        }
        let files = crate::model::weights::files_with_extension(dir, "safetensors")?;
        if files.is_empty() {
            return Err(Error::Unsupported(format!(
                "no *.safetensors files in {}",
                dir.display()
            )));
        }
        let mut tensors = std::collections::HashMap::new();
        for f in &files {
            tensors.extend(candle_core::safetensors::load(f, device)?);
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::load(cfg, vb)
    }

    pub fn load(cfg: ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_with(cfg, Source::Safetensors(vb), ExpertPlacement::Local)
    }

    /// Loads a GGUF file, weights kept quantized (activations in f32).
    pub fn load_gguf(file: Arc<GgufFile>, placement: ExpertPlacement) -> Result<Self> {
        Self::load_gguf_on(file, placement, &Device::Cpu)
    }

    /// As [`Model::load_gguf`], weights, cache and activations on `device`.
    pub fn load_gguf_on(
        file: Arc<GgufFile>,
        placement: ExpertPlacement,
        device: &Device,
    ) -> Result<Self> {
        let cfg = file.config()?;
        let model = Self::load_with(
            cfg,
            Source::gguf_on(file.clone(), device.clone()),
            placement,
        );
        file.release();
        model
    }

    pub fn load_with(cfg: ModelConfig, src: Source, placement: ExpertPlacement) -> Result<Self> {
        let device = src.device();
        let dtype = src.dtype();
        let m = src.pp("model");
        let embed = m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let src = m.pp("layers").pp(l);
            let ffn = if cfg.is_moe_layer(l) {
                Ffn::Moe(Moe::load(&cfg, src.pp(cfg.arch.moe_block()), &placement)?)
            } else {
                Ffn::Dense(Mlp::load(
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    ["gate_proj", "up_proj", "down_proj"],
                    src.pp("mlp"),
                )?)
            };
            layers.push(Layer {
                attn: Attention::load(&cfg, src.pp("self_attn"))?,
                ffn,
                input_norm: src
                    .pp("input_layernorm")
                    .rms_norm(cfg.hidden_size, cfg.rms_norm_eps)?,
                post_norm: src
                    .pp("post_attention_layernorm")
                    .rms_norm(cfg.hidden_size, cfg.rms_norm_eps)?,
            });
        }
        let norm = m.pp("norm").rms_norm(cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            src.tied_head(&embed)?
        } else {
            src.pp("lm_head")
                .proj(cfg.hidden_size, cfg.vocab_size, false)?
        };
        let counts = Arc::new(ExpertCounts::for_model(&cfg));
        Ok(Self {
            rotary: Rotary::new(&cfg, dtype, &device)?,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            counts,
            device,
            dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// How many of the model's local projections (attention, dense FFN, local experts,
    /// router gates, output head) are quantized, and how many dense.
    pub fn projection_kinds(&self) -> (usize, usize) {
        let mut projs: Vec<&Proj> = vec![&self.lm_head];
        for l in &self.layers {
            projs.extend(l.attn.projections());
            match &l.ffn {
                Ffn::Dense(m) => projs.extend(m.projections()),
                Ffn::Moe(m) => projs.extend(m.projections()),
            }
        }
        let quantized = projs
            .iter()
            .filter(|p| matches!(p, Proj::Quant { .. }))
            .count();
        (quantized, projs.len() - quantized)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn expert_counts(&self) -> &Arc<ExpertCounts> {
        &self.counts
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            room: vec![None; self.layers.len()],
            len: 0,
            limit: self.cfg.max_position_embeddings,
        }
    }

    /// Appends `tokens` to the sequence held in `cache` and returns the f32 logits
    /// (vocab_size) for the next token.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut out = self.forward_batch(&mut [(tokens, cache)])?;
        Ok(out.pop().expect("one sequence in, one out"))
    }

    /// Advances several sequences in one pass: `batch[i].0` is appended to the
    /// sequence in `batch[i].1`, and the i-th result is its next-token logits.
    ///
    /// The new tokens of all sequences are stacked into one `(rows, hidden)` matrix
    /// for every projection, MLP and expert (each expert runs once on the rows routed
    /// to it from the whole batch); attention runs per sequence against its own
    /// cache. A sequence's logits are bitwise the same whatever else is in the batch.
    pub fn forward_batch(&self, batch: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        self.run(batch, false)
    }

    /// [`Self::forward`], returning the logits after every one of `tokens` (row i predicts
    /// the token after `tokens[i]`): what prompt log probabilities need.
    pub fn forward_all(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        self.run(&mut [(tokens, cache)], true)
    }

    /// The forward pass; the logits of each sequence's last new token, or with `all_rows`
    /// of every new token (all sequences' rows in order).
    fn run(&self, batch: &mut [(&[u32], &mut KvCache)], all_rows: bool) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut chunks = Vec::with_capacity(batch.len());
        let mut tokens = vec![];
        for (toks, cache) in batch.iter() {
            let (seq, offset) = (toks.len(), cache.len);
            if seq == 0 {
                return Err(Error::EmptyInput);
            }
            if offset + seq > self.cfg.max_position_embeddings {
                return Err(Error::ContextExceeded {
                    tokens: offset + seq,
                    context: self.cfg.max_position_embeddings,
                });
            }
            let mask = if seq > 1 {
                let m: Vec<f32> = (0..seq)
                    .flat_map(|i| {
                        (0..offset + seq).map(move |j| {
                            if j > offset + i {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                    })
                    .collect();
                Some(Tensor::from_vec(m, (seq, offset + seq), &self.device)?)
            } else {
                None
            };
            chunks.push(Chunk {
                start: tokens.len(),
                len: seq,
                offset,
                mask,
            });
            tokens.extend_from_slice(toks);
        }
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|(_, c)| &mut **c).collect();
        let input = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut xs = self.embed.forward(&input)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &xs;
            let h = layer.input_norm.forward(&xs)?;
            let h = layer
                .attn
                .forward(&h, &self.rotary, &chunks, &mut caches, l)?;
            let xs2 = (h + residual)?;
            let h = layer.post_norm.forward(&xs2)?;
            let h = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&h)?,
                Ffn::Moe(moe) => moe.forward(&h, l, &self.counts)?,
            };
            xs = (xs2 + h)?;
        }
        for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
            cache.len += c.len;
        }
        let last: Vec<u32> = if all_rows {
            chunks
                .iter()
                .flat_map(|c| (c.start..c.start + c.len).map(|r| r as u32))
                .collect()
        } else {
            chunks
                .iter()
                .map(|c| (c.start + c.len - 1) as u32)
                .collect()
        };
        let last = xs.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Parses a dtype name from the CLI.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::Unsupported(format!(
            "dtype {other:?} (use f32, bf16 or f16)"
        ))),
    }
}
