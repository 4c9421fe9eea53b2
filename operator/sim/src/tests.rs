//! End-to-end tests of the simulator: all policies on short synthetic traces.

use super::engine::{Outage, simulate};
use super::policy::{Action, Observation, Policy};
use super::synthetic::{Pattern, Synthetic};
use super::tidal::TidalOptions;
use super::*;

fn steps() -> Trace {
    Synthetic::new(Pattern::Steps).generate()
}

#[test]
fn all_policies_run_on_a_step_trace_and_tidal_scales_at_the_first_step() {
    let trace = steps();
    let total = trace.total_requests();
    let setup = ModelOptions::default().setup(&trace).unwrap();
    let sc = run_scenario(
        trace,
        setup,
        &PolicyKind::ALL,
        &TidalOptions::default(),
        &[],
    );
    assert_eq!(sc.summaries.len(), 4);
    for s in &sc.summaries {
        assert!(
            (s.requests - total).abs() < 1e-6,
            "{}: {}",
            s.policy,
            s.requests
        );
        assert!(s.slo_attainment > 0.5 && s.slo_attainment <= 1.0, "{s:?}");
        assert!(s.replica_seconds > 0.0 && s.scale_events > 0, "{s:?}");
    }
    // The load doubles at t = 900 s; Tidal must add replicas before a cold start's worth of
    // backlog builds up at the old count, i.e. within the following minute.
    let tidal = sc.runs.iter().find(|r| r.policy == "tidal").unwrap();
    let before = tidal
        .syncs
        .iter()
        .filter(|s| s.time_s < 900.0)
        .map(|s| s.cloud_desired)
        .next_back()
        .unwrap();
    let rose = tidal
        .syncs
        .iter()
        .find(|s| s.time_s >= 900.0 && s.cloud_desired > before)
        .map(|s| s.time_s);
    assert!(rose.is_some_and(|t| t <= 960.0), "rose at {rose:?}");
}

#[test]
fn the_fast_path_misses_fewer_burst_requests_than_the_slow_path_alone() {
    // Bursts shorter than a few slow intervals: the workers' queues, read every 2 s, bring
    // replicas in before the 15 s loop sees the rate; both modes of the cluster model.
    let trace = Synthetic::new(Pattern::Bursts).generate();
    let setup = ModelOptions::default().setup(&trace).unwrap();
    let slow = TidalOptions {
        fast: None,
        ..TidalOptions::default()
    };
    assert_eq!(variant_name(&slow), "tidal-no-fast");
    let fluid = run_scenario(
        trace.clone(),
        setup.clone(),
        &[PolicyKind::Tidal],
        &TidalOptions::default(),
        &[slow],
    );
    let des = run_scenario_des(
        trace,
        setup,
        &[PolicyKind::Tidal],
        &TidalOptions::default(),
        &[slow],
        des::DEFAULT_MAX_BATCH,
        1,
    )
    .unwrap();
    for sc in [&fluid, &des] {
        let misses = |name: &str| {
            let s = sc.summaries.iter().find(|s| s.policy == name).unwrap();
            s.requests * (1.0 - s.slo_attainment)
        };
        let (fast, no_fast) = (misses("tidal"), misses("tidal-no-fast"));
        assert!(
            fast < no_fast,
            "fast path {fast}, slow path alone {no_fast}"
        );
    }
}

#[test]
fn on_a_fast_ramp_tidal_meets_the_slo_at_least_as_often_as_hpa() {
    // 20 -> 80 rps in five minutes and back: faster than HPA's reactive steps plus a cold start.
    let mut syn = Synthetic::new(Pattern::Ramps);
    syn.duration_s = 600.0;
    let trace = syn.generate();
    let setup = ModelOptions::default().setup(&trace).unwrap();
    let sc = run_scenario(
        trace,
        setup,
        &[PolicyKind::Tidal, PolicyKind::Hpa],
        &TidalOptions::default(),
        &[],
    );
    let (tidal, hpa) = (&sc.summaries[0], &sc.summaries[1]);
    assert!(
        tidal.slo_attainment >= hpa.slo_attainment,
        "tidal {tidal:?} vs hpa {hpa:?}"
    );
    // Tidal reports a forecast every sync, and it is scored.
    assert!(tidal.forecasts_scored > 20, "{tidal:?}");
    assert!(tidal.mape.is_some() && tidal.coverage.is_some());
}

