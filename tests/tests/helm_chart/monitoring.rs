//! The chart's monitoring assets: every PromQL expression of the rules and dashboards runs
//! against a real Prometheus scraping fake pods through the chart's scrape config.

use tidal_e2e::processes::{Prometheus, PrometheusConfig, promtool};

use super::*;

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
            ("tidal_forecast_upper_exceeded_ratio", 0.1),
            ("tidal_forecast_band_coverage_ratio", 0.8),
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

/// The HTTP API of the test's Prometheus, through curl (these checks are synchronous).
trait Api {
    fn api(&self, path: &str, query: Option<&str>) -> Result<Value, String>;
    /// Runs an instant query; `Err` with Prometheus' message when it does not parse/evaluate.
    fn query(&self, q: &str) -> Result<Vec<Value>, String>;
}

impl Api for Prometheus {
    fn api(&self, path: &str, query: Option<&str>) -> Result<Value, String> {
        let url = format!("{}{path}", self.url());
        let body = match query {
            Some(q) => curl(&["-G", &url, "--data-urlencode", &format!("query={q}")])?,
            None => curl(&[&url])?,
        };
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

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
    promtool(&["check".as_ref(), "rules".as_ref(), rules_path.as_os_str()]);
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
    let prom = Prometheus::start_with(PrometheusConfig {
        scrape_configs: scrape_configs_with_fake_pods(port),
        rule_files: vec![rules_path.clone()],
        ..Default::default()
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
