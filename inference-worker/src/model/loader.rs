//! Loading a checkpoint (model + tokenizer) and warming it up.

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::decoder::Model;
use crate::model::gguf::{self, GgufFile};
use crate::model::moe::ExpertPlacement;
use crate::serve::text::TextCodec;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model ready to serve.
pub struct Loaded {
    pub model: Arc<Model>,
    pub codec: Arc<TextCodec>,
}

/// Loads from a local directory or an `hf://` source and runs one warm-up forward.
pub fn load(source: &str, dtype: DType, device: &Device) -> Result<Loaded> {
    let dir = crate::model::hub::resolve(source)?;
    load_dir_on(&dir, dtype, device)
}

/// The GGUF file `path` names: the file itself, or the only `*.gguf` in a directory
/// without a `config.json`.
pub fn gguf_path(path: &Path) -> Result<Option<PathBuf>> {
    if path.extension().is_some_and(|x| x == "gguf") && path.is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    if path.is_dir() && !path.join("config.json").exists() {
        return gguf::find_in_dir(path);
    }
    Ok(None)
}

/// The GGUF file `path` names, opened (header and metadata only), or None for a
/// safetensors checkpoint.
pub fn open_gguf(path: &Path) -> Result<Option<Arc<GgufFile>>> {
    match gguf_path(path)? {
        Some(p) => Ok(Some(Arc::new(GgufFile::open(&p)?))),
        None => Ok(None),
    }
}

/// Loads a checkpoint directory, or a GGUF file (or a directory holding one).
pub fn load_dir(dir: &Path, dtype: DType) -> Result<Loaded> {
    load_dir_on(dir, dtype, &Device::Cpu)
}

/// As [`load_dir`], the model on `device`.
pub fn load_dir_on(dir: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    if let Some(path) = gguf_path(dir)? {
        return load_gguf_on(&path, device);
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let codec = TextCodec::load(dir, &cfg.eos_token_ids)?;
    let model = Model::load_dir_on(dir, cfg, dtype, ExpertPlacement::Local, device)?;
    warm(model, codec, dir)
}

/// A GGUF file: weights stay quantized; the tokenizer is the `tokenizer.json` beside
/// it when there is one, else rebuilt from the file's metadata.
pub fn load_gguf(path: &Path) -> Result<Loaded> {
    load_gguf_on(path, &Device::Cpu)
}

/// As [`load_gguf`], the model on `device`.
pub fn load_gguf_on(path: &Path, device: &Device) -> Result<Loaded> {
    let file = Arc::new(GgufFile::open(path)?);
    let codec = gguf_codec(&file, &file.config()?)?;
    let model = Model::load_gguf_on(file, ExpertPlacement::Local, device)?;
    warm(model, codec, path)
}

/// A GGUF model's text codec: the `tokenizer.json` beside the file when there is one, else
/// the vocabulary in its metadata.
pub fn gguf_codec(file: &GgufFile, cfg: &ModelConfig) -> Result<TextCodec> {
    let beside = file.path().parent().unwrap_or(Path::new("."));
    if beside.join("tokenizer.json").exists() {
        return TextCodec::load(beside, &cfg.eos_token_ids);
    }
    let v = crate::model::gguf_vocab::vocab(file)?;
    TextCodec::from_parts(
        v.tokenizer,
        v.chat_template,
        v.bos_token,
        v.eos_token,
        &cfg.eos_token_ids,
    )
}

fn warm(model: Model, codec: TextCodec, dir: &Path) -> Result<Loaded> {
    let warm_token = model.config().bos_token_id.unwrap_or(0);
    // The first forward allocates and pages in weights; do it before reporting ready.
    let mut cache = model.new_cache();
    model.forward(&[warm_token], &mut cache)?;
    tracing::info!(
        dir = %dir.display(),
        arch = ?model.config().arch,
        layers = model.config().num_hidden_layers,
        experts = model.config().num_experts,
        dtype = ?model.dtype(),
        device = %crate::model::device::name(model.device()),
        "model loaded"
    );
    Ok(Loaded {
        model: Arc::new(model),
        codec: Arc::new(codec),
    })
}
