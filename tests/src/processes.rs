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

/// Builds a workspace binary once per test binary with the cargo running the tests.
pub(crate) fn cargo_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The same profile as this binary: its directory is where the result is looked up.
    let mut args = vec!["build", "-p", package, "--bin", bin];
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
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building {bin} failed");
    let exe = std::env::current_exe().expect("own path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(bin)
}

/// The `tidal-worker` binary.
pub fn worker_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| cargo_binary("tidal-worker", "tidal-worker"))
        .clone()
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

/// Kills the child when dropped.
pub struct ProcessGuard {
    child: Option<Child>,
    pub port: u16,
}

impl ProcessGuard {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the process now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// reqwest is built without a bundled crypto provider: make ring the process's.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Sends `rps` completions per second to model `model`, spread over the worker base URLs in
/// `targets`, until `stop` or `max_requests` have been sent (bounded). Returns how many
/// answered 2xx.
pub fn completion_load(
    targets: Vec<String>,
    model: &str,
    rps: f64,
    max_requests: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let model = model.to_string();
    tokio::spawn(async move {
        let client = http_client();
        let ok = Arc::new(AtomicU64::new(0));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
        let mut inflight = Vec::new();
        for i in 0..max_requests {
            tick.tick().await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let url = format!("{}/v1/completions", targets[i as usize % targets.len()]);
            let req = client
                .post(url)
                .json(&serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 2}))
                .timeout(Duration::from_secs(30));
            let ok = ok.clone();
            inflight.push(tokio::spawn(async move {
                if let Ok(r) = req.send().await
                    && r.status().is_success()
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in inflight {
            let _ = t.await;
        }
        ok.load(Ordering::Relaxed)
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
        child: Some(child),
        port,
    };
    wait_http_ok("worker ready", format!("{}/ready", guard.base_url())).await;
    guard
}

/// A real Prometheus (Debian's `prometheus` binary) on 127.0.0.1 scraping static targets
/// every second. Restartable on the same port and storage, to test it going away.
pub struct Prometheus {
    pub port: u16,
    dir: tempfile::TempDir,
    process: Option<ProcessGuard>,
}

impl Prometheus {
    /// `jobs`: (targets as host:port, labels attached to every series of them).
    pub async fn start(jobs: &[(Vec<String>, serde_json::Value)]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("tidal-prometheus")
            .tempdir()
            .expect("temp dir");
        let static_configs: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(targets, labels)| serde_json::json!({"targets": targets, "labels": labels}))
            .collect();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "tidal-workers", "static_configs": static_configs}],
        });
        // JSON is YAML.
        std::fs::write(dir.path().join("prometheus.yml"), config.to_string()).unwrap();
        let mut p = Prometheus {
            port: free_port(),
            dir,
            process: None,
        };
        p.resume().await;
        p
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
            child: Some(child),
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
