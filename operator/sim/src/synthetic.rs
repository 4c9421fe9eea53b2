//! Synthetic load patterns (steps, ramps, bursts, diurnal), seeded so runs are reproducible.

use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::trace::Trace;

/// The shape of a synthetic trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Base rate, then 2x, 4x and back to 1x in four equal phases.
    Steps,
    /// Linear ramp from the base rate to 4x over the first half, back down over the second.
    Ramps,
    /// Base rate with random 60-120 s bursts at 3-6x, about one every 10 minutes.
    Bursts,
    /// Daily sinusoid between 0.4x and 1.6x the base rate, peak mid-day.
    Diurnal,
    /// Business hours: nothing from 21:00 to 08:00; half the base rate from the 08:00
    /// opening, the base rate from 09:00 to 18:00, half again until the 21:00 closing (a
    /// shop's or office's site: its demand jumps from nothing when it opens).
    /// Not in [`Pattern::ALL`]: the edge scale-to-zero study uses it.
    StoreHours,
}

impl Pattern {
    pub const ALL: [Pattern; 4] = [
        Pattern::Steps,
        Pattern::Ramps,
        Pattern::Bursts,
        Pattern::Diurnal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Steps => "steps",
            Pattern::Ramps => "ramps",
            Pattern::Bursts => "bursts",
            Pattern::Diurnal => "diurnal",
            Pattern::StoreHours => "store-hours",
        }
    }

    /// A duration that shows the pattern: one hour, or two days for the diurnal one.
    pub fn default_duration_s(self) -> f64 {
        match self {
            Pattern::Diurnal => 2.0 * 86400.0,
            Pattern::StoreHours => 3.0 * 86400.0,
            _ => 3600.0,
        }
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Pattern::ALL
            .into_iter()
            .chain([Pattern::StoreHours])
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown synthetic pattern {s:?}: one of steps, ramps, bursts, diurnal, store-hours"
                )
            })
    }
}

/// Parameters of a synthetic trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Synthetic {
    pub pattern: Pattern,
    pub duration_s: f64,
    pub base_rps: f64,
    pub tick_s: f64,
    pub seed: u64,
}

impl Synthetic {
    pub fn new(pattern: Pattern) -> Self {
        Synthetic {
            pattern,
            duration_s: pattern.default_duration_s(),
            base_rps: 20.0,
            tick_s: 1.0,
            seed: 1,
        }
    }

    /// Generates Poisson arrivals around the pattern's rate.
    pub fn generate(&self) -> Trace {
        let n = (self.duration_s / self.tick_s).ceil().max(1.0) as usize;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let bursts = if self.pattern == Pattern::Bursts {
            burst_windows(&mut rng, self.duration_s)
        } else {
            vec![]
        };
        let arrivals = (0..n)
            .map(|k| {
                let t = (k as f64 + 0.5) * self.tick_s;
                let rate = self.rate_at(t, &bursts);
                poisson(&mut rng, rate * self.tick_s)
            })
            .collect();
        Trace {
            name: format!("synthetic-{}", self.pattern.name()),
            tick_s: self.tick_s,
            arrivals,
            mean_input_tokens: 1000.0,
            mean_output_tokens: 250.0,
            requests: vec![],
        }
    }

    fn rate_at(&self, t: f64, bursts: &[(f64, f64, f64)]) -> f64 {
        let b = self.base_rps;
        let x = t / self.duration_s;
        match self.pattern {
            Pattern::Steps => b * [1.0, 2.0, 4.0, 1.0][((x * 4.0) as usize).min(3)],
            Pattern::Ramps => b * (1.0 + 3.0 * (1.0 - (2.0 * x - 1.0).abs())),
            Pattern::Bursts => {
                let m = bursts
                    .iter()
                    .filter(|w| t >= w.0 && t < w.1)
                    .map(|w| w.2)
                    .fold(1.0, f64::max);
                b * m
            }
            Pattern::Diurnal => {
                let day = (t % 86400.0) / 86400.0;
                b * (1.0 - 0.6 * (2.0 * std::f64::consts::PI * day).cos())
            }
            Pattern::StoreHours => {
                let h = (t % 86400.0) / 3600.0;
                b * match h {
                    h if !(8.0..21.0).contains(&h) => 0.0,
                    h if (9.0..18.0).contains(&h) => 1.0,
                    _ => 0.5,
                }
            }
        }
    }
}

