use super::*;
use crate::crd::{EdgeNodeStatus, OfflinePolicy};

const TIMEOUT: u32 = 30; // late after 10s, offline after 30s

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn spec() -> EdgeNodeSpec {
    EdgeNodeSpec {
        node_name: Some("edge-0".into()),
        node_selector: None,
        site: "berlin-1".into(),
        region: Some("eu-central".into()),
        capacity: Default::default(),
        link: None,
        offline_policy: OfflinePolicy {
            heartbeat_timeout_seconds: TIMEOUT,
            ..Default::default()
        },
        cordoned: false,
    }
}

fn node() -> NodeFacts {
    NodeFacts {
        name: "edge-0".into(),
        ready: Some(true),
        ready_message: None,
        unschedulable: false,
    }
}

/// A healthy node whose Lease was renewed at t(0), observed at `now`.
fn obs(now: i64) -> Observation {
    Observation {
        node: Ok(node()),
        renew_time: Some(t(0)),
        lease_duration_seconds: None,
        now: t(now),
        heartbeat_timeout_seconds: TIMEOUT,
        cordoned: false,
        claimed_by: None,
        reported_heartbeat: None,
        paired_since: None,
    }
}

#[test]
fn renewals_within_the_report_interval_keep_the_reported_heartbeat() {
    // Reported at t(0); the Lease renews at t(10): nothing to rewrite yet.
    let renewed = Observation {
        renew_time: Some(t(10)),
        reported_heartbeat: Some(t(0)),
        ..obs(12)
    };
    let a = assess(&renewed);
    assert_eq!(a.phase, EdgePhase::Ready);
    assert_eq!(a.last_heartbeat, Some(t(0)));
    // What status shows does not change with the next renewal (only the recheck time does).
    let again = assess(&Observation {
        renew_time: Some(t(20)),
        ..renewed.clone()
    });
    assert_eq!(
        (a.phase, a.last_heartbeat, a.conditions),
        (again.phase, again.last_heartbeat, again.conditions)
    );
    // A report older than the interval is refreshed.
    let interval = heartbeat_report_interval(TIMEOUT).as_secs();
    let later = Observation {
        renew_time: Some(t(interval)),
        ..obs(interval + 1)
    };
    let b = assess(&Observation {
        reported_heartbeat: Some(t(0)),
        ..later
    });
    assert_eq!(b.last_heartbeat, Some(t(interval)));
    // A late heartbeat reports the real renewal, whatever was reported before.
    let late = assess(&Observation {
        reported_heartbeat: Some(t(0)),
        renew_time: Some(t(5)),
        ..obs(5 + i64::from(TIMEOUT) / 2)
    });
    assert_eq!(late.last_heartbeat, Some(t(5)));
}

fn cond<'a>(a: &'a Assessment, type_: &str) -> &'a DesiredCondition {
    a.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn fresh_heartbeat_on_ready_node_is_ready() {
    let a = assess(&obs(3));
    assert_eq!(a.phase, EdgePhase::Ready);
    assert_eq!(a.node_name.as_deref(), Some("edge-0"));
    assert_eq!(a.last_heartbeat, Some(t(0)));
    assert!(cond(&a, "Ready").status);
    assert_eq!(cond(&a, "Heartbeat").reason, reason::LEASE_RENEWED);
    // Next boundary: late at 10s.
    assert_eq!(a.next_check, Some(Duration::from_secs(7) + DEADLINE_SLACK));
}

#[test]
fn exactly_a_third_is_still_ready_and_just_after_is_degraded() {
    assert_eq!(assess(&obs(10)).phase, EdgePhase::Ready);
    let a = assess(&Observation {
        now: t(10) + SignedDuration::from_millis(1),
        ..obs(0)
    });
    assert_eq!(a.phase, EdgePhase::Degraded);
    assert_eq!(cond(&a, "Ready").reason, reason::HEARTBEAT_LATE);
    let hb = cond(&a, "Heartbeat");
    assert!(hb.status, "late is not yet lost");
    assert_eq!(hb.reason, reason::HEARTBEAT_LATE);
}

