//! Two `tidal-operator run` processes against the real API server: only the leader reconciles
//! and writes; killing it hands over to the other.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tidal_e2e::processes::{Killed, metric_sum, spawn_elected_operator};
use tidal_e2e::{CONVERGE, TestCtx, eventually, install_crds};
use tidal_operator::crd::InferenceService;

struct Operator {
    identity: String,
    port: u16,
    _process: Killed,
}

fn start(ctx: &TestCtx, identity: &str) -> Operator {
    let (process, port) = spawn_elected_operator(ctx, identity, 6, &[]);
    Operator {
        identity: identity.into(),
        port,
        _process: process,
    }
}

/// A metric's value from the process's /metrics (real HTTP through curl).
fn metric(op: &Operator, prefix: &str) -> Option<f64> {
    metric_sum(op.port, prefix, &[])
}

#[tokio::test]
async fn only_the_leader_writes_and_killing_it_hands_over() {
    let Some(ctx) = TestCtx::new("leader").await else {
        return;
    };
    install_crds(&ctx).await;
    let a = start(&ctx, "op-a");
    let b = start(&ctx, "op-b");
    let leases = ctx.api::<Lease>();
    let holder = eventually("a leader holds the Lease", CONVERGE, || async {
        let l = leases
            .get("tidal-operator")
            .await
            .map_err(|e| e.to_string())?;
        l.spec
            .and_then(|s| s.holder_identity)
            .ok_or_else(|| "no holder".to_string())
    })
    .await;
    let (leader, standby) = if holder == a.identity { (a, b) } else { (b, a) };
    assert_eq!(holder, leader.identity);

    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "le"},
        "spec": {"model": {"uri": "/models/m", "architecture": "llama"}, "cloud": {"minReplicas": 1, "maxReplicas": 5}}
    }))
    .unwrap();
    let api = ctx.api::<InferenceService>();
    api.create(&PostParams::default(), &tis).await.unwrap();
    let deps = ctx.api::<Deployment>();
    eventually("the leader created the Deployment", CONVERGE, || async {
        deps.get("le-cloud")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    eventually("leader gauges settled", CONVERGE, || async {
        match (
            metric(&leader, "tidal_operator_leader "),
            metric(&standby, "tidal_operator_leader "),
        ) {
            (Some(1.0), Some(0.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(metric(&leader, "tidal_operator_api_writes_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        metric(&standby, "tidal_operator_api_writes_total"),
        Some(0.0),
        "the standby never writes"
    );
    assert_eq!(
        metric(&standby, "tidal_operator_reconciles_total"),
        Some(0.0),
        "the standby never reconciles"
    );

    // Kill the leader without a chance to release: the standby takes over when the Lease expires.
    let old = leader.identity.clone();
    drop(leader);
    eventually("the standby holds the Lease", CONVERGE, || async {
        let l = leases
            .get("tidal-operator")
            .await
            .map_err(|e| e.to_string())?;
        match l.spec.and_then(|s| s.holder_identity) {
            Some(h) if h == standby.identity => Ok(()),
            h => Err(format!("holder {h:?} (old leader {old})")),
        }
    })
    .await;
    api.patch(
        "le",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"cloud": {"replicas": 4}}})),
    )
    .await
    .unwrap();
    eventually("the new leader applies the change", CONVERGE, || async {
        let d = deps.get("le-cloud").await.map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(4) => Ok(()),
            r => Err(format!("replicas {r:?}")),
        }
    })
    .await;
    assert_eq!(metric(&standby, "tidal_operator_leader "), Some(1.0));
}
