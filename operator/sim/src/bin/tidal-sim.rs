//! `tidal-sim`: replays request traces through Tidal's autoscaler core and baseline policies on
//! a simulated cluster (see the `tidal_sim` library).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tidal_autoscaler::FastPathConfig;
use tidal_sim::engine::Outage;
use tidal_sim::synthetic::{Pattern, Synthetic};
use tidal_sim::tidal::TidalOptions;
use tidal_sim::trace::{self, Trace};
use tidal_sim::{
    ModelOptions, PolicyKind, Scenario, heldout, plot, report, run_scenario, run_scenario_des,
    sweep,
};

#[derive(Parser)]
#[command(
    name = "tidal-sim",
    version,
    about = "Autoscaler simulator: Tidal vs HPA, KPA and AIBrix-like policies"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replay one trace (a file in any format of shared/traces/, or a synthetic pattern).
    Run(RunArgs),
    /// Replay every trace of a directory plus the synthetic patterns; write BENCHMARKS.md.
    Bench(BenchArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Trace file (Azure 2023 CSV, Mooncake JSONL, ServeGen aggregate-rate CSV).
    #[arg(
        long,
        env = "TIDAL_SIM_TRACE",
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    trace: Option<PathBuf>,
    /// Synthetic pattern: steps, ramps, bursts, diurnal or store-hours.
    #[arg(long, env = "TIDAL_SIM_SYNTHETIC")]
    synthetic: Option<Pattern>,
    /// Policies to compare, comma-separated.
    #[arg(
        long,
        env = "TIDAL_SIM_POLICIES",
        value_delimiter = ',',
        default_value = "tidal,hpa,kpa,aibrix"
    )]
    policies: Vec<PolicyKind>,
    /// Cluster model: `fluid` (arrival counts per tick; fast) or `des` (discrete events: each
    /// request on replicas that batch like the worker; no sweep).
    #[arg(long, env = "TIDAL_SIM_MODE", value_enum, default_value_t = Mode::Fluid)]
    mode: Mode,
    /// Directory for the table (<name>.md), the plot (<name>.svg) and the time series
    /// (<name>.csv).
    #[arg(long, env = "TIDAL_SIM_OUT", default_value = "sim-out")]
    out: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Fluid,
    Des,
}

#[derive(Args)]
struct BenchArgs {
    /// Directory of trace files (every *.csv and *.jsonl in it).
    #[arg(long, env = "TIDAL_SIM_TRACES_DIR", default_value = "../shared/traces")]
    traces_dir: PathBuf,
    /// The benchmark document to write.
    #[arg(
        long,
        env = "TIDAL_SIM_BENCH_OUT",
        default_value = "operator/BENCHMARKS.md"
    )]
    out: PathBuf,
    /// Where the SVG plots go (default: bench/ next to --out).
    #[arg(long, env = "TIDAL_SIM_PLOTS_DIR")]
    plots_dir: Option<PathBuf>,
    /// Skip the synthetic patterns.
    #[arg(long, env = "TIDAL_SIM_NO_SYNTHETIC")]
    no_synthetic: bool,
    /// Skip the discrete-event section (every request-level trace and synthetic pattern
    /// replayed again as single requests on batching replicas).
    #[arg(long, env = "TIDAL_SIM_NO_DES")]
    no_des: bool,
    /// Seed of the first fresh synthetic day (flash crowd; the others take the next seeds):
    /// shapes and seeds the core was never tuned on, scored with Tidal at the setting chosen
    /// on the other scenarios.
    #[arg(long, env = "TIDAL_SIM_FRESH_SEED", default_value_t = 20261203)]
    fresh_seed: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
