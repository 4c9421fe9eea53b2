//! Pure logic of edge sites (no kube): which Node an EdgeNode is, its phase and conditions
//! from Node and Lease facts, the labels it puts on its Node, and when to look again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::children::{EdgeFacts, LABEL_EDGE_NODE};
use crate::crd::{DesiredCondition, EdgeNode, EdgeNodeSpec, EdgePhase, condition_type};

/// Node label naming the site.
pub const LABEL_SITE: &str = "tidal.rs/site";
/// Well-known Node label for the region.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";

/// How often an EdgeNode whose Node another EdgeNode holds looks again (that one being
/// deleted or moved causes no event here).
pub const CLAIM_RECHECK: Duration = Duration::from_secs(30);

/// Slack added to a deadline before re-checking, so the check lands after the boundary
/// ("older than") rather than exactly on it.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// Condition reasons.
pub mod reason {
    pub const READY: &str = "EdgeNodeReady";
    pub const CORDONED: &str = "Cordoned";
    pub const LEASE_RENEWED: &str = "LeaseRenewed";
    pub const HEARTBEAT_LATE: &str = "HeartbeatLate";
    pub const HEARTBEAT_EXPIRED: &str = "HeartbeatExpired";
    pub const NO_LEASE: &str = "NoLease";
    pub const AWAITING_HEARTBEAT: &str = "AwaitingFirstHeartbeat";
    pub const NODE_NOT_FOUND: &str = "NodeNotFound";
    pub const NODE_AMBIGUOUS: &str = "NodeSelectorAmbiguous";
    pub const NODE_NOT_READY: &str = "NodeNotReady";
    pub const NODE_UNSCHEDULABLE: &str = "NodeUnschedulable";
    pub const NODE_CLAIMED: &str = "NodeClaimedByOtherEdgeNode";
}

/// Why an EdgeNode resolves to no Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// No Node by that name, or none matching the selector (the message says which).
    NotFound(String),
    /// The selector matches several Nodes (sorted names).
    Ambiguous(Vec<String>),
}

fn describe_selector(sel: &BTreeMap<String, String>) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Resolves the spec's Node among `nodes` (name, labels): the candidates the controller
/// fetched (the named Node, or the Nodes listed with the selector).
pub fn resolve<'a>(
    spec: &EdgeNodeSpec,
    nodes: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) -> Result<String, Unresolved> {
    if let Some(name) = &spec.node_name {
        return if nodes.into_iter().any(|(n, _)| n == name) {
            Ok(name.clone())
        } else {
            Err(Unresolved::NotFound(format!("Node {name} does not exist")))
        };
    }
    let selector = spec.node_selector.clone().unwrap_or_default();
    let mut matched: Vec<String> = nodes
        .into_iter()
        .filter(|(_, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .map(|(n, _)| n.to_string())
        .collect();
    matched.sort();
    matched.dedup();
    match matched.len() {
        0 => Err(Unresolved::NotFound(format!(
            "nodeSelector {} matches no Node",
            describe_selector(&selector)
        ))),
        1 => Ok(matched.remove(0)),
        _ => Err(Unresolved::Ambiguous(matched)),
    }
}

/// What is known about the resolved Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    /// The Node's `Ready` condition: `Some(true)` only when it is "True"; `None` when absent.
    pub ready: Option<bool>,
    /// The `Ready` condition's message, for the EdgeNode's condition.
    pub ready_message: Option<String>,
    /// `spec.unschedulable` (kubectl cordon).
    pub unschedulable: bool,
}

/// Everything the phase depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// The Node, or why there is none.
    pub node: Result<NodeFacts, Unresolved>,
    /// `spec.renewTime` of the Node's Lease in kube-node-lease, if the Lease exists.
    pub renew_time: Option<Timestamp>,
    /// `spec.leaseDurationSeconds` of that Lease: the holder is alive until renewTime plus
    /// this (a kubelet renews every quarter of it).
    pub lease_duration_seconds: Option<u32>,
    pub now: Timestamp,
    pub heartbeat_timeout_seconds: u32,
    pub cordoned: bool,
    /// Another EdgeNode that already is this Node (see [`claimed_by_other`]).
    pub claimed_by: Option<String>,
    /// The `lastHeartbeat` already in status. While the heartbeat stays fresh it is kept for
    /// up to [`heartbeat_report_interval`], so a Lease renewal (every ~10 s per node) does not
    /// rewrite the status of thousands of EdgeNodes; the phase still follows every renewal.
    pub reported_heartbeat: Option<Timestamp>,
    /// Since when this EdgeNode has had this Node: the later of the two creation times. A
    /// Node without a Lease gets the heartbeat timeout from then to heartbeat for the first
    /// time (a kubelet that just registered, a Lease the cache has not shown yet), as the node
    /// lifecycle controller's start-up grace period does, before it is called Offline.
    pub paired_since: Option<Timestamp>,
}

