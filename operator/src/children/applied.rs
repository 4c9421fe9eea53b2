//! Skipping server-side applies that would change nothing. At thousands of children an apply
//! per child per reconcile is most of the API server's load, although it persists nothing.
//!
//! Each applied object carries a hash of what was applied (`tidal.rs/applied-hash`). An apply
//! is needed when the cached live object has another hash (a field was added, changed or
//! removed in the desired state) or no longer holds every applied value (someone else changed
//! one of our fields: the apply puts it back).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::Value;

/// Annotation holding the hash of the applied object (without this annotation).
pub const ANNOTATION_APPLIED_HASH: &str = "tidal.rs/applied-hash";

/// FNV-1a: stable across Rust releases and processes (the hash is stored in the cluster and
/// compared by the next operator version), unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sets the applied-hash annotation on `obj` to the hash of `obj` without it.
pub fn stamp<K>(obj: &mut K)
where
    K: kube::Resource + Serialize,
{
    let meta = obj.meta_mut();
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(ANNOTATION_APPLIED_HASH);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
    let bytes = serde_json::to_vec(&*obj).expect("Kubernetes objects serialise");
    let hash = format!("{:016x}", fnv1a(&bytes));
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
}

/// The applied-hash annotation [`stamp`] wrote.
pub fn applied_hash(meta: &ObjectMeta) -> Option<&String> {
    meta.annotations.as_ref()?.get(ANNOTATION_APPLIED_HASH)
}

/// Why the stamped `desired` must be applied over `live` (the first difference found), or
/// `None` when applying it would change nothing: same applied hash, and every value `desired`
/// sets is present in `live` (the server may add defaults).
pub fn why_apply<K>(desired: &K, live: &K) -> Option<String>
where
    K: kube::Resource + Serialize,
{
    let (want, have) = (applied_hash(desired.meta()), applied_hash(live.meta()));
    if want.is_none() || want != have {
        return Some(format!("applied hash {have:?} -> {want:?}"));
    }
    if live.meta().deletion_timestamp.is_some() {
        return Some("being deleted".into());
    }
    match (serde_json::to_value(desired), serde_json::to_value(live)) {
        (Ok(d), Ok(l)) => difference(&d, &l, String::new()),
        _ => Some("not serialisable".into()),
    }
}

/// The first path where `want` ⊄ `have`: objects by key (extra keys in `have` are defaults or
/// other managers'), lists element-wise with the same length, numbers by value, the rest by
/// equality.
fn difference(want: &Value, have: &Value, path: String) -> Option<String> {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().find_map(|(k, v)| {
            let at = format!("{path}.{k}");
            match h.get(k) {
                _ if v.is_null() => None,
                Some(hv) => difference(v, hv, at),
                // The API server omits Go zero values (`readOnly: false`, `[]`).
                None if is_zero(v) => None,
                None => Some(format!("{at} missing")),
            }
        }),
        (Value::Array(w), Value::Array(h)) if w.len() == h.len() => w
            .iter()
            .zip(h)
            .enumerate()
            .find_map(|(i, (a, b))| difference(a, b, format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        _ if want == have => None,
        _ => Some(format!("{path}: {have} -> {want}")),
    }
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Null => true,
    }
}

#[cfg(test)]
fn contains(want: &Value, have: &Value) -> bool {
    difference(want, have, String::new()).is_none()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    use super::*;

    fn up_to_date(desired: &ConfigMap, live: &ConfigMap) -> bool {
        why_apply(desired, live).is_none()
    }

    fn cm(data: Value) -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "n", "labels": {"a": "1"}},
            "data": data
        }))
        .unwrap()
    }

    fn stamped(mut c: ConfigMap) -> ConfigMap {
        stamp(&mut c);
        c
    }

    #[test]
    fn stamp_is_deterministic_and_ignores_a_previous_stamp() {
        let a = stamped(cm(json!({"k": "v"})));
        let b = stamped(a.clone());
        assert_eq!(a, b);
        let c = stamped(cm(json!({"k": "w"})));
        assert_ne!(applied_hash(&a.metadata), applied_hash(&c.metadata));
    }

    #[test]
    fn live_object_with_server_defaults_is_up_to_date() {
        let desired = stamped(cm(json!({"k": "v"})));
        let mut live = desired.clone();
        live.metadata.resource_version = Some("42".into());
        live.metadata.uid = Some("u".into());
        live.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("other".into(), "x".into());
        assert!(up_to_date(&desired, &live));
    }

    #[test]
    fn changed_desired_state_or_drifted_live_object_needs_an_apply() {
        let desired = stamped(cm(json!({"k": "v"})));
        // Someone edited a field we own: same hash, value differs.
        let mut drifted = desired.clone();
        drifted
            .data
            .as_mut()
            .unwrap()
            .insert("k".into(), "edited".into());
        assert!(!up_to_date(&desired, &drifted));
        // We no longer set a field: the hash differs although live holds a superset.
        let fewer = stamped(cm(json!({})));
        assert!(!up_to_date(&fewer, &desired));
        // Never applied by us (no hash), or being deleted.
        assert!(!up_to_date(&desired, &cm(json!({"k": "v"}))));
        let mut deleting = desired.clone();
        deleting.metadata.deletion_timestamp = Some(crate::controller::now());
        assert!(!up_to_date(&desired, &deleting));
    }

    #[test]
    fn lists_compare_by_position_and_length() {
        assert!(contains(&json!([{"a": 1}]), &json!([{"a": 1.0, "b": 2}])));
        assert!(!contains(&json!([{"a": 1}]), &json!([{"a": 1}, {"a": 2}])));
        assert!(!contains(&json!([1, 2]), &json!([2, 1])));
        // Zero values the server omits.
        assert!(contains(&json!({"readOnly": false, "x": []}), &json!({})));
        assert!(!contains(&json!({"readOnly": true}), &json!({})));
    }
}
