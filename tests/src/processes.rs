//! Real processes the end-to-end tests start on loopback: `tidal-worker`s serving a tiny
//! random checkpoint and a Prometheus scraping them. Each is killed when its guard drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{eventually, repo_root};

/// A free TCP port on 127.0.0.1 (the OS picks it; it is free again when this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A workspace binary, made up to date once per test binary by the cargo running the tests.
///
/// Not `cargo build -p PACKAGE`: that resolves features without the dev-dependencies and
/// relinks the binary the workspace's test build already made (minutes per test binary, and
/// the next `cargo test` relinks it back). `cargo test --workspace --no-run` is exactly the
/// build `cargo test --workspace` (and `tidal-local test`) did: a no-op after it, and after
/// any narrower run it brings every workspace binary up to date (the packages' integration
/// tests make cargo link their binaries).
pub(crate) fn cargo_binary(bin: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The same profile as this binary: its directory is where the result is looked up.
    let mut args = vec!["test", "--workspace", "--no-run", "--quiet"];
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    let mut cmd = Command::new(cargo);
    cmd.args(&args).current_dir(repo_root());
    // Not the variables cargo set for this test run (package name, manifest, binaries): crates
    // that read them at compile time would otherwise be rebuilt for every test binary.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&&*k)
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("run cargo test --no-run");
    assert!(status.success(), "building {bin} failed");
    let exe = std::env::current_exe().expect("own path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(bin);
    assert!(
        path.is_file(),
        "{} is missing after `cargo test --workspace --no-run`",
        path.display()
    );
    path
}

/// The `tidal-worker` binary.
pub fn worker_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| cargo_binary("tidal-worker")).clone()
}

/// Writes a tiny random checkpoint (the worker's own fixture generator) into `dir`.
pub fn write_fixture(dir: &Path, arch: &str) {
    write_fixture_with(dir, arch, &[]);
}

/// [`write_fixture`] with more `gen-fixture` flags (e.g. `--hot-experts 0,2`).
pub fn write_fixture_with(dir: &Path, arch: &str, extra: &[&str]) {
    let out = Command::new(worker_binary())
        .args(["gen-fixture", "--arch", arch, "--out"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run tidal-worker gen-fixture");
    assert!(
        out.status.success(),
        "gen-fixture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sum of the series whose lines start with `prefix` (a metric name and a space, or a
/// name and `{`) and contain every one of `parts`, from `/metrics` on 127.0.0.1:`port`
/// (through curl); None when it does not answer.
pub fn metric_sum(port: u16, prefix: &str, parts: &[&str]) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// `tidal-operator run ARGS` against the test cluster, its metrics on a free port of
/// 127.0.0.1, its log in `log`; killed on drop.
pub fn spawn_operator(env: &crate::LocalEnv, args: &[&str], log: &Path) -> (Killed, u16) {
    let port = free_port();
    let child = env
        .command(crate::operator_binary().to_str().unwrap())
        .arg("run")
        .args(args)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("operator log file"))
        .spawn()
        .expect("start tidal-operator");
    (Killed(child), port)
}

/// One `tidal-operator run` replica under leader election, as a test runs two or more: named
/// `identity`, watching `ctx`'s namespace and holding its Lease there for `lease_seconds`, with
/// `extra` flags; its log goes to a temp file named after the namespace and identity.
pub fn spawn_elected_operator(
    ctx: &crate::TestCtx,
    identity: &str,
    lease_seconds: u64,
    extra: &[&str],
) -> (Killed, u16) {
    let log = std::env::temp_dir().join(format!("{}-{identity}.log", ctx.namespace));
    let lease = lease_seconds.to_string();
    let mut args = vec![
        "--identity",
        identity,
        "--watch-namespace",
        &ctx.namespace,
        "--lease-namespace",
        &ctx.namespace,
        "--lease-duration-seconds",
        &lease,
    ];
    args.extend_from_slice(extra);
    spawn_operator(&ctx.env, &args, &log)
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process serving on a port, killed when dropped (or earlier, by [`ProcessGuard::kill`]).
pub struct ProcessGuard {
    child: Option<Killed>,
    pub port: u16,
}

impl ProcessGuard {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|k| k.0.id())
    }

    /// Stops the process now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.child.take();
    }
}

/// A reqwest client builder; reqwest is built without a bundled crypto provider, so this
/// makes ring the process's first.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// An error with its sources ("error sending request: ...: Connection refused"): reqwest's own
/// message leaves out why a request could not be sent.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A default HTTP client (see [`http_client_builder`]).
pub fn http_client() -> reqwest::Client {
    http_client_builder().build().expect("http client")
}

/// What a load generator saw: requests sent, answered with 2xx, and why the others failed.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    /// One line per failed request (when it was sent, counted from the load's start; its
    /// status and body, or the client error), in order.
    pub failures: Vec<String>,
}

