//! Property tests of what crosses process boundaries in expert disaggregation: expert wire
//! frames (from routers, to shards, and back) and placement plans (from the operator's
//! ConfigMap). Nothing panics or allocates by a corrupt header; a rejected plan keeps the
//! previous one.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use serde_json::{Value, json};
use tidal_worker::disagg::placement::{Plan, PlanFile};
use tidal_worker::disagg::wire::{
    RESP_HEADER, decode_request, decode_response, encode_request, encode_response,
};

/// A valid request frame: `n` tokens of width `hidden`, up to `k` routes each.
fn frame(n: usize, hidden: usize, k: usize, seed: u32) -> Vec<u8> {
    let xs: Vec<f32> = (0..n * hidden)
        .map(|i| (i as f32 + seed as f32).sin())
        .collect();
    let xs = Tensor::from_vec(xs, (n, hidden), &Device::Cpu).unwrap();
    let routes: Vec<Vec<(usize, f32)>> = (0..n)
        .map(|t| {
            (0..(t + seed as usize) % (k + 1))
                .map(|s| ((t * 7 + s) % 64, 0.5))
                .collect()
        })
        .collect();
    encode_request(3, &xs, &routes).unwrap()
}

/// What a hostile or broken peer may do to a frame.
#[derive(Debug, Clone)]
enum Damage {
    Flip {
        at: usize,
        xor: u8,
    },
    Truncate(usize),
    Extend(Vec<u8>),
    /// Overwrites a header field (n, hidden, k, layer, dtype) with an extreme value.
    Header {
        at: usize,
        value: u32,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Damage::Flip { at, xor }),
        any::<usize>().prop_map(Damage::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Extend),
        (
            prop::sample::select(vec![6usize, 7, 8, 12, 16]),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(u32::MAX),
                Just(u32::MAX / 2),
                any::<u32>()
            ]
        )
            .prop_map(|(at, value)| Damage::Header { at, value }),
    ]
}

fn apply(mut b: Vec<u8>, d: &Damage) -> Vec<u8> {
    match d {
        Damage::Flip { at, xor } => {
            let i = at % b.len();
            b[i] ^= xor;
        }
        Damage::Truncate(at) => b.truncate(at % b.len()),
        Damage::Extend(more) => b.extend_from_slice(more),
        Damage::Header { at, value } => {
            if *at < 8 {
                b[*at] = *value as u8;
            } else {
                b[*at..*at + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
    }
    b
}

fn plan_json() -> impl Strategy<Value = Value> {
    let count = prop_oneof![
        Just(json!(0)),
        (1u64..16).prop_map(Value::from),
        Just(json!(65_535)),
        Just(json!(65_536)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!("8")),
        Just(Value::Null),
    ];
    let endpoint = prop_oneof![
        Just(json!("http://svc-experts-0.ns.svc:8080")),
        Just(json!("")),
        Just(Value::Null),
        Just(json!(7)),
    ];
    let shard = (
        prop_oneof![(0u64..4).prop_map(Value::from), Just(json!(-1)), Just(json!(u64::MAX))],
        prop::collection::vec(prop_oneof![(0u64..20).prop_map(Value::from), Just(json!(u64::MAX))], 0..6),
        endpoint,
    )
        .prop_map(|(shard, experts, endpoint)| {
            json!({"shard": shard, "experts": experts, "endpoint": endpoint})
        });
    (
        count,
        prop::collection::vec(shard, 0..4),
        prop_oneof![(0u64..9).prop_map(Value::from), Just(json!(-3))],
    )
        .prop_map(
            |(n, shards, version)| json!({"version": version, "numExperts": n, "shards": shards}),
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_are_rejected_as_frames(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_request(&b);
        prop_assert!(decode_response(&b, 2, 8, DType::F32).is_err() || b.len() == RESP_HEADER + 64);
    }

    #[test]
    fn a_damaged_request_frame_decodes_consistently_or_is_refused(
        n in 0usize..6, hidden in 1usize..12, k in 0usize..4, seed in 0u32..1000,
        d in damage(),
    ) {
        let good = frame(n, hidden, k, seed);
        prop_assert!(decode_request(&good).is_ok());
        let bad = apply(good, &d);
        if let Ok(req) = decode_request(&bad) {
            // Whatever was accepted is self-consistent: one route list per token row.
            let (rows, width) = req.xs.dims2().unwrap();
            prop_assert_eq!(req.routes.len(), rows);
            prop_assert!(rows * width * req.xs.dtype().size_in_bytes() <= bad.len());
        }
    }

    #[test]
    fn a_damaged_response_is_refused_unless_it_still_fits_the_request(
        n in 1usize..6, hidden in 1usize..12, d in damage(),
    ) {
        let ys = Tensor::zeros((n, hidden), DType::F32, &Device::Cpu).unwrap();
        let good = encode_response(&ys).unwrap();
        let bad = apply(good.clone(), &d);
        match decode_response(&bad, n, hidden, DType::F32) {
            Ok(t) => {
                prop_assert_eq!(t.dims2().unwrap(), (n, hidden));
                prop_assert_eq!(bad.len(), good.len());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn plans_parse_only_within_bounds(plan in plan_json()) {
        if let Ok(p) = Plan::parse(&plan.to_string()) {
            prop_assert!(p.num_experts >= 1 && p.num_experts < 65_536);
            for s in &p.shards {
                prop_assert!(s.experts.iter().all(|&e| e < p.num_experts));
                prop_assert!(s.endpoint.as_deref().is_some_and(|u| !u.is_empty()));
            }
            // Cheap to use however large the plan says the model is.
            let _ = p.check_covers(p.num_experts);
        }
    }
}

#[test]
fn a_rejected_plan_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    let good = json!({"version": 1, "numExperts": 2, "shards": [
        {"shard": 0, "experts": [0, 1], "endpoint": "http://a:1"}]});
    std::fs::write(&path, good.to_string()).unwrap();
    let file = PlanFile::open(&path).unwrap();
    for bad in [
        "{".to_string(),
        String::new(),
        json!({"version": 2, "numExperts": 1_000_000_000_000u64, "shards": []}).to_string(),
        json!({"version": 2, "numExperts": 2, "shards": [
            {"shard": 0, "experts": [0, 2], "endpoint": "http://a:1"}]})
        .to_string(),
        json!({"version": 2, "numExperts": 2, "shards": [
            {"shard": 0, "experts": [0, 1], "endpoint": "http://a:1"},
            {"shard": 0, "experts": [1], "endpoint": "http://b:1"}]})
        .to_string(),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let err = file.poll(|_| Ok(())).expect_err(&bad);
        assert!(!err.to_string().is_empty());
        assert_eq!(file.current().version, 1, "kept after {bad:?}");
    }
    // A plan that parses but the model refuses (an expert without a shard) is kept out too.
    let uncovered = json!({"version": 3, "numExperts": 2, "shards": [
        {"shard": 0, "experts": [0], "endpoint": "http://a:1"}]});
    std::fs::write(&path, uncovered.to_string()).unwrap();
    assert!(file.poll(|p| p.check_covers(2)).is_err());
    assert_eq!(file.current().version, 1);
    std::fs::write(
        &path,
        good.to_string().replace("\"version\":1", "\"version\":4"),
    )
    .unwrap();
    assert_eq!(
        file.poll(|p| p.check_covers(2)).unwrap().unwrap().version,
        4
    );
}
