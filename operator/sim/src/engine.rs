//! The replay loop: routes a trace's arrivals to the cloud and edge sites, advances the
//! cluster model tick by tick (the fluid [`Tier`] or the discrete-event [`BatchTier`]), and
//! asks the policy for replica counts at its sync interval.

use tidal_autoscaler::{Method, WorkerLoad};

use super::cluster::{ReplicaModel, TargetObs, Tier, TierTotals};
use super::des::{BatchModel, BatchTier};
use super::policy::{FastObservation, Observation, Policy, TargetSpec};
use super::trace::{Request, Trace};

/// A scheduled outage of one edge site: `[start_s, end_s)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outage {
    pub site: usize,
    pub start_s: f64,
    pub end_s: f64,
}

/// Edge sites that take a fraction of the load; an offline site's load goes to the cloud.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeSetup {
    pub sites: usize,
    /// Fraction of all arrivals that go to the edge (split evenly between sites).
    pub fraction: f64,
    pub outages: Vec<Outage>,
    pub spec: TargetSpec,
}

impl EdgeSetup {
    pub fn site_name(i: usize) -> String {
        format!("edge-{i}")
    }

    pub fn online(&self, site: usize, t: f64) -> bool {
        !self
            .outages
            .iter()
            .any(|o| o.site == site && t >= o.start_s && t < o.end_s)
    }
}

/// Everything about the simulated cluster that is the same for every policy.
#[derive(Clone, Debug, PartialEq)]
pub struct SimSetup {
    pub model: ReplicaModel,
    pub cloud: TargetSpec,
    pub edge: Option<EdgeSetup>,
    /// Cloud replicas at the start; `None`: enough for the first minute's load (a replay of
    /// a real run starts where that run started).
    pub start_replicas: Option<u32>,
}

/// Replica counts after one sync.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncPoint {
    pub time_s: f64,
    pub cloud_desired: u32,
    pub cloud_ready: u32,
    /// Sum over edge sites.
    pub edge_desired: u32,
    /// Cloud arrival rate and queue the policy saw.
    pub cloud_arrival_rps: f64,
    pub cloud_queue: f64,
    /// Requests served late or dropped so far (all targets).
    pub misses_so_far: f64,
}

/// A forecast made at `made_at_s` for the demand at `target_s`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForecastPoint {
    pub made_at_s: f64,
    pub target_s: f64,
    pub predicted: f64,
    pub lower: f64,
    pub upper: f64,
    pub method: Method,
}

/// One policy's replay of one trace.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub policy: String,
    pub interval_s: f64,
    /// Summed over the cloud and every edge site; cost and scale events up to the trace's end.
    pub totals: TierTotals,
    pub syncs: Vec<SyncPoint>,
    pub forecasts: Vec<ForecastPoint>,
    /// How the edge sites slept and woke.
    pub sleep: SleepStats,
}

/// Edge sites with no ready replica, and their demand coming back.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct SleepStats {
    /// Requests the edge sites received (cloud-served ones included).
    pub edge_requests: f64,
    /// Requests the cloud tier served for online sites with no ready replica (their Service
    /// routed there: policies that route idle sites to the cloud only).
    pub served_by_cloud: f64,
    /// Times a site went to zero replicas.
    pub sleeps: u32,
    /// Times a site's demand came back (to one request per sync interval) after it slept, with
    /// a replica of its own already ready (its cold start hidden), and without.
    pub returns_hidden: u32,
    pub returns_exposed: u32,
    /// Replica-seconds of the edge sites (up to the trace's end).
    pub edge_replica_seconds: f64,
}

/// Per-site bookkeeping of [`SleepStats`].
#[derive(Clone, Debug, Default)]
struct SiteSleep {
    /// Asleep since its demand was last at one request per interval.
    slept: bool,
    /// Arrivals of the last interval's ticks.
    recent: std::collections::VecDeque<f64>,
    recent_sum: f64,
}

impl SiteSleep {
    /// One tick at a site: `arrivals`, its counts after the tick's decisions.
    fn tick(
        &mut self,
        stats: &mut SleepStats,
        arrivals: f64,
        window: usize,
        desired: u32,
        ready: u32,
    ) {
        stats.edge_requests += arrivals;
        self.recent.push_back(arrivals);
        self.recent_sum += arrivals;
        while self.recent.len() > window.max(1) {
            self.recent_sum -= self.recent.pop_front().unwrap_or(0.0);
        }
        let busy = self.recent_sum >= 1.0 - 1e-9;
        if desired == 0 && ready == 0 && !busy && !self.slept {
            stats.sleeps += 1;
            self.slept = true;
        } else if self.slept && busy {
            // Demand is back: was a replica of the site's own ready for it?
            if ready > 0 {
                stats.returns_hidden += 1;
            } else {
                stats.returns_exposed += 1;
            }
            self.slept = false;
        }
    }
}

