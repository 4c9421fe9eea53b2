//! What a run is judged by: SLO attainment, cost, scale events, and (for forecasting policies)
//! forecast accuracy and prediction-interval coverage.

use tidal_autoscaler::Method;

use super::engine::{ForecastPoint, RunResult};

/// The scores of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub policy: String,
    pub requests: f64,
    /// Fraction of requests whose TTFT met the SLO; dropped and unserved requests are misses.
    pub slo_attainment: f64,
    pub dropped: f64,
    pub replica_seconds: f64,
    /// Replica-seconds over the trace's duration.
    pub mean_replicas: f64,
    pub scale_events: u32,
    pub cold_starts: u32,
    /// TTFT 95th percentile of everything served (to a histogram bin, ~12 %).
    pub ttft_p95_s: Option<f64>,
    /// Mean absolute percentage error of the point forecast at its horizon.
    pub mape: Option<f64>,
    /// Fraction of actuals inside the forecast's prediction interval (nominal 2q − 1).
    pub coverage: Option<f64>,
    /// Fraction of actuals above the upper bound, the one provisioned for (nominal 1 − q).
    pub exceeded: Option<f64>,
    /// Forecasts scored for coverage: every one whose target lies inside the trace.
    pub forecasts_scored: usize,
    /// Share of forecasts made by each method, most used first (e.g. `ets 80 %`).
    pub methods: Vec<(Method, f64)>,
}

/// Share of forecasts per method, most used first.
pub fn method_shares(forecasts: &[ForecastPoint]) -> Vec<(Method, f64)> {
    let mut counts: Vec<(Method, usize)> = Vec::new();
    for f in forecasts {
        match counts.iter_mut().find(|c| c.0 == f.method) {
            Some(c) => c.1 += 1,
            None => counts.push((f.method, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let n = forecasts.len().max(1) as f64;
    counts.into_iter().map(|(m, c)| (m, c as f64 / n)).collect()
}

/// The load the forecast is compared with: the mean arrival rate over the `interval_s` before
/// `t` (what the policy would measure at its next sync), from per-tick arrivals.
pub fn actual_rate(arrivals: &[f64], tick_s: f64, t: f64, interval_s: f64) -> Option<f64> {
    let end = (t / tick_s).round() as usize;
    let len = ((interval_s / tick_s).round() as usize).max(1);
    if end > arrivals.len() || end < len {
        return None;
    }
    Some(arrivals[end - len..end].iter().sum::<f64>() / (len as f64 * tick_s))
}

/// Scores `run`; `cloud_arrivals` are the per-tick arrivals the cloud tier received (the
/// demand the forecast is of).
pub fn summarize(run: &RunResult, cloud_arrivals: &[f64], tick_s: f64) -> Summary {
    let t = &run.totals;
    let duration = cloud_arrivals.len() as f64 * tick_s;
    let mean_rate = cloud_arrivals.iter().sum::<f64>() / duration.max(1e-9);
    // Near-zero actuals make percentage errors meaningless, so MAPE skips them. Coverage
    // counts every forecast: an interval's promise is over all of them, and keeping only the
    // busy outcomes would select on the outcome (any calibrated bound is exceeded more often
    // among the larger actuals).
    let floor = (0.05 * mean_rate).max(1e-9);
    let (mut ape, mut n_ape) = (0.0, 0usize);
    let (mut inside, mut above, mut n) = (0usize, 0usize, 0usize);
    for f in &run.forecasts {
        let Some(actual) = actual_rate(cloud_arrivals, tick_s, f.target_s, run.interval_s) else {
            continue;
        };
        n += 1;
        if actual >= floor {
            n_ape += 1;
            ape += (f.predicted - actual).abs() / actual;
        }
        if actual >= f.lower - 1e-9 && actual <= f.upper + 1e-9 {
            inside += 1;
        }
        if actual > f.upper + 1e-9 {
            above += 1;
        }
    }
    Summary {
        policy: run.policy.clone(),
        requests: t.arrived,
        slo_attainment: if t.arrived > 0.0 {
            t.served_ok / t.arrived
        } else {
            1.0
        },
        dropped: t.dropped,
        replica_seconds: t.replica_seconds,
        mean_replicas: t.replica_seconds / duration.max(1e-9),
        scale_events: t.scale_events,
        cold_starts: t.cold_starts,
        ttft_p95_s: t.ttft.quantile(0.95),
        mape: (n_ape > 0).then(|| ape / n_ape as f64),
        coverage: (n > 0).then(|| inside as f64 / n as f64),
        exceeded: (n > 0).then(|| above as f64 / n as f64),
        forecasts_scored: n,
        methods: method_shares(&run.forecasts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::TierTotals;

    fn run(forecasts: Vec<ForecastPoint>) -> RunResult {
        RunResult {
            policy: "p".into(),
            interval_s: 10.0,
            totals: TierTotals {
                arrived: 100.0,
                served_ok: 80.0,
                served_late: 15.0,
                dropped: 5.0,
                replica_seconds: 300.0,
                scale_events: 3,
                cold_starts: 2,
                ..Default::default()
            },
            syncs: vec![],
            forecasts,
            sleep: Default::default(),
        }
    }

    fn fc(target_s: f64, predicted: f64, lower: f64, upper: f64) -> ForecastPoint {
        ForecastPoint {
            made_at_s: target_s - 30.0,
            target_s,
            predicted,
            lower,
            upper,
            method: if target_s < 30.0 {
                Method::Naive
            } else {
                Method::Ets
            },
        }
    }

    #[test]
    fn attainment_counts_drops_as_misses_and_cost_is_per_second() {
        let s = summarize(&run(vec![]), &[1.0; 100], 1.0);
        assert!((s.slo_attainment - 0.8).abs() < 1e-12);
        assert_eq!(s.mean_replicas, 3.0);
        assert_eq!((s.mape, s.coverage), (None, None));
    }

    #[test]
    fn mape_skips_near_zero_actuals_and_coverage_counts_them() {
        // 10 rps for 50 s, then nothing for 50 s.
        let mut arr = vec![10.0; 50];
        arr.extend(vec![0.0; 50]);
        let r = run(vec![
            fc(20.0, 12.0, 8.0, 14.0), // actual 10: APE 0.2, inside
            fc(40.0, 5.0, 6.0, 9.0),   // actual 10: APE 0.5, outside, above the upper bound
            fc(90.0, 3.0, 0.0, 5.0),   // actual 0: no APE, inside
            fc(500.0, 3.0, 0.0, 5.0),  // past the end: skipped
        ]);
        let s = summarize(&r, &arr, 1.0);
        assert_eq!(s.forecasts_scored, 3);
        assert!((s.mape.unwrap() - 0.35).abs() < 1e-12);
        assert_eq!(s.coverage, Some(2.0 / 3.0));
        assert_eq!(s.exceeded, Some(1.0 / 3.0));
        assert_eq!(s.methods, vec![(Method::Ets, 0.75), (Method::Naive, 0.25)]);
    }

    #[test]
    fn actual_rate_is_the_interval_before_t() {
        let arr = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(actual_rate(&arr, 1.0, 4.0, 2.0), Some(3.5));
        assert_eq!(actual_rate(&arr, 1.0, 1.0, 2.0), None);
        assert_eq!(actual_rate(&arr, 1.0, 5.0, 2.0), None);
    }
}
