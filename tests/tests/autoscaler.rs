//! The autoscaler end to end: real `tidal-worker` processes under load, a real Prometheus
//! scraping them, and the operator (controller + autoscaler loop) on the local control plane.
//! A load step raises the Deployment's replicas; with Prometheus stopped nothing scales down
//! and `MetricsAvailable` turns False; once metrics return and the load is gone, replicas fall
//! after the scale-down stabilisation window. Under load, the decision sizes queueing headroom
//! from the TTFT the workers measure. The service starts in `Advisory` mode: the load step is
//! recommended (status, Event, metric) and no replica changes, until it is switched to `Active`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tidal_e2e::processes::{
    Prometheus, PrometheusConfig, completion_load, start_worker, write_fixture,
};
use tidal_e2e::{CONVERGE, RunningOperator, TestCtx, eventually, install_crds};
use tidal_operator::crd::InferenceService;

const SERVICE: &str = "chat";
const DEPLOYMENT: &str = "chat-cloud";

async fn replicas(api: &Api<Deployment>) -> Result<i32, String> {
    let d = api.get(DEPLOYMENT).await.map_err(|e| e.to_string())?;
    Ok(d.spec.and_then(|s| s.replicas).unwrap_or(0))
}

/// (status, reason) of the MetricsAvailable condition, and the last decision's time + reason.
async fn autoscaler_state(
    api: &Api<InferenceService>,
) -> Result<(String, String, String, String), String> {
    let t = api.get(SERVICE).await.map_err(|e| e.to_string())?;
    let st = t.status.ok_or("no status")?;
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "MetricsAvailable")
        .ok_or("no MetricsAvailable condition")?;
    let d = st.last_decision.ok_or("no lastDecision")?;
    Ok((
        c.status.clone(),
        c.reason.clone(),
        d.time.map(|t| t.0.to_string()).unwrap_or_default(),
        d.reason,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_step_scales_up_missing_metrics_hold_and_idle_scales_down() {
    let Some(ctx) = TestCtx::new("autoscaler").await else {
        return;
    };
    install_crds(&ctx).await;

    eprintln!("[autoscaler] building the worker and a fixture");
    // Two real workers on a tiny checkpoint, scraped as the cloud tier of `chat`.
    let model = tempfile::tempdir().unwrap();
    write_fixture(model.path(), "llama");
    eprintln!("[autoscaler] starting workers");
    let w1 = start_worker(model.path(), SERVICE).await;
    let w2 = start_worker(model.path(), SERVICE).await;
    let labels = json!({
        "namespace": ctx.namespace,
        "tidal_inference_service": SERVICE,
        "tidal_tier": "cloud",
        "tidal_role": "full",
    });
    eprintln!("[autoscaler] starting prometheus");
    let mut prom = Prometheus::start(&[(
        vec![
            format!("127.0.0.1:{}", w1.port),
            format!("127.0.0.1:{}", w2.port),
        ],
        labels,
    )])
    .await;

    eprintln!("[autoscaler] starting the operator");
    let operator = RunningOperator::start_autoscaling(&ctx);
    let tis: InferenceService = serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": SERVICE, "namespace": ctx.namespace},
        "spec": {
            "model": {"uri": model.path().display().to_string(), "architecture": "llama"},
            "cloud": {"minReplicas": 1, "maxReplicas": 6,
                      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
            "autoscaling": {
                // Trialled first: decisions published, not applied (switched to Active below).
                "mode": "Advisory",
                "prometheusUrl": prom.url(),
                "intervalSeconds": 5,
                "targetRpsPerReplica": 1.0,
                "slo": {"ttftP95Ms": 1000},
                "forecast": {"method": "Naive", "horizonSeconds": 10},
                "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 4},
                "scaleDown": {"stabilizationWindowSeconds": 20, "maxStep": 6},
            }
        }
    }))
    .unwrap();
    let services = ctx.api::<InferenceService>();
    services.create(&PostParams::default(), &tis).await.unwrap();
    let deps = ctx.api::<Deployment>();
    eventually("the cloud Deployment at minReplicas", CONVERGE, || async {
        match replicas(&deps).await? {
            1 => Ok(()),
            r => Err(format!("replicas {r}")),
        }
    })
    .await;
    eventually("metrics available while idle", CONVERGE, || async {
        let (status, reason, _, _) = autoscaler_state(&services).await?;
        (status == "True").then_some(()).ok_or(reason)
    })
    .await;

    eprintln!("[autoscaler] load step");
    // A load step: 4 requests/s against 1 rps per replica.
    let stop = Arc::new(AtomicBool::new(false));
    let generator = completion_load(
        vec![w1.base_url(), w2.base_url()],
        SERVICE,
        4.0,
        4 * 120,
        stop.clone(),
    );
    // Advisory: the load step is recommended (status, Event, metrics), not applied.
    let recommended = eventually(
        "an advisory recommendation of >= 3 replicas",
        CONVERGE,
        || async {
            let st = services
                .get(SERVICE)
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            match st.recommended_replicas.get(DEPLOYMENT) {
                Some(&r) if r >= 3 => Ok(r),
                r => Err(format!("recommended {r:?}")),
            }
        },
    )
    .await;
    let (_, _, _, why) = autoscaler_state(&services).await.unwrap();
    assert!(why.starts_with("advisory, not applied: cloud"), "{why}");
    let events: Api<Event> = ctx.api();
    let announced = eventually("a Recommendation event", CONVERGE, || async {
        events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Recommendation"))
            .and_then(|e| e.message)
            .ok_or("no Recommendation event".to_string())
    })
    .await;
    assert!(
        announced.starts_with("cloud 1 -> ") && announced.contains("(advisory, not applied)"),
        "{announced}"
    );
    let rendered = operator.metrics.render();
    assert!(
        rendered
            .lines()
            .any(|l| l.starts_with("tidal_autoscaler_advisory{")
                && l.contains(&format!("inference_service=\"{SERVICE}\""))
                && l.ends_with(" 1")),
        "the advisory gauge:\n{rendered}"
    );
    assert_eq!(
        replicas(&deps).await.unwrap(),
        1,
        "an advisory autoscaler changes no replicas"
    );
    let status = services.get(SERVICE).await.unwrap().status.unwrap();
    assert!(status.autoscaled_replicas.is_empty(), "{status:?}");
    eprintln!("[autoscaler] advisory: recommended {recommended}, replicas stayed 1: {announced}");

    // Trusted: the same loop (its history kept) now applies its decisions.
    services
        .patch(
            SERVICE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling": {"mode": "Active"}}})),
        )
        .await
        .unwrap();
    let peak = eventually(
        "the load step raises replicas to >= 3",
        CONVERGE,
        || async {
            let r = replicas(&deps).await?;
            if r >= 3 {
                Ok(r)
            } else {
                Err(format!("replicas {r}"))
            }
        },
    )
    .await;
    let (_, _, _, reason) = eventually("an applied decision", CONVERGE, || async {
        let s = autoscaler_state(&services).await?;
        (!s.3.starts_with("advisory"))
            .then_some(s.clone())
            .ok_or(format!("{s:?}"))
    })
    .await;
    assert!(
        reason.contains("cloud"),
        "decision reason names the tier: {reason}"
    );
    let status = services.get(SERVICE).await.unwrap().status.unwrap();
    assert!(
        status.recommended_replicas.is_empty(),
        "recommendations withdrawn once Active: {status:?}"
    );
    // The workers' p95 TTFT (from their histograms, through Prometheus) sets how much of the
    // 1 s objective is left for queueing, and the decision sizes spare capacity for it.
    eventually(
        "a decision under load sizes queueing headroom from the measured TTFT",
        CONVERGE,
        || async {
            let (_, _, _, why) = autoscaler_state(&services).await?;
            why.contains("queueing within the TTFT SLO needs")
                .then_some(())
                .ok_or(why)
        },
    )
    .await;
    // The Event follows the scale write (status, scale, then events), so it may land a moment
    // after the replicas the test saw: wait for it rather than race it.
    eventually("an Autoscaled event was published", CONVERGE, || async {
        let scaled = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Autoscaled"))
            .count();
        (scaled >= 1)
            .then_some(())
            .ok_or(format!("{scaled} Autoscaled events"))
    })
    .await;
    let rendered = operator.metrics.render();
    assert!(
        rendered.contains("tidal_forecast_observed_rps{"),
        "forecast metrics exported:\n{rendered}"
    );

    eprintln!("[autoscaler] peak {peak}; stopping load and prometheus");
    // Load and Prometheus gone together: the load's absence must not be read as idleness.
    stop.store(true, Ordering::Relaxed);
    let served = generator.await.unwrap();
    assert!(served > 0, "the workers answered the load");
    prom.stop();
    let (_, reason, held_since, _) = eventually(
        "MetricsAvailable=False without Prometheus",
        CONVERGE,
        || async {
            let s = autoscaler_state(&services).await?;
            (s.0 == "False")
                .then_some(s.clone())
                .ok_or(format!("{s:?}"))
        },
    )
    .await;
    assert_eq!(reason, "PrometheusUnavailable");
    let held = replicas(&deps).await.unwrap();
    assert!(
        held >= peak,
        "no scale-down when metrics went missing: {held} < {peak}"
    );
    // Several decisions later (each one a new lastDecision time), still no scale-down.
    let mut times = vec![held_since];
    while times.len() < 4 {
        let (status, _, time, why) = eventually("another held decision", CONVERGE, || {
            let last = times.last().cloned().unwrap();
            let services = services.clone();
            async move {
                let s = autoscaler_state(&services).await?;
                (s.2 != last)
                    .then_some(s.clone())
                    .ok_or("same decision".to_string())
            }
        })
        .await;
        assert_eq!(status, "False");
        assert!(why.starts_with("holding"), "{why}");
        assert_eq!(
            replicas(&deps).await.unwrap(),
            held,
            "replicas changed while holding"
        );
        times.push(time);
    }

    eprintln!("[autoscaler] held at {held}; restarting prometheus");
    // Metrics back, no load: replicas fall after the 20 s stabilisation window.
    prom.resume().await;
    eventually("MetricsAvailable=True again", CONVERGE, || async {
        let s = autoscaler_state(&services).await?;
        (s.0 == "True").then_some(()).ok_or(format!("{s:?}"))
    })
    .await;
    eventually("idle scales down to minReplicas", CONVERGE * 2, || async {
        match replicas(&deps).await? {
            1 => Ok(()),
            r => Err(format!("replicas {r}")),
        }
    })
    .await;
    let st = services.get(SERVICE).await.unwrap().status.unwrap();
    assert_eq!(
        st.autoscaled_replicas.get(DEPLOYMENT),
        Some(&1),
        "the decision is recorded in status for the controller"
    );
    operator.stop().await;
}

