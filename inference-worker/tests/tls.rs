//! TLS (#17): a worker serves HTTPS from PEM files and takes a renewed certificate without a
//! restart (a bad renewal keeps the last good one); a router reaches its expert shards over
//! TLS (HTTP/2 by ALPN) and refuses to without a CA; an edge escalates to an `https://`
//! cloud it verifies. Certificates are made here, with rcgen.

mod common;

use common::{Killed, MODEL, free_port, http, post_json, server_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tidal_worker::serve::conn::ServerOptions;
use tidal_worker::serve::engine::EngineConfig;
use tidal_worker::serve::escalation::{EscalationConfig, OnCloudUnavailable};
use tidal_worker::serve::http::ServerConfig;
use tidal_worker::serve::tls::{Alpn, TrustedCa, server_config as tls_server_config};

const BIN: &str = env!("CARGO_BIN_EXE_tidal-worker");

/// Longer than any reload under test (files are looked at again every second).
const RELOAD: Duration = Duration::from_secs(60);

/// A CA and the PEM files of a server certificate it signed for `localhost`.
struct Pki {
    ca_pem: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn issue(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("tidal test CA {name}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let pki = Pki {
        ca_pem: ca.pem(),
        ca: dir.join(format!("{name}-ca.crt")),
        cert: dir.join(format!("{name}-tls.crt")),
        key: dir.join(format!("{name}-tls.key")),
    };
    std::fs::write(&pki.ca, &pki.ca_pem).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

/// A client trusting only `ca_pem`.
fn client(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}

async fn models(client: &reqwest::Client, port: u16) -> Result<u16, String> {
    client
        .get(format!("https://localhost:{port}/v1/models"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_served_and_a_renewed_certificate_applies_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = issue(dir.path(), "first");
    // The server reads the files it was started with; renewals overwrite them.
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let srv = common::start_listening(
        common::fixture_seeded(0),
        EngineConfig::default(),
        server_config(),
        ServerOptions {
            tls: Some(tls_server_config(&cert, &key).unwrap()),
            ..ServerOptions::default()
        },
    )
    .await;
    let port = srv.addr.port();
    assert_eq!(models(&client(&first.ca_pem), port).await, Ok(200));
    // Nothing in clear text on the TLS port.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/v1/models")).await;
    assert!(
        !plain.is_ok_and(|r| r.status().is_success()),
        "plain HTTP must not be served"
    );

    // Renewed by another CA (the Secret updated): new connections get the new certificate.
    let second = issue(dir.path(), "second");
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    let renewed = client(&second.ca_pem);
    let t0 = std::time::Instant::now();
    while models(&renewed, port).await != Ok(200) {
        assert!(
            t0.elapsed() < RELOAD,
            "the renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        models(&client(&first.ca_pem), port).await.is_err(),
        "the old certificate is no longer served"
    );

    // A renewal that does not load keeps the last good certificate.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(models(&renewed, port).await, Ok(200));
}

#[test]
fn a_certificate_that_does_not_load_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path(), "x");
    let other = issue(dir.path(), "y");
    // A key that is not the certificate's.
    let e = tls_server_config(&pki.cert, &other.key).unwrap_err();
    assert!(e.to_string().starts_with("TLS:"), "{e}");
    let e = tls_server_config(&dir.path().join("missing.crt"), &pki.key).unwrap_err();
    assert!(e.to_string().contains("missing.crt"), "{e}");
    assert!(
        TrustedCa::open(&pki.key, Alpn::H2).is_err(),
        "a key is no CA"
    );
}

fn spawn(args: &[&str], envs: &[(&str, &Path)], stderr: Stdio) -> Killed {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Killed(cmd.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_reaches_its_shards_over_tls_and_only_with_their_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path(), "shards");
    let model = common::fixture_seeded(5);
    let shard_port = free_port();
    let plan = dir.path().join("plan.json");
    let experts: Vec<usize> =
        (0..tidal_worker::model::fixture::FixtureSpec::default().experts).collect();
    std::fs::write(
        &plan,
        json!({"version": 1, "numExperts": experts.len(), "shards": [{"shard": 0,
            "experts": experts, "endpoint": format!("https://localhost:{shard_port}")}]})
        .to_string(),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{shard_port}");
    let mut shard = spawn(
        &[
            "serve", "--role", "expert", "--listen", &listen, "--shard", "0",
        ],
        &[
            ("TIDAL_MODEL", model.path()),
            ("TIDAL_PLACEMENT_FILE", &plan),
            ("TIDAL_TLS_CERT_FILE", &pki.cert),
            ("TIDAL_TLS_KEY_FILE", &pki.key),
        ],
        Stdio::inherit(),
    );
    // Ready over TLS, verified.
    let verified = client(&pki.ca_pem);
    for i in 0.. {
        assert!(shard.0.try_wait().unwrap().is_none(), "the shard exited");
        let ready = verified
            .get(format!("https://localhost:{shard_port}/ready"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(i < 1200, "the shard never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let router = |ca: Option<&Path>, stderr: Stdio| {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut envs = vec![
            ("TIDAL_MODEL", model.path()),
            ("TIDAL_PLACEMENT_FILE", plan.as_path()),
        ];
        if let Some(ca) = ca {
            envs.push(("TIDAL_SHARD_CA_FILE", ca));
        }
        let child = spawn(
            &[
                "serve",
                "--role",
                "router",
                "--served-model-name",
                MODEL,
                "--listen",
                &addr.to_string(),
            ],
            &envs,
            stderr,
        );
        (child, addr)
    };
    let req = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0,
        "ignore_eos": true});

    let (mut with_ca, addr) = router(Some(&pki.ca), Stdio::inherit());
    common::wait_until_ready(&mut with_ca, addr).await;
    let r = post_json(addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The same tokens as the whole model in one process.
    let full = common::start_with(
        common::fixture_seeded(5),
        EngineConfig::default(),
        server_config(),
    )
    .await;
    let want = post_json(full.addr, "/v1/completions", &req).await.json();
    assert_eq!(r.json()["choices"][0]["text"], want["choices"][0]["text"]);
    let m = String::from_utf8(http(addr, "GET", "/metrics", b"").await.body).unwrap();
    assert!(m.contains("tidal_worker_expert_tokens_total"), "{m}");

    // A router that cannot verify the shard never sends it hidden states: its warm-up says
    // why, and it does not become ready.
    let log = dir.path().join("router-without-ca.log");
    let (mut without, addr) = router(None, std::fs::File::create(&log).unwrap().into());
    let t0 = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("needs --shard-ca-file") {
            break;
        }
        assert!(
            without.0.try_wait().unwrap().is_none(),
            "the router exited: {text}"
        );
        assert!(t0.elapsed() < RELOAD, "no TLS error logged: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http(addr, "GET", "/ready", b"").await.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_escalates_to_an_https_cloud_it_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path(), "cloud");
    let cloud = common::start_listening(
        common::fixture_seeded(1),
        EngineConfig::default(),
        server_config(),
        ServerOptions {
            tls: Some(tls_server_config(&pki.cert, &pki.key).unwrap()),
            ..ServerOptions::default()
        },
    )
    .await;
    let edge = |ca: Arc<TrustedCa>| {
        common::start_with(
            common::fixture_seeded(2),
            EngineConfig::default(),
            ServerConfig {
                escalation: Some(EscalationConfig {
                    // Every request escalates once a few tokens exist.
                    confidence_threshold: 1.0,
                    confidence_window: 2,
                    on_cloud_unavailable: OnCloudUnavailable::Fail,
                    ca: Some(ca),
                    ..EscalationConfig::new(format!("https://localhost:{}", cloud.addr.port()))
                }),
                ..server_config()
            },
        )
    };
    let req = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0,
        "ignore_eos": true});

    let trusting = edge(TrustedCa::open(&pki.ca, Alpn::Http11).unwrap()).await;
    let r = post_json(trusting.addr, "/v1/completions", &req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("x-tidal-escalated").as_deref(),
        Some("low_confidence")
    );

    // An edge trusting another CA does not talk to an impostor: the escalation fails.
    let other = issue(dir.path(), "other");
    let wary = edge(TrustedCa::open(&other.ca, Alpn::Http11).unwrap()).await;
    let r = post_json(wary.addr, "/v1/completions", &req).await;
    assert_eq!(
        r.header("x-tidal-escalation-failed").as_deref(),
        Some("cloud_unavailable"),
        "status {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}
