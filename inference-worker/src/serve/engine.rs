//! The continuous-batching engine: one thread owns the model and, at every decode
//! step, admits queued requests into the running batch, advances every running
//! sequence by one token, and drops the ones that finished or whose client left.

use crate::error::{Error, Result};
use crate::model::decoder::{KvCache, Model};
use crate::serve::metrics::Metrics;
use crate::serve::prefix_cache::{PrefixCache, PrefixCacheConfig};
use crate::serve::sampling::{Sampler, SamplingParams, logprobs, max_prob};
use crate::serve::text::{Detokenizer, Push, TextCodec};
use std::collections::VecDeque;
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

/// What the engine sends back for a request, in order: deltas, then one `Done`, `Error`
/// or `LowConfidence`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// The request's confidence check failed (see [`ConfidenceCheck`]): the engine has
    /// dropped the sequence and the caller continues it elsewhere (edge escalation).
    LowConfidence(Box<Handoff>),
    /// Never sent by the engine: the escalation layer announces, before a continuation's
    /// deltas, that the rest of the response comes from the cloud or, the cloud being
    /// unreachable, from this worker again.
    Escalated(EscalationMark),
    /// Never sent by the engine: the cloud could not be reached and the policy is to fail.
    CloudUnavailable(String),
    /// A generated token's log probability, sent before the text it adds (requests with
    /// [`GenRequest::logprobs`]).
    Logprob(TokenLogprob),
    /// The prompt's tokens: the first (which has no log probability), then the others with
    /// theirs; sent first (requests with [`GenRequest::prompt_logprobs`]).
    PromptLogprobs {
        first: String,
        rest: Vec<TokenLogprob>,
    },
}

/// One token with its log probability and the most likely alternatives at its position.
/// Tokens are given by their own text (lossy where a token is part of a UTF-8 character).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// How an escalated response was served (reported to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscalationMark {
    /// `low_confidence` or `overloaded`.
    pub reason: &'static str,
    /// False when the cloud was unreachable and this worker served the rest itself.
    pub by_cloud: bool,
}

/// Where a sequence stood when its confidence check failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    /// All text generated so far, including text held back as a possible stop prefix
    /// (bytes of a still-incomplete UTF-8 character are not included).
    pub text: String,
    /// How many bytes of `text` were already sent as deltas.
    pub sent: usize,
    /// The generated token ids.
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The mean confidence over the window that fell below the threshold.
    pub confidence: f32,
}

/// Edge escalation's confidence check: after each generated token, once `window` tokens
/// exist, the mean over the last `window` generated tokens of the model's max-softmax
/// probability ([`max_prob`], temperature 1) is compared with `threshold`; below it, the
/// sequence is handed off ([`Event::LowConfidence`]) instead of continuing. A token that
/// ends the generation (EOS, stop sequence, max_tokens) is never handed off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceCheck {
    pub threshold: f32,
    pub window: usize,
}

struct ConfidenceWindow {
    check: ConfidenceCheck,
    probs: VecDeque<f32>,
}

impl ConfidenceWindow {
    /// Records one token's confidence; returns the window's mean when it is below the
    /// threshold.
    fn push(&mut self, p: f32) -> Option<f32> {
        let w = self.check.window.max(1);
        if self.probs.len() == w {
            self.probs.pop_front();
        }
        self.probs.push_back(p);
        if self.probs.len() < w {
            return None;
        }
        let mean = (self.probs.iter().map(|&x| f64::from(x)).sum::<f64>() / w as f64) as f32;
        (mean < self.check.threshold).then_some(mean)
    }
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
    /// Edge escalation's confidence check; None for plain serving.
    pub confidence: Option<ConfidenceCheck>,
    /// Report each generated token's log probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report the prompt tokens' log probabilities too (with `logprobs` alternatives).
    pub prompt_logprobs: bool,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting to join the batch; more get `QueueFull`.
    pub queue_size: usize,
    /// Reuse of shared prompt prefixes' attention cache; None turns it off.
    pub prefix_cache: Option<PrefixCacheConfig>,
    /// Chunked prefill: prompts are computed at most this many tokens per step, beside the
    /// running sequences' decode step, so that a long prompt does not stall them; chunks end
    /// at multiples of this many positions (so a prompt is cut the same way whatever else is
    /// running). 0 computes each prompt whole at admission.
    pub prefill_chunk_tokens: usize,
}

