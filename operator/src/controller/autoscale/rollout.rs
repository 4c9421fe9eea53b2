//! Rolls a new expert placement out so that no request fails: shards first load the experts
//! they are about to receive (`Warming`: routing unchanged, shard pods roll with the larger
//! set), then the router switches (`Switching`: shards still hold the old experts too, so a
//! router that has not reloaded yet is still served), then shards drop what they no longer
//! serve (`Active`). Pure: the loop feeds it what the Deployments report.
//!
//! The rollout's target lives in the status (`shards[].target`), so a restarted operator or a
//! new leader finishes it instead of abandoning it. A rollout in progress is replaced only by a
//! plan the core's [`crate::autoscaler::plan_gate`] lets through, and the status says why.
//! [`check_transition`] holds on every path: routing never points at an expert a shard does not
//! hold, and only `Warming` makes a shard load anything.

use std::time::{Duration, Instant};

use crate::autoscaler::{ExpertPlan, ExpertsConfig, PlacementFacts, Stage};
use crate::children::initial_assignment;
use crate::crd::{PlacementPolicy, PlacementStatus, ShardPlacement};

pub const WARMING: &str = "Warming";
pub const SWITCHING: &str = "Switching";
pub const ACTIVE: &str = "Active";

/// What survives between ticks (lost on restart; every stage copes with that).
#[derive(Debug, Default)]
pub struct Tracker {
    switched_at: Option<Instant>,
    /// The last placement written: the watch cache may not show it yet.
    written: Option<PlacementStatus>,
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

fn subset(a: &[u32], b: &[u32]) -> bool {
    a.iter().all(|x| b.contains(x))
}

/// The held-experts annotation value for a list (see `children::ANNOTATION_HELD_EXPERTS`).
pub fn held_annotation(held: &[u32]) -> String {
    held.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn placement(
    version: u32,
    phase: &str,
    routed: &[Vec<u32>],
    held: &[Vec<u32>],
    target: Option<&[Vec<u32>]>,
    message: Option<String>,
) -> PlacementStatus {
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
                target: target.and_then(|t| t.get(k)).map(|t| sorted(t)),
            })
            .collect(),
        message,
    }
}

/// Orders placements by progress: a later version, or a later phase of the same version.
fn progress(p: &PlacementStatus) -> (u32, u8) {
    let phase = match p.phase.as_str() {
        WARMING => 0,
        SWITCHING => 1,
        _ => 2,
    };
    (p.version, phase)
}

/// The rollout's target, when every shard records one.
fn target_of(p: &PlacementStatus) -> Option<Vec<Vec<u32>>> {
    p.shards.iter().map(|s| s.target.clone()).collect()
}

/// What the core needs to know of a placement: where routing is heading, and the stage.
pub fn facts(current: &PlacementStatus) -> PlacementFacts {
    let routed = || current.shards.iter().map(|s| sorted(&s.experts)).collect();
    match current.phase.as_str() {
        WARMING => PlacementFacts {
            shards: target_of(current).unwrap_or_else(routed),
            stage: Stage::Warming,
        },
        SWITCHING => PlacementFacts {
            shards: routed(),
            stage: Stage::Switching,
        },
        _ => PlacementFacts {
            shards: routed(),
            stage: Stage::Settled,
        },
    }
}

