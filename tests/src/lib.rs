//! Harness for Tidal's end-to-end tests: a real local control plane (deploy/local), one
//! namespace per test, and an `eventually` helper for the asynchronous parts of Kubernetes.
//!
//! The control plane is started at most once per test run: `tidal-local test` brings it up
//! before `cargo test`; a bare `cargo test` brings it up here (and leaves it running, so the
//! next run attaches). When it cannot start, tests fail if `CI` is set and skip otherwise.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub mod processes;
pub mod real;
pub mod replay;

/// Repository root (the workspace), from this crate's manifest dir.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `tidal-local` script that manages the control plane.
pub fn tidal_local() -> PathBuf {
    repo_root().join("deploy/local/tidal-local")
}

/// Output of `tidal-local env`: KUBECONFIG and the PATH holding kubectl, helm, kwok, etcd.
#[derive(Debug, Clone)]
pub struct LocalEnv {
    pub kubeconfig: PathBuf,
    pub path: String,
}

impl LocalEnv {
    /// A `Command` for one of the control plane's tools (kubectl, helm...) wired to this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", &self.path);
        cmd
    }

    /// Runs a tool and returns its stdout; panics with its stderr when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }
}

fn parse_env(text: &str) -> Option<LocalEnv> {
    let mut kubeconfig = None;
    let mut path = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(PathBuf::from(v));
        } else if let Some(v) = line.strip_prefix("export PATH=") {
            let inherited = std::env::var("PATH").unwrap_or_default();
            path = Some(v.replace("$PATH", &inherited));
        }
    }
    Some(LocalEnv {
        kubeconfig: kubeconfig?,
        path: path?,
    })
}

/// Why the control plane is not available (the text tests print or fail with).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

static CONTROL_PLANE: OnceLock<Result<LocalEnv, Unavailable>> = OnceLock::new();

