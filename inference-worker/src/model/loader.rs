//! Loading a checkpoint (model + tokenizer) and warming it up.

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::decoder::Model;
use crate::serve::text::TextCodec;
use candle_core::DType;
use std::path::Path;
use std::sync::Arc;

/// A model ready to serve.
pub struct Loaded {
    pub model: Arc<Model>,
    pub codec: Arc<TextCodec>,
}

/// Loads from a local directory or an `hf://` source and runs one warm-up forward.
pub fn load(source: &str, dtype: DType) -> Result<Loaded> {
    let dir = crate::model::hub::resolve(source)?;
    load_dir(&dir, dtype)
}

pub fn load_dir(dir: &Path, dtype: DType) -> Result<Loaded> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let codec = TextCodec::load(dir, &cfg.eos_token_ids)?;
    let warm_token = cfg.bos_token_id.unwrap_or(0);
    let model = Model::load_dir(dir, cfg, dtype)?;
    // The first forward allocates and pages in weights; do it before reporting ready.
    let mut cache = model.new_cache();
    model.forward(&[warm_token], &mut cache)?;
    tracing::info!(
        dir = %dir.display(),
        arch = ?model.config().arch,
        layers = model.config().num_hidden_layers,
        experts = model.config().num_experts,
        ?dtype,
        "model loaded"
    );
    Ok(Loaded {
        model: Arc::new(model),
        codec: Arc::new(codec),
    })
}