struct Common {
    /// Simulation tick in seconds (default: 1 s, or 5 s for ServeGen rate traces and the
    /// diurnal pattern).
    #[arg(long, env = "TIDAL_SIM_TICK_S")]
    tick_s: Option<f64>,
    /// Multiplies every arrival rate.
    #[arg(long, env = "TIDAL_SIM_SCALE", default_value_t = 1.0)]
    scale: f64,
    /// Seed for synthesised arrivals and for the core.
    #[arg(long, env = "TIDAL_SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// Replay only the first this-many seconds of each trace.
    #[arg(long, env = "TIDAL_SIM_DURATION_S")]
    duration_s: Option<f64>,
    /// Base rate of the synthetic patterns (requests/s).
    #[arg(long, env = "TIDAL_SIM_SYNTHETIC_BASE_RPS", default_value_t = 20.0)]
    synthetic_base_rps: f64,
    /// Replicas the trace's mean load needs at the target utilisation (sets replica capacity).
    #[arg(long, env = "TIDAL_SIM_MEAN_REPLICAS", default_value_t = 6.0)]
    mean_replicas: f64,
    /// Fixed replica capacity in requests/s (overrides --mean-replicas).
    #[arg(long, env = "TIDAL_SIM_CAPACITY_RPS")]
    capacity_rps: Option<f64>,
    /// Target load per replica as a fraction of its capacity (all policies).
    #[arg(long, env = "TIDAL_SIM_TARGET_UTILIZATION", default_value_t = 0.8)]
    target_utilization: f64,
    /// Seconds from replica creation to ready.
    #[arg(long, env = "TIDAL_SIM_COLD_START_S", default_value_t = 60.0)]
    cold_start_s: f64,
    /// Time-to-first-token SLO in seconds.
    #[arg(long, env = "TIDAL_SIM_SLO_TTFT_S", default_value_t = 2.0)]
    slo_ttft_s: f64,
    /// Fixed prefill time (default: from the mean prompt length).
    #[arg(long, env = "TIDAL_SIM_PREFILL_S")]
    prefill_s: Option<f64>,
    /// Prompt tokens per second one replica prefills.
    #[arg(
        long,
        env = "TIDAL_SIM_PREFILL_TOKENS_PER_S",
        default_value_t = 20000.0
    )]
    prefill_tokens_per_s: f64,
    /// Requests waiting longer than this are dropped.
    #[arg(long, env = "TIDAL_SIM_MAX_WAIT_S", default_value_t = 60.0)]
    max_wait_s: f64,
    #[arg(long, env = "TIDAL_SIM_MIN_REPLICAS", default_value_t = 1)]
    min_replicas: u32,
    #[arg(long, env = "TIDAL_SIM_MAX_REPLICAS", default_value_t = 64)]
    max_replicas: u32,
    /// Edge sites (0 = no edge tier).
    #[arg(long, env = "TIDAL_SIM_EDGE_SITES", default_value_t = 0)]
    edge_sites: usize,
    /// Fraction of the load that goes to the edge sites.
    #[arg(long, env = "TIDAL_SIM_EDGE_FRACTION", default_value_t = 0.3)]
    edge_fraction: f64,
    /// Fewest replicas per edge site (default: --min-replicas); 0 lets a quiet site sleep
    /// (Tidal routes its requests to the cloud tier meanwhile).
    #[arg(long, env = "TIDAL_SIM_EDGE_MIN_REPLICAS")]
    edge_min_replicas: Option<u32>,
    #[arg(long, env = "TIDAL_SIM_EDGE_MAX_REPLICAS", default_value_t = 16)]
    edge_max_replicas: u32,
    /// Edge outages as SITE:START_S:END_S, comma-separated (site 0 is edge-0).
    #[arg(long, env = "TIDAL_SIM_EDGE_OUTAGES", value_delimiter = ',', value_parser = parse_outage)]
    edge_outages: Vec<Outage>,
    /// Tidal's sync interval in seconds.
    #[arg(long, env = "TIDAL_SIM_TIDAL_INTERVAL_S", default_value_t = 15.0)]
    tidal_interval_s: f64,
    /// Quantile of predicted demand Tidal provisions for.
    #[arg(long, env = "TIDAL_SIM_TIDAL_QUANTILE", default_value_t = 0.9)]
    tidal_quantile: f64,
    /// Also run Tidal with each of these quantiles (rows `tidal-q<quantile>`, for tuning).
    #[arg(long, env = "TIDAL_SIM_TIDAL_VARIANT_QUANTILES", value_delimiter = ',')]
    tidal_variant_quantiles: Vec<f64>,
    /// Tidal without its fast path (the workers' queues read every 2 s between syncs).
    #[arg(long, env = "TIDAL_SIM_TIDAL_NO_FAST_PATH")]
    tidal_no_fast_path: bool,
    /// Also run Tidal without its fast path (row `tidal-no-fast`).
    #[arg(long, env = "TIDAL_SIM_TIDAL_VARIANT_NO_FAST")]
    tidal_variant_no_fast: bool,
    /// Tidal's scale-down stabilisation window in seconds.
    #[arg(long, env = "TIDAL_SIM_TIDAL_DOWN_WINDOW_S", default_value_t = 300.0)]
    tidal_down_window_s: f64,
    /// Target utilisations every policy is also replayed at, for the comparison at matched
    /// cost and SLO.
    #[arg(
        long,
        env = "TIDAL_SIM_SWEEP_UTILIZATIONS",
        value_delimiter = ',',
        default_values_t = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    )]
    sweep_utilizations: Vec<f64>,
    /// Skip the matched comparison (one run per policy only).
    #[arg(long, env = "TIDAL_SIM_NO_SWEEP")]
    no_sweep: bool,
    /// Slots per replica in the discrete-event mode (the worker's `--max-batch`).
    #[arg(long, env = "TIDAL_SIM_MAX_BATCH", default_value_t = tidal_sim::des::DEFAULT_MAX_BATCH)]
    max_batch: u32,
    /// Threads for the sweep (default: the available cores).
    #[arg(long, env = "TIDAL_SIM_THREADS")]
    threads: Option<usize>,
}

