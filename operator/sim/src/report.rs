//! Markdown output: one table per trace, and the whole `BENCHMARKS.md` (which keeps its
//! hand-written analysis section across regenerations).

use std::fmt::Write as _;
use std::path::Path;

use tidal_autoscaler::Method;

use super::frontier::{self, div, miss_ratio};
use super::metrics::Summary;
use super::tidal::TidalOptions;
use super::{ModelOptions, Scenario};

const ANALYSIS_BEGIN: &str = "<!-- analysis:begin -->";
const ANALYSIS_END: &str = "<!-- analysis:end -->";

/// The baseline (not Tidal) with the highest SLO attainment; ties go to the cheaper one.
pub fn best_baseline(summaries: &[Summary]) -> Option<&Summary> {
    summaries
        .iter()
        .filter(|s| !s.policy.starts_with("tidal"))
        .max_by(|a, b| {
            a.slo_attainment
                .total_cmp(&b.slo_attainment)
                .then(b.replica_seconds.total_cmp(&a.replica_seconds))
        })
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1} %", v * 100.0))
}

fn methods(m: &[(Method, f64)]) -> String {
    if m.is_empty() {
        return "–".into();
    }
    m.iter()
        .map(|(m, share)| format!("{} {:.0} %", format!("{m:?}").to_lowercase(), share * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ratio(a: f64, b: f64) -> String {
    opt_ratio(Some(div(a, b)))
}

fn duration(s: f64) -> String {
    if s >= 2.0 * 86400.0 {
        format!("{:.1} days", s / 86400.0)
    } else if s >= 7200.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.0} min", s / 60.0)
    }
}

/// One line describing the trace and the cluster derived from it.
pub fn scenario_header(sc: &Scenario) -> String {
    let t = &sc.trace;
    let m = &sc.setup.model;
    let mut s = format!(
        "{}, {:.0} requests, mean {:.2} rps, peak {:.2} rps (1-min windows); tick {} s. \
         Replica capacity {:.3} rps (target {:.3} rps/replica), prefill {:.2} s, cold start {:.0} s, \
         TTFT SLO {:.1} s, queue timeout {:.0} s, replicas {}..{}.",
        duration(t.duration_s()),
        t.total_requests(),
        t.mean_rps(),
        t.peak_rps(60.0),
        t.tick_s,
        m.capacity_rps,
        sc.setup.cloud.target_rps_per_replica,
        m.prefill_s,
        m.cold_start_s,
        m.slo_ttft_s,
        m.max_wait_s,
        sc.setup.cloud.min,
        sc.setup.cloud.max,
    );
    if let Some(e) = &sc.setup.edge {
        let _ = write!(
            s,
            " Edge: {} sites taking {:.0} % of the load (max {} replicas each)",
            e.sites,
            e.fraction * 100.0,
            e.spec.max
        );
        for o in &e.outages {
            let _ = write!(
                s,
                "; edge-{} offline {:.0}–{:.0} s",
                o.site, o.start_s, o.end_s
            );
        }
        s.push('.');
    }
    s
}

/// The per-policy table of one scenario.
pub fn table(summaries: &[Summary]) -> String {
    let best = best_baseline(summaries);
    let mut out = String::from(
        "| policy | SLO attainment | missed requests | misses ÷ best baseline | replica-s | cost ÷ best baseline | mean replicas | scale events | forecast MAPE | above upper (nominal 1 − q) | PI coverage (nominal 2q − 1) | forecast methods |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for s in summaries {
        let (miss_r, cost_r) = match best {
            Some(b) => (
                opt_ratio(Some(miss_ratio(s.slo_attainment, b.slo_attainment))),
                ratio(s.replica_seconds, b.replica_seconds),
            ),
            None => ("–".into(), "–".into()),
        };
        let mark = if best.is_some_and(|b| b.policy == s.policy) {
            " (best baseline)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| {}{} | {:.2} % | {:.0} | {} | {:.0} | {} | {:.2} | {} | {} | {} | {} | {} |",
            s.policy,
            mark,
            s.slo_attainment * 100.0,
            s.requests * (1.0 - s.slo_attainment),
            miss_r,
            s.replica_seconds,
            cost_r,
            s.mean_replicas,
            s.scale_events,
            pct(s.mape),
            pct(s.exceeded),
            pct(s.coverage),
            methods(&s.methods),
        );
    }
    out
}

/// Misses (1 - attainment) as a ratio to the base's.
fn opt_ratio(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_infinite() => "∞".into(),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

/// Tidal against the best baseline on one scenario, at the shared target and matched.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub trace: String,
    /// Tidal's misses and replica-seconds ÷ the best baseline's, all at the shared target.
    pub misses: f64,
    pub cost: f64,
    /// Tidal's misses at the best baseline's cost ÷ the fewest any baseline has at that cost.
    pub misses_at_equal_cost: Option<f64>,
    /// Tidal's replica-seconds for the best baseline's attainment ÷ the fewest any baseline
    /// needs for it.
    pub cost_at_equal_slo: Option<f64>,
    /// When every Tidal setting costs more than the best baseline (so there is no attainment at
    /// equal cost): Tidal's cheapest setting matched the other way round, its misses ÷ the
    /// fewest any baseline has at its cost, and its cost ÷ the least any baseline needs for its
    /// attainment (`None`: no baseline setting reaches it).
    pub at_cheapest: Option<(f64, Option<f64>)>,
}

/// A ratio to the best baseline that is at least as good (up to rounding).
fn no_worse(ratio: f64) -> bool {
    ratio <= 1.0 + 1e-9
}

impl Verdict {
    /// Better or equal on both matched axes.
    pub fn wins(&self) -> bool {
        self.misses_at_equal_cost.is_some_and(no_worse)
            && self.cost_at_equal_slo.is_some_and(no_worse)
    }

    /// Tidal's cheapest setting is better or equal on both axes than every baseline re-tuned to
    /// its cost and to its attainment.
    pub fn wins_at_cheapest(&self) -> bool {
        self.at_cheapest
            .is_some_and(|(m, c)| no_worse(m) && c.is_none_or(no_worse))
    }
}

/// Tidal's cheapest swept setting against the baselines' curves (see [`Verdict::at_cheapest`]).
fn at_cheapest(curves: &[frontier::Curve]) -> Option<(f64, Option<f64>)> {
    let tidal = curves.iter().find(|c| c.policy == "tidal")?;
    let p = tidal
        .points
        .iter()
        .filter(|p| p.replica_seconds.is_finite() && p.attainment.is_finite())
        .min_by(|a, b| {
            a.replica_seconds
                .total_cmp(&b.replica_seconds)
                .then(b.attainment.total_cmp(&a.attainment))
        })?;
    let m = frontier::matched(curves, p.replica_seconds, p.attainment);
    let (att, cost) = frontier::best_baseline(&m);
    Some((
        miss_ratio(p.attainment, att?),
        cost.map(|c| p.replica_seconds / c),
    ))
}

/// The reference of the matched comparison: the best baseline at the shared target.
fn reference(sc: &Scenario) -> Option<(&Summary, Vec<frontier::Matched>)> {
    let best = best_baseline(&sc.summaries)?;
    if sc.curves.is_empty() {
        return None;
    }
    let m = frontier::matched(&sc.curves, best.replica_seconds, best.slo_attainment);
    Some((best, m))
}

/// Tidal vs the best baseline on `sc` (`None` without a Tidal run or a baseline).
pub fn verdict(sc: &Scenario) -> Option<Verdict> {
    let best = best_baseline(&sc.summaries)?;
    let tidal = sc.summaries.iter().find(|s| s.policy == "tidal")?;
    let (mut misses_at_equal_cost, mut cost_at_equal_slo) = (None, None);
    if let Some((_, m)) = reference(sc) {
        let (base_att, base_cost) = frontier::best_baseline(&m);
        if let Some(t) = m.iter().find(|x| x.policy == "tidal") {
            misses_at_equal_cost = t
                .attainment_at_cost
                .zip(base_att)
                .map(|(a, b)| miss_ratio(a, b));
            cost_at_equal_slo = t.cost_at_attainment.zip(base_cost).map(|(a, b)| a / b);
        }
    }
    let at_cheapest = if misses_at_equal_cost.is_none() {
        at_cheapest(&sc.curves)
    } else {
        None
    };
    Some(Verdict {
        trace: sc.trace.name.clone(),
        misses: miss_ratio(tidal.slo_attainment, best.slo_attainment),
        cost: div(tidal.replica_seconds, best.replica_seconds),
        misses_at_equal_cost,
        cost_at_equal_slo,
        at_cheapest,
    })
}

/// The matched comparison of one scenario (needs its swept curves).
pub fn matched_table(sc: &Scenario) -> Option<String> {
    let (best, m) = reference(sc)?;
    let (base_att, base_cost) = frontier::best_baseline(&m);
    let us: Vec<String> = sc.curves[0]
        .points
        .iter()
        .map(|p| format!("{:.0}", p.utilization * 100.0))
        .collect();
    let mut out = format!(
        "Matched: every policy replayed at target utilisations {} %; reference = {} at the shared \
         target ({:.0} replica-s, {:.2} % SLO attainment): the best a policy does at a swept \
         setting or between two neighbouring ones (linear in the utilisation); ratios are to the \
         best baseline on that axis.\n\n\
         | policy | SLO attainment at {:.0} replica-s | misses ÷ best baseline | replica-s for {:.2} % | cost ÷ best baseline |\n\
         | --- | --- | --- | --- | --- |\n",
        us.join(", "),
        best.policy,
        best.replica_seconds,
        best.slo_attainment * 100.0,
        best.replica_seconds,
        best.slo_attainment * 100.0,
    );
    for x in &m {
        let att = x
            .attainment_at_cost
            .map_or("– (costs more at every setting)".into(), |a| {
                format!("{:.2} %", a * 100.0)
            });
        let cost = x
            .cost_at_attainment
            .map_or("– (not reached)".into(), |c| format!("{c:.0}"));
        let mr = x
            .attainment_at_cost
            .zip(base_att)
            .map(|(a, b)| miss_ratio(a, b));
        let cr = x.cost_at_attainment.zip(base_cost).map(|(a, b)| a / b);
        let _ = writeln!(
            out,
            "| {} | {att} | {} | {cost} | {} |",
            x.policy,
            opt_ratio(mr),
            opt_ratio(cr)
        );
    }
    Some(out)
}

/// One row per scenario: Tidal ÷ best baseline at the shared target and matched.
pub fn verdict_table(verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "| trace | misses ÷ best baseline | cost ÷ best baseline | misses at equal cost ÷ | cost at equal SLO ÷ | better on both (matched) |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for v in verdicts {
        let misses_at_equal_cost = match (v.misses_at_equal_cost, v.at_cheapest) {
            (None, Some((m, c))) => format!(
                "– (Tidal costs more at every setting; at its cheapest: {} misses, {} cost)",
                opt_ratio(Some(m)),
                c.map_or("– (no baseline reaches its SLO)".into(), |c| format!(
                    "{c:.2}"
                ))
            ),
            (m, _) => opt_ratio(m),
        };
        let wins = if v.wins() {
            "yes"
        } else if v.wins_at_cheapest() {
            "yes, at Tidal's cheapest setting"
        } else {
            "no"
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {misses_at_equal_cost} | {} | {wins} |",
            v.trace,
            opt_ratio(Some(v.misses)),
            v.cost,
            opt_ratio(v.cost_at_equal_slo),
        );
    }
    out
}

