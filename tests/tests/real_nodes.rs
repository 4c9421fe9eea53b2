//! Tidal as a user runs it, on the local cluster's real nodes: the chart installed with helm
//! (the operator as pods from its image, pulled by a real kubelet), an InferenceService whose
//! model is an OCI artifact, the Service's DNS name resolved by CoreDNS from a pod on the other
//! node, the worker answering the OpenAI API through the Service (by DNS name from a pod on the
//! edge node, by ClusterIP from the host), Prometheus discovering the pods the way the chart's
//! scrape config says, and the other operator pod taking over when the leader is killed; then
//! the autoscaler on real pods.
//!
//! Ignored by a plain `cargo test`: `deploy/local/tidal-local test` runs these in its second
//! phase, after starting the real nodes and building the images (`cargo test --workspace --
//! --ignored real_node`: every test here is named `real_node_*`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tidal_e2e::processes::{variable_load, write_fixture};
use tidal_e2e::real::{
    prom_query, prometheus_url, push_model, ready_pods, require_real_nodes, run_in_pod,
};
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

/// Tests that need `tidal-edge` connected hold this; the one that cuts it off holds it too.
static EDGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `tidal-local edge cut NODE`; dropping it restores the node (also when the test panics).
struct Cut(String);

impl Cut {
    fn edge(node: &str) -> Cut {
        let out = std::process::Command::new(tidal_e2e::tidal_local())
            .args(["edge", "cut", node])
            .output()
            .expect("run tidal-local edge cut");
        assert!(
            out.status.success(),
            "tidal-local edge cut failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cut(node.to_string())
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = std::process::Command::new(tidal_e2e::tidal_local())
            .args(["edge", "restore", &self.0])
            .output();
    }
}

/// A test's namespace on the real nodes (Pod Security `restricted` enforced) with the chart
/// installed in it, as a user installs it:
/// default images (ghcr.io names, served by the local registry as a mirror), two replicas with
/// leader election, on the cloud node, watching that namespace; `set` adds `--set` values.
async fn setup(test: &str, set: &[&str]) -> Option<(TestCtx, Release)> {
    let ctx = TestCtx::new(test).await?;
    require_real_nodes(&ctx).await;
    // Every pod here (the operator's, the workers', the tests' own) must pass the `restricted`
    // Pod Security Standard: the API server refuses any that does not.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
    namespaces
        .patch(
            &ctx.namespace,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .expect("label the namespace restricted");
    let watch = format!("watchNamespace={}", ctx.namespace);
    // Only this test's EdgeNodes (see `edge_site`): other tests' operators run beside it.
    let pool = format!("edgeNodeSelector=tidal.rs/edge-pool={}", ctx.namespace);
    let mut values = vec!["nodeSelector.tidal\\.rs/tier=cloud", &watch, &pool];
    values.extend_from_slice(set);
    let release = Release::install(&ctx, &values);
    Some((ctx, release))
}

/// [`setup`] with the operator pointed at the real nodes' Prometheus (which discovers the
/// worker pods itself); rates over 20 s, as Prometheus scrapes every 5 s.
async fn setup_scraped(test: &str) -> Option<(TestCtx, Release)> {
    let prometheus = format!("prometheusUrl={}", prometheus_url());
    setup(
        test,
        &[
            &prometheus,
            "extraEnv[0].name=TIDAL_RATE_WINDOW",
            "extraEnv[0].value=20s",
        ],
    )
    .await
}

/// The holder of a Lease in `leases` that `accept` takes (the error lists every holder).
async fn lease_holder(
    leases: &Api<Lease>,
    accept: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let list = leases
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let holders: Vec<String> = list
        .items
        .iter()
        .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
        .collect();
    holders
        .iter()
        .find(|h| accept(h))
        .cloned()
        .ok_or_else(|| format!("holders: {holders:?}"))
}

/// A tiny random checkpoint of `arch`, pushed as an OCI artifact; its `oci://` URI.
fn fixture_model(ctx: &TestCtx, arch: &str) -> String {
    let model = tempfile::tempdir().unwrap();
    write_fixture(model.path(), arch);
    push_model(
        model.path(),
        &format!("tidal-e2e/models/{arch}:{}", ctx.namespace),
    )
}

/// Waits until exactly one pod that `selector` picks is Ready.
async fn one_pod_ready(ctx: &TestCtx, selector: &str) {
    eventually("one worker pod Ready", START, || async {
        match ready_pods(ctx, &ctx.namespace, selector).await.len() {
            1 => Ok(()),
            n => Err(format!("{n} ready")),
        }
    })
    .await;
}

/// The ClusterIP of Service `name` in the test namespace.
async fn cluster_ip(ctx: &TestCtx, name: &str) -> String {
    ctx.api::<Service>()
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("Service {name}: {e}"))
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap_or_else(|| panic!("Service {name} has no ClusterIP"))
}

/// The ClusterIP of Service `name`, once a completion for `model` is answered through it.
/// Ready pods are not yet a routed Service: kube-proxy programs the endpoints a moment later
/// (later still on a busy machine), and until then a connection is refused.
async fn routed_cluster_ip(ctx: &TestCtx, name: &str, model: &str) -> String {
    let ip = cluster_ip(ctx, name).await;
    let base = format!("http://{ip}:8080");
    eventually(
        &format!("Service {name} answers through its ClusterIP"),
        START,
        || answers(&base, model),
    )
    .await;
    ip
}

/// Creates the InferenceService `spec` describes (its name and namespace are filled in).
async fn create_service(ctx: &TestCtx, name: &str, spec: serde_json::Value) {
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": ctx.namespace},
        "spec": spec,
    }))
    .expect("a valid InferenceService");
    ctx.api::<InferenceService>()
        .create(&PostParams::default(), &tis)
        .await
        .expect("create InferenceService");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_helm_installed_operator_serves_an_oci_model_through_its_service() {
    // 1. The chart as a user installs it (see `setup`).
    let Some((ctx, _release)) = setup("real-serve", &[]).await else {
        return;
    };
    let ns = ctx.namespace.clone();
    // The namespace enforces `restricted` (so every pod below passes it): a default pod is refused.
    let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    let refused = ctx
        .api::<Pod>()
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &bare,
        )
        .await
        .expect_err("a pod breaking the restricted standard is refused");
    assert!(
        refused.to_string().contains("violates PodSecurity"),
        "{refused}"
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
    let leader = eventually("a leader Lease held by an operator pod", START, || {
        lease_holder(&leases, |h| operator_pods.iter().any(|(p, _)| p == h))
    })
    .await;

    // 2. A model delivered as an OCI artifact, served by a worker pod from Tidal's image.
    let name = "chat";
    let spec = json!({
        "model": {"uri": fixture_model(&ctx, "llama"), "architecture": "llama"},
        "cloud": {"minReplicas": 1, "maxReplicas": 1,
                  "nodeSelector": {"tidal.rs/tier": "cloud"},
                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
    });
    create_service(&ctx, name, spec).await;
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

    // 3. From a pod on the edge node, as another workload would: the Service's DNS name
    //    (CoreDNS, across nodes), then the OpenAI API through that name (kube-proxy's rules
    //    to the worker on the cloud node). Then from the host through the ClusterIP.
    let svc_name = format!("{name}-cloud");
    let svc = ctx
        .api::<Service>()
        .get(&svc_name)
        .await
        .expect("worker Service");
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("ClusterIP");
    let host = format!("{svc_name}.{ns}.svc.cluster.local");
    let body = json!({"model": name, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Hello"}]})
    .to_string();
    let edge = EDGE.lock().await;
    let log = run_in_pod(
        &ctx,
        "client",
        "tidal-edge",
        &format!(
            // kube-proxy may program a new Service's rules a moment after its pod is Ready
            // (CI saw one "connection refused"): retry, as a client would.
            "probe lookup {host} && for i in 1 2 3 4 5 6 7 8 9 10; do \
             probe http -d '{body}' http://{host}:8080/v1/chat/completions && exit 0; sleep 3; \
             done; exit 1"
        ),
    )
    .await;
    assert!(
        log.contains(&format!("Address: {ip}")),
        "DNS answered the Service's ClusterIP {ip}:\n{log}"
    );
    drop(edge);
    let in_pod: serde_json::Value = log
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON answer in the pod's log:\n{log}"));
    assert_eq!(in_pod["object"], "chat.completion", "{in_pod}");
    let answer: serde_json::Value = tidal_e2e::processes::http_client()
        .post(format!("http://{ip}:8080/v1/chat/completions"))
        .body(body)
        .header("content-type", "application/json")
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

    // 4. Prometheus found the worker and operator pods through Kubernetes discovery, as the
    //    chart's scrape config says, and labelled them the way the autoscaler selects.
    let worker_pod = workers[0].0.clone();
    let selector = format!(
        "up{{job=\"tidal-workers\",namespace=\"{ns}\",pod=\"{worker_pod}\",\
         tidal_inference_service=\"{name}\",tidal_tier=\"cloud\"}} == 1"
    );
    eventually("Prometheus scrapes the worker pod", START, || async {
        let r = prom_query(&selector).await?;
        if r.len() == 1 {
            Ok(())
        } else {
            Err(format!(
                "{selector}: {r:?}; all: {:?}",
                prom_query("up").await
            ))
        }
    })
    .await;
    let served = format!(
        "sum(tidal_worker_requests_total{{namespace=\"{ns}\",tidal_inference_service=\"{name}\"}})"
    );
    eventually(
        "the worker's request counter in Prometheus",
        START,
        || async {
            let r = prom_query(&served).await?;
            let n: f64 = r
                .first()
                .and_then(|v| v["value"][1].as_str())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if n >= 2.0 {
                Ok(())
            } else {
                Err(format!("{served} = {n}"))
            }
        },
    )
    .await;
    // The operator's job keeps its metrics' own labels (honor_labels): select by pod name.
    let operator_up = format!("count(up{{job=\"tidal-operator\",pod=~\"{ns}-.*\"}} == 1)");
    eventually("Prometheus scrapes both operator pods", START, || async {
        let r = prom_query(&operator_up).await?;
        match r.first().and_then(|v| v["value"][1].as_str()) {
            Some("2") => Ok(()),
            other => Err(format!("{operator_up} = {other:?}")),
        }
    })
    .await;

    // 5. The leading operator pod killed: the other takes the Lease over (within a lease
    //    duration, 15 s by default) and reconciles: a changed replica count is applied.
    ctx.api::<Pod>()
        .delete(&leader, &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the leading operator pod");
    let successor = eventually("another operator pod takes the Lease", START, || {
        // The other pod, or the one that replaced the killed leader.
        lease_holder(&leases, |h| {
            h != leader && h.starts_with(&format!("{ns}-tidal-"))
        })
    })
    .await;
    // With the scale, API keys from a Secret: the kubelet mounts it into the new pods (read
    // by the worker's non-root user through fsGroup) and the OpenAI API then needs a key.
    let key = "sk-real-node-0123456789";
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "chat-keys"},
        "stringData": {"api-keys": format!("{key}\n")},
    }))
    .unwrap();
    ctx.api::<k8s_openapi::api::core::v1::Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the API keys Secret");
    ctx.api::<InferenceService>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"cloud": {"minReplicas": 2, "maxReplicas": 2},
                                          "auth": {"apiKeySecret": {"name": "chat-keys"}}}}),
            ),
        )
        .await
        .expect("scale the InferenceService and require keys");
    eventually("the new leader applies the change", START, || async {
        let d = ctx
            .api::<Deployment>()
            .get(&svc_name)
            .await
            .map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(2) => Ok(()),
            r => Err(format!("replicas {r:?}")),
        }
    })
    .await;

    let models = format!("http://{ip}:8080/v1/models");
    eventually("the workers require the API key", START, || async {
        let status = |key: Option<&'static str>| {
            let mut req = tidal_e2e::processes::http_client()
                .get(&models)
                .timeout(Duration::from_secs(10));
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            async move {
                req.send()
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string())
            }
        };
        // Both through the Service, so every pod behind it has been replaced.
        match (status(None).await?, status(Some(key)).await?) {
            (401, 200) => Ok(()),
            other => Err(format!("without, with the key: {other:?}")),
        }
    })
    .await;

    eprintln!(
        "[real-serve] leader {leader} killed, {successor} took over; operator pods {operator_pods:?}; workers {workers:?}; \
         {host} resolved and answered in a pod on tidal-edge, and through ClusterIP {ip}"
    );
}