#[test]
fn an_unexpired_lease_is_not_late() {
    // A 20 s Lease renewed at t(0) is valid until t(20), past a third of the 30 s timeout.
    let with_lease = |now| Observation {
        lease_duration_seconds: Some(20),
        ..obs(now)
    };
    assert_eq!(assess(&with_lease(15)).phase, EdgePhase::Ready);
    assert_eq!(assess(&with_lease(21)).phase, EdgePhase::Degraded);
    assert_eq!(assess(&with_lease(31)).phase, EdgePhase::Offline);
    // A Lease longer than the timeout does not postpone Offline.
    let long = Observation {
        lease_duration_seconds: Some(300),
        ..obs(31)
    };
    assert_eq!(assess(&long).phase, EdgePhase::Offline);
}

#[test]
fn late_heartbeat_is_degraded_and_rechecks_at_the_timeout() {
    let a = assess(&obs(20));
    assert_eq!(a.phase, EdgePhase::Degraded);
    assert_eq!(a.next_check, Some(Duration::from_secs(10) + DEADLINE_SLACK));
}

#[test]
fn expired_heartbeat_is_offline_with_no_further_check() {
    let a = assess(&obs(31));
    assert_eq!(a.phase, EdgePhase::Offline);
    let hb = cond(&a, "Heartbeat");
    assert!(!hb.status);
    assert_eq!(hb.reason, reason::HEARTBEAT_EXPIRED);
    assert!(hb.message.contains("more than 30s"), "{}", hb.message);
    assert_eq!(cond(&a, "Ready").reason, reason::HEARTBEAT_EXPIRED);
    assert_eq!(a.next_check, None, "only a renewal can bring it back");
    // lastHeartbeat still reports the last renewal seen.
    assert_eq!(a.last_heartbeat, Some(t(0)));
}

#[test]
fn renewal_after_offline_returns_to_ready() {
    let offline = assess(&obs(40));
    assert_eq!(offline.phase, EdgePhase::Offline);
    let back = assess(&Observation {
        renew_time: Some(t(40)),
        ..obs(41)
    });
    assert_eq!(back.phase, EdgePhase::Ready);
    assert_eq!(back.last_heartbeat, Some(t(40)));
}

#[test]
fn messages_do_not_change_while_time_passes() {
    // Status is rewritten only when it changes: the same facts later give the same result.
    let a = assess(&obs(1));
    let b = assess(&obs(9));
    assert_eq!(a.conditions, b.conditions);
    let c = assess(&obs(12));
    let d = assess(&obs(25));
    assert_eq!(c.conditions, d.conditions);
}

#[test]
fn missing_node_is_offline_with_a_condition_saying_so() {
    let a = assess(&Observation {
        node: Err(Unresolved::NotFound("Node edge-9 does not exist".into())),
        ..obs(1)
    });
    assert_eq!(a.phase, EdgePhase::Offline);
    assert_eq!(a.node_name, None);
    // A stale Lease of a deleted Node is no heartbeat.
    assert_eq!(a.last_heartbeat, None);
    assert_eq!(a.next_check, None);
    for c in &a.conditions {
        assert!(!c.status);
        assert_eq!(c.reason, reason::NODE_NOT_FOUND);
        assert!(c.message.contains("edge-9"), "{}", c.message);
    }
}

#[test]
fn ambiguous_selector_is_offline_and_names_the_nodes() {
    let a = assess(&Observation {
        node: Err(Unresolved::Ambiguous(vec!["a".into(), "b".into()])),
        ..obs(1)
    });
    assert_eq!(a.phase, EdgePhase::Offline);
    let hb = cond(&a, "Heartbeat");
    assert_eq!(hb.reason, reason::NODE_AMBIGUOUS);
    assert!(hb.message.contains("2 Nodes (a, b)"), "{}", hb.message);
}

