//! A discrete-time model of one scaling target (the cloud tier or one edge site).
//!
//! Fluid model: arrivals are counts per tick, grouped into FIFO cohorts; `ready` replicas serve
//! `capacity_rps` requests per second each, from the head of the queue. A request's
//! time-to-first-token is its queueing wait plus a fixed prefill time. New replicas cost from
//! creation but serve only after `cold_start_s`; scale-down removes replicas at once (pending
//! ones first). Requests that waited longer than `max_wait_s` are dropped (SLO misses).

use std::collections::VecDeque;

use tidal_autoscaler::TierSample;

use super::engine::Target;

/// What every replica of a target is like; the same for every policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplicaModel {
    /// Requests per second one ready replica completes.
    pub capacity_rps: f64,
    /// Seconds from creation to ready.
    pub cold_start_s: f64,
    /// Time to first token of a request that did not wait.
    pub prefill_s: f64,
    /// TTFT objective: a request meets the SLO if wait + prefill <= this.
    pub slo_ttft_s: f64,
    /// Queue timeout: requests waiting longer are dropped (and miss the SLO).
    pub max_wait_s: f64,
}

/// Requests that arrived together, uniformly spread over `[start_s, start_s + span_s]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cohort {
    pub start_s: f64,
    pub span_s: f64,
    pub count: f64,
}

impl Cohort {
    fn mid_s(&self) -> f64 {
        self.start_s + self.span_s / 2.0
    }
}

/// Running totals of one target.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct TierTotals {
    pub arrived: f64,
    /// Served with TTFT within the SLO.
    pub served_ok: f64,
    pub served_late: f64,
    pub dropped: f64,
    /// Replica-seconds, pending replicas included.
    pub replica_seconds: f64,
    /// Changes of the replica count.
    pub scale_events: u32,
    pub cold_starts: u32,
    /// TTFT of everything served.
    pub ttft: TtftHistogram,
}

/// Log-spaced TTFT histogram, 20 bins per decade from 10 ms (about 12 % wide: quantiles are
/// read to that precision); fixed-size so totals stay `Copy`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TtftHistogram {
    bins: [f64; TtftHistogram::BINS],
}

impl Default for TtftHistogram {
    fn default() -> Self {
        TtftHistogram {
            bins: [0.0; Self::BINS],
        }
    }
}

impl TtftHistogram {
    const BINS: usize = 120;
    const PER_DECADE: f64 = 20.0;
    const LOW_S: f64 = 0.01;

    pub fn add(&mut self, ttft_s: f64, weight: f64) {
        if weight.is_nan() || weight <= 0.0 || !ttft_s.is_finite() {
            return;
        }
        let x = (ttft_s.max(Self::LOW_S) / Self::LOW_S).log10() * Self::PER_DECADE;
        let i = (x.floor().max(0.0) as usize).min(Self::BINS - 1);
        self.bins[i] += weight;
    }

    pub fn merge(&mut self, other: &TtftHistogram) {
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
    }

    /// The `q` quantile (the geometric middle of its bin); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: f64 = self.bins.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let mut acc = 0.0;
        let i = self
            .bins
            .iter()
            .position(|b| {
                acc += b;
                acc >= q * total - 1e-9
            })
            .unwrap_or(Self::BINS - 1);
        Some(Self::LOW_S * 10f64.powf((i as f64 + 0.5) / Self::PER_DECADE))
    }
}

/// Accumulated since the last observation (what a Prometheus range query would return).
#[derive(Clone, Debug, Default)]
struct Window {
    start_s: f64,
    arrived: f64,
    served: f64,
    /// (ttft, weight) of what was served.
    ttft: Vec<(f64, f64)>,
    ready_times: Vec<f64>,
}

/// What a policy sees of one target.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TargetObs {
    pub sample: TierSample,
    /// Replicas asked for (pending + ready).
    pub desired: u32,
    pub ready: u32,
    /// Creation-to-ready times of replicas that became ready since the last observation.
    pub ready_times_s: Vec<f64>,
    /// False while the target (an edge site) is cut off.
    pub online: bool,
}