/// How a verdict's goals read: better on both matched axes, and at most 0.9x the best
/// re-tuned baseline's cost at equal SLO.
fn goal_counts(verdicts: &[Verdict]) -> (usize, usize) {
    let wins = verdicts.iter().filter(|v| v.wins()).count();
    let cheap = verdicts
        .iter()
        .filter(|v| v.cost_at_equal_slo.is_some_and(|c| c <= 0.9 + 1e-9))
        .count();
    (wins, cheap)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Held-out results: leave-one-out over the shared scenarios, fresh days at the setting chosen
/// on all of them, and where issue #18's goals stand on each set.
pub fn held_out_section(
    loo: &[super::heldout::HeldOut],
    all: &[super::heldout::AllHeldOut],
    verdicts: &[Verdict],
    fresh_setting: f64,
    fresh: &[super::heldout::HeldOut],
    fresh_verdicts: &[Verdict],
) -> String {
    let mut s = String::from(
        "### Held out: leave-one-trace-out and fresh synthetic days\n\n\
         Above, every policy's headroom knob (target utilisation) is read where its curve crosses \
         the reference, i.e. tuned on the scenario it is scored on. Here Tidal's setting is \
         chosen on *other* scenarios by one rule — the setting whose worse matched ratio \
         (misses at its cost, cost for its SLO, each ÷ the best baseline; capped at 10), \
         geometric mean over them (the mean of ratios), is lowest — and scored as a single \
         point. The baselines keep every swept setting on the held-out scenario (tuned on the \
         answer, the strongest they can be). Ratios: Tidal ÷ the best baseline setting at Tidal's cost (misses) and for \
         Tidal's SLO attainment (cost); where every baseline setting costs more, misses ÷ the \
         cheapest one's, and where none reaches Tidal's attainment, cost ÷ the least for the \
         best attainment any reaches (headroom is never free).\n\n\
         **Leave-one-trace-out** (each shared scenario held out in turn; the setting is chosen \
         on the other nine):\n\n\
         | held-out scenario | setting chosen on the others | SLO attainment | replica-s | misses ÷ at its cost | cost ÷ for its SLO | better on both | tuned on itself: better on both |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let tuned = |name: &str, vs: &[Verdict]| {
        vs.iter()
            .find(|v| v.trace == name)
            .map_or("–", |v| yes_no(v.wins()))
    };
    let row = |s: &mut String, h: &super::heldout::HeldOut, extra: &str| {
        let p = h.score.point;
        let _ = writeln!(
            s,
            "| {} | {:.0} % | {:.2} % | {:.0} | {} | {} | {} | {extra} |",
            h.trace,
            p.utilization * 100.0,
            p.attainment * 100.0,
            p.replica_seconds,
            opt_ratio(h.score.misses_at_its_cost),
            opt_ratio(h.score.cost_at_its_slo),
            yes_no(h.score.wins()),
        );
    };
    for h in loo {
        row(&mut s, h, tuned(&h.trace, verdicts));
    }
    s.push_str(&all_held_out_table(all));
    let _ = write!(
        s,
        "\n**Fresh synthetic days**: shapes added after the core's constants were set (flash \
         crowd, level shifts, a holiday dip, long prompts; `synthetic.rs`), with seeds of their \
         own. Tidal at the setting chosen on all {} shared scenarios ({:.0} %); the last \
         columns are the usual matched comparison (every policy tuned on the day itself; \
         sections below).\n\n\
         | fresh scenario | setting | SLO attainment | replica-s | misses ÷ at its cost | cost ÷ for its SLO | better on both | matched: misses at equal cost ÷ | matched: cost at equal SLO ÷ | matched: better on both |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        verdicts.len(),
        fresh_setting * 100.0
    );
    for h in fresh {
        let v = fresh_verdicts.iter().find(|v| v.trace == h.trace);
        let extra = v.map_or("– | – | –".into(), |v| {
            format!(
                "{} | {} | {}",
                opt_ratio(v.misses_at_equal_cost),
                opt_ratio(v.cost_at_equal_slo),
                yes_no(v.wins())
            )
        });
        row(&mut s, h, &extra);
    }
    let held = |hs: &[super::heldout::HeldOut]| hs.iter().filter(|h| h.score.wins()).count();
    let (sw, sc) = goal_counts(verdicts);
    let (fw, fc) = goal_counts(fresh_verdicts);
    let _ = write!(
        s,
        "\nIssue #18's goals, counted: better on both matched axes on every scenario — shared \
         {sw} of {}, fresh {fw} of {}; at equal SLO at most 0.9x the best re-tuned baseline's \
         replica-seconds on at least half — shared {sc} of {}, fresh {fc} of {}. With Tidal's \
         setting held out (not tuned on the scenario): better on both on {} of {} shared and \
         {} of {} fresh scenarios.\n",
        verdicts.len(),
        fresh_verdicts.len(),
        verdicts.len(),
        fresh_verdicts.len(),
        held(loo),
        loo.len(),
        held(fresh),
        fresh.len(),
    );
    s
}

/// Issue #18 item 2 per scenario: Tidal's interval against its nominal levels, beside the
/// sampling band a perfectly calibrated interval would still show over that many forecasts.
pub fn calibration_section(fluid: &[(String, Vec<Summary>)], quantile: f64) -> String {
    let (above_nominal, band_nominal) = (1.0 - quantile, 2.0 * quantile - 1.0);
    let mut s = format!(
        "### Interval calibration per scenario\n\n\
         How often demand exceeded the upper bound Tidal provisions for (nominal {:.0} %) and how \
         often it fell inside the band (nominal {:.0} %), with the ±2σ band a perfectly \
         calibrated interval would still show over that many scored forecasts if they were \
         independent (they overlap, so the real sampling band is wider). Every forecast whose \
         target lies inside the trace is scored, quiet stretches included: the interval's \
         promise is over all of them, and scoring only busy outcomes would select on the \
         outcome. Goal: within ±3 points of nominal on every trace.\n\n\
         | scenario | forecasts scored | above upper | ±2σ sampling | band coverage | ±2σ sampling | both within ±3 points |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        above_nominal * 100.0,
        band_nominal * 100.0
    );
    let (mut within, mut noise, mut n) = (0, 0, 0);
    for (name, sums) in fluid {
        let Some(t) = sums.iter().find(|x| x.policy == "tidal") else {
            continue;
        };
        let (Some(above), Some(cov)) = (t.exceeded, t.coverage) else {
            continue;
        };
        let count = t.forecasts_scored.max(1) as f64;
        let two_sigma = |p: f64| 2.0 * (p * (1.0 - p) / count).sqrt();
        let (sa, sc) = (two_sigma(above_nominal), two_sigma(band_nominal));
        let ok = (above - above_nominal).abs() <= 0.03 && (cov - band_nominal).abs() <= 0.03;
        n += 1;
        within += usize::from(ok);
        noise +=
            usize::from((above - above_nominal).abs() <= sa && (cov - band_nominal).abs() <= sc);
        let _ = writeln!(
            s,
            "| {name} | {} | {:.1} % | ±{:.1} | {:.1} % | ±{:.1} | {} |",
            t.forecasts_scored,
            above * 100.0,
            sa * 100.0,
            cov * 100.0,
            sc * 100.0,
            yes_no(ok)
        );
    }
    let _ = writeln!(
        s,
        "\nWithin ±3 points of both nominal levels on {within} of {n} scenarios; within the \
         ±2σ sampling band of a calibrated interval on {noise} of {n}."
    );
    s
}

/// Leave-one-out with every policy's setting chosen on the other scenarios (each by the same
/// rule, against the other policies), so no one is tuned on the answer.
fn all_held_out_table(all: &[super::heldout::AllHeldOut]) -> String {
    let Some(first) = all.first() else {
        return String::new();
    };
    let names: Vec<&str> = first.points.iter().map(|(p, _)| p.as_str()).collect();
    let mut s = format!(
        "\n**Every policy held out**: each policy's setting chosen on the other nine by the same \
         rule (its worse ratio against the other policies' curves); one point each on the \
         held-out scenario (setting: SLO attainment / replica-s). Tidal ÷ the best held-out \
         baseline (the highest attainment, ties to the cheaper, as at the shared target).\n\n\
         | held-out scenario | {} | misses ÷ best baseline | cost ÷ best baseline | baseline points Tidal is as good as on both axes |\n\
         | --- |{} --- | --- | --- |\n",
        names.join(" | "),
        " --- |".repeat(names.len())
    );
    let mut wins = 0;
    for h in all {
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                h.points
                    .iter()
                    .find(|(p, _)| p == n)
                    .map_or("–".into(), |(_, x)| {
                        format!(
                            "{:.0} %: {:.2} % / {:.0}",
                            x.utilization * 100.0,
                            x.attainment * 100.0,
                            x.replica_seconds
                        )
                    })
            })
            .collect();
        let (m, c) = h.tidal_and_best_baseline().map_or((None, None), |(t, b)| {
            (
                Some(miss_ratio(t.attainment, b.attainment)),
                Some(div(t.replica_seconds, b.replica_seconds)),
            )
        });
        if m.is_some_and(|m| m <= 1.0 + 1e-9) && c.is_some_and(|c| c <= 1.0 + 1e-9) {
            wins += 1;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} of {} |",
            h.trace,
            cells.join(" | "),
            opt_ratio(m),
            opt_ratio(c),
            h.dominated_by_tidal(),
            h.points
                .iter()
                .filter(|(p, _)| !p.starts_with("tidal"))
                .count(),
        );
    }
    let _ = writeln!(
        s,
        "\nEvery policy held out, Tidal is at least as good on both axes as the best held-out \
         baseline on {wins} of {} scenarios.",
        all.len()
    );
    s
}

