//! Tokenizer, chat template and incremental detokenisation.

use crate::error::{Error, Result};
use crate::serve::stop::StopMatcher;
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;

/// One chat message after validation.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Used when a checkpoint ships no chat template: ChatML, the most common format.
const DEFAULT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Added { content: String },
}

impl TokenField {
    fn content(self) -> String {
        match self {
            TokenField::Plain(s) | TokenField::Added { content: s } => s,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
}

/// The tokenizer plus what is needed to turn chat messages into a prompt.
pub struct TextCodec {
    tokenizer: Tokenizer,
    template: String,
    bos_token: String,
    eos_token: String,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
}

impl TextCodec {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: TokenizerConfig = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: cfg_path.clone(),
                source,
            })?
        } else {
            TokenizerConfig::default()
        };
        let template = match cfg.chat_template {
            Some(TemplateField::One(t)) => Some(t),
            Some(TemplateField::Named(list)) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template),
            None => None,
        };
        Self::from_parts(
            tokenizer,
            template,
            cfg.bos_token.map(TokenField::content).unwrap_or_default(),
            cfg.eos_token.map(TokenField::content).unwrap_or_default(),
            config_eos,
        )
    }

    /// A codec from its parts (e.g. a GGUF file's metadata); ChatML when `template`
    /// is None. Fails if the template does not compile.
    pub fn from_parts(
        tokenizer: Tokenizer,
        template: Option<String>,
        bos_token: String,
        eos_token: String,
        config_eos: &[u32],
    ) -> Result<Self> {
        let template = template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        let mut eos_ids = config_eos.to_vec();
        if let Some(id) = tokenizer.token_to_id(&eos_token)
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        let codec = Self {
            tokenizer,
            template,
            bos_token,
            eos_token,
            eos_ids,
        };
        // Fail at load, not on the first request, if the template does not compile.
        codec.render_chat(&[ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }])?;
        Ok(codec)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, true)?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.tokenizer.decode(ids, true)?)
    }

    /// Renders the chat template with `add_generation_prompt` set.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.template)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}

/// Turns a growing list of token ids into text deltas without splitting UTF-8
/// characters and while holding back text that may be the start of a stop sequence
/// (see [`StopMatcher`]).
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Window of ids re-decoded each step (TGI's scheme): decoding only the tail keeps
    /// each step O(1) while letting the tokenizer see enough context to join bytes.
    prefix_offset: usize,
    read_offset: usize,
    stop: StopMatcher,
}

/// What happened after pushing a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Text that is safe to send now (maybe empty).
    Delta(String),
    /// A stop sequence matched: the final text to send; generation ends.
    Stopped(String),
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            ids: vec![],
            prefix_offset: 0,
            read_offset: 0,
            stop: StopMatcher::new(stop, String::new()),
        }
    }

    /// The full text generated so far (up to a stop sequence if one matched).
    pub fn text(&self) -> &str {
        self.stop.text()
    }

    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<Push> {
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let current = codec.decode(&self.ids[self.prefix_offset..])?;
        // An incomplete multi-byte character decodes to U+FFFD: wait for more tokens.
        if current.ends_with('\u{FFFD}') {
            return Ok(Push::Delta(String::new()));
        }
        let new = current.get(prefix.len()..).unwrap_or_default();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(match self.stop.push(new) {
            (delta, true) => Push::Stopped(delta),
            (delta, false) => Push::Delta(delta),
        })
    }

    /// Text held back so far; sent when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        self.stop.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> (tempfile::TempDir, TextCodec) {
        let dir = tempfile::tempdir().unwrap();
        crate::model::fixture::build_tokenizer()
            .unwrap()
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        let codec = TextCodec::load(dir.path(), &[]).unwrap();
        (dir, codec)
    }

    /// Pushes `text` one byte-token at a time; returns the concatenated deltas and
    /// whether a stop sequence fired.
    fn run(codec: &TextCodec, text: &str, stop: &[&str]) -> (String, bool, Detokenizer) {
        let mut d = Detokenizer::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for b in text.bytes() {
            match d.push(codec, u32::from(b)).unwrap() {
                Push::Delta(s) => {
                    // Never emits a broken character or a prefix of a stop string.
                    assert!(!s.contains('\u{FFFD}'));
                    out.push_str(&s);
                }
                Push::Stopped(s) => {
                    out.push_str(&s);
                    return (out, true, d);
                }
            }
        }
        (out, false, d)
    }

    #[test]
    fn stop_sequences_split_over_tokens_cut_the_text() {
        let (_dir, codec) = codec();
        let (out, stopped, d) = run(&codec, "héllo world", &["wor"]);
        assert!(stopped);
        assert_eq!(out, "héllo ");
        assert_eq!(d.text(), "héllo ");
    }

    #[test]
    fn held_back_prefixes_are_flushed_and_utf8_is_never_split() {
        let (_dir, codec) = codec();
        let (mut out, stopped, mut d) = run(&codec, "naïve 你好 wo", &["wor"]);
        assert!(!stopped);
        assert_eq!(
            out, "naïve 你好 ",
            "the possible stop prefix `wo` is held back"
        );
        out.push_str(&d.flush());
        assert_eq!(out, "naïve 你好 wo");
    }

    #[test]
    fn chat_template_renders_chatml_by_default() {
        let (_dir, codec) = codec();
        let p = codec
            .render_chat(&[ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }])
            .unwrap();
        assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }
}
