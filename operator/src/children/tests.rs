use super::*;
use crate::crd::{EdgeNode, InferenceService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

fn load_example(file: &str) -> (Vec<InferenceService>, Vec<EdgeNode>) {
    let path = format!("{}/../deploy/examples/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut services = Vec::new();
    let mut nodes = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("InferenceService") => {
                let mut t: InferenceService = serde_json::from_value(v).unwrap();
                t.metadata.namespace = Some("prod".into());
                t.metadata.uid = Some("uid-1".into());
                services.push(t);
            }
            Some("EdgeNode") => nodes.push(serde_json::from_value(v).unwrap()),
            k => panic!("unexpected kind {k:?}"),
        }
    }
    (services, nodes)
}

fn facts(nodes: &[EdgeNode], phase: EdgePhase) -> Vec<EdgeFacts> {
    nodes
        .iter()
        .map(|n| EdgeFacts {
            name: n.metadata.name.clone().unwrap(),
            labels: n.metadata.labels.clone().unwrap_or_default(),
            node_name: Some(n.spec.node_name.clone().unwrap_or_else(|| "edge-1".into())),
            phase,
            failover_to_cloud: n.spec.offline_policy.failover_to_cloud,
        })
        .collect()
}

fn service_spec(w: &Workload) -> &k8s_openapi::api::core::v1::ServiceSpec {
    w.service.as_ref().unwrap().spec.as_ref().unwrap()
}

fn args(w: &Workload) -> Vec<String> {
    w.pod_spec().containers[0].args.clone().unwrap()
}

fn env_of(w: &Workload, name: &str) -> Option<String> {
    let c = &w.pod_spec().containers[0];
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[test]
fn dense_cloud_example_builds_one_hardened_full_worker() {
    let (svcs, _) = load_example("dense-cloud.yaml");
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    assert_eq!(c.workloads.len(), 1);
    assert!(c.config_maps.is_empty() && c.plan.is_none());
    let w = &c.workloads[0];
    assert_eq!(w.kind, ChildKind::Cloud);
    assert_eq!(w.desired, 1);
    let d = &w.deployment;
    assert_eq!(d.metadata.name.as_deref(), Some("llama-chat-cloud"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("prod"));
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("InferenceService", Some(true))
    );
    let labels = d.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["app.kubernetes.io/instance"], "llama-chat");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "tidal-operator");
    let pod = w.pod_spec();
    let ctr = &pod.containers[0];
    let sc = ctr.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert!(ctr.readiness_probe.is_some() && ctr.liveness_probe.is_some());
    // A busy worker answering a probe in over a second stays in its Service.
    let ready_timeout = ctr.readiness_probe.as_ref().unwrap().timeout_seconds;
    assert!(ready_timeout.unwrap_or(1) > 1, "{ready_timeout:?}");
    // Terminating workers keep serving until endpoints drop them, within the grace period.
    let sleep = ctr
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .expect("a preStop sleep");
    assert!(sleep.seconds > 0);
    assert!(pod.termination_grace_period_seconds.unwrap() > sleep.seconds + 30);
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["tidal.rs/tier"],
        "cloud"
    );
    let a = args(w);
    assert!(a.windows(2).any(|p| p == ["--role", "full"]));
    assert_eq!(env_of(w, "TIDAL_CONTEXT_LENGTH").as_deref(), Some("8192"));
    assert_eq!(
        env_of(w, "TIDAL_SERVED_MODEL_NAME").as_deref(),
        Some("llama-chat")
    );
    let tmpl = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
    assert_eq!(
        tmpl.annotations.as_ref().unwrap()["prometheus.io/scrape"],
        "true"
    );
    let svc = w.service.as_ref().unwrap();
    assert_eq!(
        svc.spec.as_ref().unwrap().selector,
        d.spec.as_ref().unwrap().selector.match_labels
    );
}

#[test]
fn an_oci_model_is_mounted_read_only_as_an_image_volume_in_every_role() {
    let (mut svcs, _) = load_example("moe-experts.yaml");
    let uri = "oci://127.0.0.1:25000/tidal-rs/models/smollm2-moe:0.1.0";
    svcs[0].spec.model.uri = uri.into();
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    assert!(c.workloads.len() >= 2, "router and shards");
    for w in &c.workloads {
        let a = args(w);
        assert!(
            a.windows(2).any(|p| p == ["--model", MODEL_MOUNT]),
            "{:?}: {a:?}",
            w.kind
        );
        let pod = w.pod_spec();
        let vol = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "model")
            .expect("model volume");
        let img = vol.image.as_ref().unwrap();
        assert_eq!(
            img.reference.as_deref(),
            Some("127.0.0.1:25000/tidal-rs/models/smollm2-moe:0.1.0")
        );
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "model")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (MODEL_MOUNT, Some(true))
        );
    }
    // A path model gets no image volume.
    let (svcs, _) = load_example("dense-cloud.yaml");
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    let pod = c.workloads[0].pod_spec();
    assert!(pod.volumes.iter().flatten().all(|v| v.name != "model"));
}