/// One scaling target.
#[derive(Clone, Debug)]
pub struct Tier {
    pub model: ReplicaModel,
    ready: u32,
    /// Ready-at times of pending replicas, in creation order.
    pending: VecDeque<f64>,
    queue: VecDeque<Cohort>,
    pub totals: TierTotals,
    window: Window,
}

impl Tier {
    /// A target with `replicas` already ready at time 0.
    pub fn new(model: ReplicaModel, replicas: u32) -> Self {
        Tier {
            model,
            ready: replicas,
            pending: VecDeque::new(),
            queue: VecDeque::new(),
            totals: TierTotals::default(),
            window: Window::default(),
        }
    }

    pub fn desired(&self) -> u32 {
        self.ready + self.pending.len() as u32
    }

    pub fn ready(&self) -> u32 {
        self.ready
    }

    pub fn queue_len(&self) -> f64 {
        self.queue.iter().map(|c| c.count).sum()
    }

    /// Sets the replica count at `now_s`: new replicas start cold, removals take pending
    /// replicas first (newest first), then ready ones.
    pub fn set_desired(&mut self, now_s: f64, n: u32) {
        let cur = self.desired();
        if n == cur {
            return;
        }
        self.totals.scale_events += 1;
        if n > cur {
            for _ in cur..n {
                self.pending.push_back(now_s + self.model.cold_start_s);
                self.totals.cold_starts += 1;
            }
        } else {
            let mut remove = cur - n;
            while remove > 0 && self.pending.pop_back().is_some() {
                remove -= 1;
            }
            self.ready -= remove.min(self.ready);
        }
    }

    /// Adds a cohort of requests (also used to move an offline site's backlog elsewhere);
    /// keeps the queue in arrival order.
    pub fn enqueue(&mut self, c: Cohort) {
        if c.count <= 0.0 {
            return;
        }
        self.totals.arrived += c.count;
        self.window.arrived += c.count;
        match self.queue.back() {
            Some(b) if b.start_s > c.start_s => {
                let i = self.queue.partition_point(|x| x.start_s <= c.start_s);
                self.queue.insert(i, c);
            }
            _ => self.queue.push_back(c),
        }
    }

    /// Removes and returns the whole backlog; it no longer counts as arrived here.
    pub fn take_queue(&mut self) -> Vec<Cohort> {
        let out: Vec<Cohort> = self.queue.drain(..).collect();
        let n: f64 = out.iter().map(|c| c.count).sum();
        self.totals.arrived -= n;
        self.window.arrived -= n;
        out
    }

    /// Advances one tick `[t0, t0 + dt)` with `arrivals` arriving during it.
    pub fn tick(&mut self, t0: f64, dt: f64, arrivals: f64) {
        while self.pending.front().is_some_and(|&r| r <= t0 + 1e-9) {
            self.pending.pop_front();
            self.ready += 1;
            self.window.ready_times.push(self.model.cold_start_s);
        }
        self.totals.replica_seconds += self.desired() as f64 * dt;
        self.enqueue(Cohort {
            start_s: t0,
            span_s: dt,
            count: arrivals,
        });
        self.serve(t0, dt);
        // Drop what has waited too long (on average) by the end of the tick.
        let limit = t0 + dt - self.model.max_wait_s;
        while self.queue.front().is_some_and(|c| c.mid_s() < limit) {
            let c = self.queue.pop_front().unwrap();
            self.totals.dropped += c.count;
        }
    }

