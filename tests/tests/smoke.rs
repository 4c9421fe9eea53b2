//! Smoke tests of the local control plane itself: the real controller-manager, scheduler and
//! kwok do their jobs, and kubectl/helm work with the kubeconfig `tidal-local` writes.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tidal_e2e::{CONVERGE, TestCtx, eventually};

fn deployment(name: &str, replicas: i32, tier: &str, gpus: u32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"tidal.rs/tier": tier},
                    "containers": [{
                        "name": "worker",
                        "image": "tidal/worker:test",
                        "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}
                    }]
                }
            }
        }
    }))
    .expect("valid deployment")
}

async fn pods_of(ctx: &TestCtx, app: &str) -> Vec<Pod> {
    ctx.api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

#[tokio::test]
async fn deployment_pods_are_scheduled_run_and_are_garbage_collected() {
    let Some(ctx) = TestCtx::new("deploy").await else {
        return;
    };
    let nodes: BTreeMap<String, String> = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .expect("list nodes")
        .items
        .into_iter()
        .map(|n| (n.name_any(), n.labels()["tidal.rs/tier"].clone()))
        .collect();
    assert!(
        nodes.values().any(|t| t == "cloud"),
        "fake cloud nodes exist: {nodes:?}"
    );

    let deployments = ctx.api::<Deployment>();
    deployments
        .create(&PostParams::default(), &deployment("smoke", 3, "cloud", 1))
        .await
        .expect("create deployment");

    // controller-manager: the Deployment gets a ReplicaSet it owns.
    let rs_api = ctx.api::<ReplicaSet>();
    eventually("a ReplicaSet owned by the Deployment", CONVERGE, || async {
        let rs = rs_api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        rs.items
            .iter()
            .find(|r| {
                r.owner_references()
                    .iter()
                    .any(|o| o.kind == "Deployment" && o.name == "smoke")
            })
            .map(|_| ())
            .ok_or_else(|| format!("{} replicasets, none owned by smoke", rs.items.len()))
    })
    .await;

    // scheduler + kwok: three pods bound to cloud nodes and Running.
    let pods = eventually("3 Running pods on cloud nodes", CONVERGE, || async {
        let pods = pods_of(&ctx, "smoke").await;
        let running: Vec<_> = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        if running.len() == 3 {
            Ok(pods)
        } else {
            Err(format!("{} pods, {} running", pods.len(), running.len()))
        }
    })
    .await;
    for pod in &pods {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("bound");
        assert_eq!(
            nodes.get(&node).map(String::as_str),
            Some("cloud"),
            "{node} is a cloud node"
        );
    }
    eventually("deployment reports 3 ready replicas", CONVERGE, || async {
        let d = deployments.get("smoke").await.map_err(|e| e.to_string())?;
        let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        if ready == 3 {
            Ok(())
        } else {
            Err(format!("ready={ready}"))
        }
    })
    .await;

    // Garbage collection: deleting the Deployment removes its ReplicaSet's pods.
    deployments
        .delete("smoke", &DeleteParams::background())
        .await
        .expect("delete deployment");
    eventually("pods garbage-collected", CONVERGE, || async {
        let n = pods_of(&ctx, "smoke").await.len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} pods left"))
        }
    })
    .await;
}

#[tokio::test]
async fn scheduler_honours_accelerator_capacity() {
    let Some(ctx) = TestCtx::new("gpu").await else {
        return;
    };
    // Edge nodes have one GPU each: a pod asking for two can never be placed there.
    ctx.api::<Deployment>()
        .create(&PostParams::default(), &deployment("greedy", 1, "edge", 2))
        .await
        .expect("create deployment");
    let events = ctx.api::<Event>();
    let msg = eventually("a FailedScheduling event", CONVERGE, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("FailedScheduling"))
            .and_then(|e| e.message)
            .ok_or_else(|| "no FailedScheduling event yet".to_string())
    })
    .await;
    assert!(
        msg.contains("nvidia.com/gpu"),
        "scheduler names the missing resource: {msg}"
    );
    let pods = pods_of(&ctx, "greedy").await;
    assert_eq!(pods.len(), 1);
    assert!(
        pods[0]
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none(),
        "unbound"
    );
}

#[tokio::test]
async fn kubectl_and_helm_work_with_the_written_kubeconfig() {
    let Some(ctx) = TestCtx::new("cli").await else {
        return;
    };
    let version = ctx.env.run("kubectl", &["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&version).expect("json");
    let server = v["serverVersion"]["gitVersion"]
        .as_str()
        .expect("server version");
    let client = v["clientVersion"]["gitVersion"]
        .as_str()
        .expect("client version");
    assert!(server.starts_with("v1.36."), "server version {server}");
    assert_eq!(
        server, client,
        "kubectl and apiserver are built from one version"
    );

    let nodes = ctx.env.run(
        "kubectl",
        &["get", "nodes", "-l", "type=kwok", "-o", "name"],
    );
    assert!(
        nodes.contains("node/cloud-0") && nodes.contains("node/edge-1"),
        "{nodes}"
    );

    let helm = ctx.env.run("helm", &["version", "--short"]);
    assert!(helm.starts_with("v3."), "helm version {helm}");
    // helm talks to the API server with the same kubeconfig.
    let releases = ctx
        .env
        .run("helm", &["list", "-n", &ctx.namespace, "-o", "json"]);
    assert_eq!(releases.trim(), "[]");
}
