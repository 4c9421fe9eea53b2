//! The InferenceService controller against the real control plane: examples produce their
//! children, scale works, invalid specs are reported without touching children, unchanged
//! objects are not rewritten, a shard Service with a ClusterIP is replaced by a headless one,
//! and deleting a service garbage-collects its children.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tidal_e2e::{CONVERGE, RunningOperator, TestCtx, eventually, install_crds};
use tidal_operator::crd::InferenceService;

fn example(file: &str, kind_name: &str) -> InferenceService {
    let text =
        std::fs::read_to_string(tidal_e2e::repo_root().join("deploy/examples").join(file)).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] == "InferenceService" && v["metadata"]["name"] == kind_name {
            return serde_json::from_value(v).unwrap();
        }
    }
    panic!("{kind_name} not in {file}");
}

async fn child_versions(ctx: &TestCtx, service: &str) -> BTreeMap<String, String> {
    let lp = ListParams::default().labels(&format!("tidal.rs/inference-service={service}"));
    let mut out = BTreeMap::new();
    for d in ctx.api::<Deployment>().list(&lp).await.unwrap() {
        out.insert(
            format!("deploy/{}", d.name_any()),
            d.resource_version().unwrap(),
        );
    }
    for s in ctx.api::<Service>().list(&lp).await.unwrap() {
        out.insert(
            format!("svc/{}", s.name_any()),
            s.resource_version().unwrap(),
        );
    }
    for c in ctx.api::<ConfigMap>().list(&lp).await.unwrap() {
        out.insert(
            format!("cm/{}", c.name_any()),
            c.resource_version().unwrap(),
        );
    }
    out
}

async fn ready_condition(
    api: &Api<InferenceService>,
    name: &str,
) -> Option<(String, String, String)> {
    let t = api.get(name).await.ok()?;
    let c = t
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message))
}

