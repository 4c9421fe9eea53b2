//! Real replicas against the discrete-event mode: one trace slice replayed on the local
//! cluster's worker pods (by the real-node test `real_node_trace_slice_replayed_on_real_pods_
//! and_in_the_simulator`) and in the simulator, with Tidal's core deciding in both, and the gap
//! between the two: replicas over time and TTFT p95.
//!
//! Pure: the real side comes in as data (what each request saw, the Deployment's replica
//! counts over time, the replica's speed measured on the same pods); this module runs the
//! simulator on exactly those requests and compares.

use super::cluster::{ReplicaModel, TtftHistogram};
use super::des::{BatchModel, Dispatch, step_at};
use super::engine::{SimSetup, route_requests, simulate_des};
use super::policy::TargetSpec;
use super::tidal::{TidalOptions, TidalPolicy};
use super::trace::{Request, Trace};

/// How fast one real replica is, measured on the cluster before the replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Seconds per decode step at each measured batch size, ascending.
    pub step_s: Vec<(u32, f64)>,
    /// Prefill seconds per prompt token (slope of TTFT over prompt length, alone on a replica).
    pub prefill_s_per_token: f64,
    /// TTFT of an empty prompt alone on a replica (HTTP, tokenising, scheduling).
    pub overhead_s: f64,
    /// Seconds from a pod's creation to Ready (median over the run's pods).
    pub cold_start_s: f64,
    /// The worker's `max_batch`.
    pub max_batch: u32,
}

/// The InferenceService's autoscaling spec, as the simulated core gets it too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Autoscaling {
    pub interval_s: f64,
    pub target_rps_per_replica: f64,
    pub min: u32,
    pub max: u32,
    pub slo_ttft_s: f64,
    pub quantile: f64,
    pub down_window_s: f64,
    /// The client's timeout: a request not answered by then is a miss in both.
    pub max_wait_s: f64,
}

/// One replayed request: when it was sent (from the replay's start), its sizes as the worker
/// counted them, its TTFT (`None`: it failed) and the seconds from its first to its last token
/// (0 when it was not answered).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Served {
    pub t_s: f64,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub ttft_s: Option<f64>,
    pub decode_s: f64,
}

/// Replica counts at one moment (from the replay's start).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplicaSample {
    pub t_s: f64,
    pub desired: u32,
    pub ready: u32,
}

/// One side's outcome, on the core's sync grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    pub replicas: Vec<ReplicaSample>,
    /// Desired replicas integrated over the slice (pending pods count, as in the simulator).
    pub replica_seconds: f64,
    /// From the same log-spaced histogram for both sides (bins ~12 % wide).
    pub ttft_p95_s: Option<f64>,
    /// Requests answered within the SLO, of all sent.
    pub attainment: f64,
    pub max_desired: u32,
    /// First time the desired count rose above where it started.
    pub first_scale_up_s: Option<f64>,
}

/// How the simulator spreads requests like the real run's ClusterIP Service: kube-proxy
/// picks a pod at random for each connection, and the replay opens one per request.
pub const KUBE_PROXY: Dispatch = Dispatch::Random { seed: 1 };

/// The two sides and how far apart they are.
#[derive(Clone, Debug, PartialEq)]
pub struct Gap {
    pub real: Side,
    /// The simulator dispatching as kube-proxy does ([`KUBE_PROXY`]): the side compared.
    pub sim: Side,
    /// The simulator with its default least-loaded dispatch, for how much dispatch explains.
    pub sim_least_loaded: Side,
    /// How much slower the real pods decoded during the replay than the calibration says.
    pub slowdown: Option<Slowdown>,
    /// The simulator (random dispatch) with the calibration slowed by that factor, for how
    /// much the pods' speed under load explains.
    pub sim_slowed: Option<Side>,
    /// Mean |real − simulated| over the grid points.
    pub mean_abs_desired: f64,
    pub mean_abs_ready: f64,
    /// Simulated over real.
    pub replica_seconds_ratio: f64,
    pub ttft_p95_ratio: Option<f64>,
}

