//! A live expert-placement rollout end to end: a real MoE `tidal-worker` under load exports
//! per-expert token counts, a real Prometheus scrapes them, and the operator's autoscaler
//! plans a new placement (hot experts get redundant copies in the spare slots) and rolls it
//! out on the local control plane: shards warm the new experts, the router's plan switches,
//! then shards drop what they lost.
//!
//! Checked all along, from what the API server shows: every expert the router's plan sends to
//! a shard is held by every ready pod of that shard (so no routed request can fail), and the
//! phases come in order. The fixture's router is biased towards experts 0 and 2, which the
//! initial (balanced) placement puts on the same shard, so a redundant plan is certain on any
//! machine; a failure says whether no plan came or a rollout was abandoned.
//!
//! The operator runs as two `tidal-operator run` processes (leader election on a Lease). When
//! the new plan is first seen mid-rollout, the leader is killed (SIGKILL): the standby must
//! take the Lease and finish that rollout from what the status records, with the routing
//! invariant holding throughout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use tidal_e2e::processes::{
    Killed, Prometheus, completion_load, spawn_elected_operator, start_worker, write_fixture_with,
};
use tidal_e2e::{TestCtx, install_crds};
use tidal_operator::children::ANNOTATION_HELD_EXPERTS;
use tidal_operator::crd::InferenceService;

const SERVICE: &str = "moe";
const SHARDS: u32 = 2;
/// The `mixtral` fixture's expert count.
const EXPERTS: u32 = 4;
/// The experts the fixture's router prefers: both on shard 0 in the balanced initial placement.
const HOT: &str = "0,2";
/// The operators' Lease duration.
const LEASE_SECONDS: u64 = 6;

fn parse_held(s: &str) -> BTreeSet<u32> {
    s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && p.metadata.deletion_timestamp.is_none()
}

/// What the API server shows at one moment.
struct Observed {
    /// (version, phase) of `status.placement`.
    phase: Option<(u32, String)>,
    /// `status.placement.message` and `status.lastDecision.reason`.
    message: Option<String>,
    decision: Option<String>,
    /// Shard -> experts the router's plan (the ConfigMap) sends to it.
    routed: BTreeMap<u32, BTreeSet<u32>>,
    /// Shard -> what each of its ready pods holds.
    ready_pods: BTreeMap<u32, Vec<(String, BTreeSet<u32>)>>,
}