/// Issue #18 item 2 end to end: on the hour-long ramps (where the trend floor keeps the
/// provisioned bound up, so the upper side misses less than nominal) and bursts (a tenth of
/// the time in bursts no forecast sees coming) the provisioned bound's miss rate and the
/// band's coverage end within 3 points of nominal (10 % and 80 % at q = 0.9).
#[test]
fn the_interval_holds_its_nominal_levels_on_ramps_and_bursts() {
    for pattern in [Pattern::Ramps, Pattern::Bursts] {
        let trace = Synthetic::new(pattern).generate();
        let setup = ModelOptions::default().setup(&trace).unwrap();
        let sc = run_scenario(
            trace,
            setup,
            &[PolicyKind::Tidal],
            &TidalOptions::default(),
            &[],
        );
        let t = &sc.summaries[0];
        assert!(t.forecasts_scored > 200, "{t:?}");
        let (above, cov) = (t.exceeded.unwrap(), t.coverage.unwrap());
        assert!(
            (above - 0.1).abs() <= 0.03 && (cov - 0.8).abs() <= 0.03,
            "{pattern:?}: above {above}, coverage {cov}"
        );
    }
}

#[test]
fn a_fixed_count_policy_falls_behind_a_step() {
    struct Fixed(u32);
    impl Policy for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn interval_s(&self) -> f64 {
            15.0
        }
        fn decide(&mut self, _: &Observation) -> Action {
            Action {
                cloud: self.0,
                ..Default::default()
            }
        }
    }
    let trace = steps();
    let setup = ModelOptions::default().setup(&trace).unwrap();
    // Enough for the base load (20 rps at ~7.5 rps/replica capacity), not for 80 rps.
    let low = simulate(&trace, &setup, &mut Fixed(4));
    let high = simulate(&trace, &setup, &mut Fixed(16));
    let (sl, sh) = (low.totals, high.totals);
    assert!(sl.served_ok / sl.arrived < 0.75, "{sl:?}");
    assert!(sh.served_ok / sh.arrived > 0.99, "{sh:?}");
    assert!(sl.dropped > 0.0);
    assert!(sh.replica_seconds > 3.0 * sl.replica_seconds);
}

