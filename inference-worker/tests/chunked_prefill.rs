//! Chunked prefill: a long prompt is computed a chunk per step beside the running
//! sequences' decode steps, so it does not stall them, and its answer does not depend on
//! what else runs, nor on a reused prefix.

mod common;

use candle_core::DType;
use common::*;
use std::sync::Arc;
use std::time::Instant;
use tidal_worker::model::decoder::Model;
use tidal_worker::model::loader::Loaded;
use tidal_worker::serve::engine::{EngineConfig, EngineHandle, Event, GenRequest};
use tidal_worker::serve::metrics::Metrics;
use tidal_worker::serve::sampling::{SamplingParams, argmax};
use tokio::sync::mpsc::UnboundedReceiver;

const CHUNK: usize = 64;

fn load() -> (tempfile::TempDir, Loaded) {
    let dir = long_context_fixture();
    let loaded = tidal_worker::model::loader::load_dir(dir.path(), DType::F32).unwrap();
    (dir, loaded)
}

fn engine(loaded: &Loaded, cfg: EngineConfig) -> EngineHandle {
    engine_with(loaded, cfg, Arc::new(Metrics::new()))
}

fn engine_with(loaded: &Loaded, cfg: EngineConfig, metrics: Arc<Metrics>) -> EngineHandle {
    tidal_worker::serve::engine::spawn(loaded.model.clone(), loaded.codec.clone(), cfg, metrics)
}

fn chunked(prefix_cache: bool) -> EngineConfig {
    let mut cfg = EngineConfig {
        prefill_chunk_tokens: CHUNK,
        ..EngineConfig::default()
    };
    if !prefix_cache {
        cfg.prefix_cache = None;
    }
    cfg
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + salt) % 250 + 1).collect()
}

/// Greedy, one log probability event per generated token.
fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> GenRequest {
    GenRequest {
        prompt_ids,
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: vec![],
        ignore_eos: true,
        arrived: Instant::now(),
        confidence: None,
        logprobs: Some(0),
        prompt_logprobs: false,
    }
}

/// The generated tokens' log probabilities, bit for bit, in order.
async fn answer(mut rx: UnboundedReceiver<Event>) -> Vec<u32> {
    let mut out = vec![];
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Logprob(lp) => out.push(lp.logprob.to_bits()),
            Event::Done { .. } => return out,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    panic!("no Done")
}

#[test]
fn a_chunked_prefill_answers_as_the_whole_prompt_does() {
    let (_dir, loaded) = load();
    let model: &Model = &loaded.model;
    let p = prompt(300, 3);
    let mut whole = model.new_cache();
    let want = model.forward(&p, &mut whole).unwrap();
    let mut cache = model.new_cache();
    let mut got = vec![];
    for c in p.chunks(CHUNK) {
        got = model.forward(c, &mut cache).unwrap();
    }
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "chunked logits differ by {diff}");
    assert_eq!(argmax(&got), argmax(&want));
    assert_eq!(cache.len(), whole.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_goes_on_while_a_long_prompt_is_computed() {
    let (_dir, loaded) = load();
    let e = engine(&loaded, chunked(false));
    // A decodes; once it has its first token, B arrives with a prompt of 32 chunks.
    let mut a = e.submit(greedy(prompt(8, 1), 400)).unwrap();
    loop {
        if let Some(Event::Logprob(_)) = a.recv().await {
            break;
        }
    }
    let long = 32 * CHUNK;
    let mut b = e.submit(greedy(prompt(long, 2), 1)).unwrap();
    let mut a_before = 0;
    while let Ok(ev) = a.try_recv() {
        a_before += matches!(ev, Event::Logprob(_)) as usize;
    }
    // B's first token: everything A was sent until then is in its channel.
    loop {
        match b.recv().await.expect("B answers") {
            Event::Logprob(_) => break,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    let mut a_during = 0;
    while let Ok(ev) = a.try_recv() {
        a_during += matches!(ev, Event::Logprob(_)) as usize;
    }
    // One decode step of A beside each of B's chunks (a whole prefill would give A none
    // while it runs).
    assert!(
        a_during >= 31,
        "A got {a_during} tokens while B's {long}-token prompt was computed ({a_before} before)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_is_the_same_alone_beside_others_and_after_a_reused_prefix() {
    let (_dir, loaded) = load();
    let p = prompt(5 * CHUNK + 17, 4);
    let alone = {
        let e = engine(&loaded, chunked(false));
        answer(e.submit(greedy(p.clone(), 12)).unwrap()).await
    };
    // Beside other prompts being computed and decoded.
    let e = engine(&loaded, chunked(false));
    let others: Vec<_> = (0..3)
        .map(|i| {
            e.submit(greedy(prompt(100 + 90 * i, 10 + i as u32), 20))
                .unwrap()
        })
        .collect();
    let busy = answer(e.submit(greedy(p.clone(), 12)).unwrap()).await;
    for o in others {
        answer(o).await;
    }
    assert_eq!(busy, alone, "the answer depends on the batch");
    // After another prompt left most of this one's blocks (a prefix that ends inside a
    // chunk), with the prefix cache on.
    let metrics = Arc::new(Metrics::new());
    let e = engine_with(&loaded, chunked(true), metrics.clone());
    let mut first = p[..3 * CHUNK + 40].to_vec();
    first.extend([9, 9, 9]);
    answer(e.submit(greedy(first, 2)).unwrap()).await;
    let reused = answer(e.submit(greedy(p.clone(), 12)).unwrap()).await;
    // 14 whole blocks of 16 shared: the reused prefix ends 32 tokens into the 4th chunk.
    assert_eq!(metrics.prefix_cache_hit_tokens.get(), 14 * 16);
    assert_eq!(reused, alone, "the answer depends on the reused prefix");
}