/// Checks the step `from -> to`: every expert is routed somewhere and held where it is routed;
/// routing does not change while `Warming`; outside `Warming` no shard loads an expert it did
/// not hold; `Active` holds exactly what is routed.
pub fn check_transition(from: &PlacementStatus, to: &PlacementStatus) -> Result<(), String> {
    if from.shards.len() != to.shards.len() {
        return Err(format!(
            "{} shards became {}",
            from.shards.len(),
            to.shards.len()
        ));
    }
    let routed: Vec<u32> = sorted(
        &to.shards
            .iter()
            .flat_map(|s| s.experts.clone())
            .collect::<Vec<_>>(),
    );
    let was: Vec<u32> = sorted(
        &from
            .shards
            .iter()
            .flat_map(|s| s.experts.clone())
            .collect::<Vec<_>>(),
    );
    if !subset(&was, &routed) {
        return Err(format!("experts {was:?} were routed, now only {routed:?}"));
    }
    for (f, t) in from.shards.iter().zip(&to.shards) {
        let k = t.shard;
        if !subset(&t.experts, &t.held) {
            return Err(format!(
                "shard {k} routes {:?} but holds {:?}",
                t.experts, t.held
            ));
        }
        match to.phase.as_str() {
            WARMING if sorted(&t.experts) != sorted(&f.experts) => {
                return Err(format!("shard {k}: routing changed while warming"));
            }
            WARMING => {}
            _ if !subset(&t.held, &f.held) => {
                return Err(format!(
                    "shard {k} would load {:?} in phase {} (only Warming loads experts)",
                    t.held, to.phase
                ));
            }
            ACTIVE if sorted(&t.held) != sorted(&t.experts) => {
                return Err(format!("shard {k}: Active but holds more than it serves"));
            }
            _ => {}
        }
    }
    Ok(())
}

impl Tracker {
    /// The placement in force: the status's, unless this tracker wrote a later one the watch
    /// cache does not show yet; the initial assignment when there is none (or it does not fit).
    pub fn current(
        &self,
        status: Option<&PlacementStatus>,
        cfg: &ExpertsConfig,
        policy: Option<PlacementPolicy>,
    ) -> PlacementStatus {
        let fits = |p: &&PlacementStatus| p.shards.len() == cfg.shards as usize;
        let status = status.filter(fits);
        let written = self.written.as_ref().filter(fits);
        match (status, written) {
            (Some(s), Some(w)) if progress(w) > progress(s) => w.clone(),
            (Some(s), _) => s.clone(),
            (None, Some(w)) => w.clone(),
            (None, None) => {
                let a = initial_assignment(
                    cfg.num_experts,
                    cfg.shards,
                    policy.unwrap_or(PlacementPolicy::Balanced),
                );
                placement(1, ACTIVE, &a, &a, None, None)
            }
        }
    }

    /// Records that `p` was written to the status.
    pub fn wrote(&mut self, p: &PlacementStatus) {
        self.written = Some(p.clone());
    }

    /// The placement status to write now, if it changes. `plan` is the core's new plan (it
    /// already passed the plan gate for this stage); `shards_ready[k]` is shard k's
    /// held-experts annotation when its Deployment is fully rolled out (else `None`).
    pub fn advance(
        &mut self,
        current: &PlacementStatus,
        plan: Option<&ExpertPlan>,
        shards_ready: &[Option<String>],
        now: Instant,
        settle: Duration,
    ) -> Option<PlacementStatus> {
        let next = self.next(current, plan, shards_ready, now, settle)?;
        match check_transition(current, &next) {
            Ok(()) => Some(next),
            Err(e) => {
                // Never write a placement that could route to a shard lacking the expert.
                tracing::error!(error = %e, "placement transition refused");
                None
            }
        }
    }

