//! The decoder's building blocks: batch-invariant linear projections, rotary
//! embeddings (YaRN-scaled for DeepSeek-V2), attention over per-sequence KV caches
//! (grouped-query here, latent in [`crate::model::mla`]) and the SwiGLU MLP.

use crate::error::Result;
use crate::model::config::{ModelConfig, Yarn};
use crate::model::decoder::KvCache;
pub(crate) use crate::model::mla::Mla;
use crate::model::source::Source;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, RmsNorm};
use std::f64::consts::PI;

/// Largest `rows * cols` product for which gemm (candle's CPU matmul) uses its
/// "horizontal" small-matrix kernels instead of its blocked kernels.
pub(crate) const GEMM_SMALL_PRODUCT: usize = 16 * 16;

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
pub(crate) fn invariant_rows(rows: usize, cols: usize) -> usize {
    rows.max(2).max(GEMM_SMALL_PRODUCT / cols.max(1) + 1)
}

/// A linear layer over `(rows, in)` matrices whose rows come out bitwise the same
/// whatever else is in the matrix.
pub enum Proj {
    /// Dense weights: padded to gemm's blocked path (see [`invariant_rows`]).
    Dense(Linear),
    /// Quantized weights (GGUF): each input row is quantized and dotted with the weight
    /// rows on its own, so rows are independent without padding.
    Quant { w: QWeight, bias: Option<Tensor> },
}

/// A quantized weight's matmul: Q4_1 on the CPU through [`crate::model::q41`] (candle has no
/// x86 kernel for it), everything else through candle's `QMatMul`.
pub enum QWeight {
    Candle(QMatMul),
    Q41(crate::model::q41::Q41Matrix),
}

impl Proj {
    /// The same projection with f32 weights (quantized ones already take f32 inputs).
    pub(crate) fn into_f32(self) -> Result<Self> {
        Ok(match self {
            Self::Dense(l) => {
                let bias = l.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
                Self::Dense(Linear::new(l.weight().to_dtype(DType::F32)?, bias))
            }
            q => q,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => dense_forward(l, xs),
            Self::Quant { w, bias } => {
                let ys = match w {
                    QWeight::Candle(m) => m.forward(xs)?,
                    QWeight::Q41(m) => m.forward(xs)?,
                };
                Ok(match bias {
                    Some(b) => ys.broadcast_add(b)?,
                    None => ys,
                })
            }
        }
    }
}

/// Several projections of the same input (q, k and v; gate and up): Q4_1 ones in one pass
/// (see [`crate::model::q41::Q41Matrix::forward_many`]), others one by one. Each result is
/// bitwise what [`Proj::forward`] gives.
pub(crate) fn forward_shared<const N: usize>(
    projs: [&Proj; N],
    xs: &Tensor,
) -> Result<[Tensor; N]> {
    let q41: Vec<_> = projs
        .iter()
        .filter_map(|p| match p {
            Proj::Quant {
                w: QWeight::Q41(m), ..
            } => Some(m),
            _ => None,
        })
        .collect();
    let ys: Vec<Tensor> = if N > 1 && q41.len() == N {
        let ys = crate::model::q41::Q41Matrix::forward_many(&q41, xs)?;
        ys.into_iter()
            .zip(projs)
            .map(|(y, p)| match p {
                Proj::Quant { bias: Some(b), .. } => Ok(y.broadcast_add(b)?),
                _ => Ok(y),
            })
            .collect::<Result<_>>()?
    } else {
        projs.iter().map(|p| p.forward(xs)).collect::<Result<_>>()?
    };
    Ok(ys
        .try_into()
        .unwrap_or_else(|_| unreachable!("N projections in, N out")))
}

/// f32 projections go through [`crate::model::matmul`], whose rows are independent by
/// construction. Other dtypes take gemm, padded to its blocked path, computing
/// `weight · xsᵀ` rather than `xs · weightᵀ`: with the (large) weight as gemm's left
/// operand, the blocked kernels are much faster for the few rows of a decode batch.
fn dense_forward(l: &Linear, xs: &Tensor) -> Result<Tensor> {
    if let Some(ys) = crate::model::matmul::xwt(xs, l.weight())? {
        return Ok(match l.bias() {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        });
    }
    if !xs.device().is_cpu() {
        // cuBLAS picks its kernel by shape, so padding buys no invariance on a GPU.
        return Ok(l.forward(xs)?);
    }
    {
        let (rows, width) = xs.dims2()?;
        let padded = invariant_rows(rows, l.weight().dim(0)?);
        let xs = if padded == rows {
            xs.clone()
        } else {
            let zeros = Tensor::zeros((padded - rows, width), xs.dtype(), xs.device())?;
            Tensor::cat(&[xs, &zeros], 0)?
        };
        let ys = l.weight().matmul(&xs.t()?)?.t()?.narrow(0, 0, rows)?;
        let ys = match l.bias() {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        Ok(ys.contiguous()?)
    }
}

/// One sequence's share of the rows of a forward pass.
pub(crate) struct Chunk {
    /// First row of this sequence in the stacked hidden states.
    pub(crate) start: usize,
    /// Number of new tokens.
    pub(crate) len: usize,
    /// Positions already in the sequence's cache.
    pub(crate) offset: usize,
    /// Causal mask for `len > 1`.
    pub(crate) mask: Option<Tensor>,
}

pub(crate) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// Pairs `(2i, 2i+1)` (Meta's layout, kept by llama.cpp's Llama files) rather
    /// than Hugging Face's `(i, i + d/2)`.
    interleaved: bool,
}

impl Rotary {
    pub(crate) fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let dim = cfg.rope_dim();
        let theta = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / dim as f32))
            .collect();
        let mut mscale = 1.0;
        if let Some(y) = &cfg.rope_yarn {
            inv_freq = yarn_inv_freq(&inv_freq, y, dim, theta);
            mscale = y.get_mscale(y.mscale) / y.get_mscale(y.mscale_all_dim);
        }
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            cos: (freqs.cos()? * mscale)?.to_dtype(dtype)?,
            sin: (freqs.sin()? * mscale)?.to_dtype(dtype)?,
            interleaved: cfg.rope_interleaved,
        })
    }

    /// Rotates `x` of shape (b, heads, seq, head_dim) starting at position `offset`.
    pub(crate) fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let x = x.contiguous()?;
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        })
    }
}

