//! Writes the CRDs to `crds/` and to the Helm chart's `charts/tidal/crds/` (or only to the
//! directory given as the first argument). `deploy/regen` runs it with the chart snapshots.

use std::path::PathBuf;

use tidal_operator::crd::{all_crds, crd_file_name, crd_yaml};

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirs = match std::env::args_os().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![root.join("crds"), root.join("charts/tidal/crds")],
    };
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for crd in all_crds() {
            let path = dir.join(crd_file_name(&crd));
            std::fs::write(&path, crd_yaml(&crd))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
