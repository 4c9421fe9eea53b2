//! What the benchmark examples share.

use std::path::Path;

/// Writes `md` (which starts with `begin` and ends with `end`) over the section between
/// those markers in `out`, or appends it when the file has none; prints it when `out` is
/// unset. Each bench owns its section, so they can run in any order.
#[allow(dead_code)] // `bench` writes its part of the file itself
pub fn write_section(out: Option<&Path>, begin: &str, end: &str, md: &str) {
    let Some(path) = out else {
        print!("{md}");
        return;
    };
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(s), Some(e)) if e > s => format!(
            "{}{}{}",
            &old[..s],
            md,
            old[e + end.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n\n{}", old.trim_end_matches('\n'), md),
    };
    std::fs::write(path, new).expect("writing the benchmark file");
    println!("wrote {}", path.display());
}

/// The kernels' thread count, settled as the worker settles it: first thing in `main`,
/// before any thread starts (it may re-execute the process with `RAYON_NUM_THREADS` set).
#[allow(dead_code)] // not every example includes a tokio runtime or this call
pub fn settle_threads() {
    tidal_worker::model::threads::configure(None).expect("re-executing with RAYON_NUM_THREADS");
}

/// [`settle_threads`], then `fut` on a multi-threaded tokio runtime (`worker_threads` of them
/// when given).
#[allow(dead_code)]
pub fn run_tokio<F: std::future::Future>(worker_threads: Option<usize>, fut: F) -> F::Output {
    settle_threads();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        rt.worker_threads(n);
    }
    rt.enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(fut)
}