#[tokio::test]
async fn dense_service_gets_children_scales_and_is_garbage_collected() {
    let Some(ctx) = TestCtx::new("tis-dense").await else {
        return;
    };
    install_crds(&ctx).await;
    let op = RunningOperator::start(&ctx);
    let api = ctx.api::<InferenceService>();
    api.create(
        &PostParams::default(),
        &example("dense-cloud.yaml", "llama-chat"),
    )
    .await
    .unwrap();

    let deps = ctx.api::<Deployment>();
    let d = eventually("cloud Deployment", CONVERGE, || async {
        deps.get("llama-chat-cloud")
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(d.owner_references()[0].kind, "InferenceService");
    ctx.api::<Service>()
        .get("llama-chat-cloud")
        .await
        .expect("cloud Service");

    // kwok runs the pod: the service turns Ready with 1/1.
    eventually("Ready=True with 1/1", CONVERGE, || async {
        let t = api.get("llama-chat").await.map_err(|e| e.to_string())?;
        let s = t.status.ok_or("no status")?;
        let ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready && s.cloud_ready.as_deref() == Some("1/1") {
            Ok(())
        } else {
            Err(format!("{:?} {:?}", s.cloud_ready, s.conditions))
        }
    })
    .await;

    // `kubectl scale` goes through the scale subresource to the Deployment.
    ctx.env.run(
        "kubectl",
        &[
            "scale",
            "-n",
            &ctx.namespace,
            "tis/llama-chat",
            "--replicas=3",
        ],
    );
    eventually("Deployment scaled to 3 and ready", CONVERGE, || async {
        let t = api.get("llama-chat").await.map_err(|e| e.to_string())?;
        let s = t.status.ok_or("no status")?;
        if s.cloud_ready.as_deref() == Some("3/3") {
            Ok(())
        } else {
            Err(format!("{:?}", s.cloud_ready))
        }
    })
    .await;
    let scale = ctx.env.run(
        "kubectl",
        &[
            "get",
            "-n",
            &ctx.namespace,
            "--raw",
            &format!(
                "/apis/tidal.rs/v1alpha1/namespaces/{}/inferenceservices/llama-chat/scale",
                ctx.namespace
            ),
        ],
    );
    let scale: serde_json::Value = serde_json::from_str(&scale).unwrap();
    assert_eq!(scale["status"]["replicas"], 3);
    assert!(
        scale["status"]["selector"]
            .as_str()
            .unwrap()
            .contains("app.kubernetes.io/instance=llama-chat")
    );
    let events = ctx
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("DesiredReplicas")
                && e.message.as_deref().is_some_and(|m| m.contains("1 -> 3"))),
        "a scaling Event is recorded: {:?}",
        events
            .items
            .iter()
            .map(|e| (e.reason.clone(), e.message.clone()))
            .collect::<Vec<_>>()
    );
    let printed = ctx
        .env
        .run("kubectl", &["get", "-n", &ctx.namespace, "tis"]);
    assert!(
        printed.contains("CLOUD") && printed.contains("3/3"),
        "{printed}"
    );

    // Deleting the service removes every child (owner references + the real GC).
    api.delete("llama-chat", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually("children garbage-collected", CONVERGE, || async {
        let left = child_versions(&ctx, "llama-chat").await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn moe_shards_prune_and_invalid_specs_leave_children_alone_and_restart_writes_nothing() {
    let Some(ctx) = TestCtx::new("tis-moe").await else {
        return;
    };
    install_crds(&ctx).await;
    let op = RunningOperator::start(&ctx);
    let api = ctx.api::<InferenceService>();
    api.create(
        &PostParams::default(),
        &example("moe-experts.yaml", "mixtral"),
    )
    .await
    .unwrap();

    let expected = |shards: u32| {
        let mut names: Vec<String> = (0..shards)
            .map(|k| format!("deploy/mixtral-experts-{k}"))
            .collect();
        names.extend((0..shards).map(|k| format!("svc/mixtral-experts-{k}")));
        names.extend([
            "cm/mixtral-placement".into(),
            "deploy/mixtral-router".into(),
            "svc/mixtral-router".into(),
        ]);
        names.sort();
        names
    };
    eventually(
        "router, 4 shards and the placement plan",
        CONVERGE,
        || async {
            let have: Vec<String> = child_versions(&ctx, "mixtral").await.into_keys().collect();
            if have == expected(4) {
                Ok(())
            } else {
                Err(format!("{have:?}"))
            }
        },
    )
    .await;
    let cm = ctx
        .api::<ConfigMap>()
        .get("mixtral-placement")
        .await
        .unwrap();
    let plan: serde_json::Value = serde_json::from_str(&cm.data.unwrap()["plan.json"]).unwrap();
    assert_eq!(plan["numExperts"], 8);
    assert_eq!(plan["shards"].as_array().unwrap().len(), 4);
    eventually("experts 4/4 ready", CONVERGE, || async {
        let s = api
            .get("mixtral")
            .await
            .map_err(|e| e.to_string())?
            .status
            .ok_or("no status")?;
        if s.experts_ready.as_deref() == Some("4/4") {
            Ok(())
        } else {
            Err(format!("{:?}", s.experts_ready))
        }
    })
    .await;

    // Fewer shards: the extra Deployments and Services are pruned, the plan rewritten.
    let pp = PatchParams::default();
    api.patch(
        "mixtral",
        &pp,
        &Patch::Merge(json!({"spec": {"cloud": {"experts": {"shards": 2}}}})),
    )
    .await
    .unwrap();
    eventually("shards pruned to 2", CONVERGE, || async {
        let have: Vec<String> = child_versions(&ctx, "mixtral").await.into_keys().collect();
        if have == expected(2) {
            Ok(())
        } else {
            Err(format!("{have:?}"))
        }
    })
    .await;
    eventually("status settled", CONVERGE, || async {
        let t = api.get("mixtral").await.map_err(|e| e.to_string())?;
        let s = t.status.ok_or("no status")?;
        let ok = s.observed_generation == t.metadata.generation
            && s.experts_ready.as_deref() == Some("2/2")
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        if ok {
            Ok(())
        } else {
            Err(format!("{:?} {:?}", s.experts_ready, s.conditions))
        }
    })
    .await;

    // Restart: a new operator reconciles everything and changes nothing. First let the
    // Deployment controller finish its own status updates (they change resourceVersions too).
    let before = eventually("children settle", CONVERGE, || async {
        let a = child_versions(&ctx, "mixtral").await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let b = child_versions(&ctx, "mixtral").await;
        if a == b {
            Ok(b)
        } else {
            Err(format!("{a:?} -> {b:?}"))
        }
    })
    .await;
    let tis_before = api.get("mixtral").await.unwrap().resource_version();
    op.stop().await;
    let op = RunningOperator::start(&ctx);
    eventually("the new operator reconciled", CONVERGE, || async {
        if op.reconciles() >= 1 {
            Ok(())
        } else {
            Err("no reconcile yet".to_string())
        }
    })
    .await;
    assert_eq!(
        child_versions(&ctx, "mixtral").await,
        before,
        "no child was rewritten"
    );
    assert_eq!(
        api.get("mixtral").await.unwrap().resource_version(),
        tis_before,
        "status not rewritten"
    );

    // A spec the schema cannot reject (numExperts unknown): a condition, children untouched.
    api.patch(
        "mixtral",
        &pp,
        &Patch::Merge(json!({"spec": {"model": {"numExperts": null}}})),
    )
    .await
    .unwrap();
    let (status, reason, message) =
        eventually("Ready=False NumExpertsUnknown", CONVERGE, || async {
            match ready_condition(&api, "mixtral").await {
                Some(c) if c.1 == "NumExpertsUnknown" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    assert_eq!(status, "False");
    assert!(message.contains("model.numExperts"), "{message}");
    let _ = reason;
    assert_eq!(
        child_versions(&ctx, "mixtral").await,
        before,
        "children left alone"
    );

    // An older operator made shard Services with a ClusterIP. spec.clusterIP cannot change, so
    // the operator replaces such a Service with a headless one (the router then balances
    // over the shard's pods itself).
    api.patch(
        "mixtral",
        &pp,
        &Patch::Merge(json!({"spec": {"model": {"numExperts": 8}}})),
    )
    .await
    .unwrap();
    op.stop().await;
    let svcs = ctx.api::<Service>();
    let cluster_ip = |s: &Service| s.spec.as_ref().and_then(|s| s.cluster_ip.clone());
    let headless = svcs.get("mixtral-experts-1").await.unwrap();
    assert_eq!(cluster_ip(&headless).as_deref(), Some("None"));
    svcs.delete("mixtral-experts-1", &DeleteParams::default())
        .await
        .unwrap();
    let old = Service {
        metadata: kube::api::ObjectMeta {
            name: headless.metadata.name.clone(),
            labels: headless.metadata.labels.clone(),
            annotations: headless.metadata.annotations.clone(),
            owner_references: headless.metadata.owner_references.clone(),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
            selector: headless.spec.as_ref().and_then(|s| s.selector.clone()),
            ports: headless.spec.as_ref().and_then(|s| s.ports.clone()),
            ..Default::default()
        }),
        status: None,
    };
    let old = eventually("the old-style Service created", CONVERGE, || async {
        svcs.create(&PostParams::default(), &old)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let old_ip = cluster_ip(&old).expect("an address");
    assert_ne!(old_ip, "None");
    let op = RunningOperator::start(&ctx);
    eventually(
        "shard Service replaced by a headless one",
        CONVERGE,
        || async {
            let s = svcs
                .get("mixtral-experts-1")
                .await
                .map_err(|e| e.to_string())?;
            match cluster_ip(&s).as_deref() {
                Some("None") if s.uid() != old.uid() => Ok(()),
                other => Err(format!("clusterIP {other:?}")),
            }
        },
    )
    .await;
    op.stop().await;
}
