//! What the benchmark examples share.

use std::path::Path;

/// Writes `md` (which starts with `begin` and ends with `end`) over the section between
/// those markers in `out`, or appends it when the file has none; prints it when `out` is
/// unset. Each bench owns its section, so they can run in any order.
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