    fn serve(&mut self, t0: f64, dt: f64) {
        let rate = self.ready as f64 * self.model.capacity_rps;
        if rate <= 0.0 {
            return;
        }
        let cap = rate * dt;
        let budget = self.model.slo_ttft_s - self.model.prefill_s;
        let mut done = 0.0;
        while done < cap - 1e-12 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let take = front.count.min(cap - done);
            // The piece arrived uniformly over [a1, a2] and is served uniformly over [s1, s2]
            // (FIFO), so its wait runs linearly from s1 - a1 to s2 - a2; a request cannot be
            // served before it arrives, hence the clamp at 0.
            let piece_span = front.span_s * take / front.count;
            let (a1, a2) = (front.start_s, front.start_s + piece_span);
            let s1 = t0 + done / rate;
            let s2 = t0 + (done + take) / rate;
            let (w1, w2) = (s1 - a1, s2 - a2);
            let ok = fraction_within(w1, w2, budget);
            self.totals.served_ok += take * ok;
            self.totals.served_late += take * (1.0 - ok);
            self.window.served += take;
            let mean_wait = (w1.max(0.0) + w2.max(0.0)) / 2.0;
            self.window
                .ttft
                .push((self.model.prefill_s + mean_wait, take));
            self.totals.ttft.add(self.model.prefill_s + mean_wait, take);
            done += take;
            front.count -= take;
            front.start_s = a2;
            front.span_s -= piece_span;
            if front.count <= 1e-12 {
                self.queue.pop_front();
            }
        }
    }

    /// Whatever is still queued at the end counts as dropped.
    pub fn finish(&mut self) {
        let left: f64 = self.queue.drain(..).map(|c| c.count).sum();
        self.totals.dropped += left;
    }

    /// The sample a policy gets at `now_s`, covering everything since the last observation.
    pub fn observe(&mut self, now_s: f64, online: bool) -> TargetObs {
        let w = std::mem::take(&mut self.window);
        self.window.start_s = now_s;
        let span = (now_s - w.start_s).max(1e-9);
        let served_rps = w.served / span;
        TargetObs {
            sample: TierSample {
                arrival_rps: w.arrived.max(0.0) / span,
                served_rps,
                queue_depth: self.queue_len(),
                running: served_rps * self.model.prefill_s,
                ttft_p95_s: weighted_quantile(&w.ttft, 0.95),
                tpot_p95_s: None,
            },
            desired: self.desired(),
            ready: self.ready,
            ready_times_s: w.ready_times,
            online,
        }
    }
}

impl Target for Tier {
    type Arrivals = f64;

    fn desired(&self) -> u32 {
        Tier::desired(self)
    }
    fn ready(&self) -> u32 {
        Tier::ready(self)
    }
    fn queue_len(&self) -> f64 {
        Tier::queue_len(self)
    }
    fn busy(&self) -> bool {
        Tier::queue_len(self) > 0.0
    }
    fn count(arrivals: &f64) -> f64 {
        *arrivals
    }
    fn merge(into: &mut f64, more: &f64) {
        *into += more;
    }
    fn set_desired(&mut self, now_s: f64, n: u32) {
        Tier::set_desired(self, now_s, n)
    }
    fn fail_over_to(&mut self, to: &mut Self) {
        for c in self.take_queue() {
            to.enqueue(c);
        }
    }
    fn tick(&mut self, t0: f64, dt: f64, arrivals: &f64) {
        Tier::tick(self, t0, dt, *arrivals)
    }
    fn observe(&mut self, now_s: f64, online: bool) -> TargetObs {
        Tier::observe(self, now_s, online)
    }
    fn finish(&mut self) {
        Tier::finish(self)
    }
    fn totals(&self) -> &TierTotals {
        &self.totals
    }
}

/// Fraction of a linear run of waits from `w1` to `w2` that is at most `budget`.
fn fraction_within(w1: f64, w2: f64, budget: f64) -> f64 {
    match (w1 <= budget, w2 <= budget) {
        (true, true) => 1.0,
        (false, false) => 0.0,
        (ok_first, _) => {
            let x = ((budget - w1) / (w2 - w1)).clamp(0.0, 1.0);
            if ok_first { x } else { 1.0 - x }
        }
    }
}