    fn next(
        &mut self,
        current: &PlacementStatus,
        plan: Option<&ExpertPlan>,
        shards_ready: &[Option<String>],
        now: Instant,
        settle: Duration,
    ) -> Option<PlacementStatus> {
        let v = current.version;
        let routed: Vec<Vec<u32>> = current.shards.iter().map(|s| sorted(&s.experts)).collect();
        let held: Vec<Vec<u32>> = current.shards.iter().map(|s| sorted(&s.held)).collect();
        let all_ready = current.shards.iter().enumerate().all(|(k, s)| {
            shards_ready.get(k).and_then(|r| r.as_deref())
                == Some(held_annotation(&s.held).as_str())
        });
        let new_target = |p: &ExpertPlan| -> Option<Vec<Vec<u32>>> {
            let new: Vec<Vec<u32>> = p.shards.iter().map(|s| sorted(s)).collect();
            (new.len() == routed.len()).then_some(new)
        };
        match current.phase.as_str() {
            WARMING => match (target_of(current), plan.and_then(new_target)) {
                // Written by an operator that did not record targets: nothing to finish, so
                // keep routing as it is and drop what was warmed (no shard loads anything).
                (None, _) => Some(placement(
                    v + 1,
                    ACTIVE,
                    &routed,
                    &routed,
                    None,
                    Some(format!(
                        "plan {v} recorded no target; settled on the routed placement"
                    )),
                )),
                (Some(t), Some(new)) if new != t => {
                    let warm: Vec<Vec<u32>> =
                        routed.iter().zip(&new).map(|(a, b)| union(a, b)).collect();
                    let why = plan.map(|p| p.reason.as_str()).unwrap_or_default();
                    Some(placement(
                        v + 1,
                        WARMING,
                        &routed,
                        &warm,
                        Some(&new),
                        Some(format!("supersedes plan {v}: {why}")),
                    ))
                }
                (Some(t), _) if all_ready => {
                    self.switched_at = Some(now);
                    Some(placement(
                        v,
                        SWITCHING,
                        &t,
                        &held,
                        None,
                        current.message.clone(),
                    ))
                }
                _ => None,
            },
            SWITCHING => {
                let since = *self.switched_at.get_or_insert(now);
                // Routers reload the plan file when the ConfigMap volume updates; wait for it.
                if now.duration_since(since) >= settle {
                    self.switched_at = None;
                    Some(placement(
                        v,
                        ACTIVE,
                        &routed,
                        &routed,
                        None,
                        current.message.clone(),
                    ))
                } else {
                    None
                }
            }
            _ => {
                let new = plan.and_then(new_target)?;
                if new == routed {
                    return None;
                }
                let warm: Vec<Vec<u32>> =
                    routed.iter().zip(&new).map(|(a, b)| union(a, b)).collect();
                Some(placement(
                    v + 1,
                    WARMING,
                    &routed,
                    &warm,
                    Some(&new),
                    plan.map(|p| p.reason.clone()),
                ))
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
            reason: "because".into(),
        }
    }

    fn ready(p: &PlacementStatus) -> Vec<Option<String>> {
        p.shards
            .iter()
            .map(|s| Some(held_annotation(&s.held)))
            .collect()
    }

    const SETTLE: Duration = Duration::from_secs(30);

    /// `t`'s initial placement and the Warming placement its first plan `shards` starts.
    fn start(
        t: &mut Tracker,
        shards: Vec<Vec<u32>>,
        at: Instant,
    ) -> (PlacementStatus, PlacementStatus) {
        let initial = t.current(None, &cfg(), None);
        let w = t
            .advance(&initial, Some(&plan(shards)), &[], at, SETTLE)
            .expect("warming starts");
        (initial, w)
    }

    #[test]
    fn a_new_plan_warms_then_switches_then_drops() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        // Balanced initial: [0,2] [1,3]. New: [0,1,2] [3] (expert 1 moves).
        let initial = t.current(None, &cfg(), None);
        assert_eq!((initial.version, initial.phase.as_str()), (1, ACTIVE));
        assert_eq!(facts(&initial).stage, Stage::Settled);
        let new = plan(vec![vec![0, 1, 2], vec![3]]);
        let w = t
            .advance(&initial, Some(&new), &[], t0, SETTLE)
            .expect("warming starts");
        assert_eq!((w.version, w.phase.as_str()), (2, WARMING));
        assert_eq!(w.message.as_deref(), Some("because"));
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
        assert_eq!(w.shards[0].target, Some(vec![0, 1, 2]));
        assert_eq!(
            facts(&w),
            PlacementFacts {
                shards: vec![vec![0, 1, 2], vec![3]],
                stage: Stage::Warming
            },
            "the core judges new plans against the rollout's target"
        );

        // Shards not rolled out with the new held sets yet: wait.
        let stale = vec![Some("0,2".to_string()), Some("1,3".to_string())];
        assert_eq!(t.advance(&w, None, &stale, t0, SETTLE), None);
        let s = t.advance(&w, None, &ready(&w), t0, SETTLE).expect("switch");
        assert_eq!(s.phase, SWITCHING);
        assert_eq!(s.shards[0].experts, vec![0, 1, 2]);
        assert_eq!(s.shards[1].experts, vec![3]);
        assert_eq!(
            s.shards[1].held,
            vec![1, 3],
            "old holder still serves stale routers"
        );
        assert!(s.shards.iter().all(|x| x.target.is_none()));

        assert_eq!(t.advance(&s, None, &ready(&s), t0, SETTLE), None);
        let a = t
            .advance(&s, None, &ready(&s), t0 + SETTLE, SETTLE)
            .expect("active");
        assert_eq!(a.phase, ACTIVE);
        assert_eq!(a.shards[1].held, vec![3]);
        for (from, to) in [(&initial, &w), (&w, &s), (&s, &a)] {
            check_transition(from, to).unwrap();
        }
    }