/// Prompt tokens computed per step at most (chunked prefill).
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 512;

/// Prefix blocks of 16 tokens (vLLM's default block size) under 256 MiB.
pub const DEFAULT_PREFIX_CACHE: PrefixCacheConfig = PrefixCacheConfig {
    block_tokens: 16,
    budget_bytes: 256 << 20,
};

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            queue_size: 64,
            prefix_cache: Some(DEFAULT_PREFIX_CACHE),
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
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

/// A request whose prompt is being computed, one chunk per step.
struct Prefilling {
    req: GenRequest,
    events: mpsc::UnboundedSender<Event>,
    /// Holds the prompt's first `cache.len()` tokens.
    cache: KvCache,
    /// Steps since its admission that did not compute a chunk of it.
    waited: usize,
}

/// A prompt being computed, as the chunk scheduler sees it.
#[derive(Debug, Clone, Copy)]
struct Want {
    /// Tokens of its next chunk.
    chunk: usize,
    /// Tokens of its prompt not yet computed.
    remaining: usize,
    /// Steps it has waited since its admission.
    waited: usize,
}

/// The chunk length each prompt (oldest first) computes this step, if any: least remaining
/// work first, while chunks fit the `budget` of tokens (the first always runs, and smaller
/// ones fill what a larger one left), so a short prompt is not queued behind the whole
/// prefill of a long one that arrived just before it. Each step a prompt has waited counts
/// as a budget of its tokens done, so newcomers delay a prompt by at most as many steps as
/// its own prefill takes: no starvation. Ties go to the oldest.
fn pick_chunks(wants: &[Want], budget: usize) -> Vec<Option<usize>> {
    let key = |w: &Want| w.remaining as i128 - budget as i128 * w.waited as i128;
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by_key(|&i| (key(&wants[i]), i));
    let mut lens = vec![None; wants.len()];
    let mut left = budget;
    for (n, i) in order.into_iter().enumerate() {
        let len = wants[i].chunk;
        if n == 0 || len <= left {
            left = left.saturating_sub(len);
            lens[i] = Some(len);
        }
    }
    lens
}

