//! Baseline autoscalers, re-implemented from their documented algorithms (one target each):
//! Kubernetes HPA, Knative's KPA, and an AIBrix-like reactive scaler with a trend floor.
//! All use the same metric (arrival requests per second), the same target per replica and the
//! same bounds as Tidal.

use std::collections::VecDeque;

use super::cluster::TargetObs;
use super::policy::{Scaler, TargetSpec};

fn clamp(spec: &TargetSpec, n: u32) -> u32 {
    n.clamp(spec.min, spec.max.max(spec.min))
}

fn replicas_for(load_rps: f64, target: f64) -> u32 {
    (load_rps / target - 1e-9).ceil().max(0.0) as u32
}

/// Max over a sliding window of recommendations (HPA's scale-down stabilisation).
#[derive(Clone, Debug, Default)]
struct DownWindow {
    window_s: f64,
    recs: VecDeque<(f64, u32)>,
}

impl DownWindow {
    fn new(window_s: f64) -> Self {
        DownWindow {
            window_s,
            recs: VecDeque::new(),
        }
    }

    /// Records `rec` and returns the stabilised count given the current one: scale up at once,
    /// scale down only to the highest recommendation of the window.
    fn apply(&mut self, now_s: f64, current: u32, rec: u32) -> u32 {
        self.recs.push_back((now_s, rec));
        while self
            .recs
            .front()
            .is_some_and(|r| r.0 < now_s - self.window_s - 1e-9)
        {
            self.recs.pop_front();
        }
        if rec >= current {
            rec
        } else {
            let high = self.recs.iter().map(|r| r.1).max().unwrap_or(rec);
            current.min(high)
        }
    }
}

/// Kubernetes HorizontalPodAutoscaler (autoscaling/v2 defaults): 15 s sync, tolerance 0.1,
/// 300 s scale-down stabilisation, scale-up limited to max(100 %, 4 pods) per 15 s.
#[derive(Clone, Debug)]
pub struct Hpa {
    pub spec: TargetSpec,
    pub tolerance: f64,
    down: DownWindow,
}

impl Hpa {
    pub const INTERVAL_S: f64 = 15.0;

    pub fn new(spec: TargetSpec) -> Self {
        Hpa {
            spec,
            tolerance: 0.1,
            down: DownWindow::new(300.0),
        }
    }
}

impl Scaler for Hpa {
    fn recommend(&mut self, now_s: f64, obs: &TargetObs) -> u32 {
        let current = obs.desired.max(1);
        let load = obs.sample.arrival_rps;
        let ratio = load / (current as f64 * self.spec.target_rps_per_replica);
        let raw = if (ratio - 1.0).abs() <= self.tolerance {
            current
        } else {
            replicas_for(load, self.spec.target_rps_per_replica)
        };
        let raw = clamp(&self.spec, raw);
        let stabilised = self.down.apply(now_s, current, raw);
        let up_limit = (current * 2).max(current + 4);
        clamp(&self.spec, stabilised.min(up_limit))
    }
}

/// Knative's KPA: averages over a 60 s stable and a 6 s panic window; panics when the panic
/// window wants >= 2x the ready replicas, never scales down in panic, leaves panic after 60 s
/// without the condition; scale-down at most halves the ready replicas; no scale to zero.
#[derive(Clone, Debug)]
pub struct Kpa {
    pub spec: TargetSpec,
    pub stable_window_s: f64,
    pub panic_window_s: f64,
    pub panic_threshold: f64,
    /// (time, rate, seconds covered)
    samples: VecDeque<(f64, f64, f64)>,
    last_time: Option<f64>,
    panic_since: Option<f64>,
    last_over_threshold: f64,
    max_panic: u32,
}

impl Kpa {
    /// Knative's autoscaler tick.
    pub const INTERVAL_S: f64 = 2.0;

    pub fn new(spec: TargetSpec) -> Self {
        Kpa {
            spec,
            stable_window_s: 60.0,
            panic_window_s: 6.0,
            panic_threshold: 2.0,
            samples: VecDeque::new(),
            last_time: None,
            panic_since: None,
            last_over_threshold: f64::NEG_INFINITY,
            max_panic: 0,
        }
    }

    pub fn in_panic(&self) -> bool {
        self.panic_since.is_some()
    }

    fn average(&self, now_s: f64, window_s: f64) -> f64 {
        let (mut sum, mut secs) = (0.0, 0.0);
        for &(t, r, d) in self.samples.iter().rev() {
            // Part of this sample's span inside the window.
            let inside = (d - (now_s - window_s - (t - d)).max(0.0)).clamp(0.0, d);
            if inside <= 0.0 {
                break;
            }
            sum += r * inside;
            secs += inside;
        }
        if secs > 0.0 { sum / secs } else { 0.0 }
    }
}

