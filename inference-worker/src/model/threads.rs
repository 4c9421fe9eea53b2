//! How many threads the model's kernels use, decided once at start-up.
//!
//! candle sizes its thread pools from `RAYON_NUM_THREADS` and, when that is unset, counts the
//! physical cores in `/proc/cpuinfo` — again on every matmul it hands to gemm, a file read that
//! was 9 % of a SmolLM2 decode step — and that count ignores a container's CPU limit: a pod
//! limited to 2 CPUs on a 64-core node ran 64 spinning threads. So the worker settles the
//! number before any thread starts and writes it where candle and rayon read it.

/// `RAYON_NUM_THREADS`, read by rayon's global pool and by candle (its own pools, and gemm's
/// parallelism per matmul).
pub const ENV: &str = "RAYON_NUM_THREADS";

/// The thread count: `requested` when given, else a valid `RAYON_NUM_THREADS` already set,
/// else the CPUs this process may use (its affinity and cgroup CPU quota, as
/// `available_parallelism` reads them) but no more than the physical cores (candle's own
/// default: a hyperthread adds little to bandwidth-bound decoding).
pub fn count(requested: Option<usize>) -> usize {
    if let Some(n) = requested.filter(|n| *n > 0) {
        return n;
    }
    if let Some(n) = std::env::var(ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n;
    }
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    allowed.min(num_cpus::get_physical().max(1))
}

/// Settles the thread count ([`count`]) and makes sure [`ENV`] says it: when it does not, the
/// process re-executes itself with it set (same PID, arguments and environment otherwise), as
/// setting a variable inside a running process is not safe Rust. Call it first thing in
/// `main`; it returns the count, or the error of a failed re-execution.
pub fn configure(requested: Option<usize>) -> std::io::Result<usize> {
    let n = count(requested);
    if std::env::var(ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(n)
    {
        return Ok(n);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // `exec` only returns on failure.
        Err(std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(ENV, n.to_string())
            .exec())
    }
    #[cfg(not(unix))]
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_count_wins_and_zero_means_decide() {
        assert_eq!(count(Some(3)), 3);
        let decided = count(Some(0));
        assert!(decided >= 1);
        if std::env::var(ENV).is_err() {
            assert!(decided <= std::thread::available_parallelism().unwrap().get());
        }
    }
}
