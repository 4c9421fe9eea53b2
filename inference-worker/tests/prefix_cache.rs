//! Prefix reuse: a prompt whose leading blocks were computed for an earlier request
//! starts from their cached keys and values, and answers as if it had computed them.

mod common;

use candle_core::DType;
use common::*;
use serde_json::{Value, json};
use tidal_worker::model::config::ModelConfig;
use tidal_worker::model::decoder::Model;
use tidal_worker::model::fixture::{FixtureArch, FixtureSpec};
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::prefix_cache::{PrefixCache, PrefixCacheConfig};
use tidal_worker::serve::sampling::argmax;

const STEPS: usize = 8;

/// Greedy tokens after `prompt` and the logits of the first, starting from `cache`
/// (which may already hold a prefix of the prompt: `skip` tokens of it).
fn greedy(
    model: &Model,
    prompt: &[u32],
    mut cache: tidal_worker::model::decoder::KvCache,
    skip: usize,
) -> (Vec<f32>, Vec<u32>, tidal_worker::model::decoder::KvCache) {
    let first = model.forward(&prompt[skip..], &mut cache).unwrap();
    let mut tokens = vec![argmax(&first)];
    for _ in 1..STEPS {
        let logits = model
            .forward(&[*tokens.last().unwrap()], &mut cache)
            .unwrap();
        tokens.push(argmax(&logits));
    }
    (first, tokens, cache)
}

fn check(arch: FixtureArch) {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        arch,
        seed: 7,
        ..FixtureSpec::default()
    };
    tidal_worker::model::fixture::generate(&spec, dir.path()).unwrap();
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let model = Model::load_dir(dir.path(), cfg, DType::F32).unwrap();
    let vocab = spec.vocab_size() as u32;
    let system: Vec<u32> = (0..70).map(|i| (i * 7 + 3) % vocab).collect();
    let ask = |q: u32| -> Vec<u32> {
        let mut p = system.clone();
        p.extend((0..9).map(|i| (q * 31 + i * 5) % vocab));
        p
    };
    let mut pc = PrefixCache::new(PrefixCacheConfig {
        block_tokens: 16,
        budget_bytes: 64 << 20,
    });

    // First request: nothing to reuse; its 4 whole blocks (64 of 79 tokens) are kept.
    let first = ask(1);
    let (cache, reused) = pc.lookup(&first, model.new_cache()).unwrap();
    assert_eq!(reused, 0);
    let (_, _, cache) = greedy(&model, &first, cache, 0);
    assert_eq!(pc.insert(&first, &cache).unwrap().new_blocks, 4);

    // Second request shares the 70-token system prompt: 4 blocks reused, and the answer
    // is the one computed from scratch.
    let second = ask(2);
    let (cache, reused) = pc.lookup(&second, model.new_cache()).unwrap();
    assert_eq!(reused, 64, "{arch:?}");
    let (logits, tokens, _) = greedy(&model, &second, cache, reused);
    let (want_logits, want_tokens, _) = greedy(&model, &second, model.new_cache(), 0);
    // Bitwise: the suffix's attention rows take the kernels a whole prefill's do.
    let diff = max_abs_diff(&logits, &want_logits);
    assert!(
        logits == want_logits,
        "{arch:?}: logits differ by up to {diff}"
    );
    assert_eq!(tokens, want_tokens, "{arch:?}: greedy tokens differ");
}

#[test]
fn reused_prefix_answers_as_computed_mixtral() {
    check(FixtureArch::Mixtral);
}

#[test]
fn reused_prefix_answers_as_computed_qwen3_with_qk_norm() {
    check(FixtureArch::Qwen3);
}

#[test]
fn reused_prefix_answers_as_computed_qwen2_with_biases() {
    check(FixtureArch::Qwen2);
}

#[test]
fn reused_prefix_answers_as_computed_deepseek_v2_with_latent_attention() {
    // Keys and values of different widths (MLA): blocks keep each as it is.
    check(FixtureArch::DeepseekV2);
}

fn completion(prompt: &str) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true})
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = String::from_utf8(http(addr, "GET", "/metrics", b"").await.body).unwrap();
    metric_value(&text, name, "").unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_reused_over_http_and_counted() {
    let with = start(EngineConfig::default(), server_config()).await;
    let without = start(
        EngineConfig {
            prefix_cache: None,
            ..EngineConfig::default()
        },
        server_config(),
    )
    .await;
    let system = "You are a terse assistant who answers in one short line. ".repeat(3);
    let mut texts = vec![];
    for q in ["What is 2+2?", "Name a colour.", "What is 2+2?"] {
        let prompt = format!("{system}{q}");
        let a = post_json(with.addr, "/v1/completions", &completion(&prompt)).await;
        let b = post_json(without.addr, "/v1/completions", &completion(&prompt)).await;
        assert_eq!((a.status, b.status), (200, 200));
        let (a, b) = (a.json(), b.json());
        assert_eq!(
            a["choices"][0]["text"], b["choices"][0]["text"],
            "prompt {q:?}: reuse changed the answer"
        );
        assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);
        texts.push(a["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    let queried = metric(with.addr, "tidal_worker_prefix_cache_queried_tokens_total").await;
    let hits = metric(with.addr, "tidal_worker_prefix_cache_hit_tokens_total").await;
    assert_eq!(queried as u64, texts.iter().sum::<u64>());
    // The second and third prompts reuse at least the system prompt's whole blocks
    // (171 bytes of text, a byte-level tokenizer: 10 blocks of 16), the third also its
    // own question's tokens up to its last whole block.
    assert!(hits >= 2.0 * 160.0, "hit tokens {hits}");
    assert!(hits < queried);
    assert!(metric(with.addr, "tidal_worker_prefix_cache_bytes").await > 0.0);
    assert!(metric(with.addr, "tidal_worker_prefix_cache_blocks").await >= 10.0);
    assert_eq!(
        metric(without.addr, "tidal_worker_prefix_cache_hit_tokens_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_requests_compute_every_position() {
    let s = start(EngineConfig::default(), server_config()).await;
    let prompt = "A prompt long enough to fill a few blocks of sixteen tokens, twice over.";
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                      "echo": true, "logprobs": 1});
    let first = post_json(s.addr, "/v1/completions", &body).await.json();
    let second = post_json(s.addr, "/v1/completions", &body).await.json();
    // Every prompt token after the first has a log probability both times: the second
    // request was not cut short by the blocks the first one left behind.
    let n = first["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    for v in [&first, &second] {
        let lps = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        assert_eq!(lps.len(), n + 1, "prompt tokens and the one generated");
        assert!(lps[0].is_null() && lps[1..].iter().all(Value::is_number));
    }
    assert_eq!(
        first["choices"][0]["logprobs"],
        second["choices"][0]["logprobs"]
    );
    assert_eq!(
        metric(s.addr, "tidal_worker_prefix_cache_hit_tokens_total").await,
        0.0
    );
}