/// The real pods' decode speed during the replay against the calibration's.
///
/// The calibration is taken on one pod with the machine otherwise quiet; in the replay up to
/// three pods, the load generator, Prometheus and the control plane share the machine. Each
/// answer decoded beside the others decoding at the same time: at the middle of its decode,
/// the answers then decoding spread over the ready pods give the batch it saw, and one
/// calibrated step at that batch is the time per token the calibration predicts for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slowdown {
    /// Sequences decoding on a pod as the answers saw it (token-weighted mean).
    pub mean_batch: f64,
    /// Seconds per output token after the first, over all answers (token-weighted).
    pub real_tpot_s: f64,
    /// What the calibration predicts for the same answers at the batches they saw.
    pub calibrated_tpot_s: f64,
    /// `real_tpot_s / calibrated_tpot_s`.
    pub factor: f64,
}

/// [`Slowdown`] from the answers and the real replica samples (`None` without decode time).
pub fn slowdown(
    served: &[Served],
    samples: &[ReplicaSample],
    cal: &Calibration,
) -> Option<Slowdown> {
    let decoding: Vec<(f64, f64, f64)> = served
        .iter()
        .filter_map(|s| {
            let start = s.t_s + s.ttft_s?;
            let tokens = f64::from(s.output_tokens.saturating_sub(1));
            (s.decode_s > 0.0 && tokens > 0.0).then_some((start, start + s.decode_s, tokens))
        })
        .collect();
    if decoding.is_empty() || cal.step_s.is_empty() {
        return None;
    }
    let ready_at = |t: f64| sample_at(samples, t).map_or(1, |s| s.ready.max(1));
    let max_batch = f64::from(cal.max_batch.max(1));
    let (mut tokens, mut decode, mut predicted, mut batch) = (0.0, 0.0, 0.0, 0.0);
    for &(start, end, n) in &decoding {
        let mid = 0.5 * (start + end);
        let active = decoding
            .iter()
            .filter(|&&(s, e, _)| s <= mid && mid < e)
            .count();
        let b = (active as f64 / f64::from(ready_at(mid))).clamp(1.0, max_batch);
        tokens += n;
        decode += end - start;
        predicted += n * step_interpolated(&cal.step_s, b);
        batch += n * b;
    }
    let calibrated_tpot_s = predicted / tokens;
    let real_tpot_s = decode / tokens;
    (calibrated_tpot_s > 0.0).then(|| Slowdown {
        mean_batch: batch / tokens,
        real_tpot_s,
        calibrated_tpot_s,
        factor: real_tpot_s / calibrated_tpot_s,
    })
}

/// The calibrated step at a fractional batch (linear between the integer batches).
fn step_interpolated(pts: &[(u32, f64)], b: f64) -> f64 {
    let lo = b.floor().max(1.0) as u32;
    let (a, c) = (step_at(pts, lo), step_at(pts, lo + 1));
    a + (c - a) * (b - f64::from(lo))
}

impl Calibration {
    /// Every time in the calibration (steps, prefill, overhead) times `factor`; cold starts
    /// stay as measured.
    pub fn slowed(&self, factor: f64) -> Self {
        Self {
            step_s: self.step_s.iter().map(|&(b, s)| (b, s * factor)).collect(),
            prefill_s_per_token: self.prefill_s_per_token * factor,
            overhead_s: self.overhead_s * factor,
            ..self.clone()
        }
    }
}

