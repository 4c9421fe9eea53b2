//! When a new expert placement may replace the one in force.
//!
//! Every plan a user sees costs a rollout (shard pods roll to load experts, then again to drop
//! them), so a plan must earn it: it must balance clearly better than the placement in force,
//! and keep doing so over more than one interval (one noisy sample is not evidence). A rollout
//! already in progress (`Warming`) is superseded only for a much larger gain measured over
//! more intervals, and never once the router is switching: finishing takes one settle period,
//! abandoning it costs two rollouts. Pure; unit-tested below.

/// Where the placement rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Stage {
    /// No rollout in progress: the placement in force is what the router uses.
    #[default]
    Settled,
    /// Shards are loading the target's experts; routing has not changed yet.
    Warming,
    /// The router is switching to the target; shards still hold the old experts.
    Switching,
}

/// A new plan must lower the imbalance by more than this fraction of the one in force...
pub const PLAN_GAIN: f64 = 0.10;
/// ...on this many consecutive fresh intervals.
pub const PLAN_EVIDENCE: u32 = 2;
/// Superseding a rollout in progress needs a larger gain over its target...
pub const SUPERSEDE_GAIN: f64 = 0.25;
/// ...on more intervals.
pub const SUPERSEDE_EVIDENCE: u32 = 3;

/// Counts the consecutive intervals on which a better candidate existed.
#[derive(Clone, Debug, Default)]
pub struct PlanGate {
    streak: u32,
    stage: Stage,
}

impl PlanGate {
    /// Judges one interval: `current` is the imbalance of the placement in force (a rollout's
    /// target while one is in progress), `candidate` that of the best new placement, both under
    /// the same predicted loads. `fresh` is false when no new sample arrived (no evidence
    /// either way). Returns why, when the candidate should be emitted now.
    pub fn judge(
        &mut self,
        stage: Stage,
        current: f64,
        candidate: f64,
        fresh: bool,
    ) -> Option<String> {
        if stage != self.stage {
            // Evidence gathered against another stage's placement does not carry over.
            self.stage = stage;
            self.streak = 0;
        }
        let (gain_needed, evidence) = match stage {
            Stage::Settled => (PLAN_GAIN, PLAN_EVIDENCE),
            Stage::Warming => (SUPERSEDE_GAIN, SUPERSEDE_EVIDENCE),
            Stage::Switching => return None,
        };
        if !fresh {
            return None;
        }
        let gain = if current.is_finite() && current > 0.0 && candidate.is_finite() {
            1.0 - candidate / current
        } else {
            0.0
        };
        if gain <= gain_needed {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak < evidence {
            return None;
        }
        self.streak = 0;
        let what = match stage {
            Stage::Warming => "supersedes the rollout in progress: its target's",
            _ => "the placement in force's",
        };
        Some(format!(
            "{what} imbalance {current:.2} -> {candidate:.2} ({:.0} % better, over {evidence} intervals; at least {:.0} % needed)",
            gain * 100.0,
            gain_needed * 100.0
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(gate: &mut PlanGate, stage: Stage, samples: &[(f64, f64)]) -> Vec<bool> {
        samples
            .iter()
            .map(|&(c, n)| gate.judge(stage, c, n, true).is_some())
            .collect()
    }

    #[test]
    fn a_settled_placement_changes_only_on_a_clear_gain_over_two_intervals() {
        let mut g = PlanGate::default();
        // One good interval is not enough; a small gain never is.
        assert_eq!(
            run(
                &mut g,
                Stage::Settled,
                &[(2.0, 1.0), (2.0, 1.9), (2.0, 1.0)]
            ),
            vec![false, false, false]
        );
        let why = g
            .judge(Stage::Settled, 2.0, 1.0, true)
            .expect("second in a row");
        assert!(
            why.contains("2.00 -> 1.00") && why.contains("50 %"),
            "{why}"
        );
        // Emitting restarts the count.
        assert!(g.judge(Stage::Settled, 2.0, 1.0, true).is_none());
        // Intervals without a fresh sample neither count nor break the streak.
        assert!(g.judge(Stage::Settled, 2.0, 1.0, false).is_none());
        assert!(g.judge(Stage::Settled, 2.0, 1.0, true).is_some());
    }

    #[test]
    fn a_warming_rollout_is_superseded_only_for_a_large_lasting_gain() {
        let mut g = PlanGate::default();
        // 20 % better than the rollout's target: never enough to abandon it.
        assert_eq!(
            run(&mut g, Stage::Warming, &[(1.5, 1.2); 6]),
            vec![false; 6]
        );
        // 40 % better on three intervals in a row supersedes it, and says so.
        assert_eq!(
            run(&mut g, Stage::Warming, &[(1.5, 0.9), (1.5, 0.9)]),
            vec![false, false]
        );
        let why = g
            .judge(Stage::Warming, 1.5, 0.9, true)
            .expect("third in a row");
        assert!(
            why.starts_with("supersedes the rollout in progress"),
            "{why}"
        );
        // An interrupted streak starts over.
        assert_eq!(
            run(
                &mut g,
                Stage::Warming,
                &[(1.5, 0.9), (1.5, 0.9), (1.5, 1.4), (1.5, 0.9)]
            ),
            vec![false, false, false, false]
        );
    }

    #[test]
    fn a_switching_rollout_is_never_superseded_and_evidence_does_not_carry_over() {
        let mut g = PlanGate::default();
        assert!(g.judge(Stage::Settled, 3.0, 1.0, true).is_none());
        assert_eq!(
            run(&mut g, Stage::Switching, &[(3.0, 1.0); 5]),
            vec![false; 5]
        );
        // Back to Settled: the streak from before the switch is gone.
        assert!(g.judge(Stage::Settled, 3.0, 1.0, true).is_none());
        assert!(g.judge(Stage::Settled, 3.0, 1.0, true).is_some());
    }

    #[test]
    fn nonsense_imbalances_never_emit() {
        let mut g = PlanGate::default();
        for (c, n) in [(f64::NAN, 1.0), (0.0, 0.0), (2.0, f64::NAN), (1.0, 1.0)] {
            assert!(g.judge(Stage::Settled, c, n, true).is_none());
            assert!(g.judge(Stage::Settled, c, n, true).is_none());
        }
    }
}