/// A scenario's section: header, table, matched table, plot link.
pub fn section(sc: &Scenario, plot_link: Option<&str>) -> String {
    let mut s = format!("### {}\n\n{}\n\n", sc.trace.name, scenario_header(sc));
    s.push_str(&table(&sc.summaries));
    if let Some(m) = matched_table(sc) {
        s.push('\n');
        s.push_str(&m);
    }
    if let Some(link) = plot_link {
        let _ = write!(s, "\nPlot: [{link}]({link})\n");
    }
    s
}

/// The edge scale-to-zero study: per policy and mode, what sleeping sites save and cost.
pub fn sleep_section(header: &str, rows: &[super::SleepRow]) -> String {
    let mut s = format!(
        "### Edge sites that sleep (scale to zero)\n\n{header}\n\n\
         Tidal with each site kept at one replica, and allowed to sleep (`minReplicasPerNode: 0`: \
         a site quiet for its down window goes to zero and its Service routes its requests to \
         the cloud tier until a replica of its own is ready again); KPA allowed to scale to \
         zero the Knative way (requests wait at the site for its replica). *Demand returns*: \
         each time a site's demand came back (one request per sync interval) after it slept, \
         whether a replica of its own was ready by then (cold start hidden) or not.\n\n\
         | mode | policy | sites' min replicas | SLO attainment | missed requests | replica-s | edge replica-s | site requests served by the cloud | sleeps | demand returns: replica ready / not |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} % | {:.0} | {:.0} | {:.0} | {:.0} ({:.3} %) | {} | {} / {} |",
            r.mode,
            r.policy,
            r.edge_min,
            r.summary.slo_attainment * 100.0,
            r.summary.requests * (1.0 - r.summary.slo_attainment),
            r.summary.replica_seconds,
            r.sleep.edge_replica_seconds,
            r.sleep.served_by_cloud,
            100.0 * div(r.sleep.served_by_cloud, r.sleep.edge_requests),
            r.sleep.sleeps,
            r.sleep.returns_hidden,
            r.sleep.returns_exposed,
        );
    }
    s
}