/// The replica the simulator runs: the measured steps, prefill and overhead.
pub fn batch_model(
    cal: &Calibration,
    a: &Autoscaling,
    served: &[Served],
) -> Result<BatchModel, String> {
    if cal.step_s.is_empty() || cal.max_batch == 0 {
        return Err("the calibration measured no decode step".into());
    }
    if !(cal.prefill_s_per_token >= 0.0 && cal.overhead_s >= 0.0 && cal.cold_start_s >= 0.0) {
        return Err(format!("calibration out of range: {cal:?}"));
    }
    let n = served.len().max(1) as f64;
    let mean_in = served
        .iter()
        .map(|s| f64::from(s.input_tokens))
        .sum::<f64>()
        / n;
    let mean_out = served
        .iter()
        .map(|s| f64::from(s.output_tokens))
        .sum::<f64>()
        / n;
    let prefill_work = cal.prefill_s_per_token * mean_in;
    let full = step_at(&cal.step_s, cal.max_batch);
    // A full replica: each request's prefill alone, then its share of the batch's steps.
    let per_request = prefill_work + (mean_out - 1.0).max(0.0) * full / f64::from(cal.max_batch);
    Ok(BatchModel {
        replica: ReplicaModel {
            capacity_rps: 1.0 / per_request.max(1e-6),
            cold_start_s: cal.cold_start_s,
            prefill_s: cal.overhead_s + prefill_work,
            slo_ttft_s: a.slo_ttft_s,
            max_wait_s: a.max_wait_s,
        },
        max_batch: cal.max_batch,
        step_s: (1..=cal.max_batch)
            .map(|b| step_at(&cal.step_s, b).max(0.0))
            .collect(),
        prefill_s_per_token: cal.prefill_s_per_token,
        overhead_s: cal.overhead_s,
        dispatch: Dispatch::LeastLoaded,
    })
}

/// Runs the discrete-event mode on exactly the replayed requests, Tidal's core deciding with
/// the service's settings, from `start_replicas`, requests dispatched as `dispatch` says.
pub fn simulate(
    served: &[Served],
    duration_s: f64,
    start_replicas: u32,
    cal: &Calibration,
    a: &Autoscaling,
    dispatch: Dispatch,
) -> Result<Side, String> {
    let batch = BatchModel {
        dispatch,
        ..batch_model(cal, a, served)?
    };
    let tick_s = 1.0;
    let ticks = (duration_s / tick_s).ceil().max(1.0) as usize;
    let mut arrivals = vec![0.0; ticks];
    let requests: Vec<Request> = served
        .iter()
        .filter(|s| s.t_s < duration_s)
        .map(|s| {
            arrivals[(s.t_s / tick_s) as usize] += 1.0;
            Request {
                t_s: s.t_s,
                input_tokens: s.input_tokens,
                output_tokens: s.output_tokens.max(1),
            }
        })
        .collect();
    let n = requests.len().max(1) as f64;
    let trace = Trace {
        name: "replayed".into(),
        tick_s,
        arrivals,
        mean_input_tokens: requests
            .iter()
            .map(|r| f64::from(r.input_tokens))
            .sum::<f64>()
            / n,
        mean_output_tokens: requests
            .iter()
            .map(|r| f64::from(r.output_tokens))
            .sum::<f64>()
            / n,
        requests: requests.clone(),
    };
    let cloud = TargetSpec {
        target_rps_per_replica: a.target_rps_per_replica,
        min: a.min,
        max: a.max,
    };
    let setup = SimSetup {
        model: batch.replica,
        cloud,
        edge: None,
        start_replicas: Some(start_replicas),
    };
    let mut policy = TidalPolicy::new(
        cloud,
        None,
        &batch.replica,
        &TidalOptions {
            interval_s: a.interval_s,
            quantile: a.quantile,
            down_window_s: a.down_window_s,
            ..TidalOptions::default()
        },
    );
    let routed = route_requests(&trace, &requests, None);
    let run = simulate_des(&trace, &routed, &setup, &batch, &mut policy);
    let replicas: Vec<ReplicaSample> = std::iter::once(ReplicaSample {
        t_s: 0.0,
        desired: start_replicas,
        ready: start_replicas,
    })
    .chain(run.syncs.iter().map(|s| ReplicaSample {
        t_s: s.time_s,
        desired: s.cloud_desired,
        ready: s.cloud_ready,
    }))
    .collect();
    let t = run.totals;
    Ok(Side {
        max_desired: replicas.iter().map(|r| r.desired).max().unwrap_or(0),
        first_scale_up_s: first_scale_up(&replicas),
        replicas,
        replica_seconds: t.replica_seconds,
        ttft_p95_s: t.ttft.quantile(0.95),
        attainment: if t.arrived > 0.0 {
            t.served_ok / t.arrived
        } else {
            1.0
        },
    })
}