/// p95 of the workers' TTFT over the last `window`, from their histograms in Prometheus.
/// Ok once Prometheus answers `q` with a first sample above zero.
async fn positive(q: String) -> Result<(), String> {
    let r = prom_query(&q).await?;
    match r.first().and_then(|v| v["value"][1].as_str()) {
        Some(v) if v.parse::<f64>().is_ok_and(|v| v > 0.0) => Ok(()),
        _ => Err(format!("{q}: {r:?}")),
    }
}

/// The notes of the test namespace's Events with `reason`.
async fn event_notes(ctx: &TestCtx, reason: &str) -> Vec<String> {
    ctx.api::<Event>()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.message)
        .collect()
}

async fn ttft_p95_ms(ns: &str, service: &str, window: &str) -> Result<f64, String> {
    let q = format!(
        "histogram_quantile(0.95, sum by (le) (rate(tidal_worker_time_to_first_token_seconds_bucket\
         {{namespace=\"{ns}\",tidal_inference_service=\"{service}\"}}[{window}])))"
    );
    let r = prom_query(&q).await?;
    r.first()
        .and_then(|v| v["value"][1].as_str())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .map(|s| s * 1000.0)
        .ok_or_else(|| format!("{q}: {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_load_step_adds_worker_pods_and_scale_down_under_load_fails_no_request() {
    let Some((ctx, _release)) = setup_scraped("real-scale").await else {
        return;
    };
    let ns = ctx.namespace.clone();
    let name = "chat";
    let slo_ms = 1000_u32;
    let spec = json!({
            "model": {"uri": fixture_model(&ctx, "llama"), "architecture": "llama"},
            "cloud": {"minReplicas": 1, "maxReplicas": 3,
                      "nodeSelector": {"tidal.rs/tier": "cloud"},
                      "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
            "autoscaling": {
                "intervalSeconds": 5,
                // 2/s per replica: at the scale-down's 0.5/s, the queueing reserve for a 1 s
                // TTFT objective (~1.2/s of capacity for a Poisson stream) fits in one pod.
                "targetRpsPerReplica": 2.0,
                "slo": {"ttftP95Ms": slo_ms},
                // The median forecast: the band a load step leaves behind would hold the extra
                // pods for minutes (that is the band's job; this test is about the pods).
                "forecast": {"method": "Naive", "horizonSeconds": 10, "quantile": 0.5},
                "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 2},
                "scaleDown": {"stabilizationWindowSeconds": 20, "maxStep": 2},
            }
    });
    create_service(&ctx, name, spec).await;
    let selector = format!("app.kubernetes.io/instance={name}");
    one_pod_ready(&ctx, &selector).await;
    let metrics_available = || async {
        let t = ctx
            .api::<InferenceService>()
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let st = t.status.ok_or("no status")?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "MetricsAvailable" && c.status == "True")
            .map(|_| ())
            .ok_or_else(|| format!("{:?}", st.conditions))
    };
    eventually(
        "MetricsAvailable from the real Prometheus",
        START,
        metrics_available,
    )
    .await;

    // The load, through the Service's ClusterIP as a client in the cluster's network would
    // send it: 8 requests/s against 2 per replica (capped at 3 pods).
    let ip = routed_cluster_ip(&ctx, &format!("{name}-cloud"), name).await;
    let rate = Arc::new(AtomicU64::new(8000));
    let stop = Arc::new(AtomicBool::new(false));
    let load = variable_load(
        vec![format!("http://{ip}:8080")],
        name,
        rate.clone(),
        8 * 600,
        stop.clone(),
    );
    let deployments = ctx.api::<Deployment>();
    eventually(
        "the load step brings 3 worker pods Ready",
        START,
        || async {
            let spec = deployments
                .get(&format!("{name}-cloud"))
                .await
                .map_err(|e| e.to_string())?
                .spec
                .and_then(|s| s.replicas);
            let ready = ready_pods(&ctx, &ns, &selector).await;
            if spec == Some(3) && ready.len() == 3 {
                Ok(())
            } else {
                Err(format!("replicas {spec:?}, ready {ready:?}"))
            }
        },
    )
    .await;
    // With the capacity in place, TTFT over the last 20 s is within the SLO.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let p95 = eventually("p95 TTFT under the SLO at 3 pods", START, || async {
        let p95 = ttft_p95_ms(&ns, name, "20s").await?;
        if p95 <= f64::from(slo_ms) {
            Ok(p95)
        } else {
            Err(format!("p95 {p95:.0} ms"))
        }
    })
    .await;

    // Scale down while requests keep coming: the load falls to 0.5/s, pods are removed, and
    // no request fails (preStop keeps a terminating worker serving until endpoints drop it).
    rate.store(500, Ordering::Relaxed);
    eventually("scale-down to one pod under load", START, || async {
        let pods = ready_pods(&ctx, &ns, &selector).await;
        let all = ctx
            .api::<k8s_openapi::api::core::v1::Pod>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| e.to_string())?;
        if pods.len() == 1 && all.items.len() == 1 {
            Ok(())
        } else {
            let decision = ctx
                .api::<InferenceService>()
                .get(name)
                .await
                .ok()
                .and_then(|t| t.status?.last_decision);
            Err(format!(
                "ready {pods:?}, {} pods; last decision {decision:?}",
                all.items.len()
            ))
        }
    })
    .await;
    // A few more requests to the remaining pod, then the verdict.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    assert!(report.sent > 20, "{report:?}");
    report.assert_none_failed("across scale-up and scale-down");
    let scaled = event_notes(&ctx, "Autoscaled").await;
    assert!(scaled.len() >= 2, "scaled up and down: {scaled:?}");
    eprintln!(
        "[real-scale] {} requests, none failed; p95 TTFT {p95:.0} ms at 3 pods; events {scaled:?}",
        report.sent
    );
}

