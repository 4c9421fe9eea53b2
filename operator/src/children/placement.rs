//! The expert placement plan: which experts each shard holds and where it is reachable. The
//! controller writes it into a ConfigMap the router reads; the autoscaler refines it from load.

use serde::{Deserialize, Serialize};

use crate::crd::PlacementPolicy;

/// One shard of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlan {
    pub shard: u32,
    /// Experts the router sends to this shard.
    pub experts: Vec<u32>,
    /// Experts the shard must load, when more than `experts` (a plan being rolled out: the
    /// shard warms the experts it is about to receive, or keeps those it is about to lose).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<u32>,
    /// Base URL of the shard's Service (it balances over the shard's replicas).
    pub endpoint: String,
    pub replicas: i32,
}

/// The whole plan, as JSON in the ConfigMap's `plan.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPlan {
    pub version: u32,
    pub num_experts: u32,
    pub shards: Vec<ShardPlan>,
}

/// The initial assignment of experts to shards, before any load is measured. `Contiguous`
/// keeps neighbours together; `Balanced` interleaves them (expert ids carry no load
/// information yet, so interleaving spreads any id-correlated skew). Every expert is held by
/// exactly one shard and every shard holds at least one expert (shards <= experts).
pub fn initial_assignment(num_experts: u32, shards: u32, policy: PlacementPolicy) -> Vec<Vec<u32>> {
    let shards = shards.max(1);
    let mut out = vec![Vec::new(); shards as usize];
    for e in 0..num_experts {
        let k = match policy {
            PlacementPolicy::Contiguous => {
                (u64::from(e) * u64::from(shards) / u64::from(num_experts)) as usize
            }
            PlacementPolicy::Balanced => (e % shards) as usize,
        };
        out[k].push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_expert_placed_once_and_no_empty_shard() {
        for policy in [PlacementPolicy::Contiguous, PlacementPolicy::Balanced] {
            for (n, s) in [(8, 4), (8, 3), (7, 7), (64, 5), (1, 1)] {
                let a = initial_assignment(n, s, policy);
                assert_eq!(a.len(), s as usize);
                assert!(
                    a.iter().all(|shard| !shard.is_empty()),
                    "{policy:?} {n}/{s}: {a:?}"
                );
                let mut all: Vec<u32> = a.concat();
                all.sort();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
                let sizes: Vec<usize> = a.iter().map(Vec::len).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn contiguous_keeps_neighbours_and_balanced_interleaves() {
        assert_eq!(
            initial_assignment(8, 4, PlacementPolicy::Contiguous)[0],
            vec![0, 1]
        );
        assert_eq!(
            initial_assignment(8, 4, PlacementPolicy::Balanced)[0],
            vec![0, 4]
        );
    }
}
