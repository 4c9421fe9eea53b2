//! Policies compared at matched cost and at matched SLO attainment.
//!
//! One run per policy says little when one policy is cheaper and another meets the SLO more
//! often: each policy has a headroom knob (its target utilisation) that trades one for the
//! other. So every policy is replayed at a range of target utilisations, and the resulting
//! (replica-seconds, attainment) points are compared where they cross a reference point: the
//! SLO attainment a policy reaches at the reference cost, and the cost it needs to reach the
//! reference attainment, linear in the utilisation between neighbouring settings (a setting in
//! between, not a mix of two). Pure; [`super::sweep`] produces the points.

/// One replay of a policy at one target utilisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub utilization: f64,
    pub attainment: f64,
    pub replica_seconds: f64,
}

impl Point {
    pub const fn new(utilization: f64, attainment: f64, replica_seconds: f64) -> Self {
        Point {
            utilization,
            attainment,
            replica_seconds,
        }
    }
}

/// A policy's points, one per swept utilisation.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub policy: String,
    pub points: Vec<Point>,
}

/// `a / b`, with 0 / 0 = 1 (both perfect) and x / 0 = ∞.
pub fn div(a: f64, b: f64) -> f64 {
    if b.abs() < 1e-12 {
        if a.abs() < 1e-12 { 1.0 } else { f64::INFINITY }
    } else {
        a / b
    }
}

/// Misses at attainment `att` ÷ misses at `base` (same requests).
pub fn miss_ratio(att: f64, base: f64) -> f64 {
    div(1.0 - att, 1.0 - base)
}

fn lerp(x: f64, x0: f64, x1: f64, y0: f64, y1: f64) -> f64 {
    if (x1 - x0).abs() < 1e-12 {
        y0.max(y1)
    } else {
        y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    }
}

/// Where the curve, linear in the utilisation between neighbouring settings, crosses `x` on
/// one axis: the other axis's value at each crossing.
fn crossings(
    points: &[Point],
    x: f64,
    axis: impl Fn(&Point) -> f64,
    other: impl Fn(&Point) -> f64,
) -> Vec<f64> {
    let mut sorted: Vec<Point> = points
        .iter()
        .copied()
        .filter(|p| p.attainment.is_finite() && p.replica_seconds.is_finite())
        .collect();
    sorted.sort_by(|a, b| a.utilization.total_cmp(&b.utilization));
    sorted
        .windows(2)
        .filter_map(|w| {
            let (x0, x1) = (axis(&w[0]), axis(&w[1]));
            (x0.min(x1) <= x && x <= x0.max(x1))
                .then(|| lerp(x, x0, x1, other(&w[0]), other(&w[1])))
        })
        .collect()
}

/// The highest SLO attainment the policy reaches for at most `cost` replica-seconds: at a
/// swept setting that costs no more, or at a utilisation between two neighbouring settings
/// (linear) where the cost is exactly `cost`. `None` when every setting costs more.
pub fn attainment_at_cost(points: &[Point], cost: f64) -> Option<f64> {
    points
        .iter()
        .filter(|p| p.replica_seconds <= cost && p.attainment.is_finite())
        .map(|p| p.attainment)
        .chain(crossings(
            points,
            cost,
            |p| p.replica_seconds,
            |p| p.attainment,
        ))
        .max_by(f64::total_cmp)
}

/// The fewest replica-seconds at which the policy reaches `attainment`: at a swept setting, or
/// between two neighbouring settings (linear) where the attainment is exactly `attainment`.
/// `None` when no setting reaches it.
pub fn cost_at_attainment(points: &[Point], attainment: f64) -> Option<f64> {
    // Attainments are fractions of the same request count: compare with a tolerance so that
    // an identical miss count is not lost to rounding.
    let a = attainment - 1e-12;
    points
        .iter()
        .filter(|p| p.attainment >= a && p.replica_seconds.is_finite())
        .map(|p| p.replica_seconds)
        .chain(crossings(
            points,
            a,
            |p| p.attainment,
            |p| p.replica_seconds,
        ))
        .min_by(f64::total_cmp)
}

