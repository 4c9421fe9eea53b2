//! A sequence decoded in a batch with other sequences gets bitwise the same logits
//! as when it is decoded alone, whatever the batch size, its position in the batch
//! and the other sequences' lengths.

use candle_core::DType;
use tidal_worker::model::config::ModelConfig;
use tidal_worker::model::decoder::{KvCache, Model};
use tidal_worker::model::fixture::{FixtureArch, FixtureSpec};
use tidal_worker::serve::sampling::argmax;

const STEPS: usize = 8;

fn prompts() -> Vec<Vec<u32>> {
    [
        "The quick brown fox",
        "a",
        "Hello, world!",
        "0123456789abcdef0123",
        "xyz",
    ]
    .iter()
    .map(|p| p.bytes().map(u32::from).collect())
    .collect()
}

/// Greedy decoding of one prompt alone: the logits after prefill and after each step.
fn solo(model: &Model, prompt: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut logits = vec![model.forward(prompt, &mut cache).unwrap()];
    for _ in 0..STEPS {
        let token = argmax(logits.last().unwrap());
        logits.push(model.forward(&[token], &mut cache).unwrap());
    }
    logits
}

struct Running {
    id: usize,
    cache: KvCache,
    last: u32,
    logits: Vec<Vec<f32>>,
}

fn check(arch: FixtureArch, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        arch,
        seed,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let model = Model::load_dir(dir.path(), cfg, DType::F32).unwrap();
    let prompts = prompts();
    let expected: Vec<_> = prompts.iter().map(|p| solo(&model, p)).collect();

    // Sequences join at different steps (one per step), so the batch grows from 1 to
    // all of them and back down as they finish; the batch order is reversed every
    // other step so that each sequence changes position.
    let mut waiting: Vec<usize> = (0..prompts.len()).rev().collect();
    let mut running: Vec<Running> = vec![];
    let mut done: Vec<Running> = vec![];
    let mut largest = 0;
    for step in 0.. {
        if let Some(id) = waiting.pop() {
            let mut cache = model.new_cache();
            let logits = model.forward(&prompts[id], &mut cache).unwrap();
            running.push(Running {
                id,
                cache,
                last: argmax(&logits),
                logits: vec![logits],
            });
        }
        if running.is_empty() {
            break;
        }
        if step % 2 == 1 {
            running.reverse();
        }
        largest = largest.max(running.len());
        let out = {
            let mut batch: Vec<(&[u32], &mut KvCache)> = running
                .iter_mut()
                .map(|r| (std::slice::from_ref(&r.last), &mut r.cache))
                .collect();
            model.forward_batch(&mut batch).unwrap()
        };
        assert_eq!(out.len(), running.len());
        for (r, logits) in running.iter_mut().zip(out) {
            r.last = argmax(&logits);
            r.logits.push(logits);
        }
        let (finished, rest): (Vec<_>, Vec<_>) = running
            .into_iter()
            .partition(|r| r.logits.len() == STEPS + 1);
        done.extend(finished);
        running = rest;
    }
    assert_eq!(largest, prompts.len(), "every sequence shared a step");
    assert_eq!(done.len(), prompts.len());
    for r in done {
        for (step, (got, want)) in r.logits.iter().zip(&expected[r.id]).enumerate() {
            assert!(
                got == want,
                "{arch:?}: prompt {} step {step}: batched logits differ from solo",
                r.id
            );
        }
    }
}

#[test]
fn mixtral_batched_decode_matches_solo_bitwise() {
    check(FixtureArch::Mixtral, 11);
}

#[test]
fn llama_batched_decode_matches_solo_bitwise() {
    check(FixtureArch::Llama, 12);
}

#[test]
fn qwen2_batched_decode_matches_solo_bitwise() {
    check(FixtureArch::Qwen2, 13);
}

/// Multi-head latent attention and DeepSeek-V2's MoE (layer 0 dense, layer 1 with
/// experts and shared experts) keep the batch invariance.
#[test]
fn deepseek_v2_batched_decode_matches_solo_bitwise() {
    check(FixtureArch::DeepseekV2, 14);
}

#[test]
fn forward_batch_handles_prefill_chunks_and_rejects_empty_input() {
    let dir = tempfile::tempdir().unwrap();
    tidal_worker::model::fixture::generate(&FixtureSpec::default(), dir.path()).unwrap();
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let model = Model::load_dir(dir.path(), cfg, DType::F32).unwrap();
    let prompts = prompts();
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| model.forward(p, &mut model.new_cache()).unwrap())
        .collect();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut batch: Vec<(&[u32], &mut KvCache)> = prompts
        .iter()
        .map(|p| p.as_slice())
        .zip(caches.iter_mut())
        .collect();
    let together = model.forward_batch(&mut batch).unwrap();
    assert_eq!(together, alone);
    for (c, p) in caches.iter().zip(&prompts) {
        assert_eq!(c.len(), p.len());
    }
    let mut cache = model.new_cache();
    assert!(model.forward_batch(&mut [(&[][..], &mut cache)]).is_err());
    assert!(model.forward_batch(&mut []).unwrap().is_empty());
}
