//! The demand level now, and how much of it is still there one horizon later.
//!
//! Why: replicas asked for now serve from one horizon (their ready time) on. Traffic that comes
//! in bursts shorter than that (Azure code: 10-30 s bursts of 30-60 requests/s between quiet
//! stretches, under a 60 s cold start) is over by then, and replicas ordered for a burst only
//! cost; a step, a ramp or a daily rise lasts, and they are needed. Which of the two a series
//! does is measured on its own history: `beta`, the least-squares coefficient of "the sample one
//! horizon later minus the recent mean" on "the smoothed level minus the recent mean", clamped
//! to [0, 1]. `mean + beta * (level - mean)` is then the best predictor of that form of the
//! demand at the horizon: bursts (and the noise the smoothing leaves) give a small `beta`,
//! lasting changes one near 1.

/// Time constant of the level EWMA (seconds).
pub const LEVEL_TAU_S: f64 = 30.0;
/// Samples the recent mean is taken over: 5 minutes at the 15 s interval, the window the
/// arrival variance is measured over too (`queueing::VARIANCE_SAMPLES`).
pub const MEAN_SAMPLES: usize = 20;
/// (level, later sample) pairs needed before `beta` is trusted.
const MIN_PAIRS: usize = 12;

/// The level after a sample `value` that came `dt_s` after the previous one.
pub fn smooth(level: f64, value: f64, dt_s: f64) -> f64 {
    let a = (1.0 - (-dt_s / LEVEL_TAU_S).exp()).clamp(0.3, 1.0);
    level + a * (value - level)
}

/// How much of the level's deviation from the recent mean lasts one horizon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Persistence {
    /// Mean of the last [`MEAN_SAMPLES`] samples.
    pub mean: f64,
    /// Fraction of a deviation from that mean still there one horizon later, in [0, 1].
    pub beta: f64,
}

impl Persistence {
    /// Measures it on `samples` `(time_s, value)`, oldest first and evenly spaced, for a horizon
    /// of `lag` samples. `None` while the history is too short, or when the level never left
    /// the mean (nothing to measure).
    pub fn measure(samples: &[(f64, f64)], lag: usize) -> Option<Persistence> {
        let lag = lag.max(1);
        let n = samples.len();
        if n < MEAN_SAMPLES + lag + MIN_PAIRS - 1 {
            return None;
        }
        let mut level = samples[0].1;
        let mut sum = 0.0;
        let (mut cross, mut square, mut pairs) = (0.0, 0.0, 0usize);
        for i in 0..n {
            if i > 0 {
                level = smooth(level, samples[i].1, samples[i].0 - samples[i - 1].0);
            }
            sum += samples[i].1;
            if i >= MEAN_SAMPLES {
                sum -= samples[i - MEAN_SAMPLES].1;
            }
            if i + 1 < MEAN_SAMPLES || i + lag >= n {
                continue;
            }
            let mean = sum / MEAN_SAMPLES as f64;
            let now = level - mean;
            cross += now * (samples[i + lag].1 - mean);
            square += now * now;
            pairs += 1;
        }
        let mean =
            samples[n - MEAN_SAMPLES..].iter().map(|s| s.1).sum::<f64>() / MEAN_SAMPLES as f64;
        let beta = cross / square;
        (pairs >= MIN_PAIRS && square > 1e-12 && beta.is_finite() && mean.is_finite()).then(|| {
            Persistence {
                mean,
                beta: beta.clamp(0.0, 1.0),
            }
        })
    }

    /// What of `value` (the level now, or a value projected from it) to expect one horizon on.
    pub fn anchor(&self, value: f64) -> f64 {
        self.mean + self.beta * (value - self.mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(usize) -> f64, n: usize) -> Vec<(f64, f64)> {
        (0..n).map(|i| (15.0 * i as f64, f(i))).collect()
    }

    #[test]
    fn bursts_shorter_than_the_horizon_do_not_last() {
        // 2 rps with a 30 s burst of 40 rps every 3 minutes; horizon 75 s (5 samples).
        let s = series(|i| if i % 12 < 2 { 40.0 } else { 2.0 }, 240);
        let p = Persistence::measure(&s, 5).unwrap();
        assert!(p.beta < 0.2, "{p:?}");
        // Right after a burst, the demand to expect at the horizon is near the mean.
        let burst = 40.0;
        assert!(p.anchor(burst) < 0.5 * burst, "{p:?}");
    }

    #[test]
    fn steps_that_outlast_the_horizon_last() {
        // Levels that change every 20 minutes (80 samples); horizon 75 s.
        let s = series(|i| [5.0, 30.0, 12.0][(i / 80) % 3], 480);
        let p = Persistence::measure(&s, 5).unwrap();
        assert!(p.beta > 0.8, "{p:?}");
    }

    #[test]
    fn nothing_to_measure_without_history_or_variation() {
        assert_eq!(Persistence::measure(&series(|_| 7.0, 240), 5), None);
        let short = series(|i| (i % 3) as f64, MEAN_SAMPLES + 5 + MIN_PAIRS - 2);
        assert_eq!(Persistence::measure(&short, 5), None);
    }

    #[test]
    fn anchor_moves_towards_the_mean_by_one_minus_beta() {
        let p = Persistence {
            mean: 10.0,
            beta: 0.25,
        };
        assert!((p.anchor(30.0) - 15.0).abs() < 1e-12);
        assert!((p.anchor(10.0) - 10.0).abs() < 1e-12);
    }
}