    #[test]
    fn a_restarted_operator_finishes_the_rollout_it_finds() {
        let t0 = Instant::now();
        let mut first = Tracker::default();
        let (_, w) = start(&mut first, vec![vec![0, 1, 2], vec![1, 3]], t0);
        // A new leader: no memory, only the status.
        let mut fresh = Tracker::default();
        let current = fresh.current(Some(&w), &cfg(), None);
        assert_eq!(current, w);
        assert_eq!(
            fresh.advance(&current, None, &[], t0, SETTLE),
            None,
            "waits for shards"
        );
        let s = fresh
            .advance(&current, None, &ready(&w), t0, SETTLE)
            .expect("the rollout goes on");
        assert_eq!((s.version, s.phase.as_str()), (2, SWITCHING));
        assert_eq!(s.shards[0].experts, vec![0, 1, 2]);
    }

    #[test]
    fn a_warming_plan_without_a_target_settles_without_loading_anything() {
        // Written by an operator that did not record targets.
        let mut w = placement(
            5,
            WARMING,
            &[vec![0, 2], vec![1, 3]],
            &[vec![0, 1, 2], vec![1, 3]],
            None,
            None,
        );
        w.message = None;
        let p = Tracker::default()
            .advance(&w, None, &[], Instant::now(), Duration::ZERO)
            .unwrap();
        assert_eq!((p.version, p.phase.as_str()), (6, ACTIVE));
        assert_eq!(p.shards[0].held, vec![0, 2]);
        assert!(p.message.unwrap().contains("recorded no target"));
    }