/// YaRN's frequencies (transformers' `DeepseekV2YarnRotaryEmbedding`, as candle's
/// `deepseek2`): the unscaled ones (`extra`) for the fast-turning pairs, those divided by
/// `factor` for the slow ones, blended linearly over the pairs in between.
fn yarn_inv_freq(extra: &[f32], y: &Yarn, dim: usize, theta: f32) -> Vec<f32> {
    let correction_dim = |rot: f64| {
        (dim as f64 * (y.original_max_position_embeddings as f64 / (rot * 2.0 * PI)).ln())
            / (2.0 * f64::from(theta).ln())
    };
    let low = correction_dim(y.beta_fast).floor().max(0.0);
    let high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
    // transformers' guard against a zero-width ramp.
    let high = if low == high { high + 0.001 } else { high };
    extra
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let inter = 1f32 / (y.factor as f32 * theta.powf((2 * i) as f32 / dim as f32));
            let mask = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
            inter * (1.0 - mask) + e * mask
        })
        .collect()
}

/// A decoder layer's self-attention: grouped-query ([`Gqa`]) or DeepSeek-V2's
/// multi-head latent attention ([`Mla`]).
pub(crate) enum Attention {
    Gqa(Gqa),
    Mla(Mla),
}

impl Attention {
    pub(crate) fn load(cfg: &ModelConfig, src: Source) -> Result<Self> {
        Ok(match &cfg.mla {
            Some(mla) => Self::Mla(Mla::load(cfg, mla, src)?),
            None => Self::Gqa(Gqa::load(cfg, src)?),
        })
    }

    pub(crate) fn projections(&self) -> Vec<&Proj> {
        match self {
            Self::Gqa(a) => a.projections().to_vec(),
            Self::Mla(a) => a.projections(),
        }
    }

    /// `xs` holds the stacked rows of every chunk; projections run on all rows at
    /// once, attention runs per chunk against that chunk's own cache.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        chunks: &[Chunk],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        match self {
            Self::Gqa(a) => a.forward(xs, rotary, chunks, caches, layer),
            Self::Mla(a) => a.forward(xs, rotary, chunks, caches, layer),
        }
    }
}

/// Fewest positions a cache's room is made for.
const MIN_ROOM: usize = 64;

/// Appends a chunk's new keys and values (`(1, heads, len, dim)`) to `layer`'s slot of
/// its cache, along dim 2, and returns the whole sequence's (views of the cache's room).
/// New positions are written in place into room that doubles when full (up to the model's
/// context), so a decode step copies its own keys and values, not the whole cache.
pub(crate) fn append_kv(
    cache: &mut KvCache,
    layer: usize,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let old = match &cache.layers[layer] {
        Some((pk, _)) => pk.dim(2)?,
        None => 0,
    };
    let total = old + k.dim(2)?;
    let fits = match &cache.room[layer] {
        Some((rk, _)) => rk.dim(2)? >= total,
        None => false,
    };
    if !fits {
        let cap = (2 * total).max(MIN_ROOM).min(cache.limit).max(total);
        let alloc = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            Ok(Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?)
        };
        let (rk, rv) = (alloc(&k)?, alloc(&v)?);
        if let Some((pk, pv)) = &cache.layers[layer] {
            rk.slice_set(&pk.contiguous()?, 2, 0)?;
            rv.slice_set(&pv.contiguous()?, 2, 0)?;
        }
        cache.room[layer] = Some((rk, rv));
    }
    let (rk, rv) = cache.room[layer]
        .as_ref()
        .expect("room was just made for these positions");
    rk.slice_set(&k.contiguous()?, 2, old)?;
    rv.slice_set(&v.contiguous()?, 2, old)?;
    let (k, v) = (rk.narrow(2, 0, total)?, rv.narrow(2, 0, total)?);
    cache.layers[layer] = Some((k.clone(), v.clone()));
    Ok((k, v))
}

