//! The chart on the real control plane: install and uninstall, and RBAC enough for the real
//! operator.

use tidal_e2e::processes::Killed;
use tidal_operator::children::WORKER_PORT;

use super::*;

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
    let release = Release::install(&ctx, &["networkPolicy.enabled=true"]);
    let objects = [
        ("networkpolicy", format!("{RELEASE}-expert-shards"), true),
        ("networkpolicy", format!("{RELEASE}-serving"), true),
        ("networkpolicy", format!("{RELEASE}-operator"), true),
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

    // The API server admitted the policies as rendered: shards open to routers only.
    let shards = get(
        &ctx,
        "networkpolicy",
        &format!("{RELEASE}-expert-shards"),
        true,
    )
    .unwrap();
    assert_eq!(
        shards["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["tidal.rs/role"],
        "router"
    );
    assert_eq!(
        shards["spec"]["ingress"][0]["ports"][0]["port"],
        WORKER_PORT
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
            "patch",
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
        ("list", "secrets", &["-A"]),
        ("watch", "secrets", &["-A"]),
        ("get", "secrets", &nsa),
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
        // Reads come from watches: no GET beyond the status the autoscaler refreshes.
        ("get", "deployments.apps", &["-n", "default"]),
        ("get", "pods", &["-n", "default"]),
        ("get", "nodes", &[]),
        ("get", "inferenceservices.tidal.rs", &["-n", "default"]),
        ("patch", "inferenceservices.tidal.rs", &["-n", "default"]),
        // Every write of the operator is a patch, a create or a delete.
        ("update", "deployments.apps", &["-n", "default"]),
        (
            "update",
            "inferenceservices.tidal.rs",
            &["-n", "default", "--subresource", "status"],
        ),
        ("update", "configmaps", &["-n", "default"]),
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
    let dir = tempfile::Builder::new()
        .prefix("tidal-helm-rbac")
        .tempdir()
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
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
        .stderr(std::fs::File::create(dir.path().join("operator.log")).unwrap());
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
    let log = || std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();

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
    let manifest = dir.path().join("dense-cloud.yaml");
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
