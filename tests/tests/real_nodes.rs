//! Tidal as a user runs it, on the local cluster's real nodes: the chart installed with helm
//! (the operator as pods from its image, pulled by a real kubelet), an InferenceService whose
//! model is an OCI artifact, the Service's DNS name resolved by CoreDNS from a pod on the other
//! node, and the worker answering the OpenAI API through the Service's ClusterIP.
//!
//! Ignored by a plain `cargo test`: `deploy/local/tidal-local test` runs these in its second
//! phase, after starting the real nodes and building the images (`cargo test --workspace --
//! --ignored real_node`: every test here is named `real_node_*`).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tidal_e2e::processes::write_fixture;
use tidal_e2e::real::{push_model, ready_pods, require_real_nodes, run_in_pod};
use tidal_e2e::{TestCtx, eventually, repo_root};
use tidal_operator::crd::InferenceService;

/// Pulling images and loading a model on a busy 2-core machine takes a while.
const START: Duration = Duration::from_secs(300);

/// A helm release of the chart in the test's namespace, uninstalled on drop.
struct Release {
    ctx_env: tidal_e2e::LocalEnv,
    name: String,
}

impl Release {
    fn install(ctx: &TestCtx, set: &[&str]) -> Release {
        let chart = repo_root().join("charts/tidal").display().to_string();
        let name = ctx.namespace.clone();
        let mut args = vec!["install", &name, &chart, "--namespace", &ctx.namespace];
        for s in set {
            args.extend_from_slice(&["--set", s]);
        }
        ctx.env.run("helm", &args);
        Release {
            ctx_env: ctx.env.clone(),
            name,
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self
            .ctx_env
            .command("helm")
            .args(["uninstall", &self.name, "--namespace", &self.name])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_helm_installed_operator_serves_an_oci_model_through_its_service() {
    let Some(ctx) = TestCtx::new("real-serve").await else {
        return;
    };
    require_real_nodes(&ctx).await;
    let ns = ctx.namespace.clone();

    // 1. The chart as a user installs it: default images (ghcr.io names, served by the local
    //    registry as a mirror), two replicas with leader election, on the cloud node.
    let _release = Release::install(
        &ctx,
        &[
            "nodeSelector.tidal\\.rs/tier=cloud",
            &format!("watchNamespace={ns}"),
        ],
    );
    let operator_pods = eventually("two operator pods Ready", START, || async {
        let pods = ready_pods(&ctx, &ns, "app.kubernetes.io/name=tidal").await;
        if pods.len() == 2 {
            Ok(pods)
        } else {
            Err(format!("ready: {pods:?}"))
        }
    })
    .await;
    assert!(
        operator_pods.iter().all(|(_, node)| node == "tidal-cloud"),
        "the operator runs on the cloud node: {operator_pods:?}"
    );
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    let leader = eventually("a leader Lease held by an operator pod", START, || async {
        let list = leases
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
            .find(|h| operator_pods.iter().any(|(p, _)| p == h))
            .ok_or_else(|| {
                format!(
                    "holders: {:?}",
                    list.items
                        .iter()
                        .map(|l| l.spec.as_ref().and_then(|s| s.holder_identity.clone()))
                        .collect::<Vec<_>>()
                )
            })
    })
    .await;

    // 2. A model delivered as an OCI artifact, served by a worker pod from Tidal's image.
    let model = tempfile::tempdir().unwrap();
    write_fixture(model.path(), "llama");
    let uri = push_model(model.path(), &format!("tidal-e2e/models/llama:{ns}"));
    let name = "chat";
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"uri": uri, "architecture": "llama"},
            "cloud": {"minReplicas": 1, "maxReplicas": 1,
                      "nodeSelector": {"tidal.rs/tier": "cloud"},
                      "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        }
    }))
    .unwrap();
    ctx.api::<InferenceService>()
        .create(&PostParams::default(), &tis)
        .await
        .expect("create InferenceService");
    let workers = eventually("the worker pod Ready", START, || async {
        let pods = ready_pods(&ctx, &ns, &format!("app.kubernetes.io/instance={name}")).await;
        if pods.is_empty() {
            Err("no ready worker pod".to_string())
        } else {
            Ok(pods)
        }
    })
    .await;
    assert!(
        workers.iter().all(|(_, n)| n == "tidal-cloud"),
        "{workers:?}"
    );
    eventually("InferenceService Ready", START, || async {
        let t = ctx
            .api::<InferenceService>()
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let ready = t
            .status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .unwrap_or(false);
        if ready {
            Ok(())
        } else {
            Err(format!("{:?}", t.status.map(|s| s.conditions)))
        }
    })
    .await;

    // 3. The Service's DNS name from a pod on the edge node (CoreDNS, across nodes), then the
    //    OpenAI API through the ClusterIP (kube-proxy's rules). The HTTP call is made from the
    //    host: the toolbox's busybox wget crashes inside pods (to be replaced by a client pod).
    let svc_name = format!("{name}-cloud");
    let svc = ctx
        .api::<Service>()
        .get(&svc_name)
        .await
        .expect("worker Service");
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("ClusterIP");
    let host = format!("{svc_name}.{ns}.svc.cluster.local");
    let log = run_in_pod(&ctx, "client", "tidal-edge", &format!("nslookup {host}")).await;
    assert!(
        log.contains(&format!("Address: {ip}")),
        "DNS answered the Service's ClusterIP {ip}:\n{log}"
    );
    let answer: serde_json::Value = tidal_e2e::processes::http_client()
        .post(format!("http://{ip}:8080/v1/chat/completions"))
        .json(&json!({"model": name, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Hello"}]}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("POST through the ClusterIP")
        .json()
        .await
        .expect("a JSON answer");
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    eprintln!(
        "[real-serve] leader {leader}; operator pods {operator_pods:?}; workers {workers:?}; \
         {host} resolved in a pod; answered through ClusterIP {ip}"
    );
}