/// The discrete-event section: per scenario, each policy's SLO attainment, TTFT p95 and cost
/// in the fluid model and as discrete events, then Tidal ÷ the best baseline in both.
pub fn des_section(rows: &[(String, Vec<Summary>, Vec<Summary>)], max_batch: u32) -> String {
    let mut s = format!(
        "## Discrete-event mode\n\n\
         The same scenarios replayed request by request (`tidal-sim run --mode des`): each \
         request's own arrival time and prompt/output lengths (drawn from the per-tick arrivals \
         for the synthetic patterns, seeded), replicas of {max_batch} slots that batch like the \
         worker (prefill alone on the replica, then one decode step per token for the whole \
         batch, a step {:.1}x longer at batch {max_batch} than alone, as measured through HTTP in \
         inference-worker/BENCHMARKS.md; scaled so a full replica completes the fluid model's \
         capacity), least-loaded dispatch, drain on scale-down. TTFT includes waiting for a slot \
         and behind other prefills, so requests queue below saturation. Same targets, SLO and \
         policies as above, at the shared target utilisation (no sweep). The ServeGen traces \
         are aggregate rates over 14 days (hundreds of millions of requests) and stay fluid.\n\n",
        super::des::WORKER_STEP_S[2].1 / super::des::WORKER_STEP_S[0].1
    );
    s.push_str(
        "| Scenario | Tidal misses ÷ best baseline (fluid / DES) | Tidal replica-s ÷ best \
         baseline (fluid / DES) | best baseline (fluid / DES) |\n|---|---|---|---|\n",
    );
    let vs = |sums: &[Summary]| -> Option<(f64, f64, String)> {
        let t = sums.iter().find(|x| x.policy == "tidal")?;
        let b = best_baseline(sums)?;
        Some((
            div(1.0 - t.slo_attainment, 1.0 - b.slo_attainment),
            div(t.replica_seconds, b.replica_seconds),
            b.policy.clone(),
        ))
    };
    for (name, fluid, des) in rows {
        let (Some(f), Some(d)) = (vs(fluid), vs(des)) else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {name} | {} / {} | {} / {} | {} / {} |",
            opt_ratio(Some(f.0)),
            opt_ratio(Some(d.0)),
            opt_ratio(Some(f.1)),
            opt_ratio(Some(d.1)),
            f.2,
            d.2
        );
    }
    s.push_str(
        "\n| Scenario | Policy | SLO attainment (fluid / DES) | TTFT p95 (fluid / DES) | \
         replica-s (fluid / DES) | dropped (DES) |\n|---|---|---|---|---|---|\n",
    );
    let secs = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.2} s"));
    for (name, fluid, des) in rows {
        for d in des {
            let Some(f) = fluid.iter().find(|f| f.policy == d.policy) else {
                continue;
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {} / {} | {} / {} | {:.0} / {:.0} | {:.0} |",
                d.policy,
                pct(Some(f.slo_attainment)),
                pct(Some(d.slo_attainment)),
                secs(f.ttft_p95_s),
                secs(d.ttft_p95_s),
                f.replica_seconds,
                d.replica_seconds,
                d.dropped
            );
        }
    }
    s
}

