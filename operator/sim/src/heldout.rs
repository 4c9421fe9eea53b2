//! Held-out results: Tidal run at one setting chosen on *other* scenarios, against baselines
//! re-tuned on the scenario itself.
//!
//! The matched comparison ([`super::frontier`]) reads every policy's curve where it crosses
//! the reference, which tunes Tidal's headroom knob (its target utilisation) on the very
//! trace it is scored on. A new user cannot do that: they pick one setting from results on
//! other traffic. Here Tidal's setting is chosen on the training scenarios by one rule
//! ([`choose`]) and scored as a single point on the held-out scenario; the baselines keep
//! their whole curve on it (the strongest baseline, tuned on the answer). Pure.

use super::frontier::{self, Curve, Point, div};

/// A ratio that says "this one is worse" is capped here when choosing a setting, so that one
/// scenario with a handful of misses (x / 0 = ∞) does not outvote the others.
pub const RATIO_CAP: f64 = 10.0;

/// Tidal at one setting on a scenario, against the baselines' whole curves on it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub point: Point,
    /// Tidal's misses ÷ the fewest any baseline setting has at Tidal's cost; where every
    /// baseline setting costs more, ÷ those of the cheapest one (so a point below every
    /// baseline's cost is not a win by default). `None` without a baseline.
    pub misses_at_its_cost: Option<f64>,
    /// Tidal's replica-seconds ÷ the fewest any baseline needs for Tidal's attainment; where
    /// no baseline setting reaches it, ÷ the fewest for the best attainment any baseline
    /// reaches (so attainment bought with headroom is still paid for). `None` without a
    /// baseline.
    pub cost_at_its_slo: Option<f64>,
}

fn no_worse(r: f64) -> bool {
    r <= 1.0 + 1e-9
}

impl Score {
    /// Better or equal on both axes: no baseline setting is as cheap with fewer misses, or as
    /// good for less.
    pub fn wins(&self) -> bool {
        self.misses_at_its_cost.is_some_and(no_worse) && self.cost_at_its_slo.is_some_and(no_worse)
    }

    /// The worse of the two ratios, capped at [`RATIO_CAP`]: what [`choose`] minimises.
    pub fn worse_axis(&self) -> f64 {
        let m = self.misses_at_its_cost.unwrap_or(RATIO_CAP);
        let c = self.cost_at_its_slo.unwrap_or(RATIO_CAP);
        m.max(c).min(RATIO_CAP)
    }
}

/// Tidal's swept point at `utilization` on a scenario's `curves`, scored against every
/// baseline curve (`None` without a Tidal curve or that setting).
pub fn score_at(curves: &[Curve], utilization: f64) -> Option<Score> {
    score_of(curves, TIDAL, utilization)
}

const TIDAL: &str = "tidal";

/// `policy`'s swept point at `utilization`, scored against every *other* policy's curve
/// (for Tidal: the baselines).
pub fn score_of(curves: &[Curve], policy: &str, utilization: f64) -> Option<Score> {
    let own = curves.iter().find(|c| c.policy == policy)?;
    let point = *own
        .points
        .iter()
        .find(|p| (p.utilization - utilization).abs() < 1e-9)?;
    let rivals: Vec<Curve> = curves
        .iter()
        .filter(|c| c.policy != policy)
        .cloned()
        .collect();
    // The best any rival does at a cost and for an attainment.
    let best = |cost: f64, attainment: f64| {
        let m = frontier::matched(&rivals, cost, attainment);
        let att = m
            .iter()
            .filter_map(|x| x.attainment_at_cost)
            .max_by(f64::total_cmp);
        let cost = m
            .iter()
            .filter_map(|x| x.cost_at_attainment)
            .min_by(f64::total_cmp);
        (att, cost)
    };
    let (att, cost) = best(point.replica_seconds, point.attainment);
    let pts: Vec<&Point> = rivals
        .iter()
        .flat_map(|c| &c.points)
        .filter(|p| p.attainment.is_finite() && p.replica_seconds.is_finite())
        .collect();
    // Every rival setting costs more: the cheapest one's attainment.
    let att = att.or_else(|| {
        pts.iter()
            .min_by(|a, b| {
                a.replica_seconds
                    .total_cmp(&b.replica_seconds)
                    .then(b.attainment.total_cmp(&a.attainment))
            })
            .map(|p| p.attainment)
    });
    // No rival reaches this attainment: the least cost of the best one any reaches.
    let cost = cost.or_else(|| {
        let top = pts.iter().map(|p| p.attainment).max_by(f64::total_cmp)?;
        best(point.replica_seconds, top).1
    });
    Some(Score {
        point,
        misses_at_its_cost: att.map(|a| frontier::miss_ratio(point.attainment, a)),
        cost_at_its_slo: cost.map(|c| div(point.replica_seconds, c)),
    })
}

