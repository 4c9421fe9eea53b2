//! The chart as files: it lints, renders what is committed, ships the generated CRDs and the
//! monitoring copies, and its values schema rejects bad values naming the field.

use super::*;
use tidal_operator::children::WORKER_PORT;

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
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let rendered = helm_template(&env, &extra);
        assert_eq!(
            rendered,
            helm_template(&env, &extra),
            "rendering {file} twice gives different output: the chart must be deterministic"
        );
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
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
    let renders = snapshot_renders();
    let (_, monitoring_args) = renders
        .iter()
        .find(|(f, _)| f == "monitoring.yaml")
        .expect("monitoring.yaml in renders.txt");
    let monitoring_args: Vec<&str> = monitoring_args.iter().map(String::as_str).collect();
    let monitoring = documents(&helm_template(&env, &monitoring_args));
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
    for unset in ["TIDAL_PROMETHEUS_URL", "TIDAL_EDGE_NODE_SELECTOR"] {
        assert!(!env_vars.contains_key(unset), "{unset} unset by default");
    }
    let with_url = documents(&helm_template(
        &env,
        &[
            "--set",
            "prometheusUrl=http://prom.monitoring:9090,watchNamespace=team-a,logJson=false,\
             edgeNodeSelector=tidal.rs/edge-pool=team-a",
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
        r#"{"name":"TIDAL_EDGE_NODE_SELECTOR","value":"tidal.rs/edge-pool=team-a"}"#,
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
    let cases: [(&[&str], &[&str]); 8] = [
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
        (
            &["--set-json", r#"networkPolicy.clients=[{"podSelectr":{}}]"#],
            &["/networkPolicy/clients/0", "podSelectr"],
        ),
        (
            &["--set", "networkPolicy.namespaces={Team_A}"],
            &["/networkPolicy/namespaces/0"],
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

#[tokio::test]
async fn rbac_rules_name_every_group_resource_and_verb_and_leave_secrets_and_updates_out() {
    let Some(env) = control_plane() else { return };
    // Every render a user may install (monitoring on or off, leader election on).
    for (file, extra) in snapshot_renders() {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let docs = documents(&helm_template(&env, &extra));
        let roles: Vec<&Value> = ["ClusterRole", "Role"]
            .iter()
            .flat_map(|k| find(&docs, k))
            .collect();
        assert!(!roles.is_empty(), "{file}: no RBAC rendered");
        for role in roles {
            let name = role["metadata"]["name"].as_str().unwrap_or("?");
            for rule in role["rules"].as_array().expect("rules") {
                for field in ["apiGroups", "resources", "verbs"] {
                    let values = rule[field].as_array().map(Vec::as_slice).unwrap_or(&[]);
                    assert!(!values.is_empty(), "{file} {name}: a rule without {field}");
                    for v in values {
                        let v = v.as_str().unwrap();
                        // No wildcard grants anything the code does not name.
                        assert!(!v.contains('*'), "{file} {name}: wildcard {field} {v:?}");
                    }
                }
                let resources: Vec<&str> = rule["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                // The operator never reads Secrets (workers mount API keys themselves).
                assert!(
                    !resources.iter().any(|r| r.starts_with("secrets")),
                    "{file} {name}: grants {resources:?}"
                );
                assert!(rule.get("nonResourceURLs").is_none(), "{file} {name}");
                // The operator patches, creates and deletes; only the leader-election Lease
                // (kube-lease-manager) is updated.
                if role["kind"] == "ClusterRole" {
                    let verbs = rule["verbs"].as_array().unwrap();
                    assert!(
                        !verbs.iter().any(|v| v == "update"),
                        "{file} {name}: update granted on {resources:?}"
                    );
                }
                assert!(rule.get("resourceNames").is_none() || name.contains("leader"));
            }
        }
    }
}

/// Every grant of the chart's ClusterRole and the operator code that needs it: (API group,
/// resource, verb, source file under operator/src, the call in it). A grant not listed here is
/// a verb no code issues; a call that disappears from its file makes its grant unused. Both
/// fail the test below.
const GRANTS: &[(&str, &str, &str, &str, &str)] = &[
    // The shared watches (kube-runtime reflectors: list, then watch).
    (
        "tidal.rs",
        "inferenceservices",
        "list",
        "controller/caches.rs",
        "ctx.scoped_api::<InferenceService>()",
    ),
    (
        "tidal.rs",
        "inferenceservices",
        "watch",
        "controller/caches.rs",
        "ctx.scoped_api::<InferenceService>()",
    ),
    (
        "tidal.rs",
        "edgenodes",
        "list",
        "controller/caches.rs",
        "kube::Api::<EdgeNode>::all",
    ),
    (
        "tidal.rs",
        "edgenodes",
        "watch",
        "controller/caches.rs",
        "kube::Api::<EdgeNode>::all",
    ),
    // kube-runtime's finalizer helper adds and removes the EdgeNode finalizer by JSON patch.
    (
        "tidal.rs",
        "edgenodes",
        "patch",
        "controller/edge_node.rs",
        "finalizer(&api, FINALIZER",
    ),
    // The autoscaler reads the status it is about to update (not the possibly stale cache).
    (
        "tidal.rs",
        "inferenceservices/status",
        "get",
        "controller/autoscale/observe.rs",
        ".get_status(&name)",
    ),
    (
        "tidal.rs",
        "inferenceservices/status",
        "patch",
        "controller/inference_service.rs",
        "api.patch_status(",
    ),
    (
        "tidal.rs",
        "edgenodes/status",
        "patch",
        "controller/edge_node.rs",
        ".patch_status(",
    ),
    // Children: server-side apply (a patch that creates a new child), pruning, watches.
    (
        "apps",
        "deployments",
        "list",
        "controller/caches.rs",
        "ctx.scoped_api::<Deployment>()",
    ),
    (
        "apps",
        "deployments",
        "watch",
        "controller/caches.rs",
        "ctx.scoped_api::<Deployment>()",
    ),
    (
        "apps",
        "deployments",
        "create",
        "controller/inference_service.rs",
        "Patch::Apply(&desired)",
    ),
    (
        "apps",
        "deployments",
        "patch",
        "controller/inference_service.rs",
        "Patch::Apply(&desired)",
    ),
    (
        "apps",
        "deployments",
        "delete",
        "controller/inference_service.rs",
        "api.delete(&child",
    ),
    (
        "apps",
        "deployments/scale",
        "patch",
        "controller/autoscale/apply.rs",
        "api.patch_scale(",
    ),
    (
        "",
        "services",
        "list",
        "controller/inference_service.rs",
        "Store<Service>",
    ),
    (
        "",
        "services",
        "watch",
        "controller/inference_service.rs",
        "Store<Service>",
    ),
    (
        "",
        "services",
        "create",
        "controller/inference_service.rs",
        "Patch::Apply(&desired)",
    ),
    (
        "",
        "services",
        "patch",
        "controller/inference_service.rs",
        "Patch::Apply(&desired)",
    ),
    (
        "",
        "services",
        "delete",
        "controller/inference_service.rs",
        "svcs.delete(&name",
    ),
    (
        "",
        "configmaps",
        "list",
        "controller/inference_service.rs",
        "Store<ConfigMap>",
    ),
    (
        "",
        "configmaps",
        "watch",
        "controller/inference_service.rs",
        "Store<ConfigMap>",
    ),
    (
        "",
        "configmaps",
        "create",
        "controller/inference_service.rs",
        "Patch::Apply(&desired)",
    ),
    (
        "",
        "configmaps",
        "patch",
        "controller/inference_service.rs",
        "Patch::Apply(&desired)",
    ),
    (
        "",
        "configmaps",
        "delete",
        "controller/inference_service.rs",
        "api.delete(&child",
    ),
    // Worker pods (readiness, time to ready) and the Nodes EdgeNodes follow and label.
    (
        "",
        "pods",
        "list",
        "controller/autoscale/mod.rs",
        "ctx.scoped_api::<Pod>()",
    ),
    (
        "",
        "pods",
        "watch",
        "controller/autoscale/mod.rs",
        "ctx.scoped_api::<Pod>()",
    ),
    (
        "",
        "nodes",
        "list",
        "controller/edge_node.rs",
        "Store<Node>",
    ),
    (
        "",
        "nodes",
        "watch",
        "controller/edge_node.rs",
        "Store<Node>",
    ),
    (
        "",
        "nodes",
        "patch",
        "controller/edge_node.rs",
        "\"kind\": \"Node\"",
    ),
    // Node heartbeats.
    (
        "coordination.k8s.io",
        "leases",
        "list",
        "controller/edge_node.rs",
        "Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE)",
    ),
    (
        "coordination.k8s.io",
        "leases",
        "watch",
        "controller/edge_node.rs",
        "Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE)",
    ),
    // Events (kube-runtime's Recorder creates one, then patches its series).
    (
        "events.k8s.io",
        "events",
        "create",
        "controller/edge_node.rs",
        "recorder.publish(",
    ),
    (
        "events.k8s.io",
        "events",
        "patch",
        "controller/edge_node.rs",
        "recorder.publish(",
    ),
];

#[tokio::test]
async fn the_cluster_role_grants_exactly_the_calls_the_operator_makes() {
    let Some(env) = control_plane() else { return };
    let src = repo_root().join("operator/src");
    let mut stale = Vec::new();
    for (group, resource, verb, file, call) in GRANTS {
        let text = std::fs::read_to_string(src.join(file))
            .unwrap_or_else(|e| panic!("operator/src/{file}: {e}"));
        if !text.contains(call) {
            stale.push(format!(
                "{verb} {group}/{resource}: {call:?} is gone from {file}"
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "grants whose call is gone:\n{}",
        stale.join("\n")
    );
    let expected: BTreeSet<(String, String, String)> = GRANTS
        .iter()
        .map(|(g, r, v, _, _)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    for (file, extra) in snapshot_renders() {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let docs = documents(&helm_template(&env, &extra));
        let role = find(&docs, "ClusterRole")
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{file}: no ClusterRole"));
        let mut granted = BTreeSet::new();
        for rule in role["rules"].as_array().expect("rules") {
            let list = |f: &str| -> Vec<String> {
                rule[f]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        granted.insert((g.clone(), r.clone(), v));
                    }
                }
            }
        }
        let unused: Vec<_> = granted.difference(&expected).collect();
        let missing: Vec<_> = expected.difference(&granted).collect();
        assert!(
            unused.is_empty() && missing.is_empty(),
            "{file}: granted but no code issues it: {unused:?}; issued but not granted: {missing:?}"
        );
    }
}

#[tokio::test]
async fn network_policies_let_in_only_the_named_peers() {
    let Some(env) = control_plane() else { return };
    let policies = |extra: &[&str]| -> Vec<Value> {
        documents(&helm_template(&env, extra))
            .into_iter()
            .filter(|d| d["kind"] == "NetworkPolicy")
            .collect()
    };
    assert!(policies(&[]).is_empty(), "off by default");
    let rendered = policies(&[
        "--set",
        "networkPolicy.enabled=true,networkPolicy.namespaces={team-a,team-b}",
    ]);
    let by_name = |name: &str, ns: &str| -> &Value {
        rendered
            .iter()
            .find(|p| p["metadata"]["name"] == name && p["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no NetworkPolicy {ns}/{name}"))
    };
    assert_eq!(rendered.len(), 5, "two per namespace and the operator's");
    let prometheus = json!({"namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}});
    for ns in ["team-a", "team-b"] {
        // Every policy is ingress-only on the worker port, with one rule.
        let shards = by_name("tidal-expert-shards", ns);
        assert_eq!(
            shards["spec"]["podSelector"]["matchLabels"]["tidal.rs/role"],
            "expert"
        );
        let rule = &shards["spec"]["ingress"];
        assert_eq!(rule.as_array().unwrap().len(), 1);
        assert_eq!(
            rule[0]["from"],
            json!([{"podSelector": {"matchLabels": {
                "app.kubernetes.io/managed-by": "tidal-operator", "tidal.rs/role": "router"}}},
                prometheus]),
            "shards: their routers and Prometheus only"
        );
        assert_eq!(
            rule[0]["ports"],
            json!([{"port": WORKER_PORT, "protocol": "TCP"}])
        );
        let serving = by_name("tidal-serving", ns);
        assert_eq!(
            serving["spec"]["podSelector"]["matchExpressions"][0]["values"],
            json!(["full", "router"]),
            "cloud, edge and router workers; not the shards"
        );
        let from = &serving["spec"]["ingress"][0]["from"];
        assert_eq!(
            from,
            &json!([{"podSelector": {}},
                {"podSelector": {"matchLabels": {
                    "app.kubernetes.io/managed-by": "tidal-operator", "tidal.rs/tier": "edge"}}},
                {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": "tidal-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "tidal",
                    "app.kubernetes.io/instance": "tidal",
                    "app.kubernetes.io/component": "operator"}}},
                prometheus]),
            "serving: clients of the namespace, edge workers escalating, the operator's fast \
             path reading /metrics, Prometheus"
        );
        for p in [shards, serving] {
            assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
        }
    }
    let operator = by_name("tidal-operator", "tidal-system");
    assert_eq!(operator["spec"]["ingress"][0]["from"], json!([prometheus]));
    assert_eq!(operator["spec"]["ingress"][0]["ports"][0]["port"], 8080);

    // Without namespaces the worker policies go where the operator watches.
    let watched = policies(&["--set", "networkPolicy.enabled=true,watchNamespace=team-c"]);
    let namespaces: BTreeSet<&str> = watched
        .iter()
        .map(|p| p["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, BTreeSet::from(["team-c", "tidal-system"]));
    // Callers are the user's to name: an ingress controller's namespace, say.
    let clients = policies(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        r#"networkPolicy.clients=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ingress"}}}]"#,
    ]);
    let serving = clients
        .iter()
        .find(|p| p["metadata"]["name"] == "tidal-serving")
        .unwrap();
    assert_eq!(
        serving["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "ingress"
    );
}