#[test]
fn node_without_lease_is_offline() {
    let a = assess(&Observation {
        renew_time: None,
        ..obs(1)
    });
    assert_eq!(a.phase, EdgePhase::Offline);
    assert_eq!(cond(&a, "Heartbeat").reason, reason::NO_LEASE);
    assert_eq!(a.next_check, None);
}

#[test]
fn not_ready_node_is_degraded_with_its_message() {
    let a = assess(&Observation {
        node: Ok(NodeFacts {
            ready: Some(false),
            ready_message: Some("PLEG is not healthy".into()),
            ..node()
        }),
        ..obs(1)
    });
    assert_eq!(a.phase, EdgePhase::Degraded);
    let r = cond(&a, "Ready");
    assert_eq!(r.reason, reason::NODE_NOT_READY);
    assert!(r.message.contains("PLEG is not healthy"), "{}", r.message);
    // The heartbeat itself is fine.
    assert!(cond(&a, "Heartbeat").status);
    // A Node with no Ready condition at all is not Ready either.
    let unknown = assess(&Observation {
        node: Ok(NodeFacts {
            ready: None,
            ..node()
        }),
        ..obs(1)
    });
    assert_eq!(unknown.phase, EdgePhase::Degraded);
}

#[test]
fn unschedulable_node_is_degraded() {
    let a = assess(&Observation {
        node: Ok(NodeFacts {
            unschedulable: true,
            ..node()
        }),
        ..obs(1)
    });
    assert_eq!(a.phase, EdgePhase::Degraded);
    assert_eq!(cond(&a, "Ready").reason, reason::NODE_UNSCHEDULABLE);
}

#[test]
fn cordoned_wins_over_everything_but_heartbeat_is_still_reported() {
    for o in [
        obs(1),
        obs(50),
        Observation {
            node: Err(Unresolved::NotFound("gone".into())),
            ..obs(1)
        },
    ] {
        let a = assess(&Observation {
            cordoned: true,
            ..o.clone()
        });
        assert_eq!(a.phase, EdgePhase::Cordoned);
        assert_eq!(cond(&a, "Ready").reason, reason::CORDONED);
        assert_eq!(
            cond(&a, "Heartbeat"),
            cond(&assess(&o), "Heartbeat"),
            "cordoning does not change what the heartbeat says"
        );
    }
}

#[test]
fn offline_wins_over_not_ready() {
    let a = assess(&Observation {
        node: Ok(NodeFacts {
            ready: Some(false),
            ..node()
        }),
        ..obs(100)
    });
    assert_eq!(a.phase, EdgePhase::Offline);
}