/// The real side on the grid `grid_s` (the simulator's sync times): each point takes the
/// latest sample at or before it.
pub fn real_side(
    served: &[Served],
    samples: &[ReplicaSample],
    duration_s: f64,
    slo_ttft_s: f64,
    grid_s: &[f64],
) -> Side {
    let at = |t: f64| {
        sample_at(samples, t).copied().unwrap_or(ReplicaSample {
            t_s: t,
            desired: 0,
            ready: 0,
        })
    };
    let replicas: Vec<ReplicaSample> = grid_s
        .iter()
        .map(|&t| ReplicaSample { t_s: t, ..at(t) })
        .collect();
    // Step-wise integral of the samples over [0, duration_s].
    let mut replica_seconds = 0.0;
    for (i, s) in samples.iter().enumerate() {
        let from = s.t_s.clamp(0.0, duration_s);
        let to = samples
            .get(i + 1)
            .map_or(duration_s, |n| n.t_s)
            .clamp(0.0, duration_s);
        replica_seconds += f64::from(s.desired) * (to - from).max(0.0);
    }
    let mut ttft = TtftHistogram::default();
    let mut ok = 0usize;
    for s in served {
        if let Some(x) = s.ttft_s {
            ttft.add(x, 1.0);
            if x <= slo_ttft_s {
                ok += 1;
            }
        }
    }
    Side {
        max_desired: samples.iter().map(|r| r.desired).max().unwrap_or(0),
        first_scale_up_s: first_scale_up(samples),
        replicas,
        replica_seconds,
        ttft_p95_s: ttft.quantile(0.95),
        attainment: if served.is_empty() {
            1.0
        } else {
            ok as f64 / served.len() as f64
        },
    }
}

/// The latest sample at or before `t` (the first one before any).
fn sample_at(samples: &[ReplicaSample], t: f64) -> Option<&ReplicaSample> {
    samples
        .iter()
        .take_while(|s| s.t_s <= t + 1e-9)
        .last()
        .or(samples.first())
}

fn first_scale_up(samples: &[ReplicaSample]) -> Option<f64> {
    let start = samples.first()?.desired;
    samples.iter().find(|s| s.desired > start).map(|s| s.t_s)
}

/// Simulates the replayed slice and compares it with the real run.
pub fn compare(
    served: &[Served],
    samples: &[ReplicaSample],
    duration_s: f64,
    cal: &Calibration,
    a: &Autoscaling,
) -> Result<Gap, String> {
    let start = samples
        .first()
        .map(|s| s.desired)
        .ok_or("no replica samples from the real run")?;
    let sim = simulate(served, duration_s, start, cal, a, KUBE_PROXY)?;
    let sim_least_loaded = simulate(served, duration_s, start, cal, a, Dispatch::LeastLoaded)?;
    let slowdown = slowdown(served, samples, cal);
    let sim_slowed = slowdown
        .map(|sd| {
            simulate(
                served,
                duration_s,
                start,
                &cal.slowed(sd.factor),
                a,
                KUBE_PROXY,
            )
        })
        .transpose()?;
    let grid: Vec<f64> = sim.replicas.iter().map(|r| r.t_s).collect();
    let real = real_side(served, samples, duration_s, a.slo_ttft_s, &grid);
    let points = grid.len().max(1) as f64;
    let mean_abs = |f: fn(&ReplicaSample) -> u32| {
        real.replicas
            .iter()
            .zip(&sim.replicas)
            .map(|(r, s)| (f64::from(f(r)) - f64::from(f(s))).abs())
            .sum::<f64>()
            / points
    };
    Ok(Gap {
        mean_abs_desired: mean_abs(|r| r.desired),
        mean_abs_ready: mean_abs(|r| r.ready),
        replica_seconds_ratio: sim.replica_seconds / real.replica_seconds.max(1e-9),
        ttft_p95_ratio: match (sim.ttft_p95_s, real.ttft_p95_s) {
            (Some(s), Some(r)) if r > 0.0 => Some(s / r),
            _ => None,
        },
        real,
        sim,
        sim_least_loaded,
        slowdown,
        sim_slowed,
    })
}

