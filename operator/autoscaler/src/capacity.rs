//! Capacity per replica: the configured prior (a target at the configured utilisation), lowered
//! when observed throughput at saturation shows the replicas cannot sustain it, times a feedback
//! factor that drops when the measured latency breaches the SLO — but only when the breach is
//! the load's doing: latency that stays above the SLO at light load (long prompts, a slow
//! model) is not bought down by more replicas, so such breaches hold the factor.

use super::types::{Slo, TierSample};

/// Replicas needed to carry `rps` at `per_replica` each (0 for nothing or nonsense).
pub fn replicas_for(rps: f64, per_replica: f64) -> u32 {
    if !rps.is_finite() || rps <= 0.0 || !per_replica.is_finite() || per_replica <= 0.0 {
        return 0;
    }
    (rps / per_replica - 1e-9)
        .ceil()
        .clamp(0.0, f64::from(u32::MAX)) as u32
}

/// Learned capacity stays within these multiples of the prior.
const LEARN_MIN: f64 = 0.25;
const LEARN_MAX: f64 = 4.0;
/// EWMA weight of one saturated-throughput sample.
const LEARN_ALPHA: f64 = 0.2;
/// Multiplicative decrease of the SLO factor on a breach, and its floor.
const BREACH_DECREASE: f64 = 0.85;
const FACTOR_MIN: f64 = 0.25;
/// Multiplicative recovery per step while comfortably under the SLO.
const RECOVERY: f64 = 1.02;
/// "Comfortably under": the worst latency / SLO ratio is below this.
const RECOVERY_BELOW: f64 = 0.8;
/// "Light load": arrivals at most this share of what the ready replicas carry at the target.
/// At half the target utilisation queueing adds little, so the latency measured there is the
/// part of it that does not depend on the load (the floor).
const LIGHT_LOAD: f64 = 0.5;
/// Served above this multiple of the arrivals: a backlog from before is being drained.
const DRAINING_ABOVE: f64 = 1.1;
/// EWMA weight of one light-load latency sample.
const FLOOR_ALPHA: f64 = 0.2;
/// A breach is the load's doing only when the latency is this much above the light-load floor:
/// the queueing a target utilisation adds (about a quarter of the service time at 80 %, for
/// batching replicas) must show before more replicas can be expected to help.
const FLOOR_MARGIN: f64 = 1.25;
/// Decreases remembered for taking back: enough to reach the floor from 1.0 (0.85^9 < 0.25).
const DECREASES_KEPT: usize = 9;

/// Online estimate of the load one replica sustains within the SLO.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    prior: f64,
    learned: f64,
    slo_factor: f64,
    /// Ready replicas at the previous sample (the window may have straddled a change).
    last_ready: u32,
    /// Saturated samples seen.
    pub saturated_samples: u64,
    /// Steps that lowered the SLO factor.
    pub breaches: u64,
    /// Latency / SLO ratio at light load (EWMA), once seen.
    floor_ratio: Option<f64>,
    /// Breaches not counted against capacity because the light-load floor explains them.
    pub floor_breaches: u64,
    /// Latency / SLO ratios of the decreases still in the factor, oldest first.
    decreases: Vec<f64>,
}

impl Capacity {
    pub fn new(prior: f64) -> Self {
        let prior = if prior.is_finite() && prior > 0.0 {
            prior
        } else {
            1.0
        };
        Capacity {
            prior,
            learned: prior,
            slo_factor: 1.0,
            last_ready: 0,
            saturated_samples: 0,
            breaches: 0,
            floor_ratio: None,
            floor_breaches: 0,
            decreases: Vec::new(),
        }
    }

    pub fn prior(&self) -> f64 {
        self.prior
    }

    /// Throughput one replica sustains, learned from saturation (before the SLO factor).
    pub fn learned(&self) -> f64 {
        self.learned
    }

    pub fn slo_factor(&self) -> f64 {
        self.slo_factor
    }

