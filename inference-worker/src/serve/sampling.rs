//! Choosing the next token from logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Validated sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

/// Per-sequence sampler (owns the sequence's random state so seeds are reproducible
/// no matter what else is in the batch).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The largest probability of `softmax(logits)` (temperature 1): how sure the model is
/// of its most likely next token, whatever the request's sampling settings. Used as the
/// per-token confidence of edge escalation. NaN logits count as no confidence (0).
pub fn max_prob(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return 0.0;
    }
    let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    if total.is_finite() && total > 0.0 {
        1.0 / total
    } else {
        0.0
    }
}

/// `token`'s log probability under `softmax(logits)` (temperature 1, natural log, as
/// OpenAI and vLLM report them) and the `top` most likely tokens with theirs, most likely
/// first (ties: lower id first).
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = if max.is_finite() {
        max + logits
            .iter()
            .map(|&l| f64::from(l - max).exp())
            .sum::<f64>()
            .ln() as f32
    } else {
        f32::NAN
    };
    let lp = |l: f32| l - lse;
    let chosen = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(idx.len());
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit);
    }
    idx.truncate(k);
    idx.sort_by(by_logit);
    (
        chosen,
        idx.into_iter()
            .map(|i| (i, lp(logits[i as usize])))
            .collect(),
    )
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(usize, f32)> = logits
            .iter()
            .map(|&l| l / p.temperature)
            .enumerate()
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, x) in probs.iter().enumerate() {
            if r < *x {
                return cand[i].0 as u32;
            }
            r -= x;
        }
        cand[probs.len() - 1].0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_with_the_top_alternatives_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-5);
        let total: f32 = logprobs(&logits, 0, 4).1.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(logprobs(&logits, 0, 0).1.is_empty());
        assert_eq!(logprobs(&logits, 0, 9).1.len(), 4);
    }

    #[test]
    fn greedy_picks_max_and_top_k_one_is_greedy() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn max_prob_is_the_largest_softmax_probability() {
        assert!((max_prob(&[0.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-6);
        let p = max_prob(&[2.0, 1.0, 0.0]);
        let e = [2.0f32.exp(), 1.0f32.exp(), 1.0];
        assert!((p - e[0] / e.iter().sum::<f32>()).abs() < 1e-6);
        assert!(max_prob(&[100.0, -100.0]) > 0.999);
        assert_eq!(max_prob(&[f32::NAN, 1.0]), 0.0);
        assert_eq!(max_prob(&[]), 0.0);
    }

    #[test]
    fn top_k_and_top_p_restrict_support_and_seed_reproduces() {
        let logits = [5.0, 4.9, 0.0, 0.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: Some(7),
        };
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params);
        let xs: Vec<u32> = (0..200).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..200).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 2));
        assert!(xs.contains(&0) && xs.contains(&1));
        let mut c = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.1,
            seed: Some(1),
        });
        assert!((0..100).all(|_| c.sample(&logits) == 0));
    }
}
