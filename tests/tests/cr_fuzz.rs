//! Generated InferenceServices sent to the real API server while the operator runs (#17,
//! hostile input): each is refused by the schema/CEL or admitted; every admitted one is
//! reconciled and reported at its generation, the ones it cannot serve with a condition that
//! says why; the operator never exits and never loops hot.

use std::time::Duration;

use kube::api::PostParams;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};
use tidal_e2e::processes::{metric_sum, spawn_operator};
use tidal_e2e::{CONVERGE, TestCtx, eventually, install_crds};
use tidal_operator::crd::InferenceService;

/// Generated objects per run (bounded: each is a create and a reconcile on a shared machine).
const CASES: usize = 48;

/// Spec fields a mutation may set or delete.
const FIELDS: &[&str] = &[
    "model/uri",
    "model/architecture",
    "model/numExperts",
    "model/dtype",
    "model/contextLength",
    "cloud/minReplicas",
    "cloud/maxReplicas",
    "cloud/replicas",
    "cloud/experts",
    "cloud/experts/shards",
    "cloud/experts/minReplicasPerShard",
    "cloud/experts/maxReplicasPerShard",
    "cloud/experts/placement",
    "autoscaling",
    "autoscaling/intervalSeconds",
    "autoscaling/mode",
    "image",
    "auth/apiKeySecret/name",
    "tls/secretName",
    "edge/edgeNodeSelector",
];

fn values() -> Vec<Value> {
    vec![
        json!(-1),
        json!(0),
        json!(1),
        json!(3),
        json!(64),
        json!(2_147_483_647),
        json!(1e30),
        json!(""),
        json!("x".repeat(300)),
        Value::Null,
        json!([]),
        json!({}),
        json!(true),
        json!("oci://127.0.0.1:25000/m:1"),
        json!("mixtral"),
        json!("llama"),
        json!({"shards": 2}),
        json!({"matchLabels": {"site": "a"}}),
    ]
}

/// Sets (or, with `None`, removes) the value at `path` below `spec`, creating objects on
/// the way.
fn set(spec: &mut Value, path: &str, value: Option<Value>) {
    let parts: Vec<&str> = path.split('/').collect();
    let mut at = spec;
    for p in &parts[..parts.len() - 1] {
        if !at.get(*p).is_some_and(Value::is_object) {
            at[*p] = json!({});
        }
        at = at.get_mut(*p).unwrap();
    }
    let last = parts[parts.len() - 1];
    match value {
        Some(v) => at[last] = v,
        None => {
            if let Some(o) = at.as_object_mut() {
                o.remove(last);
            }
        }
    }
}

/// `CASES` specs, each a valid MoE service with one or two fields changed.
fn generated() -> Vec<Value> {
    let values = values();
    let mutation = (0..FIELDS.len(), 0..values.len() + 1);
    let strategy = proptest::collection::vec(mutation, 1..3);
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[17; 32]),
    );
    (0..CASES)
        .map(|_| {
            let mut spec = json!({
                "model": {"uri": "/models/m", "architecture": "mixtral", "numExperts": 8},
                "cloud": {"minReplicas": 1, "maxReplicas": 4},
            });
            for (field, value) in strategy.new_tree(&mut runner).unwrap().current() {
                // One past the last value deletes the field.
                set(&mut spec, FIELDS[field], values.get(value).cloned());
            }
            spec
        })
        .collect()
}

/// The InferenceService controller's reconciles so far.
fn reconciles(port: u16) -> Option<f64> {
    metric_sum(
        port,
        "tidal_operator_reconciles_total{",
        &["inferenceservice"],
    )
}

#[tokio::test]
async fn generated_services_are_refused_or_reconciled_with_a_reason() {
    let Some(ctx) = TestCtx::new("cr-fuzz").await else {
        return;
    };
    install_crds(&ctx).await;
    let log = std::env::temp_dir().join(format!("{}.log", ctx.namespace));
    let (mut op, port) = spawn_operator(
        &ctx.env,
        &[
            "--no-leader-election",
            "--identity",
            "fuzz",
            "--watch-namespace",
            &ctx.namespace,
        ],
        &log,
    );
    let api = ctx.api::<InferenceService>();
    let (mut admitted, mut refused) = (vec![], 0);
    for (i, spec) in generated().into_iter().enumerate() {
        let name = format!("fz-{i}");
        let obj = json!({"apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name}, "spec": spec});
        // Objects that do not even deserialize into the typed struct are sent untyped.
        let created = match serde_json::from_value::<InferenceService>(obj.clone()) {
            Ok(tis) => api.create(&PostParams::default(), &tis).await.map(|_| ()),
            Err(_) => {
                let dynamic: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
                let ar = kube::api::ApiResource::erase::<InferenceService>(&());
                kube::Api::<kube::api::DynamicObject>::namespaced_with(
                    ctx.client.clone(),
                    &ctx.namespace,
                    &ar,
                )
                .create(&PostParams::default(), &dynamic)
                .await
                .map(|_| ())
            }
        };
        match created {
            Ok(()) => admitted.push(name),
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => refused += 1,
            Err(e) => panic!("{name}: neither admitted nor refused: {e}"),
        }
    }
    assert!(
        !admitted.is_empty() && refused > 0,
        "the generator exercises both sides: {} admitted, {refused} refused",
        admitted.len()
    );

    // Every admitted object is reconciled and reported at its generation; one not Ready
    // says why.
    let mut not_ready = 0;
    for name in &admitted {
        let reason = eventually(&format!("{name} reported"), CONVERGE, || async {
            let t = api.get(name).await.map_err(|e| e.to_string())?;
            let status = t.status.ok_or("no status")?;
            if status.observed_generation != t.metadata.generation {
                return Err(format!("observed {:?}", status.observed_generation));
            }
            let ready = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .ok_or("no Ready condition")?;
            Ok((
                ready.status.clone(),
                ready.reason.clone(),
                ready.message.clone(),
            ))
        })
        .await;
        if reason.0 != "True" {
            not_ready += 1;
            assert!(
                !reason.1.is_empty() && !reason.2.is_empty(),
                "{name}: a condition without a reason: {reason:?}"
            );
        }
    }
    assert!(op.0.try_wait().unwrap().is_none(), "the operator exited");

    // Settled: reconciles over a further 10 s stay few. Children still starting (pods on
    // kwok's nodes) trigger some; a hot loop, bounded only by the 200 ms debounce, would
    // trigger 50 per service.
    let before = reconciles(port).expect("operator metrics");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = reconciles(port).expect("operator metrics");
    let bound = 5.0 * admitted.len() as f64;
    assert!(
        after - before <= bound,
        "{} reconciles in 10 s for {} settled services: a hot loop",
        after - before,
        admitted.len()
    );
    assert!(op.0.try_wait().unwrap().is_none(), "the operator exited");
    eprintln!(
        "[cr-fuzz] {CASES} generated: {refused} refused by the API server, {} admitted \
         ({not_ready} with Ready=False and a reason); {} reconciles in the 10 s after settling",
        admitted.len(),
        after - before
    );
}
