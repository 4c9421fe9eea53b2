//! The EdgeNode controller against the real control plane: kwok heartbeats fake Nodes through
//! their Leases; the controller (run in-process) turns that into phases, conditions, Node
//! labels, replica counts and Events.
//!
//! kwok v0.8 keeps renewing a Lease after the Node loses its `kwok.x-k8s.io/node` annotation
//! (its annotation filter drops the update event, so nothing un-manages the Node). What does
//! stop it is another holder: kwok only renews a Lease it holds or one that has expired. So a
//! test "cuts the site off" by taking the Lease over (holder `tidal-e2e-partition`, an hour's
//! duration, renewTime untouched) and "reconnects" it by handing it back to kwok with a fresh
//! renewal, after which kwok renews it again on its own.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tidal_e2e::{
    CONVERGE, LocalEnv, TestCtx, assert_phase_changed_once_each_way, edge_event_reasons,
    eventually, install_crds,
};
use tidal_operator::children::BuildConfig;
use tidal_operator::controller::Context;
use tidal_operator::crd::{EdgeNode, EdgeNodeStatus, EdgePhase};
use tidal_operator::metrics::Metrics;

/// kwok renews Leases every 10 s (a quarter of their 40 s duration), so the Degraded threshold
/// (a third of this) must exceed 10 s or a healthy node would flap between renewals.
const HEARTBEAT_TIMEOUT: u64 = 36;
const PARTITION_HOLDER: &str = "tidal-e2e-partition";

/// Deletes what a test created (cluster-scoped objects outlive the test namespace), also when
/// the test panicked.
struct Cleanup {
    env: LocalEnv,
    objects: Vec<(&'static str, String)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (kind, name) in self.objects.iter().rev() {
            let _ = self
                .env
                .command("kubectl")
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .output();
            if *kind == "edgenode" {
                // The controller may be gone before its node-label finalizer runs.
                let clear = r#"{"metadata":{"finalizers":null}}"#;
                let _ = self
                    .env
                    .command("kubectl")
                    .args(["patch", "edgenode", name, "--type=merge", "-p", clear])
                    .output();
            }
        }
    }
}

fn suffix() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Starts the controller once for this test binary, on a runtime of its own that outlives
/// each test's runtime (one controller: no duplicate writes or Events).
fn start_controller(env: &LocalEnv) {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let env = env.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("controller runtime");
            rt.block_on(async {
                let context = Context::new(
                    tidal_e2e::client(&env).await,
                    BuildConfig::default(),
                    Metrics::shared(),
                    Some("e2e".into()),
                );
                tidal_e2e::EdgeNodeController::run(context, std::future::pending()).await;
            });
        });
    });
}

/// A Node kwok manages, tainted so that no other test's pods land on it.
async fn create_fake_node(ctx: &TestCtx, name: &str, run: &str) {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"tidal.rs/e2e": "true", "tidal.rs/e2e-run": run, "kubernetes.io/hostname": name},
        },
        "spec": {"taints": [{"key": "tidal.rs/e2e", "value": "edge-node", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"cpu": "2", "memory": "2Gi", "pods": "10"},
            "capacity": {"cpu": "2", "memory": "2Gi", "pods": "10"},
        },
    }))
    .expect("valid node");
    Api::<Node>::all(ctx.client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("create fake node");
}

async fn create_edge_node(ctx: &TestCtx, name: &str, spec: serde_json::Value) {
    let en: EdgeNode = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1",
        "kind": "EdgeNode",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid EdgeNode");
    Api::<EdgeNode>::all(ctx.client.clone())
        .create(&PostParams::default(), &en)
        .await
        .expect("create EdgeNode");
}

/// Waits until the EdgeNode's status satisfies `check` (which explains what is missing).
async fn wait_status(
    ctx: &TestCtx,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&EdgeNodeStatus) -> Result<(), String>,
) -> EdgeNodeStatus {
    let api = Api::<EdgeNode>::all(ctx.client.clone());
    eventually(&format!("EdgeNode {name}: {what}"), timeout, || async {
        let en = api.get(name).await.map_err(|e| e.to_string())?;
        let status = en.status.ok_or("no status yet")?;
        check(&status).map_err(|e| format!("{e}; status: {status:?}"))?;
        Ok(status)
    })
    .await
}

