//! Decoder models (Mixtral-family MoE and Llama/Mistral/Qwen2 dense) on candle.
//!
//! Weights are shared; the KV cache lives outside the model in a [`KvCache`] per
//! sequence so that one model can serve many sequences (continuous batching).

use crate::model::config::{Arch, ModelConfig};
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
    pub fn new(layers: usize, num_experts: usize) -> Self {
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

    pub fn add(&self, layer: usize, expert: usize, n: u64) {
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

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Proj> {
    Ok(Proj(if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    }))
}

/// Largest `rows * cols` product for which gemm (candle's CPU matmul) uses its
/// "horizontal" small-matrix kernels instead of its blocked kernels.
const GEMM_SMALL_PRODUCT: usize = 16 * 16;

/// Row count at which a `(rows, k) x (k, cols)` matmul takes gemm's blocked path.
///
/// gemm picks its algorithm from the shape: a single row goes to a matrix-vector
/// kernel, `rows * cols <= 256` to small "horizontal" kernels, everything else to
/// blocked micro-kernels whose depth blocking depends on `k` only. Each path sums
/// in its own order, so the same row can come out of two paths with different
/// rounding. Within the blocked path every output element is accumulated the same
/// way whatever the row count, the row's position or the other rows' contents
/// (the tests in this module check this bitwise). Padding every matmul up to this
/// many rows therefore makes a row's result independent of the batch it is in.
fn invariant_rows(rows: usize, cols: usize) -> usize {
    rows.max(2).max(GEMM_SMALL_PRODUCT / cols.max(1) + 1)
}

/// A linear layer over `(rows, in)` matrices whose rows come out bitwise the same
/// whatever else is in the matrix (see [`invariant_rows`]).
struct Proj(Linear);

impl Proj {
    fn out_dim(&self) -> Result<usize> {
        Ok(self.0.weight().dim(0)?)
    }

    /// Computes `weight · xsᵀ` rather than `xs · weightᵀ`: with the (large) weight as
    /// gemm's left operand, the blocked kernels are much faster for the few rows of a
    /// decode batch. Either way every output element is reduced along `in` in the
    /// same order whatever the number of rows.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (rows, width) = xs.dims2()?;
        let padded = invariant_rows(rows, self.out_dim()?);
        let xs = if padded == rows {
            xs.clone()
        } else {
            let zeros = Tensor::zeros((padded - rows, width), xs.dtype(), xs.device())?;
            Tensor::cat(&[xs, &zeros], 0)?
        };
        let ys = self.0.weight().matmul(&xs.t()?)?.t()?.narrow(0, 0, rows)?;
        let ys = match self.0.bias() {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        Ok(ys.contiguous()?)
    }
}

/// One sequence's share of the rows of a forward pass.
struct Chunk {
    /// First row of this sequence in the stacked hidden states.
    start: usize,
    /// Number of new tokens.
    len: usize,
    /// Positions already in the sequence's cache.
    offset: usize,
    /// Causal mask for `len > 1`.
    mask: Option<Tensor>,
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
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
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

    /// `xs` holds the stacked rows of every chunk; projections run on all rows at
    /// once, attention runs per chunk against that chunk's own cache.
    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        chunks: &[Chunk],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let q_all = self.q.forward(xs)?;
        let k_all = self.k.forward(xs)?;
        let v_all = self.v.forward(xs)?;
        let mut ys = Vec::with_capacity(chunks.len());
        for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
            let shape = |t: &Tensor, n: usize| -> Result<Tensor> {
                Ok(t.narrow(0, c.start, c.len)?
                    .reshape((1, c.len, n, self.head_dim))?
                    .transpose(1, 2)?)
            };
            let q = shape(&q_all, self.heads)?;
            let k = shape(&k_all, self.kv_heads)?;
            let v = shape(&v_all, self.kv_heads)?.contiguous()?;
            let q = rotary.apply(&q, c.offset)?;
            let k = rotary.apply(&k, c.offset)?;
            let slot = &mut cache.layers[layer];
            let (k, v) = match slot.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            *slot = Some((k.clone(), v.clone()));
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
            let att = match &c.mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v.contiguous()?)?.to_dtype(dtype)?;
            ys.push(
                y.transpose(1, 2)?
                    .reshape((c.len, self.heads * self.head_dim))?,
            );
        }
        let y = if ys.len() == 1 {
            ys.pop().expect("one chunk")
        } else {
            Tensor::cat(&ys, 0)?
        };
        self.o.forward(&y)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
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
        self.down.forward(&(lhs * rhs)?)
    }
}