#[test]
fn an_offline_edge_site_fails_over_to_the_cloud_and_is_reported_offline() {
    struct Recorder(Vec<(f64, bool, f64, f64)>);
    impl Policy for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn interval_s(&self) -> f64 {
            15.0
        }
        fn decide(&mut self, obs: &Observation) -> Action {
            let s = &obs.sites[0].1;
            self.0.push((
                obs.time_s,
                s.online,
                s.sample.arrival_rps,
                obs.cloud.sample.arrival_rps,
            ));
            Action {
                cloud: 12,
                sites: vec![4, 4],
                forecast: None,
            }
        }
    }
    let mut syn = Synthetic::new(Pattern::Steps);
    syn.duration_s = 1800.0;
    let trace = syn.generate();
    let total = trace.total_requests();
    let opts = ModelOptions {
        edge_sites: 2,
        edge_fraction: 0.4,
        outages: vec![Outage {
            site: 0,
            start_s: 600.0,
            end_s: 1200.0,
        }],
        ..Default::default()
    };
    let setup = opts.setup(&trace).unwrap();
    let mut rec = Recorder(vec![]);
    let run = simulate(&trace, &setup, &mut rec);
    assert!(
        (run.totals.arrived - total).abs() < 1e-6,
        "nothing is lost in the failover"
    );
    let during: Vec<_> = rec
        .0
        .iter()
        .filter(|r| r.0 > 615.0 && r.0 < 1200.0)
        .collect();
    assert!(!during.is_empty() && during.iter().all(|r| !r.1 && r.2 == 0.0));
    assert!(
        rec.0
            .iter()
            .filter(|r| r.0 > 0.0 && r.0 < 600.0)
            .all(|r| r.1 && r.2 > 0.0)
    );
    // Until t = 900 s the load is at 2x (40 rps); with site 0's 20 % on the cloud, the cloud
    // gets 0.8 of it instead of 0.6.
    let phase2: Vec<_> = during.iter().filter(|r| r.0 <= 900.0).collect();
    let cloud_during = phase2.iter().map(|r| r.3).sum::<f64>() / phase2.len() as f64;
    assert!((cloud_during - 32.0).abs() < 3.0, "{cloud_during}");

    // Every policy, Tidal included, runs with edge sites and the outage.
    let sc = run_scenario(
        trace,
        setup,
        &PolicyKind::ALL,
        &TidalOptions::default(),
        &[],
    );
    for s in &sc.summaries {
        assert!((s.requests - total).abs() < 1e-6, "{s:?}");
    }

    // As single requests: none goes to the site while it is cut off, none is lost, and every
    // policy runs on batching replicas.
    let requests = des::requests(&sc.trace, 1);
    assert_eq!(requests.len() as f64, total);
    let routed = engine::route_requests(&sc.trace, &requests, sc.setup.edge.as_ref());
    let count = |ticks: &[Vec<trace::Request>], r: std::ops::Range<usize>| -> usize {
        ticks[r].iter().map(Vec::len).sum()
    };
    assert_eq!(count(&routed.sites[0], 600..1200), 0);
    assert!(count(&routed.sites[0], 0..600) > 0);
    // 40 rps from 450 s to 900 s: with site 0 cut off, the cloud takes 80 % instead of 60 %.
    let cloud = count(&routed.cloud, 600..900) as f64 / 300.0;
    assert!((cloud - 32.0).abs() < 2.0, "{cloud}");
    let sc = run_scenario_des(
        sc.trace,
        sc.setup,
        &PolicyKind::ALL,
        &TidalOptions::default(),
        &[],
        des::DEFAULT_MAX_BATCH,
        1,
    )
    .unwrap();
    for (s, r) in sc.summaries.iter().zip(&sc.runs) {
        assert_eq!(s.requests, total, "{s:?}");
        let t = &r.totals;
        assert_eq!(t.served_ok + t.served_late + t.dropped, total, "{s:?}");
        assert!(s.slo_attainment > 0.5 && s.ttft_p95_s.is_some(), "{s:?}");
    }
}