/// Where the chunk of a prompt of `n` tokens that starts at `pos` ends: the next multiple of
/// `chunk` (0: no chunking), or the prompt's end.
fn chunk_end(pos: usize, n: usize, chunk: usize) -> usize {
    match pos.checked_div(chunk) {
        Some(k) => n.min((k + 1) * chunk),
        None => n,
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
    /// Bytes of the detokenizer's text sent as deltas.
    sent: usize,
    /// Set when the request has a confidence check (then `ids` records the tokens).
    confidence: Option<ConfidenceWindow>,
    ids: Vec<u32>,
    logprobs: Option<usize>,
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
        prefilling: VecDeque::new(),
        chunk_tokens: cfg.prefill_chunk_tokens,
        prefix: cfg
            .prefix_cache
            .filter(|c| c.budget_bytes > 0)
            .map(PrefixCache::new),
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
    /// Admitted requests whose prompts are still being computed, oldest first.
    prefilling: VecDeque<Prefilling>,
    chunk_tokens: usize,
    prefix: Option<PrefixCache>,
}

impl Engine {
    fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.prefilling.is_empty() {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(q) => self.admit(q),
                    None => break,
                }
            }
            while open && self.running.len() + self.prefilling.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(q) => self.admit(q),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            self.step();
            self.report_kv_usage(0);
        }
        tracing::info!("engine stopped");
    }

    /// KV positions held (plus `admitting`, a sequence not yet in the batch) over what
    /// `max_batch` full-context sequences would hold.
    fn report_kv_usage(&self, admitting: usize) {
        let used: usize = admitting
            + self.running.iter().map(|s| s.cache.len()).sum::<usize>()
            + self.prefilling.iter().map(|p| p.cache.len()).sum::<usize>();
        let capacity = self.max_batch * self.model.config().max_position_embeddings;
        self.metrics
            .kv_cache_usage
            .set(used as f64 / capacity.max(1) as f64);
    }

    /// Takes a request into the batch: its prompt is computed in chunks by the next steps
    /// (whole, now, when it scores its prompt: that needs every position's logits).
    fn admit(&mut self, q: Queued) {
        self.metrics.queue_depth.dec();
        let Queued { req, events } = q;
        if events.is_closed() {
            return;
        }
        self.metrics.running.inc();
        let mut cache = self.reuse_prefix(&req);
        if !req.prompt_logprobs {
            self.prefilling.push_back(Prefilling {
                req,
                events,
                cache,
                waited: 0,
            });
            return;
        }
        // Every position's logits: each scores the prompt token after it.
        let forward = self
            .model
            .forward_all(&req.prompt_ids, &mut cache)
            .map(|mut rows| {
                let top = req.logprobs.unwrap_or(0);
                let rest = rows
                    .iter()
                    .zip(&req.prompt_ids[1..])
                    .map(|(row, &id)| self.token_logprob(row, id, top))
                    .collect();
                let first = self.token_text(req.prompt_ids[0]);
                let _ = events.send(Event::PromptLogprobs { first, rest });
                rows.pop().expect("a row per prompt token")
            });
        match forward {
            Ok(logits) => self.start(req, events, cache, &logits),
            Err(e) => {
                self.metrics.running.dec();
                let _ = events.send(Event::Error(e.to_string()));
            }
        }
    }

    /// A prompt is computed: samples its first token and starts decoding it.
    fn start(
        &mut self,
        req: GenRequest,
        events: mpsc::UnboundedSender<Event>,
        cache: KvCache,
        logits: &[f32],
    ) {
        self.keep_prefix(&req.prompt_ids, &cache);
        self.metrics
            .prompt_tokens
            .inc_by(req.prompt_ids.len() as u64);
        self.metrics
            .ttft
            .observe(req.arrived.elapsed().as_secs_f64());
        let mut sampler = Sampler::new(req.sampling.clone());
        let token = sampler.sample(logits);
        let confidence = req.confidence.map(|check| ConfidenceWindow {
            check,
            probs: VecDeque::with_capacity(check.window.max(1)),
        });
        let p = if confidence.is_some() {
            max_prob(logits)
        } else {
            1.0
        };
        // The gauges move before any event is sent, so a client that has its answer
        // never sees itself still counted as running, nor its cache missing.
        self.report_kv_usage(cache.len());
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
            sent: 0,
            confidence,
            ids: vec![],
            logprobs: req.logprobs,
        };
        self.report_logprob(&seq, logits, token);
        if !self.accept(&mut seq, token, p) {
            self.running.push(seq);
        }
    }

    /// A cache holding the longest reusable prefix of the request's prompt (its length is
    /// how many prompt tokens are reused). Requests that score their prompt need every position's logits, so they
    /// compute it all (and still leave their blocks for others).
    fn reuse_prefix(&mut self, req: &GenRequest) -> KvCache {
        let fresh = self.model.new_cache();
        let Some(prefix) = self.prefix.as_mut().filter(|_| !req.prompt_logprobs) else {
            return fresh;
        };
        self.metrics
            .prefix_cache_queried_tokens
            .inc_by(req.prompt_ids.len() as u64);
        // The first chunk after the prefix must not be a single row where a prefill from
        // the start has more (see `layers::attend`): with chunks ending at multiples of C, a
        // prefix of C·k − 1 tokens is not reused (only possible with 1-token blocks).
        let chunk = self.chunk_tokens;
        let aligned = move |r: usize| chunk < 2 || r % chunk != chunk - 1;
        match prefix.lookup_where(&req.prompt_ids, fresh, aligned) {
            Ok((cache, reused)) => {
                self.metrics.prefix_cache_hit_tokens.inc_by(reused as u64);
                cache
            }
            Err(e) => {
                // A cache that cannot be assembled is a miss, not a failed request.
                tracing::warn!(error = %e, "prefix cache lookup failed; computing the prompt");
                self.model.new_cache()
            }
        }
    }

    /// Offers a prefilled prompt's whole blocks to the prefix cache.
    fn keep_prefix(&mut self, prompt: &[u32], cache: &KvCache) {
        let Some(prefix) = self.prefix.as_mut() else {
            return;
        };
        match prefix.insert(prompt, cache) {
            Ok(done) => {
                self.metrics
                    .prefix_cache_evicted_blocks
                    .inc_by(done.evicted as u64);
            }
            Err(e) => tracing::warn!(error = %e, "prefix cache insert failed"),
        }
        self.metrics.prefix_cache_bytes.set(prefix.bytes() as i64);
        self.metrics.prefix_cache_blocks.set(prefix.len() as i64);
    }

    /// One step: a decode step for every running sequence and the next chunk of the
    /// oldest prompts being computed (up to the chunk budget; always at least one), all in
    /// one batched forward pass (see [`Model::forward_batch`]). Prompts that are done get
    /// their first token and start decoding.
    fn step(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        let mut prefilling = std::mem::take(&mut self.prefilling);
        let cancelled = |events: &mpsc::UnboundedSender<Event>| {
            if events.is_closed() {
                self.metrics.running.dec();
                self.metrics.cancelled.inc();
                return false;
            }
            true
        };
        running.retain(|seq| cancelled(&seq.events));
        prefilling.retain(|p| cancelled(&p.events));
        // Which prompts get their next chunk this step (see `pick_chunks`).
        let budget = if self.chunk_tokens == 0 {
            usize::MAX
        } else {
            self.chunk_tokens
        };
        let wants: Vec<Want> = prefilling
            .iter()
            .map(|p| {
                let (pos, n) = (p.cache.len(), p.req.prompt_ids.len());
                Want {
                    chunk: chunk_end(pos, n, self.chunk_tokens) - pos,
                    remaining: n - pos,
                    waited: p.waited,
                }
            })
            .collect();
        let lens = pick_chunks(&wants, budget);
        if running.is_empty() && lens.iter().all(Option::is_none) {
            return;
        }
        let result = {
            let mut batch: Vec<(&[u32], &mut KvCache)> = running
                .iter_mut()
                .map(|seq| (std::slice::from_ref(&seq.last), &mut seq.cache))
                .collect();
            for (p, len) in prefilling.iter_mut().zip(&lens) {
                if let Some(len) = *len {
                    let pos = p.cache.len();
                    batch.push((&p.req.prompt_ids[pos..pos + len], &mut p.cache));
                }
            }
            self.model.forward_batch(&mut batch)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for events in running.iter().map(|s| &s.events).chain(
                    prefilling
                        .iter()
                        .zip(&lens)
                        .filter(|(_, len)| len.is_some())
                        .map(|(p, _)| &p.events),
                ) {
                    self.metrics.running.dec();
                    let _ = events.send(Event::Error(e.to_string()));
                }
                self.prefilling = prefilling
                    .into_iter()
                    .zip(&lens)
                    .filter(|(_, len)| len.is_none())
                    .map(|(p, _)| p)
                    .collect();
                return;
            }
        };
        let now = Instant::now();
        let mut logits = logits.into_iter();
        running.retain_mut(|seq| {
            let logits = logits.next().expect("one row of logits per sequence");
            let token = seq.sampler.sample(&logits);
            let p = if seq.confidence.is_some() {
                max_prob(&logits)
            } else {
                1.0
            };
            self.metrics
                .tpot
                .observe((now - seq.last_token_at).as_secs_f64());
            seq.last_token_at = now;
            seq.last = token;
            self.report_logprob(seq, &logits, token);
            !self.accept(seq, token, p)
        });
        self.running = running;
        let mut done = Vec::new();
        for (mut p, len) in prefilling.into_iter().zip(lens) {
            if len.is_some() {
                let row = logits.next().expect("one row of logits per prompt chunk");
                if p.cache.len() == p.req.prompt_ids.len() {
                    done.push((p, row));
                    continue;
                }
            } else {
                p.waited += 1;
            }
            self.prefilling.push_back(p);
        }
        for (p, row) in done {
            self.start(p.req, p.events, p.cache, &row);
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.codec.decode(&[id]).unwrap_or_default()
    }

    fn token_logprob(&self, logits: &[f32], id: u32, top: usize) -> TokenLogprob {
        let (logprob, top) = logprobs(logits, id, top);
        TokenLogprob {
            token: self.token_text(id),
            logprob,
            top: top
                .into_iter()
                .map(|(t, lp)| (self.token_text(t), lp))
                .collect(),
        }
    }

    /// Sends the sampled token's log probability when the request asked for them.
    fn report_logprob(&self, seq: &Sequence, logits: &[f32], token: u32) {
        if let Some(top) = seq.logprobs {
            let _ = seq
                .events
                .send(Event::Logprob(self.token_logprob(logits, token, top)));
        }
    }

    /// Records a sampled token whose distribution's max probability was `p`; returns
    /// true when the sequence is finished (or handed off for low confidence).
    fn accept(&self, seq: &mut Sequence, token: u32, p: f32) -> bool {
        seq.generated += 1;
        let low_confidence = match seq.confidence.as_mut() {
            Some(w) => {
                seq.ids.push(token);
                w.push(p)
            }
            None => None,
        };
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
                    // One event per token, even when its text is held back (part of a
                    // character, or maybe of a stop sequence): streaming clients see every
                    // token arrive, so their time to first token and per-token gaps are the
                    // engine's, as vLLM's streams give them.
                    seq.sent += delta.len();
                    let _ = seq.events.send(Event::Delta(delta));
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
            None => match low_confidence {
                Some(confidence) => {
                    self.metrics.running.dec();
                    let _ = seq.events.send(Event::LowConfidence(Box::new(Handoff {
                        text: seq.detok.text().to_string(),
                        sent: seq.sent,
                        ids: std::mem::take(&mut seq.ids),
                        prompt_tokens: seq.prompt_tokens,
                        completion_tokens: seq.generated,
                        confidence,
                    })));
                    true
                }
                None => false,
            },
        }
    }
}

