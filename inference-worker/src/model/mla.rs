//! DeepSeek-V2's multi-head latent attention (MLA), as transformers' `DeepseekV2Attention`
//! and candle's `deepseek2` compute it: keys and values come out of one small latent
//! per token, decompressed per head, plus one rotary key part shared by all heads.
//!
//! The cache holds the decompressed per-head keys (`qk_nope_head_dim +
//! qk_rope_head_dim` wide) and values (`v_head_dim` wide) in the same
//! [`KvCache`] slots as grouped-query attention, concatenated along the sequence
//! (dim 2) the same way; caching the latent instead would be smaller but would change
//! what a cache slot holds.

use crate::error::Result;
use crate::model::config::{MlaConfig, ModelConfig};
use crate::model::decoder::KvCache;
use crate::model::layers::{Chunk, Proj, Rotary, append_kv, attend};
use crate::model::source::Source;
use candle_core::{Module, Tensor};
use candle_nn::RmsNorm;

/// How queries are projected.
enum QProj {
    /// One `q_proj` (V2-Lite).
    Plain(Proj),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))` (DeepSeek-V2).
    Lora { a: Proj, norm: RmsNorm, b: Proj },
}

pub(crate) struct Mla {
    q: QProj,
    /// Hidden state to the latent (`kv_lora_rank`) and the shared rotary key part.
    kv_a: Proj,
    kv_a_norm: RmsNorm,
    /// Latent to each head's key (non-rotary part) and value.
    kv_b: Proj,
    o: Proj,
    dims: MlaConfig,
    heads: usize,
    scale: f64,
}

impl Mla {
    pub(crate) fn load(cfg: &ModelConfig, dims: &MlaConfig, src: Source) -> Result<Self> {
        let (h, heads, eps) = (cfg.hidden_size, cfg.num_attention_heads, cfg.rms_norm_eps);
        let q_dim = dims.qk_nope_head_dim + dims.qk_rope_head_dim;
        let q = match dims.q_lora_rank {
            None => QProj::Plain(src.pp("q_proj").proj(h, heads * q_dim, false)?),
            Some(r) => QProj::Lora {
                a: src.pp("q_a_proj").proj(h, r, false)?,
                norm: src.pp("q_a_layernorm").rms_norm(r, eps)?,
                b: src.pp("q_b_proj").proj(r, heads * q_dim, false)?,
            },
        };
        let mut scale = 1.0 / (q_dim as f64).sqrt();
        // YaRN sharpens the softmax by mscale² (transformers' softmax_scale).
        if let Some(y) = cfg.rope_yarn.as_ref().filter(|y| y.mscale_all_dim != 0.0) {
            let m = y.get_mscale(y.mscale_all_dim);
            scale *= m * m;
        }
        Ok(Self {
            q,
            kv_a: src.pp("kv_a_proj_with_mqa").proj(
                h,
                dims.kv_lora_rank + dims.qk_rope_head_dim,
                false,
            )?,
            kv_a_norm: src.pp("kv_a_layernorm").rms_norm(dims.kv_lora_rank, eps)?,
            kv_b: src.pp("kv_b_proj").proj(
                dims.kv_lora_rank,
                heads * (dims.qk_nope_head_dim + dims.v_head_dim),
                false,
            )?,
            o: src.pp("o_proj").proj(heads * dims.v_head_dim, h, false)?,
            dims: dims.clone(),
            heads,
            scale,
        })
    }

    pub(crate) fn projections(&self) -> Vec<&Proj> {
        let mut v = match &self.q {
            QProj::Plain(q) => vec![q],
            QProj::Lora { a, b, .. } => vec![a, b],
        };
        v.extend([&self.kv_a, &self.kv_b, &self.o]);
        v
    }

    /// As [`crate::model::layers::Attention::forward`]: projections on all rows, attention
    /// per chunk against its own cache.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        chunks: &[Chunk],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let d = &self.dims;
        let (nope, rope, v_dim) = (d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim);
        let q_all = match &self.q {
            QProj::Plain(q) => q.forward(xs)?,
            QProj::Lora { a, norm, b } => b.forward(&norm.forward(&a.forward(xs)?)?)?,
        };
        let ckv = self.kv_a.forward(xs)?;
        // Contiguous whatever the row count: candle's RmsNorm takes another kernel (other
        // rounding) for a strided input, and one narrowed row counts as contiguous.
        let latent = ckv.narrow(1, 0, d.kv_lora_rank)?.contiguous()?;
        let latent = self.kv_a_norm.forward(&latent)?;
        let kv_all = self.kv_b.forward(&latent)?;
        let k_pe_all = ckv.narrow(1, d.kv_lora_rank, rope)?;
        let mut ys = Vec::with_capacity(chunks.len());
        for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
            // (rows, n * width) -> (1, n, len, width)
            let heads_of = |t: &Tensor, n: usize, width: usize| -> Result<Tensor> {
                Ok(t.narrow(0, c.start, c.len)?
                    .reshape((1, c.len, n, width))?
                    .transpose(1, 2)?)
            };
            let q = heads_of(&q_all, self.heads, nope + rope)?;
            let kv = heads_of(&kv_all, self.heads, nope + v_dim)?;
            let q_pe = rotary.apply(&q.narrow(3, nope, rope)?, c.offset)?;
            let k_pe = rotary.apply(&heads_of(&k_pe_all, 1, rope)?, c.offset)?;
            let q = Tensor::cat(&[&q.narrow(3, 0, nope)?, &q_pe], 3)?;
            // The one rotary key part, the same for every head.
            let k_pe = k_pe.repeat((1, self.heads, 1, 1))?;
            let k = Tensor::cat(&[&kv.narrow(3, 0, nope)?, &k_pe], 3)?;
            let v = kv.narrow(3, nope, v_dim)?.contiguous()?;
            let (k, v) = append_kv(cache, layer, k, v)?;
            let y = attend(&q, &k, &v, self.scale, c.mask.as_ref(), c.len == 1)?;
            ys.push(y.transpose(1, 2)?.reshape((c.len, self.heads * v_dim))?);
        }
        let y = if ys.len() == 1 {
            ys.pop().expect("one chunk")
        } else {
            Tensor::cat(&ys, 0)?
        };
        self.o.forward(&y)
    }
}