/// Every policy's sync points as CSV (`policy,time_s,cloud_desired,cloud_ready,edge_desired,
/// cloud_arrival_rps,cloud_queue,misses_so_far`), then Tidal's forecasts
/// (`forecast,made_at_s,target_s,predicted,lower,upper`), then the swept points
/// (`sweep,utilization,slo_attainment,replica_seconds`), for looking into a run.
pub fn timeseries_csv(sc: &Scenario) -> String {
    let mut s = String::from(
        "policy,time_s,cloud_desired,cloud_ready,edge_desired,cloud_arrival_rps,cloud_queue,misses_so_far\n",
    );
    for r in &sc.runs {
        for p in &r.syncs {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{:.4},{:.2},{:.2}",
                r.policy,
                p.time_s,
                p.cloud_desired,
                p.cloud_ready,
                p.edge_desired,
                p.cloud_arrival_rps,
                p.cloud_queue,
                p.misses_so_far
            );
        }
    }
    s.push_str("forecast,made_at_s,target_s,predicted,lower,upper\n");
    for r in &sc.runs {
        for f in &r.forecasts {
            let _ = writeln!(
                s,
                "{},{},{},{:.4},{:.4},{:.4}",
                r.policy, f.made_at_s, f.target_s, f.predicted, f.lower, f.upper
            );
        }
    }
    s.push_str("sweep,utilization,slo_attainment,replica_seconds\n");
    for c in &sc.curves {
        for p in &c.points {
            let _ = writeln!(
                s,
                "{},{:.3},{:.6},{:.0}",
                c.policy, p.utilization, p.attainment, p.replica_seconds
            );
        }
    }
    s
}

