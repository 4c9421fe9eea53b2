//! Supply chain (#17): the dependency graph passes `cargo deny` (licenses, bans, sources) as
//! `deny.toml` configures it, with the cargo-deny that `deploy/local` builds. Advisories need
//! the RustSec database from github.com, which CI cannot reach (see deny.toml).

use tidal_e2e::{local_tools, repo_root};

#[test]
fn dependencies_pass_cargo_deny() {
    let Some(env) = local_tools("cargo-deny") else {
        return;
    };
    let root = repo_root();
    let out = env
        .command("cargo-deny")
        .current_dir(&root)
        .args(["--frozen", "--color", "never"])
        .args(["--manifest-path", root.join("Cargo.toml").to_str().unwrap()])
        .args(["check", "--show-stats"])
        .args(["licenses", "bans", "sources"])
        .output()
        .expect("run cargo-deny");
    // Diagnostics go to stderr, the per-check summary to stdout.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo deny check failed ({}):\n{stderr}",
        out.status
    );
    // Each check ran and passed (an unknown check name or an empty graph would say otherwise).
    for check in ["licenses ok:", "bans ok:", "sources ok:"] {
        assert!(stdout.contains(check), "{check:?} in:\n{stdout}\n{stderr}");
    }
}
