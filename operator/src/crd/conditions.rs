//! Standard status conditions (`metav1.Condition`) and the pure logic that updates them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types Tidal reports.
pub mod condition_type {
    /// Everything desired is running and ready.
    pub const READY: &str = "Ready";
    /// Children are being created or rolled out.
    pub const PROGRESSING: &str = "Progressing";
    /// Something is wrong: an invalid spec, an offline edge site, children not ready.
    pub const DEGRADED: &str = "Degraded";
    /// The autoscaler can read Prometheus.
    pub const METRICS_AVAILABLE: &str = "MetricsAvailable";
    /// A replica bound or the step limit capped a scaling decision.
    pub const SCALING_LIMITED: &str = "ScalingLimited";
    /// The edge node's Kubernetes Node exists and heartbeats.
    pub const HEARTBEAT: &str = "Heartbeat";
}

/// A condition as computed by the controller, before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        DesiredCondition {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Merges desired conditions into the current list. `lastTransitionTime` only moves when the
/// status flips, so an unchanged reconcile yields an identical list (and writes nothing).
/// Conditions of other types are kept as they are (another loop may own them).
pub fn merge_conditions(
    current: &[Condition],
    desired: &[DesiredCondition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = current.to_vec();
    for d in desired {
        let status = status_str(d.status).to_string();
        match out.iter_mut().find(|c| c.type_ == d.type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now.clone();
                }
                c.status = status;
                c.reason = d.reason.to_string();
                c.message = d.message.clone();
                c.observed_generation = generation;
            }
            None => out.push(Condition {
                type_: d.type_.to_string(),
                status,
                reason: d.reason.to_string(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time: now.clone(),
            }),
        }
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Whether the condition `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let ready = DesiredCondition::new(condition_type::READY, true, "AllReady", "ok");
        let first = merge_conditions(&[], std::slice::from_ref(&ready), Some(1), &t(100));
        assert_eq!(first[0].last_transition_time, t(100));
        // Same status, new message: no transition.
        let again = DesiredCondition {
            message: "still ok".into(),
            ..ready.clone()
        };
        let second = merge_conditions(&first, &[again], Some(2), &t(200));
        assert_eq!(second[0].last_transition_time, t(100));
        assert_eq!(second[0].message, "still ok");
        assert_eq!(second[0].observed_generation, Some(2));
        // Flip: transition.
        let down = DesiredCondition::new(condition_type::READY, false, "NotReady", "0/1");
        let third = merge_conditions(&second, &[down], Some(2), &t(300));
        assert_eq!(third[0].last_transition_time, t(300));
        assert!(!is_true(&third, condition_type::READY));
    }

    #[test]
    fn unchanged_input_gives_identical_output_and_keeps_foreign_conditions() {
        let foreign = Condition {
            type_: "MetricsAvailable".into(),
            status: "False".into(),
            reason: "PrometheusDown".into(),
            message: "x".into(),
            observed_generation: Some(1),
            last_transition_time: t(5),
        };
        let d = [DesiredCondition::new(
            condition_type::READY,
            true,
            "AllReady",
            "ok",
        )];
        let a = merge_conditions(std::slice::from_ref(&foreign), &d, Some(1), &t(10));
        let b = merge_conditions(&a, &d, Some(1), &t(20));
        assert_eq!(a, b);
        assert!(b.contains(&foreign));
    }
}
