//! Headroom for queueing within the TTFT objective.
//!
//! Why: a forecast sized on the mean rate of a sync interval says nothing about the seconds
//! inside it. Arrivals come in clumps; a fleet running at 80 % of its capacity still queues, and
//! the TTFT objective leaves only `SLO - base TTFT` (the prefill a request needs with no queue)
//! for waiting. Where that budget is short (long prompts: a 0.9 s prefill under a 2 s SLO) a
//! utilisation target that is fine for short prompts misses the SLO on every clump.
//!
//! Model: the queue of a fleet serving `capacity` requests/s, fed at `rate` with the arrival
//! count's variance growing by `variance` per second (`rate` for Poisson arrivals; bursty
//! traffic measures far more), in the Brownian (heavy-traffic) approximation:
//! `P(queue > x) ~ exp(-2 (capacity - rate) x / variance)`. A request waits longer than `budget`
//! when the queue holds more than `capacity * budget`; asking that to happen to at most a
//! fraction `miss` of the time gives
//! `capacity * (capacity - rate) >= variance * ln(1 / miss) / (2 budget)`.
//! The variance is measured over the last few minutes, so while bursts keep coming it holds a
//! reserve even between them, and the reserve goes once they stop.

use std::collections::VecDeque;

use super::capacity::replicas_for;

/// Samples the arrival variance is measured over (the most recent ones).
pub const VARIANCE_SAMPLES: usize = 20;
/// p95 TTFT samples kept; their lowest is the TTFT with no queue (what the wait budget is
/// left from).
const TTFT_SAMPLES_KEPT: usize = 20;
/// The TTFT objective is a p95: waits may exceed its budget 5 % of the time.
const SLO_QUANTILE: f64 = 0.95;

/// Replicas that keep queueing within the TTFT objective, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Headroom {
    pub replicas: u32,
    /// Seconds of the TTFT objective left for waiting.
    pub budget_s: f64,
    /// Arrival variance over rate (1 = Poisson).
    pub dispersion: f64,
}

impl Headroom {
    /// What a decision's reason says of it (always, so the floor shows even when the
    /// forecast asks for more).
    pub fn note(&self) -> String {
        format!(
            "; queueing within the TTFT SLO needs {} ({:.2} s of it left for waiting, arrival dispersion {:.1})",
            self.replicas, self.budget_s, self.dispersion
        )
    }
}

/// One target's recent p95 TTFT samples, for the wait budget.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WaitBudget {
    ttft: VecDeque<f64>,
}

impl WaitBudget {
    /// Records one interval's p95 TTFT (missing or non-finite ones are skipped).
    pub fn observe(&mut self, ttft_p95_s: Option<f64>) {
        if let Some(t) = ttft_p95_s.filter(|t| t.is_finite() && *t >= 0.0) {
            if self.ttft.len() == TTFT_SAMPLES_KEPT {
                self.ttft.pop_front();
            }
            self.ttft.push_back(t);
        }
    }

    /// The replicas of `per_replica` requests/s each that keep waits within what the TTFT
    /// with no queue leaves of `slo_s`, at arrival `rate` with the variance of `recent` rate
    /// samples. `None` without an objective or a TTFT sample, or when the TTFT with no queue
    /// already takes the whole objective (scaling cannot fix that; the SLO factor reacts).
    pub fn headroom(
        &self,
        slo_s: Option<f64>,
        rate: f64,
        recent: &[(f64, f64)],
        per_replica: f64,
    ) -> Option<Headroom> {
        let slo = slo_s.filter(|s| s.is_finite() && *s > 0.0)?;
        let base = self.ttft.iter().copied().min_by(f64::total_cmp)?;
        let budget_s = slo - base;
        if budget_s <= 0.0 || !(per_replica.is_finite() && per_replica > 0.0) {
            return None;
        }
        let variance = arrival_variance(recent).unwrap_or(rate).max(rate);
        let need = slo_capacity(rate, variance, budget_s, 1.0 - SLO_QUANTILE);
        Some(Headroom {
            replicas: replicas_for(need, per_replica),
            budget_s,
            dispersion: if rate > 0.0 { variance / rate } else { 1.0 },
        })
    }
}

/// The capacity (requests/s, all replicas together) that keeps waits over `budget_s` to a
/// fraction `miss` of the time at arrival `rate` whose count grows in variance by `variance`
/// per second (at least `rate`: Poisson); `rate` itself when there is nothing to add.
pub fn slo_capacity(rate: f64, variance: f64, budget_s: f64, miss: f64) -> f64 {
    let ok = |x: f64| x.is_finite() && x > 0.0;
    if !(ok(rate) && ok(budget_s) && ok(miss) && miss < 1.0) {
        return rate.max(0.0);
    }
    let v = if variance.is_finite() {
        variance.max(rate)
    } else {
        rate
    };
    let k = v * (1.0 / miss).ln() / (2.0 * budget_s);
    // The positive root of c^2 - rate c - k = 0.
    0.5 * (rate + (rate * rate + 4.0 * k).sqrt())
}

