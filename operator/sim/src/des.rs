//! The discrete-event mode: one scaling target as replicas that batch like the real worker.
//!
//! Requests arrive one by one (times and sizes from the trace) into the target's FIFO queue. A
//! replica is a continuous-batching server with `max_batch` slots (the worker's default, 16): a
//! request admitted to a slot first gets its prefill, which runs alone on the replica (decode
//! pauses, as in the worker without chunked prefill) for a time proportional to its prompt;
//! then it decodes one token per step with every other running sequence, and a step takes
//! longer the bigger the batch ([`WORKER_STEP_S`], measured on the worker). TTFT = queueing
//! wait + waiting behind other prefills on the replica + its own prefill + a fixed overhead, so
//! requests queue below saturation, as on real replicas (the fluid model's queue is empty
//! until utilisation reaches 100 %).
//!
//! Dispatch ([`Dispatch`]): by default the head of the queue goes to the ready replica with the
//! most free slots (what a least-loaded router does); `Random` sends each request on arrival to
//! a ready replica picked uniformly at random, where it waits in that replica's own queue (what
//! kube-proxy does to a ClusterIP Service's connections, one request per connection). Scale-up adds replicas that serve after the cold start;
//! scale-down removes pending replicas first, then drains the least busy ready ones (no new
//! work, in-flight requests finish, cost counted until they do).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{ReplicaModel, TargetObs, TierTotals, weighted_quantile};
use super::engine::Target;
use super::trace::{Request, Trace};
use tidal_autoscaler::TierSample;

/// Seconds per decode step of one sequence at batch size b, measured on the worker through
/// HTTP (`inference-worker/BENCHMARKS.md`, "Through HTTP": 25.8, 74.2 and 98.8 tok/s in all at
/// concurrency 1, 4 and 16, so b / tok/s per step). Only the shape is used: the simulator
/// scales it so that a full replica completes the trace's `capacity_rps`.
pub const WORKER_STEP_S: [(u32, f64); 3] = [(1, 1.0 / 25.8), (4, 4.0 / 74.2), (16, 16.0 / 98.8)];

/// The worker's default `max_batch`.
pub const DEFAULT_MAX_BATCH: u32 = 16;

/// The part of the prefill time that is latency, not replica work (tokenising, the hop
/// through the Service): at most this, and at most the whole prefill time.
const OVERHEAD_S: f64 = 0.1;

/// How requests reach replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// One queue for the target; its head goes to the ready replica with the most free slots.
    #[default]
    LeastLoaded,
    /// Each request goes on arrival to a uniformly random ready replica (seeded) and waits in
    /// that replica's queue: a busy replica's queue grows while another's slots are free.
    Random { seed: u64 },
}

/// How one replica batches, derived from the fluid [`ReplicaModel`] of the same trace.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchModel {
    pub replica: ReplicaModel,
    pub max_batch: u32,
    /// Decode step time at batch `b` is `step_s[b - 1]`.
    pub step_s: Vec<f64>,
    /// Replica work to prefill one prompt token.
    pub prefill_s_per_token: f64,
    /// Latency added to every TTFT that occupies no replica.
    pub overhead_s: f64,
    pub dispatch: Dispatch,
}

/// Linear interpolation (and extrapolation past the last point) of [`WORKER_STEP_S`].
fn worker_step(b: u32) -> f64 {
    step_at(&WORKER_STEP_S, b)
}

/// Linear interpolation (and extrapolation past the last point) of measured `(batch, step
/// seconds)` points in ascending batch order; one point is a constant.
pub fn step_at(pts: &[(u32, f64)], b: u32) -> f64 {
    match pts {
        [] => f64::NAN,
        [(_, s)] => *s,
        _ => {
            let seg = pts
                .windows(2)
                .find(|w| b <= w[1].0)
                .unwrap_or(&pts[pts.len() - 2..]);
            let ((b0, s0), (b1, s1)) = (seg[0], seg[1]);
            s0 + (s1 - s0) * (f64::from(b) - f64::from(b0)) / (f64::from(b1) - f64::from(b0))
        }
    }
}