fn parse_outage(s: &str) -> Result<Outage, String> {
    let p: Vec<&str> = s.split(':').collect();
    let err = || format!("edge outage {s:?}: expected SITE:START_S:END_S, e.g. 0:1200:2400");
    if p.len() != 3 {
        return Err(err());
    }
    let site = p[0]
        .trim()
        .trim_start_matches("edge-")
        .parse()
        .map_err(|_| err())?;
    let start_s: f64 = p[1].trim().parse().map_err(|_| err())?;
    let end_s: f64 = p[2].trim().parse().map_err(|_| err())?;
    if end_s <= start_s {
        return Err(err());
    }
    Ok(Outage {
        site,
        start_s,
        end_s,
    })
}

impl Common {
    fn model(&self) -> ModelOptions {
        ModelOptions {
            mean_replicas: self.mean_replicas,
            capacity_rps: self.capacity_rps,
            target_utilization: self.target_utilization,
            cold_start_s: self.cold_start_s,
            slo_ttft_s: self.slo_ttft_s,
            prefill_s: self.prefill_s,
            prefill_tokens_per_s: self.prefill_tokens_per_s,
            max_wait_s: self.max_wait_s,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            edge_sites: self.edge_sites,
            edge_fraction: self.edge_fraction,
            edge_min_replicas: self.edge_min_replicas,
            edge_max_replicas: self.edge_max_replicas,
            outages: self.edge_outages.clone(),
        }
    }

    fn tidal(&self) -> TidalOptions {
        TidalOptions {
            interval_s: self.tidal_interval_s,
            quantile: self.tidal_quantile,
            down_window_s: self.tidal_down_window_s,
            seed: self.seed,
            fast: (!self.tidal_no_fast_path).then(FastPathConfig::default),
        }
    }

