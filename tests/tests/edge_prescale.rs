//! The autoscaler's edge pre-scale end to end: real `tidal-worker`s for the cloud tier and two
//! edge sites, a real Prometheus scraping them, the operator's autoscaler and the EdgeNode
//! controller on the local control plane. When a busy site loses its heartbeat, the cloud tier
//! is scaled up by that site's forecast load in the same decision that sees it offline, before
//! the failed-over traffic reaches the cloud's metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tidal_e2e::processes::{Prometheus, completion_load, start_worker, write_fixture};
use tidal_e2e::{
    CONVERGE, EdgeNodeController, RunningOperator, TestCtx, eventually, install_crds, kwok,
};
use tidal_operator::crd::InferenceService;

const SERVICE: &str = "nearby";

async fn replicas(api: &Api<Deployment>, name: &str) -> Result<i32, String> {
    let d = api.get(name).await.map_err(|e| e.to_string())?;
    Ok(d.spec.and_then(|s| s.replicas).unwrap_or(0))
}

async fn last_reason(api: &Api<InferenceService>) -> Result<String, String> {
    let t = api.get(SERVICE).await.map_err(|e| e.to_string())?;
    t.status
        .and_then(|s| s.last_decision)
        .map(|d| d.reason)
        .ok_or_else(|| "no lastDecision".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_busy_site_prescales_the_cloud_by_its_forecast_load() {
    let Some(ctx) = TestCtx::new("edge-prescale").await else {
        return;
    };
    install_crds(&ctx).await;
    let run = ctx.namespace.clone();
    let pool = format!("pool-{run}");
    let nodes = [format!("{run}-a"), format!("{run}-b")];
    let guards =
        kwok::edge_sites(&ctx, &pool, &[(&nodes[0], "site-a"), (&nodes[1], "site-b")]).await;
    let en = EdgeNodeController::start(&ctx);

    // One real worker per target: the cloud tier and each site.
    let model = tempfile::tempdir().unwrap();
    write_fixture(model.path(), "llama");
    let cloud = start_worker(model.path(), SERVICE).await;
    let site_a = start_worker(model.path(), SERVICE).await;
    let site_b = start_worker(model.path(), SERVICE).await;
    let labels = |tier: &str, node: Option<&str>| {
        let mut l = json!({
            "namespace": ctx.namespace,
            "tidal_inference_service": SERVICE,
            "tidal_tier": tier,
            "tidal_role": "full",
        });
        if let Some(n) = node {
            l["tidal_edge_node"] = json!(n);
        }
        l
    };
    let prom = Prometheus::start(&[
        (
            vec![format!("127.0.0.1:{}", cloud.port)],
            labels("cloud", None),
        ),
        (
            vec![format!("127.0.0.1:{}", site_a.port)],
            labels("edge", Some(&nodes[0])),
        ),
        (
            vec![format!("127.0.0.1:{}", site_b.port)],
            labels("edge", Some(&nodes[1])),
        ),
    ])
    .await;
    let _operator = RunningOperator::start_autoscaling(&ctx);
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": SERVICE, "namespace": ctx.namespace},
        "spec": {
            "model": {"uri": model.path().display().to_string(), "architecture": "llama"},
            "cloud": {"minReplicas": 1, "maxReplicas": 8,
                      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
            "edge": {"model": {"uri": model.path().display().to_string(), "architecture": "llama"},
                     "edgeNodeSelector": {"matchLabels": {"pool": pool}},
                     "minReplicasPerNode": 1, "maxReplicasPerNode": 4},
            "autoscaling": {
                "prometheusUrl": prom.url(),
                "intervalSeconds": 5,
                "targetRpsPerReplica": 1.0,
                "forecast": {"method": "Naive", "horizonSeconds": 10},
                "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 8},
                "scaleDown": {"stabilizationWindowSeconds": 60, "maxStep": 8},
            }
        }
    }))
    .unwrap();
    let services = ctx.api::<InferenceService>();
    services.create(&PostParams::default(), &tis).await.unwrap();

    // Bounded load: site a is busy (3 rps at 1 rps per replica), the cloud and site b light.
    let stop = Arc::new(AtomicBool::new(false));
    let gens = [
        completion_load(vec![site_a.base_url()], SERVICE, 3.0, 3 * 300, stop.clone()),
        completion_load(vec![cloud.base_url()], SERVICE, 0.5, 150, stop.clone()),
        completion_load(vec![site_b.base_url()], SERVICE, 0.5, 150, stop.clone()),
    ];
    let deps = ctx.api::<Deployment>();
    let dep_a = format!("{SERVICE}-edge-{}", nodes[0]);
    eventually("site a scaled for its load", CONVERGE * 2, || async {
        let r = replicas(&deps, &dep_a).await?;
        if r >= 3 {
            Ok(())
        } else {
            Err(format!(
                "site a replicas {r}; {:?}",
                last_reason(&services).await
            ))
        }
    })
    .await;
    let before = replicas(&deps, &format!("{SERVICE}-cloud")).await.unwrap();
    let reason = last_reason(&services).await.unwrap();
    assert!(!reason.contains("pre-scaled"), "{reason}");

    // Site a loses its heartbeat (its workers keep reporting: an offline site's metrics must
    // not count). The decision that sees it offline adds its load to the cloud.
    let holder = kwok::partition(&ctx, &nodes[0]).await;
    let reason = eventually("the cloud pre-scaled for site a", CONVERGE * 2, || async {
        let reason = last_reason(&services).await?;
        let wanted = format!("pre-scaled for offline edge site(s) {}", nodes[0]);
        if reason.contains(&wanted) {
            Ok(reason)
        } else {
            Err(reason)
        }
    })
    .await;
    assert!(
        reason.contains(&format!("edge/{} ", nodes[0])) && reason.contains("site offline"),
        "{reason}"
    );
    // ~3 rps of site a's load on top of the cloud's own: at least 2 more cloud replicas.
    let after = eventually("cloud replicas raised", CONVERGE, || async {
        let r = replicas(&deps, &format!("{SERVICE}-cloud")).await?;
        if r >= before + 2 {
            Ok(r)
        } else {
            Err(format!("cloud {r} (was {before})"))
        }
    })
    .await;
    eprintln!("[edge-prescale] cloud {before} -> {after}: {reason}");

    stop.store(true, Ordering::Relaxed);
    for g in gens {
        g.await.unwrap();
    }
    kwok::reconnect(&ctx, &nodes[0], &holder).await;
    en.stop().await;
    drop(guards);
}