impl BatchModel {
    /// A replica whose mean prefill equals the fluid model's `prefill_s` and which completes
    /// `capacity_rps` of the trace's mean request when every slot is busy.
    pub fn calibrated(
        replica: ReplicaModel,
        max_batch: u32,
        mean_input_tokens: f64,
        mean_output_tokens: f64,
    ) -> Result<BatchModel, String> {
        if max_batch == 0 {
            return Err("max batch must be >= 1".into());
        }
        let overhead_s = OVERHEAD_S.min(replica.prefill_s);
        let prefill_work = replica.prefill_s - overhead_s;
        // Per request at a full batch: its prefill alone, then its share of the decode steps.
        let per_request = 1.0 / replica.capacity_rps;
        let decode = per_request - prefill_work;
        if decode < 0.2 * per_request {
            return Err(format!(
                "prefill ({prefill_work:.3} s of replica work) leaves no room to decode at \
                 {:.3} requests/s per replica",
                replica.capacity_rps
            ));
        }
        // The first token comes from the prefill.
        let steps = (mean_output_tokens - 1.0).max(1.0);
        let full = f64::from(max_batch);
        let scale = decode / (steps * worker_step(max_batch) / full);
        Ok(BatchModel {
            replica,
            max_batch,
            step_s: (1..=max_batch).map(|b| worker_step(b) * scale).collect(),
            prefill_s_per_token: prefill_work / mean_input_tokens.max(1.0),
            overhead_s,
            dispatch: Dispatch::LeastLoaded,
        })
    }

    fn step(&self, batch: usize) -> f64 {
        self.step_s[batch.clamp(1, self.step_s.len()) - 1]
    }
}