#[test]
fn moe_example_builds_router_shards_and_placement() {
    let (svcs, _) = load_example("moe-experts.yaml");
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    let kinds: Vec<_> = c.workloads.iter().map(|w| w.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            ChildKind::Router,
            ChildKind::ExpertShard(0),
            ChildKind::ExpertShard(1),
            ChildKind::ExpertShard(2),
            ChildKind::ExpertShard(3)
        ]
    );
    let plan = c.plan.as_ref().unwrap();
    assert_eq!(plan.num_experts, 8);
    assert_eq!(plan.shards[1].experts, vec![1, 5]);
    assert_eq!(
        plan.shards[1].endpoint,
        "http://mixtral-experts-1.prod.svc.cluster.local:8080"
    );
    let cm = &c.config_maps[0];
    assert_eq!(cm.metadata.name.as_deref(), Some("mixtral-placement"));
    let parsed: PlacementPlan =
        serde_json::from_str(&cm.data.as_ref().unwrap()["plan.json"]).unwrap();
    assert_eq!(&parsed, plan);
    let router = &c.workloads[0];
    assert!(args(router).windows(2).any(|p| p == ["--role", "router"]));
    let shard = &c.workloads[2];
    assert!(args(shard).windows(2).any(|p| p == ["--role", "expert"]));
    assert_eq!(env_of(shard, "TIDAL_SHARD").as_deref(), Some("1"));
    assert_eq!(
        env_of(router, "TIDAL_PLACEMENT_FILE").as_deref(),
        Some("/etc/tidal/placement/plan.json")
    );
    assert_eq!(
        shard.deployment.metadata.labels.as_ref().unwrap()[LABEL_SHARD],
        "1"
    );
    assert_eq!(shard.experts, vec![1, 5]);
    // Shard Services are headless (the router balances over the pods); the router's is not.
    let cluster_ip = |w: &Workload| service_spec(w).cluster_ip.clone();
    assert_eq!(cluster_ip(shard).as_deref(), Some(HEADLESS));
    assert_eq!(cluster_ip(router), None);
}

#[test]
fn api_keys_reach_every_openai_serving_worker_and_no_expert_shard() {
    let (mut svcs, _) = load_example("moe-experts.yaml");
    let tis = &mut svcs[0];
    tis.spec.auth = Some(crate::crd::AuthSpec {
        api_key_secret: crate::crd::SecretKeyRef {
            name: "mixtral-keys".into(),
            key: None,
        },
    });
    let c = desired_children(tis, &[], &BuildConfig::default()).unwrap();
    for w in &c.workloads {
        let pod = w.pod_spec();
        let vol = pod.volumes.iter().flatten().find(|v| v.name == "api-keys");
        let mounted = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "api-keys" && m.read_only == Some(true));
        if matches!(w.kind, ChildKind::ExpertShard(_)) {
            assert!(vol.is_none() && !mounted, "{:?}", w.kind);
            assert_eq!(env_of(w, "TIDAL_API_KEYS_FILE"), None);
            continue;
        }
        let secret = vol
            .and_then(|v| v.secret.as_ref())
            .expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("mixtral-keys"));
        let item = &secret.items.as_ref().unwrap()[0];
        assert_eq!(
            (item.key.as_str(), item.path.as_str()),
            ("api-keys", "api-keys")
        );
        assert!(mounted, "{:?}", w.kind);
        assert_eq!(
            env_of(w, "TIDAL_API_KEYS_FILE").as_deref(),
            Some("/etc/tidal/auth/api-keys")
        );
    }
    // Without auth, no worker gets keys.
    tis.spec.auth = None;
    let c = desired_children(tis, &[], &BuildConfig::default()).unwrap();
    assert!(
        c.workloads
            .iter()
            .all(|w| env_of(w, "TIDAL_API_KEYS_FILE").is_none())
    );
}

