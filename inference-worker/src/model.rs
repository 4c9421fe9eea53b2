//! Decoder models (Mixtral-family MoE and Llama/Mistral/Qwen2 dense) on candle.
//!
//! Weights are shared; the KV cache lives outside the model in a [`KvCache`] per
//! sequence so that one model can serve many sequences (continuous batching).

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tokens routed to each expert of each MoE layer since the model was loaded.
#[derive(Debug)]
pub struct ExpertCounts {
    num_experts: usize,
    counts: Vec<AtomicU64>,
}

impl ExpertCounts {
    fn new(layers: usize, num_experts: usize) -> Self {
        Self {
            num_experts,
            counts: (0..layers * num_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Tokens routed to `expert` in `layer` so far.
    pub fn get(&self, layer: usize, expert: usize) -> u64 {
        self.counts[layer * self.num_experts + expert].load(Ordering::Relaxed)
    }

    /// `(layer, expert, count)` for every pair.
    pub fn snapshot(&self) -> Vec<(usize, usize, u64)> {
        if self.num_experts == 0 {
            return vec![];
        }
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    i / self.num_experts,
                    i % self.num_experts,
                    c.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    fn add(&self, layer: usize, expert: usize, n: u64) {
        self.counts[layer * self.num_experts + expert].fetch_add(n, Ordering::Relaxed);
    }
}

/// Per-sequence attention cache: one (key, value) pair per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    })
}

struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let dim = cfg.head_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / (cfg.rope_theta as f32).powf(i as f32 / dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` of shape (b, heads, seq, head_dim) starting at position `offset`.
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let bias = cfg.arch == Arch::Qwen2;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q: linear(h, cfg.num_attention_heads * hd, bias, vb.pp("q_proj"))?,
            k: linear(h, cfg.num_key_value_heads * hd, bias, vb.pp("k_proj"))?,
            v: linear(h, cfg.num_key_value_heads * hd, bias, vb.pp("v_proj"))?,
            o: linear(cfg.num_attention_heads * hd, h, false, vb.pp("o_proj"))?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
        offset: usize,
    ) -> Result<Tensor> {
        let (b, seq, _) = xs.dims3()?;
        let shape = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, seq, n, self.head_dim))?.transpose(1, 2)?)
        };
        let q = shape(self.q.forward(xs)?, self.heads)?;
        let k = shape(self.k.forward(xs)?, self.kv_heads)?;
        let v = shape(self.v.forward(xs)?, self.kv_heads)?.contiguous()?;
        let q = rotary.apply(&q, offset)?;
        let k = rotary.apply(&k, offset)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *cache = Some((k.clone(), v.clone()));
        let groups = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?;
        // Scores and softmax in f32 so that bf16/f16 weights stay numerically sane.
        let dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let scale = 1f64 / (self.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?.to_dtype(dtype)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, seq, self.heads * self.head_dim))?;
        Ok(self.o.forward(&y)?)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(h: usize, i: usize, names: [&str; 3], vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate: linear(h, i, false, vb.pp(names[0]))?,
            up: linear(h, i, false, vb.pp(names[1]))?,
            down: linear(i, h, false, vb.pp(names[2]))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let lhs = candle_nn::ops::silu(&self.gate.forward(xs)?)?;
        let rhs = self.up.forward(xs)?;
        Ok(self.down.forward(&(lhs * rhs)?)?)
    }
}

struct Moe {
    gate: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
}

impl Moe {
    fn load(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let experts = (0..cfg.num_experts)
            .map(|e| {
                Mlp::load(
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    ["w1", "w3", "w2"],
                    vb.pp("experts").pp(e),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            gate: linear(cfg.hidden_size, cfg.num_experts, false, vb.pp("gate"))?,
            experts,
            top_k: cfg.num_experts_per_tok,
        })
    }

    /// Top-k softmax gating, weights renormalised over the chosen experts (as Mixtral).
    fn forward(&self, xs: &Tensor, layer: usize, counts: &ExpertCounts) -> Result<Tensor> {
        let (b, seq, hidden) = xs.dims3()?;
        let xs = xs.reshape(((), hidden))?;
        let probs = candle_nn::ops::softmax_last_dim(&self.gate.forward(&xs)?)?;
        let probs = probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut rows = vec![vec![]; self.experts.len()];
        let mut weights = vec![vec![]; self.experts.len()];
        for (row, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
            let chosen = &order[..self.top_k];
            let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                rows[e].push(row as u32);
                weights[e].push(p[e] / sum);
            }
        }
        let mut ys = xs.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            counts.add(layer, e, rows[e].len() as u64);
            let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
            let w = Tensor::new(weights[e].as_slice(), xs.device())?
                .reshape(((), 1))?
                .to_dtype(xs.dtype())?;
            let out = expert.forward(&xs.index_select(&idx, 0)?)?;
            ys = ys.index_add(&idx, &out.broadcast_mul(&w)?, 0)?;
        }
        Ok(ys.reshape((b, seq, hidden))?)
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
    lm_head: Linear,
    rotary: Rotary,
    counts: Arc<ExpertCounts>,
    device: Device,
    dtype: DType,
}

impl Model {
    /// Loads every `*.safetensors` file in `dir` with the given config.
    pub fn load_dir(dir: &Path, cfg: ModelConfig, dtype: DType) -> Result<Self> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Unsupported(format!(
                "no *.safetensors files in {}",
                dir.display()
            )));
        }
        let device = Device::Cpu;
        let mut tensors = std::collections::HashMap::new();
        for f in &files {
            tensors.extend(candle_core::safetensors::load(f, &device)?);
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, &device);
        Self::load(cfg, vb)
    }

    pub fn load(cfg: ModelConfig, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let m = vb.pp("model");
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let vb = m.pp("layers").pp(l);
            let ffn = if cfg.is_moe() {
                Ffn::Moe(Moe::load(&cfg, vb.pp("block_sparse_moe"))?)
            } else {
                Ffn::Dense(Mlp::load(
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    ["gate_proj", "up_proj", "down_proj"],
                    vb.pp("mlp"),
                )?)
            };
            layers.push(Layer {
                attn: Attention::load(&cfg, vb.pp("self_attn"))?,
                ffn,
                input_norm: candle_nn::rms_norm(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    vb.pp("input_layernorm"),
                )?,
                post_norm: candle_nn::rms_norm(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    vb.pp("post_attention_layernorm"),
                )?,
            });
        }
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        let counts = Arc::new(ExpertCounts::new(cfg.num_hidden_layers, cfg.num_experts));
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

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn expert_counts(&self) -> &Arc<ExpertCounts> {
        &self.counts
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Appends `tokens` to the sequence held in `cache` and returns the f32 logits
    /// (vocab_size) for the next token.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let seq = tokens.len();
        let offset = cache.len;
        if seq == 0 {
            return Err(Error::Other("forward needs at least one token".into()));
        }
        if offset + seq > self.cfg.max_position_embeddings {
            return Err(Error::Other(format!(
                "sequence of {} tokens exceeds the context of {}",
                offset + seq,
                self.cfg.max_position_embeddings
            )));
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
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
        let mut xs = self.embed.forward(&input)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let residual = &xs;
            let h = layer.input_norm.forward(&xs)?;
            let h = layer.attn.forward(
                &h,
                &self.rotary,
                mask.as_ref(),
                &mut cache.layers[l],
                offset,
            )?;
            let xs2 = (h + residual)?;
            let h = layer.post_norm.forward(&xs2)?;
            let h = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&h)?,
                Ffn::Moe(moe) => moe.forward(&h, l, &self.counts)?,
            };
            xs = (xs2 + h)?;
        }
        cache.len += seq;
        let last = xs.narrow(1, seq - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .collect())
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