fn phase_is(want: EdgePhase) -> impl Fn(&EdgeNodeStatus) -> Result<(), String> {
    move |s| {
        if s.phase == want {
            Ok(())
        } else {
            Err(format!("phase {:?}, want {want:?}", s.phase))
        }
    }
}

fn condition<'a>(
    s: &'a EdgeNodeStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

fn renew_time(lease: &Lease) -> Option<Timestamp> {
    lease.spec.as_ref()?.renew_time.as_ref().map(|t| t.0)
}

/// The controller running, a kwok Node and an EdgeNode for it (site `e2e-site`, the test's
/// heartbeat timeout, plus `extra` spec fields): the Node's and the EdgeNode's names, and
/// what deletes both.
async fn fake_site(
    ctx: &TestCtx,
    tag: &str,
    extra: serde_json::Value,
) -> (String, String, Cleanup) {
    install_crds(ctx).await;
    start_controller(&ctx.env);
    let id = suffix();
    let node_name = format!("e2e-edge-{tag}-{id}");
    let en_name = format!("e2e-{tag}-{id}");
    let cleanup = Cleanup {
        env: ctx.env.clone(),
        objects: vec![("node", node_name.clone()), ("edgenode", en_name.clone())],
    };
    create_fake_node(ctx, &node_name, &id).await;
    let mut spec = json!({"nodeName": node_name, "site": "e2e-site",
        "offlinePolicy": {"heartbeatTimeoutSeconds": HEARTBEAT_TIMEOUT}});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    create_edge_node(ctx, &en_name, spec).await;
    (node_name, en_name, cleanup)
}

/// Takes a Node's Lease from kwok, as a site losing its uplink stops renewing it; returns
/// kwok's holder identity and the last renewal.
async fn cut_off(leases: &Api<Lease>, node: &str) -> (String, Timestamp) {
    let kwok_holder = leases
        .get(node)
        .await
        .expect("kwok created the Node's Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("kwok holds the Lease");
    let taken = leases
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"holderIdentity": PARTITION_HOLDER, "leaseDurationSeconds": 3600}}),
            ),
        )
        .await
        .expect("take the Lease over");
    (kwok_holder, renew_time(&taken).expect("renewed before"))
}

/// Hands the Lease back to kwok with a fresh renewal; returns its time.
async fn reconnect(leases: &Api<Lease>, node: &str, kwok_holder: &str) -> Timestamp {
    let resumed_at = Timestamp::now();
    leases
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "holderIdentity": kwok_holder,
                "leaseDurationSeconds": 40,
                "renewTime": MicroTime(resumed_at),
            }})),
        )
        .await
        .expect("hand the Lease back");
    resumed_at
}

#[tokio::test]
async fn five_cuts_in_a_row_change_the_phase_once_each_way() {
    let Some(ctx) = TestCtx::new("edgenode-flap").await else {
        return;
    };
    let (node_name, en_name, _cleanup) = fake_site(&ctx, "flap", json!({})).await;
    wait_status(
        &ctx,
        &en_name,
        "Ready",
        CONVERGE,
        phase_is(EdgePhase::Ready),
    )
    .await;
    let leases = Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease");
    for round in 1..=5 {
        let (kwok_holder, _) = cut_off(&leases, &node_name).await;
        wait_status(
            &ctx,
            &en_name,
            &format!("Offline, cut {round}"),
            Duration::from_secs(HEARTBEAT_TIMEOUT + 20),
            phase_is(EdgePhase::Offline),
        )
        .await;
        reconnect(&leases, &node_name, &kwok_holder).await;
        wait_status(
            &ctx,
            &en_name,
            &format!("Ready, restore {round}"),
            CONVERGE,
            phase_is(EdgePhase::Ready),
        )
        .await;
    }
    let (ready, degraded) = assert_phase_changed_once_each_way(&ctx.client, &en_name, 5).await;
    eprintln!(
        "[edge-flap] 5 cuts and restores: 5 Offline, {ready} Ready, {degraded} Degraded Events, \
         nothing else"
    );
}

