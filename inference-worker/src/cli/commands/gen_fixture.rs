//! `tidal-worker gen-fixture`: writes a tiny random checkpoint.

use crate::cli::args::GenFixtureArgs;
use crate::error::Result;

/// Writes the checkpoint `args` describe and says where.
pub fn gen_fixture(args: &GenFixtureArgs) -> Result<()> {
    match args.gguf {
        Some(quant) => {
            let path = crate::model::gguf_fixture::write(&args.spec, quant, &args.out)?;
            println!("wrote {}", path.display());
        }
        None => {
            crate::model::fixture::generate(&args.spec, &args.out)?;
            println!("wrote {}", args.out.display());
        }
    }
    Ok(())
}