    fn variants(&self) -> Vec<TidalOptions> {
        let mut v: Vec<TidalOptions> = self
            .tidal_variant_quantiles
            .iter()
            .map(|&quantile| TidalOptions {
                quantile,
                ..self.tidal()
            })
            .collect();
        if self.tidal_variant_no_fast {
            v.push(TidalOptions {
                fast: None,
                ..self.tidal()
            });
        }
        v
    }

    fn load(&self, path: &Path) -> anyhow::Result<Trace> {
        let mut t = trace::load_auto(path, self.tick_s, self.scale, self.seed)?;
        if let Some(d) = self.duration_s {
            t.truncate(d);
        }
        Ok(t)
    }

    fn synthetic(&self, p: Pattern) -> Trace {
        self.synthetic_seeded(p, self.seed)
    }

    fn synthetic_seeded(&self, p: Pattern, seed: u64) -> Trace {
        let mut s = Synthetic::new(p);
        s.base_rps = self.synthetic_base_rps * self.scale;
        s.seed = seed;
        let daily = matches!(
            p,
            Pattern::Diurnal | Pattern::StoreHours | Pattern::HolidayDip
        );
        s.tick_s = self.tick_s.unwrap_or(if daily { 5.0 } else { 1.0 });
        if let Some(d) = self.duration_s {
            s.duration_s = d;
        }
        s.generate()
    }
}

fn scenario(
    trace: Trace,
    common: &Common,
    model: &ModelOptions,
    tidal: &TidalOptions,
    policies: &[PolicyKind],
    variants: &[TidalOptions],
) -> anyhow::Result<Scenario> {
    let start = Instant::now();
    let name = trace.name.clone();
    let setup = setup_for(model, &trace)?;
    let sweep = (!common.no_sweep && !common.sweep_utilizations.is_empty()).then(|| {
        let threads = common.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        sweep(
            &trace,
            &setup,
            policies,
            tidal,
            &common.sweep_utilizations,
            threads,
        )
    });
    let mut sc = run_scenario(trace, setup, policies, tidal, variants);
    sc.curves = sweep.unwrap_or_default();
    eprintln!(
        "{name}: simulated in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(sc)
}

/// The simulated cluster for `trace`, or an error naming the trace.
fn setup_for(model: &ModelOptions, trace: &Trace) -> anyhow::Result<tidal_sim::engine::SimSetup> {
    model
        .setup(trace)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("trace {}", trace.name))
}