/// Each policy's score at the reference point: attainment at `cost`, cost for `attainment`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matched {
    pub policy: String,
    pub attainment_at_cost: Option<f64>,
    pub cost_at_attainment: Option<f64>,
}

/// Scores every curve at the reference (`cost`, `attainment`).
pub fn matched(curves: &[Curve], cost: f64, attainment: f64) -> Vec<Matched> {
    curves
        .iter()
        .map(|c| Matched {
            policy: c.policy.clone(),
            attainment_at_cost: attainment_at_cost(&c.points, cost),
            cost_at_attainment: cost_at_attainment(&c.points, attainment),
        })
        .collect()
}

/// The best any baseline (a policy not named `tidal*`) does on each axis: the highest
/// attainment at the reference cost and the lowest cost for the reference attainment.
pub fn best_baseline(m: &[Matched]) -> (Option<f64>, Option<f64>) {
    let base = m.iter().filter(|x| !x.policy.starts_with("tidal"));
    let att = base
        .clone()
        .filter_map(|x| x.attainment_at_cost)
        .max_by(f64::total_cmp);
    let cost = base
        .filter_map(|x| x.cost_at_attainment)
        .min_by(f64::total_cmp);
    (att, cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    use Point as P;

    fn p(u: f64, att: f64, rs: f64) -> Point {
        P::new(u, att, rs)
    }

    #[test]
    fn matched_scores_follow_the_knob_between_settings() {
        let pts = [
            p(0.9, 0.80, 100.0),
            p(0.8, 0.90, 120.0),
            // Costs more and attains less than 0.8: the curve between 0.8 and 0.6 passes here,
            // so the scores are not read off a chord from 0.8 to 0.6.
            p(0.7, 0.85, 130.0),
            p(0.6, 0.95, 150.0),
        ];
        // Half-way between the 100 and 120 replica-second settings.
        assert!((attainment_at_cost(&pts, 110.0).unwrap() - 0.85).abs() < 1e-12);
        assert_eq!(attainment_at_cost(&pts, 120.0), Some(0.90));
        // 125 is crossed between 0.8 and 0.7 (0.875): the 0.8 setting itself is better.
        assert_eq!(attainment_at_cost(&pts, 125.0), Some(0.90));
        // 140: between 0.7 and 0.6 (0.90); a chord from 0.8 to 0.6 would claim 0.9333.
        assert!((attainment_at_cost(&pts, 140.0).unwrap() - 0.90).abs() < 1e-12);
        // Beyond the most expensive setting: its attainment; below the cheapest: unknown.
        assert_eq!(attainment_at_cost(&pts, 1000.0), Some(0.95));
        assert_eq!(attainment_at_cost(&pts, 99.0), None);
        // 0.925 is reached between 0.7 and 0.6 only.
        assert!((cost_at_attainment(&pts, 0.925).unwrap() - 145.0).abs() < 1e-9);
        // 0.875: between 0.8 and 0.7 (125) and between 0.9 and 0.8 (115): the cheaper.
        assert!((cost_at_attainment(&pts, 0.875).unwrap() - 115.0).abs() < 1e-9);
        assert_eq!(cost_at_attainment(&pts, 0.5), Some(100.0));
        assert_eq!(cost_at_attainment(&pts, 0.99), None);
    }

    #[test]
    fn the_best_baseline_is_taken_per_axis_and_tidal_is_not_one() {
        let curves = vec![
            Curve {
                policy: "tidal".into(),
                points: vec![p(0.8, 1.0, 10.0)],
            },
            // Cheap but poor.
            Curve {
                policy: "hpa".into(),
                points: vec![p(0.8, 0.90, 100.0), p(0.6, 0.96, 140.0)],
            },
            // Expensive but good.
            Curve {
                policy: "kpa".into(),
                points: vec![p(0.8, 0.95, 110.0), p(0.6, 0.99, 130.0)],
            },
        ];
        let m = matched(&curves, 110.0, 0.95);
        let (att, cost) = best_baseline(&m);
        assert_eq!(att, Some(0.95));
        assert_eq!(cost, Some(110.0));
        let tidal = &m[0];
        assert_eq!(tidal.attainment_at_cost, Some(1.0));
        assert_eq!(tidal.cost_at_attainment, Some(10.0));
    }
}
