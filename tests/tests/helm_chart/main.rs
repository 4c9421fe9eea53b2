//! The Helm chart (`charts/tidal`) and its monitoring assets: it lints, renders what is
//! committed, ships the generated CRDs, rejects bad values, installs and uninstalls on the real
//! control plane, and its RBAC is enough for the real operator. Every PromQL expression in the
//! rules and dashboards runs against a real Prometheus that scrapes through the chart's scrape
//! config.
//!
//! One test binary, a module per concern: [`render`] (lint, snapshots, CRD copies, values
//! schema), [`monitoring`] (PromQL of rules and dashboards on a real Prometheus), [`install`]
//! (install/uninstall and RBAC on the real control plane).

mod install;
mod monitoring;
mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tidal_e2e::{CONVERGE, LocalEnv, TestCtx, control_plane, eventually, install_crds, repo_root};

const RELEASE: &str = "tidal";

fn chart() -> PathBuf {
    repo_root().join("charts/tidal")
}

fn chart_arg() -> String {
    chart().to_str().expect("utf-8 path").to_string()
}

/// The renders committed under `charts/tidal/tests/snapshots/`, from the list `deploy/regen`
/// writes them from: (file, extra `helm template` arguments).
fn snapshot_renders() -> Vec<(String, Vec<String>)> {
    let list = std::fs::read_to_string(chart().join("tests/renders.txt")).expect("renders.txt");
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace().map(String::from);
            (words.next().unwrap(), words.collect())
        })
        .collect()
}

fn output(env: &LocalEnv, program: &str, args: &[&str]) -> Output {
    env.command(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn helm_template(env: &LocalEnv, extra: &[&str]) -> String {
    let chart = chart_arg();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", "tidal-system"];
    args.extend_from_slice(extra);
    env.run("helm", &args)
}

/// YAML documents of a render, as JSON values (empty documents dropped).
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn curl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