fn send_delta(seq: &mut Sequence, delta: String) {
    if !delta.is_empty() {
        seq.sent += delta.len();
        let _ = seq.events.send(Event::Delta(delta));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(chunk: usize, remaining: usize, waited: usize) -> Want {
        Want {
            chunk,
            remaining,
            waited,
        }
    }

    #[test]
    fn short_prompts_go_before_a_long_one_that_arrived_first() {
        // A 256-token prompt (chunks of 128) admitted just before two 16-token ones.
        let wants = [want(128, 256, 0), want(16, 16, 0), want(16, 16, 0)];
        assert_eq!(pick_chunks(&wants, 128), vec![None, Some(16), Some(16)]);
    }

    #[test]
    fn smaller_chunks_fill_what_a_larger_one_left() {
        let wants = [want(100, 100, 0), want(64, 64, 0), want(20, 20, 0)];
        // 20 first, then 64 (84 used), 100 does not fit.
        assert_eq!(pick_chunks(&wants, 128), vec![None, Some(64), Some(20)]);
        // The first in order always runs, even alone over the budget.
        assert_eq!(pick_chunks(&[want(128, 300, 0)], 64), vec![Some(128)]);
    }

    #[test]
    fn a_waiting_long_prompt_outranks_newcomers_within_its_own_prefill_time() {
        // 256 tokens left, budget 128: after two waited steps its key is 0 and it goes
        // first whatever arrives; after one it still yields to a 16-token newcomer.
        let one = [want(128, 256, 1), want(16, 16, 0)];
        assert_eq!(pick_chunks(&one, 128), vec![None, Some(16)]);
        let two = [want(128, 256, 2), want(16, 16, 0)];
        assert_eq!(pick_chunks(&two, 128), vec![Some(128), None]);
        // Its wait is not forgotten after a chunk: the rest of it goes next.
        let rest = [want(128, 128, 2), want(16, 16, 0)];
        assert_eq!(pick_chunks(&rest, 128), vec![Some(128), None]);
    }

    #[test]
    fn ties_go_to_the_oldest_and_no_chunking_runs_everything() {
        let wants = [want(128, 128, 0), want(128, 128, 0)];
        assert_eq!(pick_chunks(&wants, 128), vec![Some(128), None]);
        let whole = [want(900, 900, 0), want(16, 16, 0)];
        assert_eq!(pick_chunks(&whole, usize::MAX), vec![Some(900), Some(16)]);
    }
}
