//! The continuous-batching engine: one thread owns the model and, at every decode
//! step, admits queued requests into the running batch, advances every running
//! sequence by one token, and drops the ones that finished or whose client left.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::{KvCache, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::text::{Detokenizer, Push, TextCodec};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine sends back for a request, in order: deltas, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// A validated generation request.
#[derive(Debug)]
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub arrived: Instant,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting to join the batch; more get `QueueFull`.
    pub queue_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            queue_size: 64,
        }
    }
}

struct Queued {
    req: GenRequest,
    events: mpsc::UnboundedSender<Event>,
}

/// Cheap to clone; dropping every handle stops the engine once its batch drains.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Queued>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues `req`; the returned receiver yields its events. Dropping the receiver
    /// cancels the generation at the next step.
    pub fn submit(&self, req: GenRequest) -> Result<mpsc::UnboundedReceiver<Event>> {
        let (events, rx) = mpsc::unbounded_channel();
        // Count before sending so the engine's decrement can never run first.
        self.metrics.queue_depth.inc();
        match self.tx.try_send(Queued { req, events }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.metrics.queue_depth.dec();
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => Error::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => Error::EngineStopped,
                })
            }
        }
    }
}

struct Sequence {
    cache: KvCache,
    last: u32,
    prompt_tokens: usize,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    sampler: Sampler,
    detok: Detokenizer,
    events: mpsc::UnboundedSender<Event>,
    last_token_at: Instant,
}

/// Starts the engine thread.
pub fn spawn(
    model: Arc<Model>,
    codec: Arc<TextCodec>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
) -> EngineHandle {
    let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
    let engine = Engine {
        model,
        codec,
        max_batch: cfg.max_batch.max(1),
        metrics: metrics.clone(),
        running: vec![],
    };
    std::thread::Builder::new()
        .name("tidal-engine".into())
        .spawn(move || engine.run(rx))
        .expect("spawning the engine thread");
    EngineHandle { tx, metrics }
}

struct Engine {
    model: Arc<Model>,
    codec: Arc<TextCodec>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    running: Vec<Sequence>,
}

impl Engine {
    fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut open = true;
        loop {
            if self.running.is_empty() {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(q) => self.admit(q),
                    None => break,
                }
            }
            while open && self.running.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(q) => self.admit(q),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            self.step();
        }
        tracing::info!("engine stopped");
    }

    /// Prefills a new request and samples its first token.
    fn admit(&mut self, q: Queued) {
        self.metrics.queue_depth.dec();
        let Queued { req, events } = q;
        if events.is_closed() {
            return;
        }
        let mut cache = self.model.new_cache();
        let mut sampler = Sampler::new(req.sampling.clone());
        let logits = match self.model.forward(&req.prompt_ids, &mut cache) {
            Ok(l) => l,
            Err(e) => {
                let _ = events.send(Event::Error(e.to_string()));
                return;
            }
        };
        self.metrics
            .prompt_tokens
            .inc_by(req.prompt_ids.len() as u64);
        self.metrics
            .ttft
            .observe(req.arrived.elapsed().as_secs_f64());
        let token = sampler.sample(&logits);
        // The gauge moves before any event is sent, so a client that has its answer
        // never sees itself still counted as running.
        self.metrics.running.inc();
        let mut seq = Sequence {
            cache,
            last: token,
            prompt_tokens: req.prompt_ids.len(),
            generated: 0,
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            sampler,
            detok: Detokenizer::new(req.stop),
            events,
            last_token_at: Instant::now(),
        };
        if !self.accept(&mut seq, token) {
            self.running.push(seq);
        }
    }

    /// One decode step for every running sequence, computed as one batched forward
    /// pass (see [`Model::forward_batch`]).
    fn step(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        running.retain(|seq| {
            if seq.events.is_closed() {
                self.metrics.running.dec();
                self.metrics.cancelled.inc();
                return false;
            }
            true
        });
        if running.is_empty() {
            return;
        }
        let result = {
            let mut batch: Vec<(&[u32], &mut KvCache)> = running
                .iter_mut()
                .map(|seq| (std::slice::from_ref(&seq.last), &mut seq.cache))
                .collect();
            self.model.forward_batch(&mut batch)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for seq in &running {
                    self.metrics.running.dec();
                    let _ = seq.events.send(Event::Error(e.to_string()));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut logits = logits.into_iter();
        running.retain_mut(|seq| {
            let logits = logits.next().expect("one row of logits per sequence");
            let token = seq.sampler.sample(&logits);
            self.metrics
                .tpot
                .observe((now - seq.last_token_at).as_secs_f64());
            seq.last_token_at = now;
            seq.last = token;
            !self.accept(seq, token)
        });
        self.running = running;
    }

    /// Records a sampled token; returns true when the sequence is finished.
    fn accept(&self, seq: &mut Sequence, token: u32) -> bool {
        seq.generated += 1;
        self.metrics.generated_tokens.inc();
        let finish = if !seq.ignore_eos && self.codec.eos_ids.contains(&token) {
            let rest = seq.detok.flush();
            send_delta(seq, rest);
            Some(FinishReason::Stop)
        } else {
            match seq.detok.push(&self.codec, token) {
                Err(e) => {
                    self.metrics.running.dec();
                    let _ = seq.events.send(Event::Error(e.to_string()));
                    return true;
                }
                Ok(Push::Stopped(delta)) => {
                    send_delta(seq, delta);
                    Some(FinishReason::Stop)
                }
                Ok(Push::Delta(delta)) => {
                    send_delta(seq, delta);
                    let context = self.model.config().max_position_embeddings;
                    if seq.generated >= seq.max_tokens || seq.cache.len() + 1 > context {
                        let rest = seq.detok.flush();
                        send_delta(seq, rest);
                        Some(FinishReason::Length)
                    } else {
                        None
                    }
                }
            }
        };
        match finish {
            Some(finish) => {
                self.metrics.running.dec();
                let _ = seq.events.send(Event::Done {
                    finish,
                    prompt_tokens: seq.prompt_tokens,
                    completion_tokens: seq.generated,
                });
                true
            }
            None => false,
        }
    }
}

fn send_delta(seq: &Sequence, delta: String) {
    if !delta.is_empty() {
        let _ = seq.events.send(Event::Delta(delta));
    }
}
