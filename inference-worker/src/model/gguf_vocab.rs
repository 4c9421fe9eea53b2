//! A GGUF file's tokenizer (`tokenizer.ggml.*` metadata) as a `tokenizers`
//! tokenizer, for files shipped without a `tokenizer.json` beside them.
//!
//! Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: SmolLM, Qwen, Llama 3)
//! are rebuilt with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
//! SentencePiece vocabularies (`llama`) need their `tokenizer.json`.

use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// llama.cpp's token types: 3 is a control token (special), 4 user-defined.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// What a chat codec needs from a GGUF file.
pub struct GgufVocab {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |pattern: &str| {
        json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
               "invert": false})
    };
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_SPLIT), byte_level(false)]}),
        "llama3" | "llama-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_SPLIT), byte_level(false)]}),
        _ => return None,
    })
}

pub fn vocab(file: &GgufFile) -> Result<GgufVocab> {
    let unsupported = |what: String| {
        Error::Unsupported(format!(
            "{}: {what}; put the model's tokenizer.json beside the GGUF file",
            file.path().display()
        ))
    };
    let model = file.string_of("tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(unsupported(format!(
            "tokenizer.ggml.model {model:?} (only byte-level BPE, gpt2, is rebuilt from metadata)"
        )));
    }
    let pre_name = file.string_of("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre = pre_tokenizer(pre_name)
        .ok_or_else(|| unsupported(format!("tokenizer.ggml.pre {pre_name:?}")))?;
    let tokens = file.strings_of("tokenizer.ggml.tokens")?;
    let merges = file.strings_of("tokenizer.ggml.merges")?;
    let types = file.ints_of("tokenizer.ggml.token_type")?;
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let ty = types.get(i).copied()?;
            (ty == CONTROL || ty == USER_DEFINED).then(|| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty == CONTROL})
            })
        })
        .collect();
    let id_of = |key: &str| -> Result<Option<(u32, String)>> {
        let Some(v) = file.metadata(key) else {
            return Ok(None);
        };
        let id = v
            .to_u32()
            .map_err(|e| unsupported(format!("metadata {key}: {e}")))?;
        let token = tokens
            .get(id as usize)
            .ok_or_else(|| unsupported(format!("{key} {id} is outside the vocabulary")))?;
        Ok(Some((id, token.to_string())))
    };
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let eos = id_of("tokenizer.ggml.eos_token_id")?;
    let add_bos = file
        .metadata("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let post_processor = match (&bos, add_bos) {
        (Some((id, token)), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": token, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": token, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {token: {"id": token, "ids": [id], "tokens": [token]}},
        }),
        _ => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true}),
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let tokenizer = Tokenizer::from_bytes(spec.to_string().as_bytes())
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.path().display())))?;
    Ok(GgufVocab {
        tokenizer,
        chat_template: file.string_of("tokenizer.chat_template")?.map(String::from),
        bos_token: bos.map(|(_, t)| t).unwrap_or_default(),
        eos_token: eos.map(|(_, t)| t).unwrap_or_default(),
    })
}