/// Softmax attention of one chunk, scores and softmax in f32 so that bf16/f16 weights
/// stay numerically sane: `(1, heads, rows, v_dim)` in `q`'s dtype. `decode`: the chunk is
/// one position (its rows are heads of a group, see [`Gqa::forward`]), so its shape is the
/// same whatever runs beside it and needs no padding (see [`matmul_rows`]).
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    decode: bool,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let att = (matmul_rows(&q, &k.t()?, decode)? * scale)?;
    let att = match mask {
        Some(m) => att.broadcast_add(m)?,
        None => att,
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    // `v` may be a view of a cache's room: each head's rows are contiguous, which is all
    // the matmul needs, so it is not copied.
    Ok(matmul_rows(&att, &v, decode)?.to_dtype(dtype)?)
}

/// `a (1, heads, rows, k) x b (1, heads, k, cols)`. With two rows or more (a prefill), padded
/// with zero rows to gemm's blocked path ([`invariant_rows`]), so that each query row comes
/// out as it would among any other number of rows: the suffix of a prompt computed after a
/// reused prefix gets bitwise the values a whole prefill of the prompt would. A decode step
/// (one position) keeps the faster unpadded path; a reused prefix always leaves at least two
/// prompt tokens to compute, so no prefill chunk takes it.
fn matmul_rows(a: &Tensor, b: &Tensor, decode: bool) -> Result<Tensor> {
    let (d0, heads, rows, k) = a.dims4()?;
    let padded = invariant_rows(rows, b.dim(3)?);
    // On a GPU padding buys no invariance (see `dense_forward`).
    if decode || rows < 2 || padded == rows || !a.device().is_cpu() {
        return Ok(a.matmul(b)?);
    }
    let zeros = Tensor::zeros((d0, heads, padded - rows, k), a.dtype(), a.device())?;
    Ok(Tensor::cat(&[a, &zeros], 2)?
        .matmul(b)?
        .narrow(2, 0, rows)?)
}

