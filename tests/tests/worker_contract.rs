//! The operator's worker pods and the worker binary agree: the command line the operator puts
//! in a Deployment parses with `tidal-worker`'s own CLI, and the environment variables it sets
//! for the worker are ones the worker reads.

use clap::Parser;
use tidal_operator::children::{BuildConfig, EdgeFacts, desired_children};
use tidal_operator::crd::{EdgePhase, InferenceService};

fn example(file: &str) -> Vec<InferenceService> {
    let text =
        std::fs::read_to_string(tidal_e2e::repo_root().join("deploy/examples").join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "InferenceService")
        .map(|mut v| {
            v["metadata"]["namespace"] = "prod".into();
            v["metadata"]["uid"] = "u".into();
            serde_json::from_value(v).unwrap()
        })
        .collect()
}

#[test]
fn full_role_pods_start_with_arguments_the_worker_accepts() {
    let edge = ["berlin", "paris"].map(|n| EdgeFacts {
        name: n.into(),
        labels: [("tidal.rs/edge-pool".to_string(), "eu".to_string())].into(),
        node_name: Some(format!("node-{n}")),
        phase: EdgePhase::Ready,
        failover_to_cloud: true,
    });
    let mut checked = 0;
    for file in ["dense-cloud.yaml", "cloud-edge.yaml"] {
        for tis in example(file) {
            let children = desired_children(&tis, &edge, &BuildConfig::default()).unwrap();
            for w in children
                .workloads
                .iter()
                .filter(|w| w.kind.role() == "full")
            {
                let pod = w.pod_spec();
                let c = &pod.containers[0];
                // Kubernetes expands $(POD_IP) from the env var of that name.
                let args = c
                    .args
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(|a| a.replace("$(POD_IP)", "198.18.0.23"));
                let cli = tidal_worker::cli::Cli::try_parse_from(
                    std::iter::once("tidal-worker".to_string()).chain(args),
                )
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: worker rejects the operator's args: {e}",
                        w.kind.name("x")
                    )
                });
                let tidal_worker::cli::Command::Serve(serve) = cli.command else {
                    panic!("not serve")
                };
                assert_eq!(serve.listen.to_string(), "198.18.0.23:8080");
                assert_eq!(
                    serve.model,
                    tis.spec
                        .edge
                        .as_ref()
                        .filter(|_| w.kind.tier() == "edge")
                        .map(|e| e.model.uri.clone())
                        .unwrap_or(tis.spec.model.uri.clone())
                );
                let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
                assert!(
                    env.contains(&"TIDAL_SERVED_MODEL_NAME"),
                    "the served name reaches the worker"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "cloud and edge pods were checked ({checked})");
}