/// How long a reported `lastHeartbeat` may lag the Lease while the node is healthy: the
/// heartbeat timeout, and at least five minutes, as a kubelet reports an unchanged Node
/// status (`nodeStatusReportFrequency`). At 2,000 sites a minute would be 33 writes/s.
pub fn heartbeat_report_interval(heartbeat_timeout_seconds: u32) -> SignedDuration {
    SignedDuration::from_secs(i64::from(heartbeat_timeout_seconds.max(300)))
}

/// The computed state of an EdgeNode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub phase: EdgePhase,
    pub node_name: Option<String>,
    pub last_heartbeat: Option<Timestamp>,
    /// `Heartbeat` then `Ready`.
    pub conditions: Vec<DesiredCondition>,
    /// When the phase or a condition would next change without any event (a late heartbeat
    /// turning Degraded, then Offline); `None` when only an event can change it.
    pub next_check: Option<Duration>,
}

/// How fresh the heartbeat is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Freshness {
    Fresh,
    Late,
    Expired,
    Missing,
}

fn to_std(d: SignedDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

/// The phase and conditions of an EdgeNode. Messages name timestamps, never ages, so the
/// result is the same on every reconcile until a fact changes (and nothing is rewritten).
pub fn assess(obs: &Observation) -> Assessment {
    let timeout = SignedDuration::from_secs(i64::from(obs.heartbeat_timeout_seconds));
    // Late once the Lease itself has expired, and not before a third of the timeout: a renewal
    // a few seconds behind on a busy API server is not a degraded site (and flapping phases
    // would rewrite thousands of statuses and re-reconcile every service on them).
    let lease = SignedDuration::from_secs(i64::from(obs.lease_duration_seconds.unwrap_or(0)));
    let late_after = (timeout / 3).max(lease).min(timeout);
    let node_name = obs.node.as_ref().ok().map(|n| n.name.clone());

    // The heartbeat only counts for a Node that exists.
    let renew = obs.renew_time.filter(|_| obs.node.is_ok());
    // Whole seconds, as metav1.Time stores it: a stored status then compares equal.
    let renew_secs = renew.and_then(|r| Timestamp::from_second(r.as_second()).ok());
    // A renewal "in the future" (clock skew) counts as just now.
    let age = renew.map(|r| obs.now.duration_since(r).max(SignedDuration::ZERO));
    let freshness = match age {
        None => Freshness::Missing,
        Some(a) if a > timeout => Freshness::Expired,
        Some(a) if a > late_after => Freshness::Late,
        Some(_) => Freshness::Fresh,
    };
    // What status reports: the stored heartbeat while fresh and recent enough.
    let report_interval = heartbeat_report_interval(obs.heartbeat_timeout_seconds);
    let renew_secs = match (freshness, obs.reported_heartbeat, renew_secs) {
        (Freshness::Fresh, Some(old), Some(new))
            if old <= new && new.duration_since(old) < report_interval =>
        {
            Some(old)
        }
        _ => renew_secs,
    };

    // No Lease yet, within the start-up grace: not assessed yet rather than Offline.
    let first_heartbeat_due = obs
        .paired_since
        .map(|since| since + timeout)
        .filter(|due| freshness == Freshness::Missing && obs.node.is_ok() && *due > obs.now)
        .and_then(|due| Timestamp::from_second(due.as_second()).ok());

    let heartbeat = match (&obs.node, freshness, renew_secs) {
        (Err(Unresolved::NotFound(msg)), _, _) => DesiredCondition::new(
            condition_type::HEARTBEAT,
            false,
            reason::NODE_NOT_FOUND,
            msg.clone(),
        ),
        (Err(Unresolved::Ambiguous(names)), _, _) => DesiredCondition::new(
            condition_type::HEARTBEAT,
            false,
            reason::NODE_AMBIGUOUS,
            format!(
                "nodeSelector matches {} Nodes ({}); it must match exactly one",
                names.len(),
                names.join(", ")
            ),
        ),
        (Ok(n), Freshness::Missing, _) => DesiredCondition::new(
            condition_type::HEARTBEAT,
            false,
            reason::NO_LEASE,
            format!(
                "Node {} has no Lease in kube-node-lease (its kubelet never heartbeat)",
                n.name
            ),
        ),
        (Ok(n), Freshness::Fresh, Some(r)) => DesiredCondition::new(
            condition_type::HEARTBEAT,
            true,
            reason::LEASE_RENEWED,
            format!("Node {} renewed its Lease at {r}", n.name),
        ),
        (Ok(n), Freshness::Late, Some(r)) => DesiredCondition::new(
            condition_type::HEARTBEAT,
            true,
            reason::HEARTBEAT_LATE,
            format!(
                "Node {} has not renewed its Lease since {r} (late after {}s, offline after {}s)",
                n.name,
                late_after.as_secs(),
                timeout.as_secs()
            ),
        ),
        (Ok(n), _, r) => DesiredCondition::new(
            condition_type::HEARTBEAT,
            false,
            reason::HEARTBEAT_EXPIRED,
            format!(
                "Node {} has not renewed its Lease since {} (more than {}s)",
                n.name,
                r.map(|r| r.to_string()).unwrap_or_default(),
                timeout.as_secs()
            ),
        ),
    };

    let (phase, ready) = if obs.cordoned {
        (
            EdgePhase::Cordoned,
            DesiredCondition::new(
                condition_type::READY,
                false,
                reason::CORDONED,
                "spec.cordoned is set: the site is out of service",
            ),
        )
    } else if let Some(other) = &obs.claimed_by {
        (
            EdgePhase::Offline,
            DesiredCondition::new(
                condition_type::READY,
                false,
                reason::NODE_CLAIMED,
                format!(
                    "Node {} already is EdgeNode {other}; one Node backs one EdgeNode",
                    node_name.as_deref().unwrap_or_default()
                ),
            ),
        )
    } else if let Some(due) = first_heartbeat_due {
        (
            EdgePhase::Unknown,
            DesiredCondition::new(
                condition_type::READY,
                false,
                reason::AWAITING_HEARTBEAT,
                format!(
                    "Node {} has not heartbeat yet; Offline without a Lease at {due}",
                    node_name.as_deref().unwrap_or_default()
                ),
            ),
        )
    } else if obs.node.is_err() || matches!(freshness, Freshness::Expired | Freshness::Missing) {
        (
            EdgePhase::Offline,
            DesiredCondition::new(
                condition_type::READY,
                false,
                heartbeat.reason,
                heartbeat.message.clone(),
            ),
        )
    } else if let Ok(n) = &obs.node
        && n.ready != Some(true)
    {
        let detail = n
            .ready_message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        (
            EdgePhase::Degraded,
            DesiredCondition::new(
                condition_type::READY,
                false,
                reason::NODE_NOT_READY,
                format!("Node {} is not Ready{detail}", n.name),
            ),
        )
    } else if let Ok(n) = &obs.node
        && n.unschedulable
    {
        (
            EdgePhase::Degraded,
            DesiredCondition::new(
                condition_type::READY,
                false,
                reason::NODE_UNSCHEDULABLE,
                format!("Node {} is cordoned (spec.unschedulable)", n.name),
            ),
        )
    } else if freshness == Freshness::Late {
        (
            EdgePhase::Degraded,
            DesiredCondition::new(
                condition_type::READY,
                false,
                reason::HEARTBEAT_LATE,
                heartbeat.message.clone(),
            ),
        )
    } else {
        (
            EdgePhase::Ready,
            DesiredCondition::new(
                condition_type::READY,
                true,
                reason::READY,
                format!(
                    "Node {} is Ready and heartbeats",
                    node_name.as_deref().unwrap_or_default()
                ),
            ),
        )
    };

    // The next boundary the heartbeat crosses on its own: late, then expired.
    // (Without a Lease: the end of the start-up grace.)
    let deadline = renew
        .and_then(|r| {
            [r + late_after, r + timeout]
                .into_iter()
                .find(|deadline| *deadline >= obs.now)
        })
        .or(first_heartbeat_due)
        .map(|deadline| to_std(deadline.duration_since(obs.now)) + DEADLINE_SLACK);
    let next_check = match (&obs.claimed_by, deadline) {
        (Some(_), d) => Some(d.map_or(CLAIM_RECHECK, |d| d.min(CLAIM_RECHECK))),
        (None, d) => d,
    };

    Assessment {
        phase,
        // A claimed Node is not this EdgeNode's: nothing is placed through it.
        node_name: node_name.filter(|_| obs.claimed_by.is_none()),
        last_heartbeat: renew_secs,
        conditions: vec![heartbeat, ready],
        next_check,
    }
}

/// The labels an EdgeNode puts on its Node, for placement.
pub fn node_labels(edge_node: &str, spec: &EdgeNodeSpec) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_EDGE_NODE.to_string(), edge_node.to_string()),
        (LABEL_SITE.to_string(), spec.site.clone()),
    ]);
    if let Some(region) = &spec.region {
        labels.insert(LABEL_REGION.to_string(), region.clone());
    }
    labels
}

