//! HPA-style stabilisation of one target's replica recommendations.
//!
//! Scale up only to the lowest recommendation of the last `up_window_s`, scale down only to the
//! highest of the last `down_window_s`, move at most `*_max_step` per decision (0 = no limit),
//! and stay within the bounds. The decision says what held the recommendation back.

use std::collections::VecDeque;

use super::types::{Behavior, Bounds};

/// The outcome for one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stabilized {
    pub replicas: u32,
    /// What held the recommendation back, if anything.
    pub limited: Option<String>,
}

/// Recommendation history of one target.
#[derive(Clone, Debug, Default)]
pub struct Stabilizer {
    recs: VecDeque<(f64, u32)>,
}

impl Stabilizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers a recommendation acted on outside [`Stabilizer::apply`] (the fast path's
    /// scale-ups), so the scale-down window holds it like its own.
    pub fn remember(&mut self, now_s: f64, replicas: u32) {
        if self.recs.back().is_none_or(|&(t, _)| t <= now_s) {
            self.recs.push_back((now_s, replicas));
        }
    }

    /// Applies bounds, windows and step limits to `recommended` given the `current` desired.
    pub fn apply(
        &mut self,
        now_s: f64,
        recommended: u32,
        current: u32,
        behavior: &Behavior,
        bounds: Bounds,
    ) -> Stabilized {
        let (lo, hi) = (bounds.min, bounds.max.max(bounds.min));
        let mut why: Vec<String> = Vec::new();
        let bounded = recommended.clamp(lo, hi);
        if bounded != recommended {
            let which = if recommended > hi { "max" } else { "min" };
            why.push(format!(
                "{which} bound {bounded} (recommended {recommended})"
            ));
        }

        let keep = behavior.up_window_s.max(behavior.down_window_s).max(0.0);
        while let Some(&(t, _)) = self.recs.front() {
            if now_s - t > keep || t > now_s {
                self.recs.pop_front();
            } else {
                break;
            }
        }
        self.recs.push_back((now_s, bounded));
        let in_window = |w: f64| {
            let w = if w.is_finite() { w.max(0.0) } else { 0.0 };
            self.recs
                .iter()
                .filter(move |&&(t, _)| now_s - t <= w + 1e-9)
                .map(|&(_, r)| r)
        };
        let up_floor = in_window(behavior.up_window_s).min().unwrap_or(bounded);
        let down_ceiling = in_window(behavior.down_window_s).max().unwrap_or(bounded);

        let mut target = if current < up_floor {
            up_floor
        } else if current > down_ceiling {
            down_ceiling
        } else {
            current
        };
        if bounded > target && target >= current {
            why.push(format!(
                "up window {:.0} s: lowest recommendation {up_floor}",
                behavior.up_window_s
            ));
        } else if bounded < target && target <= current {
            why.push(format!(
                "down window {:.0} s: highest recommendation {down_ceiling}",
                behavior.down_window_s
            ));
        }

        if target > current && behavior.up_max_step > 0 {
            let cap = current.saturating_add(behavior.up_max_step);
            if target > cap {
                why.push(format!("up step limit {}", behavior.up_max_step));
                target = cap;
            }
        }
        if target < current && behavior.down_max_step > 0 {
            let floor = current.saturating_sub(behavior.down_max_step);
            if target < floor {
                why.push(format!("down step limit {}", behavior.down_max_step));
                target = floor;
            }
        }
        let replicas = target.clamp(lo, hi);
        Stabilized {
            replicas,
            limited: if why.is_empty() {
                None
            } else {
                Some(why.join("; "))
            },
        }
    }

    /// [`Stabilizer::apply`] for the `steady` recommendation (from the demand forecast), plus
    /// a transient one while a backlog is queued (`backlog`: the replicas that drain it).
    /// The backlog's replicas are not remembered by the scale-down window: they exist to drain
    /// a queue, and once it is drained, holding them for a whole window buys nothing (the
    /// window guards against noisy demand, which the steady recommendation carries). While a
    /// backlog is queued nothing scales down.
    pub fn apply_with_backlog(
        &mut self,
        now_s: f64,
        steady: u32,
        backlog: Option<u32>,
        current: u32,
        behavior: &Behavior,
        bounds: Bounds,
    ) -> Stabilized {
        let mut s = self.apply(now_s, steady, current, behavior, bounds);
        let Some(drain) = backlog else {
            return s;
        };
        let hi = bounds.max.max(bounds.min);
        let mut want = drain.min(hi).max(current.min(hi));
        if want > current && behavior.up_max_step > 0 {
            want = want.min(current.saturating_add(behavior.up_max_step));
        }
        if want > s.replicas {
            s.replicas = want;
            s.limited =
                (want < drain.min(hi)).then(|| format!("up step limit {}", behavior.up_max_step));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behavior(down_window_s: f64, up_step: u32, down_step: u32) -> Behavior {
        Behavior {
            up_window_s: 0.0,
            up_max_step: up_step,
            down_window_s,
            down_max_step: down_step,
        }
    }

    const B: Bounds = Bounds { min: 1, max: 20 };

    #[test]
    fn spike_then_drop_waits_for_the_down_window() {
        let b = behavior(300.0, 0, 0);
        let mut s = Stabilizer::new();
        let mut cur = 2;
        let mut t = 0.0;
        // Spike: scale up at once.
        let d = s.apply(t, 10, cur, &b, B);
        assert_eq!(d.replicas, 10);
        assert_eq!(d.limited, None);
        cur = d.replicas;
        // Drop: held at 10 for the whole window.
        while t < 300.0 {
            t += 15.0;
            let d = s.apply(t, 2, cur, &b, B);
            if t < 300.0 {
                assert_eq!(d.replicas, 10, "scaled down at {t} s");
                assert!(d.limited.as_deref().unwrap().contains("down window"));
            }
            cur = d.replicas;
        }
        let d = s.apply(t + 15.0, 2, cur, &b, B);
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn backlog_replicas_are_not_remembered_by_the_down_window() {
        let b = behavior(300.0, 4, 0);
        let mut s = Stabilizer::new();
        assert_eq!(s.apply_with_backlog(0.0, 5, None, 5, &b, B).replicas, 5);
        // A backlog wants 12: up at most 4 per decision, and it says so.
        let r = s.apply_with_backlog(15.0, 5, Some(12), 5, &b, B);
        assert_eq!(r.replicas, 9);
        assert_eq!(r.limited.as_deref(), Some("up step limit 4"));
        // While the backlog is queued nothing scales down, even if fewer would drain it.
        let r = s.apply_with_backlog(30.0, 5, Some(7), 9, &b, B);
        assert_eq!(r.replicas, 9);
        // Drained: straight back to the highest demand recommendation in the window (6).
        assert_eq!(s.apply_with_backlog(45.0, 6, None, 9, &b, B).replicas, 6);
        assert_eq!(s.apply_with_backlog(60.0, 4, None, 6, &b, B).replicas, 6);
        // Bounds still apply to a backlog.
        assert_eq!(
            s.apply_with_backlog(75.0, 4, Some(50), 19, &b, B).replicas,
            20
        );
    }

    #[test]
    fn step_limits_and_bounds() {
        let b = behavior(0.0, 3, 2);
        let mut s = Stabilizer::new();
        let d = s.apply(0.0, 15, 4, &b, B);
        assert_eq!(d.replicas, 7);
        assert!(d.limited.unwrap().contains("up step limit 3"));
        let d = s.apply(15.0, 1, 7, &b, B);
        assert_eq!(d.replicas, 5);
        assert!(d.limited.unwrap().contains("down step limit 2"));
        let d = s.apply(30.0, 50, 20, &b, B);
        assert_eq!(d.replicas, 20);
        assert!(d.limited.unwrap().contains("max bound 20"));
        let d = s.apply(45.0, 0, 1, &b, B);
        assert_eq!(d.replicas, 1);
        assert!(d.limited.unwrap().contains("min bound 1"));
        // Below the minimum (e.g. a fresh target): straight to the bound, whatever the step.
        let d = s.apply(60.0, 1, 0, &b, Bounds { min: 6, max: 20 });
        assert_eq!(d.replicas, 6);
    }

    #[test]
    fn up_window_takes_the_lowest_recent_recommendation() {
        let b = Behavior {
            up_window_s: 60.0,
            up_max_step: 0,
            down_window_s: 0.0,
            down_max_step: 0,
        };
        let mut s = Stabilizer::new();
        assert_eq!(s.apply(0.0, 3, 3, &b, B).replicas, 3);
        let d = s.apply(15.0, 9, 3, &b, B);
        assert_eq!(d.replicas, 3);
        assert!(d.limited.unwrap().contains("up window"));
        assert_eq!(s.apply(30.0, 9, 3, &b, B).replicas, 3);
        assert_eq!(s.apply(75.0, 9, 3, &b, B).replicas, 9);
    }
}
