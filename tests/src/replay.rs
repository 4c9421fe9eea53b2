//! A trace slice replayed against real worker pods, as its clients would send it: arrivals and
//! sizes from the trace, streaming completions whose first token is timed, the Deployment's
//! replicas and its pods' cold starts sampled meanwhile; and one replica's speed measured
//! first, for the simulator's replica model (`tidal_sim::replay_gap`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use rand::{Rng, SeedableRng};
use tidal_sim::replay_gap::{ReplicaSample, Served};

/// The first 20 minutes of the Azure LLM coding trace (2023, CC-BY-4.0; see
/// `tests/fixtures/README.md`): `offset_ms,context_tokens,generated_tokens`.
pub const AZURE_CODE_20_MIN: &str = include_str!("../fixtures/azure_code_2023_first_20_min.csv");

/// One request to send: when (seconds from the replay's start) and how big.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Planned {
    pub t_s: f64,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
}

/// How a trace becomes requests a few CPU-limited pods can serve.
#[derive(Clone, Copy, Debug)]
pub struct Shrink {
    /// Trace seconds per replayed second.
    pub speed: f64,
    /// Share of the trace's requests kept (seeded).
    pub keep: f64,
    pub seed: u64,
    /// Prompt bytes (one token each for the fixture tokenizer) per trace context token, and
    /// the bounds.
    pub prompt_scale: f64,
    pub prompt_bytes: (usize, usize),
    pub max_output: u32,
}

/// The trace rows in `csv` played as `shrink` says.
pub fn plan(csv: &str, shrink: &Shrink) -> Vec<Planned> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(shrink.seed);
    csv.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split(',').map(|x| x.trim().parse::<f64>());
            let (Some(Ok(ms)), Some(Ok(ctx)), Some(Ok(gen_tokens))) =
                (f.next(), f.next(), f.next())
            else {
                return None;
            };
            Some((ms, ctx, gen_tokens))
        })
        .filter(|_| rng.random::<f64>() < shrink.keep)
        .map(|(ms, ctx, gen_tokens)| Planned {
            t_s: ms / 1000.0 / shrink.speed,
            prompt_bytes: ((ctx * shrink.prompt_scale) as usize)
                .clamp(shrink.prompt_bytes.0, shrink.prompt_bytes.1),
            max_tokens: (gen_tokens as u32).clamp(1, shrink.max_output),
        })
        .collect()
}

/// The highest request rate over any `window_s` of `plan`.
pub fn peak_rps(plan: &[Planned], window_s: f64) -> f64 {
    let mut best = 0;
    let mut from = 0;
    for (i, p) in plan.iter().enumerate() {
        while plan[from].t_s < p.t_s - window_s {
            from += 1;
        }
        best = best.max(i + 1 - from);
    }
    best as f64 / window_s
}

impl Planned {
    /// The request as the simulator takes it before it was sent (its planned sizes, no TTFT).
    pub fn unsent(&self) -> Served {
        Served {
            t_s: self.t_s,
            input_tokens: self.prompt_bytes as u32,
            output_tokens: self.max_tokens,
            ttft_s: None,
            decode_s: 0.0,
        }
    }
}

/// A prompt of `bytes` bytes.
fn prompt(bytes: usize) -> String {
    // Each prompt starts with a number of its own: the worker reuses the cache of any prefix it
    // has seen, so repeated text would measure (and replay) reuse that the trace does not have.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{n} ")
        .chars()
        .chain("the tide comes in and goes out again ".chars().cycle())
        .take(bytes)
        .collect()
}

/// What one streamed completion saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Streamed {
    pub ttft_s: f64,
    /// From the first to the last text chunk.
    pub decode_s: f64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Times the worker refused it with 429 before it was served (TTFT counts from the first
    /// try).
    pub retries: u32,
}

/// One try of a request: done (served or failed for good), or refused by a full queue.
#[derive(Debug)]
pub enum Attempt {
    Done(Result<Streamed, String>),
    Refused {
        retry_after: Duration,
        message: String,
    },
}