#[test]
fn the_plot_is_an_svg_with_every_policy() {
    let mut syn = Synthetic::new(Pattern::Ramps);
    syn.duration_s = 900.0;
    let trace = syn.generate();
    let setup = ModelOptions::default().setup(&trace).unwrap();
    let sc = run_scenario(
        trace,
        setup,
        &PolicyKind::ALL,
        &TidalOptions::default(),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ramps.svg");
    plot::plot_scenario(&sc, &path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"));
    for p in ["tidal", "hpa", "kpa", "aibrix"] {
        assert!(svg.contains(p), "legend lacks {p}");
    }
}

#[test]
fn bad_model_options_are_rejected() {
    let trace = steps();
    let bad = ModelOptions {
        min_replicas: 10,
        max_replicas: 2,
        ..Default::default()
    };
    assert!(bad.setup(&trace).unwrap_err().contains("min replicas"));
    let bad = ModelOptions {
        outages: vec![Outage {
            site: 3,
            start_s: 0.0,
            end_s: 1.0,
        }],
        ..Default::default()
    };
    assert!(bad.setup(&trace).is_err());
    assert!("tidal".parse::<PolicyKind>().is_ok() && "vpa".parse::<PolicyKind>().is_err());
}

#[test]
fn the_sweep_reproduces_the_shared_target_run_and_feeds_the_matched_verdict() {
    let mut syn = Synthetic::new(Pattern::Steps);
    syn.duration_s = 1200.0;
    let trace = syn.generate();
    let setup = ModelOptions::default().setup(&trace).unwrap();
    let policies = [PolicyKind::Tidal, PolicyKind::Hpa, PolicyKind::Kpa];
    let tidal = TidalOptions::default();
    let curves = sweep(&trace, &setup, &policies, &tidal, &[0.6, 0.8, 1.0], 2);
    let mut sc = run_scenario(trace, setup, &policies, &tidal, &[]);
    assert_eq!(curves.len(), 3);
    for (c, s) in curves.iter().zip(&sc.summaries) {
        assert_eq!(c.policy, s.policy);
        let u: Vec<f64> = c.points.iter().map(|p| p.utilization).collect();
        assert_eq!(u, vec![0.6, 0.8, 1.0]);
        // The shared target is 0.8: the same run, whichever thread replayed it.
        assert_eq!(
            c.points[1].replica_seconds, s.replica_seconds,
            "{}",
            c.policy
        );
        assert_eq!(c.points[1].attainment, s.slo_attainment, "{}", c.policy);
        // More headroom costs more.
        assert!(
            c.points[0].replica_seconds > c.points[2].replica_seconds,
            "{c:?}"
        );
    }
    sc.curves = curves;
    let v = report::verdict(&sc).unwrap();
    let best = report::best_baseline(&sc.summaries).unwrap();
    let t = &sc.summaries[0];
    assert!((v.cost - t.replica_seconds / best.replica_seconds).abs() < 1e-9);
    // Tidal's own curve passes through the reference cost or costs more everywhere; either
    // way the matched ratios exist or say why not in the table.
    let table = report::matched_table(&sc).unwrap();
    assert!(
        table.contains("| tidal |") && table.contains("| kpa |"),
        "{table}"
    );
    let summary = report::verdict_table(std::slice::from_ref(&v));
    assert!(summary.contains("synthetic-steps"), "{summary}");
    assert_eq!(summary.contains("| yes |"), v.wins(), "{summary}");
}

#[test]
fn held_out_scores_take_tidal_s_setting_from_the_other_scenarios_only() {
    let policies = [PolicyKind::Tidal, PolicyKind::Hpa, PolicyKind::Kpa];
    let tidal = TidalOptions::default();
    let us = [0.6, 0.8, 1.0];
    let scenario = |p: Pattern| {
        let mut syn = Synthetic::new(p);
        syn.duration_s = 1800.0;
        let trace = syn.generate();
        let setup = ModelOptions::default().setup(&trace).unwrap();
        let curves = sweep(&trace, &setup, &policies, &tidal, &us, 2);
        let mut sc = run_scenario(trace, setup, &policies, &tidal, &[]);
        sc.curves = curves;
        sc
    };
    let all: Vec<Scenario> = [Pattern::Steps, Pattern::Ramps, Pattern::FlashCrowd]
        .into_iter()
        .map(scenario)
        .collect();
    let named: Vec<(String, Vec<frontier::Curve>)> = all
        .iter()
        .map(|sc| (sc.trace.name.clone(), sc.curves.clone()))
        .collect();
    let loo = heldout::leave_one_out(&named[..2]);
    assert_eq!(loo.len(), 2);
    for (i, h) in loo.iter().enumerate() {
        // Scored at the setting the *other* scenario prefers, whatever this one would.
        let other = &named[1 - i].1;
        assert_eq!(
            Some(h.score.point.utilization),
            heldout::choose(&[other.as_slice()])
        );
        assert_eq!(
            Some(h.score),
            heldout::score_at(&named[i].1, h.score.point.utilization)
        );
    }
    let setting = heldout::choose(&[&named[0].1, &named[1].1]).unwrap();
    assert!(us.contains(&setting));
    let fresh = heldout::HeldOut {
        trace: named[2].0.clone(),
        score: heldout::score_at(&named[2].1, setting).unwrap(),
    };
    let verdicts: Vec<report::Verdict> = all.iter().filter_map(report::verdict).collect();
    let all_held_out = heldout::leave_one_out_all(&named[..2]);
    assert_eq!(all_held_out.len(), 2);
    assert_eq!(all_held_out[0].points.len(), policies.len());
    let doc = report::held_out_section(
        &loo,
        &all_held_out,
        &verdicts[..2],
        setting,
        std::slice::from_ref(&fresh),
        &verdicts[2..],
    );
    for name in [
        "synthetic-steps",
        "synthetic-ramps",
        "synthetic-flash-crowd",
    ] {
        assert!(doc.contains(&format!("| {name} |")), "{doc}");
    }
    assert!(doc.contains("| tidal | hpa | kpa |"), "{doc}");
    let wins = loo.iter().filter(|h| h.score.wins()).count();
    assert!(
        doc.contains(&format!("better on both on {wins} of 2 shared")),
        "{doc}"
    );
}

#[test]
fn quiet_edge_sites_sleep_cheaper_with_their_clients_served_by_the_cloud_and_wake_ahead() {
    // Three days of business hours (nothing at night), 2 sites with 30 % of the load.
    let mut syn = Synthetic::new(Pattern::StoreHours);
    syn.tick_s = 15.0;
    let trace = syn.generate();
    let model = ModelOptions {
        edge_sites: 2,
        edge_fraction: 0.3,
        ..ModelOptions::default()
    };
    let rows = sleep_study(&trace, &model, &TidalOptions::default(), None, 1).unwrap();
    let row = |policy: &str, min: u32| {
        rows.iter()
            .find(|r| r.policy == policy && r.edge_min == min)
            .unwrap()
    };
    let (on, asleep, kpa) = (row("tidal", 1), row("tidal", 0), row("kpa", 0));
    for r in [on, asleep, kpa] {
        eprintln!(
            "{} min {}: attainment {:.4}, replica-s {:.0}, {:?}",
            r.policy, r.edge_min, r.summary.slo_attainment, r.summary.replica_seconds, r.sleep
        );
    }
    // Every night each site sleeps (2 sites x 3 nights, the first from the start).
    assert!(asleep.sleep.sleeps >= 6, "{:?}", asleep.sleep);
    assert_eq!(on.sleep.sleeps, 0, "{:?}", on.sleep);
    // Sleeping saves most of the sites' night: a clear cut in their replica-seconds.
    assert!(
        asleep.sleep.edge_replica_seconds < 0.8 * on.sleep.edge_replica_seconds,
        "{:?} vs {:?}",
        asleep.sleep,
        on.sleep
    );
    // Requests that came while a site slept went to the cloud: none waits for a cold start,
    // so sleeping costs no more misses than staying on (within 0.2 % of the requests) ...
    assert!(asleep.sleep.served_by_cloud > 0.0, "{:?}", asleep.sleep);
    assert!(
        asleep.summary.slo_attainment >= on.summary.slo_attainment - 0.002,
        "{:?} vs {:?}",
        asleep.summary,
        on.summary
    );
    // ... where a site that waits for its own replica (Knative's activator) misses what
    // arrives during each cold start.
    assert!(
        kpa.summary.slo_attainment < asleep.summary.slo_attainment,
        "{:?} vs {:?}",
        kpa.summary,
        asleep.summary
    );
    // The daily pattern is learnt: from the second morning on, the site's replica is ready
    // before its demand is back.
    assert!(
        asleep.sleep.returns_hidden >= 2,
        "hidden {} exposed {}",
        asleep.sleep.returns_hidden,
        asleep.sleep.returns_exposed
    );
}