/// Grouped-query attention (Llama, Mistral, Mixtral, Qwen).
pub(crate) struct Gqa {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    /// Qwen3: RMSNorm of each query and key head before the rotation.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Gqa {
    fn load(cfg: &ModelConfig, src: Source) -> Result<Self> {
        let bias = cfg.arch.attention_bias();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let qk_norm = if cfg.arch.qk_norm() {
            Some((
                src.pp("q_norm").rms_norm(hd, cfg.rms_norm_eps)?,
                src.pp("k_norm").rms_norm(hd, cfg.rms_norm_eps)?,
            ))
        } else {
            None
        };
        Ok(Self {
            q: src
                .pp("q_proj")
                .proj(h, cfg.num_attention_heads * hd, bias)?,
            k: src
                .pp("k_proj")
                .proj(h, cfg.num_key_value_heads * hd, bias)?,
            v: src
                .pp("v_proj")
                .proj(h, cfg.num_key_value_heads * hd, bias)?,
            o: src
                .pp("o_proj")
                .proj(cfg.num_attention_heads * hd, h, false)?,
            qk_norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn projections(&self) -> [&Proj; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        chunks: &[Chunk],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let [q_all, k_all, v_all] = forward_shared([&self.q, &self.k, &self.v], xs)?;
        let mut ys = Vec::with_capacity(chunks.len());
        for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
            let shape = |t: &Tensor, n: usize| -> Result<Tensor> {
                Ok(t.narrow(0, c.start, c.len)?
                    .reshape((1, c.len, n, self.head_dim))?
                    .transpose(1, 2)?)
            };
            let (mut q, mut k) = (shape(&q_all, self.heads)?, shape(&k_all, self.kv_heads)?);
            if let Some((qn, kn)) = &self.qk_norm {
                q = qn.forward(&q.contiguous()?)?;
                k = kn.forward(&k.contiguous()?)?;
            }
            let v = shape(&v_all, self.kv_heads)?.contiguous()?;
            let q = rotary.apply(&q, c.offset)?;
            let k = rotary.apply(&k, c.offset)?;
            let (k, v) = append_kv(cache, layer, k, v)?;
            let scale = 1f64 / (self.head_dim as f64).sqrt();
            let decode = c.len == 1;
            let groups = self.heads / self.kv_heads;
            let y = if groups == 1 {
                attend(&q, &k, &v, scale, c.mask.as_ref(), decode)?
            } else {
                // Grouped queries without copying K and V per query head (what
                // `repeat_kv` does, a copy of the whole cache every step): the query heads
                // that share a key head become rows of one matrix against it. Heads are
                // grouped by key head (query head h reads key head h / groups), rows
                // ordered (head in group, position), so the mask repeats per head.
                let q =
                    q.contiguous()?
                        .reshape((1, self.kv_heads, groups * c.len, self.head_dim))?;
                let mask = c.mask.as_ref().map(|m| m.repeat((groups, 1))).transpose()?;
                attend(&q, &k, &v, scale, mask.as_ref(), decode)?.reshape((
                    1,
                    self.heads,
                    c.len,
                    self.head_dim,
                ))?
            };
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
pub(crate) struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl Mlp {
    pub(crate) fn load(h: usize, i: usize, names: [&str; 3], src: Source) -> Result<Self> {
        Ok(Self {
            gate: src.pp(names[0]).proj(h, i, false)?,
            up: src.pp(names[1]).proj(h, i, false)?,
            down: src.pp(names[2]).proj(i, h, false)?,
        })
    }

    pub(crate) fn projections(&self) -> [&Proj; 3] {
        [&self.gate, &self.up, &self.down]
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [gate, rhs] = forward_shared([&self.gate, &self.up], xs)?;
        let lhs = candle_nn::ops::silu(&gate)?;
        self.down.forward(&(lhs * rhs)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn kv(len: usize, seed: u64) -> (Tensor, Tensor) {
        let t = |seed| Tensor::from_vec(values(2 * len * 3, seed), (1, 2, len, 3), &Device::Cpu);
        (t(seed).unwrap(), t(seed + 1).unwrap())
    }

    /// An empty one-layer cache for a model of `limit` positions.
    fn one_layer(limit: usize) -> KvCache {
        let mut cache = KvCache::holding(vec![None], 0);
        cache.limit = limit;
        cache
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn appended_keys_and_values_are_the_concatenation_through_every_growth() {
        let mut cache = one_layer(1000);
        let (mut all_k, mut all_v) = kv(0, 0);
        // 5 + 60 + 1 * 80: past the first room (64) and the second (130).
        let lens = [5, 60].into_iter().chain(std::iter::repeat_n(1, 80));
        for (i, n) in lens.enumerate() {
            let (k, v) = kv(n, 10 + 2 * i as u64);
            all_k = Tensor::cat(&[&all_k, &k], 2).unwrap();
            all_v = Tensor::cat(&[&all_v, &v], 2).unwrap();
            let (ck, cv) = append_kv(&mut cache, 0, k, v).unwrap();
            assert_eq!(flat(&ck), flat(&all_k));
            assert_eq!(flat(&cv), flat(&all_v));
        }
        let room = cache.room[0].as_ref().unwrap().0.dim(2).unwrap();
        assert!((145..=290).contains(&room), "room {room}");
    }

    #[test]
    fn room_stops_at_the_context() {
        let mut cache = one_layer(40);
        let (k, v) = kv(30, 1);
        append_kv(&mut cache, 0, k, v).unwrap();
        assert_eq!(cache.room[0].as_ref().unwrap().0.dim(2).unwrap(), 40);
    }

    #[test]
    fn a_clone_never_writes_into_the_room_of_the_cache_it_came_from() {
        let mut a = one_layer(1000);
        let (k, v) = kv(4, 1);
        append_kv(&mut a, 0, k, v).unwrap();
        let mut b = a.clone();
        let held = flat(&a.layers[0].as_ref().unwrap().0);
        // Both grow from position 4 with different tokens.
        let (kb, vb) = kv(1, 7);
        let (b_k, _) = append_kv(&mut b, 0, kb.clone(), vb).unwrap();
        let (ka, va) = kv(1, 9);
        let (a_k, _) = append_kv(&mut a, 0, ka.clone(), va).unwrap();
        assert_eq!(flat(&b_k.narrow(2, 0, 4).unwrap()), held);
        assert_eq!(flat(&a_k.narrow(2, 0, 4).unwrap()), held);
        assert_eq!(flat(&b_k.narrow(2, 4, 1).unwrap()), flat(&kb));
        assert_eq!(flat(&a_k.narrow(2, 4, 1).unwrap()), flat(&ka));
    }

    /// Deterministic values in [-0.5, 0.5).
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
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
                let proj = Proj::Dense(Linear::new(matrix(n, k, 1), b));
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
