use super::*;

fn replica() -> ReplicaModel {
    ReplicaModel {
        capacity_rps: 2.0,
        cold_start_s: 30.0,
        prefill_s: 0.3,
        slo_ttft_s: 2.0,
        max_wait_s: 1e9,
    }
}

fn model() -> BatchModel {
    BatchModel::calibrated(replica(), DEFAULT_MAX_BATCH, 1000.0, 100.0).unwrap()
}

fn req(t_s: f64) -> Request {
    Request {
        t_s,
        input_tokens: 1000,
        output_tokens: 100,
    }
}

/// Drives `tier` for `secs` one-second ticks with `per_tick(k)` arriving in tick k.
fn drive(tier: &mut BatchTier, from: usize, secs: usize, per_tick: impl Fn(usize) -> Vec<Request>) {
    for k in from..from + secs {
        tier.tick(k as f64, 1.0, &per_tick(k));
    }
}

#[test]
fn steps_have_the_workers_shape_and_a_full_replica_completes_its_capacity() {
    let m = model();
    let (s1, s4, s16) = (m.step(1), m.step(4), m.step(16));
    let rel = |a: f64, b: f64| a / b;
    assert!((rel(s4, s1) - (4.0 / 74.2) / (1.0 / 25.8)).abs() < 1e-9);
    assert!((rel(s16, s1) - (16.0 / 98.8) / (1.0 / 25.8)).abs() < 1e-9);
    // Interpolated between the measured points, increasing.
    assert!(m.step_s.windows(2).all(|w| w[1] > w[0]), "{:?}", m.step_s);
    assert!((m.prefill_s_per_token * 1000.0 + m.overhead_s - 0.3).abs() < 1e-12);

    // A saturated replica: a deep queue of the mean request keeps every slot busy.
    let mut t = BatchTier::new(m, 1);
    t.tick(0.0, 1.0, &(0..2000).map(|_| req(0.0)).collect());
    drive(&mut t, 1, 599, |_| vec![]);
    let obs = t.observe(600.0, true);
    let rate = obs.sample.served_rps;
    assert!(
        (rate - 2.0).abs() < 0.05,
        "completed {rate} rps, capacity 2"
    );
    assert_eq!(obs.sample.running, 16.0);
    assert!(obs.sample.queue_depth > 500.0);
}

#[test]
fn a_prefill_waits_for_the_one_before_it_on_the_replica() {
    let m = model();
    let mut t = BatchTier::new(m.clone(), 1);
    t.tick(0.0, 1.0, &vec![req(0.0), req(0.0)]);
    let obs = t.observe(1.0, true);
    // TTFTs 0.3 and 0.3 + 0.2 (the first prefill's work): the 0.1 s overhead is not work.
    assert_eq!(t.totals.served_ok, 2.0);
    let p95 = obs.sample.ttft_p95_s.unwrap();
    assert!((p95 - 0.5).abs() < 1e-9, "{p95}");
    assert_eq!(obs.sample.running, 2.0);
    assert_eq!(obs.sample.queue_depth, 0.0);
}

/// TTFT p95 and (served, arrived) of 2 fixed replicas under an hour of Poisson arrivals at
/// `load` of their capacity (equal prompts, exponential output lengths).
fn p95_at(load: f64) -> (f64, f64, f64) {
    p95_with(load, Dispatch::LeastLoaded)
}

fn p95_with(load: f64, dispatch: Dispatch) -> (f64, f64, f64) {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(5);
    let mut arrivals: Vec<Vec<Request>> = vec![Vec::new(); 3600];
    let mut t = 0.0;
    loop {
        t += -rng.random::<f64>().max(1e-12).ln() / (4.0 * load);
        if t >= 3600.0 {
            break;
        }
        let output_tokens = (-100.0 * rng.random::<f64>().max(1e-12).ln()).max(1.0) as u32;
        // Equal prompts: a TTFT above the prefill's is waiting, not a longer prompt.
        arrivals[t as usize].push(Request {
            t_s: t,
            input_tokens: 1000,
            output_tokens,
        });
    }
    let mut des = BatchTier::new(
        BatchModel {
            dispatch,
            ..model()
        },
        2,
    );
    drive(&mut des, 0, 3600, |k| arrivals[k].clone());
    let served = des.totals.served_ok + des.totals.served_late;
    (
        des.totals.ttft.quantile(0.95).unwrap(),
        served,
        des.totals.arrived,
    )
}