/// (start, end, multiplier) of random bursts.
fn burst_windows(rng: &mut StdRng, duration_s: f64) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        // Exponential gaps with a 600 s mean.
        let u: f64 = rng.random::<f64>().max(1e-12);
        t += -600.0 * u.ln();
        if t >= duration_s {
            return out;
        }
        let len = 60.0 + 60.0 * rng.random::<f64>();
        let mult = 3.0 + 3.0 * rng.random::<f64>();
        out.push((t, t + len, mult));
    }
}

/// A Poisson-distributed count with mean `lambda` (Knuth below 30, normal approximation above).
pub fn poisson(rng: &mut StdRng, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    if lambda < 30.0 {
        let l = (-lambda).exp();
        let mut k = 0.0;
        let mut p = 1.0;
        loop {
            p *= rng.random::<f64>();
            if p <= l {
                return k;
            }
            k += 1.0;
        }
    }
    // Box-Muller.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (lambda + z * lambda.sqrt()).round().max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace_other_seed_other_trace() {
        for p in Pattern::ALL {
            let mut s = Synthetic::new(p);
            s.duration_s = 7200.0;
            s.tick_s = 5.0;
            let a = s.generate();
            assert_eq!(a, s.generate(), "{}", p.name());
            s.seed = 2;
            assert_ne!(a.arrivals, s.generate().arrivals, "{}", p.name());
        }
    }

    #[test]
    fn steps_have_the_documented_levels() {
        let t = Synthetic::new(Pattern::Steps).generate();
        let q = t.arrivals.len() / 4;
        let mean = |r: std::ops::Range<usize>| {
            let n = r.len() as f64;
            t.arrivals[r].iter().sum::<f64>() / n
        };
        let levels = [
            mean(0..q),
            mean(q..2 * q),
            mean(2 * q..3 * q),
            mean(3 * q..4 * q),
        ];
        for (got, want) in levels.iter().zip([20.0, 40.0, 80.0, 20.0]) {
            assert!((got - want).abs() < want * 0.05, "{levels:?}");
        }
    }

    #[test]
    fn diurnal_peaks_mid_day() {
        let mut s = Synthetic::new(Pattern::Diurnal);
        s.tick_s = 60.0;
        let t = s.generate();
        let hour = |h: usize| t.arrivals[h * 60..(h + 1) * 60].iter().sum::<f64>() / 3600.0;
        assert!(hour(12) > 2.5 * hour(0), "{} vs {}", hour(12), hour(0));
    }

    #[test]
    fn store_hours_are_closed_at_night() {
        let mut s = Synthetic::new(Pattern::StoreHours);
        s.tick_s = 60.0;
        let t = s.generate();
        let hour = |d: usize, h: usize| {
            let k = d * 1440 + h * 60;
            t.arrivals[k..k + 60].iter().sum::<f64>() / 3600.0
        };
        for d in 0..3 {
            assert_eq!(hour(d, 3) + hour(d, 7) + hour(d, 22), 0.0);
            assert!(hour(d, 8) > 5.0, "opens at 08:00: {}", hour(d, 8));
            assert!((hour(d, 12) - 20.0).abs() < 2.0, "{}", hour(d, 12));
        }
        assert_eq!(
            "store-hours".parse::<Pattern>().unwrap(),
            Pattern::StoreHours
        );
    }

    #[test]
    fn bursts_exceed_the_base() {
        let t = Synthetic::new(Pattern::Bursts).generate();
        assert!(t.peak_rps(60.0) > 2.5 * 20.0, "{}", t.peak_rps(60.0));
    }

    #[test]
    fn poisson_mean_is_lambda() {
        let mut rng = StdRng::seed_from_u64(3);
        for lambda in [0.5, 5.0, 200.0] {
            let n = 20000;
            let m: f64 = (0..n).map(|_| poisson(&mut rng, lambda)).sum::<f64>() / n as f64;
            assert!((m - lambda).abs() < lambda * 0.03 + 0.02, "{lambda}: {m}");
        }
    }

    #[test]
    fn pattern_names_round_trip() {
        for p in Pattern::ALL {
            assert_eq!(p.name().parse::<Pattern>().unwrap(), p);
        }
        assert!("sawtooth".parse::<Pattern>().is_err());
    }
}
