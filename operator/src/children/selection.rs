//! Label-selector matching, for choosing the EdgeNodes an InferenceService's edge tier uses.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector` (Kubernetes semantics: all terms must hold; an empty
/// selector matches everything, which the CRD's CEL rules forbid for edge selectors).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false, // unknown operators match nothing rather than everything
        }
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("pool", "eu")])),
            match_expressions: Some(vec![
                expr("site", "In", &["a", "b"]),
                expr("drain", "DoesNotExist", &[]),
            ]),
        };
        assert!(matches(&sel, &labels(&[("pool", "eu"), ("site", "a")])));
        assert!(!matches(&sel, &labels(&[("pool", "eu"), ("site", "c")])));
        assert!(!matches(&sel, &labels(&[("pool", "us"), ("site", "a")])));
        assert!(!matches(
            &sel,
            &labels(&[("pool", "eu"), ("site", "a"), ("drain", "1")])
        ));
        let notin = LabelSelector {
            match_expressions: Some(vec![expr("x", "NotIn", &["1"])]),
            ..Default::default()
        };
        assert!(matches(&notin, &labels(&[])));
        assert!(!matches(&notin, &labels(&[("x", "1")])));
        let bogus = LabelSelector {
            match_expressions: Some(vec![expr("x", "Near", &["1"])]),
            ..Default::default()
        };
        assert!(!matches(&bogus, &labels(&[("x", "1")])));
    }
}