/// The gap as the Markdown BENCHMARKS.md shows: the calibration, a summary table and the
/// replicas over time side by side.
pub fn markdown(gap: &Gap, cal: &Calibration, a: &Autoscaling, requests: usize) -> String {
    let ms = |s: Option<f64>| s.map_or("—".into(), |x| format!("{:.0} ms", x * 1000.0));
    let secs = |s: Option<f64>| s.map_or("—".into(), |x| format!("{x:.0} s"));
    let steps: Vec<String> = cal
        .step_s
        .iter()
        .map(|(b, s)| format!("batch {b}: {:.1} ms", s * 1000.0))
        .collect();
    let mut out = format!(
        "Calibration measured on one real replica: decode step {}; prefill {:.2} ms per prompt \
         token plus {:.0} ms overhead; cold start {:.0} s (creation to Ready, median); max \
         batch {}. Autoscaling: every {:.0} s, {:.2} requests/s per replica, {}–{} replicas, \
         TTFT p95 objective {:.0} ms, quantile {}, scale-down window {:.0} s. {requests} \
         requests.\n\n",
        steps.join(", "),
        cal.prefill_s_per_token * 1000.0,
        cal.overhead_s * 1000.0,
        cal.cold_start_s,
        cal.max_batch,
        a.interval_s,
        a.target_rps_per_replica,
        a.min,
        a.max,
        a.slo_ttft_s * 1000.0,
        a.quantile,
        a.down_window_s,
    );
    if let Some(sd) = gap.slowdown {
        out.push_str(&format!(
            "During the replay the answers decoded beside {:.1} sequences per pod (token-weighted \
             mean) and took {:.1} ms per output token; the calibration predicts {:.1} ms at the \
             batches they saw: the pods were {:.2}x slower than calibrated (the last column slows \
             every calibrated time by that factor).\n\n",
            sd.mean_batch,
            sd.real_tpot_s * 1000.0,
            sd.calibrated_tpot_s * 1000.0,
            sd.factor
        ));
    }
    let ll = &gap.sim_least_loaded;
    let slow = gap.sim_slowed.as_ref();
    let col = |f: &dyn Fn(&Side) -> String| slow.map_or("—".into(), f);
    out.push_str(
        "| | real pods | simulator, random dispatch (as kube-proxy) | gap | simulator, least-loaded dispatch | simulator, random dispatch, pods as slow as in the replay |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    out.push_str(&format!(
        "| replica-seconds | {:.0} | {:.0} | {:.2}x | {:.0} | {} |\n",
        gap.real.replica_seconds,
        gap.sim.replica_seconds,
        gap.replica_seconds_ratio,
        ll.replica_seconds,
        col(&|s| format!("{:.0}", s.replica_seconds))
    ));
    out.push_str(&format!(
        "| most replicas | {} | {} | | {} | {} |\n",
        gap.real.max_desired,
        gap.sim.max_desired,
        ll.max_desired,
        col(&|s| s.max_desired.to_string())
    ));
    out.push_str(&format!(
        "| first scale-up | {} | {} | | {} | {} |\n",
        secs(gap.real.first_scale_up_s),
        secs(gap.sim.first_scale_up_s),
        secs(ll.first_scale_up_s),
        col(&|s| secs(s.first_scale_up_s))
    ));
    out.push_str(&format!(
        "| desired replicas, mean abs. difference | | | {:.2} | | |\n| ready replicas, mean abs. difference | | | {:.2} | | |\n",
        gap.mean_abs_desired, gap.mean_abs_ready
    ));
    out.push_str(&format!(
        "| TTFT p95 | {} | {} | {} | {} | {} |\n",
        ms(gap.real.ttft_p95_s),
        ms(gap.sim.ttft_p95_s),
        gap.ttft_p95_ratio
            .map_or("—".into(), |r| format!("{r:.2}x")),
        ms(ll.ttft_p95_s),
        col(&|s| ms(s.ttft_p95_s))
    ));
    out.push_str(&format!(
        "| within the TTFT objective | {:.1} % | {:.1} % | | {:.1} % | {} |\n\n",
        gap.real.attainment * 100.0,
        gap.sim.attainment * 100.0,
        ll.attainment * 100.0,
        col(&|s| format!("{:.1} %", s.attainment * 100.0))
    ));
    out.push_str(
        "Replicas over time (desired/ready), at the core's sync times (sim: random dispatch):\n\n```\n",
    );
    out.push_str("   time   real   sim\n");
    for (r, s) in gap.real.replicas.iter().zip(&gap.sim.replicas) {
        out.push_str(&format!(
            "{:>6.0} s  {:>2}/{:<2}  {:>2}/{:<2}\n",
            r.t_s, r.desired, r.ready, s.desired, s.ready
        ));
    }
    out.push_str("```\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal() -> Calibration {
        Calibration {
            step_s: vec![(1, 0.01), (4, 0.015), (16, 0.04)],
            prefill_s_per_token: 0.001,
            overhead_s: 0.02,
            cold_start_s: 10.0,
            max_batch: 16,
        }
    }

    fn autoscaling() -> Autoscaling {
        Autoscaling {
            interval_s: 5.0,
            target_rps_per_replica: 2.0,
            min: 1,
            max: 4,
            slo_ttft_s: 1.0,
            quantile: 0.9,
            down_window_s: 30.0,
            max_wait_s: 30.0,
        }
    }

    /// `rps` evenly spaced requests per second over `[from, to)`.
    fn load(from: f64, to: f64, rps: f64) -> Vec<Served> {
        let n = ((to - from) * rps) as usize;
        (0..n)
            .map(|i| Served {
                t_s: from + i as f64 / rps,
                input_tokens: 64,
                output_tokens: 20,
                ttft_s: Some(0.1),
                decode_s: 19.0 * 0.01,
            })
            .collect()
    }

    #[test]
    fn a_load_step_makes_the_simulated_core_scale_up_from_where_the_real_run_started() {
        let mut served = load(0.0, 60.0, 1.0);
        served.extend(load(60.0, 180.0, 7.0));
        let sim = simulate(&served, 180.0, 1, &cal(), &autoscaling(), KUBE_PROXY).unwrap();
        assert_eq!(sim.replicas[0].desired, 1);
        let up = sim.first_scale_up_s.expect("scaled up");
        assert!(up > 60.0, "not before the step: {up}");
        assert!(
            sim.max_desired >= 4,
            "7/s at 2/s per replica: {}",
            sim.max_desired
        );
        assert!(sim.replica_seconds > 180.0);
    }

    #[test]
    fn the_real_side_is_read_on_the_simulators_grid_and_integrated_step_wise() {
        let samples = [
            ReplicaSample {
                t_s: 0.0,
                desired: 1,
                ready: 1,
            },
            ReplicaSample {
                t_s: 12.0,
                desired: 3,
                ready: 1,
            },
            ReplicaSample {
                t_s: 25.0,
                desired: 3,
                ready: 3,
            },
        ];
        let served = [
            Served {
                t_s: 1.0,
                input_tokens: 10,
                output_tokens: 5,
                ttft_s: Some(0.5),
                decode_s: 0.4,
            },
            Served {
                t_s: 2.0,
                input_tokens: 10,
                output_tokens: 5,
                ttft_s: None,
                decode_s: 0.0,
            },
        ];
        let real = real_side(&served, &samples, 30.0, 1.0, &[5.0, 15.0, 30.0]);
        let counts: Vec<(u32, u32)> = real.replicas.iter().map(|r| (r.desired, r.ready)).collect();
        assert_eq!(counts, [(1, 1), (3, 1), (3, 3)]);
        assert!((real.replica_seconds - (12.0 + 3.0 * 18.0)).abs() < 1e-9);
        assert_eq!(real.first_scale_up_s, Some(12.0));
        // The failed request is a miss.
        assert!((real.attainment - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_real_run_that_followed_the_simulator_shows_no_replica_gap() {
        let mut served = load(0.0, 60.0, 1.0);
        served.extend(load(60.0, 180.0, 7.0));
        let (cal, a) = (cal(), autoscaling());
        let sim = simulate(&served, 180.0, 1, &cal, &a, KUBE_PROXY).unwrap();
        let gap = compare(&served, &sim.replicas, 180.0, &cal, &a).unwrap();
        assert_eq!(gap.mean_abs_desired, 0.0);
        assert_eq!(gap.mean_abs_ready, 0.0);
        let md = markdown(&gap, &cal, &a, served.len());
        assert!(md.contains("| replica-seconds |"), "{md}");
        // And one that never scaled is far from it.
        let flat = [ReplicaSample {
            t_s: 0.0,
            desired: 1,
            ready: 1,
        }];
        let gap = compare(&served, &flat, 180.0, &cal, &a).unwrap();
        assert!(gap.mean_abs_desired > 1.0, "{}", gap.mean_abs_desired);
        assert!(gap.replica_seconds_ratio > 1.5);
    }

    #[test]
    fn a_calibration_without_steps_is_refused() {
        let mut c = cal();
        c.step_s.clear();
        assert!(
            simulate(
                &load(0.0, 10.0, 1.0),
                10.0,
                1,
                &c,
                &autoscaling(),
                KUBE_PROXY
            )
            .is_err()
        );
    }

    #[test]
    fn pods_slower_than_calibrated_show_as_a_slowdown_and_a_slower_simulation() {
        // One pod ready throughout, 1 request/s, each decoding 19 tokens in 0.76 s: alone
        // (batch 1), 40 ms per token where the calibration says 10 ms at batch 1.
        let mut served = load(0.0, 120.0, 1.0);
        for s in &mut served {
            s.decode_s = 19.0 * 0.04;
        }
        let samples = [ReplicaSample {
            t_s: 0.0,
            desired: 1,
            ready: 1,
        }];
        let sd = slowdown(&served, &samples, &cal()).expect("a slowdown");
        assert!((sd.mean_batch - 1.0).abs() < 1e-9, "{sd:?}");
        assert!((sd.real_tpot_s - 0.04).abs() < 1e-9, "{sd:?}");
        assert!((sd.factor - 4.0).abs() < 1e-9, "{sd:?}");
        // As calibrated: no slowdown.
        for s in &mut served {
            s.decode_s = 19.0 * 0.01;
        }
        let sd = slowdown(&served, &samples, &cal()).unwrap();
        assert!((sd.factor - 1.0).abs() < 1e-9, "{sd:?}");
        // Four times slower pods serve the same load with a later first token.
        let slow = cal().slowed(4.0);
        assert_eq!(slow.step_s[2], (16, 0.16));
        assert_eq!(slow.cold_start_s, cal().cold_start_s);
        let fast = simulate(&served, 120.0, 1, &cal(), &autoscaling(), KUBE_PROXY).unwrap();
        let slowed = simulate(&served, 120.0, 1, &slow, &autoscaling(), KUBE_PROXY).unwrap();
        assert!(
            slowed.ttft_p95_s.unwrap() > fast.ttft_p95_s.unwrap(),
            "{slowed:?} vs {fast:?}"
        );
        // Overlapping answers saw a bigger batch: 4 at a time on one pod (15 ms a step at
        // batch 4), each at 30 ms per token.
        let overlapping: Vec<Served> = (0..40)
            .map(|i| Served {
                t_s: f64::from(i / 4) * 2.0,
                input_tokens: 64,
                output_tokens: 21,
                ttft_s: Some(0.1),
                decode_s: 20.0 * 0.03,
            })
            .collect();
        let sd = slowdown(&overlapping, &samples, &cal()).unwrap();
        assert!((sd.mean_batch - 4.0).abs() < 1e-9, "{sd:?}");
        assert!((sd.factor - 2.0).abs() < 1e-9, "{sd:?}");
        // No decode time measured: no slowdown.
        for s in &mut served {
            s.decode_s = 0.0;
        }
        assert!(slowdown(&served, &samples, &cal()).is_none());
    }
}
