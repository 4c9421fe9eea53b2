//! Soak (#17): steady load through the OpenAI API on a worker for a long time while the
//! operator reconciles a service that keeps changing; no request may fail, and both
//! processes' RSS is reported over time (growth from the first quarter to the last).
//!
//! Outside CI (30 minutes by default):
//! `TIDAL_SOAK_SECONDS=1800 cargo test -p tidal-e2e --test soak -- --ignored --nocapture`
//! (`deploy/local/tidal-local up` first, or let the harness start the control plane).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tidal_e2e::processes::{spawn_operator, start_worker, variable_load, write_fixture};
use tidal_e2e::{TestCtx, install_crds};
use tidal_operator::crd::InferenceService;

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// (first, last, max, growth of the last quarter's median over the first quarter's).
fn summary(samples: &[u64]) -> (u64, u64, u64, f64) {
    let q = (samples.len() / 4).max(1);
    let first = median(&samples[..q]);
    let last = median(&samples[samples.len() - q..]);
    (
        samples[0],
        *samples.last().unwrap(),
        *samples.iter().max().unwrap(),
        last as f64 / first as f64,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: TIDAL_SOAK_SECONDS=1800 cargo test -p tidal-e2e --test soak -- --ignored"]
async fn steady_load_fails_nothing_and_rss_is_reported() {
    let seconds: u64 = std::env::var("TIDAL_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1800);
    let Some(ctx) = TestCtx::new("soak").await else {
        return;
    };
    install_crds(&ctx).await;
    let model = tempfile::tempdir().unwrap();
    write_fixture(model.path(), "mixtral");
    let worker = start_worker(model.path(), "soak").await;
    let log = std::env::temp_dir().join(format!("{}.log", ctx.namespace));
    let (operator, _) = spawn_operator(
        &ctx.env,
        &[
            "--no-leader-election",
            "--identity",
            "soak",
            "--watch-namespace",
            &ctx.namespace,
        ],
        &log,
    );
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "soak"},
        "spec": {"model": {"uri": "/models/m", "architecture": "mixtral", "numExperts": 4},
                 "cloud": {"minReplicas": 1, "maxReplicas": 4, "replicas": 1}}
    }))
    .unwrap();
    let api = ctx.api::<InferenceService>();
    api.create(&PostParams::default(), &tis).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // 4 requests a second, as many as the run allows.
    let load = variable_load(
        vec![worker.base_url()],
        "soak",
        Arc::new(AtomicU64::new(4000)),
        seconds * 4 + 4,
        stop.clone(),
    );
    let (worker_pid, operator_pid) = (worker.pid().unwrap(), operator.0.id());
    let (mut worker_rss, mut operator_rss) = (vec![], vec![]);
    let start = Instant::now();
    let mut tick = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        tick += 1;
        worker_rss.push(rss_kib(worker_pid).expect("the worker is running"));
        operator_rss.push(rss_kib(operator_pid).expect("the operator is running"));
        // The operator keeps working: the service's replicas change every 30 s.
        if tick.is_multiple_of(6) {
            api.patch(
                "soak",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"cloud": {"replicas": 1 + (tick / 6) % 3}}})),
            )
            .await
            .unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = load.await.unwrap();
    let (w, o) = (summary(&worker_rss), summary(&operator_rss));
    eprintln!(
        "[soak] {seconds} s, {} requests, {} failed; worker RSS {} -> {} KiB (max {}, last/first \
         quarter {:.3}); operator RSS {} -> {} KiB (max {}, last/first quarter {:.3})",
        report.sent,
        report.failures.len(),
        w.0,
        w.1,
        w.2,
        w.3,
        o.0,
        o.1,
        o.2,
        o.3
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} failed: {:?}",
        report.failures.len(),
        report.sent,
        report.failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(report.ok > 0);
}