/// The one setting a user would take from `training` (each a scenario's curves): the
/// utilisation whose worse axis ([`Score::worse_axis`]), averaged over the scenarios, is the
/// lowest; ties go to the higher (cheaper) one. `None` when Tidal was not swept. The average
/// is geometric, the one mean of ratios that does not depend on which side is the divisor
/// (Fleming & Wallace 1986): an arithmetic mean lets one scenario at 3x outweigh three at
/// 0.5x, and so buys headroom everywhere for the one trace that wants it.
pub fn choose(training: &[&[Curve]]) -> Option<f64> {
    choose_for(training, TIDAL)
}

/// [`choose`] for any swept policy, scored against the others.
pub fn choose_for(training: &[&[Curve]], policy: &str) -> Option<f64> {
    let first = training
        .iter()
        .find_map(|c| c.iter().find(|c| c.policy == policy))?;
    let mut best: Option<(f64, f64)> = None;
    for u in first.points.iter().map(|p| p.utilization) {
        let scores: Vec<f64> = training
            .iter()
            .filter_map(|c| score_of(c, policy, u).map(|s| s.worse_axis()))
            .collect();
        if scores.len() != training.len() {
            continue;
        }
        // worse_axis >= the cost ratio > 0, so the logarithm is finite.
        let mean = (scores.iter().map(|x| x.ln()).sum::<f64>() / scores.len() as f64).exp();
        let better =
            best.is_none_or(|(bu, bm)| mean < bm - 1e-12 || (mean <= bm + 1e-12 && u > bu));
        if better {
            best = Some((u, mean));
        }
    }
    best.map(|(u, _)| u)
}

/// Every policy at the setting it would take from the other scenarios: one point each.
#[derive(Clone, Debug, PartialEq)]
pub struct AllHeldOut {
    pub trace: String,
    /// (policy, its point on this scenario), in the curves' order.
    pub points: Vec<(String, Point)>,
}

impl AllHeldOut {
    /// Tidal's point and the best baseline's (highest attainment; ties to the cheaper), as
    /// at the shared target.
    pub fn tidal_and_best_baseline(&self) -> Option<(Point, Point)> {
        let tidal = self.points.iter().find(|(p, _)| p == TIDAL)?.1;
        let best = self
            .points
            .iter()
            .filter(|(p, _)| !p.starts_with(TIDAL))
            .map(|(_, x)| *x)
            .max_by(|a, b| {
                a.attainment
                    .total_cmp(&b.attainment)
                    .then(b.replica_seconds.total_cmp(&a.replica_seconds))
            })?;
        Some((tidal, best))
    }

    /// How many baselines' points Tidal's is at least as good as on both axes.
    pub fn dominated_by_tidal(&self) -> usize {
        let Some(t) = self.points.iter().find(|(p, _)| p == TIDAL).map(|x| x.1) else {
            return 0;
        };
        self.points
            .iter()
            .filter(|(p, _)| !p.starts_with(TIDAL))
            .filter(|(_, b)| {
                t.attainment >= b.attainment - 1e-12 && t.replica_seconds <= b.replica_seconds
            })
            .count()
    }
}