impl Attempt {
    /// The outcome with a refusal as a failure (for measurements, which do not retry).
    pub fn result(self) -> Result<Streamed, String> {
        match self {
            Attempt::Done(r) => r,
            Attempt::Refused { message, .. } => Err(message),
        }
    }
}

/// One streaming completion of `max_tokens` tokens exactly (`ignore_eos`); TTFT at the first
/// chunk that carries text, token counts from the usage chunk. A 429 (the worker's queue is
/// full) comes back as [`Attempt::Refused`] with the worker's `Retry-After` (1 s where it
/// gives none).
pub async fn try_completion(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    prompt_bytes: usize,
    max_tokens: u32,
    timeout: Duration,
) -> Attempt {
    let start = Instant::now();
    let sent = client
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({
            "model": model, "prompt": prompt(prompt_bytes), "max_tokens": max_tokens,
            "ignore_eos": true, "temperature": 0.0, "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .timeout(timeout)
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            let e = format!("send: {}", crate::processes::error_chain(&e));
            return Attempt::Done(Err(e));
        }
    };
    let status = resp.status();
    if status.is_success() {
        return Attempt::Done(read_stream(resp, start).await);
    }
    // Only a full queue is worth another try; its wait is read before the body consumes resp.
    let retry_after = (status == reqwest::StatusCode::TOO_MANY_REQUESTS).then(|| {
        resp.headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs)
    });
    let message = format!("{status}: {}", resp.text().await.unwrap_or_default());
    match retry_after {
        Some(retry_after) => Attempt::Refused {
            retry_after,
            message,
        },
        None => Attempt::Done(Err(message)),
    }
}

/// A successful response's event stream, timed from `start` (when the request was sent).
async fn read_stream(mut resp: reqwest::Response, start: Instant) -> Result<Streamed, String> {
    let (mut first, mut last, mut usage) = (None, None, None);
    let mut buf = String::new();
    while let Some(bytes) = resp.chunk().await.map_err(|e| format!("stream: {e}"))? {
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(data).map_err(|e| format!("chunk {data}: {e}"))?;
            let text = v["choices"][0]["text"].as_str().unwrap_or_default();
            if !text.is_empty() || v["choices"][0]["finish_reason"].is_string() {
                let now = start.elapsed().as_secs_f64();
                first.get_or_insert(now);
                last = Some(now);
            }
            if v["usage"].is_object() {
                usage = Some((
                    v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
                    v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32,
                ));
            }
        }
    }
    let (Some(first), Some(last), Some((prompt_tokens, completion_tokens))) = (first, last, usage)
    else {
        return Err("the stream ended without text or usage".into());
    };
    Ok(Streamed {
        ttft_s: first,
        decode_s: last - first,
        prompt_tokens,
        completion_tokens,
        retries: 0,
    })
}