/// Whether the Node's labels need an apply: a desired label is missing or different, or the
/// operator still owns a label it no longer wants (`owned`: label keys in its managed fields).
pub fn labels_need_apply(
    desired: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
    owned: &BTreeSet<String>,
) -> bool {
    desired.iter().any(|(k, v)| current.get(k) != Some(v))
        || owned.iter().any(|k| !desired.contains_key(k))
}

/// The other EdgeNode that holds the Node, if any: the one its `tidal.rs/edge-node` label
/// names, provided that EdgeNode still reports this Node as its own (`holds(name)`), so a
/// label left by a deleted or moved EdgeNode claims nothing.
pub fn claimed_by_other(
    edge_node: &str,
    node_labels: &BTreeMap<String, String>,
    holds: impl Fn(&str) -> bool,
) -> Option<String> {
    node_labels
        .get(LABEL_EDGE_NODE)
        .filter(|holder| holder.as_str() != edge_node && holds(holder))
        .cloned()
}

/// Label keys a managed-fields entry's `fieldsV1` owns (`{"f:metadata":{"f:labels":{"f:k":{}}}}`).
pub fn owned_label_keys(fields_v1: &serde_json::Value) -> BTreeSet<String> {
    fields_v1
        .get("f:metadata")
        .and_then(|m| m.get("f:labels"))
        .and_then(|l| l.as_object())
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("f:").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a phase change is worth an Event. A site first seen healthy is not news (the
/// status says so): at start-up, thousands of them would bury the Events that matter.
pub fn phase_change_is_news(from: EdgePhase, to: EdgePhase) -> bool {
    from != to && !(from == EdgePhase::Unknown && to == EdgePhase::Ready)
}

/// What the InferenceService controller needs to know about an EdgeNode (phase from its
/// status; Unknown before the first reconcile).
pub fn edge_facts(en: &EdgeNode) -> EdgeFacts {
    EdgeFacts::from_edge_node(en)
}

/// Whether an EdgeNode is (or may become) the Node `node`: by name, by the Node it last
/// resolved to, or by a selector matching the Node's labels (`None` when unknown, e.g. for
/// a Lease, which carries the Node's name only).
pub fn refers_to_node(
    en: &EdgeNode,
    node: &str,
    node_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let by_name = en.spec.node_name.as_deref() == Some(node);
    let by_status = en.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    let by_selector = match (&en.spec.node_selector, node_labels) {
        (Some(sel), Some(labels)) => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
        _ => false,
    };
    by_name || by_status || by_selector
}

#[cfg(test)]
mod tests;