/// The `q` quantile of weighted values; `None` when there is no weight.
pub fn weighted_quantile(values: &[(f64, f64)], q: f64) -> Option<f64> {
    let total: f64 = values.iter().map(|v| v.1).sum();
    if total <= 0.0 {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut acc = 0.0;
    for (x, w) in &v {
        acc += w;
        if acc >= q * total - 1e-12 {
            return Some(*x);
        }
    }
    v.last().map(|x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ReplicaModel {
        ReplicaModel {
            capacity_rps: 10.0,
            cold_start_s: 30.0,
            prefill_s: 0.5,
            slo_ttft_s: 2.0,
            max_wait_s: 1e9,
        }
    }

    #[test]
    fn without_scaling_an_overload_grows_the_queue_and_misses_the_slo() {
        let mut t = Tier::new(model(), 2);
        let mut last = 0.0;
        for k in 0..100 {
            t.tick(k as f64, 1.0, 30.0);
            let q = t.queue_len();
            assert!(q > last, "tick {k}: queue {q} did not grow from {last}");
            last = q;
        }
        // 30 rps arriving, 20 served: 10 more queued each second.
        assert!((last - 1000.0).abs() < 1e-6, "{last}");
        let obs = t.observe(100.0, true);
        assert!((obs.sample.arrival_rps - 30.0).abs() < 1e-9);
        assert!((obs.sample.served_rps - 20.0).abs() < 1e-9);
        // The request served at time s arrived at 2s/3, so it waited s/3: up to 33 s.
        let p95 = obs.sample.ttft_p95_s.unwrap();
        assert!(p95 > 28.0 && p95 < 34.0, "{p95}");
        assert!(t.totals.served_late > t.totals.served_ok);
    }

    #[test]
    fn within_capacity_everything_meets_the_slo() {
        let mut t = Tier::new(model(), 2);
        for k in 0..50 {
            t.tick(k as f64, 1.0, 15.0);
        }
        assert_eq!(t.queue_len(), 0.0);
        assert!((t.totals.served_ok - 750.0).abs() < 1e-6);
        assert_eq!(t.totals.served_late, 0.0);
        let obs = t.observe(50.0, true);
        assert_eq!(obs.sample.ttft_p95_s, Some(0.5));
    }

    #[test]
    fn cold_start_delays_capacity() {
        let mut t = Tier::new(model(), 1);
        t.set_desired(0.0, 3);
        assert_eq!((t.desired(), t.ready()), (3, 1));
        for k in 0..30 {
            t.tick(k as f64, 1.0, 25.0);
        }
        // Only one replica (10 rps) served for the first 30 s.
        assert!((t.totals.served_ok + t.totals.served_late - 300.0).abs() < 1e-6);
        assert_eq!(t.ready(), 1);
        t.tick(30.0, 1.0, 25.0);
        assert_eq!(t.ready(), 3);
        let obs = t.observe(31.0, true);
        assert_eq!(obs.ready_times_s, vec![30.0, 30.0]);
        assert_eq!(t.totals.cold_starts, 2);
    }

    #[test]
    fn replica_seconds_on_a_hand_computed_case() {
        let mut t = Tier::new(model(), 2);
        // 10 s at 2, scale to 5 at t=10 (3 pending cost too), down to 1 at t=50, run to t=60.
        for k in 0..10 {
            t.tick(k as f64, 1.0, 0.0);
        }
        t.set_desired(10.0, 5);
        for k in 10..50 {
            t.tick(k as f64, 1.0, 0.0);
        }
        t.set_desired(50.0, 1);
        for k in 50..60 {
            t.tick(k as f64, 1.0, 0.0);
        }
        assert_eq!(t.totals.replica_seconds, 2.0 * 10.0 + 5.0 * 40.0 + 10.0);
        assert_eq!(t.totals.scale_events, 2);
    }

    #[test]
    fn scale_down_removes_pending_first() {
        let mut t = Tier::new(model(), 2);
        t.set_desired(0.0, 4);
        t.set_desired(1.0, 3);
        assert_eq!((t.desired(), t.ready()), (3, 2));
        t.set_desired(2.0, 1);
        assert_eq!((t.desired(), t.ready()), (1, 1));
    }

    #[test]
    fn long_waits_are_dropped_and_leftovers_count_at_finish() {
        let mut m = model();
        m.max_wait_s = 5.0;
        let mut t = Tier::new(m, 0);
        for k in 0..10 {
            t.tick(k as f64, 1.0, 1.0);
        }
        assert!(
            (t.totals.dropped - 5.0).abs() < 1e-9,
            "{}",
            t.totals.dropped
        );
        t.finish();
        assert!((t.totals.dropped - 10.0).abs() < 1e-9);
    }

    #[test]
    fn weighted_quantile_picks_by_weight() {
        let v = [(1.0, 90.0), (10.0, 10.0)];
        assert_eq!(weighted_quantile(&v, 0.5), Some(1.0));
        assert_eq!(weighted_quantile(&v, 0.95), Some(10.0));
        assert_eq!(weighted_quantile(&[], 0.95), None);
    }
}