#[tokio::test]
async fn heartbeat_loss_turns_offline_and_recovery_turns_ready() {
    let Some(ctx) = TestCtx::new("edgenode-hb").await else {
        return;
    };
    let started = Instant::now();
    let (node_name, en_name, _cleanup) =
        fake_site(&ctx, "hb", json!({"region": "e2e-region"})).await;

    // Ready, with kwok's heartbeat, and the Node labelled for placement.
    let ready = wait_status(&ctx, &en_name, "Ready", CONVERGE, |s| {
        phase_is(EdgePhase::Ready)(s)?;
        s.last_heartbeat.as_ref().ok_or("no lastHeartbeat")?;
        Ok(())
    })
    .await;
    assert_eq!(ready.node_name.as_deref(), Some(node_name.as_str()));
    let hb = condition(&ready, "Heartbeat").expect("Heartbeat condition");
    assert_eq!(
        (hb.status.as_str(), hb.reason.as_str()),
        ("True", "LeaseRenewed")
    );
    let nodes = Api::<Node>::all(ctx.client.clone());
    let node = eventually("Node labelled", CONVERGE, || async {
        let n = nodes.get(&node_name).await.map_err(|e| e.to_string())?;
        let want = BTreeMap::from([
            ("tidal.rs/edge-node", en_name.as_str()),
            ("tidal.rs/site", "e2e-site"),
            ("topology.kubernetes.io/region", "e2e-region"),
        ]);
        for (k, v) in want {
            if n.labels().get(k).map(String::as_str) != Some(v) {
                return Err(format!("label {k} is {:?}", n.labels().get(k)));
            }
        }
        Ok(n)
    })
    .await;
    // The label apply left kwok's annotation, labels and status alone.
    assert_eq!(
        node.annotations()
            .get("kwok.x-k8s.io/node")
            .map(String::as_str),
        Some("fake")
    );
    assert_eq!(
        node.labels().get("tidal.rs/e2e").map(String::as_str),
        Some("true")
    );
    let node_ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    assert_eq!(node_ready.as_deref(), Some("True"));

    // Cut the site off: take the Lease from kwok.
    let leases = Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease");
    let (kwok_holder, last_renewal) = cut_off(&leases, &node_name).await;

    let offline = wait_status(
        &ctx,
        &en_name,
        "Offline after the heartbeat timeout",
        Duration::from_secs(HEARTBEAT_TIMEOUT + 20),
        phase_is(EdgePhase::Offline),
    )
    .await;
    let hb = condition(&offline, "Heartbeat").expect("Heartbeat condition");
    assert_eq!(
        (hb.status.as_str(), hb.reason.as_str()),
        ("False", "HeartbeatExpired")
    );
    assert_eq!(
        renew_time(&leases.get(&node_name).await.expect("lease")),
        Some(last_renewal),
        "kwok must not have renewed a Lease it does not hold"
    );

    // Reconnect: hand the Lease back to kwok with a fresh renewal.
    let resumed_at = reconnect(&leases, &node_name, &kwok_holder).await;
    let back = wait_status(
        &ctx,
        &en_name,
        "Ready again",
        CONVERGE,
        phase_is(EdgePhase::Ready),
    )
    .await;
    assert!(
        back.last_heartbeat.as_ref().map(|t| t.0.as_second()) >= Some(resumed_at.as_second()),
        "lastHeartbeat follows the renewal: {:?}",
        back.last_heartbeat
    );
    // kwok heartbeats again by itself.
    eventually("kwok renews the Lease again", CONVERGE, || async {
        let l = leases.get(&node_name).await.map_err(|e| e.to_string())?;
        match renew_time(&l) {
            Some(t) if t > resumed_at => Ok(()),
            t => Err(format!("renewTime {t:?}")),
        }
    })
    .await;

    // Each phase change is an Event on the EdgeNode.
    eventually("phase Events", CONVERGE, || async {
        let reasons = edge_event_reasons(&ctx.client, &en_name).await?;
        if reasons.iter().any(|r| r == "Offline") && reasons.iter().any(|r| r == "Ready") {
            Ok(())
        } else {
            Err(format!("event reasons {reasons:?}"))
        }
    })
    .await;

    // Deleting the EdgeNode takes the operator's placement labels off its Node (finalizer).
    let nodes = Api::<Node>::all(ctx.client.clone());
    let labelled = nodes.get(&node_name).await.unwrap();
    assert_eq!(
        labelled.labels().get("tidal.rs/edge-node"),
        Some(&en_name),
        "the Node carries the placement label while the EdgeNode exists"
    );
    Api::<EdgeNode>::all(ctx.client.clone())
        .delete(&en_name, &Default::default())
        .await
        .unwrap();
    eventually(
        "the EdgeNode is gone and its Node unlabelled",
        CONVERGE,
        || async {
            let gone = Api::<EdgeNode>::all(ctx.client.clone())
                .get_opt(&en_name)
                .await
                .map_err(|e| e.to_string())?
                .is_none();
            let n = nodes.get(&node_name).await.map_err(|e| e.to_string())?;
            let left: Vec<&String> = n
                .labels()
                .keys()
                .filter(|k| {
                    k.starts_with("tidal.rs/edge-node")
                        || k.as_str() == "tidal.rs/site"
                        || k.as_str() == "topology.kubernetes.io/region"
                })
                .collect();
            if gone && left.is_empty() {
                Ok(())
            } else {
                Err(format!("EdgeNode gone: {gone}, labels left: {left:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        nodes
            .get(&node_name)
            .await
            .unwrap()
            .labels()
            .get("tidal.rs/e2e-run"),
        labelled.labels().get("tidal.rs/e2e-run"),
        "labels the operator does not own are kept"
    );

    eprintln!(
        "heartbeat_loss_turns_offline_and_recovery_turns_ready took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cordoned_missing_and_ambiguous_nodes_report_why() {
    let Some(ctx) = TestCtx::new("edgenode-why").await else {
        return;
    };
    let started = Instant::now();
    install_crds(&ctx).await;
    start_controller(&ctx.env);
    let id = suffix();
    let cordoned_node = format!("e2e-edge-c-{id}");
    let late_node = format!("e2e-edge-late-{id}");
    let duplicate = format!("e2e-d-{id}");
    let (cordoned, missing, ambiguous) = (
        format!("e2e-c-{id}"),
        format!("e2e-m-{id}"),
        format!("e2e-a-{id}"),
    );
    let _cleanup = Cleanup {
        env: ctx.env.clone(),
        objects: vec![
            ("node", cordoned_node.clone()),
            ("node", late_node.clone()),
            ("edgenode", cordoned.clone()),
            ("edgenode", missing.clone()),
            ("edgenode", ambiguous.clone()),
            ("edgenode", duplicate.clone()),
        ],
    };
    create_fake_node(&ctx, &cordoned_node, &id).await;
    let timeout = json!({"heartbeatTimeoutSeconds": HEARTBEAT_TIMEOUT});
    create_edge_node(
        &ctx,
        &cordoned,
        json!({"nodeName": cordoned_node, "site": "c", "cordoned": true, "offlinePolicy": timeout}),
    )
    .await;
    create_edge_node(
        &ctx,
        &missing,
        json!({"nodeName": late_node, "site": "m", "offlinePolicy": timeout}),
    )
    .await;
    let s = wait_status(
        &ctx,
        &cordoned,
        "Cordoned",
        CONVERGE,
        phase_is(EdgePhase::Cordoned),
    )
    .await;
    let ready = condition(&s, "Ready").expect("Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Cordoned")
    );
    assert_eq!(s.node_name.as_deref(), Some(cordoned_node.as_str()));

    // A second EdgeNode naming the same Node is told so, and does not take the Node's label.
    create_edge_node(
        &ctx,
        &duplicate,
        json!({"nodeName": cordoned_node, "site": "d", "offlinePolicy": timeout}),
    )
    .await;
    let s = wait_status(&ctx, &duplicate, "Offline: Node taken", CONVERGE, |s| {
        phase_is(EdgePhase::Offline)(s)?;
        let r = condition(s, "Ready").ok_or("no Ready condition")?;
        if r.reason == "NodeClaimedByOtherEdgeNode" {
            Ok(())
        } else {
            Err(format!("reason {}", r.reason))
        }
    })
    .await;
    assert!(
        condition(&s, "Ready")
            .expect("Ready")
            .message
            .contains(&cordoned),
        "names the holder"
    );
    let node = Api::<Node>::all(ctx.client.clone())
        .get(&cordoned_node)
        .await
        .expect("node");
    assert_eq!(
        node.labels().get("tidal.rs/edge-node"),
        Some(&cordoned),
        "the first EdgeNode keeps the Node"
    );

    let s = wait_status(
        &ctx,
        &missing,
        "Offline: Node missing",
        CONVERGE,
        phase_is(EdgePhase::Offline),
    )
    .await;
    let hb = condition(&s, "Heartbeat").expect("Heartbeat condition");
    assert_eq!(
        (hb.status.as_str(), hb.reason.as_str()),
        ("False", "NodeNotFound")
    );
    assert!(
        hb.message.contains(&late_node),
        "message names the Node: {}",
        hb.message
    );
    assert_eq!(s.node_name, None);

    // An edge Deployment placed on the EdgeNode is counted, per InferenceService.
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "svc-edge", "labels": {
            "tidal.rs/tier": "edge", "tidal.rs/edge-node": missing, "tidal.rs/inference-service": "svc"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "svc-edge"}},
            "template": {
                "metadata": {"labels": {"app": "svc-edge"}},
                "spec": {
                    "nodeSelector": {"tidal.rs/e2e-nowhere": "true"},
                    "containers": [{"name": "worker", "image": "tidal/worker:test"}]
                }
            }
        }
    }))
    .expect("valid deployment");
    ctx.api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create edge deployment");
    let s = wait_status(&ctx, &missing, "replicas counted", CONVERGE, |s| {
        if s.replicas == 2 {
            Ok(())
        } else {
            Err(format!("replicas {}", s.replicas))
        }
    })
    .await;
    assert_eq!(s.services.len(), 1);
    assert_eq!(
        (
            s.services[0].namespace.as_str(),
            s.services[0].name.as_str(),
            s.services[0].replicas
        ),
        (ctx.namespace.as_str(), "svc", 2)
    );

    // The Node appearing is noticed through the Node watch.
    create_fake_node(&ctx, &late_node, &id).await;
    let s = wait_status(
        &ctx,
        &missing,
        "Ready once its Node exists",
        CONVERGE,
        phase_is(EdgePhase::Ready),
    )
    .await;
    assert_eq!(s.node_name.as_deref(), Some(late_node.as_str()));

    // A selector matching both of this run's Nodes: a misconfiguration, reported as such.
    // (Created only now, so that it never resolves to one Node and labels it.)
    create_edge_node(
        &ctx,
        &ambiguous,
        json!({"nodeSelector": {"tidal.rs/e2e-run": id}, "site": "a", "offlinePolicy": timeout}),
    )
    .await;
    let s = wait_status(&ctx, &ambiguous, "ambiguous selector", CONVERGE, |s| {
        phase_is(EdgePhase::Offline)(s)?;
        let hb = condition(s, "Heartbeat").ok_or("no Heartbeat condition")?;
        if hb.reason == "NodeSelectorAmbiguous" {
            Ok(())
        } else {
            Err(format!("reason {}", hb.reason))
        }
    })
    .await;
    let hb = condition(&s, "Heartbeat").expect("Heartbeat condition");
    assert!(
        hb.message.contains(&cordoned_node) && hb.message.contains(&late_node),
        "message names the matching Nodes: {}",
        hb.message
    );

    // Uncordoning returns the site to service.
    Api::<EdgeNode>::all(ctx.client.clone())
        .patch(
            &cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cordoned": false}})),
        )
        .await
        .expect("uncordon");
    wait_status(
        &ctx,
        &cordoned,
        "Ready after uncordon",
        CONVERGE,
        phase_is(EdgePhase::Ready),
    )
    .await;
    eprintln!(
        "cordoned_missing_and_ambiguous_nodes_report_why took {:?}",
        started.elapsed()
    );
}
