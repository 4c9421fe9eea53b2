//! Every constant of the core has a row in `CONSTANTS.md` saying what set its value (issue
//! #18: no constant justified by one trace alone).

use std::path::Path;

#[test]
fn every_constant_of_the_core_is_in_the_ledger() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ledger = std::fs::read_to_string(root.join("CONSTANTS.md")).unwrap();
    let rows: Vec<&str> = ledger.lines().filter(|l| l.starts_with("| `")).collect();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("src")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            // Top-level items only (a function's or a test's own constants are local).
            let Some(rest) = line
                .strip_prefix("pub const ")
                .or_else(|| line.strip_prefix("const "))
            else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push((
                name,
                path.file_name().unwrap().to_string_lossy().to_string(),
            ));
        }
    }
    assert!(names.len() > 30, "found only {names:?}");
    for (name, file) in &names {
        // The name's cell: "| `NAME` |" or "| `A`, `NAME` |".
        let listed = rows.iter().any(|r| {
            let cell = r.split(" | ").next().unwrap_or_default();
            cell.contains(&format!("`{name}`"))
        });
        assert!(listed, "{name} ({file}) has no row in CONSTANTS.md");
    }
}