/// Variance per second of the arrival count (requests^2/s; a Poisson stream's equals its rate)
/// from consecutive rate samples `(time_s, rps)`: half the mean squared difference of
/// neighbours (so a slow trend does not count as noise) times the sample spacing. `None` with
/// fewer than three samples.
pub fn arrival_variance(samples: &[(f64, f64)]) -> Option<f64> {
    if samples.len() < 3 {
        return None;
    }
    let n = samples.len() as f64;
    let dt = (samples[samples.len() - 1].0 - samples[0].0) / (n - 1.0);
    if !(dt.is_finite() && dt > 0.0) {
        return None;
    }
    let msd = samples
        .windows(2)
        .map(|w| (w[1].1 - w[0].1).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let v = 0.5 * msd * dt;
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_wait_budgets_need_more_headroom() {
        // Mooncake-like: 3.9 rps, Poisson, 5 % of the time over the budget.
        let long = slo_capacity(3.9, 3.9, 1.8, 0.05);
        let short = slo_capacity(3.9, 3.9, 1.1, 0.05);
        assert!(long > 3.9 && short > long, "{long} {short}");
        // Below Poisson counts as Poisson.
        assert_eq!(slo_capacity(3.9, 0.0, 1.1, 0.05), short);
        // Burstier arrivals need more again; more load needs relatively less (pooling).
        assert!(slo_capacity(3.9, 39.0, 1.1, 0.05) > short + 1.0);
        let big = slo_capacity(390.0, 390.0, 1.1, 0.05);
        assert!(big / 390.0 < short / 3.9, "{big}");
        // A burst-sized variance keeps a reserve even while the rate is low.
        assert!(slo_capacity(0.5, 300.0, 1.8, 0.05) > 10.0);
    }

    #[test]
    fn the_queue_bound_holds_at_the_returned_capacity() {
        let (rate, v, b, miss) = (5.0, 15.0, 0.8, 0.05);
        let c = slo_capacity(rate, v, b, miss);
        let p = (-2.0 * (c - rate) * c * b / v).exp();
        assert!((p - miss).abs() < 1e-9, "{p}");
    }

    #[test]
    fn the_budget_is_left_from_the_lowest_recent_ttft() {
        let mut w = WaitBudget::default();
        let steady: Vec<(f64, f64)> = (0..20).map(|i| (f64::from(i) * 15.0, 3.9)).collect();
        assert_eq!(
            w.headroom(Some(2.0), 3.9, &steady, 0.8),
            None,
            "no TTFT yet"
        );
        for t in [1.4, 0.9, f64::NAN, 1.1] {
            w.observe(Some(t));
        }
        w.observe(None);
        let h = w.headroom(Some(2.0), 3.9, &steady, 0.8).unwrap();
        assert!((h.budget_s - 1.1).abs() < 1e-9, "{h:?}");
        // 3.9 rps needs 5 replicas of 0.8; waits within 1.1 s at 95 % need two more.
        assert_eq!(h.replicas, 7, "{h:?}");
        assert_eq!(h.dispersion, 1.0);
        assert!(
            h.note().contains("needs 7 (1.10 s of it left for waiting"),
            "{}",
            h.note()
        );
        assert_eq!(w.headroom(None, 3.9, &steady, 0.8), None, "no objective");
        assert_eq!(
            w.headroom(Some(0.8), 3.9, &steady, 0.8),
            None,
            "no budget left"
        );
    }

    #[test]
    fn degenerate_inputs_add_nothing() {
        assert_eq!(slo_capacity(4.0, 4.0, 0.0, 0.05), 4.0);
        assert_eq!(slo_capacity(4.0, 4.0, -1.0, 0.05), 4.0);
        assert_eq!(slo_capacity(0.0, 4.0, 1.0, 0.05), 0.0);
        assert_eq!(slo_capacity(f64::NAN, 4.0, 1.0, 0.05), 0.0);
        assert_eq!(slo_capacity(4.0, 4.0, 1.0, 1.0), 4.0);
    }

    #[test]
    fn variance_of_poisson_counts_is_near_the_rate_and_ignores_a_trend() {
        // Counts over 15 s of a Poisson(m) process alternating m +- sqrt(m / 2), so neighbours
        // differ by sqrt(2 m) (their variance when independent), on a rising trend.
        let dt = 15.0;
        let pts: Vec<(f64, f64)> = (0..20)
            .map(|i| {
                let mean = 60.0 + 3.0 * f64::from(i);
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                (f64::from(i) * dt, (mean + sign * (0.5 * mean).sqrt()) / dt)
            })
            .collect();
        let rate = pts.iter().map(|p| p.1).sum::<f64>() / 20.0;
        let v = arrival_variance(&pts).unwrap();
        assert!((1.0..1.2).contains(&(v / rate)), "{v} {rate}");
        // Bursts (rate jumping between 0 and 10 rps) are far from Poisson.
        let bursty: Vec<(f64, f64)> = (0..20)
            .map(|i| (f64::from(i) * dt, if i % 3 == 0 { 10.0 } else { 0.0 }))
            .collect();
        assert!(arrival_variance(&bursty).unwrap() > 20.0 * 10.0 / 3.0);
        assert_eq!(arrival_variance(&pts[..2]), None);
        assert_eq!(
            arrival_variance(&[(0.0, 0.0), (15.0, 0.0), (30.0, 0.0)]),
            Some(0.0)
        );
    }
}