/// The requests the discrete-event mode replays: the trace's own when it has them and its
/// arrivals were not rescaled; otherwise drawn from the per-tick arrivals (uniform times
/// within each tick, sizes resampled from the trace's requests or exponential around its
/// means), seeded.
pub fn requests(trace: &Trace, seed: u64) -> Vec<Request> {
    let own = trace.requests.len() as f64;
    if own > 0.0 && (trace.total_requests() - own).abs() < 0.5 {
        return trace.requests.clone();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (k, &a) in trace.arrivals.iter().enumerate() {
        let mut n = a.floor() as usize;
        if rng.random::<f64>() < a.fract() {
            n += 1;
        }
        let mut times: Vec<f64> = (0..n)
            .map(|_| (k as f64 + rng.random::<f64>()) * trace.tick_s)
            .collect();
        times.sort_by(f64::total_cmp);
        for t_s in times {
            let (input_tokens, output_tokens) = if trace.requests.is_empty() {
                let mut exp = |mean: f64| {
                    let u = rng.random::<f64>().max(1e-12);
                    (-mean * u.ln()).round().clamp(1.0, 1e6) as u32
                };
                (exp(trace.mean_input_tokens), exp(trace.mean_output_tokens))
            } else {
                let r = trace.requests[rng.random_range(0..trace.requests.len())];
                (r.input_tokens, r.output_tokens)
            };
            out.push(Request {
                t_s,
                input_tokens,
                output_tokens,
            });
        }
    }
    out
}

/// A request on a replica.
#[derive(Clone, Copy, Debug)]
struct Seq {
    arrived_s: f64,
    /// Prefill work left (while in the prefill queue) or decode steps left (while running).
    left: f64,
    output_tokens: u32,
}

/// What the replicas report back from an advance.
#[derive(Default)]
struct Done {
    /// TTFTs of prefills that finished.
    first_tokens: Vec<f64>,
    completed: u32,
}

#[derive(Clone, Debug, Default)]
struct Replica {
    /// Serves from this time on (creation + cold start).
    ready_at: f64,
    /// Removed by a scale-down: takes no new work, leaves when empty.
    draining: bool,
    /// Admitted, prefilled one at a time in admission order.
    prefill: VecDeque<Seq>,
    /// Decoding: `left` is in steps.
    running: Vec<Seq>,
    /// Sent here and not yet admitted ([`Dispatch::Random`] only).
    waiting: VecDeque<Request>,
    /// Its readiness was reported (replicas ready from the start count as reported).
    announced: bool,
}

impl Replica {
    fn busy(&self) -> usize {
        self.prefill.len() + self.running.len()
    }

    /// Its batch and its own queue.
    fn load(&self) -> usize {
        self.busy() + self.waiting.len()
    }

    fn start(&mut self, r: Request, m: &BatchModel) {
        self.prefill.push_back(Seq {
            arrived_s: r.t_s,
            left: f64::from(r.input_tokens) * m.prefill_s_per_token,
            output_tokens: r.output_tokens,
        });
    }

    /// When its next prefill or completion happens, from `now`.
    fn next_event(&self, now: f64, m: &BatchModel) -> f64 {
        if let Some(p) = self.prefill.front() {
            now + p.left
        } else if !self.running.is_empty() {
            let min = self.running.iter().map(|s| s.left).fold(f64::MAX, f64::min);
            now + min * m.step(self.running.len())
        } else {
            f64::INFINITY
        }
    }

    /// Advances from `now` by `dt`, which reaches at most its next event; processes the event
    /// when reached.
    fn advance(&mut self, now: f64, dt: f64, m: &BatchModel, done: &mut Done) {
        // Event times are sums of floats: what is left after an event's own step is rounding
        // (far below a millionth of a second or of a token).
        const EPS: f64 = 1e-6;
        let prefilled = self.prefill.front_mut().map(|p| {
            p.left -= dt;
            p.left <= EPS
        });
        if prefilled == Some(true)
            && let Some(p) = self.prefill.pop_front()
        {
            done.first_tokens
                .push(now + dt - p.arrived_s + m.overhead_s);
            let steps = f64::from(p.output_tokens.saturating_sub(1));
            if steps > 0.0 {
                self.running.push(Seq { left: steps, ..p });
            } else {
                done.completed += 1;
            }
        } else if prefilled.is_none() && !self.running.is_empty() {
            let steps = dt / m.step(self.running.len());
            for s in &mut self.running {
                s.left -= steps;
            }
            let before = self.running.len();
            self.running.retain(|s| s.left > EPS);
            done.completed += (before - self.running.len()) as u32;
        }
    }
}

/// Accumulated since the last observation.
#[derive(Clone, Debug, Default)]
struct Window {
    start_s: f64,
    arrived: f64,
    completed: f64,
    ttft: Vec<(f64, f64)>,
    ready_times: Vec<f64>,
}

/// One scaling target in the discrete-event mode.
#[derive(Clone, Debug)]
pub struct BatchTier {
    model: BatchModel,
    now: f64,
    replicas: Vec<Replica>,
    queue: VecDeque<Request>,
    totals: TierTotals,
    window: Window,
    rng: StdRng,
}

impl BatchTier {
    /// A target with `replicas` already ready at time 0.
    pub fn new(model: BatchModel, replicas: u32) -> Self {
        BatchTier {
            now: 0.0,
            replicas: vec![
                Replica {
                    announced: true,
                    ..Replica::default()
                };
                replicas as usize
            ],
            rng: StdRng::seed_from_u64(match model.dispatch {
                Dispatch::Random { seed } => seed,
                Dispatch::LeastLoaded => 0,
            }),
            model,
            queue: VecDeque::new(),
            totals: TierTotals::default(),
            window: Window::default(),
        }
    }

    /// Requests in replicas' batches (prefilling or decoding).
    pub fn in_flight(&self) -> usize {
        self.replicas.iter().map(Replica::busy).sum()
    }

    fn is_ready(&self, r: &Replica) -> bool {
        !r.draining && r.ready_at <= self.now + 1e-9
    }

    fn enqueue(&mut self, r: Request) {
        self.totals.arrived += 1.0;
        self.window.arrived += 1.0;
        self.queue.push_back(r);
    }

    /// Drops requests that waited too long, then fills free slots from the head of the queue.
    fn admit(&mut self) {
        let limit = self.now - self.model.replica.max_wait_s;
        while self.queue.front().is_some_and(|r| r.t_s < limit) {
            self.queue.pop_front();
            self.totals.dropped += 1.0;
        }
        let slots = self.model.max_batch as usize;
        if let Dispatch::Random { .. } = self.model.dispatch {
            self.admit_random(limit, slots);
            return;
        }
        while !self.queue.is_empty() {
            let best = (0..self.replicas.len())
                .filter(|&i| self.is_ready(&self.replicas[i]) && self.replicas[i].busy() < slots)
                .min_by_key(|&i| self.replicas[i].busy());
            let Some(i) = best else { break };
            let Some(r) = self.queue.pop_front() else {
                break;
            };
            self.replicas[i].start(r, &self.model);
        }
    }

    /// [`Dispatch::Random`]: queued requests go to random ready replicas (they stay in the
    /// target's queue only while none is ready), then each replica fills its free slots from
    /// its own queue; a draining replica still serves what it was sent.
    fn admit_random(&mut self, limit: f64, slots: usize) {
        let ready: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| self.is_ready(&self.replicas[i]))
            .collect();
        if !ready.is_empty() {
            for r in self.queue.drain(..) {
                let i = ready[self.rng.random_range(0..ready.len())];
                self.replicas[i].waiting.push_back(r);
            }
        }
        for rep in &mut self.replicas {
            while rep.waiting.front().is_some_and(|r| r.t_s < limit) {
                rep.waiting.pop_front();
                self.totals.dropped += 1.0;
            }
            while rep.busy() < slots
                && let Some(r) = rep.waiting.pop_front()
            {
                rep.start(r, &self.model);
            }
        }
    }

    /// Runs every replica up to `until`, event by event, admitting as slots free up.
    fn run_until(&mut self, until: f64) {
        let mut done = Done::default();
        loop {
            self.admit();
            let next_ready = self
                .replicas
                .iter()
                .map(|r| r.ready_at)
                .filter(|&t| t > self.now + 1e-9)
                .fold(f64::INFINITY, f64::min);
            let next = self
                .replicas
                .iter()
                .map(|r| r.next_event(self.now, &self.model))
                .fold(next_ready, f64::min)
                .min(until);
            let dt = (next - self.now).max(0.0);
            for r in &mut self.replicas {
                if r.ready_at <= self.now + 1e-9 {
                    r.advance(self.now, dt, &self.model, &mut done);
                }
            }
            self.now = next;
            for r in &mut self.replicas {
                if !r.announced && r.ready_at <= next + 1e-9 {
                    r.announced = true;
                    self.window
                        .ready_times
                        .push(self.model.replica.cold_start_s);
                }
            }
            self.replicas.retain(|r| !(r.draining && r.load() == 0));
            if next >= until {
                break;
            }
        }
        let slo = self.model.replica.slo_ttft_s;
        for ttft in done.first_tokens {
            if ttft <= slo + 1e-9 {
                self.totals.served_ok += 1.0;
            } else {
                self.totals.served_late += 1.0;
            }
            self.totals.ttft.add(ttft, 1.0);
            self.window.ttft.push((ttft, 1.0));
        }
        self.window.completed += f64::from(done.completed);
    }
}

