//! EPLB-style expert placement: which experts each shard holds, and replicas per shard.
//!
//! 1. Redundancy: every expert gets one copy; the spare slots (`shards * slots - experts`) go,
//!    one at a time, to the expert with the highest load per copy (an expert is never held twice
//!    by one shard). The load of an expert is split evenly across its holders.
//! 2. Packing: copies in decreasing order of load per copy (LPT), each to the least loaded shard
//!    that has a free slot and does not hold that expert yet.
//! 3. Replicas: each shard gets the replicas its load needs at the per-replica target, within its
//!    bounds; when the budget cannot cover that, replicas are handed out one at a time to the
//!    shard with the highest load per replica (D'Hondt), which minimises the maximum.
//!
//! Deterministic: ties break on the lower expert id / shard index.

use super::types::{Bounds, ExpertPlan};

/// Load of each shard when each expert's `loads[e]` is split evenly across its holders.
pub fn shard_loads(placement: &[Vec<u32>], loads: &[f64]) -> Vec<f64> {
    let mut holders = vec![0u32; loads.len()];
    for shard in placement {
        for &e in shard {
            if let Some(h) = holders.get_mut(e as usize) {
                *h += 1;
            }
        }
    }
    placement
        .iter()
        .map(|shard| {
            shard
                .iter()
                .filter_map(|&e| {
                    let e = e as usize;
                    let h = *holders.get(e)?;
                    Some(clean(loads[e]) / f64::from(h.max(1)))
                })
                .sum()
        })
        .collect()
}

fn clean(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

/// max / mean load per replica; 1.0 when there is no load. A shard with load and no replica
/// counts as one replica.
pub fn imbalance(shard_loads: &[f64], replicas: &[u32]) -> f64 {
    let total: f64 = shard_loads.iter().sum();
    let total_replicas: u32 = shard_loads
        .iter()
        .zip(replicas)
        .map(|(_, &r)| r.max(1))
        .sum();
    if total <= 0.0 || total_replicas == 0 {
        return 1.0;
    }
    let mean = total / f64::from(total_replicas);
    let max = shard_loads
        .iter()
        .zip(replicas)
        .map(|(&l, &r)| l / f64::from(r.max(1)))
        .fold(0.0, f64::max);
    max / mean
}

/// Expert `e` on shard `e % shards`: the placement before any plan.
pub fn round_robin(num_experts: u32, shards: u32) -> Vec<Vec<u32>> {
    let s = shards.max(1);
    let mut out = vec![Vec::new(); s as usize];
    for e in 0..num_experts {
        out[(e % s) as usize].push(e);
    }
    out
}

/// Places expert copies into `shards` shards of `slots` slots (at least enough for one copy each).
pub fn place(loads: &[f64], shards: u32, slots: u32) -> Vec<Vec<u32>> {
    let n = loads.len();
    let s = shards.max(1) as usize;
    let slots = (slots as usize).max(n.div_ceil(s)).max(1);
    let loads: Vec<f64> = loads.iter().map(|&l| clean(l)).collect();

    // 1. Redundant copies into the spare slots.
    let mut copies = vec![1usize; n];
    let spare = (s * slots).saturating_sub(n);
    for _ in 0..spare {
        let best = (0..n).filter(|&e| copies[e] < s).max_by(|&a, &b| {
            let (la, lb) = (loads[a] / copies[a] as f64, loads[b] / copies[b] as f64);
            la.total_cmp(&lb).then(b.cmp(&a))
        });
        match best {
            Some(e) => copies[e] += 1,
            None => break,
        }
    }

    // 2. LPT packing.
    let mut items: Vec<(f64, usize)> = (0..n)
        .flat_map(|e| std::iter::repeat_n((loads[e] / copies[e] as f64, e), copies[e]))
        .collect();
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); s];
    let mut load = vec![0.0f64; s];
    for (l, e) in items {
        let target = (0..s)
            .filter(|&i| out[i].len() < slots && !out[i].contains(&(e as u32)))
            .min_by(|&a, &b| {
                load[a]
                    .total_cmp(&load[b])
                    .then(out[a].len().cmp(&out[b].len()))
                    .then(a.cmp(&b))
            });
        // No eligible shard: the copy is dropped and the other holders share its load.
        if let Some(i) = target {
            out[i].push(e as u32);
            load[i] += l;
        }
    }
    for shard in &mut out {
        shard.sort_unstable();
    }
    out
}

