//! Mixtral-style sparse MoE: top-k gating, expert FFNs run locally or on expert
//! shards ([`RemoteExperts`]), Qwen2-MoE's gated and DeepSeek-V2's ungated shared
//! experts, and per-expert token counts.

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use crate::model::layers::{Mlp, Proj};
use crate::model::source::Source;
use candle_core::{DType, Tensor};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tokens routed to each expert of each MoE layer since the model was loaded.
#[derive(Debug)]
pub struct ExpertCounts {
    num_experts: usize,
    counts: Vec<AtomicU64>,
    /// Layers without experts, left out of [`Self::snapshot`].
    dense_layers: Vec<usize>,
}

impl ExpertCounts {
    pub fn new(layers: usize, num_experts: usize) -> Self {
        Self {
            num_experts,
            counts: (0..layers * num_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            dense_layers: vec![],
        }
    }

    /// Counters for `cfg`'s routed experts, in its MoE layers only.
    pub fn for_model(cfg: &ModelConfig) -> Self {
        Self {
            dense_layers: cfg.dense_layers.clone(),
            ..Self::new(cfg.num_hidden_layers, cfg.num_experts)
        }
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Tokens routed to `expert` in `layer` so far.
    pub fn get(&self, layer: usize, expert: usize) -> u64 {
        self.counts[layer * self.num_experts + expert].load(Ordering::Relaxed)
    }

    /// `(layer, expert, count)` for every pair of a MoE layer.
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
            .filter(|(layer, _, _)| !self.dense_layers.contains(layer))
            .collect()
    }

    pub fn add(&self, layer: usize, expert: usize, n: u64) {
        self.counts[layer * self.num_experts + expert].fetch_add(n, Ordering::Relaxed);
    }
}

/// One routed expert's feed-forward network (Mixtral's `w1`, `w3`, `w2`; Qwen2-MoE's and
/// DeepSeek-V2's `gate_proj`, `up_proj`, `down_proj`), loadable on its own so that an expert shard
/// can hold any subset of a layer's experts.
pub struct ExpertFfn(Mlp);

impl ExpertFfn {
    /// Loads from `src` positioned at [`expert_prefix`].
    pub fn load(cfg: &ModelConfig, src: Source) -> Result<Self> {
        Ok(Self(Mlp::load(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.arch.expert_projections(),
            src,
        )?))
    }
}

/// Checkpoint prefix of routed expert `expert` of decoder layer `layer`.
pub fn expert_prefix(arch: Arch, layer: usize, expert: usize) -> String {
    format!("model.layers.{layer}.{}.experts.{expert}", arch.moe_block())
}

/// Whether checkpoint tensor `name` belongs to a routed expert (what a router does not
/// load). Shared experts (Qwen2-MoE's `mlp.shared_expert.*`, DeepSeek-V2's
/// `mlp.shared_experts.*`) are not.
pub fn is_routed_expert_tensor(arch: Arch, name: &str) -> bool {
    name.contains(&format!(".{}.experts.", arch.moe_block()))
}

/// The per-row routing decision of a MoE layer: `(expert, weight)` pairs, weights as the
/// layer's gate finished them (renormalised over the row's chosen experts or not, scaled
/// by DeepSeek-V2's `routed_scaling_factor`): what expert shards receive.
pub type Routes = Vec<Vec<(usize, f32)>>;

/// Runs experts on the rows of `xs` routed to them and returns, per row, the
/// weighted sum of its experts' outputs (rows routed nowhere come out zero).
///
/// Experts run in ascending id, each once on all of its rows, and their weighted
/// outputs are accumulated in that order: the same computation whether all experts
/// are local (`full` role) or only a shard's subset (`expert` role), so that every
/// expert's contribution is bitwise the same in both (see `layers::invariant_rows`).
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
                return Err(Error::ExpertOutOfRange {
                    expert: e,
                    num_experts,
                });
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

/// A shared expert: an MLP every token goes through, added to the routed experts' sum.
/// Qwen2-MoE scales its output by `sigmoid(gate(x))` (one logit per token); DeepSeek-V2's
/// (its `n_shared_experts` fused into one wider MLP) has no gate.
///
/// It runs where the layer's gate runs (the `full` role, or the `router`), never on an
/// expert shard: every token needs it, so sending it away would ship every row every
/// layer. It is not a routed expert: it has no id on the wire and no expert counter.
struct SharedExpert {
    mlp: Mlp,
    gate: Option<Proj>,
}

impl SharedExpert {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.mlp.forward(xs)?;
        match &self.gate {
            Some(g) => Ok(ys.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(xs)?)?)?),
            None => Ok(ys),
        }
    }
}