impl LoadReport {
    /// Fails the test with every failed request when any failed `during` (what was going on).
    pub fn assert_none_failed(&self, during: &str) {
        assert!(
            self.failures.is_empty(),
            "{} of {} requests failed {during}: {:?}",
            self.failures.len(),
            self.sent,
            self.failures
        );
    }
}

/// Sends `rps` completion requests per second, round-robin over `targets`, until `stop` is
/// set or `max_requests` were sent; returns how many succeeded.
pub fn completion_load(
    targets: Vec<String>,
    model: &str,
    rps: f64,
    max_requests: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let report = load_with_report(targets, model, rps, max_requests, stop);
    tokio::spawn(async move { report.await.map(|r| r.ok).unwrap_or(0) })
}

/// [`completion_load`] that reports every request's outcome.
pub fn load_with_report(
    targets: Vec<String>,
    model: &str,
    rps: f64,
    max_requests: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    let rate = std::sync::Arc::new(std::sync::atomic::AtomicU64::new((rps * 1000.0) as u64));
    variable_load(targets, model, rate, max_requests, stop)
}

/// [`load_with_report`] at a rate the caller may change while it runs (`rate`: requests per
/// second × 1000, read before each request).
pub fn variable_load(
    targets: Vec<String>,
    model: &str,
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
    max_requests: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    variable_load_with(http_client(), targets, model, rate, max_requests, stop)
}

/// [`variable_load`] through `client` (e.g. one that resolves Service DNS names).
pub fn variable_load_with(
    client: reqwest::Client,
    targets: Vec<String>,
    model: &str,
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
    max_requests: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    use std::sync::atomic::Ordering;
    let model = model.to_string();
    tokio::spawn(async move {
        let mut inflight = Vec::new();
        let mut sent = 0;
        let start = std::time::Instant::now();
        for i in 0..max_requests {
            let rps = rate.load(Ordering::Relaxed).max(1) as f64 / 1000.0;
            tokio::time::sleep(Duration::from_secs_f64(1.0 / rps)).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let url = format!("{}/v1/completions", targets[i as usize % targets.len()]);
            let req = client
                .post(url)
                .json(&serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 2}))
                .timeout(Duration::from_secs(30));
            sent += 1;
            let at = start.elapsed().as_secs_f64();
            inflight.push(tokio::spawn(async move {
                match req.send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        Err(format!("at {at:.1} s: {status}: {body}"))
                    }
                    Err(e) => Err(format!("at {at:.1} s: {e:?}")),
                }
            }));
        }
        let mut report = LoadReport {
            sent,
            ..Default::default()
        };
        for t in inflight {
            match t.await {
                Ok(Ok(())) => report.ok += 1,
                Ok(Err(why)) => report.failures.push(why),
                Err(e) => report.failures.push(format!("task: {e}")),
            }
        }
        report
    })
}

