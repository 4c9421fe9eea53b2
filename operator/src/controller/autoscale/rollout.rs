//! Rolls a new expert placement out so that no request fails: shards first load the experts
//! they are about to receive (`Warming`: routing unchanged, shard pods roll with the larger
//! set), then the router switches (`Switching`: shards still hold the old experts too, so a
//! router that has not reloaded yet is still served), then shards drop what they no longer
//! serve (`Active`). Pure: the loop feeds it what the Deployments report.

use std::time::{Duration, Instant};

use crate::autoscaler::{ExpertPlan, ExpertsConfig};
use crate::children::initial_assignment;
use crate::crd::{PlacementPolicy, PlacementStatus, ShardPlacement};

pub const WARMING: &str = "Warming";
pub const SWITCHING: &str = "Switching";
pub const ACTIVE: &str = "Active";

/// What survives between ticks (lost on restart; every stage copes with that).
#[derive(Debug, Default)]
pub struct Tracker {
    target: Option<Vec<Vec<u32>>>,
    switched_at: Option<Instant>,
}

fn sorted(v: &[u32]) -> Vec<u32> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
    sorted(&[a, b].concat())
}

/// The held-experts annotation value for a list (see `children::ANNOTATION_HELD_EXPERTS`).
pub fn held_annotation(held: &[u32]) -> String {
    held.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn placement(version: u32, phase: &str, routed: &[Vec<u32>], held: &[Vec<u32>]) -> PlacementStatus {
    PlacementStatus {
        version,
        phase: phase.into(),
        shards: routed
            .iter()
            .zip(held)
            .enumerate()
            .map(|(k, (r, h))| ShardPlacement {
                shard: k as u32,
                experts: sorted(r),
                held: sorted(h),
            })
            .collect(),
    }
}

impl Tracker {
    /// The placement status to write now, if it changes. `shards_ready[k]` is shard k's
    /// held-experts annotation when its Deployment is fully rolled out (else `None`).
    #[allow(clippy::too_many_arguments)]
    pub fn advance(
        &mut self,
        current: Option<&PlacementStatus>,
        plan: Option<&ExpertPlan>,
        cfg: &ExpertsConfig,
        policy: Option<PlacementPolicy>,
        shards_ready: &[Option<String>],
        now: Instant,
        settle: Duration,
    ) -> Option<PlacementStatus> {
        let initial;
        let current = match current.filter(|c| c.shards.len() == cfg.shards as usize) {
            Some(c) => c,
            None => {
                let a = initial_assignment(
                    cfg.num_experts,
                    cfg.shards,
                    policy.unwrap_or(PlacementPolicy::Balanced),
                );
                initial = placement(1, ACTIVE, &a, &a);
                &initial
            }
        };
        let routed: Vec<Vec<u32>> = current.shards.iter().map(|s| sorted(&s.experts)).collect();
        let held: Vec<Vec<u32>> = current.shards.iter().map(|s| sorted(&s.held)).collect();
        let all_ready = current.shards.iter().enumerate().all(|(k, s)| {
            shards_ready.get(k).and_then(|r| r.as_deref())
                == Some(held_annotation(&s.held).as_str())
        });
        match current.phase.as_str() {
            WARMING => match &self.target {
                // Restarted mid-rollout: the target is gone, settle on what is routed.
                None => Some(placement(current.version + 1, ACTIVE, &routed, &routed)),
                Some(t) if all_ready => {
                    self.switched_at = Some(now);
                    Some(placement(current.version, SWITCHING, t, &held))
                }
                Some(_) => None,
            },
            SWITCHING => {
                let since = *self.switched_at.get_or_insert(now);
                // Routers reload the plan file when the ConfigMap volume updates; wait for it.
                if now.duration_since(since) >= settle {
                    self.target = None;
                    self.switched_at = None;
                    Some(placement(current.version, ACTIVE, &routed, &routed))
                } else {
                    None
                }
            }
            _ => {
                let plan = plan?;
                let new: Vec<Vec<u32>> = plan.shards.iter().map(|s| sorted(s)).collect();
                if new.len() != routed.len() || new == routed {
                    return None;
                }
                let warm: Vec<Vec<u32>> =
                    routed.iter().zip(&new).map(|(a, b)| union(a, b)).collect();
                self.target = Some(new);
                Some(placement(current.version + 1, WARMING, &routed, &warm))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::Bounds;

    fn cfg() -> ExpertsConfig {
        ExpertsConfig {
            num_experts: 4,
            shards: 2,
            per_shard: Bounds { min: 1, max: 4 },
            slots_per_shard: 3,
            target_tokens_per_s_per_replica: 100.0,
        }
    }

    fn plan(shards: Vec<Vec<u32>>) -> ExpertPlan {
        ExpertPlan {
            replicas: vec![1; shards.len()],
            shards,
            imbalance: 1.0,
        }
    }

    fn ready(p: &PlacementStatus) -> Vec<Option<String>> {
        p.shards
            .iter()
            .map(|s| Some(held_annotation(&s.held)))
            .collect()
    }

    #[test]
    fn a_new_plan_warms_then_switches_then_drops() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let settle = Duration::from_secs(30);
        // Balanced initial: [0,2] [1,3]. New: [0,1,2] [3] (expert 1 moves).
        let new = plan(vec![vec![0, 1, 2], vec![3]]);
        let w = t
            .advance(None, Some(&new), &cfg(), None, &[], t0, settle)
            .expect("warming starts");
        assert_eq!(w.phase, WARMING);
        assert_eq!(w.version, 2);
        assert_eq!(
            w.shards[0].experts,
            vec![0, 2],
            "routing unchanged while warming"
        );
        assert_eq!(
            w.shards[0].held,
            vec![0, 1, 2],
            "shard 0 loads expert 1 first"
        );
        assert_eq!(
            w.shards[1].held,
            vec![1, 3],
            "shard 1 keeps expert 1 for now"
        );

        // Shards not rolled out with the new held sets yet: wait.
        let stale = vec![Some("0,2".to_string()), Some("1,3".to_string())];
        assert_eq!(
            t.advance(Some(&w), None, &cfg(), None, &stale, t0, settle),
            None
        );
        let s = t
            .advance(Some(&w), None, &cfg(), None, &ready(&w), t0, settle)
            .expect("switch");
        assert_eq!(s.phase, SWITCHING);
        assert_eq!(s.shards[0].experts, vec![0, 1, 2]);
        assert_eq!(s.shards[1].experts, vec![3]);
        assert_eq!(
            s.shards[1].held,
            vec![1, 3],
            "old holder still serves stale routers"
        );

        assert_eq!(
            t.advance(Some(&s), None, &cfg(), None, &ready(&s), t0, settle),
            None
        );
        let a = t
            .advance(
                Some(&s),
                None,
                &cfg(),
                None,
                &ready(&s),
                t0 + settle,
                settle,
            )
            .expect("active");
        assert_eq!(a.phase, ACTIVE);
        assert_eq!(a.shards[1].held, vec![3]);
        // Every stage: every expert is routed somewhere and held where it is routed.
        for p in [&w, &s, &a] {
            let mut all: Vec<u32> = p.shards.iter().flat_map(|s| s.experts.clone()).collect();
            all.sort();
            all.dedup();
            assert_eq!(all, vec![0, 1, 2, 3]);
            for sh in &p.shards {
                assert!(sh.experts.iter().all(|e| sh.held.contains(e)));
            }
        }
    }

    #[test]
    fn same_plan_or_restart_mid_rollout_settles() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let same = plan(vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(
            t.advance(None, Some(&same), &cfg(), None, &[], now, Duration::ZERO),
            None
        );
        let warming = placement(
            5,
            WARMING,
            &[vec![0, 2], vec![1, 3]],
            &[vec![0, 1, 2], vec![1, 3]],
        );
        let mut fresh = Tracker::default();
        let p = fresh
            .advance(Some(&warming), None, &cfg(), None, &[], now, Duration::ZERO)
            .unwrap();
        assert_eq!(p.phase, ACTIVE);
        assert_eq!(p.shards[0].held, vec![0, 2]);
    }
}