/// A slice of a real trace (the Azure coding trace's first 20 minutes: bursts of hundreds of
/// requests between silent minutes) replayed on real worker pods scaled by the operator from
/// Prometheus, then in the simulator's discrete-event mode on exactly the same requests, with
/// Tidal's core deciding in both and the replica measured on the same pods; the gap (replicas
/// over time, TTFT p95) is printed and written to `$CARGO_TARGET_TMPDIR/replay-gap.md`
/// (recorded in operator/BENCHMARKS.md). The client retries a 429 after the worker's
/// Retry-After, as OpenAI's SDKs do, with TTFT from the first try (the simulator's queue never
/// refuses; a refused request waits in both). Asserted: every request answered, both sides scaled
/// up from one replica, the simulator replayed every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_trace_slice_replayed_on_real_pods_and_in_the_simulator() {
    use tidal_e2e::replay::{self, Shrink};
    use tidal_sim::replay_gap::{self, Autoscaling, Calibration};

    let Some((ctx, _release)) = setup_scraped("real-replay").await else {
        return;
    };
    let ns = ctx.namespace.clone();
    let name = "replay";
    // A checkpoint big enough that a pod held to 300m of CPU is a real bottleneck (~10 MB).
    let model = tempfile::tempdir().unwrap();
    tidal_e2e::processes::write_fixture_with(
        model.path(),
        "llama",
        &["--hidden", "256", "--intermediate", "512", "--layers", "4"],
    );
    let uri = push_model(model.path(), &format!("tidal-e2e/models/replay:{ns}"));
    let mut a = Autoscaling {
        interval_s: 5.0,
        target_rps_per_replica: 1.0,
        min: 1,
        max: 3,
        slo_ttft_s: 2.0,
        quantile: 0.9,
        down_window_s: 30.0,
        max_wait_s: 30.0,
    };
    let autoscaling = |a: &Autoscaling| {
        json!({
            "intervalSeconds": a.interval_s as i64,
            "targetRpsPerReplica": a.target_rps_per_replica,
            "slo": {"ttftP95Ms": (a.slo_ttft_s * 1000.0) as i64},
            "forecast": {"method": "Auto", "quantile": a.quantile},
            "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": a.max},
            "scaleDown": {"stabilizationWindowSeconds": a.down_window_s as i64, "maxStep": a.max},
        })
    };
    // One pod first, to measure it; CPU-limited, so that each pod is a server of its own on
    // this shared machine.
    create_service(
        &ctx,
        name,
        json!({
            "model": {"uri": uri, "architecture": "llama"},
            "cloud": {"minReplicas": 1, "maxReplicas": 1,
                      "nodeSelector": {"tidal.rs/tier": "cloud"},
                      "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"cpu": "300m", "memory": "1Gi"}}},
            "autoscaling": autoscaling(&a),
        }),
    )
    .await;
    let selector = format!("app.kubernetes.io/instance={name}");
    one_pod_ready(&ctx, &selector).await;
    let ip = routed_cluster_ip(&ctx, &format!("{name}-cloud"), name).await;
    let base = format!("http://{ip}:8080");
    // A connection per request, so kube-proxy spreads every request over the ready pods (kept
    // connections would stay on the pods that were there first).
    let client = tidal_e2e::processes::http_client_builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let steps = replay::measure_steps(&client, &base, name, &[1, 4, 16], 24)
        .await
        .expect("decode steps measured");
    let (per_token, overhead) = replay::measure_prefill(&client, &base, name, 16, 256)
        .await
        .expect("prefill measured");
    let mut cal = Calibration {
        step_s: steps,
        prefill_s_per_token: per_token,
        overhead_s: overhead,
        cold_start_s: 0.0,
        max_batch: 16,
    };

    // The slice: 20 trace minutes 4x faster, prompts /32, outputs capped at 32 tokens; thinned
    // so that its busiest 10 s need about 2.5 replicas at the target below.
    let mut shrink = Shrink {
        speed: 4.0,
        keep: 1.0,
        seed: 20261203,
        prompt_scale: 1.0 / 32.0,
        prompt_bytes: (16, 128),
        max_output: 32,
    };
    let full = replay::plan(replay::AZURE_CODE_20_MIN, &shrink);
    let sizes: Vec<_> = full.iter().map(replay::Planned::unsent).collect();
    let capacity = replay_gap::batch_model(&cal, &a, &sizes)
        .expect("a replica model from the calibration")
        .replica
        .capacity_rps;
    a.target_rps_per_replica = (capacity * 0.6 * 100.0).round() / 100.0;
    shrink.keep = (2.5 * a.target_rps_per_replica / replay::peak_rps(&full, 10.0)).min(1.0);
    let plan = replay::plan(replay::AZURE_CODE_20_MIN, &shrink);
    let duration_s = 1200.0 / shrink.speed;
    eprintln!(
        "[real-replay] calibration {cal:?}; capacity {capacity:.2}/s per replica, target {:.2}; \
         {} requests over {duration_s:.0} s (keep {:.3})",
        a.target_rps_per_replica,
        plan.len(),
        shrink.keep
    );

    // Now up to 3 pods, at the target the measurement gives.
    let mut spec = json!({"cloud": {"maxReplicas": a.max}, "autoscaling": autoscaling(&a)});
    spec["cloud"]["minReplicas"] = a.min.into();
    ctx.api::<InferenceService>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .expect("raise maxReplicas");
    // The measurement's bursts may have scaled it up: the replay starts from one pod, as the
    // simulator does.
    let deployments = ctx.api::<Deployment>();
    eventually("one replica before the replay", START, || async {
        let d = deployments
            .get(&format!("{name}-cloud"))
            .await
            .map_err(|e| e.to_string())?;
        let desired = d.spec.and_then(|s| s.replicas);
        let ready = d.status.and_then(|s| s.ready_replicas);
        if desired == Some(1) && ready == Some(1) {
            Ok(())
        } else {
            Err(format!("desired {desired:?}, ready {ready:?}"))
        }
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = replay::sample_replicas(
        deployments,
        ctx.api::<Pod>(),
        format!("{name}-cloud"),
        selector.clone(),
        stop.clone(),
    );
    let outcomes = replay::replay(
        &client,
        &base,
        name,
        &plan,
        Duration::from_secs_f64(a.max_wait_s),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.await.unwrap();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(p, r)| r.as_ref().err().map(|e| format!("at {:.1} s: {e}", p.t_s)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} replayed requests failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    // Refused by a full queue and retried after its Retry-After (answered all the same).
    let retried = outcomes
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|s| s.retries > 0))
        .count();
    let mut cold: Vec<f64> = sampled.cold_starts_s.values().copied().collect();
    cold.sort_by(f64::total_cmp);
    cal.cold_start_s = cold
        .get(cold.len() / 2)
        .copied()
        .expect("a pod's cold start");
    let served: Vec<_> = outcomes.iter().map(replay::served).collect();
    let gap = replay_gap::compare(&served, &sampled.replicas, duration_s, &cal, &a)
        .expect("the simulator replays the slice");
    let mut report = replay_gap::markdown(&gap, &cal, &a, served.len());
    report.push_str(&format!(
        "\n{retried} of {} requests were refused by a full queue (429) and retried after \
         the worker's Retry-After; their TTFT counts from the first try.\n",
        served.len()
    ));
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("replay-gap.md");
    std::fs::write(&out, &report).unwrap();
    eprintln!(
        "[real-replay] cold starts {cold:?}; written to {}\n{report}",
        out.display()
    );
    assert!(
        gap.real.max_desired > 1,
        "the real run never scaled up: {:?}",
        sampled.replicas
    );
    assert!(
        gap.sim.max_desired > 1,
        "the simulator never scaled up: {:?}",
        gap.sim.replicas
    );
    assert!(gap.real.ttft_p95_s.is_some() && gap.sim.ttft_p95_s.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_worker_backlog_scales_up_through_the_fast_path_without_prometheus() {
    // No Prometheus at all: the slow loop holds every decision (MetricsAvailable=False). Only
    // the fast path, reading the worker pods' own /metrics every 2 s, can add a pod.
    let Some((ctx, _release)) = setup("real-fast", &[]).await else {
        return;
    };
    let name = "queue";
    let spec = json!({
        "model": {"uri": fixture_model(&ctx, "llama"), "architecture": "llama"},
        "cloud": {"minReplicas": 1, "maxReplicas": 3,
                  "nodeSelector": {"tidal.rs/tier": "cloud"},
                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        "autoscaling": {
            "intervalSeconds": 30,
            "targetRpsPerReplica": 2.0,
            "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 1},
        }
    });
    create_service(&ctx, name, spec).await;
    let selector = format!("app.kubernetes.io/instance={name}");
    one_pod_ready(&ctx, &selector).await;
    let services = ctx.api::<InferenceService>();
    eventually("MetricsAvailable=False (no Prometheus)", START, || async {
        let st = services
            .get(name)
            .await
            .map_err(|e| e.to_string())?
            .status
            .ok_or("no status")?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "MetricsAvailable" && c.status == "False")
            .map(|_| ())
            .ok_or_else(|| format!("{:?}", st.conditions))
    })
    .await;

    // A closed loop of 40 clients on a worker that runs 16 at once: about 24 always wait in
    // its queue.
    let ip = routed_cluster_ip(&ctx, &format!("{name}-cloud"), name).await;
    let url = format!("http://{ip}:8080/v1/completions");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let (url, stop, sent) = (url.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let http = tidal_e2e::processes::http_client();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"model": name, "prompt": "hello", "max_tokens": 32});
                    let _ = http
                        .post(&url)
                        .json(&body)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deployments = ctx.api::<Deployment>();
    let grown = eventually("the backlog adds a worker pod", START, || async {
        let replicas = deployments
            .get(&format!("{name}-cloud"))
            .await
            .map_err(|e| e.to_string())?
            .spec
            .and_then(|s| s.replicas)
            .unwrap_or(0);
        if replicas >= 2 {
            Ok(replicas)
        } else {
            Err(format!("replicas {replicas}"))
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let scaled = event_notes(&ctx, "Autoscaled").await;
    assert!(
        !scaled.is_empty() && scaled.iter().all(|m| m.contains("fast path:")),
        "every scale-up came from the fast path: {scaled:?}"
    );
    let st = services.get(name).await.unwrap().status.unwrap();
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "MetricsAvailable" && c.status == "False"),
        "the slow loop still held: {:?}",
        st.conditions
    );
    assert!(
        st.autoscaled_replicas.get(&format!("{name}-cloud")) >= Some(&2),
        "{:?}",
        st.autoscaled_replicas
    );
    eprintln!(
        "[real-fast] {} requests; Deployment at {grown} replicas; events {scaled:?}",
        sent.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_expert_shard_pod_killed_then_shards_scaled_down_under_load_fail_no_request() {
    let Some((ctx, _release)) = setup("real-shard", &[]).await else {
        return;
    };
    let ns = ctx.namespace.clone();
    // A tiny Mixtral whose experts run in two shard Deployments of two pods each, behind a
    // router pod; every pod from Tidal's image on the cloud node.
    let name = "moe";
    let spec = json!({
            // gen-fixture's default Mixtral: 4 experts.
            "model": {"uri": fixture_model(&ctx, "mixtral"), "architecture": "mixtral",
                      "numExperts": 4},
            "cloud": {"minReplicas": 1, "maxReplicas": 1,
                      "nodeSelector": {"tidal.rs/tier": "cloud"},
                      "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                      "experts": {"shards": 2, "minReplicasPerShard": 2,
                                  "maxReplicasPerShard": 2, "placement": "Balanced",
                                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}},
    });
    create_service(&ctx, name, spec).await;
    let shard_selector = |d: Deployment| {
        d.spec
            .and_then(|s| s.selector.match_labels)
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let deployments = ctx.api::<Deployment>();
    let shard0 = eventually("shard 0's Deployment", START, || async {
        deployments
            .get(&format!("{name}-experts-0"))
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let shard0 = shard_selector(shard0);
    eventually("router and 2 x 2 shard pods Ready", START, || async {
        let all = ready_pods(&ctx, &ns, &format!("app.kubernetes.io/instance={name}")).await;
        let shard = ready_pods(&ctx, &ns, &shard0).await;
        if all.len() == 5 && shard.len() == 2 {
            Ok(())
        } else {
            Err(format!("ready: {all:?}"))
        }
    })
    .await;

    // Load through the router's Service; midway one pod of shard 0 dies without notice (no
    // grace period: a crash, not a drain). The router retries the layer calls cut off on the
    // other replica, so no request fails; the ReplicaSet replaces the pod.
    let ip = routed_cluster_ip(&ctx, &format!("{name}-router"), name).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = variable_load(
        vec![format!("http://{ip}:8080")],
        name,
        Arc::new(AtomicU64::new(2000)),
        2 * 300,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The shard's Service is headless: the router balances over both pods itself (behind a
    // ClusterIP its one HTTP/2 connection would hold on to a single pod).
    let pods = ready_pods(&ctx, &ns, &shard0).await;
    for (pod, _) in &pods {
        let base = base_of_pod(&ctx, pod).await.expect("shard pod address");
        let text = tidal_e2e::processes::http_client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("shard metrics")
            .text()
            .await
            .expect("shard metrics body");
        let tokens: f64 = text
            .lines()
            .filter(|l| l.starts_with("tidal_worker_expert_tokens_total"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum();
        assert!(tokens > 0.0, "shard pod {pod} got no tokens: {pods:?}");
    }
    let victim = pods[0].0.clone();
    ctx.api::<Pod>()
        .delete(&victim, &DeleteParams::default().grace_period(0))
        .await
        .expect("kill a shard pod");
    eventually("the killed shard pod replaced and Ready", START, || async {
        let pods = ready_pods(&ctx, &ns, &shard0).await;
        if pods.len() == 2 && pods.iter().all(|(p, _)| p != &victim) {
            Ok(())
        } else {
            Err(format!("ready: {pods:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after_kill = ctx
        .api::<Pod>()
        .list(&ListParams::default().labels(&shard0))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect::<Vec<_>>();

    // Then both shards scale down to one pod each, still under load: the pods that go drop
    // out of the shard's DNS answer (readiness) before SIGTERM, and drain what they hold, so
    // the router's calls move to the pod that stays.
    ctx.api::<InferenceService>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cloud": {"experts": {
                "minReplicasPerShard": 1, "maxReplicasPerShard": 1}}}})),
        )
        .await
        .expect("scale the shards down");
    let scaled_at = std::time::Instant::now();
    let mut shard_selectors = vec![shard0.clone()];
    shard_selectors.push(shard_selector(
        deployments
            .get(&format!("{name}-experts-1"))
            .await
            .expect("shard 1's Deployment"),
    ));
    eventually(
        "each shard down to one pod, no pod terminating",
        START,
        || async {
            let mut counts = Vec::new();
            for sel in &shard_selectors {
                let all = ctx
                    .api::<Pod>()
                    .list(&ListParams::default().labels(sel))
                    .await
                    .map_err(|e| e.to_string())?;
                counts.push((all.items.len(), ready_pods(&ctx, &ns, sel).await.len()));
            }
            if counts.iter().all(|&c| c == (1, 1)) {
                Ok(())
            } else {
                Err(format!("(pods, ready) per shard: {counts:?}"))
            }
        },
    )
    .await;
    let scale_down_s = scaled_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    assert!(report.sent > 30, "{report:?}");
    report.assert_none_failed("while a shard pod was killed, then both shards scaled down");
    eprintln!(
        "[real-shard] killed {victim} (shard 0 then {after_kill:?}), then scaled both shards \
         2 -> 1 pod (settled after {scale_down_s:.0} s at 2 requests/s); {} requests through \
         the router, none failed",
        report.sent,
    );
}

/// A `/v1/completions` answer from the worker at `base` (http://IP:PORT).
async fn answers(base: &str, model: &str) -> Result<(), String> {
    let r = tidal_e2e::processes::http_client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": model, "prompt": "hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("{base}: {}", tidal_e2e::processes::error_chain(&e)))?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!("{base}: {}", r.status()))
    }
}

/// Edge traffic as an edge site's gateway sends it: to the site's edge Service first and, when that
/// attempt fails in transport (the site is unreachable: connect timeout, reset, no answer), once
/// more to the cloud Service, as an EdgeNode with `failoverToCloud` promises. Counts who served.
#[derive(Default)]
struct EdgeTraffic {
    by_edge: AtomicU64,
    by_cloud: AtomicU64,
    failed: std::sync::Mutex<Vec<String>>,
    /// The site's base URL (its edge Service).
    edge: std::sync::Mutex<String>,
}

impl EdgeTraffic {
    /// One request per second until `stop`; returns when the last one is answered.
    fn start(
        self: &Arc<Self>,
        cloud: String,
        model: &str,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let model = model.to_string();
        tokio::spawn(async move {
            let client = tidal_e2e::processes::http_client_builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("http client");
            let mut inflight = Vec::new();
            // Bounded: at most 15 minutes of traffic.
            for _ in 0..900 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let edge = me.edge.lock().unwrap().clone();
                let (me, client, cloud, model) =
                    (me.clone(), client.clone(), cloud.clone(), model.clone());
                inflight.push(tokio::spawn(async move {
                    let body = json!({"model": model, "prompt": "hello", "max_tokens": 2});
                    let send = |base: &str| {
                        client
                            .post(format!("{base}/v1/completions"))
                            .json(&body)
                            .timeout(Duration::from_secs(20))
                            .send()
                    };
                    let outcome = match send(&edge).await {
                        Ok(r) => Ok((r, &me.by_edge)),
                        Err(_) => send(&cloud).await.map(|r| (r, &me.by_cloud)),
                    };
                    match outcome {
                        Ok((r, counter)) if r.status().is_success() => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((r, _)) => me.failed.lock().unwrap().push(r.status().to_string()),
                        Err(e) => me.failed.lock().unwrap().push(e.to_string()),
                    }
                }));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            for t in inflight {
                let _ = t.await;
            }
        })
    }

    fn served(&self) -> (u64, u64) {
        (
            self.by_edge.load(Ordering::Relaxed),
            self.by_cloud.load(Ordering::Relaxed),
        )
    }
}

/// The real edge node as an EdgeNode of this test's pool (labelled `tidal.rs/edge-pool=<ns>`;
/// a cluster-scoped object named after the namespace, deleted with the guard). Hold [`EDGE`].
async fn edge_site(ctx: &TestCtx) -> (String, tidal_e2e::kwok::ClusterGuard) {
    use tidal_operator::crd::EdgeNode;
    let ns = &ctx.namespace;
    let site = format!("{ns}-site");
    let en: EdgeNode = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "EdgeNode",
        "metadata": {"name": site, "labels": {"tidal.rs/edge-pool": ns}},
        "spec": {"nodeName": "tidal-edge", "site": "store-1", "region": "local-edge",
                 "offlinePolicy": {"heartbeatTimeoutSeconds": 20, "failoverToCloud": true}},
    }))
    .unwrap();
    // The heartbeat the operator will first see (a phase Event's "why" on failure).
    let lease = Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease")
        .get_opt("tidal-edge")
        .await
        .ok()
        .flatten();
    eprintln!(
        "[edge-site] {site} at {}: Lease kube-node-lease/tidal-edge created {:?}, renewed {:?}",
        k8s_openapi::jiff::Timestamp::now(),
        lease
            .as_ref()
            .and_then(|l| l.metadata.creation_timestamp.as_ref())
            .map(|t| t.0.to_string()),
        lease
            .as_ref()
            .and_then(|l| l.spec.as_ref()?.renew_time.as_ref())
            .map(|t| t.0.to_string()),
    );
    Api::<EdgeNode>::all(ctx.client.clone())
        .create(&PostParams::default(), &en)
        .await
        .expect("create EdgeNode");
    let guard = tidal_e2e::kwok::ClusterGuard::new(ctx, "edgenode", &site);
    (site, guard)
}

/// How many pods `selector` matches, terminating ones included.
async fn pod_count(ctx: &TestCtx, selector: &str) -> Result<usize, String> {
    ctx.api::<Pod>()
        .list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items.len())
        .map_err(|e| e.to_string())
}

/// `http://IP:8080` of a Service's ClusterIP, or of a pod.
async fn base_of_service(ctx: &TestCtx, svc: &str) -> Result<String, String> {
    let s = ctx
        .api::<Service>()
        .get(svc)
        .await
        .map_err(|e| e.to_string())?;
    let ip = s.spec.and_then(|s| s.cluster_ip).ok_or("no ClusterIP")?;
    Ok(format!("http://{ip}:8080"))
}

async fn base_of_pod(ctx: &TestCtx, pod: &str) -> Result<String, String> {
    let p = ctx.api::<Pod>().get(pod).await.map_err(|e| e.to_string())?;
    let ip = p.status.and_then(|s| s.pod_ip).ok_or("no pod IP")?;
    Ok(format!("http://{ip}:8080"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_edge_node_cut_off_five_times_fails_over_to_the_cloud_and_back() {
    use tidal_operator::crd::EdgeNode;

    let _edge = EDGE.lock().await;
    let Some((ctx, _release)) = setup("real-edge", &[]).await else {
        return;
    };
    let ns = ctx.namespace.clone();
    let (site, _site_guard) = edge_site(&ctx).await;
    let edge_nodes: Api<EdgeNode> = Api::all(ctx.client.clone());
    let name = "assist";
    let uri = fixture_model(&ctx, "llama");
    let spec = cloud_and_edge(&uri, &ns, 2, 2);
    create_service(&ctx, name, spec).await;
    // The site's own Service: its clients' stable address, whatever pods serve it.
    let site_service = format!("{name}-edge-{site}");
    let edge_selector =
        format!("app.kubernetes.io/instance={name},app.kubernetes.io/component=edge");
    let cloud_selector =
        format!("app.kubernetes.io/instance={name},app.kubernetes.io/component=cloud");
    eventually(
        "two edge pods Ready on tidal-edge, a cloud pod on tidal-cloud",
        START,
        || async {
            let edge = ready_pods(&ctx, &ns, &edge_selector).await;
            let cloud = ready_pods(&ctx, &ns, &cloud_selector).await;
            if edge.len() == 2 && edge.iter().all(|(_, n)| n == "tidal-edge") && cloud.len() == 1 {
                answers(&base_of_service(&ctx, &site_service).await?, name).await
            } else {
                Err(format!("edge {edge:?}, cloud {cloud:?}"))
            }
        },
    )
    .await;
    let phase = |want: &'static str| {
        let edge_nodes = edge_nodes.clone();
        let site = site.clone();
        async move {
            let en = edge_nodes.get(&site).await.map_err(|e| e.to_string())?;
            let phase = en
                .status
                .map(|s| format!("{:?}", s.phase))
                .unwrap_or_default();
            if phase == want {
                Ok(())
            } else {
                Err(format!("phase {phase}"))
            }
        }
    };
    eventually("EdgeNode Ready", START, || phase("Ready")).await;

    // The site's traffic, to the site's Service, through a gateway that fails over to the
    // cloud Service (until the site's Service itself routes to the cloud tier: a cut-off site
    // has no ready replica).
    let traffic = Arc::new(EdgeTraffic {
        edge: std::sync::Mutex::new(base_of_service(&ctx, &site_service).await.unwrap()),
        ..Default::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic.start(
        base_of_service(&ctx, &format!("{name}-cloud"))
            .await
            .unwrap(),
        name,
        stop.clone(),
    );
    eventually("the edge pod serves the site's traffic", START, || async {
        match traffic.served() {
            (edge, _) if edge >= 3 => Ok(()),
            other => Err(format!("served by (edge, cloud): {other:?}")),
        }
    })
    .await;

    // The site scales down under its traffic (2 -> 1 pod): the pod that goes leaves the
    // Service's endpoints before SIGTERM and drains, so no request fails, and none needed the
    // cloud (a failed edge attempt would have shown up as a cloud answer).
    let (edge_before, cloud_before) = traffic.served();
    ctx.api::<InferenceService>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"edge": {"minReplicasPerNode": 1,
                                                    "maxReplicasPerNode": 1}}})),
        )
        .await
        .expect("scale the edge tier down");
    eventually("the site down to one edge pod", START, || async {
        let all = pod_count(&ctx, &edge_selector).await?;
        let ready = ready_pods(&ctx, &ns, &edge_selector).await;
        if all == 1 && ready.len() == 1 {
            Ok(())
        } else {
            Err(format!("{all} edge pods, ready {ready:?}"))
        }
    })
    .await;
    let settled = traffic.served().0;
    eventually("the remaining edge pod serves the site", START, || async {
        match traffic.served() {
            (edge, _) if edge >= settled + 3 => Ok(()),
            other => Err(format!("served by (edge, cloud): {other:?}")),
        }
    })
    .await;
    let (edge_after, cloud_before_cut) = traffic.served();
    let failed_in_scale_down = traffic.failed.lock().unwrap().clone();
    assert!(
        failed_in_scale_down.is_empty() && cloud_before_cut == cloud_before,
        "edge scale-down 2 -> 1 under load: failed {failed_in_scale_down:?}, {} answered by \
         the cloud instead of the site",
        cloud_before_cut - cloud_before
    );
    eprintln!(
        "[real-edge] site scaled 2 -> 1 edge pod under load: {} requests by the site's \
         Service, none failed, none failed over",
        edge_after - edge_before
    );

    // The site loses its uplink: no heartbeat, nothing reaches its pods.
    let cut = Cut::edge("tidal-edge");
    eventually("EdgeNode Offline", START, || phase("Offline")).await;
    let services = ctx.api::<InferenceService>();
    eventually(
        "Degraded, and the edge's replica served by a second cloud pod",
        START,
        || async {
            let st = services
                .get(name)
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            let degraded = st.conditions.iter().any(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "EdgeSiteOffline"
            });
            let cloud = ready_pods(&ctx, &ns, &cloud_selector).await;
            if degraded && cloud.len() == 2 && cloud.iter().all(|(_, n)| n == "tidal-cloud") {
                answers(
                    &base_of_service(&ctx, &format!("{name}-cloud")).await?,
                    name,
                )
                .await
            } else {
                Err(format!("degraded {degraded}, cloud {cloud:?}"))
            }
        },
    )
    .await;
    site_served_through(&ctx, name, &site, "cloud", &traffic, "cut 1").await;

    // Back online: Ready again, the edge pod serves, the cloud returns to its own size.
    drop(cut);
    eventually("EdgeNode Ready again", START, || phase("Ready")).await;
    eventually(
        "the edge serves again and the cloud shrinks",
        START,
        || async {
            let cloud = ready_pods(&ctx, &ns, &cloud_selector).await;
            let all_cloud = pod_count(&ctx, &cloud_selector).await?;
            let edge = ready_pods(&ctx, &ns, &edge_selector).await;
            match edge.first() {
                Some((pod, _)) if cloud.len() == 1 && all_cloud == 1 => {
                    answers(&base_of_pod(&ctx, pod).await?, name).await
                }
                _ => Err(format!("edge {edge:?}, cloud {cloud:?}")),
            }
        },
    )
    .await;
    // The site's traffic returns to its edge pod, and no request was lost on the way.
    site_served_through(&ctx, name, &site, "edge", &traffic, "restore 1").await;

    // Four more cuts in a row, under the same traffic: each time Offline once, the cloud
    // answers the site, Ready once after the restore, and the edge takes its traffic back.
    for round in 2..=5 {
        let cut = Cut::edge("tidal-edge");
        eventually(&format!("Offline, cut {round}"), START, || phase("Offline")).await;
        let what = format!("cut {round}");
        site_served_through(&ctx, name, &site, "cloud", &traffic, &what).await;
        drop(cut);
        eventually(&format!("Ready, restore {round}"), START, || phase("Ready")).await;
        let what = format!("restore {round}");
        site_served_through(&ctx, name, &site, "edge", &traffic, &what).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let failed = traffic.failed.lock().unwrap().clone();
    let (by_edge, by_cloud) = traffic.served();
    assert!(
        failed.is_empty(),
        "failoverToCloud: every request of the site is served, by its edge or the cloud; \
         {} failed: {failed:?} (edge {by_edge}, cloud {by_cloud})",
        failed.len()
    );
    // No flapping beyond the offline policy: one phase change each way per cut.
    let (ready, degraded) =
        tidal_e2e::assert_phase_changed_once_each_way(&ctx.client, &site, 5).await;
    eprintln!(
        "[real-edge] {site} cut off and restored 5 times: {ready} Ready, 5 Offline, {degraded} \
         Degraded Events; each time it failed over to the cloud and came back; site traffic: \
         {by_edge} by the edge, {by_cloud} by the cloud, none failed"
    );
}