async fn wait_http_ok(what: &str, url: String) {
    let client = http_client();
    eventually(what, Duration::from_secs(60), || {
        let req = client.get(&url).timeout(Duration::from_secs(5));
        async move {
            let r = req.send().await.map_err(|e| e.to_string())?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(r.status().to_string())
            }
        }
    })
    .await;
}

/// A `tidal-worker serve` on 127.0.0.1, ready when this returns.
pub async fn start_worker(model: &Path, name: &str) -> ProcessGuard {
    let port = free_port();
    let child = Command::new(worker_binary())
        .args(["serve", "--model"])
        .arg(model)
        .args([
            "--served-model-name",
            name,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tidal-worker");
    let guard = ProcessGuard {
        child: Some(Killed(child)),
        port,
    };
    wait_http_ok("worker ready", format!("{}/ready", guard.base_url())).await;
    guard
}

/// Runs Debian's `promtool` with `args`; fails the test with its output unless it succeeds.
pub fn promtool(args: &[&std::ffi::OsStr]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian's prometheus package) is installed");
    assert!(
        out.status.success(),
        "promtool {}: {}{}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a test's Prometheus scrapes and evaluates: scrape configs as Prometheus' YAML has them
/// (JSON is YAML) and rule files.
#[derive(Debug, Clone, Default)]
pub struct PrometheusConfig {
    pub scrape_configs: serde_json::Value,
    pub rule_files: Vec<PathBuf>,
    /// OpenMetrics text whose samples are written into the TSDB before it starts
    /// (`promtool tsdb create-blocks-from openmetrics`): days of history without waiting.
    pub history: Option<String>,
}

/// A real Prometheus (Debian's `prometheus` binary, or `$TIDAL_PROMETHEUS`) on 127.0.0.1,
/// scraping and evaluating every second; its config passes `promtool check config` first.
/// Restartable on the same port and storage, to test it going away. The one launcher every
/// test uses.
pub struct Prometheus {
    pub port: u16,
    dir: tempfile::TempDir,
    process: Option<ProcessGuard>,
}

impl Prometheus {
    /// Static targets. `jobs`: (targets as host:port, labels attached to every series of them).
    pub async fn start(jobs: &[(Vec<String>, serde_json::Value)]) -> Prometheus {
        let static_configs: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(targets, labels)| serde_json::json!({"targets": targets, "labels": labels}))
            .collect();
        Prometheus::start_with(PrometheusConfig {
            scrape_configs: serde_json::json!([
                {"job_name": "tidal-workers", "static_configs": static_configs}
            ]),
            rule_files: vec![],
            history: None,
        })
        .await
    }

    /// Any scrape configs and rule files; ready when this returns.
    pub async fn start_with(config: PrometheusConfig) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("tidal-prometheus")
            .tempdir()
            .expect("temp dir");
        let yaml = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": config.rule_files,
            "scrape_configs": config.scrape_configs,
        });
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, yaml.to_string()).unwrap();
        promtool(&["check".as_ref(), "config".as_ref(), path.as_os_str()]);
        if let Some(om) = &config.history {
            let file = dir.path().join("history.om");
            std::fs::write(&file, om).unwrap();
            let data = dir.path().join("data");
            promtool(&[
                "tsdb".as_ref(),
                "create-blocks-from".as_ref(),
                "openmetrics".as_ref(),
                file.as_os_str(),
                data.as_os_str(),
            ]);
        }
        let mut p = Prometheus {
            port: free_port(),
            dir,
            process: None,
        };
        p.resume().await;
        p
    }

    /// What it logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it (its data stays for a restart).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it (again), ready when this returns.
    pub async fn resume(&mut self) {
        let binary = std::env::var("TIDAL_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let log = std::fs::File::create(self.dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus (apt-get install prometheus)");
        self.process = Some(ProcessGuard {
            child: Some(Killed(child)),
            port: self.port,
        });
        wait_http_ok("prometheus ready", format!("{}/-/ready", self.url())).await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