/// After a restart the operator reads days of a service's demand back from Prometheus as
/// 10-minute buckets, for the cloud tier and for each edge site (its own workers plus what
/// reached the cloud through its Service while it slept), so seasonal forecasts need no days
/// of fresh samples. A real Prometheus whose TSDB holds three days of the workers' counters,
/// written with promtool as the workers would have been scraped.
#[tokio::test]
async fn days_of_demand_are_read_back_per_tier_and_site_from_prometheus() {
    use tidal_operator::controller::autoscale::promql::Scope;
    use tidal_operator::controller::autoscale::source::Source;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (from, to) = (now - 3 * 86400, now - 3600);
    // (series labels, requests per second), one counter sample a minute.
    let base = r#"namespace="shop",tidal_inference_service="chat""#;
    let series = [
        (
            "tidal_worker_requests",
            format!(
                r#"{base},tidal_tier="cloud",tidal_role="full",endpoint="/v1/chat/completions",status="200""#
            ),
            2.0,
        ),
        (
            "tidal_worker_requests",
            format!(
                r#"{base},tidal_tier="edge",tidal_role="full",tidal_edge_node="edge-a",endpoint="/v1/chat/completions",status="200""#
            ),
            1.0,
        ),
        (
            "tidal_worker_site_requests",
            format!(r#"{base},tidal_tier="cloud",tidal_role="full",site="chat-edge-edge-a""#),
            0.5,
        ),
    ];
    let mut om = String::new();
    for family in ["tidal_worker_requests", "tidal_worker_site_requests"] {
        om.push_str(&format!("# TYPE {family} counter\n"));
        for (_, labels, rps) in series.iter().filter(|s| s.0 == family) {
            for t in (from..=to).step_by(60) {
                let v = rps * (t - from) as f64;
                om.push_str(&format!("{family}_total{{{labels}}} {v} {t}\n"));
            }
        }
    }
    om.push_str("# EOF\n");
    let prom = Prometheus::start_with(PrometheusConfig {
        scrape_configs: json!([]),
        history: Some(om),
        ..Default::default()
    })
    .await;
    let src = Source::new(&prom.url()).unwrap();
    let scope = Scope {
        namespace: "shop".into(),
        service: "chat".into(),
        window: "600s".into(),
    };
    let (start, end) = ((from / 600 + 2) * 600, (to / 600) * 600);
    let h = src
        .history(
            &scope,
            &["edge-a".to_string(), "edge-b".to_string()],
            start,
            end,
            600.0,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", prom.log()));
    let expected = ((end - start) / 600 + 1) as usize;
    assert_eq!(
        h.cloud.len(),
        expected,
        "one bucket per 10 minutes over days"
    );
    assert!(
        h.cloud.iter().all(|(_, v)| (v - 2.0).abs() < 0.01),
        "{:?}",
        &h.cloud[..3]
    );
    let site = &h.sites["edge-a"];
    assert_eq!(site.len(), expected);
    // Its own 1 rps plus the 0.5 rps its Service sent to the cloud.
    assert!(
        site.iter().all(|(_, v)| (v - 1.5).abs() < 0.01),
        "{:?}",
        &site[..3]
    );
    assert!(!h.sites.contains_key("edge-b"), "no series, no history");
    assert_eq!(h.cloud[0].0, start as f64);
}