/// Replicas per shard: what each shard's load needs at `target_per_replica`, within `bounds`,
/// at most `budget` in all (the minimums always hold).
pub fn replicas(
    shard_loads: &[f64],
    bounds: Bounds,
    target_per_replica: f64,
    budget: u32,
) -> Vec<u32> {
    let (lo, hi) = (bounds.min, bounds.max.max(bounds.min));
    let target = if target_per_replica.is_finite() && target_per_replica > 0.0 {
        target_per_replica
    } else {
        1.0
    };
    let need: Vec<u32> = shard_loads
        .iter()
        .map(|&l| {
            let want = (clean(l) / target - 1e-9).ceil().min(f64::from(u32::MAX));
            (want as u32).clamp(lo, hi)
        })
        .collect();
    let total: u64 = need.iter().map(|&r| u64::from(r)).sum();
    if total <= u64::from(budget) {
        return need;
    }
    // Over budget: start from the minimums and hand out one replica at a time to the shard with
    // the highest load per replica.
    let mut r: Vec<u32> = vec![lo; shard_loads.len()];
    let mut used: u64 = r.iter().map(|&x| u64::from(x)).sum();
    while used < u64::from(budget) {
        let best = (0..r.len()).filter(|&i| r[i] < need[i]).max_by(|&a, &b| {
            let pa = clean(shard_loads[a]) / f64::from(r[a].max(1));
            let pb = clean(shard_loads[b]) / f64::from(r[b].max(1));
            pa.total_cmp(&pb).then(b.cmp(&a))
        });
        match best {
            Some(i) => {
                r[i] += 1;
                used += 1;
            }
            None => break,
        }
    }
    r
}

/// A full plan for predicted per-expert `loads`.
pub fn plan(
    loads: &[f64],
    shards: u32,
    slots: u32,
    bounds: Bounds,
    target_per_replica: f64,
    budget: u32,
) -> ExpertPlan {
    let placement = place(loads, shards, slots);
    evaluate(placement, loads, bounds, target_per_replica, budget)
}

/// Replicas and imbalance of an existing `placement` under `loads`.
pub fn evaluate(
    placement: Vec<Vec<u32>>,
    loads: &[f64],
    bounds: Bounds,
    target_per_replica: f64,
    budget: u32,
) -> ExpertPlan {
    let sl = shard_loads(&placement, loads);
    let r = replicas(&sl, bounds, target_per_replica, budget);
    let imbalance = imbalance(&sl, &r);
    ExpertPlan {
        shards: placement,
        replicas: r,
        imbalance,
        reason: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zipf(n: usize, s: f64, total: f64) -> Vec<f64> {
        let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let sum: f64 = w.iter().sum();
        // Scatter the ranks over expert ids so the hot ones are not all on shard 0 by accident.
        let mut out = vec![0.0; n];
        for (rank, wk) in w.iter().enumerate() {
            out[(rank * 7) % n] = total * wk / sum;
        }
        out
    }

    #[test]
    fn zipf_plan_beats_round_robin() {
        let (n, s, slots) = (64usize, 8u32, 10u32);
        let loads = zipf(n, 1.2, 64_000.0);
        let bounds = Bounds { min: 1, max: 16 };
        let target = 1000.0;
        let budget = 40;
        let p = plan(&loads, s, slots, bounds, target, budget);

        // Baseline: round-robin placement, equal replicas.
        let rr = round_robin(n as u32, s);
        let rr_loads = shard_loads(&rr, &loads);
        let equal = vec![budget / s; s as usize];
        let base = imbalance(&rr_loads, &equal);
        assert!(
            p.imbalance < 0.6 * base,
            "plan imbalance {:.2} vs round-robin {:.2}",
            p.imbalance,
            base
        );
        assert!(p.imbalance >= 1.0 - 1e-9);

        // Every expert placed, slots respected, no duplicate within a shard.
        let mut held = vec![0u32; n];
        for shard in &p.shards {
            assert!(shard.len() <= slots as usize);
            let mut sorted = shard.clone();
            sorted.dedup();
            assert_eq!(sorted.len(), shard.len());
            for &e in shard {
                held[e as usize] += 1;
            }
        }
        assert!(held.iter().all(|&h| h >= 1));
        // The hottest expert got redundant copies.
        let hottest = (0..n)
            .max_by(|&a, &b| loads[a].total_cmp(&loads[b]))
            .unwrap();
        assert!(held[hottest] >= 2);
        // Bounds and budget.
        assert_eq!(p.replicas.len(), s as usize);
        assert!(
            p.replicas
                .iter()
                .all(|&r| (bounds.min..=bounds.max).contains(&r))
        );
        assert!(p.replicas.iter().sum::<u32>() <= budget);
        // Total load is conserved by the split.
        let total: f64 = shard_loads(&p.shards, &loads).iter().sum();
        assert!((total - 64_000.0).abs() < 1e-6);
    }

    #[test]
    fn replicas_meet_need_within_budget_and_bounds() {
        let b = Bounds { min: 1, max: 5 };
        // Enough budget: exactly what each shard needs.
        assert_eq!(
            replicas(&[250.0, 90.0, 0.0, 900.0], b, 100.0, 100),
            vec![3, 1, 1, 5]
        );
        // Tight budget: the minimums plus the highest loads per replica.
        let r = replicas(&[400.0, 100.0, 100.0], b, 100.0, 5);
        assert_eq!(r, vec![3, 1, 1]);
        // Budget below the minimums: the minimums hold.
        let r = replicas(&[400.0, 100.0], Bounds { min: 2, max: 5 }, 100.0, 1);
        assert_eq!(r, vec![2, 2]);
    }

    #[test]
    fn tight_slots_place_every_expert_once() {
        let loads = zipf(16, 1.2, 1000.0);
        let p = place(&loads, 4, 4);
        let mut all: Vec<u32> = p.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<u32>>());
        assert!(p.iter().all(|s| s.len() == 4));
    }
}