pub(crate) struct Moe {
    gate: Proj,
    experts: Experts,
    shared: Option<SharedExpert>,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f32,
    /// Gate logits in f32 whatever the serving dtype (DeepSeek-V2, as transformers and
    /// candle compute them), so that near ties among many experts break as there.
    gate_f32: bool,
}

impl Moe {
    pub(crate) fn load(
        cfg: &ModelConfig,
        src: Source,
        placement: &ExpertPlacement,
    ) -> Result<Self> {
        let experts = match placement {
            ExpertPlacement::Local => Experts::Local(
                (0..cfg.num_experts)
                    .map(|e| ExpertFfn::load(cfg, src.pp("experts").pp(e)))
                    .collect::<Result<_>>()?,
            ),
            ExpertPlacement::Remote(r) => Experts::Remote(r.clone()),
        };
        let h = cfg.hidden_size;
        let shared = if cfg.shared_expert_intermediate_size > 0 {
            let (module, gate) = cfg.arch.shared_expert();
            Some(SharedExpert {
                mlp: Mlp::load(
                    h,
                    cfg.shared_expert_intermediate_size,
                    ["gate_proj", "up_proj", "down_proj"],
                    src.pp(module),
                )?,
                gate: gate.map(|g| src.pp(g).proj(h, 1, false)).transpose()?,
            })
        } else {
            None
        };
        let gate = src.pp("gate").proj(h, cfg.num_experts, false)?;
        let gate_f32 = cfg.arch.gate_in_f32();
        Ok(Self {
            gate: if gate_f32 { gate.into_f32()? } else { gate },
            experts,
            shared,
            num_experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor,
            gate_f32,
        })
    }

    /// The router gate, the shared expert's and the local experts' projections.
    pub(crate) fn projections(&self) -> Vec<&Proj> {
        let mut v = vec![&self.gate];
        if let Some(s) = &self.shared {
            v.extend(&s.gate);
            v.extend(s.mlp.projections());
        }
        if let Experts::Local(experts) = &self.experts {
            for e in experts {
                v.extend(e.0.projections());
            }
        }
        v
    }

    /// Top-k softmax gating; the chosen experts' weights are renormalised to sum to
    /// one (Mixtral; Qwen3-MoE with `norm_topk_prob`) or kept as the softmax gave them
    /// (Qwen1.5-MoE), then multiplied by `routed_scaling_factor` (DeepSeek-V2, 1 when
    /// renormalised; 1 for the others, which leaves them unchanged).
    fn route(&self, xs: &Tensor) -> Result<Routes> {
        let logits = if self.gate_f32 {
            self.gate.forward(&xs.to_dtype(DType::F32)?)?
        } else {
            self.gate.forward(xs)?
        };
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let probs = probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(probs
            .iter()
            .map(|p| {
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
                let chosen = &order[..self.top_k.min(order.len())];
                let sum: f32 = if self.norm_topk_prob {
                    chosen.iter().map(|&e| p[e]).sum()
                } else {
                    1.0
                };
                chosen
                    .iter()
                    .map(|&e| (e, p[e] / sum * self.routed_scaling_factor))
                    .collect()
            })
            .collect())
    }

    /// `xs` is `(rows, hidden)`, possibly from several sequences: the rows routed to
    /// each expert are gathered across all of them so that each expert runs once.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        counts: &ExpertCounts,
    ) -> Result<Tensor> {
        let routes = self.route(xs)?;
        let routed = match &self.experts {
            Experts::Local(experts) => run_experts(
                xs,
                &routes,
                self.num_experts,
                |e| Ok(&experts[e]),
                |e, n| counts.add(layer, e, n as u64),
            )?,
            Experts::Remote(remote) => {
                for r in &routes {
                    for &(e, _) in r {
                        counts.add(layer, e, 1);
                    }
                }
                remote.forward(layer, xs, &routes)?
            }
        };
        // Routed sum first, shared expert added last, as transformers and candle do.
        match &self.shared {
            Some(s) => Ok((routed + s.forward(xs)?)?),
            None => Ok(routed),
        }
    }
}