/// A scaling target as the replay drives it: the fluid [`Tier`] or the discrete-event
/// [`BatchTier`]. `Arrivals` is what arrives in one tick (a count, or the requests).
pub trait Target {
    type Arrivals: Default;
    fn desired(&self) -> u32;
    fn ready(&self) -> u32;
    fn queue_len(&self) -> f64;
    /// Requests still waiting for their first token (the replay runs past the trace's end
    /// until none is left).
    fn busy(&self) -> bool;
    /// Requests in one tick's arrivals.
    fn count(arrivals: &Self::Arrivals) -> f64;
    /// `more` arriving in the same tick as `into`.
    fn merge(into: &mut Self::Arrivals, more: &Self::Arrivals);
    fn set_desired(&mut self, now_s: f64, n: u32);
    /// Hands the waiting requests to `to` (a site cut off fails over to the cloud); they no
    /// longer count as arrived here.
    fn fail_over_to(&mut self, to: &mut Self);
    /// Advances `[t0, t0 + dt)` with `arrivals` arriving during it.
    fn tick(&mut self, t0: f64, dt: f64, arrivals: &Self::Arrivals);
    /// What a policy sees at `now_s`, covering everything since the last observation.
    fn observe(&mut self, now_s: f64, online: bool) -> TargetObs;
    /// Whatever still waits at the end is dropped.
    fn finish(&mut self);
    fn totals(&self) -> &TierTotals;
}

/// One tick's arrivals per target after routing and outages.
#[derive(Clone, Debug, PartialEq)]
pub struct Routed<A> {
    pub cloud: Vec<A>,
    /// Per site, per tick.
    pub sites: Vec<Vec<A>>,
}

/// Arrivals per tick for the cloud and for each site, after routing and outages.
pub fn route(trace: &Trace, edge: Option<&EdgeSetup>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let Some(e) = edge.filter(|e| e.sites > 0) else {
        return (trace.arrivals.clone(), vec![]);
    };
    let share = e.fraction.clamp(0.0, 1.0) / e.sites as f64;
    let mut cloud = Vec::with_capacity(trace.arrivals.len());
    let mut sites = vec![Vec::with_capacity(trace.arrivals.len()); e.sites];
    for (k, &a) in trace.arrivals.iter().enumerate() {
        let t = k as f64 * trace.tick_s;
        let mut c = a;
        for (i, s) in sites.iter_mut().enumerate() {
            let x = if e.online(i, t) { a * share } else { 0.0 };
            s.push(x);
            c -= x;
        }
        cloud.push(c.max(0.0));
    }
    (cloud, sites)
}

/// [`route`] for single requests: request `i` goes to site `⌊u / share⌋` for the
/// low-discrepancy `u = frac(i φ)` when `u` falls in the edge fraction and that site is
/// online at its arrival, otherwise to the cloud; grouped per tick of `trace`.
pub fn route_requests(
    trace: &Trace,
    requests: &[Request],
    edge: Option<&EdgeSetup>,
) -> Routed<Vec<Request>> {
    let n = trace.arrivals.len();
    let sites_n = edge.map_or(0, |e| e.sites);
    let mut out = Routed {
        cloud: vec![Vec::new(); n],
        sites: vec![vec![Vec::new(); n]; sites_n],
    };
    const PHI: f64 = 0.618_033_988_749_894_9;
    for (i, r) in requests.iter().enumerate() {
        let k = ((r.t_s / trace.tick_s).floor() as usize).min(n.saturating_sub(1));
        let site = edge.filter(|e| e.sites > 0).and_then(|e| {
            let share = e.fraction.clamp(0.0, 1.0) / e.sites as f64;
            let u = (i as f64 * PHI).fract();
            let s = (u / share.max(1e-12)) as usize;
            (s < e.sites && e.online(s, r.t_s)).then_some(s)
        });
        match site {
            Some(s) => out.sites[s][k].push(*r),
            None => out.cloud[k].push(*r),
        }
    }
    out
}

fn initial<A>(arrivals: &[A], count: impl Fn(&A) -> f64, tick_s: f64, spec: &TargetSpec) -> u32 {
    let n = ((60.0 / tick_s).ceil() as usize).clamp(1, arrivals.len().max(1));
    let rate = arrivals.iter().take(n).map(count).sum::<f64>() / (n as f64 * tick_s);
    ((rate / spec.target_rps_per_replica - 1e-9).ceil().max(0.0) as u32).clamp(spec.min, spec.max)
}