/// Tries a request as a client that honours the worker's backpressure would (OpenAI's SDKs
/// retry a 429 after its `Retry-After`): each refusal is tried again after the wait the
/// worker asked for, until `timeout` from the first try. The TTFT counts from the first try,
/// so the time spent refused is latency the replay reports, as the simulator's queue (which
/// never refuses) counts it as waiting.
pub async fn with_retries<F, Fut>(timeout: Duration, mut attempt: F) -> Result<Streamed, String>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Attempt>,
{
    let start = Instant::now();
    let mut retries = 0;
    loop {
        let tried = start.elapsed();
        match attempt(timeout.saturating_sub(tried)).await {
            Attempt::Done(Ok(mut s)) => {
                s.ttft_s += tried.as_secs_f64();
                s.retries = retries;
                return Ok(s);
            }
            Attempt::Done(Err(e)) => return Err(e),
            Attempt::Refused {
                retry_after,
                message,
            } => {
                if start.elapsed() + retry_after >= timeout {
                    return Err(format!("{message} (refused {} times)", retries + 1));
                }
                tokio::time::sleep(retry_after).await;
                retries += 1;
            }
        }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds per decode step of one replica at each batch size: `b` streams of `tokens` tokens
/// started together (after a warm-up round), median over the streams.
pub async fn measure_steps(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    batches: &[u32],
    tokens: u32,
) -> Result<Vec<(u32, f64)>, String> {
    let mut out = Vec::new();
    for &b in batches {
        let mut steps = Vec::new();
        for round in 0..2 {
            let runs = futures::future::join_all((0..b).map(|_| {
                try_completion(client, base, model, 16, tokens, Duration::from_secs(120))
            }))
            .await;
            if round == 1 {
                for r in runs {
                    let r = r.result()?;
                    if r.completion_tokens > 1 {
                        steps.push(r.decode_s / f64::from(r.completion_tokens - 1));
                    }
                }
            }
        }
        out.push((b, median(steps)));
    }
    Ok(out)
}

/// Prefill seconds per prompt token and the fixed overhead, from the TTFT of a short and a
/// long prompt alone on the replica (median of 3 each).
pub async fn measure_prefill(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    short: usize,
    long: usize,
) -> Result<(f64, f64), String> {
    let mut points = Vec::new();
    for bytes in [short, long] {
        let mut ttft = Vec::new();
        let mut tokens = 0;
        for _ in 0..3 {
            let r = try_completion(client, base, model, bytes, 1, Duration::from_secs(60))
                .await
                .result()?;
            ttft.push(r.ttft_s);
            tokens = r.prompt_tokens;
        }
        points.push((f64::from(tokens), median(ttft)));
    }
    let ((n0, t0), (n1, t1)) = (points[0], points[1]);
    let per_token = ((t1 - t0) / (n1 - n0).max(1.0)).max(0.0);
    Ok((per_token, (t0 - per_token * n0).max(0.0)))
}

/// Sends every planned request at its time (from now), retrying refusals ([`with_retries`]),
/// and returns what each saw, in plan order.
pub async fn replay(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    plan: &[Planned],
    timeout: Duration,
) -> Vec<(Planned, Result<Streamed, String>)> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(plan.len());
    for p in plan.iter().copied() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(p.t_s)).await;
        let (client, base, model) = (client.clone(), base.to_string(), model.to_string());
        tasks.push(tokio::spawn(async move {
            let r = with_retries(timeout, |left| {
                try_completion(&client, &base, &model, p.prompt_bytes, p.max_tokens, left)
            })
            .await;
            (p, r)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("replay task"));
    }
    out
}

/// What the simulator takes of a replayed request (sizes as the worker counted them; a failed
/// request keeps its planned sizes).
pub fn served(outcome: &(Planned, Result<Streamed, String>)) -> Served {
    let (p, r) = outcome;
    match r {
        Ok(s) => Served {
            t_s: p.t_s,
            input_tokens: s.prompt_tokens,
            output_tokens: s.completion_tokens,
            ttft_s: Some(s.ttft_s),
            decode_s: s.decode_s,
        },
        Err(_) => p.unsent(),
    }
}

/// What the sampler saw: the Deployment's replicas every second, and each pod's cold start
/// (creation to Ready).
#[derive(Debug, Default)]
pub struct Sampled {
    pub replicas: Vec<ReplicaSample>,
    pub cold_starts_s: BTreeMap<String, f64>,
}

/// Samples Deployment `name` and the pods `selector` picks every second until `stop`.
pub fn sample_replicas(
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    name: String,
    selector: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Sampled> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut out = Sampled::default();
        while !stop.load(Ordering::Relaxed) {
            let t_s = start.elapsed().as_secs_f64();
            if let Ok(d) = deployments.get(&name).await {
                out.replicas.push(ReplicaSample {
                    t_s,
                    desired: d.spec.and_then(|s| s.replicas).unwrap_or(0) as u32,
                    ready: d.status.and_then(|s| s.ready_replicas).unwrap_or(0) as u32,
                });
            }
            if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
                for p in list.items {
                    let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
                        .and_then(|c| c.last_transition_time.as_ref())
                        .map(|t| t.0);
                    if let (Some(c), Some(r), Some(n)) = (created, ready, p.metadata.name) {
                        let s = r.duration_since(c).as_secs_f64();
                        out.cold_starts_s.entry(n).or_insert(s);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served_after(ttft_s: f64) -> Attempt {
        Attempt::Done(Ok(Streamed {
            ttft_s,
            decode_s: 0.1,
            prompt_tokens: 4,
            completion_tokens: 2,
            retries: 0,
        }))
    }

    fn refused() -> Attempt {
        Attempt::Refused {
            retry_after: Duration::from_millis(20),
            message: "429 Too Many Requests".into(),
        }
    }

    /// Two refusals, then served: one answer that says it was retried twice, with the time
    /// spent refused (at least the two waits asked for) in its TTFT; each try is given what
    /// is left of the timeout.
    #[tokio::test]
    async fn refusals_are_retried_after_the_wait_asked_for_and_count_in_the_ttft() {
        let mut lefts = Vec::new();
        let r = with_retries(Duration::from_secs(30), |left| {
            lefts.push(left);
            let n = lefts.len();
            async move { if n <= 2 { refused() } else { served_after(0.5) } }
        })
        .await
        .unwrap();
        assert_eq!(r.retries, 2);
        assert!(r.ttft_s >= 0.54, "{r:?}");
        assert_eq!(lefts.len(), 3);
        assert!(lefts.windows(2).all(|w| w[1] < w[0]), "{lefts:?}");
    }

    /// A worker that keeps refusing fails the request once the timeout is spent, saying how
    /// often; a failure other than a refusal is not retried.
    #[tokio::test]
    async fn refusals_stop_at_the_timeout_and_other_failures_are_not_retried() {
        let mut tries = 0;
        let e = with_retries(Duration::from_millis(100), |_| {
            tries += 1;
            async { refused() }
        })
        .await
        .unwrap_err();
        assert!(e.starts_with("429") && e.contains("refused"), "{e}");
        assert!((2..=5).contains(&tries), "{tries}");
        let mut tries = 0;
        let e = with_retries(Duration::from_secs(30), |_| {
            tries += 1;
            async { Attempt::Done(Err("500 Internal Server Error".into())) }
        })
        .await
        .unwrap_err();
        assert_eq!((e.as_str(), tries), ("500 Internal Server Error", 1));
    }

    #[test]
    fn the_fixture_slice_is_thinned_compressed_and_bounded() {
        let all = plan(
            AZURE_CODE_20_MIN,
            &Shrink {
                speed: 1.0,
                keep: 1.0,
                seed: 1,
                prompt_scale: 1.0,
                prompt_bytes: (1, 1 << 20),
                max_output: 1 << 20,
            },
        );
        assert_eq!(all.len(), 3628);
        assert!(all.last().unwrap().t_s < 1200.0);
        let shrink = Shrink {
            speed: 4.0,
            keep: 0.2,
            seed: 1,
            prompt_scale: 1.0 / 32.0,
            prompt_bytes: (16, 128),
            max_output: 32,
        };
        let some = plan(AZURE_CODE_20_MIN, &shrink);
        assert!((600..860).contains(&some.len()), "{}", some.len());
        assert!(some.last().unwrap().t_s < 300.0);
        assert!(some.windows(2).all(|w| w[0].t_s <= w[1].t_s));
        assert!(
            some.iter()
                .all(|p| (16..=128).contains(&p.prompt_bytes) && (1..=32).contains(&p.max_tokens))
        );
        // Seeded: the same plan twice.
        assert_eq!(plan(AZURE_CODE_20_MIN, &shrink), some);
        // The coding trace's bursts: minutes of nothing, then hundreds of requests.
        assert!(peak_rps(&some, 10.0) > 3.0 * some.len() as f64 / 300.0);
    }

    #[test]
    fn prompts_have_their_length_and_no_common_first_block() {
        let (a, b) = (prompt(64), prompt(64));
        assert_eq!((a.len(), b.len()), (64, 64));
        // The worker's cache blocks are 16 tokens: no two prompts share the first.
        assert_ne!(a[..16], b[..16]);
    }
}
