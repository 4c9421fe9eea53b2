//! Helpers for tests on the local cluster's real nodes (kubelet + containerd, started by
//! `tidal-local nodes`): Tidal's images and models in the local registry, helm installs of the
//! chart as a user runs it, and throwaway toolbox pods that talk to Services from inside.
//!
//! These tests are `#[ignore]`d: `tidal-local test` runs them in its second phase, once the
//! real nodes are up and the images are built. Run alone, they fail with what to do.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, LogParams, PostParams};
use serde_json::json;

use crate::{TestCtx, eventually, repo_root};

/// The local registry (deploy/local/nodes.sh), as the host and the nodes' containerd reach it.
pub fn registry() -> String {
    format!(
        "127.0.0.1:{}",
        std::env::var("TIDAL_REGISTRY_PORT").unwrap_or_else(|_| "25000".into())
    )
}

/// Names of the Ready real nodes (those kwok does not fake).
pub async fn real_nodes(ctx: &TestCtx) -> Vec<String> {
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .expect("list nodes");
    nodes
        .items
        .into_iter()
        .filter(|n| {
            let fake = n
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kwok.x-k8s.io/node"));
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            !fake && ready
        })
        .filter_map(|n| n.metadata.name)
        .collect()
}

/// The real nodes once both are Ready; panics with what to run when they are not up.
///
/// Another test may have cut `tidal-edge` off for a while (it restores it when it ends):
/// while both Node objects exist this waits for them to be Ready again (up to 15 minutes).
pub async fn require_real_nodes(ctx: &TestCtx) -> Vec<String> {
    const WANT: [&str; 2] = ["tidal-cloud", "tidal-edge"];
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    loop {
        let ready = real_nodes(ctx).await;
        if WANT.iter().all(|w| ready.iter().any(|n| n == w)) {
            return ready;
        }
        let all: Vec<String> = Api::<Node>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .expect("list nodes")
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let exist = WANT.iter().all(|w| all.iter().any(|n| n == w));
        assert!(
            exist && std::time::Instant::now() < deadline,
            "the real nodes tidal-cloud and tidal-edge are not Ready (Ready: {ready:?}); \
             run `deploy/local/tidal-local test` (it starts them), or `tidal-local nodes` first"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs `deploy/images/build.sh ARGS` (pushes to the local registry); panics on failure.
pub fn images(args: &[&str]) {
    let script = repo_root().join("deploy/images/build.sh");
    let out = Command::new(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "build.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes a model directory as an OCI artifact; returns its `oci://` URI.
pub fn push_model(dir: &Path, repo_tag: &str) -> String {
    images(&["model", &dir.display().to_string(), repo_tag]);
    format!("oci://{}/{repo_tag}", registry())
}

/// A pod from the toolbox image (busybox's shell and `probe`: `probe lookup HOST`,
/// `probe http [-d JSON] URL`) that runs `script` once on `node`; returns its log when it
/// succeeded, panics with the log when it failed.
pub async fn run_in_pod(ctx: &TestCtx, name: &str, node: &str, script: &str) -> String {
    let pods = ctx.api::<Pod>();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeName": node,
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "toolbox",
                "image": format!("{}/tidal-local/toolbox:3", registry()),
                "command": ["/bin/sh", "-c", script],
                "securityContext": {"allowPrivilegeEscalation": false,
                                    "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    let phase = eventually(
        &format!("pod {name} finished"),
        Duration::from_secs(180),
        || async {
            let p = pods.get(name).await.map_err(|e| e.to_string())?;
            match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some(ph @ ("Succeeded" | "Failed")) => Ok(ph.to_string()),
                other => Err(format!("phase {other:?}")),
            }
        },
    )
    .await;
    let log = pods
        .logs(name, &LogParams::default())
        .await
        .unwrap_or_else(|e| panic!("logs of {name}: {e}"));
    assert_eq!(phase, "Succeeded", "pod {name} failed; its log:\n{log}");
    log
}

/// The Ready pods matching `selector`, with the node each runs on.
pub async fn ready_pods(ctx: &TestCtx, ns: &str, selector: &str) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods");
    list.items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.spec.and_then(|s| s.node_name).unwrap_or_default(),
            )
        })
        .collect()
}

/// The real nodes' Prometheus (`tidal-local nodes`: the chart's scrape config, Kubernetes
/// discovery), on the node network so pods reach it as well as the host.
pub fn prometheus_url() -> String {
    format!(
        "http://198.18.255.1:{}",
        std::env::var("TIDAL_PROMETHEUS_PORT").unwrap_or_else(|_| "29090".into())
    )
}

/// The result vector of an instant PromQL query against [`prometheus_url`].
pub async fn prom_query(query: &str) -> Result<Vec<serde_json::Value>, String> {
    let body: serde_json::Value = crate::processes::http_client()
        .get(format!("{}/api/v1/query", prometheus_url()))
        .query(&[("query", query)])
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("query {query}: {body}"));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}