/// A llama `uri` on one or two cloud pods and `min..=max` pods on each EdgeNode of this
/// test's pool (`tidal-edge`), small requests each.
fn cloud_and_edge(uri: &str, ns: &str, min: i32, max: i32) -> serde_json::Value {
    json!({
        "model": {"uri": uri, "architecture": "llama"},
        "cloud": {"minReplicas": 1, "maxReplicas": 2,
                  "nodeSelector": {"tidal.rs/tier": "cloud"},
                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        "edge": {"model": {"uri": uri, "architecture": "llama"},
                 "edgeNodeSelector": {"matchLabels": {"tidal.rs/edge-pool": ns}},
                 "minReplicasPerNode": min, "maxReplicasPerNode": max,
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
    })
}

/// Waits until the site's Service routes to `tier` (`edge` or `cloud`), then until the site's
/// traffic has had 3 more answers. Cut off, a site has no ready replica and its Service routes
/// to the cloud tier (the gateway's fallback to the cloud Service covers the seconds before).
async fn site_served_through(
    ctx: &TestCtx,
    name: &str,
    site: &str,
    tier: &str,
    traffic: &EdgeTraffic,
    what: &str,
) {
    eventually(
        &format!("{what}: the site's Service on the {tier} tier"),
        START,
        || async { site_served_by(ctx, name, site, tier).await },
    )
    .await;
    let (e, c) = traffic.served();
    eventually(
        &format!("{what}: the site's traffic answered"),
        START,
        || async {
            match traffic.served() {
                (e2, c2) if e2 + c2 >= e + c + 3 => Ok(()),
                other => Err(format!("served by (edge, cloud): {other:?}")),
            }
        },
    )
    .await;
}

/// Ok when an InferenceService's status says `tier` (`edge` or `cloud`) serves an edge site.
async fn site_served_by(ctx: &TestCtx, name: &str, site: &str, tier: &str) -> Result<(), String> {
    let t = ctx
        .api::<InferenceService>()
        .get(name)
        .await
        .map_err(|e| e.to_string())?;
    let by = t
        .status
        .ok_or("no status")?
        .edge
        .iter()
        .find(|e| e.edge_node == site)
        .and_then(|e| e.served_by.clone())
        .ok_or_else(|| format!("no servedBy for {site}"))?;
    if by == tier {
        Ok(())
    } else {
        Err(format!("servedBy {by}"))
    }
}

/// A load through a Service's DNS name, as a client in the cluster addresses it (so the
/// request's `Host` names the Service), connected to its ClusterIP from the host.
async fn load_by_name(
    ctx: &TestCtx,
    svc: &str,
    model: &str,
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<tidal_e2e::processes::LoadReport> {
    let host = format!("{svc}.{}.svc.cluster.local", ctx.namespace);
    let ip: std::net::IpAddr = base_of_service(ctx, svc)
        .await
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches(":8080")
        .parse()
        .unwrap();
    let client = tidal_e2e::processes::http_client_builder()
        .resolve(&host, std::net::SocketAddr::new(ip, 8080))
        .build()
        .unwrap();
    tidal_e2e::processes::variable_load_with(
        client,
        vec![format!("http://{host}:8080")],
        model,
        rate,
        600,
        stop,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_quiet_edge_site_sleeps_serves_its_clients_from_the_cloud_and_wakes_on_their_demand()
 {
    let _edge = EDGE.lock().await;
    let Some((ctx, _release)) = setup_scraped("real-sleep").await else {
        return;
    };
    let ns = ctx.namespace.clone();
    let (site, _site_guard) = edge_site(&ctx).await;
    let name = "nap";
    let uri = fixture_model(&ctx, "llama");
    // minReplicasPerNode 0: the site may sleep. The quiet rule: under one request per 5 s
    // interval; 20 s of quiet before it sleeps.
    let mut spec = cloud_and_edge(&uri, &ns, 0, 1);
    spec["autoscaling"] = json!({
        "intervalSeconds": 5,
        "targetRpsPerReplica": 2.0,
        "forecast": {"method": "Naive", "horizonSeconds": 10, "quantile": 0.5},
        "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 2},
        "scaleDown": {"stabilizationWindowSeconds": 20, "maxStep": 2},
    });
    create_service(&ctx, name, spec).await;
    let site_service = format!("{name}-edge-{site}");
    let edge_selector =
        format!("app.kubernetes.io/instance={name},app.kubernetes.io/component=edge");
    let cloud_selector =
        format!("app.kubernetes.io/instance={name},app.kubernetes.io/component=cloud");
    let services = ctx.api::<Service>();
    let selects = |component: &'static str| {
        let services = services.clone();
        let svc = site_service.clone();
        async move {
            let s = services.get(&svc).await.map_err(|e| e.to_string())?;
            let sel = s.spec.and_then(|s| s.selector).unwrap_or_default();
            match sel.get("app.kubernetes.io/component") {
                Some(c) if c == component => Ok(()),
                other => Err(format!("{svc} selects component {other:?}")),
            }
        }
    };

    // Asleep from the start (no demand seen yet): no edge pod, the site's Service routes to
    // the cloud tier, which answers the site's clients.
    eventually(
        "the cloud pod Ready and the sleeping site's Service on the cloud tier",
        START,
        || async {
            let cloud = ready_pods(&ctx, &ns, &cloud_selector).await;
            if cloud.len() != 1 {
                return Err(format!("cloud {cloud:?}"));
            }
            selects("cloud").await?;
            if pod_count(&ctx, &edge_selector).await? != 0 {
                return Err("an edge pod exists".into());
            }
            site_served_by(&ctx, name, &site, "cloud").await?;
            answers(&base_of_service(&ctx, &site_service).await?, name).await
        },
    )
    .await;

    // The site's clients, 1 request/s by its Service's name: the cloud workers count them as
    // the site's, the autoscaler wakes the site, and its Service moves to the edge pod once it
    // is ready. Not one request fails on the way.
    let rate = Arc::new(AtomicU64::new(1000));
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_by_name(&ctx, &site_service, name, rate.clone(), stop.clone()).await;
    eventually("the cloud workers count the site's requests", START, || {
        positive(format!(
            "sum(tidal_worker_site_requests_total{{namespace=\"{ns}\",site=\"{site_service}\"}})"
        ))
    })
    .await;
    eventually(
        "the site wakes: an edge pod Ready on tidal-edge, its Service on it",
        START,
        || async {
            let edge = ready_pods(&ctx, &ns, &edge_selector).await;
            if edge.len() != 1 || edge[0].1 != "tidal-edge" {
                return Err(format!("edge {edge:?}"));
            }
            selects("edge").await?;
            site_served_by(&ctx, name, &site, "edge").await
        },
    )
    .await;
    // Some of the site's requests on its own pod, then the clients leave.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let woke = load.await.unwrap();
    woke.assert_none_failed("while the site woke");
    // Its pod served them (Prometheus scrapes it every 5 s).
    eventually("the awake site's pod served its clients", START, || {
        positive(format!(
            "sum(tidal_worker_requests_total{{namespace=\"{ns}\",tidal_tier=\"edge\",endpoint=\"/v1/completions\"}})"
        ))
    })
    .await;

    // Quiet: a request every 10 s (under the 1-per-5-s rule). The site sleeps again, its
    // Service back on the cloud before its pod goes, and every one of these requests is
    // answered across that switch.
    let rate = Arc::new(AtomicU64::new(100));
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = load_by_name(&ctx, &site_service, name, rate, stop.clone()).await;
    eventually(
        "the quiet site sleeps: no edge pod, its Service on the cloud tier",
        START,
        || async {
            selects("cloud").await?;
            let n = pod_count(&ctx, &edge_selector).await?;
            if n != 0 {
                return Err(format!("{n} edge pods"));
            }
            site_served_by(&ctx, name, &site, "cloud").await
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, Ordering::Relaxed);
    let slept = trickle.await.unwrap();
    assert!(slept.sent >= 2, "{slept:?}");
    slept.assert_none_failed("while the site went to sleep");
    let routing = event_notes(&ctx, "EdgeSiteRouting").await;
    assert!(
        routing.iter().any(|n| n.contains("routes to them again"))
            && routing
                .iter()
                .any(|n| n.contains("routes to the cloud tier")),
        "{routing:?}"
    );
    let scaled = event_notes(&ctx, "Autoscaled").await;
    assert!(
        scaled
            .iter()
            .any(|n| n.contains(&site) && n.contains("1 -> 0") && n.contains("quiet")),
        "{scaled:?}"
    );
    eprintln!(
        "[real-sleep] {site}: woke on {} requests through its Service (none failed), slept on \
         a trickle of {} (none failed); routing {routing:?}",
        woke.sent, slept.sent
    );
}

/// The version Cargo.lock pins for `name` (the one version of it in the graph).
fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(repo_root().join("Cargo.lock")).unwrap();
    let versions: Vec<&str> = lock
        .split("[[package]]")
        .filter(|p| p.contains(&format!("\nname = \"{name}\"\n")))
        .filter_map(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"'))
        .collect();
    assert_eq!(versions.len(), 1, "{name} in Cargo.lock: {versions:?}");
    versions[0].to_string()
}

#[tokio::test]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_images_carry_their_sbom_and_run_as_non_root() {
    let Some(ctx) = TestCtx::new("real-images").await else {
        return;
    };
    require_real_nodes(&ctx).await;
    let dir = tempfile::tempdir().unwrap();
    // (image, a crate it holds, a crate it must not: each binary's own graph, not the workspace's)
    for (image, has, lacks) in [
        ("tidal-worker", "candle-core", "kube"),
        ("tidal-operator", "kube", "candle-core"),
    ] {
        let reference = format!("{}/tidal-rs/{image}:0.1.0", tidal_e2e::real::registry());
        let tar = dir.path().join(format!("{image}.tar"));
        ctx.env.run(
            "crane",
            &["export", "--insecure", &reference, tar.to_str().unwrap()],
        );
        let path = format!("usr/share/doc/{image}/sbom.spdx.json");
        let out = std::process::Command::new("tar")
            .args(["-xOf", tar.to_str().unwrap(), &path])
            .output()
            .unwrap();
        assert!(out.status.success(), "{path} in {reference}");
        let sbom: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
        let version_of = |name: &str| {
            sbom["packages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .map(|p| p["versionInfo"].as_str().unwrap().to_string())
        };
        assert_eq!(version_of(image).as_deref(), Some("0.1.0"));
        assert_eq!(
            version_of(has),
            Some(locked_version(has)),
            "{image}'s SBOM lists {has} at its locked version"
        );
        assert_eq!(version_of(lacks), None, "{image} does not link {lacks}");
        let config: serde_json::Value =
            serde_json::from_str(&ctx.env.run("crane", &["config", "--insecure", &reference]))
                .unwrap();
        assert_eq!(
            config["config"]["User"], "65532:65532",
            "{image} runs as non-root"
        );
        eprintln!(
            "[real-images] {image}: SBOM of {} packages, user {}",
            sbom["packages"].as_array().unwrap().len(),
            config["config"]["User"]
        );
    }
}

/// A CA and a certificate it signed for every Service name of `namespace`, as the Secret
/// data cert-manager would write (`tls.crt`, `tls.key`, `ca.crt`).
fn tls_secret_data(namespace: &str) -> std::collections::BTreeMap<String, String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names = vec![
        format!("*.{namespace}.svc.cluster.local"),
        format!("*.{namespace}.svc"),
    ];
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::collections::BTreeMap::from([
        ("tls.crt".to_string(), cert.pem()),
        ("tls.key".to_string(), key.serialize_pem()),
        ("ca.crt".to_string(), ca.pem()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real nodes and images: run through deploy/local/tidal-local test"]
async fn real_node_tls_secret_makes_router_shards_and_edge_speak_https() {
    let _edge = EDGE.lock().await;
    let Some((ctx, _release)) = setup("real-tls", &[]).await else {
        return;
    };
    let ns = ctx.namespace.clone();
    let (site, _site_guard) = edge_site(&ctx).await;
    let data = tls_secret_data(&ns);
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "moe-tls"}, "type": "kubernetes.io/tls", "stringData": data,
    }))
    .unwrap();
    ctx.api::<k8s_openapi::api::core::v1::Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the TLS Secret");
    let name = "moe";
    create_service(
        &ctx,
        name,
        json!({
            "model": {"uri": fixture_model(&ctx, "mixtral"), "architecture": "mixtral",
                      "numExperts": 4},
            "tls": {"secretName": "moe-tls"},
            "cloud": {"minReplicas": 1, "maxReplicas": 1,
                      "nodeSelector": {"tidal.rs/tier": "cloud"},
                      "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                      "experts": {"shards": 1, "minReplicasPerShard": 1,
                                  "maxReplicasPerShard": 1,
                                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}},
            // An edge site whose every answer escalates (once a few tokens exist) to the
            // cloud tier's router, over HTTPS verified with the Secret's CA.
            "edge": {"model": {"uri": fixture_model(&ctx, "llama"), "architecture": "llama"},
                     "edgeNodeSelector": {"matchLabels": {"tidal.rs/edge-pool": ns}},
                     "escalation": {"confidenceThreshold": 1.0},
                     "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        }),
    )
    .await;
    // Ready through HTTPS probes; the router warmed up through its shard over TLS.
    eventually("router, shard and edge pods Ready", START, || async {
        let all = ready_pods(&ctx, &ns, &format!("app.kubernetes.io/instance={name}")).await;
        if all.len() == 3 {
            Ok(())
        } else {
            Err(format!("ready: {all:?}"))
        }
    })
    .await;

    // A client trusting only the Secret's CA reaches the router by its Service name (mapped
    // to the ClusterIP from the host) and gets an answer computed through the shard.
    let ip = ctx
        .api::<Service>()
        .get(&format!("{name}-router"))
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap();
    let host = format!("{name}-router.{ns}.svc.cluster.local");
    let edge_svc = format!("{name}-edge-{site}");
    let edge_host = format!("{edge_svc}.{ns}.svc.cluster.local");
    let edge_ip = ctx
        .api::<Service>()
        .get(&edge_svc)
        .await
        .expect("the site's Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(data["ca.crt"].as_bytes()).unwrap()])
        .resolve(&host, format!("{ip}:8080").parse().unwrap())
        .resolve(&edge_host, format!("{edge_ip}:8080").parse().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let answer: serde_json::Value = eventually("an HTTPS completion", START, || async {
        let r = client
            .post(format!("https://{host}:8080/v1/completions"))
            .json(&json!({"model": name, "prompt": "Hello", "max_tokens": 4}))
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        if r.status() != 200 {
            return Err(format!("status {}", r.status()));
        }
        r.json().await.map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
    // The edge site, over HTTPS: its answer is escalated to the router over HTTPS (the edge
    // verifies the cloud with the Secret's CA) and finished there. The confidence is checked
    // once the window (8 tokens) is full, so the answer must be longer than that.
    let escalated = eventually("an edge answer escalated to the cloud", START, || async {
        let r = client
            .post(format!("https://{edge_host}:8080/v1/completions"))
            .json(&json!({"model": name, "prompt": "Hello", "max_tokens": 16}))
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let header = |h: &str| {
            r.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match (
            r.status().as_u16(),
            header("x-tidal-escalated"),
            header("x-tidal-escalation-failed"),
        ) {
            (200, Some(why), None) => Ok(why),
            other => Err(format!("(status, escalated, failed): {other:?}")),
        }
    })
    .await;
    assert_eq!(escalated, "low_confidence");
    // Plain HTTP is not served.
    let plain = reqwest::Client::new()
        .get(format!("http://{ip}:8080/v1/models"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));
    // Prometheus scrapes both pods over HTTPS, as their annotation says.
    let scraped = eventually("Prometheus scrapes the HTTPS workers", START, || async {
        let up = prom_query(&format!(r#"up{{namespace="{ns}"}} == 1"#)).await?;
        if up.len() == 3 {
            Ok(up.len())
        } else {
            Err(format!("up: {up:?}"))
        }
    })
    .await;
    eprintln!(
        "[real-tls] router, shard and edge over HTTPS (probes, router -> shard, edge -> cloud \
         escalation, clients -> router and edge); {scraped} pods scraped over HTTPS; plain HTTP \
         refused"
    );
}