fn des_scenario(
    trace: Trace,
    common: &Common,
    model: &ModelOptions,
    policies: &[PolicyKind],
) -> anyhow::Result<Scenario> {
    let start = Instant::now();
    let name = trace.name.clone();
    let setup = setup_for(model, &trace)?;
    let sc = run_scenario_des(
        trace,
        setup,
        policies,
        &common.tidal(),
        &common.variants(),
        common.max_batch,
        common.seed,
    )
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("trace {name} (discrete-event mode)"))?;
    eprintln!(
        "{name}: discrete-event replay in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(sc)
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let trace = match (&a.trace, a.synthetic) {
        (Some(p), _) => a.common.load(p)?,
        (None, Some(p)) => a.common.synthetic(p),
        (None, None) => bail!("give --trace PATH or --synthetic KIND"),
    };
    let sc = match a.mode {
        Mode::Fluid => scenario(
            trace,
            &a.common,
            &a.common.model(),
            &a.common.tidal(),
            &a.policies,
            &a.common.variants(),
        )?,
        Mode::Des => des_scenario(trace, &a.common, &a.common.model(), &a.policies)?,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let svg = a.out.join(format!("{}.svg", sc.trace.name));
    plot::plot_scenario(&sc, &svg)?;
    let md = report::section(&sc, Some(&format!("{}.svg", sc.trace.name)));
    let md_path = a.out.join(format!("{}.md", sc.trace.name));
    report::write(&md_path, &md)?;
    let csv_path = a.out.join(format!("{}.csv", sc.trace.name));
    report::write(&csv_path, &report::timeseries_csv(&sc))?;
    println!("{md}");
    eprintln!(
        "wrote {}, {} and {}",
        md_path.display(),
        svg.display(),
        csv_path.display()
    );
    Ok(())
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let plots = a
        .plots_dir
        .clone()
        .unwrap_or_else(|| a.out.parent().unwrap_or(Path::new(".")).join("bench"));
    std::fs::create_dir_all(&plots).with_context(|| format!("creating {}", plots.display()))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.traces_dir)
        .with_context(|| format!("reading {}", a.traces_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv" || x == "jsonl"))
        .collect();
    files.sort();
    let model = a.common.model();
    let tidal = a.common.tidal();
    let mut traces: Vec<(Trace, ModelOptions)> = Vec::new();
    for f in &files {
        traces.push((a.common.load(f)?, model.clone()));
    }
    if !a.no_synthetic {
        for p in Pattern::ALL {
            traces.push((a.common.synthetic(p), model.clone()));
        }
        // Edge tier: 2 sites with 30 % of the steps load; edge-0 is cut off for 20 minutes
        // across the 2x -> 4x step.
        if model.edge_sites == 0 {
            let mut t = a.common.synthetic(Pattern::Steps);
            t.name = "synthetic-steps-edge-outage".into();
            let m = ModelOptions {
                edge_sites: 2,
                edge_fraction: 0.3,
                outages: vec![Outage {
                    site: 0,
                    start_s: 1500.0,
                    end_s: 2700.0,
                }],
                ..model.clone()
            };
            traces.push((t, m));
        }
    }
    // Fresh days: shapes added after the core was tuned, with seeds of their own.
    let fresh: Vec<(Trace, ModelOptions)> = if a.no_synthetic {
        vec![]
    } else {
        (0u64..)
            .zip(Pattern::FRESH)
            .map(|(i, p)| {
                let seed = a.fresh_seed.wrapping_add(i);
                (a.common.synthetic_seeded(p, seed), model.clone())
            })
            .collect()
    };
    let shared = traces.len();
    traces.extend(fresh);
    let rel = |p: &Path| -> String {
        let base = a.out.parent().unwrap_or(Path::new("."));
        p.strip_prefix(base)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    let mut sections = Vec::new();
    let mut verdicts = Vec::new();
    // Request-level traces and the (hour- to day-long) synthetic patterns also run as single
    // requests; the 14-day aggregate-rate traces would be hundreds of millions of them.
    let des_inputs: Vec<(Trace, ModelOptions)> = if a.no_des {
        vec![]
    } else {
        traces
            .iter()
            .filter(|(t, _)| !t.requests.is_empty() || t.name.starts_with("synthetic"))
            .cloned()
            .collect()
    };
    let mut fluid = Vec::new();
    // Each scenario's swept curves, shared ones first, for the held-out results.
    let mut curves = Vec::new();
    let mut fresh_verdicts = Vec::new();
    for (i, (t, m)) in traces.into_iter().enumerate() {
        let sc = scenario(
            t,
            &a.common,
            &m,
            &tidal,
            &PolicyKind::ALL,
            &a.common.variants(),
        )?;
        let svg = plots.join(format!("{}.svg", sc.trace.name));
        plot::plot_scenario(&sc, &svg)?;
        if i < shared {
            verdicts.extend(report::verdict(&sc));
        } else {
            fresh_verdicts.extend(report::verdict(&sc));
        }
        sections.push(report::section(&sc, Some(&rel(&svg))));
        curves.push((sc.trace.name.clone(), sc.curves));
        fluid.push((sc.trace.name.clone(), sc.summaries));
    }
    let held_out = (!a.common.no_sweep)
        .then(|| held_out_section(&curves, shared, &verdicts, &fresh_verdicts))
        .flatten();
    // The goals' sections: held out, then the intervals' calibration on every scenario.
    let goals = [
        held_out,
        Some(report::calibration_section(&fluid, tidal.quantile)),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("\n");
    let mut des_rows = Vec::new();
    for (t, m) in des_inputs {
        let sc = des_scenario(t, &a.common, &m, &PolicyKind::ALL)?;
        if let Some((_, f)) = fluid.iter().find(|(n, _)| *n == sc.trace.name) {
            des_rows.push((sc.trace.name.clone(), f.clone(), sc.summaries));
        }
    }
    let des = (!des_rows.is_empty()).then(|| report::des_section(&des_rows, a.common.max_batch));
    if !a.no_synthetic && model.edge_sites == 0 {
        // Edge sites that sleep: three days of business hours, 2 sites with 30 % of the load.
        let trace = a.common.synthetic(Pattern::StoreHours);
        let m = ModelOptions {
            edge_sites: 2,
            edge_fraction: 0.3,
            ..model.clone()
        };
        let batch = (!a.no_des).then_some(a.common.max_batch);
        let rows = tidal_sim::sleep_study(&trace, &m, &tidal, batch, a.common.seed)
            .map_err(anyhow::Error::msg)?;
        let header = report::scenario_header(&tidal_sim::Scenario {
            setup: m.setup(&trace).map_err(anyhow::Error::msg)?,
            trace,
            runs: vec![],
            summaries: vec![],
            cloud_arrivals: vec![],
            curves: vec![],
        });
        sections.push(report::sleep_section(&header, &rows));
    }
    let command = bench_command(&a);
    let analysis = report::existing_analysis(&a.out);
    let doc = report::bench_document(
        &command,
        &report::assumptions(&model, &tidal),
        (!verdicts.is_empty())
            .then(|| report::verdict_table(&verdicts))
            .as_deref(),
        Some(goals.as_str()),
        &sections,
        des.as_deref(),
        analysis.as_deref(),
    );
    report::write(&a.out, &doc)?;
    eprintln!(
        "wrote {} ({} scenarios) in {:.0} s",
        a.out.display(),
        sections.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Leave-one-out over the first `shared` scenarios' curves, and the rest (fresh days) at the
/// setting chosen on all shared ones; `None` when nothing was swept.
fn held_out_section(
    curves: &[(String, Vec<tidal_sim::frontier::Curve>)],
    shared: usize,
    verdicts: &[report::Verdict],
    fresh_verdicts: &[report::Verdict],
) -> Option<String> {
    let (train, fresh) = curves.split_at(shared.min(curves.len()));
    let loo = heldout::leave_one_out(train);
    let all_held_out = heldout::leave_one_out_all(train);
    let all: Vec<&[tidal_sim::frontier::Curve]> = train.iter().map(|(_, c)| c.as_slice()).collect();
    let setting = heldout::choose(&all)?;
    let fresh: Vec<heldout::HeldOut> = fresh
        .iter()
        .filter_map(|(name, c)| {
            Some(heldout::HeldOut {
                trace: name.clone(),
                score: heldout::score_at(c, setting)?,
            })
        })
        .collect();
    Some(report::held_out_section(
        &loo,
        &all_held_out,
        verdicts,
        setting,
        &fresh,
        fresh_verdicts,
    ))
}

/// The command line that regenerates the document (from the workspace root).
fn bench_command(a: &BenchArgs) -> String {
    let mut s = format!(
        "cargo run --release -p tidal-sim --bin tidal-sim -- bench --traces-dir {} --out {}",
        a.traces_dir.display(),
        a.out.display()
    );
    for arg in std::env::args().skip(2) {
        if !["--traces-dir", "--out"].iter().any(|f| arg.starts_with(f))
            && !arg.ends_with("traces")
            && !arg.ends_with(".md")
        {
            s.push(' ');
            s.push_str(&arg);
        }
    }
    s
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a),
        Cmd::Bench(a) => bench(a),
    }
}