/// Replays `trace` under `policy` in the fluid model. Every target starts warm with enough
/// replicas for the first minute's load; after the trace ends the queues drain (up to the
/// queue timeout) so requests still waiting are served or dropped, but cost is counted up to
/// the trace's end only.
pub fn simulate(trace: &Trace, setup: &SimSetup, policy: &mut dyn Policy) -> RunResult {
    let (cloud, sites) = route(trace, setup.edge.as_ref());
    let model = setup.model;
    replay(trace, setup, policy, &Routed { cloud, sites }, |n| {
        Tier::new(model, n)
    })
}

/// [`simulate`] in the discrete-event mode: requests (see [`super::des::requests`], routed by
/// [`route_requests`]) on replicas that batch as `batch` says.
pub fn simulate_des(
    trace: &Trace,
    routed: &Routed<Vec<Request>>,
    setup: &SimSetup,
    batch: &BatchModel,
    policy: &mut dyn Policy,
) -> RunResult {
    replay(trace, setup, policy, routed, |n| {
        BatchTier::new(batch.clone(), n)
    })
}

fn replay<T: Target>(
    trace: &Trace,
    setup: &SimSetup,
    policy: &mut dyn Policy,
    routed: &Routed<T::Arrivals>,
    make: impl Fn(u32) -> T,
) -> RunResult {
    let dt = trace.tick_s;
    let none = T::Arrivals::default();
    let mut cloud = make(
        setup
            .start_replicas
            .unwrap_or_else(|| initial(&routed.cloud, T::count, dt, &setup.cloud)),
    );
    let mut sites: Vec<T> = match &setup.edge {
        Some(e) => routed
            .sites
            .iter()
            .map(|a| make(initial(a, T::count, dt, &e.spec)))
            .collect(),
        None => vec![],
    };
    let names: Vec<String> = (0..sites.len()).map(EdgeSetup::site_name).collect();
    let mut was_online = vec![true; sites.len()];
    let interval = policy.interval_s().max(dt);
    // A site with no ready replica has its Service routed to the cloud tier (Tidal's
    // operator does this); its requests still count as its demand.
    let route_idle = policy.routes_idle_sites_to_cloud();
    let mut to_cloud_since_sync = vec![0.0; sites.len()];
    let mut last_sync = 0.0;
    let mut sleep = SleepStats::default();
    let mut site_sleep = vec![SiteSleep::default(); sites.len()];
    let window = (interval / dt).round().max(1.0) as usize;
    let n = trace.arrivals.len();
    let drain = (setup.model.max_wait_s / dt).ceil() as usize + 1;
    // The first sync comes after one interval, so that it sees a full window of metrics.
    let mut next_sync = interval;
    // The fast path reads the workers between syncs (from its first interval on).
    let fast_interval = policy.fast_interval_s().map(|f| f.max(dt));
    let mut next_fast = fast_interval.unwrap_or(f64::INFINITY);
    let mut syncs = Vec::new();
    let mut forecasts = Vec::new();
    let mut cost_at_end: Option<(f64, u32)> = None;
    let mut edge_cost_at_end: Option<f64> = None;
    for k in 0..n + drain {
        let t = k as f64 * dt;
        if k == n {
            cost_at_end = Some(sum_cost(&cloud, &sites));
            edge_cost_at_end = Some(sites.iter().map(|s| s.totals().replica_seconds).sum());
        }
        if k >= n && !cloud.busy() && !sites.iter().any(T::busy) {
            break;
        }
        let online: Vec<bool> = (0..sites.len())
            .map(|i| setup.edge.as_ref().is_none_or(|e| e.online(i, t)))
            .collect();
        for i in 0..sites.len() {
            if was_online[i] && !online[i] {
                // The site is cut off: its backlog fails over to the cloud.
                sites[i].fail_over_to(&mut cloud);
            }
            was_online[i] = online[i];
        }
        if k < n && t + 1e-9 >= next_sync {
            let span = (t - last_sync).max(dt);
            last_sync = t;
            let obs = Observation {
                time_s: t,
                cloud: cloud.observe(t, true),
                sites: sites
                    .iter_mut()
                    .zip(&online)
                    .zip(&names)
                    .zip(to_cloud_since_sync.iter_mut())
                    .map(|(((s, &on), name), routed)| {
                        let mut o = s.observe(t, on);
                        // Counted by the cloud workers as this site's (its Service's name).
                        o.sample.arrival_rps += std::mem::take(routed) / span;
                        (name.clone(), o)
                    })
                    .collect(),
            };
            let (seen_rps, seen_queue) =
                (obs.cloud.sample.arrival_rps, obs.cloud.sample.queue_depth);
            let act = policy.decide(&obs);
            cloud.set_desired(t, act.cloud);
            for (s, &r) in sites.iter_mut().zip(&act.sites) {
                s.set_desired(t, r);
            }
            if let Some(f) = act.forecast {
                forecasts.push(ForecastPoint {
                    made_at_s: t,
                    target_s: t + f.horizon_s,
                    predicted: f.predicted,
                    lower: f.lower,
                    upper: f.upper,
                    method: f.method,
                });
            }
            syncs.push(SyncPoint {
                time_s: t,
                cloud_desired: cloud.desired(),
                cloud_ready: cloud.ready(),
                edge_desired: sites.iter().map(T::desired).sum(),
                cloud_arrival_rps: seen_rps,
                cloud_queue: seen_queue,
                misses_so_far: std::iter::once(&cloud)
                    .chain(&sites)
                    .map(|s| s.totals().served_late + s.totals().dropped)
                    .sum(),
            });
            while next_sync <= t + 1e-9 {
                next_sync += interval;
            }
        }
        if k < n && t + 1e-9 >= next_fast {
            fast_path(policy, t, &mut cloud, &mut sites, &names, &online);
            while next_fast <= t + 1e-9 {
                next_fast += fast_interval.unwrap_or(f64::INFINITY);
            }
        }
        let mut spilled: Option<T::Arrivals> = None;
        for (i, s) in sites.iter_mut().enumerate() {
            let arrivals = routed.sites[i].get(k).unwrap_or(&none);
            if k < n {
                site_sleep[i].tick(
                    &mut sleep,
                    T::count(arrivals),
                    window,
                    s.desired(),
                    s.ready(),
                );
            }
            if route_idle && online[i] && s.ready() == 0 {
                // Its waiting requests and new ones go where its Service now points.
                s.fail_over_to(&mut cloud);
                let c = T::count(arrivals);
                if c > 0.0 {
                    to_cloud_since_sync[i] += c;
                    sleep.served_by_cloud += c;
                    T::merge(spilled.get_or_insert_with(T::Arrivals::default), arrivals);
                }
                s.tick(t, dt, &none);
            } else {
                s.tick(t, dt, arrivals);
            }
        }
        let own = routed.cloud.get(k).unwrap_or(&none);
        match spilled.as_mut() {
            Some(extra) => {
                T::merge(extra, own);
                cloud.tick(t, dt, extra);
            }
            None => cloud.tick(t, dt, own),
        }
    }
    cloud.finish();
    for s in &mut sites {
        s.finish();
    }
    let mut totals = *cloud.totals();
    for s in &sites {
        let x = s.totals();
        totals.arrived += x.arrived;
        totals.served_ok += x.served_ok;
        totals.served_late += x.served_late;
        totals.dropped += x.dropped;
        totals.cold_starts += x.cold_starts;
        totals.ttft.merge(&x.ttft);
    }
    let (rs, ev) = cost_at_end.unwrap_or_else(|| sum_cost(&cloud, &sites));
    totals.replica_seconds = rs;
    totals.scale_events = ev;
    sleep.edge_replica_seconds =
        edge_cost_at_end.unwrap_or_else(|| sites.iter().map(|s| s.totals().replica_seconds).sum());
    RunResult {
        policy: policy.name().to_string(),
        interval_s: interval,
        totals,
        syncs,
        forecasts,
        sleep,
    }
}

