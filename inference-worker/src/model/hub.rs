//! Fetching `hf://org/name[@revision]` checkpoints from the Hugging Face Hub.

use crate::error::{Error, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};
use std::path::PathBuf;

/// Returns the local directory for `source`: `hf://` sources are downloaded (to the
/// Hub cache, honouring `HF_ENDPOINT`/`HF_HOME`/`HF_TOKEN`), anything else is a path.
pub fn resolve(source: &str) -> Result<PathBuf> {
    match source.strip_prefix("hf://") {
        Some(id) => fetch(source, id),
        None => Ok(PathBuf::from(source)),
    }
}

fn fetch(source: &str, id: &str) -> Result<PathBuf> {
    let hub_err = |message: String| Error::Hub {
        source_uri: source.to_string(),
        message,
    };
    let (repo_id, revision) = match id.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (id, "main"),
    };
    if repo_id.split('/').count() != 2 || repo_id.split('/').any(str::is_empty) {
        return Err(hub_err("expected hf://org/name[@revision]".into()));
    }
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_err(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let get = |name: &str| {
        repo.get(name).map_err(|e| {
            hub_err(format!(
                "downloading {name} from {endpoint} failed: {e} \
                 (is the Hub reachable? set HF_ENDPOINT for a mirror, or pass a local path)"
            ))
        })
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    // Optional: only carries the chat template.
    let _ = repo.get("tokenizer_config.json");
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index.clone(),
                    source,
                })?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                get(&f)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    config
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| hub_err("downloaded config.json has no parent directory".into()))
}