impl Scaler for Kpa {
    fn recommend(&mut self, now_s: f64, obs: &TargetObs) -> u32 {
        let span = self
            .last_time
            .map_or(Self::INTERVAL_S, |l| (now_s - l).max(1e-9));
        self.last_time = Some(now_s);
        self.samples
            .push_back((now_s, obs.sample.arrival_rps, span));
        while self
            .samples
            .front()
            .is_some_and(|s| s.0 < now_s - self.stable_window_s - span)
        {
            self.samples.pop_front();
        }
        let target = self.spec.target_rps_per_replica;
        let stable = self.average(now_s, self.stable_window_s) / target;
        let panic = self.average(now_s, self.panic_window_s) / target;
        let ready = obs.ready.max(1);
        if panic / ready as f64 >= self.panic_threshold {
            self.last_over_threshold = now_s;
            if self.panic_since.is_none() {
                self.panic_since = Some(now_s);
                self.max_panic = ready;
            }
        } else if self.panic_since.is_some()
            && now_s - self.last_over_threshold >= self.stable_window_s
        {
            self.panic_since = None;
            self.max_panic = 0;
        }
        let desired_panic = (panic - 1e-9).ceil().max(0.0) as u32;
        let desired_stable = (stable - 1e-9).ceil().max(0.0) as u32;
        let mut want = if self.in_panic() {
            self.max_panic = self.max_panic.max(desired_panic);
            self.max_panic.max(obs.desired)
        } else {
            desired_stable
        };
        // Max scale-down rate 2: never below half the ready replicas in one step.
        want = want.max(ready / 2);
        clamp(&self.spec, want)
    }
}

/// AIBrix-like: the HPA-style reactive count (tolerance 0.1, 300 s scale-down window), with a
/// scale-up floor from a least-squares linear trend over the last `samples` observations,
/// projected one cold start ahead.
#[derive(Clone, Debug)]
pub struct AiBrix {
    pub spec: TargetSpec,
    pub tolerance: f64,
    pub samples: usize,
    pub horizon_s: f64,
    history: VecDeque<(f64, f64)>,
    down: DownWindow,
}

impl AiBrix {
    pub const INTERVAL_S: f64 = 15.0;

    pub fn new(spec: TargetSpec, horizon_s: f64) -> Self {
        AiBrix {
            spec,
            tolerance: 0.1,
            samples: 8,
            horizon_s,
            history: VecDeque::new(),
            down: DownWindow::new(300.0),
        }
    }

    /// The trend's value at `at_s`, if there are enough samples and it is rising.
    pub fn projection(&self, at_s: f64) -> Option<f64> {
        let n = self.history.len();
        if n < 3 {
            return None;
        }
        let nf = n as f64;
        let mt = self.history.iter().map(|h| h.0).sum::<f64>() / nf;
        let my = self.history.iter().map(|h| h.1).sum::<f64>() / nf;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for &(t, y) in &self.history {
            sxy += (t - mt) * (y - my);
            sxx += (t - mt) * (t - mt);
        }
        if sxx <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        (slope > 0.0).then_some(my + slope * (at_s - mt))
    }
}

