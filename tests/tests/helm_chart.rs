//! The Helm chart (`charts/tidal`) and its monitoring assets: it lints, renders what is
//! committed, ships the generated CRDs, rejects bad values, installs and uninstalls on the real
//! control plane, and its RBAC is enough for the real operator. Every PromQL expression in the
//! rules and dashboards runs against a real Prometheus that scrapes through the chart's scrape
//! config.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tidal_e2e::{CONVERGE, LocalEnv, TestCtx, control_plane, eventually, install_crds, repo_root};

const RELEASE: &str = "tidal";

fn chart() -> PathBuf {
    repo_root().join("charts/tidal")
}

fn chart_arg() -> String {
    chart().to_str().expect("utf-8 path").to_string()
}

/// The renders `deploy/regen` writes to `charts/tidal/tests/snapshots/` (keep in sync).
fn snapshot_renders() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("default.yaml", vec![]),
        (
            "monitoring.yaml",
            vec![
                "--api-versions",
                "monitoring.coreos.com/v1",
                "--set",
                "serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboards.enabled=true",
            ],
        ),
    ]
}

fn output(env: &LocalEnv, program: &str, args: &[&str]) -> Output {
    env.command(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn helm_template(env: &LocalEnv, extra: &[&str]) -> String {
    let chart = chart_arg();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", "tidal-system"];
    args.extend_from_slice(extra);
    env.run("helm", &args)
}

/// YAML documents of a render, as JSON values (empty documents dropped).
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tidal-helm-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// (a) lint, (b) snapshots, (c) CRD copies, (e) schema

#[tokio::test]
async fn chart_lints_strictly() {
    let Some(env) = control_plane() else { return };
    let chart = chart_arg();
    // `helm lint` cannot fake API versions, so the monitoring objects that need
    // monitoring.coreos.com/v1 are checked by the snapshot test; the rest is linted here.
    let everything = "serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboards.enabled=true,\
                      prometheusUrl=http://prometheus:9090,watchNamespace=team-a";
    for extra in [vec![], vec!["--set", everything]] {
        let mut args = vec!["lint", "--strict", &chart];
        args.extend_from_slice(&extra);
        let out = output(&env, "helm", &args);
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn rendered_templates_match_the_committed_snapshots() {
    let Some(env) = control_plane() else { return };
    let dir = chart().join("tests/snapshots");
    for (file, extra) in snapshot_renders() {
        let rendered = helm_template(&env, &extra);
        assert_eq!(
            rendered,
            helm_template(&env, &extra),
            "rendering {file} twice gives different output: the chart must be deterministic"
        );
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if rendered != committed {
            let first = rendered
                .lines()
                .zip(committed.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| rendered.lines().count().min(committed.lines().count()));
            panic!(
                "charts/tidal/tests/snapshots/{file} is stale (first difference at line {}: \
                 rendered {:?}, committed {:?}); run deploy/regen and commit the result",
                first + 1,
                rendered.lines().nth(first),
                committed.lines().nth(first)
            );
        }
    }

    // What the snapshots hold: the operator with its RBAC, monitoring only when asked for.
    let default = documents(&helm_template(&env, &[]));
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert_eq!(find(&default, kind).len(), 1, "one {kind} by default");
    }
    assert!(find(&default, "ServiceMonitor").is_empty());
    assert!(find(&default, "PrometheusRule").is_empty());
    // Enabled but the API is not served: still nothing.
    let no_api = documents(&helm_template(
        &env,
        &[
            "--set",
            "serviceMonitor.enabled=true,prometheusRule.enabled=true",
        ],
    ));
    assert!(
        find(&no_api, "ServiceMonitor").is_empty() && find(&no_api, "PrometheusRule").is_empty()
    );
    let monitoring = documents(&helm_template(&env, &snapshot_renders()[1].1));
    assert_eq!(find(&monitoring, "ServiceMonitor").len(), 1);
    let rule = find(&monitoring, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    let rules_file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart().join("files/rules/tidal.rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        rule[0]["spec"], rules_file,
        "the PrometheusRule carries files/rules/tidal.rules.yaml unchanged"
    );
    let dashboards: Vec<_> = find(&monitoring, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(
        dashboards.len(),
        1,
        "one dashboard ConfigMap for the Grafana sidecar"
    );
    let json_text = dashboards[0]["data"]["tidal-overview.json"]
        .as_str()
        .expect("tidal-overview.json key");
    let from_file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("files/dashboards/tidal-overview.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(serde_json::from_str::<Value>(json_text).unwrap(), from_file);

    // Deployment wiring: every operator flag through TIDAL_* env vars.
    let deploy = find(&default, "Deployment")[0];
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    let env_vars: BTreeMap<String, Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    assert_eq!(env_vars["TIDAL_LEASE_NAMESPACE"]["value"], "tidal-system");
    assert_eq!(env_vars["TIDAL_IDENTITY"]["value"], "$(POD_NAME)");
    assert_eq!(
        env_vars["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(env_vars["TIDAL_METRICS_ADDR"]["value"], "0.0.0.0:8080");
    assert!(
        !env_vars.contains_key("TIDAL_PROMETHEUS_URL"),
        "unset by default"
    );
    let with_url = documents(&helm_template(
        &env,
        &[
            "--set",
            "prometheusUrl=http://prom.monitoring:9090,watchNamespace=team-a,logJson=false",
        ],
    ));
    let env_text = serde_json::to_string(
        &find(&with_url, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"],
    )
    .unwrap();
    for expected in [
        r#"{"name":"TIDAL_PROMETHEUS_URL","value":"http://prom.monitoring:9090"}"#,
        r#"{"name":"TIDAL_WATCH_NAMESPACE","value":"team-a"}"#,
        r#"{"name":"TIDAL_LOG_JSON","value":"false"}"#,
    ] {
        assert!(env_text.contains(expected), "{expected} in {env_text}");
    }
}

#[tokio::test]
async fn chart_crds_and_monitoring_copies_equal_their_sources() {
    let root = repo_root();
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect()
    };
    let generated = names(&root.join("crds"));
    assert!(!generated.is_empty());
    assert_eq!(
        names(&chart().join("crds")),
        generated,
        "charts/tidal/crds/ holds the same files as crds/; run deploy/regen"
    );
    for name in &generated {
        let a = std::fs::read(root.join("crds").join(name)).unwrap();
        let b = std::fs::read(chart().join("crds").join(name)).unwrap();
        assert!(
            a == b,
            "charts/tidal/crds/{name} differs from crds/{name}; run deploy/regen"
        );
    }
    for (copy, source) in [
        (
            "deploy/monitoring/tidal.rules.yaml",
            "files/rules/tidal.rules.yaml",
        ),
        (
            "deploy/monitoring/prometheus-scrape-configs.yaml",
            "files/prometheus/scrape-configs.yaml",
        ),
        (
            "deploy/monitoring/dashboards/tidal-overview.json",
            "files/dashboards/tidal-overview.json",
        ),
    ] {
        let a = std::fs::read(root.join(copy)).unwrap_or_default();
        let b = std::fs::read(chart().join(source)).unwrap();
        assert!(
            a == b,
            "{copy} differs from charts/tidal/{source}; run deploy/regen"
        );
    }
}

#[tokio::test]
async fn bad_values_are_rejected_with_the_field_named() {
    let Some(env) = control_plane() else { return };
    let chart = chart_arg();
    let cases: [(&[&str], &[&str]); 6] = [
        (&["--set", "replicas=-1"], &["/replicas", "minimum"]),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            &["/image/pullPolicy"],
        ),
        (&["--set", "replica=2"], &["replica"]),
        (&["--set", "prometheusUrl=ftp://x"], &["/prometheusUrl"]),
        (&["--set", "metrics.port=70000"], &["/metrics/port"]),
        (
            &["--set", "replicas=3,leaderElection.enabled=false"],
            &["leaderElection.enabled"],
        ),
    ];
    for (set, expected) in cases {
        let mut args = vec!["template", RELEASE, &chart];
        args.extend_from_slice(set);
        let out = output(&env, "helm", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "helm {set:?} must fail");
        for e in expected {
            assert!(
                stderr.contains(e),
                "helm {set:?}: {e:?} in the error: {stderr}"
            );
        }
    }
    // The same values, valid, render.
    env.run(
        "helm",
        &[
            "template",
            RELEASE,
            &chart,
            "--set",
            "replicas=1,leaderElection.enabled=false",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// (d) PromQL: promtool, and every expression against a real Prometheus

/// A tiny HTTP server standing in for a worker's and the operator's /metrics.
fn fake_metrics_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let scrapes = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
            let _ = serve_metrics(stream, n);
        }
    });
    port
}

fn serve_metrics(mut stream: TcpStream, n: u64) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    let len = stream.read(&mut buf)?;
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let body = match path {
        "/metrics" => worker_metrics(n),
        "/operator-metrics" => operator_metrics(n),
        _ => String::new(),
    };
    let status = if body.is_empty() {
        "404 Not Found"
    } else {
        "200 OK"
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Every worker series of inference-worker/METRICS.md, counters growing with each scrape.
fn worker_metrics(n: u64) -> String {
    let mut s = String::new();
    for (endpoint, status, k) in [
        ("/v1/completions", "200", 10),
        ("/v1/chat/completions", "200", 5),
        ("/v1/chat/completions", "429", 1),
    ] {
        s += &format!(
            "tidal_worker_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {}\n",
            n * k
        );
    }
    s += "tidal_worker_queue_depth 3\ntidal_worker_running_requests 2\ntidal_worker_ready 1\n";
    for (name, start, count) in [
        ("tidal_worker_time_to_first_token_seconds", 0.001, 16),
        ("tidal_worker_time_per_output_token_seconds", 0.0005, 14),
    ] {
        let mut bound: f64 = start;
        for i in 0..count {
            s += &format!("{name}_bucket{{le=\"{bound}\"}} {}\n", n * (i + 1));
            bound *= 2.0;
        }
        s += &format!("{name}_bucket{{le=\"+Inf\"}} {}\n", n * count);
        s += &format!("{name}_sum {}\n{name}_count {}\n", n, n * count);
    }
    s += &format!(
        "tidal_worker_prompt_tokens_total {}\ntidal_worker_generated_tokens_total {}\n",
        n * 100,
        n * 40
    );
    s += &format!("tidal_worker_cancelled_requests_total {n}\n");
    for reason in ["low_confidence", "overloaded"] {
        s += &format!("tidal_worker_escalations_total{{reason=\"{reason}\"}} {n}\n");
    }
    for layer in 0..2 {
        for expert in 0..4u64 {
            s += &format!(
                "tidal_worker_expert_tokens_total{{layer=\"{layer}\",expert=\"{expert}\"}} {}\n",
                n * (expert + 1)
            );
        }
    }
    s
}

/// The operator's autoscaler series (labels namespace, inference_service, target).
fn operator_metrics(n: u64) -> String {
    let mut s = String::from("tidal_operator_leader 1\n");
    let svc = "namespace=\"ns1\",inference_service=\"llama\"";
    for target in ["cloud", "edge/edge-0", "shard/0"] {
        let l = format!("{svc},target=\"{target}\"");
        for (name, v) in [
            ("tidal_forecast_observed_rps", 10.0),
            ("tidal_forecast_predicted_rps", 12.0),
            ("tidal_forecast_lower_rps", 9.0),
            ("tidal_forecast_upper_rps", 15.0),
            ("tidal_forecast_horizon_seconds", 60.0),
            ("tidal_forecast_error_ratio", 0.1),
            ("tidal_autoscaler_desired_replicas", 3.0),
            ("tidal_autoscaler_current_replicas", 2.0),
        ] {
            s += &format!("{name}{{{l}}} {v}\n");
        }
    }
    s += &format!("tidal_autoscaler_metrics_available{{{svc}}} 1\n");
    s += &format!("tidal_expert_plan_imbalance{{{svc}}} 1.25\n");
    for direction in ["up", "down", "hold"] {
        s += &format!("tidal_autoscaler_decisions_total{{{svc},direction=\"{direction}\"}} {n}\n");
    }
    s
}

/// The chart's scrape configs with `kubernetes_sd_configs` swapped for static targets that
/// carry the `__meta_kubernetes_*` labels Kubernetes discovery would set (Debian's Prometheus
/// is built without Kubernetes discovery), so the relabelling itself is what gets tested.
fn scrape_configs_with_fake_pods(port: u16) -> Value {
    let text =
        std::fs::read_to_string(chart().join("files/prometheus/scrape-configs.yaml")).unwrap();
    let mut jobs: Value = serde_yaml::from_str(&text).expect("scrape configs parse");
    let pod = |name: &str, annotations: &[(&str, &str)], labels: &[(&str, &str)]| {
        let mut l = serde_json::Map::new();
        l.insert("__meta_kubernetes_namespace".into(), json!("ns1"));
        l.insert("__meta_kubernetes_pod_name".into(), json!(name));
        l.insert("__meta_kubernetes_pod_phase".into(), json!("Running"));
        for (k, v) in annotations {
            l.insert(format!("__meta_kubernetes_pod_annotation_{k}"), json!(v));
            l.insert(
                format!("__meta_kubernetes_pod_annotationpresent_{k}"),
                json!("true"),
            );
        }
        for (k, v) in labels {
            l.insert(format!("__meta_kubernetes_pod_label_{k}"), json!(v));
            l.insert(
                format!("__meta_kubernetes_pod_labelpresent_{k}"),
                json!("true"),
            );
        }
        // Kubernetes discovery gives pods without declared ports their bare IP.
        json!({"targets": ["127.0.0.1"], "labels": l})
    };
    let p = port.to_string();
    let scrape = [
        ("prometheus_io_scrape", "true"),
        ("prometheus_io_port", p.as_str()),
        ("prometheus_io_path", "/metrics"),
    ];
    let pods = json!([
        pod(
            "llama-edge-edge-0-abc",
            &scrape,
            &[
                ("tidal_rs_inference_service", "llama"),
                ("tidal_rs_tier", "edge"),
                ("tidal_rs_edge_node", "edge-0"),
                ("tidal_rs_role", "full"),
            ],
        ),
        // Not annotated: dropped.
        pod("quiet", &[], &[("tidal_rs_inference_service", "llama")]),
        // Annotated but not a worker: not scraped by the workers' job.
        pod("other-app", &scrape, &[("app", "other")]),
        pod(
            "tidal-operator-0",
            &[
                ("prometheus_io_scrape", "true"),
                ("prometheus_io_port", p.as_str()),
                ("prometheus_io_path", "/operator-metrics"),
            ],
            &[
                ("app_kubernetes_io_part_of", "tidal"),
                ("app_kubernetes_io_component", "operator"),
            ],
        ),
    ]);
    for job in jobs.as_array_mut().expect("a list of scrape configs") {
        let sd = job
            .as_object_mut()
            .unwrap()
            .remove("kubernetes_sd_configs")
            .expect("kubernetes_sd_configs");
        assert_eq!(sd[0]["role"], "pod");
        job["static_configs"] = pods.clone();
    }
    jobs
}

struct Prometheus {
    url: String,
    _process: Killed,
    _dir: TempDir,
}

fn start_prometheus(rules: &Path, scrape_configs: Value) -> Prometheus {
    let dir = TempDir::new("prometheus");
    let config = json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules],
        "scrape_configs": scrape_configs,
    });
    let config_path = dir.0.join("prometheus.yml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config_path)
        .output()
        .expect("promtool (Debian's prometheus package) is installed");
    assert!(
        check.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let port = tidal_e2e::processes::free_port();
    let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus (Debian's prometheus package)");
    Prometheus {
        url: format!("http://127.0.0.1:{port}"),
        _process: Killed(child),
        _dir: dir,
    }
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str, query: Option<&str>) -> Result<Value, String> {
        let url = format!("{}{path}", self.url);
        let body = match query {
            Some(q) => curl(&["-G", &url, "--data-urlencode", &format!("query={q}")])?,
            None => curl(&[&url])?,
        };
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    /// Runs an instant query; `Err` with Prometheus' message when it does not parse/evaluate.
    fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let v = self.api("/api/v1/query", Some(q))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Replaces Grafana variables with values Prometheus accepts: intervals become a duration,
/// the TTFT SLO a bucket bound, the rest match-everything regexes (always used with =~).
fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("closing brace");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = match name {
            "" => "$",
            n if n.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
                // A regex back-reference such as label_replace's "$1": keep it.
                out.push('$');
                rest = after;
                continue;
            }
            "__rate_interval" | "__interval" | "__range" => "1m",
            "ttft_slo" => "0.512",
            _ => ".*",
        };
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Every PromQL expression of a dashboard: panel targets and the variables' selectors.
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn panels<'a>(v: &'a Value, acc: &mut Vec<&'a Value>) {
        for p in v.as_array().into_iter().flatten() {
            acc.push(p);
            panels(&p["panels"], acc);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((format!("panel {:?}", p["title"]), e.to_string()));
            }
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .or(v["definition"].as_str())
            .expect("a query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .map(|s| s.rsplit_once(',').map_or(s, |(sel, _)| sel).to_string())
            .unwrap_or_else(|| q.to_string());
        out.push((format!("variable {:?}", v["name"]), inner));
    }
    out
}

fn rule_expressions(rules: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["record"].as_str().or(r["alert"].as_str()).expect("named");
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn promql_of_rules_and_dashboards_runs_on_a_real_prometheus() {
    // The control plane is not needed here, but CI must run this test, never skip it.
    let _ = control_plane();
    let rules_path = chart().join("files/rules/tidal.rules.yaml");
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
        .expect("promtool (Debian's prometheus package) is installed");
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules_path).unwrap()).unwrap();
    let rule_exprs = rule_expressions(&rules);
    let alerts: BTreeSet<&str> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for a in [
        "TidalTimeToFirstTokenSLOBreach",
        "TidalMetricsUnavailable",
        "TidalReplicasAtMax",
    ] {
        assert!(alerts.contains(a), "alert {a} in {alerts:?}");
    }

    let mut dashboards = Vec::new();
    for entry in std::fs::read_dir(chart().join("files/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        dashboards.push((path, d));
    }
    let overview = dashboards
        .iter()
        .find(|(p, _)| p.ends_with("tidal-overview.json"))
        .map(|(_, d)| d)
        .expect("tidal-overview.json");
    let titles: Vec<String> = overview["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap_or("").to_lowercase())
        .collect();
    for wanted in [
        "request rate",
        "forecast vs actual",
        "replicas per tier",
        "per-expert load",
        "escalation rate",
        "slo attainment",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "a panel about {wanted:?} in {titles:?}"
        );
    }
    for (path, d) in &dashboards {
        let vars = d["templating"]["list"].as_array().expect("variables");
        assert!(
            vars.iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            "{}: a ${{datasource}} variable",
            path.display()
        );
        let text = serde_json::to_string(d).unwrap();
        assert!(
            !text.contains("\"uid\":\"prometheus\"") && !text.contains("${DS_"),
            "{}: no hard-coded datasource",
            path.display()
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            assert!(
                ids.insert(p["id"].as_u64()),
                "duplicate panel id {}",
                p["id"]
            );
            if p["type"] != "row" {
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "panel {}",
                    p["title"]
                );
            }
        }
    }

    let port = fake_metrics_server();
    let prom = start_prometheus(&rules_path, scrape_configs_with_fake_pods(port));
    eventually("Prometheus is ready", CONVERGE, || async {
        curl(&["-f", &format!("{}/-/ready", prom.url)]).map_err(|e| format!("{e}\n{}", prom.log()))
    })
    .await;

    // The rules file loads as-is.
    let loaded = prom.api("/api/v1/rules", None).expect("rules API");
    let loaded_rules: usize = loaded["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        loaded_rules,
        rule_exprs.len(),
        "Prometheus loaded every rule"
    );

    // The scrape config's relabelling: one worker target, labelled as the autoscaler expects;
    // the operator's series keep their own namespace label.
    let worker = eventually("the worker pod is scraped", CONVERGE, || async {
        let r = prom.query("up{job=\"tidal-workers\"} == 1")?;
        if r.len() == 1 {
            Ok(r[0]["metric"].clone())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    for (k, v) in [
        ("namespace", "ns1"),
        ("pod", "llama-edge-edge-0-abc"),
        ("tidal_inference_service", "llama"),
        ("tidal_tier", "edge"),
        ("tidal_edge_node", "edge-0"),
        ("tidal_role", "full"),
    ] {
        assert_eq!(worker[k], v, "label {k} of the worker target: {worker}");
    }
    let targets = prom.api("/api/v1/targets", None).unwrap();
    let active = targets["data"]["activeTargets"].as_array().unwrap().len();
    assert_eq!(
        active, 2,
        "only the worker and the operator are scraped: {targets}"
    );
    let op = eventually("the operator's series", CONVERGE, || async {
        let r = prom.query("tidal_autoscaler_desired_replicas{job=\"tidal-operator\"}")?;
        if r.len() == 3 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    for s in &op {
        assert_eq!(
            s["metric"]["namespace"], "ns1",
            "honor_labels keeps it: {s}"
        );
        assert!(s["metric"].get("exported_namespace").is_none());
    }
    // Every rule must evaluate and every dashboard query must find data: their metric and
    // label names match what the workers and the operator export. Retried until then, since
    // rates need two samples of each target in their window and targets are scraped at
    // different offsets.
    let check_all = || {
        let mut failures = Vec::new();
        for (what, expr) in &rule_exprs {
            if let Err(e) = prom.query(expr) {
                failures.push(format!("{what}: {e}\n  {expr}"));
            }
        }
        for (path, d) in &dashboards {
            for (what, expr) in dashboard_expressions(d) {
                let q = substitute_grafana_variables(&expr);
                match prom.query(&q) {
                    Err(e) => failures.push(format!("{}: {what}: {e}\n  {q}", path.display())),
                    Ok(r) if r.is_empty() => {
                        failures.push(format!("{}: {what}: no data\n  {q}", path.display()))
                    }
                    Ok(_) => {}
                }
            }
        }
        failures
    };
    eventually(
        "every rule and dashboard query has data",
        CONVERGE,
        || async {
            let failures = check_all();
            if failures.is_empty() {
                Ok(())
            } else {
                Err(format!("PromQL failures:\n{}", failures.join("\n")))
            }
        },
    )
    .await;

    // A recording rule aggregates by the labels the scrape config produces.
    let r = prom
        .query(
            &rule_exprs
                .iter()
                .find(|(w, _)| w.ends_with("tidal_worker_queue_depth:sum"))
                .unwrap()
                .1,
        )
        .unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["metric"]["tidal_inference_service"], "llama");
    assert_eq!(r[0]["metric"]["namespace"], "ns1");
    assert_eq!(r[0]["value"][1], "3");
}

// ---------------------------------------------------------------------------------------------
// (f) install/uninstall and (g) RBAC sufficiency, on the real control plane

/// A Helm release uninstalled on drop (also on panic, before the namespace goes).
struct Release {
    env: LocalEnv,
    namespace: String,
}

impl Release {
    fn install(ctx: &TestCtx, set: &[&str]) -> Release {
        let chart = chart_arg();
        let mut args = vec![
            "install",
            RELEASE,
            &chart,
            "--namespace",
            &ctx.namespace,
            "--skip-crds",
        ];
        for s in set {
            args.extend_from_slice(&["--set", s]);
        }
        let release = Release {
            env: ctx.env.clone(),
            namespace: ctx.namespace.clone(),
        };
        ctx.env.run("helm", &args);
        release
    }

    fn uninstall(&self) -> Output {
        output(
            &self.env,
            "helm",
            &[
                "uninstall",
                RELEASE,
                "--namespace",
                &self.namespace,
                "--ignore-not-found",
            ],
        )
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.uninstall();
    }
}

fn cluster_name(ctx: &TestCtx) -> String {
    format!("{RELEASE}-{}", ctx.namespace)
}

/// `kubectl get` of one object as JSON; `None` when it does not exist.
fn get(ctx: &TestCtx, kind: &str, name: &str, namespaced: bool) -> Option<Value> {
    let mut args = vec!["get", kind, name, "-o", "json", "--ignore-not-found"];
    if namespaced {
        args.extend_from_slice(&["-n", &ctx.namespace]);
    }
    let out = ctx.env.run("kubectl", &args);
    if out.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&out).expect("json"))
    }
}

#[tokio::test]
async fn helm_install_creates_the_operator_and_uninstall_removes_it() {
    let Some(ctx) = TestCtx::new("helm-install").await else {
        return;
    };
    install_crds(&ctx).await;
    let release = Release::install(&ctx, &[]);
    let objects = [
        ("deployment", RELEASE.to_string(), true),
        ("serviceaccount", RELEASE.to_string(), true),
        ("service", format!("{RELEASE}-metrics"), true),
        ("role", format!("{RELEASE}-leader-election"), true),
        ("rolebinding", format!("{RELEASE}-leader-election"), true),
        ("clusterrole", cluster_name(&ctx), false),
        ("clusterrolebinding", cluster_name(&ctx), false),
    ];
    for (kind, name, namespaced) in &objects {
        assert!(
            get(&ctx, kind, name, *namespaced).is_some(),
            "{kind}/{name} installed"
        );
    }
    let status = ctx.env.run(
        "helm",
        &["status", RELEASE, "-n", &ctx.namespace, "-o", "json"],
    );
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["info"]["status"], "deployed");

    // What the API server stored: the hardened pod, probes, and the leader Lease's namespace.
    let deploy = get(&ctx, "deployment", RELEASE, true).unwrap();
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], RELEASE);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let lease_ns = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TIDAL_LEASE_NAMESPACE")
        .map(|e| e["value"].clone());
    assert_eq!(lease_ns, Some(json!(ctx.namespace)));
    let svc = get(&ctx, "service", &format!("{RELEASE}-metrics"), true).unwrap();
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );

    let out = release.uninstall();
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (kind, name, namespaced) in &objects {
        eventually(&format!("{kind}/{name} removed"), CONVERGE, || async {
            match get(&ctx, kind, name, *namespaced) {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        })
        .await;
    }
}

/// A kubeconfig for `token` against the local API server (server and CA from the admin one).
fn token_kubeconfig(env: &LocalEnv, token: &str, namespace: &str, path: &Path) {
    let admin: Value = serde_yaml::from_str(&std::fs::read_to_string(&env.kubeconfig).unwrap())
        .expect("admin kubeconfig");
    let cluster = admin["clusters"][0]["cluster"].clone();
    assert!(
        cluster["server"].is_string(),
        "server in {}",
        env.kubeconfig.display()
    );
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator", "namespace": namespace}}],
        "current-context": "operator",
    });
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

#[tokio::test]
async fn the_chart_rbac_is_enough_for_the_real_operator() {
    let Some(ctx) = TestCtx::new("helm-rbac").await else {
        return;
    };
    // Built first (cargo may wait for its lock), so nothing is installed while it builds.
    let operator = tidal_e2e::operator_binary();
    install_crds(&ctx).await;
    let ns = ctx.namespace.clone();
    // No in-cluster replicas: the operator runs here, with the chart's ServiceAccount.
    let _release = Release::install(
        &ctx,
        &[
            "replicas=0",
            &format!("watchNamespace={ns}"),
            "logJson=false",
        ],
    );
    let sa = format!("system:serviceaccount:{ns}:{RELEASE}");

    // The rest of the list, as the API server's authorizer sees it.
    let can_i = |verb: &str, resource: &str, extra: &[&str]| -> bool {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", &sa];
        args.extend_from_slice(extra);
        let out = output(&ctx.env, "kubectl", &args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let nsa = ["-n", ns.as_str()];
    let allowed: &[(&str, &str, &[&str])] = &[
        ("patch", "nodes", &[]),
        ("watch", "nodes", &[]),
        ("list", "leases.coordination.k8s.io", &["-A"]),
        (
            "watch",
            "leases.coordination.k8s.io",
            &["-n", "kube-node-lease"],
        ),
        ("create", "leases.coordination.k8s.io", &nsa),
        ("update", "leases.coordination.k8s.io", &nsa),
        (
            "patch",
            "deployments.apps",
            &["-n", "default", "--subresource", "scale"],
        ),
        ("delete", "deployments.apps", &["-n", "default"]),
        ("create", "configmaps", &["-n", "default"]),
        ("delete", "services", &["-n", "default"]),
        ("create", "events.events.k8s.io", &["-n", "default"]),
        ("patch", "events.events.k8s.io", &["-n", "default"]),
        ("watch", "pods", &["-A"]),
        (
            "update",
            "inferenceservices.tidal.rs",
            &["-n", "default", "--subresource", "status"],
        ),
        ("patch", "edgenodes.tidal.rs", &["--subresource", "status"]),
        ("watch", "edgenodes.tidal.rs", &[]),
    ];
    for (verb, resource, extra) in allowed {
        assert!(
            can_i(verb, resource, extra),
            "{sa} may {verb} {resource} {extra:?}"
        );
    }
    // Least privilege: nothing beyond the list.
    let denied: &[(&str, &str, &[&str])] = &[
        ("get", "secrets", &["-n", "default"]),
        ("delete", "nodes", &[]),
        (
            "create",
            "leases.coordination.k8s.io",
            &["-n", "kube-system"],
        ),
        ("create", "pods", &["-n", "default"]),
        ("delete", "inferenceservices.tidal.rs", &["-n", "default"]),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            &[],
        ),
        ("create", "events", &["-n", "default"]),
    ];
    for (verb, resource, extra) in denied {
        assert!(
            !can_i(verb, resource, extra),
            "{sa} may not {verb} {resource} {extra:?}"
        );
    }

    // The real operator, out of cluster, with the ServiceAccount's token and the env vars the
    // chart's Deployment sets (leader election on a Lease in the release namespace).
    let token = ctx.env.run(
        "kubectl",
        &["create", "token", RELEASE, "-n", &ns, "--duration", "1h"],
    );
    let dir = TempDir::new("rbac");
    let kubeconfig = dir.0.join("kubeconfig");
    token_kubeconfig(&ctx.env, token.trim(), &ns, &kubeconfig);
    let deploy = get(&ctx, "deployment", RELEASE, true).expect("the chart's Deployment");
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    let port = tidal_e2e::processes::free_port();
    let identity = format!("helm-rbac-{}", std::process::id());
    let mut cmd = Command::new(&operator);
    cmd.arg("run")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("operator.log")).unwrap());
    let mut seen = BTreeSet::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        seen.insert(name.to_string());
        if let Some(v) = e["value"].as_str() {
            cmd.env(name, v);
        }
    }
    for (name, value) in [
        ("TIDAL_IDENTITY", identity.as_str()),
        ("TIDAL_METRICS_ADDR", &format!("127.0.0.1:{port}")),
        ("RUST_LOG", "info"),
    ] {
        assert!(seen.contains(name), "the Deployment sets {name}");
        cmd.env(name, value);
    }
    for name in [
        "TIDAL_LEASE_NAMESPACE",
        "TIDAL_WATCH_NAMESPACE",
        "TIDAL_NO_LEADER_ELECTION",
    ] {
        assert!(seen.contains(name), "the Deployment sets {name}");
    }
    let _operator = Killed(cmd.spawn().expect("start tidal-operator"));
    let log = || std::fs::read_to_string(dir.0.join("operator.log")).unwrap_or_default();

    eventually(
        "the operator leads on the Lease in the release namespace",
        CONVERGE,
        || async {
            let lease =
                get(&ctx, "lease", RELEASE, true).ok_or_else(|| format!("no Lease\n{}", log()))?;
            if lease["spec"]["holderIdentity"] == identity.as_str() {
                Ok(())
            } else {
                Err(format!(
                    "holder {}\n{}",
                    lease["spec"]["holderIdentity"],
                    log()
                ))
            }
        },
    )
    .await;

    let text =
        std::fs::read_to_string(repo_root().join("deploy/examples/dense-cloud.yaml")).unwrap();
    let manifest = dir.0.join("dense-cloud.yaml");
    std::fs::write(&manifest, text).unwrap();
    ctx.env.run(
        "kubectl",
        &["apply", "-n", &ns, "-f", manifest.to_str().unwrap()],
    );
    eventually("children of llama-chat exist", CONVERGE, || async {
        for (kind, name) in [
            ("deployment", "llama-chat-cloud"),
            ("service", "llama-chat-cloud"),
        ] {
            get(&ctx, kind, name, true).ok_or_else(|| format!("no {kind}/{name}\n{}", log()))?;
        }
        Ok(())
    })
    .await;
    eventually("status of llama-chat written", CONVERGE, || async {
        let tis = get(&ctx, "inferenceservice", "llama-chat", true).ok_or("gone")?;
        let conditions = tis["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if tis["status"]["observedGeneration"].is_number() && !conditions.is_empty() {
            Ok(())
        } else {
            Err(format!("status {}\n{}", tis["status"], log()))
        }
    })
    .await;
    eventually("an Event from tidal-operator", CONVERGE, || async {
        let out = ctx.env.run(
            "kubectl",
            &["get", "events.events.k8s.io", "-n", &ns, "-o", "json"],
        );
        let list: Value = serde_json::from_str(&out).unwrap();
        let ours = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reportingController"] == "tidal-operator");
        if ours {
            Ok(())
        } else {
            Err(format!("no Event yet\n{}", log()))
        }
    })
    .await;
    let metrics = curl(&[&format!("http://127.0.0.1:{port}/metrics")]).unwrap();
    assert!(
        metrics.lines().any(|l| l == "tidal_operator_leader 1"),
        "leader gauge: {metrics}"
    );
    let logs = log();
    for denied in ["forbidden", "Forbidden"] {
        assert!(
            !logs.contains(denied),
            "the operator was denied something:\n{logs}"
        );
    }
}