/// One Mixtral expert's feed-forward network (`w1`, `w3`, `w2`), loadable on its own
/// so that an expert shard can hold any subset of a layer's experts.
pub struct ExpertFfn(Mlp);

impl ExpertFfn {
    /// Loads from `vb` positioned at `model.layers.{l}.block_sparse_moe.experts.{e}`.
    pub fn load(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self(Mlp::load(
            cfg.hidden_size,
            cfg.intermediate_size,
            ["w1", "w3", "w2"],
            vb,
        )?))
    }
}

/// Checkpoint prefix of expert `expert` of decoder layer `layer`.
pub fn expert_prefix(layer: usize, expert: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{expert}")
}

/// The per-row routing decision of a MoE layer: `(expert, weight)` pairs, weights
/// already renormalised over the row's chosen experts.
pub type Routes = Vec<Vec<(usize, f32)>>;

/// Runs experts on the rows of `xs` routed to them and returns, per row, the
/// weighted sum of its experts' outputs (rows routed nowhere come out zero).
///
/// Experts run in ascending id, each once on all of its rows, and their weighted
/// outputs are accumulated in that order: the same computation whether all experts
/// are local (`full` role) or only a shard's subset (`expert` role), so that every
/// expert's contribution is bitwise the same in both (see [`invariant_rows`]).
pub fn run_experts<'a>(
    xs: &Tensor,
    routes: &[Vec<(usize, f32)>],
    num_experts: usize,
    expert: impl Fn(usize) -> Result<&'a ExpertFfn>,
    mut on_expert: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let mut rows = vec![vec![]; num_experts];
    let mut weights = vec![vec![]; num_experts];
    for (row, r) in routes.iter().enumerate() {
        for &(e, w) in r {
            if e >= num_experts {
                return Err(Error::Other(format!(
                    "expert {e} out of range (the model has {num_experts})"
                )));
            }
            rows[e].push(row as u32);
            weights[e].push(w);
        }
    }
    let mut ys = xs.zeros_like()?;
    for e in 0..num_experts {
        if rows[e].is_empty() {
            continue;
        }
        on_expert(e, rows[e].len());
        let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
        let w = Tensor::new(weights[e].as_slice(), xs.device())?
            .reshape(((), 1))?
            .to_dtype(xs.dtype())?;
        let out = expert(e)?.0.forward(&xs.index_select(&idx, 0)?)?;
        ys = ys.index_add(&idx, &out.broadcast_mul(&w)?, 0)?;
    }
    Ok(ys)
}

/// Experts that run outside this process (the `router` role): given a layer's
/// hidden states and routing, returns the per-row weighted sum of the experts'
/// outputs, as [`run_experts`] would locally.
pub trait RemoteExperts: Send + Sync {
    fn forward(&self, layer: usize, xs: &Tensor, routes: &[Vec<(usize, f32)>]) -> Result<Tensor>;
}

/// Where a MoE model's expert FFNs live.
#[derive(Clone, Default)]
pub enum ExpertPlacement {
    /// In this process (the `full` role).
    #[default]
    Local,
    /// On expert shards; this process loads no expert weights (the `router` role).
    Remote(Arc<dyn RemoteExperts>),
}

enum Experts {
    Local(Vec<ExpertFfn>),
    Remote(Arc<dyn RemoteExperts>),
}

struct Moe {
    gate: Proj,
    experts: Experts,
    num_experts: usize,
    top_k: usize,
}

impl Moe {
    fn load(cfg: &ModelConfig, vb: VarBuilder, placement: &ExpertPlacement) -> Result<Self> {
        let experts = match placement {
            ExpertPlacement::Local => Experts::Local(
                (0..cfg.num_experts)
                    .map(|e| ExpertFfn::load(cfg, vb.pp("experts").pp(e)))
                    .collect::<Result<_>>()?,
            ),
            ExpertPlacement::Remote(r) => Experts::Remote(r.clone()),
        };
        Ok(Self {
            gate: linear(cfg.hidden_size, cfg.num_experts, false, vb.pp("gate"))?,
            experts,
            num_experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
        })
    }

    /// Top-k softmax gating, weights renormalised over the chosen experts (as Mixtral).
    fn route(&self, xs: &Tensor) -> Result<Routes> {
        let probs = candle_nn::ops::softmax_last_dim(&self.gate.forward(xs)?)?;
        let probs = probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(probs
            .iter()
            .map(|p| {
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
                let chosen = &order[..self.top_k.min(order.len())];
                let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
                chosen.iter().map(|&e| (e, p[e] / sum)).collect()
            })
            .collect())
    }

