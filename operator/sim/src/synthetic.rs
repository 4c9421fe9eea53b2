//! Synthetic load patterns, seeded so runs are reproducible: the four the benchmark has always
//! shown (steps, ramps, bursts, diurnal), the edge sleep study's store hours, and the
//! [`Pattern::FRESH`] shapes added after the core was tuned (flash crowd, level shifts, holiday
//! dip, long prompts), which the benchmark replays with seeds of their own as held-out days.

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
    /// A link goes viral: at a random time in the first half the rate jumps within 30 s to
    /// 5-8x the base, then decays back exponentially (time constant 10-20 minutes).
    FlashCrowd,
    /// Three permanent shifts at random times, each multiplying the level by 1.5-2.5 or by
    /// 0.4-0.67 (kept within 0.25-4x the base): a tenant moves in, a client is switched off.
    LevelShift,
    /// The diurnal cycle over four days, the third a holiday at 35 % of a normal day: the
    /// seasonal history overshoots it, then holds the dip in its history on day four.
    HolidayDip,
    /// Long prompts (12,000 tokens on average, 300 out) at a fifth of the base rate (2.4x
    /// the base's prompt tokens): prefill takes a third of the TTFT objective; the rate wanders
    /// (log-normal, mean-reverting over 10 minutes, σ 0.35).
    LongPrompts,
}

impl Pattern {
    pub const ALL: [Pattern; 4] = [
        Pattern::Steps,
        Pattern::Ramps,
        Pattern::Bursts,
        Pattern::Diurnal,
    ];

    /// Shapes added after the core's constants were set: the benchmark's held-out days.
    pub const FRESH: [Pattern; 4] = [
        Pattern::FlashCrowd,
        Pattern::LevelShift,
        Pattern::HolidayDip,
        Pattern::LongPrompts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Steps => "steps",
            Pattern::Ramps => "ramps",
            Pattern::Bursts => "bursts",
            Pattern::Diurnal => "diurnal",
            Pattern::StoreHours => "store-hours",
            Pattern::FlashCrowd => "flash-crowd",
            Pattern::LevelShift => "level-shift",
            Pattern::HolidayDip => "holiday-dip",
            Pattern::LongPrompts => "long-prompts",
        }
    }

    /// A duration that shows the pattern: one or two hours, or days for the daily ones.
    pub fn default_duration_s(self) -> f64 {
        match self {
            Pattern::Diurnal => 2.0 * 86400.0,
            Pattern::StoreHours => 3.0 * 86400.0,
            Pattern::HolidayDip => 4.0 * 86400.0,
            Pattern::FlashCrowd | Pattern::LevelShift | Pattern::LongPrompts => 7200.0,
            _ => 3600.0,
        }
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let all = || {
            Pattern::ALL
                .into_iter()
                .chain([Pattern::StoreHours])
                .chain(Pattern::FRESH)
        };
        all()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = all().map(Pattern::name).collect();
                format!(
                    "unknown synthetic pattern {s:?}: one of {}",
                    names.join(", ")
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
        // The pattern's random shape first, then the arrivals (the order the earlier patterns'
        // streams were drawn in, so their traces stay the same).
        let shape = Shape::draw(self, n, &mut rng);
        let arrivals = (0..n)
            .map(|k| {
                let t = (k as f64 + 0.5) * self.tick_s;
                let rate = self.rate_at(t, k, &shape);
                poisson(&mut rng, rate * self.tick_s)
            })
            .collect();
        let (mean_input_tokens, mean_output_tokens) = match self.pattern {
            Pattern::LongPrompts => (12000.0, 300.0),
            _ => (1000.0, 250.0),
        };
        Trace {
            name: format!("synthetic-{}", self.pattern.name()),
            tick_s: self.tick_s,
            arrivals,
            mean_input_tokens,
            mean_output_tokens,
            requests: vec![],
        }
    }

    fn rate_at(&self, t: f64, k: usize, shape: &Shape) -> f64 {
        let b = self.base_rps;
        let x = t / self.duration_s;
        let diurnal = |t: f64| {
            let day = (t % 86400.0) / 86400.0;
            b * (1.0 - 0.6 * (2.0 * std::f64::consts::PI * day).cos())
        };
        match self.pattern {
            Pattern::Steps => b * [1.0, 2.0, 4.0, 1.0][((x * 4.0) as usize).min(3)],
            Pattern::Ramps => b * (1.0 + 3.0 * (1.0 - (2.0 * x - 1.0).abs())),
            Pattern::Bursts => {
                let m = shape
                    .bursts
                    .iter()
                    .filter(|w| t >= w.0 && t < w.1)
                    .map(|w| w.2)
                    .fold(1.0, f64::max);
                b * m
            }
            Pattern::Diurnal => diurnal(t),
            Pattern::StoreHours => {
                let h = (t % 86400.0) / 3600.0;
                b * match h {
                    h if !(8.0..21.0).contains(&h) => 0.0,
                    h if (9.0..18.0).contains(&h) => 1.0,
                    _ => 0.5,
                }
            }
            Pattern::FlashCrowd => {
                let (onset, peak, tau) = shape.flash;
                let since = t - onset;
                let excess = if since < 0.0 {
                    0.0
                } else if since < FLASH_RISE_S {
                    since / FLASH_RISE_S
                } else {
                    (-(since - FLASH_RISE_S) / tau).exp()
                };
                b * (1.0 + (peak - 1.0) * excess)
            }
            Pattern::LevelShift => {
                let level = shape
                    .shifts
                    .iter()
                    .take_while(|(at, _)| *at <= t)
                    .last()
                    .map_or(1.0, |s| s.1);
                b * level
            }
            Pattern::HolidayDip => {
                let holiday = (t / 86400.0) as usize == 2;
                diurnal(t) * if holiday { 0.35 } else { 1.0 }
            }
            Pattern::LongPrompts => 0.2 * b * shape.walk.get(k).copied().unwrap_or(1.0),
        }
    }
}