impl Scaler for AiBrix {
    fn recommend(&mut self, now_s: f64, obs: &TargetObs) -> u32 {
        let current = obs.desired.max(1);
        let load = obs.sample.arrival_rps;
        self.history.push_back((now_s, load));
        while self.history.len() > self.samples {
            self.history.pop_front();
        }
        let target = self.spec.target_rps_per_replica;
        let ratio = load / (current as f64 * target);
        let reactive = if (ratio - 1.0).abs() <= self.tolerance {
            current
        } else {
            replicas_for(load, target)
        };
        let floor = self
            .projection(now_s + self.horizon_s)
            .map_or(0, |p| replicas_for(p, target));
        let raw = clamp(&self.spec, reactive.max(floor));
        clamp(&self.spec, self.down.apply(now_s, current, raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidal_autoscaler::TierSample;

    const SPEC: TargetSpec = TargetSpec {
        target_rps_per_replica: 10.0,
        min: 1,
        max: 100,
    };

    fn obs(rps: f64, desired: u32) -> TargetObs {
        TargetObs {
            sample: TierSample {
                arrival_rps: rps,
                ..Default::default()
            },
            desired,
            ready: desired,
            ready_times_s: vec![],
            online: true,
        }
    }

    #[test]
    fn hpa_ignores_changes_within_tolerance() {
        let mut h = Hpa::new(SPEC);
        // 10 replicas, 109 rps: ratio 1.09 -> no change; 111 rps: ratio 1.11 -> 12.
        assert_eq!(h.recommend(0.0, &obs(109.0, 10)), 10);
        assert_eq!(h.recommend(15.0, &obs(111.0, 10)), 12);
        assert_eq!(h.recommend(30.0, &obs(91.0, 10)), 10);
    }

    #[test]
    fn hpa_scales_down_only_after_the_window() {
        let mut h = Hpa::new(SPEC);
        assert_eq!(h.recommend(0.0, &obs(100.0, 10)), 10);
        // Load drops to 20 rps: the window still holds the 10 from t=0.
        let mut t = 15.0;
        while t < 300.0 {
            assert_eq!(h.recommend(t, &obs(20.0, 10)), 10, "t={t}");
            t += 15.0;
        }
        assert_eq!(
            h.recommend(300.0, &obs(20.0, 10)),
            10,
            "t=0 is still 300 s back"
        );
        assert_eq!(h.recommend(315.0, &obs(20.0, 10)), 2);
    }

    #[test]
    fn hpa_scale_up_rate_is_limited() {
        let mut h = Hpa::new(SPEC);
        assert_eq!(h.recommend(0.0, &obs(1000.0, 2)), 6, "max(2x, +4) from 2");
        assert_eq!(h.recommend(15.0, &obs(1000.0, 10)), 20);
    }

    #[test]
    fn kpa_panics_on_a_burst_and_holds_while_panicking() {
        let mut k = Kpa::new(SPEC);
        let mut t = 0.0;
        while t < 120.0 {
            assert_eq!(k.recommend(t, &obs(50.0, 5)), 5);
            t += 2.0;
        }
        assert!(!k.in_panic());
        // Burst to 200 rps: the 6 s window averages 100 rps, wanting 10 >= 2 x 5 ready.
        let d = k.recommend(t, &obs(200.0, 5));
        assert!(k.in_panic());
        assert_eq!(d, 10);
        // The stable window alone would have asked for 6.
        assert!(k.average(t, 60.0) / 10.0 < 6.0);
        // Load falls back: in panic no scale-down.
        t += 2.0;
        for _ in 0..20 {
            assert!(k.recommend(t, &obs(50.0, d)) >= d);
            t += 2.0;
        }
        // 60 s after the condition last held, panic ends and the count may fall (halving).
        while t < 122.0 + 60.0 + 2.0 {
            k.recommend(t, &obs(50.0, d));
            t += 2.0;
        }
        assert!(!k.in_panic());
        let after = k.recommend(t, &obs(50.0, d));
        assert!(after < d, "{after} vs {d}");
        assert!(after >= d / 2);
    }

    #[test]
    fn kpa_stable_mode_follows_the_60s_average() {
        let mut k = Kpa::new(SPEC);
        let mut t = 0.0;
        for _ in 0..30 {
            k.recommend(t, &obs(100.0, 10));
            t += 2.0;
        }
        // 150 rps is below the 2x panic threshold: the stable average moves slowly.
        let d = k.recommend(t, &obs(150.0, 10));
        assert!(!k.in_panic());
        assert_eq!(d, 11, "60 s average is ~101.7 rps");
    }

    #[test]
    fn aibrix_trend_floor_scales_ahead_of_a_ramp() {
        let mut a = AiBrix::new(SPEC, 60.0);
        let mut h = Hpa::new(SPEC);
        let mut cur_a = 10;
        let mut cur_h = 10;
        let (mut last_a, mut last_h) = (0, 0);
        for i in 0..8 {
            let t = i as f64 * 15.0;
            let load = 100.0 + 10.0 * i as f64;
            last_a = a.recommend(t, &obs(load, cur_a));
            last_h = h.recommend(t, &obs(load, cur_h));
            cur_a = last_a;
            cur_h = last_h;
        }
        // Load is 170 rps rising 40 rps/min: projected 210 rps a minute ahead.
        assert_eq!(a.projection(105.0 + 60.0).map(|p| p.round()), Some(210.0));
        assert_eq!(last_a, 21);
        assert!(last_h <= 17, "{last_h}");
    }

    #[test]
    fn aibrix_ignores_falling_trends() {
        let mut a = AiBrix::new(SPEC, 60.0);
        for i in 0..8 {
            a.recommend(i as f64 * 15.0, &obs(200.0 - 10.0 * i as f64, 20));
        }
        assert_eq!(a.projection(200.0), None);
    }
}