#[test]
fn requests_queue_below_saturation_more_the_busier_the_replicas() {
    let (half, served, arrived) = p95_at(0.5);
    let (most, _, _) = p95_at(0.75);
    let (busy, busy_served, busy_arrived) = p95_at(0.95);
    eprintln!("TTFT p95 at 50/75/95 % of capacity: {half:.2} / {most:.2} / {busy:.2} s");
    // Waiting behind other prefills even at half load (the bare TTFT is 0.3 s) ...
    assert!(half > 0.35, "{half}");
    // ... and more as the batches fill.
    assert!(most > half && busy > most, "{half} {most} {busy}");
    // Still below saturation: everything is served (a few in prefill at the end).
    assert!(served >= arrived - 5.0 && busy_served >= busy_arrived - 20.0);
}

#[test]
fn scale_down_drains_in_flight_requests_and_pays_until_they_finish() {
    let mut t = BatchTier::new(model(), 2);
    t.tick(0.0, 1.0, &vec![req(0.0); 4]);
    assert_eq!(t.in_flight(), 4);
    t.set_desired(1.0, 0);
    assert_eq!((t.desired(), t.ready()), (0, 0));
    // Both replicas drain (2 requests each), still paid for.
    t.tick(1.0, 1.0, &vec![]);
    assert_eq!(t.totals.replica_seconds, 4.0);
    drive(&mut t, 2, 60, |_| vec![]);
    assert_eq!(t.in_flight(), 0);
    let obs = t.observe(62.0, true);
    assert!((obs.sample.served_rps * 62.0 - 4.0).abs() < 1e-9);
    // Gone once empty: the cost stopped growing.
    let paid = t.totals.replica_seconds;
    assert!(paid < 2.0 * 62.0, "{paid}");
    t.tick(62.0, 1.0, &vec![]);
    assert_eq!(t.totals.replica_seconds, paid);
    // A request now waits: nothing serves it.
    t.tick(63.0, 1.0, &vec![req(63.0)]);
    assert_eq!(t.queue_len(), 1.0);
}

#[test]
fn scale_down_removes_pending_replicas_first() {
    let mut t = BatchTier::new(model(), 1);
    t.set_desired(0.0, 3);
    assert_eq!((t.desired(), t.ready()), (3, 1));
    t.tick(0.0, 1.0, &vec![req(0.0)]);
    t.set_desired(1.0, 1);
    assert_eq!((t.desired(), t.ready(), t.in_flight()), (1, 1, 1));
    assert_eq!(t.totals.cold_starts, 2);
}

#[test]
fn new_replicas_serve_after_the_cold_start_and_report_it() {
    let mut t = BatchTier::new(model(), 0);
    t.set_desired(0.0, 1);
    drive(
        &mut t,
        0,
        40,
        |k| if k == 0 { vec![req(0.0)] } else { vec![] },
    );
    let obs = t.observe(40.0, true);
    assert_eq!(obs.ready_times_s, vec![30.0]);
    // Waited 30 s for the replica: a miss.
    assert_eq!((t.totals.served_ok, t.totals.served_late), (0.0, 1.0));
    let ttft = obs.sample.ttft_p95_s.unwrap();
    assert!((ttft - 30.3).abs() < 1e-6, "{ttft}");
}

#[test]
fn requests_waiting_past_the_timeout_are_dropped_and_leftovers_at_finish() {
    let mut m = model();
    m.replica.max_wait_s = 5.0;
    let mut t = BatchTier::new(m, 0);
    drive(&mut t, 0, 10, |k| vec![req(k as f64)]);
    // Arrived at 0..=3 waited more than 5 s by the end of tick 9 (t = 10).
    assert_eq!(t.totals.dropped, 4.0);
    t.finish();
    assert_eq!(t.totals.dropped, 10.0);
}

#[test]
fn a_cut_off_target_hands_its_queue_over() {
    let mut site = BatchTier::new(model(), 0);
    let mut cloud = BatchTier::new(model(), 1);
    site.tick(0.0, 1.0, &vec![req(0.0), req(0.5)]);
    cloud.tick(0.0, 1.0, &vec![]);
    site.fail_over_to(&mut cloud);
    assert_eq!((site.queue_len(), site.totals.arrived), (0.0, 0.0));
    assert_eq!(cloud.totals.arrived, 2.0);
    cloud.tick(1.0, 1.0, &vec![]);
    assert_eq!(cloud.totals.served_ok, 2.0);
    // Waited from their arrival at the site: 1 s and 0.5 s before the cloud took them.
    let p95 = cloud.totals.ttft.quantile(0.95).unwrap();
    assert!(p95 > 1.0 && p95 < 1.6, "{p95}");
}

