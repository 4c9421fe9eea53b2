//! The harness itself: the binaries the end-to-end tests run are the ones `cargo test
//! --workspace` built, and asking for them again from inside a test relinks nothing (a relink
//! costs minutes per run and, with another feature set, makes the next `cargo test` relink
//! back).

use std::time::SystemTime;

use tidal_e2e::operator_binary;
use tidal_e2e::processes::worker_binary;

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[test]
fn asking_for_the_worker_and_operator_binaries_relinks_nothing() {
    // Where they are, as `cargo test --workspace` left them (absent after a narrower run).
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let before: Vec<_> = ["tidal-worker", "tidal-operator"]
        .iter()
        .map(|b| modified(&dir.join(b)))
        .collect();
    let worker = worker_binary();
    let operator = operator_binary();
    for (path, was) in [worker, operator].iter().zip(before) {
        assert!(path.is_file(), "{}", path.display());
        let out = std::process::Command::new(path)
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{} --version failed", path.display());
        if let Some(was) = was {
            assert_eq!(
                modified(path),
                Some(was),
                "{} was rebuilt by the harness: it must build exactly what `cargo test \
                 --workspace` built (same features, no variables of the test run)",
                path.display()
            );
        }
    }
}
