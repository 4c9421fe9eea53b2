//! Writes the CRDs to `crds/` (or the directory given as the first argument).

use std::path::PathBuf;

use tidal_operator::crd::{all_crds, crd_file_name, crd_yaml};

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds"));
    std::fs::create_dir_all(&dir)?;
    for crd in all_crds() {
        let path = dir.join(crd_file_name(&crd));
        std::fs::write(&path, crd_yaml(&crd))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
