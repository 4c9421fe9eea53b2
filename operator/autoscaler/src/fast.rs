//! The fast path: between the slow path's Prometheus-driven steps, the workers' own queue
//! depth, read every second or two, scales a target up when a backlog is sustained.
//!
//! A backlog that lasts a whole window means the replicas are saturated, so they serve what
//! they can (the capacity saturation taught, [`Capacity::ceiling`]) and the arrivals are that
//! plus the backlog's growth: `λ ≈ ready × ceiling + d(waiting)/dt`. The fast path sizes for
//! `λ` at the target capacity ([`Capacity::effective`]), as the slow path would once its rate
//! window caught up — only up, never down (the slow path decides scale-down, and the
//! forecast keeps setting the floor). A backlog that is draining (negative growth) lowers
//! the estimate, so replicas already added are not added again while the queue empties.
//!
//! A burst shorter than a replica's start-up is over before the replicas ordered for it are
//! ready: the excess over what the ready replicas serve (growth and drain) is scaled by how
//! much of a deviation from the recent mean lasts one horizon on this series (`lasting`, the
//! slow path's persistence `beta`; 1 while unmeasured), as the slow path scales its level.
//!
//! On top of that, like the slow path's backlog term, replicas that drain the backlog within
//! a horizon (the replicas' ready time): the backlog then will be today's plus its growth
//! until they are ready. Only the arrivals' part is remembered by the scale-down window; the
//! drain part lasts while a queue does (the slow path holds while one is queued).

use std::collections::VecDeque;

use super::capacity::{Capacity, replicas_for};
use super::types::{Behavior, Bounds};

/// How often the workers are read and over how long a backlog must last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastPathConfig {
    pub interval_s: f64,
    /// A backlog must be seen at every reading of this many seconds (Knative's panic window
    /// is 6 s: long enough that one slow batch is not a backlog, short against a 60 s cold
    /// start).
    pub window_s: f64,
}

impl Default for FastPathConfig {
    fn default() -> Self {
        FastPathConfig {
            interval_s: 2.0,
            window_s: 6.0,
        }
    }
}

/// One reading of a target's workers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkerLoad {
    pub time_s: f64,
    /// Requests accepted but not yet running, summed over the ready replicas.
    pub waiting: f64,
    pub ready: u32,
    /// Replicas asked for (ready + starting).
    pub desired: u32,
}

/// Readings of one target within the window.
#[derive(Clone, Debug, Default)]
pub struct FastPath {
    readings: VecDeque<WorkerLoad>,
}

/// A scale-up the fast path asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct FastScale {
    /// What to scale to: the arrivals and the drain.
    pub replicas: u32,
    /// What the arrivals alone need (the scale-down window remembers this).
    pub steady: u32,
    pub arrivals_rps: f64,
    pub reason: String,
}

/// Saturated as the capacity estimate counts it: at least one request waiting per two ready
/// replicas (and at least one).
fn saturated(r: &WorkerLoad) -> bool {
    r.ready > 0 && r.waiting.is_finite() && r.waiting >= (0.5 * f64::from(r.ready)).max(1.0)
}

impl FastPath {
    /// Records a reading (out-of-order or non-finite ones are ignored).
    pub fn observe(&mut self, r: WorkerLoad, cfg: &FastPathConfig) {
        if !r.time_s.is_finite() || self.readings.back().is_some_and(|b| b.time_s >= r.time_s) {
            return;
        }
        self.readings.push_back(r);
        let keep = cfg.window_s.max(cfg.interval_s) + 1e-9;
        while self
            .readings
            .front()
            .is_some_and(|f| r.time_s - f.time_s > keep)
        {
            self.readings.pop_front();
        }
    }