fn bring_up() -> Result<LocalEnv, Unavailable> {
    let script = tidal_local();
    let env_out = Command::new(&script)
        .arg("env")
        .output()
        .map_err(|e| Unavailable(format!("cannot run {}: {e}", script.display())))?;
    let env = parse_env(&String::from_utf8_lossy(&env_out.stdout))
        .ok_or_else(|| Unavailable("`tidal-local env` printed no KUBECONFIG/PATH".into()))?;
    // `up` is idempotent and fast when everything already runs; flock keeps parallel test
    // binaries from starting two control planes at once.
    let lock = std::env::temp_dir().join("tidal-local-up.lock");
    // `--close`: the daemons `up` starts must not inherit the lock, or the next `up` would
    // wait for as long as the control plane runs.
    let out = Command::new("flock")
        .arg("--close")
        .arg(&lock)
        .arg(&script)
        .arg("up")
        .output()
        .map_err(|e| Unavailable(format!("cannot run flock/tidal-local: {e}")))?;
    if !out.status.success() {
        return Err(Unavailable(format!(
            "`tidal-local up` failed ({}); run `deploy/local/tidal-local setup` first?\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(env)
}

/// Set to skip (not pass) the tests that need the local control plane when it cannot start.
pub const SKIP_VAR: &str = "TIDAL_SKIP_CLUSTER_TESTS";

/// The local control plane, started if needed. A test that cannot have it fails, so it never
/// passes silently; `None` ("skip this test", said on stderr) only when [`SKIP_VAR`] is `1`,
/// and never in CI.
pub fn control_plane() -> Option<LocalEnv> {
    match CONTROL_PLANE.get_or_init(bring_up) {
        Ok(env) => Some(env.clone()),
        Err(Unavailable(why)) => {
            if std::env::var_os("CI").is_some() {
                panic!("the local control plane is required in CI but unavailable: {why}");
            }
            if std::env::var(SKIP_VAR).as_deref() != Ok("1") {
                panic!(
                    "the local control plane is unavailable: {why}\nrun the tests with \
                     `deploy/local/tidal-local test`, or set {SKIP_VAR}=1 to skip the tests \
                     that need it"
                );
            }
            eprintln!("SKIPPED ({SKIP_VAR}=1): local control plane unavailable: {why}");
            None
        }
    }
}

/// The local tools' environment (`tidal-local env`) without starting the control plane, when
/// `tool` has been built (`tidal-local setup`). Like [`control_plane`], a test that cannot have
/// it fails, and skips only with [`SKIP_VAR`] set to `1`, never in CI.
pub fn local_tools(tool: &str) -> Option<LocalEnv> {
    let script = tidal_local();
    let found = Command::new(&script)
        .arg("env")
        .output()
        .ok()
        .and_then(|out| parse_env(&String::from_utf8_lossy(&out.stdout)))
        .filter(|env| {
            env.path
                .split(':')
                .any(|dir| Path::new(dir).join(tool).is_file())
        });
    if found.is_some() {
        return found;
    }
    let why = format!("{tool} is not built: run `deploy/local/tidal-local setup`");
    if std::env::var_os("CI").is_some() {
        panic!("{why} (required in CI)");
    }
    if std::env::var(SKIP_VAR).as_deref() != Ok("1") {
        panic!("{why}, or set {SKIP_VAR}=1 to skip the tests that need it");
    }
    eprintln!("SKIPPED ({SKIP_VAR}=1): {why}");
    None
}

/// A kube client for the local control plane's admin user.
pub async fn client(env: &LocalEnv) -> Client {
    let kubeconfig = Kubeconfig::read_from(&env.kubeconfig).expect("readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig");
    Client::try_from(config).expect("kube client")
}

/// Everything a test needs: the cluster, a client, and a namespace of its own.
pub struct TestCtx {
    pub env: LocalEnv,
    pub client: Client,
    pub namespace: String,
}

impl TestCtx {
    /// Sets up a test: `None` when the control plane is unavailable outside CI (skip).
    pub async fn new(test_name: &str) -> Option<TestCtx> {
        let env = control_plane()?;
        let client = client(&env).await;
        let namespace = format!(
            "e2e-{}-{:06x}",
            test_name.replace('_', "-"),
            rand::random::<u32>() & 0xff_ffff
        );
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.clone()),
                labels: Some([("tidal.rs/e2e".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        Some(TestCtx {
            env,
            client,
            namespace,
        })
    }

    /// A namespaced API in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

impl Drop for TestCtx {
    // Deletes the namespace even when the test panicked. Drop cannot await and the test's
    // runtime may be shutting down, so this uses a short-lived runtime on its own thread.
    fn drop(&mut self) {
        let env = self.env.clone();
        let ns = self.namespace.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = client(&env).await;
                let _ = Api::<Namespace>::all(client)
                    .delete(&ns, &DeleteParams::background())
                    .await;
            });
        })
        .join();
    }
}

/// Retries `check` every 250 ms until it returns `Ok`, or panics after `timeout` with the
/// last error. This is a deadline for asynchronous convergence, not a performance assertion.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The reasons of the Events about EdgeNode `name`, one per occurrence (a repeated Event is
/// one object whose `series.count` grows).
pub async fn edge_event_reasons(client: &Client, name: &str) -> Result<Vec<String>, String> {
    Ok(edge_events(client, name)
        .await?
        .into_iter()
        .flat_map(|e| {
            let times = e.series.as_ref().map_or(1, |s| s.count.max(1)) as usize;
            std::iter::repeat_n(e.reason.unwrap_or_default(), times)
        })
        .collect())
}

/// EdgeNode `name`'s Events (cluster-scoped objects' Events go to `default`).
async fn edge_events(
    client: &Client,
    name: &str,
) -> Result<Vec<k8s_openapi::api::events::v1::Event>, String> {
    use k8s_openapi::api::events::v1::Event;
    Ok(Api::<Event>::namespaced(client.clone(), "default")
        .list(&kube::api::ListParams::default())
        .await
        .map_err(|e| e.to_string())?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect())
}

/// One line per Event of EdgeNode `name`, for a failure message: when, how often, who reported
/// it and what it said (a flap is then told from a second reporter or a late heartbeat).
async fn edge_events_told(client: &Client, name: &str) -> String {
    match edge_events(client, name).await {
        Ok(mut events) => {
            events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
            events
                .iter()
                .map(|e| {
                    format!(
                        "\n  {:?} {} x{} (last {:?}) by {}: {}",
                        e.event_time.as_ref().map(|t| t.0.to_string()),
                        e.reason.as_deref().unwrap_or_default(),
                        e.series.as_ref().map_or(1, |s| s.count),
                        e.series
                            .as_ref()
                            .map(|s| s.last_observed_time.0.to_string()),
                        e.reporting_instance.as_deref().unwrap_or_default(),
                        e.note.as_deref().unwrap_or_default()
                    )
                })
                .collect()
        }
        Err(e) => format!(" (listing the Events failed: {e})"),
    }
}

/// After `cuts` cuts and restores of EdgeNode `name`, waits for its phase Events and checks
/// that nothing flapped: exactly `cuts` times Offline, `cuts` times Ready again, Degraded on
/// the way down; a Ready beyond the restores can only be a recovery from Degraded (a renewal
/// late under load, which the policy announces as such); no other Event. Returns the number
/// of (Ready, Degraded) Events.
pub async fn assert_phase_changed_once_each_way(
    client: &Client,
    name: &str,
    cuts: usize,
) -> (usize, usize) {
    let reasons = eventually("the phase Events", CONVERGE, || async {
        let r = edge_event_reasons(client, name).await?;
        let n = |what: &str| r.iter().filter(|x| x.as_str() == what).count();
        if n("Offline") == cuts && n("Ready") >= cuts {
            Ok(r)
        } else {
            let told = edge_events_told(client, name).await;
            Err(format!("event reasons {r:?}; the Events:{told}"))
        }
    })
    .await;
    let n = |what: &str| reasons.iter().filter(|x| x.as_str() == what).count();
    let (degraded, ready) = (n("Degraded"), n("Ready"));
    if ready - cuts > degraded || reasons.len() != cuts + ready + degraded {
        let told = edge_events_told(client, name).await;
        panic!(
            "a Ready without a phase change before it, or an Event that is not a phase \
             change: {reasons:?}; the Events:{told}"
        );
    }
    (ready, degraded)
}

/// Installs (server-side applies) Tidal's CRDs and waits until the API server serves them.
pub async fn install_crds(ctx: &TestCtx) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let api = Api::<CustomResourceDefinition>::all(ctx.client.clone());
    for crd in tidal_operator::crd::all_crds() {
        let name = crd.metadata.name.clone().expect("named");
        api.patch(
            &name,
            &PatchParams::apply("tidal-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        eventually(&format!("CRD {name} established"), CONVERGE, || async {
            let c = api.get(&name).await.map_err(|e| e.to_string())?;
            let ok = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if ok {
                Ok(())
            } else {
                Err("not established".to_string())
            }
        })
        .await;
    }
}

/// An operator running in the test process, watching the test's namespace only.
pub struct RunningOperator {
    pub metrics: std::sync::Arc<tidal_operator::metrics::Metrics>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningOperator {
    /// Starts the InferenceService controller for `ctx.namespace`.
    pub fn start(ctx: &TestCtx) -> RunningOperator {
        Self::start_with(ctx, None)
    }

    /// Starts the InferenceService controller and, with `autoscale`, the autoscaler loop.
    pub fn start_with(
        ctx: &TestCtx,
        autoscale: Option<tidal_operator::controller::autoscale::Settings>,
    ) -> RunningOperator {
        use tidal_operator::controller::{Context, autoscale as loop_, inference_service};
        let metrics = tidal_operator::metrics::Metrics::shared();
        let mut c = Context::new(
            ctx.client.clone(),
            tidal_operator::children::BuildConfig::default(),
            metrics.clone(),
            Some(format!("e2e-{}", ctx.namespace)),
        );
        {
            let m = std::sync::Arc::get_mut(&mut c).expect("fresh");
            m.namespace = Some(ctx.namespace.clone());
            if let Some(a) = &autoscale {
                m.autoscale = a.clone();
            }
        }
        let (stop, rx) = tokio::sync::watch::channel(false);
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // The watches the controllers share, as `tidal-operator run` sets them up.
        let mut shared = tidal_operator::controller::caches::Shared::new(&c);
        let inputs = inference_service::inputs(&mut shared);
        let loop_inputs = loop_::inputs(&shared);
        let watches = shared.start();
        let controller = inference_service::run(c.clone(), inputs, until(rx.clone()));
        let task = tokio::spawn(async move {
            match autoscale {
                Some(_) => {
                    tokio::join!(controller, loop_::run(c, loop_inputs, until(rx)));
                }
                None => controller.await,
            }
            drop(watches);
        });
        RunningOperator {
            metrics,
            stop,
            task,
        }
    }

    /// Starts the controller and the autoscaler loop with settings fit for tests: rates over
    /// 10 s (Prometheus scrapes every second) and a 5 s ready time until pods are seen.
    pub fn start_autoscaling(ctx: &TestCtx) -> RunningOperator {
        Self::start_with(
            ctx,
            Some(tidal_operator::controller::autoscale::Settings {
                enabled: true,
                prometheus_url: None,
                rate_window: "10s".into(),
                default_ready_time_s: 5.0,
                // Pods here run on fake nodes: nothing answers at their IPs.
                fast_path: None,
            }),
        )
    }

    /// How many reconciliations it has run.
    pub fn reconciles(&self) -> u64 {
        let text = self.metrics.render();
        text.lines()
            .filter(|l| {
                l.starts_with("tidal_operator_reconciles_total{controller=\"inferenceservice\"}")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Stops it and waits until it has finished.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The EdgeNode controller (cluster-wide) running in the test process.
pub struct EdgeNodeController {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EdgeNodeController {
    pub fn start(ctx: &TestCtx) -> EdgeNodeController {
        use tidal_operator::controller::Context;
        let c = Context::new(
            ctx.client.clone(),
            tidal_operator::children::BuildConfig::default(),
            tidal_operator::metrics::Metrics::shared(),
            Some(format!("e2e-{}", ctx.namespace)),
        );
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(Self::run(c, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        EdgeNodeController { stop, task }
    }

    /// Runs the EdgeNode controller on its shared watches, as `tidal-operator run` sets them
    /// up, until `shutdown` resolves.
    pub async fn run(
        c: std::sync::Arc<tidal_operator::controller::Context>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        use tidal_operator::controller::edge_node;
        let mut shared = tidal_operator::controller::caches::Shared::new(&c);
        let inputs = edge_node::inputs(&mut shared);
        let watches = shared.start();
        edge_node::run(c, inputs, shutdown).await;
        drop(watches);
    }

    /// Stops it and waits until it has finished.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The `tidal-operator` binary, built (once per test binary) with the cargo running the tests.
pub fn operator_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| processes::cargo_binary("tidal-operator"))
        .clone()
}

/// The default deadline for control-plane convergence in tests.
pub const CONVERGE: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tidal_local_env_output() {
        let env = parse_env("export KUBECONFIG=/x/kubeconfig\nexport PATH=/a:/b:$PATH\n")
            .expect("parsed");
        assert_eq!(env.kubeconfig, PathBuf::from("/x/kubeconfig"));
        assert!(env.path.starts_with("/a:/b:"));
        assert!(!env.path.contains("$PATH"));
        assert!(parse_env("nothing here").is_none());
    }

    #[tokio::test]
    async fn eventually_returns_first_success() {
        let mut n = 0;
        let v = eventually("n reaches 3", Duration::from_secs(10), || {
            n += 1;
            let cur = n;
            async move {
                if cur >= 3 {
                    Ok(cur)
                } else {
                    Err(format!("n={cur}"))
                }
            }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out")]
    async fn eventually_panics_with_last_error() {
        eventually::<(), _, _>("never", Duration::from_millis(300), || async {
            Err("still no".to_string())
        })
        .await;
    }
}

/// Fake Nodes that kwok runs, and cutting them off from the control plane.
///
/// kwok only renews a Node Lease it holds (or one that expired), so taking the Lease over
/// stops the heartbeat; handing it back with a fresh renewal resumes it.
pub mod kwok {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;
    use kube::Api;
    use kube::api::{Patch, PatchParams, PostParams};
    use serde_json::json;

    use super::{CONVERGE, TestCtx, eventually};

    const PARTITION_HOLDER: &str = "tidal-e2e-partition";

    /// Edge sites: for each (node, site) a kwok Node labelled `tidal.rs/tier=edge` and an
    /// EdgeNode of the same name in `pool` (label `pool`), offline after 36 s without a
    /// heartbeat. The guards delete both (EdgeNodes are cluster-scoped: they outlive the test's
    /// namespace).
    pub async fn edge_sites(
        ctx: &TestCtx,
        pool: &str,
        sites: &[(&str, &str)],
    ) -> Vec<ClusterGuard> {
        use tidal_operator::crd::EdgeNode;
        let mut guards = Vec::new();
        for (node, site) in sites {
            guards.push(create_node(ctx, node, json!({"tidal.rs/tier": "edge"})).await);
            let en: EdgeNode = serde_json::from_value(json!({
                "apiVersion": "tidal.rs/v1alpha1", "kind": "EdgeNode",
                "metadata": {"name": node, "labels": {"pool": pool}},
                "spec": {"nodeName": node, "site": site,
                         "offlinePolicy": {"heartbeatTimeoutSeconds": 36}}
            }))
            .expect("valid EdgeNode");
            Api::<EdgeNode>::all(ctx.client.clone())
                .create(&PostParams::default(), &en)
                .await
                .expect("create EdgeNode");
            guards.push(ClusterGuard::new(ctx, "edgenode", node));
        }
        guards
    }

    /// A fake Node kwok manages, with the given labels (deleted when the guard drops).
    pub async fn create_node(ctx: &TestCtx, name: &str, labels: serde_json::Value) -> ClusterGuard {
        let mut all = json!({"tidal.rs/e2e": "true", "kubernetes.io/hostname": name});
        for (k, v) in labels.as_object().into_iter().flatten() {
            all[k] = v.clone();
        }
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"}, "labels": all},
            "status": {"allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110", "nvidia.com/gpu": "1"},
                       "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110", "nvidia.com/gpu": "1"}}
        }))
        .expect("valid node");
        Api::<Node>::all(ctx.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        ClusterGuard::new(ctx, "node", name)
    }

    /// Deletes a cluster-scoped object when dropped, also when the test panicked (they
    /// outlive test namespaces).
    pub struct ClusterGuard {
        env: super::LocalEnv,
        kind: &'static str,
        pub name: String,
    }

    impl ClusterGuard {
        pub fn new(ctx: &TestCtx, kind: &'static str, name: &str) -> Self {
            ClusterGuard {
                env: ctx.env.clone(),
                kind,
                name: name.into(),
            }
        }
    }

    impl Drop for ClusterGuard {
        fn drop(&mut self) {
            let args = [
                "delete",
                self.kind,
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ];
            let _ = self.env.command("kubectl").args(args).output();
            if self.kind == "edgenode" {
                // No operator may be left to run the node-label finalizer.
                let patch = [
                    "patch",
                    "edgenode",
                    &self.name,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ];
                let _ = self.env.command("kubectl").args(patch).output();
            }
        }
    }

    fn leases(ctx: &TestCtx) -> Api<Lease> {
        Api::namespaced(ctx.client.clone(), "kube-node-lease")
    }

    /// Stops the Node's heartbeat; returns kwok's holder identity for [`reconnect`].
    pub async fn partition(ctx: &TestCtx, node: &str) -> String {
        let leases = leases(ctx);
        let holder = eventually("kwok holds the Node's Lease", CONVERGE, || async {
            let l = leases.get(node).await.map_err(|e| e.to_string())?;
            l.spec
                .and_then(|s| s.holder_identity)
                .ok_or_else(|| "no holder".to_string())
        })
        .await;
        let take =
            json!({"spec": {"holderIdentity": PARTITION_HOLDER, "leaseDurationSeconds": 3600}});
        leases
            .patch(node, &PatchParams::default(), &Patch::Merge(take))
            .await
            .expect("take the Lease");
        holder
    }

    /// Resumes the heartbeat by handing the Lease back to kwok with a fresh renewal.
    pub async fn reconnect(ctx: &TestCtx, node: &str, kwok_holder: &str) {
        let give = json!({"spec": {"holderIdentity": kwok_holder, "leaseDurationSeconds": 40,
                                   "renewTime": MicroTime(Timestamp::now())}});
        leases(ctx)
            .patch(node, &PatchParams::default(), &Patch::Merge(give))
            .await
            .expect("hand back the Lease");
    }
}
