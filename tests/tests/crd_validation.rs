//! The CRDs installed in a real API server: valid examples are accepted, and invalid objects
//! are rejected at admission with a message a person understands.

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tidal_e2e::{TestCtx, install_crds};
use tidal_operator::crd::{EdgeNode, InferenceService};

fn tis(spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "bad"}, "spec": spec
    }))
    .unwrap()
}

fn edge_node(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "tidal.rs/v1alpha1", "kind": "EdgeNode",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

/// A valid spec to break one field at a time.
fn base() -> Value {
    json!({
        "model": {"uri": "/models/m", "architecture": "mixtral", "numExperts": 8},
        "cloud": {"minReplicas": 1, "maxReplicas": 4}
    })
}

fn with(mut v: Value, path: &[&str], value: Value) -> Value {
    let mut cur = &mut v;
    for p in &path[..path.len() - 1] {
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(p.to_string())
            .or_insert(json!({}));
    }
    cur[path[path.len() - 1]] = value;
    v
}

fn api_for(client: &Client, ns: &str, obj: &DynamicObject) -> Api<DynamicObject> {
    match obj.types.as_ref().unwrap().kind.as_str() {
        "EdgeNode" => Api::all_with(client.clone(), &ApiResource::erase::<EdgeNode>(&())),
        _ => Api::namespaced_with(
            client.clone(),
            ns,
            &ApiResource::erase::<InferenceService>(&()),
        ),
    }
}

/// A dry-run create: admission (schema, CEL) runs, nothing is stored.
async fn create(client: &Client, ns: &str, obj: &DynamicObject) -> Result<(), String> {
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api_for(client, ns, obj)
        .create(&pp, obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A dry-run server-side apply: admission runs whether or not the object already exists
/// (cluster-scoped examples may be there from a demo run).
async fn dry_apply(client: &Client, ns: &str, obj: &DynamicObject) -> Result<(), String> {
    let name = obj.metadata.name.clone().unwrap();
    let pp = PatchParams::apply("tidal-e2e").dry_run().force();
    api_for(client, ns, obj)
        .patch(&name, &pp, &Patch::Apply(obj))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_clear_messages() {
    let Some(ctx) = TestCtx::new("crdval").await else {
        return;
    };
    install_crds(&ctx).await;

    let cases: Vec<(&str, DynamicObject, &str)> = vec![
        (
            "min above max",
            tis(with(base(), &["cloud", "minReplicas"], json!(5))),
            "cloud.minReplicas must be less than or equal to cloud.maxReplicas",
        ),
        (
            "replicas outside bounds",
            tis(with(base(), &["cloud", "replicas"], json!(9))),
            "cloud.replicas must lie within [minReplicas, maxReplicas]",
        ),
        (
            "experts on a dense model",
            tis(with(
                with(base(), &["model", "architecture"], json!("llama")),
                &["cloud", "experts"],
                json!({"shards": 2}),
            )),
            "needs an MoE model",
        ),
        (
            "more shards than experts",
            tis(with(base(), &["cloud", "experts"], json!({"shards": 16}))),
            "cloud.experts.shards cannot exceed model.numExperts",
        ),
        (
            "batch of zero",
            tis(with(base(), &["serving"], json!({"maxBatch": 0}))),
            "spec.serving.maxBatch",
        ),
        (
            "negative prefix cache",
            tis(with(base(), &["serving"], json!({"prefixCacheMiB": -1}))),
            "spec.serving.prefixCacheMiB",
        ),
        (
            "unknown architecture",
            tis(with(base(), &["model", "architecture"], json!("gpt2"))),
            "Unsupported value: \"gpt2\"",
        ),
        (
            "unsupported model uri",
            tis(with(base(), &["model", "uri"], json!("s3://bucket/model"))),
            "model uri must be an absolute path, file:///path, hf://org/name",
        ),
        (
            "oci model without a tag or digest",
            tis(with(
                base(),
                &["model", "uri"],
                json!("oci://registry.example/models/m"),
            )),
            "or oci://registry/repository:tag",
        ),
        (
            "edge tier without an EdgeNode selector",
            tis(with(
                base(),
                &["edge"],
                json!({"model": {"uri": "/m", "architecture": "qwen2"}, "edgeNodeSelector": {}}),
            )),
            "edge.edgeNodeSelector must select EdgeNodes",
        ),
        (
            "confidence above 1",
            tis(with(
                base(),
                &["edge"],
                json!({"model": {"uri": "/m", "architecture": "qwen2"},
             "edgeNodeSelector": {"matchLabels": {"a": "b"}}, "escalation": {"confidenceThreshold": 1.5}}),
            )),
            "should be less than or equal to 1",
        ),
        (
            "edge min above max",
            tis(with(
                base(),
                &["edge"],
                json!({"model": {"uri": "/m", "architecture": "qwen2"},
             "edgeNodeSelector": {"matchLabels": {"a": "b"}}, "minReplicasPerNode": 3, "maxReplicasPerNode": 2}),
            )),
            "edge.minReplicasPerNode must be less than or equal to edge.maxReplicasPerNode",
        ),
        (
            "zero max replicas",
            tis(with(base(), &["cloud", "maxReplicas"], json!(0))),
            "should be greater than or equal to 1",
        ),
        (
            "quantile below the median",
            tis(with(
                base(),
                &["autoscaling"],
                json!({"forecast": {"quantile": 0.2}}),
            )),
            "should be greater than or equal to 0.5",
        ),
        (
            "prometheus url not http",
            tis(with(
                base(),
                &["autoscaling"],
                json!({"prometheusUrl": "ftp://prom:9090"}),
            )),
            "prometheusUrl must be an http(s) URL",
        ),
        (
            "interval too short",
            tis(with(
                base(),
                &["autoscaling"],
                json!({"intervalSeconds": 1}),
            )),
            "should be greater than or equal to 5",
        ),
        (
            "missing model",
            tis(json!({"cloud": {"maxReplicas": 2}})),
            "spec.model: Required value",
        ),
        (
            "API keys Secret with a bad name",
            tis(with(
                base(),
                &["auth"],
                json!({"apiKeySecret": {"name": "My Keys"}}),
            )),
            "name must be a Secret name",
        ),
        (
            "API keys Secret key with a slash",
            tis(with(
                base(),
                &["auth"],
                json!({"apiKeySecret": {"name": "keys", "key": "a/b"}}),
            )),
            "key must consist of alphanumerics",
        ),
        (
            "TLS Secret with a bad name",
            tis(with(base(), &["tls"], json!({"secretName": "Workers TLS"}))),
            "secretName must be a Secret name",
        ),
        (
            "cloud tier exposed by a LoadBalancer without API keys",
            tis(with(
                base(),
                &["cloud", "service"],
                json!({"type": "LoadBalancer"}),
            )),
            "exposes the OpenAI API outside the cluster: set spec.auth.apiKeySecret",
        ),
        (
            "edge sites exposed by NodePorts without API keys",
            tis(with(
                base(),
                &["edge"],
                json!({"model": {"uri": "/models/small", "architecture": "llama"},
                       "edgeNodeSelector": {"matchLabels": {"pool": "a"}},
                       "service": {"type": "NodePort"}}),
            )),
            "exposes the OpenAI API outside the cluster: set spec.auth.apiKeySecret",
        ),
        (
            "an unknown Service type",
            tis(with(
                base(),
                &["cloud", "service"],
                json!({"type": "ExternalName"}),
            )),
            "spec.cloud.service.type: Unsupported value",
        ),
        (
            "a name that cannot begin a Service name",
            {
                let mut o = tis(base());
                o.metadata.name = Some("chat.v2".into());
                o
            },
            "metadata.name must be a DNS-1035 label",
        ),
        (
            "TLS without a Secret",
            tis(with(base(), &["tls"], json!({}))),
            "secretName: Required value",
        ),
        (
            "edge node with nodeName and nodeSelector",
            edge_node(
                "both",
                json!({"nodeName": "edge-0", "nodeSelector": {"a": "b"}, "site": "s1"}),
            ),
            "set exactly one of nodeName and nodeSelector",
        ),
        (
            "edge node site not a DNS label",
            edge_node(
                "site",
                json!({"nodeName": "edge-0", "site": "Berlin Store"}),
            ),
            "site must be a lowercase DNS label",
        ),
        (
            "edge node bad accelerator resource",
            edge_node(
                "acc",
                json!({"nodeName": "edge-0", "site": "s1", "capacity": {"accelerator": {"resourceName": "gpu", "count": 1}}}),
            ),
            "accelerator.resourceName must be an extended resource name",
        ),
    ];
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (what, obj, expected) in &cases {
        match create(&ctx.client, &ctx.namespace, obj).await {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(e) if e.contains(expected) => {}
            Err(e) => failures.push(format!(
                "{what}: rejected, but the message lacks {expected:?}: {e}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The unbroken base object is accepted, so the rejections above are about the broken field.
    create(&ctx.client, &ctx.namespace, &tis(base()))
        .await
        .expect("base spec is valid");
    let mut keyed = tis(with(
        base(),
        &["auth"],
        json!({"apiKeySecret": {"name": "llm-api-keys", "key": "keys.txt"}}),
    ));
    keyed.metadata.name = Some("keyed".into());
    create(&ctx.client, &ctx.namespace, &keyed)
        .await
        .expect("an API keys Secret reference is valid");
    // Exposed outside the cluster with API keys: accepted; a ClusterIP needs none.
    let mut exposed = tis(with(
        with(
            base(),
            &["auth"],
            json!({"apiKeySecret": {"name": "llm-api-keys"}}),
        ),
        &["cloud", "service"],
        json!({"type": "LoadBalancer", "annotations": {"lb.example.com/internal": "false"}}),
    ));
    exposed.metadata.name = Some("exposed".into());
    create(&ctx.client, &ctx.namespace, &exposed)
        .await
        .expect("a LoadBalancer with API keys is valid");
    // Qwen2-MoE is served in expert shards too.
    let mut qwen2moe = tis(with(base(), &["model", "architecture"], json!("qwen2moe")));
    qwen2moe.metadata.name = Some("qwen2moe".into());
    create(&ctx.client, &ctx.namespace, &qwen2moe)
        .await
        .expect("qwen2moe with expert shards is valid");
    // So is DeepSeek-V2; and serving settings, prefix reuse off included.
    let mut deepseek = tis(with(
        with(base(), &["model", "architecture"], json!("deepseekv2")),
        &["serving"],
        json!({"maxBatch": 32, "prefixCacheMiB": 0, "prefixBlockTokens": 32, "prefillChunkTokens": 256}),
    ));
    deepseek.metadata.name = Some("deepseek".into());
    create(&ctx.client, &ctx.namespace, &deepseek)
        .await
        .expect("deepseekv2 with expert shards and serving settings is valid");
    let mut internal = tis(with(
        base(),
        &["cloud", "service"],
        json!({"type": "ClusterIP"}),
    ));
    internal.metadata.name = Some("internal".into());
    create(&ctx.client, &ctx.namespace, &internal)
        .await
        .expect("a ClusterIP needs no API keys");
    let mut tls = tis(with(base(), &["tls"], json!({"secretName": "workers-tls"})));
    tls.metadata.name = Some("tls".into());
    create(&ctx.client, &ctx.namespace, &tls)
        .await
        .expect("a TLS Secret reference is valid");
    // OCI model artifacts by tag or by digest are valid model URIs.
    for (i, uri) in [
        "oci://127.0.0.1:25000/tidal-rs/models/smollm2:0.1.2",
        "oci://ghcr.io/org/models/mixtral@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ]
    .iter()
    .enumerate()
    {
        let mut obj = tis(with(base(), &["model", "uri"], json!(uri)));
        obj.metadata.name = Some(format!("oci-{i}"));
        create(&ctx.client, &ctx.namespace, &obj)
            .await
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
    }
}

#[tokio::test]
async fn examples_pass_admission() {
    let Some(ctx) = TestCtx::new("examples").await else {
        return;
    };
    install_crds(&ctx).await;
    let dir = tidal_e2e::repo_root().join("deploy/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj: DynamicObject = serde::Deserialize::deserialize(doc).unwrap();
            dry_apply(&ctx.client, &ctx.namespace, &obj)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "all example objects were checked ({n})");
}