/// Writes `text` to `path`, creating its directory.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// The hand-written analysis kept between regenerations.
pub fn existing_analysis(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let a = text.find(ANALYSIS_BEGIN)? + ANALYSIS_BEGIN.len();
    let b = text[a..].find(ANALYSIS_END)? + a;
    Some(text[a..b].trim().to_string())
}

/// The cluster model and policy settings, in words, for the benchmark document.
pub fn assumptions(m: &ModelOptions, t: &TidalOptions) -> String {
    let cap = match m.capacity_rps {
        Some(c) => format!("{c} requests/s (fixed by flag)"),
        None => format!(
            "derived per trace so that the trace's mean load needs {} replicas at the target \
             utilisation of {:.0} % (so the mean load keeps {} replicas {:.0} % busy)",
            m.mean_replicas,
            m.target_utilization * 100.0,
            m.mean_replicas,
            m.target_utilization * 100.0
        ),
    };
    let fast = match t.fast {
        Some(f) => format!(
            "Fast path: every {:.0} s the workers' queue depth (as their `/metrics` report it), \
scale-up only when every reading of {:.0} s shows a backlog (at least one request waiting per \
two ready replicas): to the arrivals the backlog's growth reveals plus what drains it within \
the horizon; the scale-down window remembers the arrivals' part.",
            f.interval_s, f.window_s
        ),
        None => "No fast path.".to_string(),
    };
    format!(
        "- **Fluid, discrete-time cluster** (one tick = 1 s for the hour-long traces, 5 s for the \
14-day ServeGen ones): arrivals are counts per tick, queued FIFO; each ready replica completes a \
fixed number of requests per second, its capacity: {cap}.
- **TTFT** = queueing wait + prefill time; prefill = 0.1 s + mean prompt tokens / {:.0} tokens/s \
(capped at half the SLO). A request meets the SLO if its TTFT is at most **{:.1} s**. Requests \
that wait over {:.0} s are dropped; dropped and still-unserved requests count as misses. Waits are \
exact for the fluid model: a cohort arriving uniformly over a tick is served uniformly at the \
ready capacity, so its waits are linear in between.
- **Cold start**: a new replica costs from creation but serves only after **{:.0} s**; \
scale-down removes replicas at once, pending ones first. **Cost** = replica-seconds (pending \
included) up to the end of the trace; every target starts warm with enough replicas for its \
first minute.
- **Same targets for every policy**: target load per replica = capacity × {:.2}, replicas \
{}..{} (edge sites {}..{}); every policy sees only what Prometheus would give the live operator \
(arrival and served rate over its last sync interval, queue depth, in-flight requests, p95 TTFT, \
desired/ready replicas).
- **Tidal**: the `tidal_autoscaler` core as it stands in this checkout, every {:.0} s, \
method Auto, quantile {:.2}, horizon = observed ready time (cold start), configured scale-down window {:.0} s (the core shortens it to 2 × (horizon + interval) once it forecasts), \
SLO p95 TTFT {:.1} s; replicas that become ready are reported as `ready_times_s`. {fast}
- **HPA**: 15 s sync, metric = arrival rate per replica, tolerance 0.1, 300 s scale-down \
stabilisation (max recommendation in the window), scale-up at most max(100 %, 4 pods) per sync.
- **KPA** (Knative): 2 s tick, rate averaged over a 60 s stable and a 6 s panic window, panic \
when the panic window wants ≥ 200 % of the ready replicas; in panic never scales down; leaves \
panic 60 s after the condition last held; scale-down at most halves the ready replicas; no scale \
to zero.
- **AIBrix-like**: 15 s sync, HPA-style reactive count (tolerance 0.1, 300 s scale-down window) \
with a scale-up floor from a least-squares linear trend of the last 8 samples, projected one \
cold start ahead (only when the trend rises).
- **Forecast MAPE / above upper / PI coverage** (Tidal only): each forecast's point value and \
interval at its horizon vs the cloud arrival rate measured over the sync interval ending at the \
target time; MAPE skips targets with an actual below 5 % of the trace's mean rate, the \
interval is scored on every target inside the trace. *Above \
upper* is how often the actual exceeded the bound provisioned for (nominal 1 − q, 10 % at \
q = 0.90), *PI coverage* how often it fell inside [lower, upper] (nominal 2q − 1, 80 %); the \
core calibrates both online (dynamically-tuned adaptive conformal inference, DtACI, under an \
ACI loop whose step decays with the outcomes scored) on its own errors.
- **Matched comparison**: the shared target favours whoever over-provisions (more SLO) or \
under-provisions (less cost), so every policy is also replayed with its target utilisation \
swept, and compared at the best baseline's cost (SLO attainment reached for that many \
replica-seconds) and at its SLO attainment (replica-seconds needed): the best the policy does \
at a swept setting, or at a utilisation between two neighbouring settings (linear). Tidal *wins* a scenario when it is \
at least as good as every baseline on both. Where Tidal's cheapest setting still costs more than that reference (its SLO \
headroom does not go below what the TTFT objective needs), it is matched the other way round: the baselines re-tuned to \
the cost and to the SLO attainment of Tidal's cheapest setting (\"yes, at Tidal's cheapest setting\").
- **`tidal-q<quantile>` rows** (when asked for): the same core with another provisioning \
quantile, for tuning; **`tidal-no-fast`**: the same core without its fast path (the slow loop \
alone). Never counted as a baseline.
- **Limits of the model**: service is deterministic (fluid), so there is no queueing delay \
below 100 % utilisation; real replicas see latency rise earlier, so policies that run close to \
capacity look better here than they would be. No request-size variation, no per-replica \
imbalance, no batching effects; cold start is a constant.
- **Edge scenario**: a fraction of the load goes to edge sites (each its own scaling target with \
the same replica model); while a site is offline its load and backlog go to the cloud, and \
Tidal's core gets `SiteSample {{ online: false }}` (baselines just see the site's load vanish and \
the cloud's grow).
",
        m.prefill_tokens_per_s,
        m.slo_ttft_s,
        m.max_wait_s,
        m.cold_start_s,
        m.target_utilization,
        m.min_replicas,
        m.max_replicas,
        m.min_replicas,
        m.edge_max_replicas,
        t.interval_s,
        t.quantile,
        t.down_window_s,
        m.slo_ttft_s,
    )
}