    /// Latency / SLO ratio measured at light load (the part no replica count lowers), once seen.
    pub fn floor_ratio(&self) -> Option<f64> {
        self.floor_ratio
    }

    /// What the decision divides demand by: the prior target, lowered (never raised) by what
    /// saturation showed, times the SLO factor.
    ///
    /// The prior is a target *at a utilisation* (headroom below the replica's real capacity),
    /// while saturation measures the real capacity itself: sizing with a saturated throughput
    /// above the prior would run every replica at 100 % and give the headroom away. So learning
    /// may only lower the target, when a replica saturates below it.
    pub fn effective(&self) -> f64 {
        (self.learned.min(self.prior) * self.slo_factor).max(self.prior * LEARN_MIN * FACTOR_MIN)
    }

    /// Throughput one replica really sustains (learned at saturation, at least the target),
    /// times the SLO factor: what the tail of the demand forecast may use, while the expected
    /// demand is sized with [`Capacity::effective`] and keeps the utilisation headroom.
    pub fn ceiling(&self) -> f64 {
        (self.learned.max(self.prior) * self.slo_factor).max(self.effective())
    }

    /// Learns from one interval's sample with `ready` replicas serving it. `bursts_explain`
    /// says the arrivals were too bursty for `ready` replicas to keep queueing within the SLO
    /// (see `queueing`): a breach then says nothing about what one replica serves.
    pub fn observe(&mut self, s: &TierSample, ready: u32, slo: &Slo, bursts_explain: bool) {
        let finite = s.arrival_rps.is_finite() && s.served_rps.is_finite();
        // Over a window in which the replica count changed, divide by the larger count: the
        // estimate errs low (more replicas), never high.
        let ready_f = f64::from(ready.max(self.last_ready));
        let stable = ready == self.last_ready;
        self.last_ready = ready;
        if !finite || ready == 0 {
            return;
        }
        let per_replica = s.served_rps.max(0.0) / ready_f;
        let saturated = s.queue_depth.is_finite() && s.queue_depth >= (0.5 * ready_f).max(1.0);
        let ratio = slo_ratio(s, slo);
        let breach = ratio.is_some_and(|r| r > 1.0);
        if saturated && per_replica > 0.0 {
            // Replicas were busy with work waiting: what they served is what they can serve.
            self.learned += LEARN_ALPHA * (per_replica - self.learned);
            self.saturated_samples += 1;
        } else if stable && !saturated && !breach && per_replica > self.learned {
            // Served more than we thought possible, within the SLO: a lower bound on capacity.
            self.learned += LEARN_ALPHA * (per_replica - self.learned);
        }
        self.learned = self
            .learned
            .clamp(self.prior * LEARN_MIN, self.prior * LEARN_MAX);

        // Light on average, not bursty (bursts queue at any average load; the queueing
        // headroom answers them) and not draining an earlier backlog (served above arrivals:
        // the latencies measured then are of requests that queued before).
        let light = !saturated
            && !bursts_explain
            && s.arrival_rps > 0.0
            && s.served_rps <= s.arrival_rps * DRAINING_ABOVE
            && s.arrival_rps <= LIGHT_LOAD * self.prior * ready_f;
        if let (Some(r), true) = (ratio, light && stable) {
            let f = self.floor_ratio.get_or_insert(r);
            *f += FLOOR_ALPHA * (r - *f);
        }
        // Within the margin of what light load already shows, more replicas buy nothing.
        let floor = self.floor_ratio.unwrap_or(0.0) * FLOOR_MARGIN;
        // Decreases made on breaches the floor now explains were not the load's doing: take
        // them back (the factor would otherwise keep the over-provisioning they caused).
        let before = self.decreases.len();
        self.decreases.retain(|&r| r > floor);
        for _ in self.decreases.len()..before {
            self.slo_factor = (self.slo_factor / BREACH_DECREASE).min(1.0);
        }
        match ratio {
            Some(r) if r > 1.0 && r <= floor => {
                // The SLO is out of the replicas' reach: hold the capacity estimate.
                self.floor_breaches += 1;
                self.slo_factor = (self.slo_factor * RECOVERY).min(1.0);
            }
            Some(r) if r > 1.0 => {
                // A breach only says the capacity estimate is too high when we had provisioned
                // for the load and no backlog is left: arrivals above the capacity we had
                // (under-provisioning) or a queue still draining explain it otherwise.
                let provisioned = self.effective() * ready_f;
                if !saturated && !bursts_explain && s.arrival_rps <= provisioned * 1.05 {
                    self.slo_factor = (self.slo_factor * BREACH_DECREASE).max(FACTOR_MIN);
                    self.breaches += 1;
                    if self.decreases.len() == DECREASES_KEPT {
                        self.decreases.remove(0);
                    }
                    self.decreases.push(r);
                }
            }
            Some(r) if r < RECOVERY_BELOW => {
                self.slo_factor = (self.slo_factor * RECOVERY).min(1.0);
                if self.slo_factor >= 1.0 {
                    self.decreases.clear();
                }
            }
            _ => {}
        }
    }
}

