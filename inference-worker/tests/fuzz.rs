//! Property tests of request parsing and validation: nothing panics, every rejection is
//! a 4xx in OpenAI's format, every acceptance satisfies the documented ranges, and a
//! live server answers arbitrary bodies without falling over.

mod common;

use proptest::prelude::*;
use serde_json::{Value, json};
use tidal_worker::serve::api::{ChatRequest, CompletionRequest, Limits, parse_json};

fn limits() -> Limits {
    Limits {
        model_name: "tiny".into(),
        context: 512,
        max_tokens: 64,
        max_stop: 4,
    }
}

fn json_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-10.0f64..10.0).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("bogus")
        ],
        prop_oneof![
            ".{0,16}".prop_map(Value::from),
            json_scalar(),
            Just(json!([{"type": "text", "text": "hi"}])),
            Just(json!([{"type": "image_url"}])),
        ],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}))
}

fn chat_body() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(json!("tiny")), json_scalar()],
        prop::collection::vec(message(), 0..3),
        prop::option::of(prop_oneof![
            (-5i64..100).prop_map(Value::from),
            json_scalar()
        ]),
        prop::option::of(prop_oneof![
            (-1.0f64..3.0).prop_map(Value::from),
            json_scalar()
        ]),
        prop::option::of(prop_oneof![
            (-0.5f64..1.5).prop_map(Value::from),
            json_scalar()
        ]),
        prop::option::of(prop_oneof![
            prop::collection::vec(".{0,3}", 0..7).prop_map(Value::from),
            json_scalar()
        ]),
    )
        .prop_map(|(model, messages, max_tokens, temperature, top_p, stop)| {
            let mut v = json!({"model": model, "messages": messages});
            for (k, x) in [
                ("max_tokens", max_tokens),
                ("temperature", temperature),
                ("top_p", top_p),
                ("stop", stop),
            ] {
                if let Some(x) = x {
                    v[k] = x;
                }
            }
            v
        })
}

fn check_chat(body: &[u8]) -> Result<(), tidal_worker::serve::api::ApiError> {
    let req: ChatRequest = parse_json(body)?;
    req.messages()?;
    let c = req.common.check(&limits())?;
    assert!((0.0..=2.0).contains(&c.sampling.temperature));
    assert!(c.sampling.top_p > 0.0 && c.sampling.top_p <= 1.0);
    assert!(c.max_tokens.is_none_or(|m| (1..=64).contains(&m)));
    assert!(c.stop.len() <= 4 && c.stop.iter().all(|s| !s.is_empty()));
    Ok(())
}

fn assert_openai_error(e: &tidal_worker::serve::api::ApiError) {
    assert!(e.status.is_client_error(), "{e:?}");
    let body = e.body();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(body["error"]["type"].is_string());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = check_chat(&body) {
            assert_openai_error(&e);
        }
        if let Err(e) = parse_json::<CompletionRequest>(&body) {
            assert_openai_error(&e);
        }
    }

    #[test]
    fn structured_chat_requests_are_accepted_or_rejected_cleanly(body in chat_body()) {
        if let Err(e) = check_chat(body.to_string().as_bytes()) {
            assert_openai_error(&e);
        }
    }
}

#[test]
fn live_server_survives_arbitrary_requests() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(common::start(
        Default::default(),
        tidal_worker::serve::http::ServerConfig {
            max_tokens: 4,
            ..common::server_config()
        },
    ));
    let addr = server.addr;
    // Deterministic so that the "some accepted, some rejected" check below cannot flake.
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        ProptestConfig::with_cases(64),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let rejected = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&chat_body(), |body| {
            let mut body = body;
            // Keep accepted generations short.
            if body["max_tokens"].is_null() {
                body["max_tokens"] = 2.into();
            }
            let r = rt.block_on(common::post_json(addr, "/v1/chat/completions", &body));
            prop_assert!(
                r.status == 200 || (400..500).contains(&r.status),
                "status {}",
                r.status
            );
            let v = r.json();
            if r.status == 200 {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                prop_assert_eq!(&v["object"], "chat.completion");
            } else {
                rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                prop_assert!(v["error"]["message"].is_string(), "{}", v);
            }
            Ok(())
        })
        .unwrap();
    assert!(accepted.into_inner() > 0, "no generated request was valid");
    assert!(
        rejected.into_inner() > 0,
        "no generated request was invalid"
    );
    let ok = rt.block_on(common::post_json(
        addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "ok", "max_tokens": 2}),
    ));
    assert_eq!(ok.status, 200);
}