async fn observe(
    services: &Api<InferenceService>,
    cms: &Api<ConfigMap>,
    deps: &Api<Deployment>,
    pods: &Api<Pod>,
) -> Result<Observed, String> {
    let err = |e: kube::Error| e.to_string();
    let tis = services.get(SERVICE).await.map_err(err)?;
    let status = tis.status.unwrap_or_default();
    let decision = status.last_decision.map(|d| d.reason);
    let message = status.placement.as_ref().and_then(|p| p.message.clone());
    let phase = status.placement.map(|p| (p.version, p.phase));
    let cm = cms
        .get(&format!("{SERVICE}-placement"))
        .await
        .map_err(err)?;
    let plan: serde_json::Value = serde_json::from_str(
        cm.data
            .as_ref()
            .and_then(|d| d.get("plan.json"))
            .ok_or("no plan.json")?,
    )
    .map_err(|e| e.to_string())?;
    let mut routed = BTreeMap::new();
    for s in plan["shards"].as_array().ok_or("no shards in the plan")? {
        let k = s["shard"].as_u64().ok_or("shard without an index")? as u32;
        let experts: BTreeSet<u32> = s["experts"]
            .as_array()
            .ok_or("shard without experts")?
            .iter()
            .filter_map(|e| e.as_u64().map(|e| e as u32))
            .collect();
        routed.insert(k, experts);
    }
    let mut ready_pods = BTreeMap::new();
    for k in 0..SHARDS {
        let dep = deps
            .get(&format!("{SERVICE}-experts-{k}"))
            .await
            .map_err(err)?;
        let selector = dep
            .spec
            .and_then(|s| s.selector.match_labels)
            .ok_or("shard Deployment without a selector")?
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(err)?;
        let held = list
            .items
            .iter()
            .filter(|p| is_ready(p))
            .map(|p| {
                let held = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_HELD_EXPERTS))
                    .map(|s| parse_held(s))
                    .unwrap_or_default();
                (p.metadata.name.clone().unwrap_or_default(), held)
            })
            .collect();
        ready_pods.insert(k, held);
    }
    Ok(Observed {
        phase,
        message,
        decision,
        routed,
        ready_pods,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_expert_plan_rolls_out_through_a_leader_kill_never_routing_to_a_shard_lacking_the_expert()
 {
    let t0 = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "[expert-rollout] {:>5.1} s: {what}",
            t0.elapsed().as_secs_f64()
        )
    };
    let Some(ctx) = TestCtx::new("expert-rollout").await else {
        return;
    };
    install_crds(&ctx).await;
    step("control plane and CRDs");

    // A real MoE worker (full role: it runs every expert and counts tokens per expert).
    let model = tempfile::tempdir().unwrap();
    write_fixture_with(model.path(), "mixtral", &["--hot-experts", HOT]);
    let worker = start_worker(model.path(), SERVICE).await;
    let labels = json!({
        "namespace": ctx.namespace,
        "tidal_inference_service": SERVICE,
        "tidal_tier": "cloud",
        "tidal_role": "full",
    });
    let prom = Prometheus::start(&[(vec![format!("127.0.0.1:{}", worker.port)], labels)]).await;
    step("worker and Prometheus up");
    // Two operator replicas; the lease is short so the hand-over fits the test.
    let mut operators: BTreeMap<String, Killed> = ["op-a", "op-b"]
        .into_iter()
        .map(|id| {
            // Rates over 10 s (Prometheus scrapes every second); 5 s ready time.
            let (process, _port) = spawn_elected_operator(
                &ctx,
                id,
                LEASE_SECONDS,
                &["--rate-window", "10s", "--default-ready-seconds", "5"],
            );
            (id.to_string(), process)
        })
        .collect();
    let leases = ctx.api::<Lease>();
    let holder = || async {
        leases
            .get("tidal-operator")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
    };
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": SERVICE, "namespace": ctx.namespace},
        "spec": {
            "model": {"uri": model.path().display().to_string(), "architecture": "mixtral",
                      "numExperts": EXPERTS},
            "cloud": {"minReplicas": 1, "maxReplicas": 2,
                      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                      "experts": {"shards": SHARDS, "minReplicasPerShard": 1,
                                  "maxReplicasPerShard": 2, "placement": "Balanced",
                                  "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}},
            "autoscaling": {
                "prometheusUrl": prom.url(),
                "intervalSeconds": 5,
                "targetRpsPerReplica": 1.0,
                "forecast": {"method": "Naive", "horizonSeconds": 10},
            }
        }
    }))
    .unwrap();
    let services = ctx.api::<InferenceService>();
    services.create(&PostParams::default(), &tis).await.unwrap();

    // Bounded load (at most 2 rps for 4 minutes) so the worker reports expert tokens.
    let stop = Arc::new(AtomicBool::new(false));
    let generator = completion_load(vec![worker.base_url()], SERVICE, 2.0, 2 * 240, stop.clone());

    let (cms, deps, pods) = (
        ctx.api::<ConfigMap>(),
        ctx.api::<Deployment>(),
        ctx.api::<Pod>(),
    );
    // Poll until a plan past the initial one is Active, checking the routing invariant at
    // every observation and recording the phases of that plan.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut phases: Vec<(u32, String)> = Vec::new();
    let mut messages: Vec<String> = Vec::new();
    let mut checks = 0usize;
    let mut last_err = String::new();
    let mut last_decision = None;
    // The leader killed mid-rollout: (identity, when, the plan's (version, phase) then), and
    // when the standby held the Lease and the rollout next moved.
    let mut killed: Option<(String, Instant, (u32, String))> = None;
    let mut took_over: Option<(String, Duration)> = None;
    let mut moved_on: Option<(Duration, String)> = None;
    let final_plan = loop {
        if Instant::now() >= deadline {
            // Say which went wrong: no plan at all, or one that never finished.
            match phases.iter().find(|(v, _)| *v >= 2) {
                None => panic!(
                    "the planner never proposed a new placement in 240 s (load on experts {HOT} \
                     should make one certain); last decision: {last_decision:?}; last: {last_err}"
                ),
                Some(_) => panic!(
                    "a new placement was proposed but never became Active; phases seen \
                     {phases:?}; messages {messages:?}; last: {last_err}"
                ),
            }
        }
        match observe(&services, &cms, &deps, &pods).await {
            Ok(o) => {
                last_decision = o.decision.clone();
                if let Some(m) = &o.message
                    && messages.last() != Some(m)
                {
                    messages.push(m.clone());
                }
                for (k, routed) in &o.routed {
                    for (pod, held) in o.ready_pods.get(k).into_iter().flatten() {
                        assert!(
                            routed.is_subset(held),
                            "shard {k}: the router's plan sends {routed:?} but ready pod {pod} \
                             holds {held:?} (phase {:?})",
                            o.phase
                        );
                        checks += 1;
                    }
                }
                if let Some(p) = &o.phase
                    && phases.last() != Some(p)
                {
                    // A plan that started warming must switch before another replaces it.
                    if let Some((v, prev)) = phases.last()
                        && prev == "Warming"
                        && p.0 > *v
                    {
                        panic!(
                            "plan {v} was abandoned while Warming: plan {} ({}) replaced it; \
                             phases {phases:?}; messages {messages:?}",
                            p.0, p.1
                        );
                    }
                    phases.push(p.clone());
                    if let Some((_, at, then)) = &killed
                        && moved_on.is_none()
                        && p != then
                    {
                        moved_on = Some((at.elapsed(), p.1.clone()));
                    }
                }
                // The new plan seen mid-rollout: kill the leader (SIGKILL, no Lease release).
                if killed.is_none()
                    && let Some((v, phase)) = &o.phase
                    && *v >= 2
                    && phase != "Active"
                    && let Some(leader) = holder().await
                    && let Some(mut process) = operators.remove(&leader)
                {
                    process.0.kill().expect("SIGKILL the leader");
                    let _ = process.0.wait();
                    step(&format!(
                        "killed the leader {leader} during plan {v} {phase}"
                    ));
                    killed = Some((leader, Instant::now(), (*v, phase.clone())));
                }
                if let Some((leader, at, _)) = &killed
                    && took_over.is_none()
                    && let Some(now) = holder().await
                    && &now != leader
                {
                    took_over = Some((now, at.elapsed()));
                }
                // The first plan from measured load fills the spare slots with redundant
                // copies of hot experts: more routed entries than experts.
                let entries: usize = o.routed.values().map(BTreeSet::len).sum();
                match &o.phase {
                    Some((v, phase))
                        if *v >= 1 && phase == "Active" && entries > EXPERTS as usize =>
                    {
                        break o;
                    }
                    _ => last_err = format!("{:?}, {entries} routed entries", o.phase),
                }
            }
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    step("the new plan is Active");
    let (leader, _, (killed_version, killed_phase)) =
        killed.expect("the leader was killed during the new plan's rollout");
    let (standby, after) = took_over.expect("the standby took the Lease");
    assert!(
        operators.contains_key(&standby) && standby != leader,
        "the Lease went to the standby: {standby} (killed {leader})"
    );
    let (moved_after, next_phase) = moved_on.expect("the rollout moved on after the kill");
    stop.store(true, Ordering::Relaxed);
    let served = generator.await.unwrap();
    step("load stopped");
    assert!(served > 0, "the worker answered the load");

    // Every expert is still routed somewhere, and the new plan went through every stage.
    let all: BTreeSet<u32> = final_plan.routed.values().flatten().copied().collect();
    assert_eq!(all, (0..EXPERTS).collect(), "{:?}", final_plan.routed);
    let version = final_plan.phase.as_ref().unwrap().0;
    let of_version: Vec<&str> = phases
        .iter()
        .filter(|(v, _)| *v == version)
        .map(|(_, p)| p.as_str())
        .collect();
    assert_eq!(
        of_version,
        vec!["Warming", "Switching", "Active"],
        "phases of plan {version}: {phases:?}"
    );
    assert!(checks > 0, "ready shard pods were checked");
    // The plan says why it was made: a clear gain over the placement in force.
    let why = final_plan.message.clone().unwrap_or_default();
    assert!(why.contains("imbalance"), "plan message: {why:?}");
    // The hot experts got the redundant copies.
    for hot in [0u32, 2] {
        let holders = final_plan
            .routed
            .values()
            .filter(|e| e.contains(&hot))
            .count();
        assert_eq!(
            holders, SHARDS as usize,
            "expert {hot}: {:?}",
            final_plan.routed
        );
    }
    assert_eq!(
        version, killed_version,
        "the standby finished the rollout the leader left (phases {phases:?})"
    );
    eprintln!(
        "[expert-rollout] plan {version} active: {:?}; phases {phases:?}; {checks} pod checks; \
         leader {leader} killed during {killed_phase}: {standby} held the Lease after {:.1} s \
         (lease {LEASE_SECONDS} s), the rollout reached {next_phase} after {:.1} s",
        final_plan.routed,
        after.as_secs_f64(),
        moved_after.as_secs_f64()
    );
}