/// Worst measured latency / SLO ratio, `None` when nothing comparable was measured.
pub fn slo_ratio(s: &TierSample, slo: &Slo) -> Option<f64> {
    let pairs = [
        (s.ttft_p95_s, slo.ttft_p95_s),
        (s.tpot_p95_s, slo.tpot_p95_s),
    ];
    pairs
        .iter()
        .filter_map(|&(m, t)| match (m, t) {
            (Some(m), Some(t)) if m.is_finite() && t.is_finite() && t > 0.0 => Some(m / t),
            _ => None,
        })
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo() -> Slo {
        Slo {
            ttft_p95_s: Some(1.0),
            tpot_p95_s: Some(0.1),
        }
    }

    fn sample(arrival: f64, served: f64, queue: f64, ttft: f64) -> TierSample {
        TierSample {
            arrival_rps: arrival,
            served_rps: served,
            queue_depth: queue,
            running: 0.0,
            ttft_p95_s: Some(ttft),
            tpot_p95_s: Some(0.05),
        }
    }

    #[test]
    fn learns_from_saturation_within_bounds() {
        let mut c = Capacity::new(10.0);
        for _ in 0..50 {
            // 4 replicas saturated, serving 24 rps: 6 per replica.
            c.observe(&sample(40.0, 24.0, 20.0, 0.5), 4, &Slo::default(), false);
        }
        assert!((c.learned() - 6.0).abs() < 0.1, "{}", c.learned());
        for _ in 0..100 {
            c.observe(&sample(1.0, 0.1, 20.0, 0.5), 4, &Slo::default(), false);
        }
        assert!(
            (c.learned() - 2.5).abs() < 1e-9,
            "floor 0.25x: {}",
            c.learned()
        );
        // Unsaturated, no queue: low throughput says nothing.
        let before = c.learned();
        c.observe(&sample(1.0, 1.0, 0.0, 0.5), 4, &Slo::default(), false);
        assert_eq!(c.learned(), before);
    }

    #[test]
    fn saturation_above_the_target_keeps_the_headroom() {
        // The prior 8 rps is a target at a utilisation; replicas saturate at 10 rps. Sizing must
        // stay at 8 (the headroom), while the tail may use the real 10.
        let mut c = Capacity::new(8.0);
        for _ in 0..50 {
            c.observe(&sample(60.0, 40.0, 20.0, 0.5), 4, &Slo::default(), false);
        }
        assert!((c.learned() - 10.0).abs() < 0.1, "{}", c.learned());
        assert!((c.effective() - 8.0).abs() < 1e-9, "{}", c.effective());
        assert!((c.ceiling() - c.learned()).abs() < 1e-9, "{}", c.ceiling());
    }

    #[test]
    fn breach_lowers_and_recovery_is_slow() {
        let mut c = Capacity::new(10.0);
        // Provisioned: 30 rps on 4 replicas of 10; still breaching.
        c.observe(&sample(30.0, 30.0, 0.0, 2.0), 4, &slo(), false);
        assert!((c.effective() - 8.5).abs() < 1e-9, "{}", c.effective());
        c.observe(&sample(30.0, 30.0, 0.0, 2.0), 4, &slo(), false);
        let low = c.effective();
        assert!(low < 8.5);
        // Under-provisioned breach (arrivals above capacity), or a backlog still draining:
        // not the estimate's fault.
        c.observe(&sample(100.0, 30.0, 0.0, 2.0), 4, &slo(), false);
        assert_eq!(c.effective(), low);
        let factor = c.slo_factor();
        c.observe(&sample(30.0, 30.0, 50.0, 2.0), 4, &slo(), false);
        assert_eq!(c.slo_factor(), factor);
        // Arrivals too bursty for the replicas there were: not the estimate's fault either.
        c.observe(&sample(30.0, 30.0, 0.0, 2.0), 4, &slo(), true);
        assert_eq!(c.slo_factor(), factor);
        let low = c.effective();
        // Comfortably under the SLO: slow recovery, capped at the learned value.
        c.observe(&sample(10.0, 10.0, 0.0, 0.2), 4, &slo(), false);
        assert!(c.effective() > low && c.effective() < low * 1.05);
        for _ in 0..500 {
            c.observe(&sample(10.0, 10.0, 0.0, 0.2), 4, &slo(), false);
        }
        assert!((c.effective() - c.learned()).abs() < 1e-9 && c.slo_factor() == 1.0);
    }

    #[test]
    fn breaches_that_light_load_shows_too_hold_the_factor() {
        // Long prompts: the TTFT p95 is 1.5x the SLO whatever the load. Provisioned breaches
        // first lower the factor; once light-load samples show the same latency, breaches no
        // longer count and the factor recovers.
        let mut c = Capacity::new(10.0);
        c.observe(&sample(30.0, 30.0, 0.0, 1.5), 4, &slo(), false);
        c.observe(&sample(30.0, 30.0, 0.0, 1.5), 4, &slo(), false);
        assert!(c.slo_factor() < 0.75, "{}", c.slo_factor());
        assert_eq!(c.floor_ratio(), None);
        // Light load (5 rps on 4 replicas of 10: an eighth of the target), still 1.5x.
        for _ in 0..10 {
            c.observe(&sample(5.0, 5.0, 0.0, 1.5), 4, &slo(), false);
        }
        assert!((c.floor_ratio().unwrap() - 1.5).abs() < 1e-9);
        assert!(
            (c.slo_factor() - 1.0).abs() < 1e-9,
            "the two decreases taken back: {}",
            c.slo_factor()
        );
        let held = c.breaches;
        for _ in 0..200 {
            c.observe(&sample(30.0, 30.0, 0.0, 1.6), 4, &slo(), false);
        }
        assert_eq!(
            c.breaches, held,
            "no breach within the floor's margin counts"
        );
        assert_eq!(c.slo_factor(), 1.0);
        // Far above the floor (queueing): the load's doing, counted again.
        c.observe(&sample(30.0, 30.0, 0.0, 3.0), 4, &slo(), false);
        assert_eq!(c.breaches, held + 1);
        assert!(c.slo_factor() < 1.0);
    }

    #[test]
    fn a_floor_under_the_slo_changes_nothing() {
        // Light-load latency well inside the SLO: every provisioned breach counts as before.
        let mut with_floor = Capacity::new(10.0);
        for _ in 0..10 {
            with_floor.observe(&sample(5.0, 5.0, 0.0, 0.3), 4, &slo(), false);
        }
        let mut without = Capacity::new(10.0);
        without.observe(&sample(5.0, 5.0, 0.0, 0.3), 4, &slo(), false);
        for c in [&mut with_floor, &mut without] {
            c.observe(&sample(30.0, 30.0, 0.0, 1.2), 4, &slo(), false);
        }
        assert_eq!(with_floor.slo_factor(), without.slo_factor());
        assert!(with_floor.slo_factor() < 1.0);
    }
}