#[test]
fn renewal_in_the_future_counts_as_now() {
    let a = assess(&Observation {
        renew_time: Some(t(5)),
        ..obs(0)
    });
    assert_eq!(a.phase, EdgePhase::Ready);
    // Late boundary measured from the renewal: 5 + 10 - 0.
    assert_eq!(a.next_check, Some(Duration::from_secs(15) + DEADLINE_SLACK));
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn resolves_by_name() {
    let l = labels(&[]);
    assert_eq!(resolve(&spec(), [("edge-0", &l)]), Ok("edge-0".into()));
    assert_eq!(
        resolve(&spec(), []),
        Err(Unresolved::NotFound("Node edge-0 does not exist".into()))
    );
}

#[test]
fn resolves_a_selector_matching_exactly_one_node() {
    let s = EdgeNodeSpec {
        node_name: None,
        node_selector: Some(labels(&[("site", "berlin")])),
        ..spec()
    };
    let berlin = labels(&[("site", "berlin"), ("x", "y")]);
    let paris = labels(&[("site", "paris")]);
    assert_eq!(
        resolve(&s, [("n1", &berlin), ("n2", &paris)]),
        Ok("n1".into())
    );
    assert_eq!(
        resolve(&s, [("n2", &paris)]),
        Err(Unresolved::NotFound(
            "nodeSelector site=berlin matches no Node".into()
        ))
    );
    assert_eq!(
        resolve(&s, [("n3", &berlin), ("n1", &berlin)]),
        Err(Unresolved::Ambiguous(vec!["n1".into(), "n3".into()]))
    );
}

#[test]
fn node_labels_carry_name_site_and_region() {
    assert_eq!(
        node_labels("en-1", &spec()),
        labels(&[
            ("tidal.rs/edge-node", "en-1"),
            ("tidal.rs/site", "berlin-1"),
            ("topology.kubernetes.io/region", "eu-central"),
        ])
    );
    let no_region = EdgeNodeSpec {
        region: None,
        ..spec()
    };
    assert!(!node_labels("en-1", &no_region).contains_key(LABEL_REGION));
}

#[test]
fn labels_are_applied_only_when_missing_different_or_no_longer_wanted() {
    let desired = labels(&[("a", "1"), ("b", "2")]);
    let owned: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
    let current = labels(&[("a", "1"), ("b", "2"), ("kwok", "x")]);
    assert!(!labels_need_apply(&desired, &current, &owned));
    assert!(labels_need_apply(&desired, &labels(&[("a", "1")]), &owned));
    assert!(labels_need_apply(
        &desired,
        &labels(&[("a", "1"), ("b", "3")]),
        &owned
    ));
    let stale: BTreeSet<String> = ["a".to_string(), "b".to_string(), "c".to_string()].into();
    assert!(labels_need_apply(&desired, &current, &stale));
}

#[test]
fn owned_label_keys_reads_managed_fields() {
    let f = serde_json::json!({
        "f:metadata": {"f:labels": {"f:tidal.rs/site": {}, "f:tidal.rs/edge-node": {}, ".": {}}},
        "f:spec": {}
    });
    let keys: Vec<String> = owned_label_keys(&f).into_iter().collect();
    assert_eq!(keys, vec!["tidal.rs/edge-node", "tidal.rs/site"]);
    assert!(owned_label_keys(&serde_json::json!({})).is_empty());
}

#[test]
fn edge_facts_take_phase_from_status_or_unknown() {
    let mut en = EdgeNode::new("en-1", spec());
    let f = edge_facts(&en);
    assert_eq!(f.phase, EdgePhase::Unknown);
    assert_eq!(f.node_name, None);
    assert_eq!(f.name, "en-1");
    assert!(f.failover_to_cloud);
    en.status = Some(EdgeNodeStatus {
        phase: EdgePhase::Offline,
        node_name: Some("edge-0".into()),
        ..Default::default()
    });
    en.metadata.labels = Some(labels(&[("tier", "store")]));
    let f = edge_facts(&en);
    assert_eq!(f.phase, EdgePhase::Offline);
    assert_eq!(f.node_name.as_deref(), Some("edge-0"));
    assert_eq!(f.labels, labels(&[("tier", "store")]));
}

#[test]
fn last_heartbeat_is_whole_seconds() {
    let a = assess(&Observation {
        renew_time: Some(t(0) + SignedDuration::from_millis(700)),
        ..obs(1)
    });
    assert_eq!(a.last_heartbeat, Some(t(0)));
}

#[test]
fn refers_to_node_by_name_status_or_selector() {
    let by_name = EdgeNode::new("a", spec());
    assert!(refers_to_node(&by_name, "edge-0", None));
    assert!(!refers_to_node(&by_name, "edge-1", None));

    let mut by_sel = EdgeNode::new(
        "b",
        EdgeNodeSpec {
            node_name: None,
            node_selector: Some(labels(&[("site", "x")])),
            ..spec()
        },
    );
    let x = labels(&[("site", "x")]);
    let y = labels(&[("site", "y")]);
    assert!(refers_to_node(&by_sel, "n1", Some(&x)));
    assert!(!refers_to_node(&by_sel, "n1", Some(&y)));
    assert!(!refers_to_node(&by_sel, "n1", None));
    // Once resolved, its Node's Lease (no labels) and a Node that stopped matching still count.
    by_sel.status = Some(EdgeNodeStatus {
        node_name: Some("n1".into()),
        ..Default::default()
    });
    assert!(refers_to_node(&by_sel, "n1", None));
    assert!(refers_to_node(&by_sel, "n1", Some(&y)));
}

#[test]
fn node_claimed_by_another_edge_node_is_offline_and_rechecked() {
    let a = assess(&Observation {
        claimed_by: Some("other".into()),
        ..obs(1)
    });
    assert_eq!(a.phase, EdgePhase::Offline);
    let r = cond(&a, "Ready");
    assert_eq!(r.reason, reason::NODE_CLAIMED);
    assert!(r.message.contains("EdgeNode other"), "{}", r.message);
    assert_eq!(a.node_name, None, "not this EdgeNode's Node");
    // The heartbeat's own deadline (late at 10s) comes before the claim re-check.
    assert_eq!(a.next_check, Some(Duration::from_secs(9) + DEADLINE_SLACK));
    let expired = assess(&Observation {
        claimed_by: Some("other".into()),
        ..obs(100)
    });
    assert_eq!(expired.next_check, Some(CLAIM_RECHECK));
    // Cordoned still wins.
    let c = assess(&Observation {
        claimed_by: Some("other".into()),
        cordoned: true,
        ..obs(1)
    });
    assert_eq!(c.phase, EdgePhase::Cordoned);
}

#[test]
fn only_a_live_other_holder_claims_a_node() {
    let held = labels(&[("tidal.rs/edge-node", "b")]);
    assert_eq!(claimed_by_other("a", &held, |n| n == "b"), Some("b".into()));
    // A stale label (b is gone or elsewhere) claims nothing.
    assert_eq!(claimed_by_other("a", &held, |_| false), None);
    // Its own label is no claim.
    assert_eq!(claimed_by_other("b", &held, |_| true), None);
    assert_eq!(claimed_by_other("a", &labels(&[]), |_| true), None);
}

#[test]
fn a_site_first_seen_ready_is_no_news_every_other_change_is() {
    use EdgePhase::*;
    assert!(!phase_change_is_news(Unknown, Ready));
    assert!(!phase_change_is_news(Ready, Ready));
    for (from, to) in [
        (Unknown, Offline),
        (Unknown, Degraded),
        (Unknown, Cordoned),
        (Ready, Offline),
        (Offline, Ready),
        (Degraded, Ready),
    ] {
        assert!(phase_change_is_news(from, to), "{from:?} -> {to:?}");
    }
}

#[test]
fn a_node_without_a_lease_is_unassessed_for_the_timeout_then_offline() {
    // EdgeNode created at t(100) for a Node whose Lease neither the cache nor the cluster has.
    let fresh = |now| Observation {
        renew_time: None,
        paired_since: Some(t(100)),
        ..obs(now)
    };
    let a = assess(&fresh(100));
    assert_eq!(a.phase, EdgePhase::Unknown, "{a:?}");
    let ready = &a.conditions[1];
    assert_eq!(ready.reason, reason::AWAITING_HEARTBEAT);
    assert!(ready.message.contains(&t(130).to_string()), "{ready:?}");
    // Rechecked when the grace ends, and the same status until then (nothing rewritten).
    assert_eq!(a.next_check, Some(Duration::from_secs(30) + DEADLINE_SLACK));
    assert_eq!(assess(&fresh(120)).conditions, a.conditions);
    // No Lease by then: Offline, saying why.
    let late = assess(&fresh(131));
    assert_eq!(late.phase, EdgePhase::Offline);
    assert_eq!(late.conditions[1].reason, reason::NO_LEASE);
    // The Lease shows up within the grace: Ready, and Unknown -> Ready is no news.
    let renewed = assess(&Observation {
        renew_time: Some(t(101)),
        ..fresh(102)
    });
    assert_eq!(renewed.phase, EdgePhase::Ready);
    assert!(!phase_change_is_news(a.phase, renewed.phase));
    // An EdgeNode paired long ago whose Lease disappears is Offline at once.
    let old = assess(&Observation {
        renew_time: None,
        paired_since: Some(t(0)),
        ..obs(100)
    });
    assert_eq!(old.phase, EdgePhase::Offline);
}