    #[test]
    fn a_superseded_rollout_says_so_and_warms_the_new_target() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let (_, w) = start(&mut t, vec![vec![0, 1, 2], vec![1, 3]], t0);
        // The same target again is no new rollout.
        assert_eq!(
            t.advance(
                &w,
                Some(&plan(vec![vec![0, 1, 2], vec![1, 3]])),
                &[],
                t0,
                SETTLE
            ),
            None
        );
        let mut better = plan(vec![vec![0, 2, 3], vec![1, 3]]);
        better.reason = "supersedes the rollout in progress: much better".into();
        let w2 = t.advance(&w, Some(&better), &[], t0, SETTLE).unwrap();
        assert_eq!((w2.version, w2.phase.as_str()), (3, WARMING));
        assert_eq!(w2.shards[0].experts, vec![0, 2], "routing still unchanged");
        assert_eq!(
            w2.shards[0].held,
            vec![0, 2, 3],
            "expert 1 warmed for plan 2 is dropped"
        );
        assert_eq!(w2.shards[0].target, Some(vec![0, 2, 3]));
        let msg = w2.message.clone().unwrap();
        assert!(
            msg.starts_with("supersedes plan 2: supersedes the rollout"),
            "{msg}"
        );
        check_transition(&w, &w2).unwrap();
        // No plan replaces a switching rollout here either: the core never emits one then,
        // and the tracker would only act on a ready Warming.
        let s = t.advance(&w2, None, &ready(&w2), t0, SETTLE).unwrap();
        assert_eq!(s.phase, SWITCHING);
        assert_eq!(
            t.advance(
                &s,
                Some(&plan(vec![vec![0, 1], vec![2, 3]])),
                &ready(&s),
                t0,
                SETTLE
            ),
            None
        );
    }

    #[test]
    fn the_placement_written_last_wins_over_a_stale_cache() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let (initial, w) = start(&mut t, vec![vec![0, 1, 2], vec![3]], t0);
        t.wrote(&w);
        // The watch cache still shows no placement, or the one before.
        assert_eq!(t.current(None, &cfg(), None), w);
        assert_eq!(t.current(Some(&initial), &cfg(), None), w);
        // The status moved on past what this tracker wrote: the status wins.
        let s = t.advance(&w, None, &ready(&w), t0, SETTLE).unwrap();
        assert_eq!(t.current(Some(&s), &cfg(), None), s);
        // A placement for another shard count does not fit.
        let mut other = cfg();
        other.shards = 3;
        assert_eq!(t.current(Some(&s), &other, None).shards.len(), 3);
    }

    #[test]
    fn every_path_keeps_routed_experts_held_and_only_warming_loads() {
        // Drive the tracker through many plan/readiness sequences (deterministic LCG) and check
        // every transition it makes.
        let plans = [
            vec![vec![0, 1, 2], vec![3]],
            vec![vec![0, 2, 3], vec![1, 3]],
            vec![vec![0, 1], vec![2, 3]],
            vec![vec![1, 2, 3], vec![0, 1]],
            vec![vec![0, 2], vec![1, 3]],
        ];
        let mut seed = 7u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let t0 = Instant::now();
        let mut transitions = 0;
        for _ in 0..50 {
            let mut t = Tracker::default();
            let mut cur = t.current(None, &cfg(), None);
            for step in 0..40u64 {
                let p =
                    (rnd(3) == 0).then(|| plan(plans[rnd(plans.len() as u64) as usize].clone()));
                let ready_now = if rnd(2) == 0 { ready(&cur) } else { vec![] };
                // Sometimes a new leader takes over with only the status.
                if rnd(10) == 0 {
                    t = Tracker::default();
                }
                let now = t0 + Duration::from_secs(step * 10);
                if let Some(next) = t.advance(&cur, p.as_ref(), &ready_now, now, SETTLE) {
                    check_transition(&cur, &next)
                        .unwrap_or_else(|e| panic!("{cur:?} -> {next:?}: {e}"));
                    assert!(progress(&next) > progress(&cur), "{cur:?} -> {next:?}");
                    cur = next;
                    transitions += 1;
                }
            }
        }
        assert!(transitions > 200, "{transitions} transitions exercised");
    }

    #[test]
    fn check_transition_rejects_what_would_fail_a_request() {
        let a = placement(
            1,
            ACTIVE,
            &[vec![0, 2], vec![1, 3]],
            &[vec![0, 2], vec![1, 3]],
            None,
            None,
        );
        // Straight to Active while a shard has to load expert 1.
        let jump = placement(
            2,
            ACTIVE,
            &[vec![0, 1, 2], vec![3]],
            &[vec![0, 1, 2], vec![3]],
            None,
            None,
        );
        assert!(
            check_transition(&a, &jump)
                .unwrap_err()
                .contains("would load")
        );
        // Routing to an expert the shard does not hold.
        let bad = placement(
            2,
            SWITCHING,
            &[vec![0, 1, 2], vec![3]],
            &[vec![0, 2], vec![1, 3]],
            None,
            None,
        );
        assert!(check_transition(&a, &bad).unwrap_err().contains("routes"));
        // Routing changed while warming.
        let w = placement(
            2,
            WARMING,
            &[vec![0, 1, 2], vec![3]],
            &[vec![0, 1, 2], vec![1, 3]],
            None,
            None,
        );
        assert!(
            check_transition(&a, &w)
                .unwrap_err()
                .contains("routing changed")
        );
        // An expert no longer routed anywhere.
        let lost = placement(
            2,
            WARMING,
            &[vec![0, 2], vec![1]],
            &[vec![0, 2], vec![1]],
            None,
            None,
        );
        assert!(check_transition(&a, &lost).is_err());
    }
}
