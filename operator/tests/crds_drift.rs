//! crds/*.yaml are generated (`cargo run -p tidal-operator --bin crdgen`); this fails when they
//! drift from the Rust types.

use std::path::Path;

use tidal_operator::crd::{all_crds, crd_file_name, crd_yaml};

#[test]
fn committed_crds_match_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut expected_files: Vec<String> = Vec::new();
    for crd in all_crds() {
        let name = crd_file_name(&crd);
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            committed == crd_yaml(&crd),
            "crds/{name} is out of date: run `cargo run -p tidal-operator --bin crdgen`"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds exactly the generated CRDs"
    );
}

#[test]
fn schema_has_subresources_printer_columns_and_validation() {
    let crds = all_crds();
    let tis = &crds[0];
    assert_eq!(
        tis.spec.names.short_names.as_deref(),
        Some(&["tis".to_string()][..])
    );
    let v = &tis.spec.versions[0];
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.cloud.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.cloud.selector")
    );
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert!(cols.contains(&"Cloud") && cols.contains(&"Edge") && cols.contains(&"Ready"));
    let yaml = crd_yaml(tis);
    assert!(yaml.matches("x-kubernetes-validations").count() >= 5);
    assert!(
        !yaml.contains("uint32"),
        "formats the apiserver does not know are rewritten"
    );
    let en = &crds[1];
    assert_eq!(en.spec.scope, "Cluster");
}