/// One fast-path reading: each online target's queue as its workers report it; raises only.
fn fast_path<T: Target>(
    policy: &mut dyn Policy,
    t: f64,
    cloud: &mut T,
    sites: &mut [T],
    names: &[String],
    online: &[bool],
) {
    let read = |x: &T| WorkerLoad {
        time_s: t,
        waiting: x.queue_len(),
        ready: x.ready(),
        desired: x.desired(),
    };
    let obs = FastObservation {
        time_s: t,
        cloud: read(cloud),
        sites: sites
            .iter()
            .zip(names)
            .zip(online)
            .filter(|(_, on)| **on)
            .map(|((s, n), _)| (n.clone(), read(s)))
            .collect(),
    };
    let act = policy.fast(&obs);
    if let Some(r) = act.cloud.filter(|&r| r > cloud.desired()) {
        cloud.set_desired(t, r);
    }
    for (name, r) in act.sites {
        if let Some(i) = names.iter().position(|n| *n == name)
            && r > sites[i].desired()
        {
            sites[i].set_desired(t, r);
        }
    }
}

fn sum_cost<T: Target>(cloud: &T, sites: &[T]) -> (f64, u32) {
    let all = || std::iter::once(cloud).chain(sites).map(T::totals);
    (
        all().map(|t| t.replica_seconds).sum(),
        all().map(|t| t.scale_events).sum(),
    )
}