    /// The scale-up a sustained backlog asks for, if any: more than the replicas desired now,
    /// within the bounds and the scale-up step limit.
    pub fn recommend(
        &self,
        cfg: &FastPathConfig,
        capacity: &Capacity,
        horizon_s: f64,
        lasting: impl FnOnce() -> f64,
        behavior: &Behavior,
        bounds: Bounds,
    ) -> Option<FastScale> {
        let (first, last) = (self.readings.front()?, self.readings.back()?);
        let span = last.time_s - first.time_s;
        // The readings must cover the window (each stands for the interval before it).
        if span + cfg.interval_s + 1e-9 < cfg.window_s || !self.readings.iter().all(saturated) {
            return None;
        }
        let growth = if span > 0.0 {
            (last.waiting - first.waiting) / span
        } else {
            0.0
        };
        // Measured only once a backlog is sustained (it reads the series' history).
        let lasting = lasting();
        let lasting = if lasting.is_finite() {
            lasting.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let served = f64::from(last.ready) * capacity.ceiling();
        let arrivals = served + growth;
        let horizon = if horizon_s.is_finite() {
            horizon_s.max(cfg.window_s)
        } else {
            cfg.window_s
        };
        let drain = (last.waiting + growth.max(0.0) * horizon) / horizon;
        let limit = |r: u32| {
            let r = if behavior.up_max_step > 0 {
                r.min(last.desired.saturating_add(behavior.up_max_step))
            } else {
                r
            };
            r.min(bounds.max.max(bounds.min))
        };
        let steady = limit(replicas_for(
            served + lasting * growth,
            capacity.effective(),
        ));
        let replicas = limit(replicas_for(
            served + lasting * (growth + drain),
            capacity.effective(),
        ));
        (replicas > last.desired).then(|| FastScale {
            replicas,
            steady,
            arrivals_rps: arrivals,
            reason: format!(
                "fast path: {:.0} requests waiting on {} ready replicas for {:.0} s, \
                 {growth:+.1}/s: arrivals ~{arrivals:.1} rps + {drain:.1} rps to drain within \
                 {horizon:.0} s ({:.0} % of the excess lasting) / {:.1} rps per replica = {replicas}",
                last.waiting,
                last.ready,
                span,
                lasting * 100.0,
                capacity.effective()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: FastPathConfig = FastPathConfig {
        interval_s: 2.0,
        window_s: 6.0,
    };
    const BEHAVIOR: Behavior = Behavior {
        up_window_s: 0.0,
        up_max_step: 0,
        down_window_s: 300.0,
        down_max_step: 0,
    };
    const BOUNDS: Bounds = Bounds { min: 1, max: 20 };

    fn feed(readings: &[(f64, f64, u32, u32)]) -> FastPath {
        let mut f = FastPath::default();
        for &(t, waiting, ready, desired) in readings {
            f.observe(
                WorkerLoad {
                    time_s: t,
                    waiting,
                    ready,
                    desired,
                },
                &CFG,
            );
        }
        f
    }

    #[test]
    fn a_growing_backlog_sizes_for_the_arrivals_it_reveals() {
        // 4 replicas of 10 rps (target and ceiling), backlog growing 10/s: ~50 rps arrive.
        let cap = Capacity::new(10.0);
        let f = feed(&[
            (0.0, 4.0, 4, 4),
            (2.0, 24.0, 4, 4),
            (4.0, 44.0, 4, 4),
            (6.0, 64.0, 4, 4),
        ]);
        let s = f
            .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
            .unwrap();
        assert!((s.arrivals_rps - 50.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.steady, 5, "{}", s.reason);
        // Draining 64 + 10/s × 60 s within 60 s: 11.1 rps more.
        assert_eq!(s.replicas, 7, "{}", s.reason);
        assert!(s.reason.starts_with("fast path: 64 requests waiting on 4"));
        // The step limit and the bound hold it back.
        let limited = Behavior {
            up_max_step: 0,
            ..BEHAVIOR
        };
        assert_eq!(
            f.recommend(
                &CFG,
                &cap,
                60.0,
                || 1.0,
                &limited,
                Bounds { min: 1, max: 4 }
            ),
            None
        );
    }

    #[test]
    fn a_series_whose_bursts_do_not_last_orders_only_what_lasts() {
        // The same growing backlog on a series where a tenth of a deviation lasts a horizon.
        let cap = Capacity::new(10.0);
        let f = feed(&[
            (0.0, 4.0, 4, 4),
            (2.0, 24.0, 4, 4),
            (4.0, 44.0, 4, 4),
            (6.0, 64.0, 4, 4),
        ]);
        let s = f
            .recommend(&CFG, &cap, 60.0, || 0.1, &BEHAVIOR, BOUNDS)
            .unwrap();
        // 40 + 0.1 × (10 + 11.1) rps.
        assert_eq!((s.steady, s.replicas), (5, 5), "{}", s.reason);
        assert!(
            f.recommend(&CFG, &cap, 60.0, || 0.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
    }

    #[test]
    fn no_scale_without_a_backlog_that_lasts_the_window() {
        let cap = Capacity::new(10.0);
        // Too short: two readings stand for 4 s.
        let short = feed(&[(0.0, 40.0, 4, 4), (2.0, 60.0, 4, 4)]);
        assert!(
            short
                .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
        // One reading without a backlog inside the window.
        let gap = feed(&[
            (0.0, 40.0, 4, 4),
            (2.0, 0.0, 4, 4),
            (4.0, 80.0, 4, 4),
            (6.0, 100.0, 4, 4),
        ]);
        assert!(
            gap.recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
        // No ready replica: nothing to measure (the slow path starts from zero).
        let none = feed(&[
            (0.0, 9.0, 0, 1),
            (2.0, 9.0, 0, 1),
            (4.0, 9.0, 0, 1),
            (6.0, 9.0, 0, 1),
        ]);
        assert!(
            none.recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
        // Old readings leave the window.
        let later = feed(&[
            (0.0, 40.0, 4, 4),
            (2.0, 60.0, 4, 4),
            (4.0, 80.0, 4, 4),
            (20.0, 100.0, 4, 4),
        ]);
        assert!(
            later
                .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
    }

    #[test]
    fn a_standing_backlog_gets_one_more_and_replicas_on_their_way_count() {
        let cap = Capacity::new(10.0);
        // A standing backlog (no growth) on 4 saturated replicas: the arrivals need the 4,
        // draining the 8 within the horizon needs one more.
        let standing = feed(&[
            (0.0, 8.0, 4, 4),
            (2.0, 8.0, 4, 4),
            (4.0, 8.0, 4, 4),
            (6.0, 8.0, 4, 4),
        ]);
        let s = standing
            .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
            .unwrap();
        assert_eq!((s.steady, s.replicas), (4, 5), "{}", s.reason);
        // Growing 30/s on 4 ready: 70 rps + (190 + 30 × 60) / 60 to drain = 11 replicas; with
        // 11 already on their way nothing more is asked for.
        let growing = |desired| {
            feed(&[
                (0.0, 10.0, 4, desired),
                (2.0, 70.0, 4, desired),
                (4.0, 130.0, 4, desired),
                (6.0, 190.0, 4, desired),
            ])
        };
        let s = growing(8)
            .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
            .unwrap();
        assert_eq!((s.steady, s.replicas), (7, 11), "{}", s.reason);
        assert!(
            growing(11)
                .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
        // A draining backlog on more replicas lowers the estimate below what runs.
        let draining = feed(&[
            (0.0, 90.0, 8, 8),
            (2.0, 70.0, 8, 8),
            (4.0, 50.0, 8, 8),
            (6.0, 30.0, 8, 8),
        ]);
        assert!(
            draining
                .recommend(&CFG, &cap, 60.0, || 1.0, &BEHAVIOR, BOUNDS)
                .is_none()
        );
    }
}
