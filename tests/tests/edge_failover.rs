//! Both controllers together: an InferenceService with an edge tier over two EdgeNodes gets one
//! pinned edge Deployment per site; when a site stops heartbeating, the service re-reconciles,
//! reports the site offline and moves its replicas to the cloud; when it returns, back again.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::PostParams;
use serde_json::json;
use tidal_e2e::{
    CONVERGE, EdgeNodeController, RunningOperator, TestCtx, eventually, install_crds, kwok,
};
use tidal_operator::crd::InferenceService;

#[tokio::test]
async fn offline_edge_site_fails_over_to_cloud_and_back() {
    let Some(ctx) = TestCtx::new("failover").await else {
        return;
    };
    install_crds(&ctx).await;
    let run = ctx.namespace.clone();
    let pool = format!("pool-{run}");
    let (node_a, node_b) = (format!("{run}-a"), format!("{run}-b"));
    let guards = kwok::edge_sites(&ctx, &pool, &[(&node_a, "site-a"), (&node_b, "site-b")]).await;

    // The EdgeNode controller (cluster-wide) next to the namespaced InferenceService controller.
    let en = EdgeNodeController::start(&ctx);
    let op = RunningOperator::start(&ctx);

    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "assist"},
        "spec": {"model": {"uri": "/models/big", "architecture": "llama"},
                 "cloud": {"minReplicas": 1, "maxReplicas": 3, "nodeSelector": {"tidal.rs/tier": "cloud"}},
                 "edge": {"model": {"uri": "/models/small", "architecture": "qwen2"},
                          "edgeNodeSelector": {"matchLabels": {"pool": pool}}}}
    }))
    .unwrap();
    let api = ctx.api::<InferenceService>();
    api.create(&PostParams::default(), &tis).await.unwrap();
    let status_of = || async {
        let t = api.get("assist").await.map_err(|e| e.to_string())?;
        t.status.ok_or_else(|| "no status".to_string())
    };
    eventually("edge 2/2 and cloud 1/1 ready", CONVERGE, || async {
        let s = status_of().await?;
        if s.edge_ready.as_deref() == Some("2/2") && s.cloud_ready.as_deref() == Some("1/1") {
            Ok(())
        } else {
            Err(format!("{:?} {:?}", s.edge_ready, s.cloud_ready))
        }
    })
    .await;
    let deps = ctx.api::<Deployment>();
    let site_a = format!("assist-edge-{run}-a");
    let d = deps.get(&site_a).await.unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.node_selector.unwrap()["kubernetes.io/hostname"],
        format!("{run}-a"),
        "pinned to its node"
    );

    // Site a loses its heartbeat: Offline -> its Deployment goes to 0, the cloud takes +1.
    let holder = kwok::partition(&ctx, &format!("{run}-a")).await;
    let s = eventually(
        "service reports site a offline and fails over",
        CONVERGE,
        || async {
            let s = status_of().await?;
            let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").cloned();
            let cloud = s.cloud.as_ref().map(|c| c.desired);
            match degraded {
                Some(c)
                    if c.status == "True" && c.reason == "EdgeSiteOffline" && cloud == Some(2) =>
                {
                    Ok(s)
                }
                other => Err(format!("{other:?} cloud desired {cloud:?}")),
            }
        },
    )
    .await;
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(
        degraded.message.contains(&format!("{run}-a")),
        "{}",
        degraded.message
    );
    assert_eq!(
        deps.get(&site_a).await.unwrap().spec.unwrap().replicas,
        Some(0)
    );
    assert_eq!(
        deps.get("assist-cloud")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(2)
    );

    // It comes back: replicas return to the edge, the cloud shrinks to its own size.
    kwok::reconnect(&ctx, &format!("{run}-a"), &holder).await;
    eventually("site a back in service", CONVERGE, || async {
        let s = status_of().await?;
        let cloud = s.cloud.as_ref().map(|c| c.desired);
        let degraded = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True");
        if !degraded && cloud == Some(1) && s.edge_ready.as_deref() == Some("2/2") {
            Ok(())
        } else {
            Err(format!(
                "degraded={degraded} cloud={cloud:?} edge={:?}",
                s.edge_ready
            ))
        }
    })
    .await;
    assert_eq!(
        deps.get(&site_a).await.unwrap().spec.unwrap().replicas,
        Some(1)
    );

    op.stop().await;
    en.stop().await;
    drop(guards);
}
