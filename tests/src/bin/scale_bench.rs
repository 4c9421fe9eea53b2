//! Scale benchmark of the controllers on the local control plane (not a test): N fake edge
//! Nodes (kwok) with an EdgeNode each, M InferenceServices whose edge tiers select 4 EdgeNodes
//! each, and a fresh `tidal-operator` process. Reports time to converge, reconcile duration
//! quantiles, API writes per reconcile and the operator's peak RSS, as Markdown on stdout.
//!
//! `cargo run --release -p tidal-e2e --bin scale-bench -- [EDGE_NODES] [SERVICES]`
//! (`TIDAL_OPERATOR_BINARY=PATH` runs that operator binary instead of building one).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;
use tidal_operator::crd::{EdgeNode, InferenceService};

const NS: &str = "tidal-scale-bench";
const CONCURRENCY: usize = 16;
/// Seconds of steady state measured after convergence.
const STEADY_SECONDS: u64 = 60;

fn metric_lines(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A quantile from the reconcile-duration histogram of one controller (upper bucket bound).
fn quantile(text: &str, controller: &str, q: f64) -> f64 {
    let label = format!("controller=\"{controller}\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| {
            l.starts_with("tidal_operator_reconcile_duration_seconds_bucket{") && l.contains(&label)
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.iter().map(|b| b.1).fold(0.0, f64::max);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|b| b.0)
        .unwrap_or(f64::NAN)
}

/// The operator's API writes by (controller, kind) label set.
fn by_kind(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tidal_operator_api_writes_total"))
        .filter_map(|l| {
            let (labels, v) = l.rsplit_once(' ')?;
            Some((labels.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A kwok-managed Node of `tier` with 110 pods of capacity, as a kubelet has.
fn fake_node(name: &str, tier: &str, cpu: &str, memory: &str) -> Node {
    let resources = json!({"cpu": cpu, "memory": memory, "pods": "110"});
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"tidal.rs/tier": tier, "tidal.rs/bench": "true", "kubernetes.io/hostname": name}},
        "status": {"allocatable": resources, "capacity": resources}
    }))
    .unwrap()
}

async fn create_all<K, F>(api: Api<K>, n: usize, make: F)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    F: Fn(usize) -> K,
{
    futures::stream::iter((0..n).map(make))
        .map(|obj| {
            let api = api.clone();
            async move {
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()), // left from a previous run
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .expect("create objects");
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let edge_nodes = args.first().copied().unwrap_or(2000);
    let services = args.get(1).copied().unwrap_or(500);
    let env = tidal_e2e::control_plane().expect("the local control plane");
    // Built first: a build must not overlap the measured phase. TIDAL_OPERATOR_BINARY measures
    // another build (a baseline, or a release binary) with the same driver.
    let operator = std::env::var_os("TIDAL_OPERATOR_BINARY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(tidal_e2e::operator_binary);
    let client = tidal_e2e::client(&env).await;
    let ctx = tidal_e2e::TestCtx {
        env: env.clone(),
        client: client.clone(),
        namespace: NS.into(),
    };
    tidal_e2e::install_crds(&ctx).await;
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await;

    eprintln!("creating {edge_nodes} fake Nodes and EdgeNodes");
    let t = Instant::now();
    create_all(Api::<Node>::all(client.clone()), edge_nodes, |i| {
        fake_node(&format!("bench-edge-{i}"), "edge", "8", "16Gi")
    })
    .await;
    // Cloud capacity for one cloud replica per service (110 pods per Node, as a kubelet).
    create_all(Api::<Node>::all(client.clone()), services / 100 + 1, |i| {
        fake_node(&format!("bench-cloud-{i}"), "cloud", "64", "512Gi")
    })
    .await;
    create_all(Api::<EdgeNode>::all(client.clone()), edge_nodes, |i| {
        serde_json::from_value(json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "EdgeNode",
            "metadata": {"name": format!("bench-{i}"), "labels": {"tidal.rs/bench": "true", "pool": format!("p{}", i % services.max(1))}},
            "spec": {"nodeName": format!("bench-edge-{i}"), "site": format!("site-{i}")}
        }))
        .unwrap()
    })
    .await;
    eprintln!(
        "created nodes in {:?}; creating {services} InferenceServices",
        t.elapsed()
    );
    create_all(Api::<InferenceService>::namespaced(client.clone(), NS), services, |j| {
        serde_json::from_value(json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": format!("svc-{j}")},
            "spec": {"model": {"uri": "/models/m", "architecture": "llama"},
                     "cloud": {"minReplicas": 1, "maxReplicas": 2, "nodeSelector": {"tidal.rs/tier": "cloud"}},
                     "edge": {"model": {"uri": "/models/e", "architecture": "qwen2"},
                              "edgeNodeSelector": {"matchLabels": {"pool": format!("p{j}")}}}}
        }))
        .unwrap()
    })
    .await;

    // A fresh operator process: everything below is its work from an empty cache.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut op = env
        .command(operator.to_str().unwrap())
        .args([
            "run",
            "--no-leader-election",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = op.id();
    let start = Instant::now();
    let tis_api = Api::<InferenceService>::namespaced(client.clone(), NS);
    let per_service = edge_nodes / services.max(1);
    let expected_edge = format!("{per_service}/{per_service}");
    let desired_edge = format!("/{per_service}");
    // Two milestones: every child applied and reported (the operator's work), and every
    // replica ready (also the controller-manager, scheduler and kwok's).
    let mut applied_at = None;
    // What the operator had written by then, by controller and kind.
    let mut applied_writes = BTreeMap::new();
    let converged = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok(list) = tis_api.list(&ListParams::default()).await else {
            eprintln!("list failed (API server busy); retrying");
            continue;
        };
        let done = list
            .items
            .iter()
            .filter(|t| {
                t.status.as_ref().is_some_and(|s| {
                    s.observed_generation == t.metadata.generation
                        && s.cloud_ready.as_deref() == Some("1/1")
                        && s.edge_ready.as_deref() == Some(expected_edge.as_str())
                })
            })
            .count();
        let applied = list
            .items
            .iter()
            .filter(|t| {
                t.status.as_ref().is_some_and(|s| {
                    s.observed_generation == t.metadata.generation
                        && s.cloud_ready.as_deref().is_some_and(|c| c.ends_with("/1"))
                        && s.edge_ready
                            .as_deref()
                            .is_some_and(|e| e.ends_with(&desired_edge))
                })
            })
            .count();
        let m = metric_lines(port);
        if applied == services && applied_at.is_none() {
            applied_at = Some(start.elapsed());
            applied_writes = by_kind(&m);
            // Also said now: a run stopped before every replica is ready still has it.
            eprintln!("every child applied; writes by kind: {applied_writes:?}");
        }
        eprintln!(
            "{:>5.0}s: {applied}/{services} applied, {done}/{services} ready; operator: {:.0} reconciles, {:.0} writes, {:.0} errors",
            start.elapsed().as_secs_f64(),
            sum(&m, "tidal_operator_reconciles_total{"),
            sum(&m, "tidal_operator_api_writes_total{"),
            sum(&m, "tidal_operator_reconcile_errors_total{"),
        );
        if done == services {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(1800) {
            panic!("did not converge in 30 minutes");
        }
    };
    // The steady state: heartbeats and periodic resyncs go on, nothing should be written
    // but the coarsened EdgeNode heartbeats.
    let before = metric_lines(port);
    tokio::time::sleep(Duration::from_secs(STEADY_SECONDS)).await;
    let text = metric_lines(port);
    let steady = |t: &str| {
        (
            sum(t, "tidal_operator_reconciles_total{"),
            sum(t, "tidal_operator_api_writes_total{"),
        )
    };
    let (r0, w0) = steady(&before);
    let (r1, w1) = steady(&text);
    let skipped = sum(&text, "tidal_operator_applies_skipped_total{");
    // Steady-state writes by controller and kind.
    let (k0, k1) = (by_kind(&before), by_kind(&text));
    let steady_kinds: Vec<String> = k1
        .iter()
        .map(|(k, v)| (k, v - k0.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .map(|(k, d)| format!("{k} {d:.0}"))
        .collect();
    let rss = peak_rss_mib(pid);
    let mut rows = BTreeMap::new();
    for c in ["inferenceservice", "edgenode"] {
        let reconciles = sum(
            &text,
            &format!("tidal_operator_reconciles_total{{controller=\"{c}\"}}"),
        );
        let writes = sum(
            &text,
            &format!("tidal_operator_api_writes_total{{controller=\"{c}\""),
        );
        rows.insert(
            c,
            (
                reconciles,
                writes,
                quantile(&text, c, 0.5),
                quantile(&text, c, 0.99),
            ),
        );
    }
    let _ = op.kill();
    let _ = op.wait();

    println!(
        "| edge nodes | services | children applied | every replica ready | operator peak RSS |"
    );
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| {edge_nodes} | {services} | {:.1} s | {:.1} s | {rss:.0} MiB |",
        applied_at.unwrap_or(converged).as_secs_f64(),
        converged.as_secs_f64()
    );
    println!();
    println!(
        "Steady state after convergence ({STEADY_SECONDS} s): {:.0} reconciles, {:.0} API writes; \
         server-side applies skipped because the cached child matched: {skipped:.0} in the whole run.",
        r1 - r0,
        w1 - w0
    );
    if !applied_writes.is_empty() {
        let kinds: Vec<String> = applied_writes
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect();
        println!();
        println!(
            "Writes until every child was applied ({:.0} in all): {}",
            applied_writes.values().sum::<f64>(),
            kinds.join(", ")
        );
    }
    if !steady_kinds.is_empty() {
        println!();
        println!("Steady-state writes by kind: {}", steady_kinds.join(", "));
    }
    println!();
    println!(
        "| controller | reconciles | API writes | writes/reconcile | p50 reconcile | p99 reconcile |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (c, (r, w, p50, p99)) in rows {
        println!(
            "| {c} | {r:.0} | {w:.0} | {:.2} | ≤ {:.0} ms | ≤ {:.0} ms |",
            w / r.max(1.0),
            p50 * 1e3,
            p99 * 1e3
        );
    }

    eprintln!("cleaning up");
    let _ = Api::<Namespace>::all(client.clone())
        .delete(NS, &DeleteParams::background())
        .await;
    let lp = ListParams::default().labels("tidal.rs/bench=true");
    let edge_nodes = Api::<EdgeNode>::all(client.clone());
    let _ = edge_nodes
        .delete_collection(&DeleteParams::background(), &lp)
        .await;
    // The operator is gone: release the node-label finalizers ourselves.
    if let Ok(list) = edge_nodes.list_metadata(&lp).await {
        let clear = serde_json::json!({"metadata": {"finalizers": null}});
        for en in list.items {
            let name = en.metadata.name.unwrap_or_default();
            let _ = edge_nodes
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&clear),
                )
                .await;
        }
    }
    let _ = Api::<Node>::all(client.clone())
        .delete_collection(&DeleteParams::background(), &lp)
        .await;
    drop(ctx); // deletes the namespace (again) and waits for that request
}
