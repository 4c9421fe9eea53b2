//! The control plane fails under a running operator (#17): kube-apiserver restarted with etcd
//! kept, then etcd restarted. The operator runs as a pod would (restarted when it exits, as
//! it does on losing its Lease); after each fault it holds the Lease again, sees a change
//! made right after the restart (no write lost), and applies only that change (no write
//! duplicated: unchanged children are not re-applied from a re-listed cache).
//!
//! Its own test binary: restarting the API server would fail the tests running beside it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tidal_e2e::processes::{free_port, metric_sum};
use tidal_e2e::{CONVERGE, TestCtx, eventually, install_crds, tidal_local};
use tidal_operator::crd::InferenceService;

/// `tidal-operator run` restarted whenever it exits, like a pod's container; its starts are
/// counted in a file. Killed with its process group on drop.
struct Supervised {
    child: Child,
    port: u16,
    starts: PathBuf,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

impl Supervised {
    fn start(ctx: &TestCtx) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir();
        let starts = dir.join(format!("{}-starts", ctx.namespace));
        let log = dir.join(format!("{}-operator.log", ctx.namespace));
        let _ = std::fs::remove_file(&starts);
        let operator = tidal_e2e::operator_binary();
        let script = format!(
            "while true; do echo start >> '{starts}'; '{bin}' run --identity op \
             --metrics-addr 127.0.0.1:{port} --watch-namespace {ns} --lease-namespace {ns} \
             >> '{log}' 2>&1; sleep 1; done",
            starts = starts.display(),
            bin = operator.display(),
            ns = ctx.namespace,
            log = log.display(),
        );
        let child = std::os::unix::process::CommandExt::process_group(
            ctx.env
                .command("bash")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            0,
        )
        .spawn()
        .expect("start the supervised operator");
        Self {
            child,
            port,
            starts,
        }
    }

    fn starts(&self) -> usize {
        std::fs::read_to_string(&self.starts)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The sum of a metric's series whose line contains every one of `parts`.
    fn metric(&self, name: &str, parts: &[&str]) -> Option<f64> {
        metric_sum(self.port, name, parts)
    }

    /// Server-side applies of children by the current process.
    fn applies(&self) -> Option<f64> {
        self.metric("tidal_operator_api_writes_total{", &["kind=\"apply\""])
    }
}

fn restart(ctx: &TestCtx, component: &str) {
    let out = ctx
        .env
        .command(tidal_local().to_str().unwrap())
        .args(["restart", component])
        .output()
        .expect("run tidal-local restart");
    assert!(
        out.status.success(),
        "tidal-local restart {component}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn replicas_are(ctx: &TestCtx, name: &str, want: i32) {
    let deps = ctx.api::<Deployment>();
    eventually(&format!("{name} at {want} replicas"), CONVERGE, || async {
        let d = deps.get(name).await.map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(r) if r == want => Ok(()),
            r => Err(format!("replicas {r:?}")),
        }
    })
    .await;
}

/// Waits until the operator leads and its apply count stops moving; returns it.
async fn settled(ctx: &TestCtx, op: &Supervised) -> f64 {
    let leases = ctx.api::<Lease>();
    eventually("the operator holds its Lease", CONVERGE, || async {
        let l = leases
            .get("tidal-operator")
            .await
            .map_err(|e| e.to_string())?;
        match (
            l.spec.and_then(|s| s.holder_identity).as_deref(),
            op.metric("tidal_operator_leader ", &[]),
        ) {
            (Some("op"), Some(1.0)) => Ok(()),
            other => Err(format!("holder and leader gauge: {other:?}")),
        }
    })
    .await;
    let mut last = None;
    eventually("the operator's applies settled", CONVERGE, || {
        let now = op.applies();
        let prev = last.replace(now);
        async move {
            match (prev, now) {
                (Some(Some(a)), Some(b)) if a == b => Ok(b),
                other => Err(format!("applies {other:?}")),
            }
        }
    })
    .await
}

#[tokio::test]
async fn apiserver_and_etcd_restarts_lose_and_duplicate_no_write() {
    let Some(ctx) = TestCtx::new("cp-faults").await else {
        return;
    };
    install_crds(&ctx).await;
    let op = Supervised::start(&ctx);
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "cpf"},
        "spec": {"model": {"uri": "/models/m", "architecture": "llama"},
                 "cloud": {"minReplicas": 1, "maxReplicas": 8, "replicas": 2}}
    }))
    .unwrap();
    let api = ctx.api::<InferenceService>();
    api.create(&PostParams::default(), &tis).await.unwrap();
    replicas_are(&ctx, "cpf-cloud", 2).await;

    let mut figures = vec![];
    for (component, replicas) in [("kube-apiserver", 3), ("etcd", 4)] {
        let t0 = std::time::Instant::now();
        let before = settled(&ctx, &op).await;
        eprintln!(
            "[control-plane-faults] settled in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let starts_before = op.starts();
        let t0 = std::time::Instant::now();
        restart(&ctx, component);
        let restarted_in = t0.elapsed().as_secs_f64();
        // The change comes right after the restart, while the operator's watches resume.
        api.patch(
            "cpf",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cloud": {"replicas": replicas}}})),
        )
        .await
        .unwrap();
        replicas_are(&ctx, "cpf-cloud", replicas).await;
        let applied_in = t0.elapsed().as_secs_f64() - restarted_in;
        let after = settled(&ctx, &op).await;
        let restarted = op.starts() - starts_before;
        // The counter starts again with a new process: then every apply it made counts.
        let applied = if restarted == 0 {
            after - before
        } else {
            after
        };
        figures.push(format!(
            "{component}: back in {restarted_in:.0} s, the change applied {applied_in:.0} s \
             later, operator restarted {restarted}x, {applied} applies for one changed child"
        ));
        assert_eq!(
            applied, 1.0,
            "{component} restart: exactly the changed Deployment is applied (operator \
             restarted {restarted} times)"
        );
    }
    eprintln!("[control-plane-faults] {}", figures.join("; "));
}