#[test]
fn calibration_refuses_a_prefill_that_leaves_no_decode_time() {
    let mut r = replica();
    r.capacity_rps = 4.0;
    r.prefill_s = 0.5;
    let e = BatchModel::calibrated(r, 16, 1000.0, 100.0).unwrap_err();
    assert!(e.contains("no room to decode"), "{e}");
    assert!(BatchModel::calibrated(replica(), 0, 1000.0, 100.0).is_err());
}

#[test]
fn requests_come_from_the_trace_or_are_drawn_from_its_arrivals() {
    let mut tr = Trace {
        name: "t".into(),
        tick_s: 1.0,
        arrivals: vec![2.0, 0.0, 1.0],
        mean_input_tokens: 500.0,
        mean_output_tokens: 50.0,
        requests: vec![req(0.1), req(0.2), req(2.5)],
    };
    assert_eq!(requests(&tr, 1), tr.requests);
    // Rescaled: drawn per tick, sizes resampled from the trace's own.
    tr.arrivals = vec![20.0, 0.0, 10.0];
    let r = requests(&tr, 1);
    assert_eq!(r.len(), 30);
    assert!(r[..20].iter().all(|x| x.t_s < 1.0) && r[20..].iter().all(|x| x.t_s >= 2.0));
    assert!(r.iter().all(|x| x.input_tokens == 1000));
    assert!(r.windows(2).all(|w| w[0].t_s <= w[1].t_s));
    assert_eq!(r, requests(&tr, 1), "seeded");
    assert_ne!(r, requests(&tr, 2));
    // No requests of its own: exponential sizes around the means.
    tr.requests.clear();
    tr.arrivals = vec![2000.0];
    let r = requests(&tr, 1);
    let mean_in = r.iter().map(|x| f64::from(x.input_tokens)).sum::<f64>() / 2000.0;
    assert!((mean_in - 500.0).abs() < 40.0, "{mean_in}");
}

#[test]
fn histogram_quantiles_are_within_a_bin() {
    let mut h = crate::cluster::TtftHistogram::default();
    assert_eq!(h.quantile(0.5), None);
    h.add(0.3, 90.0);
    h.add(5.0, 10.0);
    let p50 = h.quantile(0.5).unwrap();
    let p95 = h.quantile(0.95).unwrap();
    assert!((p50 / 0.3 - 1.0).abs() < 0.13, "{p50}");
    assert!((p95 / 5.0 - 1.0).abs() < 0.13, "{p95}");
}

#[test]
fn random_dispatch_queues_at_one_replica_while_another_has_room() {
    let random = Dispatch::Random { seed: 3 };
    let (ll, _, _) = p95_at(0.75);
    let (rnd, served, arrived) = p95_with(0.75, random);
    eprintln!("TTFT p95 at 75 % of capacity: least-loaded {ll:.2} s, random {rnd:.2} s");
    // A request sent to the busier replica waits for it even when the other has free slots.
    assert!(rnd > ll, "random {rnd} least-loaded {ll}");
    assert!(served >= arrived - 5.0, "{served} of {arrived}");
    // Seeded: the same run twice.
    assert_eq!(p95_with(0.75, random).0, rnd);

    // Requests sent to a replica wait in its own queue (counted as queued), and one that is
    // scaled down still serves them.
    let mut t = BatchTier::new(
        BatchModel {
            dispatch: random,
            ..model()
        },
        2,
    );
    t.tick(0.0, 1.0, &vec![req(0.0); 40]);
    assert_eq!(t.in_flight(), 32);
    assert_eq!(t.queue_len(), 8.0);
    assert!(t.queue.is_empty(), "all sent on to a replica");
    t.set_desired(1.0, 1);
    drive(&mut t, 1, 300, |_| vec![]);
    assert_eq!(t.totals.served_ok + t.totals.served_late, 40.0);
    assert_eq!(t.totals.dropped, 0.0);
    assert_eq!(t.replicas.len(), 1);
}