#[test]
fn tls_serves_https_on_every_worker_and_verifies_between_them() {
    let tls = Some(crate::crd::TlsSpec {
        secret_name: "workers-tls".into(),
    });
    let probes_https = |w: &Workload| {
        let c = &w.pod_spec().containers[0];
        [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
            .iter()
            .all(|p| {
                p.as_ref()
                    .unwrap()
                    .http_get
                    .as_ref()
                    .unwrap()
                    .scheme
                    .as_deref()
                    == Some("HTTPS")
            })
    };
    let check = |w: &Workload, ca_env: Option<&str>| {
        let pod = w.pod_spec();
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tls")
            .and_then(|v| v.secret.as_ref())
            .unwrap_or_else(|| panic!("{:?}: no TLS volume", w.kind));
        assert_eq!(secret.secret_name.as_deref(), Some("workers-tls"));
        let keys: Vec<_> = secret
            .items
            .iter()
            .flatten()
            .map(|i| i.key.as_str())
            .collect();
        assert_eq!(keys, ["tls.crt", "tls.key", "ca.crt"]);
        assert_eq!(
            env_of(w, "TIDAL_TLS_CERT_FILE").as_deref(),
            Some("/etc/tidal/tls/tls.crt")
        );
        assert_eq!(
            env_of(w, "TIDAL_TLS_KEY_FILE").as_deref(),
            Some("/etc/tidal/tls/tls.key")
        );
        for name in ["TIDAL_SHARD_CA_FILE", "TIDAL_ESCALATION_CA_FILE"] {
            let want = (ca_env == Some(name)).then(|| "/etc/tidal/tls/ca.crt".to_string());
            assert_eq!(env_of(w, name), want, "{:?} {name}", w.kind);
        }
        assert!(probes_https(w), "{:?}", w.kind);
        assert_eq!(w.pod_annotation("prometheus.io/scheme"), Some("https"));
    };

    // Router and shards: the plan's endpoints are https, the router trusts the CA.
    let (mut svcs, _) = load_example("moe-experts.yaml");
    svcs[0].spec.tls = tls.clone();
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    for w in &c.workloads {
        let ca = (w.kind == ChildKind::Router).then_some("TIDAL_SHARD_CA_FILE");
        check(w, ca);
    }
    assert_eq!(
        c.plan.as_ref().unwrap().shards[1].endpoint,
        "https://mixtral-experts-1.prod.svc.cluster.local:8080"
    );

    // Edge and cloud: the edge escalates to https and trusts the CA.
    let (mut svcs, nodes) = load_example("cloud-edge.yaml");
    let build = |tis: &InferenceService| {
        desired_children(
            tis,
            &facts(&nodes, EdgePhase::Ready),
            &BuildConfig::default(),
        )
        .unwrap()
    };
    svcs[0].spec.tls = tls;
    let c = build(&svcs[0]);
    for w in &c.workloads {
        let edge = matches!(w.kind, ChildKind::Edge(_));
        check(w, edge.then_some("TIDAL_ESCALATION_CA_FILE"));
        if edge {
            assert_eq!(
                env_of(w, "TIDAL_ESCALATE_TO").as_deref(),
                Some("https://assistant-cloud.prod.svc.cluster.local:8080")
            );
        }
    }

    // Without TLS the pod templates are as before: no scheme set, no annotation.
    svcs[0].spec.tls = None;
    let c = build(&svcs[0]);
    for w in &c.workloads {
        let c0 = &w.pod_spec().containers[0];
        assert_eq!(
            c0.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .scheme,
            None
        );
        assert!(env_of(w, "TIDAL_TLS_CERT_FILE").is_none());
        assert!(
            !w.pod_spec()
                .volumes
                .iter()
                .flatten()
                .any(|v| v.name == "tls")
        );
    }
}

#[test]
fn a_service_changing_its_cluster_ip_kind_is_replaced() {
    use k8s_openapi::api::core::v1::{Service, ServiceSpec};
    let svc = |ip: Option<&str>| Service {
        spec: Some(ServiceSpec {
            cluster_ip: ip.map(str::to_string),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (headless, unset) = (svc(Some(HEADLESS)), svc(None));
    // A shard Service made by an older operator with an address must go first.
    assert!(service_needs_replacing(
        &headless,
        &svc(Some("198.19.0.12"))
    ));
    assert!(service_needs_replacing(&unset, &headless));
    assert!(!service_needs_replacing(&headless, &headless));
    assert!(!service_needs_replacing(&unset, &svc(Some("198.19.0.12"))));
    // Not yet allocated (or not a live object): nothing to replace.
    assert!(!service_needs_replacing(&headless, &unset));
}

#[test]
fn edge_example_pins_one_deployment_per_selected_node_and_fails_over() {
    let (svcs, nodes) = load_example("cloud-edge.yaml");
    let tis = &svcs[0];
    let c = desired_children(
        tis,
        &facts(&nodes, EdgePhase::Ready),
        &BuildConfig::default(),
    )
    .unwrap();
    let edge: Vec<_> = c
        .workloads
        .iter()
        .filter(|w| matches!(w.kind, ChildKind::Edge(_)))
        .collect();
    assert_eq!(edge.len(), 2);
    let pod = edge[0].pod_spec();
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["kubernetes.io/hostname"],
        "edge-0"
    );
    // Each site's Service selects that site's pods only (a ClusterIP: kube-proxy balances).
    let svc = edge[0].service.as_ref().expect("a Service per edge site");
    assert_eq!(
        svc.metadata.name.as_deref(),
        edge[0].deployment.metadata.name.as_deref()
    );
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip, None);
    assert_eq!(
        spec.selector,
        edge[0]
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
    );
    assert_ne!(
        spec.selector,
        edge[1]
            .service
            .as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .selector
    );
    assert!(args(edge[0]).windows(2).any(|p| p == ["--role", "full"]));
    assert_eq!(
        env_of(edge[0], "TIDAL_ESCALATE_TO").as_deref(),
        Some("http://assistant-cloud.prod.svc.cluster.local:8080")
    );
    assert_eq!(
        env_of(edge[0], "TIDAL_CONFIDENCE_THRESHOLD").as_deref(),
        Some("0.6")
    );
    let cloud = c
        .workloads
        .iter()
        .find(|w| w.kind == ChildKind::Cloud)
        .unwrap();
    assert_eq!(cloud.desired, 1);

    // A node that is not selected gets nothing.
    let mut other = facts(&nodes, EdgePhase::Ready);
    other[1].labels.clear();
    let c2 = desired_children(tis, &other, &BuildConfig::default()).unwrap();
    assert_eq!(
        c2.workloads
            .iter()
            .filter(|w| matches!(w.kind, ChildKind::Edge(_)))
            .count(),
        1
    );

    // Offline sites scale to zero and the cloud takes their replicas (within maxReplicas).
    let c3 = desired_children(
        tis,
        &facts(&nodes, EdgePhase::Offline),
        &BuildConfig::default(),
    )
    .unwrap();
    assert!(
        c3.workloads
            .iter()
            .filter(|w| matches!(w.kind, ChildKind::Edge(_)))
            .all(|w| w.desired == 0)
    );
    assert_eq!(
        c3.workloads
            .iter()
            .find(|w| w.kind == ChildKind::Cloud)
            .unwrap()
            .desired,
        3
    );
    assert_eq!(
        c3.failed_over_sites,
        vec!["berlin".to_string(), "paris".to_string()]
    );
    assert!(c3.workloads.iter().all(|w| !w.awaits_assessment()));

    // Sites not assessed yet: reported, not written, and the cloud does not take them over.
    let c4 = desired_children(
        tis,
        &facts(&nodes, EdgePhase::Unknown),
        &BuildConfig::default(),
    )
    .unwrap();
    let (waiting, others): (Vec<_>, Vec<_>) =
        c4.workloads.iter().partition(|w| w.awaits_assessment());
    assert_eq!(waiting.len(), 2);
    assert!(waiting.iter().all(|w| matches!(w.kind, ChildKind::Edge(_))));
    assert!(
        others
            .iter()
            .all(|w| w.kind == ChildKind::Cloud && w.desired == 1)
    );
    assert!(c4.failed_over_sites.is_empty());
}

#[test]
fn specs_the_schema_cannot_catch_are_reported() {
    let (svcs, _) = load_example("moe-experts.yaml");
    let mut tis = svcs[0].clone();
    tis.spec.model.num_experts = None;
    let e = desired_children(&tis, &[], &BuildConfig::default()).unwrap_err();
    assert_eq!(e.reason, "NumExpertsUnknown");
    let mut long = svcs[0].clone();
    long.metadata.name = Some("x".repeat(60));
    assert_eq!(
        desired_children(&long, &[], &BuildConfig::default())
            .unwrap_err()
            .reason,
        "NameTooLong"
    );
    let mut unsaved = svcs[0].clone();
    unsaved.metadata.uid = None;
    assert_eq!(
        desired_children(&unsaved, &[], &BuildConfig::default())
            .unwrap_err()
            .reason,
        "NotPersisted"
    );
}

#[test]
fn replicas_follow_scale_within_bounds() {
    let (svcs, _) = load_example("dense-cloud.yaml");
    let mut tis = svcs[0].clone();
    tis.spec.cloud.replicas = Some(3);
    let c = desired_children(&tis, &[], &BuildConfig::default()).unwrap();
    assert_eq!(
        c.workloads[0].deployment.spec.as_ref().unwrap().replicas,
        Some(3)
    );
    tis.spec.cloud.replicas = Some(40);
    assert_eq!(
        desired_children(&tis, &[], &BuildConfig::default())
            .unwrap()
            .workloads[0]
            .desired,
        4
    );
}

#[test]
fn status_reports_readiness_and_is_stable_when_nothing_changes() {
    let (svcs, nodes) = load_example("cloud-edge.yaml");
    let c = desired_children(
        &svcs[0],
        &facts(&nodes, EdgePhase::Ready),
        &BuildConfig::default(),
    )
    .unwrap();
    let t1 = Time(Timestamp::from_second(1000).unwrap());
    let t2 = Time(Timestamp::from_second(2000).unwrap());
    let mut observed = Observed::new();
    observed.insert("assistant-cloud".into(), (1, 0));
    let s1 = compute_status("assistant", Some(1), &c, &observed, None, &t1);
    assert_eq!(s1.cloud_ready.as_deref(), Some("0/1"));
    assert_eq!(s1.edge_ready.as_deref(), Some("0/2"));
    assert!(!crate::crd::is_true(&s1.conditions, "Ready"));
    assert!(crate::crd::is_true(&s1.conditions, "Progressing"));
    for d in [
        "assistant-cloud",
        "assistant-edge-berlin",
        "assistant-edge-paris",
    ] {
        observed.insert(d.into(), (1, 1));
    }
    let s2 = compute_status("assistant", Some(1), &c, &observed, Some(&s1), &t2);
    assert!(crate::crd::is_true(&s2.conditions, "Ready"));
    assert_eq!(s2.edge_ready.as_deref(), Some("2/2"));
    assert_eq!(
        s2.cloud
            .as_ref()
            .unwrap()
            .selector
            .as_deref()
            .map(|s| s.contains("app.kubernetes.io/instance=assistant")),
        Some(true)
    );
    // Same inputs later: identical status (so the controller writes nothing).
    let s3 = compute_status(
        "assistant",
        Some(1),
        &c,
        &observed,
        Some(&s2),
        &Time(Timestamp::from_second(3000).unwrap()),
    );
    assert_eq!(s2, s3);
    let bad = invalid_spec_status(
        Some(2),
        &SpecError {
            reason: "NameTooLong",
            message: "x".into(),
        },
        Some(&s3),
        &t2,
    );
    assert!(!crate::crd::is_true(&bad.conditions, "Ready"));
    assert!(crate::crd::is_true(&bad.conditions, "Degraded"));
    assert_eq!(bad.cloud, s3.cloud, "children status is kept");
}

#[test]
fn sites_not_assessed_yet_are_progressing_not_degraded() {
    let (svcs, nodes) = load_example("cloud-edge.yaml");
    let c = desired_children(
        &svcs[0],
        &facts(&nodes, EdgePhase::Unknown),
        &BuildConfig::default(),
    )
    .unwrap();
    let mut observed = Observed::new();
    observed.insert("assistant-cloud".into(), (1, 1));
    let t = Time(Timestamp::from_second(1000).unwrap());
    let s = compute_status("assistant", Some(1), &c, &observed, None, &t);
    let cond = |ty: &str| s.conditions.iter().find(|c| c.type_ == ty).unwrap();
    assert_eq!(cond("Degraded").status, "False");
    assert_eq!(cond("Progressing").reason, "EdgeSitesNotAssessed");
    assert!(
        cond("Progressing").message.contains("berlin, paris"),
        "{}",
        cond("Progressing").message
    );
    assert!(s.edge.iter().all(|e| e.phase == "Unknown"));
}

#[test]
fn autoscaled_replicas_from_status_win_while_autoscaling_is_enabled() {
    let (svcs, _) = load_example("dense-cloud.yaml");
    let mut tis = svcs[0].clone();
    tis.spec.cloud.replicas = Some(2);
    let mut status = crate::crd::InferenceServiceStatus::default();
    status
        .autoscaled_replicas
        .insert("llama-chat-cloud".into(), 3);
    tis.status = Some(status);
    let desired = |t: &InferenceService| {
        desired_children(t, &[], &BuildConfig::default())
            .unwrap()
            .workloads[0]
            .desired
    };
    assert_eq!(desired(&tis), 3, "the autoscaler's decision is applied");
    tis.status
        .as_mut()
        .unwrap()
        .autoscaled_replicas
        .insert("llama-chat-cloud".into(), 40);
    assert_eq!(desired(&tis), 4, "still clamped to maxReplicas");
    tis.spec.autoscaling.as_mut().unwrap().mode = crate::crd::AutoscalingMode::Advisory;
    assert_eq!(desired(&tis), 2, "an advisory autoscaler only recommends");
    tis.spec.autoscaling.as_mut().unwrap().mode = crate::crd::AutoscalingMode::Active;
    tis.spec.autoscaling.as_mut().unwrap().enabled = false;
    assert_eq!(desired(&tis), 2, "autoscaling off: the spec decides");
}

#[test]
fn an_autoscaled_placement_drives_the_plan_and_rolls_shards_that_must_load_experts() {
    use crate::crd::{PlacementStatus, ShardPlacement};
    let (svcs, _) = load_example("moe-experts.yaml");
    let mut tis = svcs[0].clone();
    let before = desired_children(&tis, &[], &BuildConfig::default()).unwrap();
    // Warming: shard 0 loads expert 1 before the router sends it there.
    let mut shards: Vec<ShardPlacement> = (0..4)
        .map(|k| ShardPlacement {
            shard: k,
            experts: vec![k, k + 4],
            held: vec![k, k + 4],
            target: None,
        })
        .collect();
    shards[0].held = vec![0, 1, 4];
    tis.status = Some(crate::crd::InferenceServiceStatus {
        placement: Some(PlacementStatus {
            version: 2,
            phase: "Warming".into(),
            shards: shards.clone(),
            message: None,
        }),
        ..Default::default()
    });
    let c = desired_children(&tis, &[], &BuildConfig::default()).unwrap();
    let plan = c.plan.as_ref().unwrap();
    assert_eq!(plan.version, 2);
    assert_eq!(plan.shards[0].experts, vec![0, 4], "routing unchanged");
    assert_eq!(plan.shards[0].held, vec![0, 1, 4]);
    assert!(plan.shards[1].held.is_empty(), "held only when it differs");
    let annotation = |c: &Children, k: usize| {
        c.workloads[k + 1]
            .pod_annotation(ANNOTATION_HELD_EXPERTS)
            .unwrap()
            .to_string()
    };
    assert_eq!(annotation(&before, 0), "0,4");
    assert_eq!(
        annotation(&c, 0),
        "0,1,4",
        "shard 0's pods roll to load expert 1"
    );
    assert_eq!(
        annotation(&c, 1),
        annotation(&before, 1),
        "shard 1 untouched"
    );
    // A placement that does not fit the spec (an expert missing) is ignored.
    shards[3].experts = vec![3];
    tis.status
        .as_mut()
        .unwrap()
        .placement
        .as_mut()
        .unwrap()
        .shards = shards;
    let c = desired_children(&tis, &[], &BuildConfig::default()).unwrap();
    assert_eq!(c.plan.unwrap().version, 1);
}

#[test]
fn an_edge_site_named_like_a_host_gets_a_valid_service_name_and_clashes_are_refused() {
    let (svcs, nodes) = load_example("cloud-edge.yaml");
    let mut sites = facts(&nodes, EdgePhase::Ready);
    sites[0].name = "store-1.example.com".into();
    let c = desired_children(&svcs[0], &sites, &BuildConfig::default()).unwrap();
    let (deps, services, _) = c.names();
    let name = format!(
        "{}-edge-store-1.example.com",
        svcs[0].metadata.name.as_deref().unwrap()
    );
    assert!(deps.contains(&name), "{deps:?}");
    assert!(services.contains(&name.replace('.', "-")), "{services:?}");
    // A second site whose name differs only by '.' and '-' would share that Service.
    sites[1].name = "store-1-example-com".into();
    sites[1].labels = sites[0].labels.clone();
    let err = desired_children(&svcs[0], &sites, &BuildConfig::default()).unwrap_err();
    assert_eq!(err.reason, "NameConflict", "{err:?}");
}

#[test]
fn an_exposed_tier_gets_its_service_type_and_annotations_and_shards_stay_internal() {
    let (svcs, nodes) = load_example("cloud-edge.yaml");
    let mut tis = svcs[0].clone();
    let exposure = crate::crd::ServiceExposure {
        type_: crate::crd::ServiceType::LoadBalancer,
        annotations: Some(BTreeMap::from([(
            "lb.example.com/scheme".into(),
            "internet".into(),
        )])),
    };
    tis.spec.cloud.service = Some(exposure.clone());
    tis.spec.edge.as_mut().unwrap().service = Some(crate::crd::ServiceExposure {
        type_: crate::crd::ServiceType::NodePort,
        annotations: None,
    });
    let c = desired_children(
        &tis,
        &facts(&nodes, EdgePhase::Ready),
        &BuildConfig::default(),
    )
    .unwrap();
    for w in &c.workloads {
        let svc = w.service.as_ref().unwrap();
        let ty = svc.spec.as_ref().unwrap().type_.as_deref();
        match w.kind {
            ChildKind::Cloud => {
                assert_eq!(ty, Some("LoadBalancer"));
                assert_eq!(
                    svc.metadata.annotations.as_ref().unwrap()["lb.example.com/scheme"],
                    "internet"
                );
            }
            ChildKind::Edge(_) => assert_eq!(ty, Some("NodePort")),
            _ => unreachable!("a dense example"),
        }
    }
    // Without the field the type is left to the API server's default (ClusterIP), so
    // existing Services are not rewritten.
    let c = desired_children(
        &svcs[0],
        &facts(&nodes, EdgePhase::Ready),
        &BuildConfig::default(),
    )
    .unwrap();
    assert!(
        c.workloads
            .iter()
            .all(|w| { service_spec(w).type_.is_none() })
    );
}

#[test]
fn an_edge_site_without_a_ready_replica_routes_its_service_to_the_cloud_tier() {
    let (svcs, nodes) = load_example("cloud-edge.yaml");
    let mut tis = svcs[0].clone();
    tis.spec.edge.as_mut().unwrap().min_replicas_per_node = 0;
    // The autoscaler put berlin to sleep; paris runs one replica.
    let mut status = crate::crd::InferenceServiceStatus::default();
    status
        .autoscaled_replicas
        .insert("assistant-edge-berlin".into(), 0);
    status
        .autoscaled_replicas
        .insert("assistant-edge-paris".into(), 1);
    tis.status = Some(status);
    let build = |tis: &InferenceService, ready: &dyn Fn(&str) -> Option<i32>| {
        let mut c = desired_children(
            tis,
            &facts(&nodes, EdgePhase::Ready),
            &BuildConfig::default(),
        )
        .unwrap();
        route_idle_sites(&mut c, "assistant", ready);
        c
    };
    let selector = |c: &Children, kind: &ChildKind| {
        let w = c.workloads.iter().find(|w| &w.kind == kind).unwrap();
        service_spec(w).selector.clone().unwrap()
    };
    let site = |n: &str| ChildKind::Edge(n.into());
    let cloud = ChildKind::Cloud.selector_labels("assistant");
    let own = |n: &str| site(n).selector_labels("assistant");

    // paris has a ready replica: its own pods; berlin is at zero: the cloud's.
    let c = build(&tis, &|d| (d == "assistant-edge-paris").then_some(1));
    assert_eq!(selector(&c, &site("berlin")), cloud);
    assert_eq!(selector(&c, &site("paris")), own("paris"));
    assert_eq!(c.sites_on_cloud, vec!["berlin".to_string()]);
    let berlin = c
        .workloads
        .iter()
        .find(|w| w.kind == site("berlin"))
        .unwrap();
    assert_eq!(berlin.desired, 0, "minReplicasPerNode 0 lets a site sleep");
    // The Service keeps its name, type and port: clients notice nothing.
    assert_eq!(
        berlin.service.as_ref().unwrap().metadata.name.as_deref(),
        Some("assistant-edge-berlin")
    );
    let status = compute_status(
        "assistant",
        Some(1),
        &c,
        &Observed::new(),
        None,
        &Time(Timestamp::UNIX_EPOCH),
    );
    let served: Vec<_> = status
        .edge
        .iter()
        .map(|e| (e.edge_node.as_str(), e.served_by.as_deref()))
        .collect();
    assert_eq!(
        served,
        vec![("berlin", Some("cloud")), ("paris", Some("edge"))]
    );

    // Waking up: berlin wants a replica, none is ready yet: still the cloud's.
    tis.status
        .as_mut()
        .unwrap()
        .autoscaled_replicas
        .insert("assistant-edge-berlin".into(), 1);
    let c = build(&tis, &|d| (d == "assistant-edge-paris").then_some(1));
    assert_eq!(selector(&c, &site("berlin")), cloud);
    // Its replica is ready: back to its own pods.
    let c = build(&tis, &|_| Some(1));
    assert_eq!(selector(&c, &site("berlin")), own("berlin"));
    assert!(c.sites_on_cloud.is_empty());
    // A site whose pods all failed serves from the cloud too, whatever its minimum.
    let c = build(&tis, &|d| (d == "assistant-edge-berlin").then_some(1));
    assert_eq!(selector(&c, &site("paris")), cloud);

    // The cloud workers count what reaches them through a site's Service.
    let cloud_w = c
        .workloads
        .iter()
        .find(|w| w.kind == ChildKind::Cloud)
        .unwrap();
    assert_eq!(
        env_of(cloud_w, "TIDAL_SITE_SERVICE_PREFIX").as_deref(),
        Some("assistant-edge-")
    );
    let (dense, _) = load_example("dense-cloud.yaml");
    let c = desired_children(&dense[0], &[], &BuildConfig::default()).unwrap();
    assert_eq!(env_of(&c.workloads[0], "TIDAL_SITE_SERVICE_PREFIX"), None);
}

#[test]
fn serving_settings_reach_every_engine_and_no_expert_shard() {
    let serving = crate::crd::ServingSpec {
        max_batch: Some(32),
        prefix_cache_mib: Some(0),
        prefix_block_tokens: None,
        prefill_chunk_tokens: Some(128),
    };
    let (mut svcs, nodes) = load_example("cloud-edge.yaml");
    svcs[0].spec.serving = Some(serving.clone());
    let c = desired_children(
        &svcs[0],
        &facts(&nodes, EdgePhase::Ready),
        &BuildConfig::default(),
    )
    .unwrap();
    assert!(
        c.workloads
            .iter()
            .any(|w| matches!(w.kind, ChildKind::Edge(_)))
    );
    for w in &c.workloads {
        assert_eq!(
            env_of(w, "TIDAL_MAX_BATCH").as_deref(),
            Some("32"),
            "{:?}",
            w.kind
        );
        // 0 is a setting (reuse off), not an absent one.
        assert_eq!(env_of(w, "TIDAL_PREFIX_CACHE_MIB").as_deref(), Some("0"));
        assert_eq!(env_of(w, "TIDAL_PREFIX_BLOCK_TOKENS"), None);
        assert_eq!(
            env_of(w, "TIDAL_PREFILL_CHUNK_TOKENS").as_deref(),
            Some("128")
        );
    }
    let (mut svcs, _) = load_example("moe-experts.yaml");
    svcs[0].spec.serving = Some(serving);
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    for w in &c.workloads {
        let shard = matches!(w.kind, ChildKind::ExpertShard(_));
        assert_eq!(
            env_of(w, "TIDAL_MAX_BATCH").is_some(),
            !shard,
            "{:?}",
            w.kind
        );
    }
    // Omitted: the worker's own defaults.
    svcs[0].spec.serving = None;
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    assert!(
        c.workloads
            .iter()
            .all(|w| env_of(w, "TIDAL_MAX_BATCH").is_none())
    );
}

#[test]
fn a_full_worker_granted_a_gpu_runs_its_model_there_and_a_router_stays_on_the_cpu() {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let gpu = |n: &str| {
        Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "nvidia.com/gpu".to_string(),
                Quantity(n.into()),
            )])),
            ..Default::default()
        })
    };
    let (mut svcs, _) = load_example("dense-cloud.yaml");
    let device = |s: &InferenceService| {
        let c = desired_children(s, &[], &BuildConfig::default()).unwrap();
        env_of(&c.workloads[0], "TIDAL_DEVICE")
    };
    assert_eq!(
        device(&svcs[0]).as_deref(),
        Some("cuda"),
        "the example asks for one"
    );
    svcs[0].spec.cloud.resources = None;
    assert_eq!(device(&svcs[0]), None, "no GPU asked for");
    svcs[0].spec.cloud.resources = gpu("0");
    assert_eq!(device(&svcs[0]), None, "zero GPUs");
    svcs[0].spec.cloud.resources = gpu("1");
    assert_eq!(device(&svcs[0]).as_deref(), Some("cuda"));

    let (mut svcs, _) = load_example("moe-experts.yaml");
    svcs[0].spec.cloud.resources = gpu("1");
    let c = desired_children(&svcs[0], &[], &BuildConfig::default()).unwrap();
    let router = c
        .workloads
        .iter()
        .find(|w| w.kind == ChildKind::Router)
        .unwrap();
    assert!(args(router).windows(2).any(|p| p == ["--role", "router"]));
    assert_eq!(env_of(router, "TIDAL_DEVICE"), None);
    for w in &c.workloads {
        assert_eq!(env_of(w, "TIDAL_DEVICE"), None, "{:?}", w.kind);
    }
}