/// Leave-one-out with every policy's setting held out: on each scenario in turn, each policy
/// at the setting [`choose_for`] takes from all the others.
pub fn leave_one_out_all(scenarios: &[(String, Vec<Curve>)]) -> Vec<AllHeldOut> {
    (0..scenarios.len())
        .map(|i| {
            let training = others(scenarios, i);
            let (name, curves) = &scenarios[i];
            let points = curves
                .iter()
                .filter_map(|c| {
                    let u = choose_for(&training, &c.policy)?;
                    let p = c.points.iter().find(|p| (p.utilization - u).abs() < 1e-9)?;
                    Some((c.policy.clone(), *p))
                })
                .collect();
            AllHeldOut {
                trace: name.clone(),
                points,
            }
        })
        .collect()
}

/// Every scenario's curves but the `i`-th.
fn others(scenarios: &[(String, Vec<Curve>)], i: usize) -> Vec<&[Curve]> {
    scenarios
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, (_, c))| c.as_slice())
        .collect()
}

/// One held-out scenario: the setting chosen on the others and its score.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldOut {
    pub trace: String,
    pub score: Score,
}

/// Leave-one-out over `scenarios` (name, curves): each in turn scored at the setting
/// [`choose`] takes from all the others. Scenarios without a Tidal curve are skipped.
pub fn leave_one_out(scenarios: &[(String, Vec<Curve>)]) -> Vec<HeldOut> {
    scenarios
        .iter()
        .enumerate()
        .filter_map(|(i, (name, curves))| {
            let u = choose(&others(scenarios, i))?;
            Some(HeldOut {
                trace: name.clone(),
                score: score_at(curves, u)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(policy: &str, pts: &[(f64, f64, f64)]) -> Curve {
        Curve {
            policy: policy.into(),
            points: pts.iter().map(|&(u, a, r)| Point::new(u, a, r)).collect(),
        }
    }

    /// A baseline with cost 100 / u and attainment falling with u; Tidal given per setting.
    fn scenario(tidal: &[(f64, f64, f64)]) -> Vec<Curve> {
        vec![
            curve("tidal", tidal),
            curve(
                "kpa",
                &[(0.6, 0.99, 166.7), (0.8, 0.95, 125.0), (1.0, 0.80, 100.0)],
            ),
        ]
    }

    #[test]
    fn a_point_is_scored_against_the_baselines_whole_curve() {
        // Tidal at 0.8: 125 replica-s like kpa's 0.8 setting, but 0.97 attained.
        let sc = scenario(&[(0.8, 0.97, 125.0)]);
        let s = score_at(&sc, 0.8).unwrap();
        assert!((s.misses_at_its_cost.unwrap() - 0.6).abs() < 1e-9, "{s:?}");
        // kpa reaches 0.97 half-way between its 0.8 and 0.6 settings: 145.8 replica-s.
        assert!((s.cost_at_its_slo.unwrap() - 125.0 / 145.85).abs() < 1e-3);
        assert!(s.wins());
        // A setting that was not swept has no score.
        assert_eq!(score_at(&sc, 0.7), None);
        // Cheaper than every baseline setting: its misses against the cheapest one's (1.0:
        // 0.80 attained), its cost against the least that reaches 0.9 (116.7 replica-s).
        let cheap = score_at(&scenario(&[(1.0, 0.9, 90.0)]), 1.0).unwrap();
        assert!((cheap.misses_at_its_cost.unwrap() - 0.5).abs() < 1e-9);
        assert!((cheap.cost_at_its_slo.unwrap() - 90.0 / 116.667).abs() < 1e-3);
        assert!(cheap.wins());
        // Cheaper, but misses more than the cheapest baseline: not a win by default.
        let poor = score_at(&scenario(&[(1.0, 0.6, 90.0)]), 1.0).unwrap();
        assert!((poor.misses_at_its_cost.unwrap() - 2.0).abs() < 1e-9);
        assert!(!poor.wins());
        // Beyond every baseline's attainment: paid for against the best any reaches (0.99
        // for 166.7 replica-s).
        let rich = score_at(&scenario(&[(0.5, 1.0, 200.0)]), 0.5).unwrap();
        assert!((rich.cost_at_its_slo.unwrap() - 1.2).abs() < 1e-3);
        assert!(!rich.wins());
        // Costs more for less: loses, and the worse axis says by how much (kpa attains 0.99
        // for that cost: 5x fewer misses).
        let bad = score_at(&scenario(&[(0.6, 0.95, 166.7)]), 0.6).unwrap();
        assert!(!bad.wins());
        assert!((bad.cost_at_its_slo.unwrap() - 166.7 / 125.0).abs() < 1e-9);
        assert!((bad.worse_axis() - 5.0).abs() < 1e-6);
    }

    #[test]
    fn the_setting_is_chosen_on_the_training_scenarios_only() {
        // On A and B the 0.8 setting wins on both axes; at 0.6 it only costs more.
        let good = scenario(&[(0.6, 0.99, 200.0), (0.8, 0.97, 125.0)]);
        // On C (held out) the 0.6 setting is the one that wins: the rule cannot see that.
        let held = scenario(&[(0.6, 0.999, 150.0), (0.8, 0.90, 125.0)]);
        assert_eq!(choose(&[&good, &good]), Some(0.8));
        let scenarios = vec![
            ("a".to_string(), good.clone()),
            ("b".to_string(), good.clone()),
            ("c".to_string(), held.clone()),
        ];
        let out = leave_one_out(&scenarios);
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].trace, "c");
        assert_eq!(out[2].score.point.utilization, 0.8);
        assert!(!out[2].score.wins(), "{:?}", out[2]);
        // Tuned on C itself, 0.6 would have won there.
        assert!(score_at(&held, 0.6).unwrap().wins());
        // A and B are each scored at what B (or A) and C prefer together.
        assert_eq!(
            out[0].score.point.utilization,
            choose(&[&good, &held]).unwrap()
        );
    }

    #[test]
    fn every_policy_held_out_takes_its_own_setting_from_the_others() {
        // kpa's 1.0 setting beats tidal's only point on cost for the same misses: on the
        // training scenarios kpa therefore keeps 1.0; tidal has one setting.
        let sc = || {
            vec![
                curve("tidal", &[(0.8, 0.95, 120.0)]),
                curve(
                    "kpa",
                    &[(0.6, 0.99, 166.7), (0.8, 0.95, 125.0), (1.0, 0.95, 100.0)],
                ),
            ]
        };
        let scenarios = vec![("a".to_string(), sc()), ("b".to_string(), sc())];
        assert_eq!(choose_for(&[&scenarios[1].1], "kpa"), Some(1.0));
        let all = leave_one_out_all(&scenarios);
        assert_eq!(all.len(), 2);
        let (t, b) = all[0].tidal_and_best_baseline().unwrap();
        assert_eq!((t.utilization, b.utilization), (0.8, 1.0));
        // Same attainment, tidal costs more: it dominates no baseline point.
        assert_eq!(all[0].dominated_by_tidal(), 0);
        // Against kpa's 0.8 setting (tuned on the answer) it would have been as good.
        let s = score_at(&sc(), 0.8).unwrap();
        assert!((s.misses_at_its_cost.unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn ties_go_to_the_cheaper_setting_and_infinite_ratios_are_capped() {
        // Both settings lose equally (twice the misses of the baseline at their cost, and
        // the cost axis better): the cheaper, higher utilisation is taken.
        let both = scenario(&[(0.6, 0.98, 166.7), (0.8, 0.90, 125.0)]);
        let (a, b) = (score_at(&both, 0.6).unwrap(), score_at(&both, 0.8).unwrap());
        assert!((a.worse_axis() - 2.0).abs() < 1e-9 && (b.worse_axis() - 2.0).abs() < 1e-9);
        assert_eq!(choose(&[&both]), Some(0.8));
        // Baseline with no misses at Tidal's cost, Tidal with some: ∞, capped.
        let perfect = vec![
            curve("tidal", &[(0.8, 0.99, 100.0)]),
            curve("hpa", &[(0.8, 1.0, 100.0)]),
        ];
        let s = score_at(&perfect, 0.8).unwrap();
        assert_eq!(s.misses_at_its_cost, Some(f64::INFINITY));
        assert_eq!(s.worse_axis(), RATIO_CAP);
        assert_eq!(choose(&[]), None);
    }
}