/// The attribution `shared/traces/README.md` asks for.
pub const ATTRIBUTION: &str = "\
- `AzureLLMInferenceTrace_code_2023.csv`, `AzureLLMInferenceTrace_conv_2023.csv`: Azure LLM \
inference traces 2023, Azure/AzurePublicDataset @ b469a113 (`data/AzureLLMInferenceTrace_code.csv`, \
`data/AzureLLMInferenceTrace_conv.csv`), CC-BY-4.0; cite Patel et al., \"Splitwise: Efficient \
Generative LLM Inference Using Phase Splitting\", ISCA 2024.
- `mooncake_synthetic_trace.jsonl`: kvcache-ai/Mooncake @ 3b5a5941 \
(`FAST25-release/traces/synthetic_trace.jsonl`), Apache-2.0.
- `servegen_language_m-large_aggregate_rate_10min.csv`, \
`servegen_language_m-small_aggregate_rate_10min.csv`: derived from alibaba/ServeGen @ f891d118 \
(`data/language/m-large/`, `data/language/m-small/`; per-client rates summed per 600 s window), \
Apache-2.0; cite ServeGen, arXiv:2505.09999.

License texts: `shared/traces/LICENSES/`.
";

/// The whole benchmark document; `goals` (held-out results, interval calibration) follows the
/// summary table.
pub fn bench_document(
    command: &str,
    assumptions: &str,
    summary: Option<&str>,
    goals: Option<&str>,
    sections: &[String],
    des: Option<&str>,
    analysis: Option<&str>,
) -> String {
    let mut s = String::from(
        "# Autoscaler simulator benchmarks\n\n\
         Generated by `tidal-sim bench`; only the Analysis section is written by hand (it is kept \
         when the file is regenerated). Policies are compared on the same simulated cluster; \
         nothing here is a pass/fail test.\n\n## Regenerate\n\nFrom the workspace root \
         (about 10 minutes on 2 cores; `tidal-sim run --help` replays a single trace):\n\n```sh\n",
    );
    s.push_str(command);
    s.push_str("\n```\n\n## Cluster model and policies\n\n");
    s.push_str(assumptions);
    s.push_str("\n## Analysis\n\n");
    s.push_str(ANALYSIS_BEGIN);
    s.push('\n');
    s.push_str(analysis.unwrap_or("(not written yet)"));
    s.push('\n');
    s.push_str(ANALYSIS_END);
    s.push_str("\n\n## Results\n\n");
    if let Some(summary) = summary {
        s.push_str(
            "Tidal ÷ the best baseline per scenario: first at the shared target utilisation, then \
             matched (each policy's target utilisation swept; Tidal's misses at the best \
             baseline's cost and its cost at the best baseline's SLO attainment, each ÷ the best \
             any baseline does there).\n\n",
        );
        s.push_str(summary);
        s.push('\n');
    }
    if let Some(g) = goals {
        s.push_str(g);
        s.push('\n');
    }
    for sec in sections {
        s.push_str(sec);
        s.push('\n');
    }
    if let Some(des) = des {
        s.push_str(des);
        s.push('\n');
    }
    s.push_str("## Trace attribution\n\n");
    s.push_str(ATTRIBUTION);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(policy: &str, att: f64, rs: f64) -> Summary {
        Summary {
            policy: policy.into(),
            requests: 100.0,
            slo_attainment: att,
            dropped: 0.0,
            replica_seconds: rs,
            mean_replicas: rs / 100.0,
            scale_events: 1,
            cold_starts: 1,
            ttft_p95_s: None,
            mape: None,
            coverage: None,
            exceeded: None,
            forecasts_scored: 0,
            methods: vec![],
        }
    }

    #[test]
    fn calibration_is_judged_against_3_points_and_against_sampling_noise() {
        let tidal = |above: f64, cov: f64, n: usize| Summary {
            exceeded: Some(above),
            coverage: Some(cov),
            forecasts_scored: n,
            ..summary("tidal", 0.99, 100.0)
        };
        let rows = vec![
            // Calibrated.
            ("a".to_string(), vec![tidal(0.11, 0.79, 1000)]),
            // 4 points over on 100 forecasts: outside ±3, inside ±2σ (±6).
            ("b".to_string(), vec![tidal(0.14, 0.80, 100)]),
            // Far off on many forecasts: neither.
            ("c".to_string(), vec![tidal(0.20, 0.65, 1000)]),
            // No forecast, no row.
            ("d".to_string(), vec![summary("tidal", 0.99, 100.0)]),
        ];
        let s = calibration_section(&rows, 0.9);
        assert!(
            s.contains("| a | 1000 | 11.0 % | ±1.9 | 79.0 % | ±2.5 | yes |"),
            "{s}"
        );
        assert!(
            s.contains("| b | 100 | 14.0 % | ±6.0 | 80.0 % | ±8.0 | no |"),
            "{s}"
        );
        assert!(!s.contains("| d |"), "{s}");
        assert!(
            s.contains("Within ±3 points of both nominal levels on 1 of 3 scenarios; within the ±2σ sampling band of a calibrated interval on 2 of 3."),
            "{s}"
        );
    }

    fn curve(policy: &str, pts: &[(f64, f64, f64)]) -> frontier::Curve {
        frontier::Curve {
            policy: policy.into(),
            points: pts
                .iter()
                .map(
                    |&(utilization, attainment, replica_seconds)| frontier::Point {
                        utilization,
                        attainment,
                        replica_seconds,
                    },
                )
                .collect(),
        }
    }

    #[test]
    fn tidal_costing_more_everywhere_is_matched_at_its_cheapest_setting() {
        // Tidal never goes below 105 replica-s; there it has 1 % misses. The baseline re-tuned
        // to 105 has 2 % (between its 100 and 110 settings), and needs 108 for 1 % misses.
        let base = curve(
            "hpa",
            &[(0.6, 0.995, 120.0), (0.7, 0.99, 110.0), (0.8, 0.97, 100.0)],
        );
        let tidal = curve("tidal", &[(0.8, 0.995, 120.0), (1.0, 0.99, 105.0)]);
        let (m, c) = at_cheapest(&[tidal.clone(), base.clone()]).unwrap();
        assert!((m - 0.5).abs() < 1e-9, "{m}");
        assert!((c.unwrap() - 105.0 / 110.0).abs() < 1e-9, "{c:?}");
        let v = Verdict {
            trace: "t".into(),
            misses: 0.5,
            cost: 1.05,
            misses_at_equal_cost: None,
            cost_at_equal_slo: Some(1.01),
            at_cheapest: Some((m, c)),
        };
        assert!(!v.wins() && v.wins_at_cheapest());
        let table = verdict_table(std::slice::from_ref(&v));
        assert!(
            table.contains("at its cheapest: 0.50 misses, 0.95 cost")
                && table.contains("| yes, at Tidal's cheapest setting |"),
            "{table}"
        );
        // Worse than the baseline at its own cost: no.
        let worse = Verdict {
            at_cheapest: Some((1.2, Some(0.9))),
            ..v
        };
        assert!(!worse.wins_at_cheapest());
        assert!(verdict_table(&[worse]).contains("| no |"));
    }

    #[test]
    fn best_baseline_is_the_best_slo_then_the_cheapest() {
        let s = vec![
            summary("tidal", 1.0, 10.0),
            summary("hpa", 0.9, 100.0),
            summary("kpa", 0.95, 300.0),
            summary("aibrix", 0.95, 200.0),
            summary("tidal-q0.99", 1.0, 20.0),
        ];
        assert_eq!(best_baseline(&s).unwrap().policy, "aibrix");
        let t = table(&s);
        assert!(
            t.contains("| aibrix (best baseline) | 95.00 % | 5 | 1.00 | 200 | 1.00 |"),
            "{t}"
        );
        assert!(
            t.contains("| tidal | 100.00 % | 0 | 0.00 | 10 | 0.05 |"),
            "{t}"
        );
    }

    #[test]
    fn analysis_survives_regeneration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        let doc = bench_document(
            "cmd",
            "model",
            None,
            None,
            &[],
            None,
            Some("Tidal wins here."),
        );
        std::fs::write(&path, &doc).unwrap();
        assert_eq!(
            existing_analysis(&path).as_deref(),
            Some("Tidal wins here.")
        );
    }
}