impl Target for BatchTier {
    type Arrivals = Vec<Request>;

    fn desired(&self) -> u32 {
        self.replicas.iter().filter(|r| !r.draining).count() as u32
    }

    fn ready(&self) -> u32 {
        self.replicas.iter().filter(|r| self.is_ready(r)).count() as u32
    }

    fn queue_len(&self) -> f64 {
        (self.queue.len() + self.replicas.iter().map(|r| r.waiting.len()).sum::<usize>()) as f64
    }

    fn busy(&self) -> bool {
        !self.queue.is_empty()
            || self
                .replicas
                .iter()
                .any(|r| !r.prefill.is_empty() || !r.waiting.is_empty())
    }

    fn count(arrivals: &Vec<Request>) -> f64 {
        arrivals.len() as f64
    }

    fn merge(into: &mut Vec<Request>, more: &Vec<Request>) {
        into.extend_from_slice(more);
        into.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    }

    fn set_desired(&mut self, now_s: f64, n: u32) {
        let cur = self.desired();
        if n == cur {
            return;
        }
        self.totals.scale_events += 1;
        if n > cur {
            for _ in cur..n {
                self.replicas.push(Replica {
                    ready_at: now_s + self.model.replica.cold_start_s,
                    ..Replica::default()
                });
                self.totals.cold_starts += 1;
            }
            return;
        }
        let mut remove = (cur - n) as usize;
        // Pending replicas first, newest first: they hold no work.
        while remove > 0 {
            let Some(i) = self
                .replicas
                .iter()
                .rposition(|r| !r.draining && r.ready_at > now_s + 1e-9)
            else {
                break;
            };
            self.replicas.remove(i);
            remove -= 1;
        }
        // Then the least busy ready replicas drain.
        let mut order: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| !self.replicas[i].draining)
            .collect();
        order.sort_by_key(|&i| self.replicas[i].load());
        for &i in order.iter().take(remove) {
            self.replicas[i].draining = true;
        }
        self.replicas.retain(|r| !(r.draining && r.load() == 0));
    }

    fn fail_over_to(&mut self, to: &mut Self) {
        let mut moved: Vec<Request> = self.queue.drain(..).collect();
        for rep in &mut self.replicas {
            moved.extend(rep.waiting.drain(..));
        }
        moved.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        let n = moved.len() as f64;
        self.totals.arrived -= n;
        self.window.arrived -= n;
        for r in moved {
            to.enqueue(r);
        }
        to.admit();
    }

    fn tick(&mut self, t0: f64, dt: f64, arrivals: &Vec<Request>) {
        // Pods cost from creation to deletion: draining ones included.
        self.totals.replica_seconds += self.replicas.len() as f64 * dt;
        for r in arrivals {
            self.run_until(r.t_s.max(self.now));
            self.enqueue(*r);
        }
        self.run_until(t0 + dt);
    }

    fn observe(&mut self, now_s: f64, online: bool) -> TargetObs {
        let w = std::mem::take(&mut self.window);
        self.window.start_s = now_s;
        let span = (now_s - w.start_s).max(1e-9);
        TargetObs {
            sample: TierSample {
                arrival_rps: w.arrived.max(0.0) / span,
                served_rps: w.completed / span,
                queue_depth: self.queue_len(),
                running: self.in_flight() as f64,
                ttft_p95_s: weighted_quantile(&w.ttft, 0.95),
                tpot_p95_s: None,
            },
            desired: self.desired(),
            ready: self.ready(),
            ready_times_s: w.ready_times,
            online,
        }
    }

    /// Requests without a first token by now are dropped (running ones were served).
    fn finish(&mut self) {
        let waiting: usize = self
            .replicas
            .iter()
            .map(|r| r.prefill.len() + r.waiting.len())
            .sum();
        self.totals.dropped += (self.queue.len() + waiting) as f64;
        self.queue.clear();
        for r in &mut self.replicas {
            r.prefill.clear();
            r.running.clear();
            r.waiting.clear();
        }
    }

    fn totals(&self) -> &TierTotals {
        &self.totals
    }
}

#[cfg(test)]
mod tests;