/// Seconds a flash crowd takes to reach its peak.
const FLASH_RISE_S: f64 = 30.0;

/// A pattern's random shape, drawn before its arrivals.
#[derive(Default)]
struct Shape {
    /// (start, end, multiplier) of bursts.
    bursts: Vec<(f64, f64, f64)>,
    /// Flash crowd: (onset, peak multiplier, decay time constant).
    flash: (f64, f64, f64),
    /// Level shifts: (from, level), in time order.
    shifts: Vec<(f64, f64)>,
    /// Per-tick multiplier of a mean-reverting log-normal walk.
    walk: Vec<f64>,
}

impl Shape {
    fn draw(s: &Synthetic, ticks: usize, rng: &mut StdRng) -> Shape {
        let d = s.duration_s;
        match s.pattern {
            Pattern::Bursts => Shape {
                bursts: burst_windows(rng, d),
                ..Shape::default()
            },
            Pattern::FlashCrowd => Shape {
                flash: (
                    d * rng.random_range(0.25..0.5),
                    rng.random_range(5.0..8.0),
                    rng.random_range(600.0..1200.0),
                ),
                ..Shape::default()
            },
            Pattern::LevelShift => {
                let mut at: Vec<f64> = (0..3).map(|_| d * rng.random_range(0.15..0.85)).collect();
                at.sort_by(f64::total_cmp);
                let mut level = 1.0_f64;
                let shifts = at
                    .into_iter()
                    .map(|t| {
                        let factor = if rng.random::<bool>() {
                            rng.random_range(1.5..2.5)
                        } else {
                            rng.random_range(0.4..0.67)
                        };
                        level = (level * factor).clamp(0.25, 4.0);
                        (t, level)
                    })
                    .collect();
                Shape {
                    shifts,
                    ..Shape::default()
                }
            }
            Pattern::LongPrompts => {
                // log-rate x: AR(1) with a 600 s correlation time and stationary σ 0.35; the
                // multiplier exp(x - σ²/2) has mean 1.
                let sigma = 0.35_f64;
                let phi = (-s.tick_s / 600.0).exp();
                let step = sigma * (1.0 - phi * phi).sqrt();
                let mut x = 0.0;
                let walk = (0..ticks)
                    .map(|_| {
                        x = phi * x + step * normal(rng);
                        (x - sigma * sigma / 2.0).exp()
                    })
                    .collect();
                Shape {
                    walk,
                    ..Shape::default()
                }
            }
            _ => Shape::default(),
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
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
    (lambda + normal(rng) * lambda.sqrt()).round().max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace_other_seed_other_trace() {
        for p in Pattern::ALL.into_iter().chain(Pattern::FRESH) {
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

    /// Mean rate over `[from, to)` seconds.
    fn mean_rps(t: &Trace, from: f64, to: f64) -> f64 {
        let (a, b) = ((from / t.tick_s) as usize, (to / t.tick_s) as usize);
        t.arrivals[a..b].iter().sum::<f64>() / (to - from)
    }

    #[test]
    fn a_flash_crowd_jumps_within_the_first_half_and_decays_back() {
        for seed in 1..4 {
            let mut s = Synthetic::new(Pattern::FlashCrowd);
            s.seed = seed;
            let t = s.generate();
            assert!(
                (mean_rps(&t, 0.0, 1500.0) - 20.0).abs() < 1.5,
                "calm before"
            );
            assert!(t.peak_rps(60.0) > 4.5 * 20.0, "peak {}", t.peak_rps(60.0));
            let end = mean_rps(&t, 6600.0, 7200.0);
            assert!(
                end < 1.5 * 20.0,
                "mostly back to the base by the end: {end}"
            );
        }
    }

    #[test]
    fn level_shifts_last() {
        for seed in 1..4 {
            let mut s = Synthetic::new(Pattern::LevelShift);
            s.seed = seed;
            let t = s.generate();
            let shape = Shape::draw(&s, t.arrivals.len(), &mut StdRng::seed_from_u64(seed));
            assert_eq!(shape.shifts.len(), 3);
            let mut level = 1.0;
            let mut from = 0.0;
            for (at, next) in shape.shifts.iter().copied().chain([(7200.0, 0.0)]) {
                // The rate holds each level until the next shift.
                if at - from > 120.0 {
                    let got = mean_rps(&t, from, at);
                    assert!((got / (20.0 * level) - 1.0).abs() < 0.1, "{got} vs {level}");
                }
                if next > 0.0 {
                    let r = next / level;
                    assert!(
                        r >= 1.5 - 1e-9 || r <= 0.67 + 1e-9 || next == 4.0 || next == 0.25,
                        "each shift moves the level: {level} -> {next}"
                    );
                }
                (level, from) = (next, at);
            }
        }
    }

    #[test]
    fn the_holiday_is_the_third_day_only() {
        let mut s = Synthetic::new(Pattern::HolidayDip);
        s.tick_s = 60.0;
        let t = s.generate();
        let noon = |d: f64| mean_rps(&t, d * 86400.0 + 11.0 * 3600.0, d * 86400.0 + 13.0 * 3600.0);
        assert!(
            noon(2.0) < 0.45 * noon(1.0),
            "{} vs {}",
            noon(2.0),
            noon(1.0)
        );
        assert!((noon(3.0) / noon(1.0) - 1.0).abs() < 0.05);
        assert!((noon(0.0) / noon(1.0) - 1.0).abs() < 0.05);
    }

    #[test]
    fn long_prompts_wander_around_the_base_rate() {
        let t = Synthetic::new(Pattern::LongPrompts).generate();
        assert_eq!(
            (t.mean_input_tokens, t.mean_output_tokens),
            (12000.0, 300.0)
        );
        let mean = mean_rps(&t, 0.0, 7200.0);
        assert!((mean - 4.0).abs() < 4.0 * 0.25, "{mean}");
        let minutes: Vec<f64> = (0..120)
            .map(|m| mean_rps(&t, m as f64 * 60.0, (m + 1) as f64 * 60.0))
            .collect();
        let (lo, hi) = minutes
            .iter()
            .fold((f64::MAX, 0.0_f64), |(l, h), &x| (l.min(x), h.max(x)));
        assert!(hi > 1.5 * lo, "the rate wanders: {lo}..{hi}");
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
        for p in Pattern::ALL
            .into_iter()
            .chain([Pattern::StoreHours])
            .chain(Pattern::FRESH)
        {
            assert_eq!(p.name().parse::<Pattern>().unwrap(), p);
        }
        assert!("sawtooth".parse::<Pattern>().is_err());
    }
}