    /// `xs` is `(rows, hidden)`, possibly from several sequences: the rows routed to
    /// each expert are gathered across all of them so that each expert runs once.
    fn forward(&self, xs: &Tensor, layer: usize, counts: &ExpertCounts) -> Result<Tensor> {
        let routes = self.route(xs)?;
        match &self.experts {
            Experts::Local(experts) => run_experts(
                xs,
                &routes,
                self.num_experts,
                |e| Ok(&experts[e]),
                |e, n| counts.add(layer, e, n as u64),
            ),
            Experts::Remote(remote) => {
                for r in &routes {
                    for &(e, _) in r {
                        counts.add(layer, e, 1);
                    }
                }
                remote.forward(layer, xs, &routes)
            }
        }
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
    /// remote experts only the non-expert tensors are read from the checkpoint.
    pub fn load_dir_with(
        dir: &Path,
        cfg: ModelConfig,
        dtype: DType,
        placement: ExpertPlacement,
    ) -> Result<Self> {
        if let ExpertPlacement::Remote(_) = placement {
            let index = crate::model::weights::Checkpoint::open(dir)?;
            let tensors = index.load_where(|name| !name.contains(".block_sparse_moe.experts."))?;
            let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
            return Self::load_with(cfg, vb, placement);
        }
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
        Self::load_with(cfg, vb, ExpertPlacement::Local)
    }

    pub fn load_with(cfg: ModelConfig, vb: VarBuilder, placement: ExpertPlacement) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let m = vb.pp("model");
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let vb = m.pp("layers").pp(l);
            let ffn = if cfg.is_moe() {
                Ffn::Moe(Moe::load(&cfg, vb.pp("block_sparse_moe"), &placement)?)
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
            Proj(Linear::new(embed.embeddings().clone(), None))
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
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut chunks = Vec::with_capacity(batch.len());
        let mut tokens = vec![];
        for (toks, cache) in batch.iter() {
            let (seq, offset) = (toks.len(), cache.len);
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
        let last: Vec<u32> = chunks
            .iter()
            .map(|c| (c.start + c.len - 1) as u32)
            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn matrix(rows: usize, cols: usize, seed: u64) -> Tensor {
        Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap()
    }

    /// Output shapes that hit each of gemm's paths without padding: a matrix-vector
    /// kernel (one row), the small "horizontal" kernels (`rows * cols <= 256`) and
    /// the blocked kernels.
    const SHAPES: [(usize, usize); 6] = [
        (64, 4),
        (64, 64),
        (128, 64),
        (64, 259),
        (1024, 8),
        (256, 1024),
    ];

    #[test]
    fn proj_rows_are_bitwise_independent_of_the_rest_of_the_matrix() {
        for (k, n) in SHAPES {
            for bias in [false, true] {
                let b = bias.then(|| matrix(1, n, 3).squeeze(0).unwrap());
                let proj = Proj(Linear::new(matrix(n, k, 1), b));
                let target = matrix(1, k, 2);
                let alone: Vec<f32> = proj
                    .forward(&target)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for rows in 1..=40 {
                    for pos in [0, rows / 2, rows - 1] {
                        // Other rows with contents that change with the row count and position.
                        let others = matrix(rows - 1, k, 100 + 64 * rows as u64 + pos as u64);
                        let (before, after) = (
                            others.narrow(0, 0, pos).unwrap(),
                            others.narrow(0, pos, rows - 1 - pos).unwrap(),
                        );
                        let xs = Tensor::cat(&[&before, &target, &after], 0).unwrap();
                        let out = proj.forward(&xs).unwrap();
                        assert_eq!(out.dims(), &[rows, n]);
                        let got: Vec<f32> = out
                            .narrow(0, pos, 1)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        assert!(
                            got == alone,
                            "k={k} n={n} bias={bias}: row {pos} of {rows} differs from the row alone"
                        );
                    }
                }
            }
        }
    }

    /// The reason for the padding: without it a row's result does depend on the
    /// number of rows (here one row takes gemm's matrix-vector kernel), so the test
    /// above would catch a regression.
    #[test]
    fn unpadded_matmul_is_not_row_invariant() {
        let (k, n) = (256, 1024);
        let w = matrix(n, k, 1);
        let target = matrix(1, k, 2);
        let alone = target.matmul(&w.t().unwrap()).unwrap();
        let xs = Tensor::cat(&[&target, &matrix(3, k, 5)], 0).unwrap();
        let batched = xs.matmul(&w.t().unwrap()).unwrap().narrow(0, 0, 1).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            alone.flatten_all().unwrap().to_vec1().unwrap(),
            batched.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_ne!(
            a, b,
            "gemm became row-invariant: the padding may be unnecessary"
        );
    }
}
