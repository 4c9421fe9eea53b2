//! Dynamically-tuned adaptive conformal inference (DtACI: Gibbs & Candès 2022, "Conformal
//! inference for online prediction with arbitrary distribution shifts", Algorithm 1).
//!
//! Plain adaptive conformal inference moves a bound's miscoverage level by γ·(α − miss) after
//! each outcome, and its long-run miss rate is α whatever the series; but one γ is a
//! trade-off: a small one is steady and slow (a trace of a hundred forecasts ends before it has
//! moved), a large one fast and jumpy. DtACI runs one such level per γ of a fixed grid and
//! follows them by exponential weights on the pinball loss each would have had, so it is about
//! as good as the best γ in hindsight on every stretch of the series, with no γ picked per
//! trace. The grid and the formulas are the paper's.

/// The step sizes tried (the paper's grid: powers of two from 0.001 to 0.128).
pub const GAMMAS: [f64; 8] = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128];

/// The length of the stretches over which DtACI competes with the best γ (the paper's `I`);
/// its weight mixing and learning rate follow from it by the paper's formulas. 100 outcomes:
/// about the fewest forecasts a trace scores (an hour at 15 s gives ~240).
pub const LOCAL_INTERVAL: f64 = 100.0;

/// One bound's miscoverage level, tuned online.
#[derive(Clone, Debug, PartialEq)]
pub struct DtAci {
    /// Target miscoverage rate.
    alpha: f64,
    /// Each expert's level (one per γ). Unclamped, as in the paper: below 0 an expert counts
    /// every outcome as covered and climbs back, above 1 none and comes down, so each stays
    /// within a step of [0, 1]; the level used is clamped where it is applied.
    levels: [f64; GAMMAS.len()],
    weights: [f64; GAMMAS.len()],
    eta: f64,
    sigma: f64,
}

/// The pinball loss of level `theta` when the outcome needed `beta`, at target `alpha`.
fn pinball(beta: f64, theta: f64, alpha: f64) -> f64 {
    let u = beta - theta;
    alpha * u - u.min(0.0)
}

impl DtAci {
    pub fn new(alpha: f64) -> Self {
        let alpha = alpha.clamp(1e-4, 0.5);
        let k = GAMMAS.len() as f64;
        let i = LOCAL_INTERVAL;
        let denom = (1.0 - alpha).powi(2) * alpha.powi(3) + alpha.powi(2) * (1.0 - alpha).powi(3);
        DtAci {
            alpha,
            levels: [alpha; GAMMAS.len()],
            weights: [1.0 / k; GAMMAS.len()],
            eta: (3.0 / i).sqrt() * (((k * i).ln() + 2.0) / denom).sqrt(),
            sigma: 1.0 / (2.0 * i),
        }
    }

    /// The miscoverage level to use now: the experts' levels averaged by their weights.
    pub fn level(&self) -> f64 {
        self.levels
            .iter()
            .zip(&self.weights)
            .map(|(l, w)| l * w)
            .sum()
    }

    /// An outcome: `beta` is the largest miscoverage level whose bound would still have
    /// covered it (1 when any level would have, 0 when none would).
    pub fn update(&mut self, beta: f64) {
        if !beta.is_finite() {
            return;
        }
        let beta = beta.clamp(0.0, 1.0);
        let mut total = 0.0;
        for (w, &l) in self.weights.iter_mut().zip(&self.levels) {
            *w *= (-self.eta * pinball(beta, l, self.alpha)).exp();
            total += *w;
        }
        let k = GAMMAS.len() as f64;
        for w in &mut self.weights {
            // Mixing in a share of the uniform weights lets a γ that was poor come back
            // when the series changes (what makes the guarantee hold on every stretch).
            *w = if total > 0.0 && total.is_finite() {
                (1.0 - self.sigma) * *w / total + self.sigma / k
            } else {
                1.0 / k
            };
        }
        for (l, g) in self.levels.iter_mut().zip(GAMMAS) {
            let miss = if *l > beta { 1.0 } else { 0.0 };
            *l += g * (self.alpha - miss);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift generator: reproducible noise without a dependency.
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Miss rate of the level DtACI gives when the needed level is drawn by `beta`.
    fn miss_rate(alpha: f64, n: usize, mut beta: impl FnMut(usize) -> f64) -> f64 {
        let mut d = DtAci::new(alpha);
        let mut misses = 0;
        for t in 0..n {
            let b = beta(t);
            if d.level() > b {
                misses += 1;
            }
            d.update(b);
        }
        misses as f64 / n as f64
    }

    #[test]
    fn a_calibrated_series_keeps_its_nominal_miss_rate() {
        // β uniform: the nominal level is exactly right; DtACI must not drift off it.
        let mut rng = Rng(7);
        let rate = miss_rate(0.1, 5000, |_| rng.uniform());
        assert!((rate - 0.1).abs() < 0.02, "miss rate {rate}");
    }

    #[test]
    fn a_miscalibrated_series_is_brought_to_nominal() {
        // The errors are wider than the quantiles assume: the nominal level misses 32 % of
        // the time (β = u² is below 0.1 with probability 0.32); DtACI ends near 10 %.
        let mut rng = Rng(11);
        let rate = miss_rate(0.1, 2000, |_| rng.uniform().powi(2));
        assert!((rate - 0.1).abs() < 0.03, "miss rate {rate}");
    }

    #[test]
    fn it_adapts_faster_than_the_slowest_step_size() {
        // A shift after 100 outcomes, scored on the 400 after it: the γ = 0.001 level takes
        // about a hundred misses to get down to where it must be; DtACI follows the faster ones.
        let shifted = |rng: &mut Rng, t: usize| {
            if t < 100 {
                rng.uniform()
            } else {
                rng.uniform().powi(2)
            }
        };
        let mut rng = Rng(3);
        let mut d = DtAci::new(0.1);
        let mut slow = 0.1_f64;
        let (mut misses, mut slow_misses) = (0, 0);
        for t in 0..500 {
            let b = shifted(&mut rng, t);
            if t >= 100 {
                misses += usize::from(d.level() > b);
                slow_misses += usize::from(slow > b);
            }
            d.update(b);
            slow += GAMMAS[0] * (0.1 - if slow > b { 1.0 } else { 0.0 });
        }
        assert!(
            misses * 3 < slow_misses * 2,
            "dtaci {misses} vs slow aci {slow_misses}"
        );
        assert!(misses < 60, "{misses} misses of 400");
    }

    #[test]
    fn levels_stay_in_range_and_bad_input_is_ignored() {
        let mut d = DtAci::new(0.1);
        for _ in 0..1000 {
            d.update(0.0);
        }
        assert!((-GAMMAS[7]..=1.0).contains(&d.level()), "{}", d.level());
        let before = d.clone();
        d.update(f64::NAN);
        assert_eq!(d, before);
    }
}
