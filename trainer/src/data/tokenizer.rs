//! A model's text tokenizer: `tokenizer.json` (HF tokenizers) plus the parts of
//! `tokenizer_config.json` that matter for SFT — special tokens, `add_bos_token` /
//! `add_eos_token`, and the chat template.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{DataError, SampleError};
use super::template::{ChatTemplate, TemplateTokens};

/// Token ids of a text, with the byte range of `text` each token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    /// Byte offsets `[start, end)` into the encoded text; `(0, 0)` for special tokens the
    /// tokenizer added (BOS/EOS from the post-processor).
    pub offsets: Vec<(usize, usize)>,
}

/// `tokenizer.json` + `tokenizer_config.json` of a model directory.
#[derive(Debug)]
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// `(add_bos_token, add_eos_token)` when tokenizer_config.json sets either; then they
    /// replace the post-processor's special tokens, as transformers' Llama/Gemma tokenizers do.
    explicit_special: Option<(bool, bool)>,
    /// The compiled chat template, or why there is none.
    template: Result<ChatTemplate, String>,
}

impl TextTokenizer {
    /// Loads `model_dir/tokenizer.json` (required) and `model_dir/tokenizer_config.json`
    /// (optional). The chat template is taken from `chat_template.jinja`, else
    /// `tokenizer_config.json`, else `chat_template.json`.
    pub fn load(model_dir: &Path) -> Result<Self, DataError> {
        let tok_path = model_dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(DataError::Tokenizer {
                path: tok_path,
                message: "file not found".into(),
            });
        }
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| DataError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        // transformers ignores the truncation/padding stored in tokenizer.json.
        tokenizer
            .with_truncation(None)
            .map_err(|e| DataError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);

        let cfg_path = model_dir.join("tokenizer_config.json");
        let cfg = match read_json(&cfg_path)? {
            Some(Value::Object(map)) => map,
            Some(_) => return Err(config_err(&cfg_path, "expected a JSON object")),
            None => serde_json::Map::new(),
        };
        let token = |key: &str| -> Result<Option<String>, DataError> {
            match cfg.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(config_err(
                        &cfg_path,
                        &format!("`{key}.content`: expected a string"),
                    )),
                },
                Some(_) => Err(config_err(
                    &cfg_path,
                    &format!("`{key}`: expected a string or {{\"content\": ..}}"),
                )),
            }
        };
        let flag = |key: &str| -> Result<Option<bool>, DataError> {
            match cfg.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(config_err(
                    &cfg_path,
                    &format!("`{key}`: expected true or false"),
                )),
            }
        };
        let tokens = TemplateTokens {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            unk_token: token("unk_token")?,
        };
        let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
        let explicit_special = match (add_bos, add_eos) {
            (None, None) => None,
            (bos, eos) => Some((bos.unwrap_or(true), eos.unwrap_or(false))),
        };
        let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let bos_id = id_of(&tokens.bos_token);
        let eos_id = id_of(&tokens.eos_token);

        let template = match find_template(model_dir, &cfg_path, cfg.get("chat_template"))? {
            Ok((path, source)) => ChatTemplate::new(&source, tokens)
                .map_err(|e| format!("{}: syntax error: {e}", path.display())),
            Err(why) => Err(why),
        };
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            explicit_special,
            template,
        })
    }

    /// Encodes `text`. With `add_special_tokens` the tokenizer adds its BOS/EOS (per
    /// `add_bos_token`/`add_eos_token` when tokenizer_config.json sets them, else per
    /// tokenizer.json's post-processor). Special tokens written in the text itself
    /// (`<|im_end|>`…) are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding, SampleError> {
        let post_processor_specials = add_special_tokens && self.explicit_special.is_none();
        let enc = self
            .tokenizer
            .encode(text, post_processor_specials)
            .map_err(|e| SampleError::Tokenize(e.to_string()))?;
        let mut out = Encoding {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        };
        if let (true, Some((add_bos, add_eos))) = (add_special_tokens, self.explicit_special) {
            if let (true, Some(bos)) = (add_bos, self.bos_id) {
                out.ids.insert(0, bos);
                out.offsets.insert(0, (0, 0));
            }
            if let (true, Some(eos)) = (add_eos, self.eos_id) {
                out.ids.push(eos);
                out.offsets.push((0, 0));
            }
        }
        Ok(out)
    }

    /// Id of `bos_token` from tokenizer_config.json, if it names a known token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Id of `eos_token` from tokenizer_config.json, if it names a known token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Number of ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The chat template, or why there is none usable.
    pub fn chat_template(&self) -> Result<&ChatTemplate, SampleError> {
        self.template
            .as_ref()
            .map_err(|why| SampleError::NoChatTemplate(why.clone()))
    }
}

fn config_err(path: &Path, message: &str) -> DataError {
    DataError::TokenizerConfig {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Reads a JSON file that may be absent.
fn read_json(path: &Path) -> Result<Option<Value>, DataError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| config_err(path, &format!("invalid JSON: {e}")))
}

/// Finds the chat template source. The outer error is a broken file; the inner one says
/// why the model has no template (only an error if the dataset needs one).
fn find_template(
    model_dir: &Path,
    cfg_path: &Path,
    in_config: Option<&Value>,
) -> Result<Result<(PathBuf, String), String>, DataError> {
    let jinja = model_dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok(Ok((jinja, source))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DataError::Io {
                path: jinja,
                source,
            })
        }
    }
    if let Some(found) = template_value(cfg_path, in_config)? {
        return Ok(found.map(|source| (cfg_path.to_path_buf(), source)));
    }
    let json_path = model_dir.join("chat_template.json");
    if let Some(Value::Object(map)) = read_json(&json_path)? {
        if let Some(found) = template_value(&json_path, map.get("chat_template"))? {
            return Ok(found.map(|source| (json_path, source)));
        }
    }
    Ok(Err(format!(
        "{} has no `chat_template` (nor is there chat_template.jinja)",
        cfg_path.display()
    )))
}

/// `chat_template` is a string or a list of `{name, template}` of which "default" is used.
fn template_value(
    path: &Path,
    value: Option<&Value>,
) -> Result<Option<Result<String, String>>, DataError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Ok(s.clone()))),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(config_err(
                        path,
                        "`chat_template` entries must be {\"name\": .., \"template\": ..}",
                    ));
                };
                if name == "default" {
                    return Ok(Some(Ok(template.to_string())));
                }
                names.push(name.to_string());
            }
            Ok(Some(Err(format!(
                "{}: `chat_template` has templates {names:?} but none named \"default\"",
                path.display()
            ))))
        }
        Some(_) => Err(config_err(
            path,
            "`chat_template`: expected a string or a list of {name, template}",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures;
    use super::*;
    use serde_json::json;

    #[test]
    fn loads_specials_and_encodes_with_offsets() {
        let dir = fixtures::model_dir(fixtures::CHATML);
        let tok = TextTokenizer::load(dir.path()).expect("load");
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
        let enc = tok.encode("hello there", true).expect("encode");
        assert_eq!(enc.ids, vec![1, fixtures::HELLO, fixtures::THERE]);
        assert_eq!(enc.offsets, vec![(0, 0), (0, 5), (6, 11)]);
        let enc = tok.encode("hello<|im_end|>", false).expect("encode");
        assert_eq!(enc.ids, vec![fixtures::HELLO, fixtures::IM_END]);
        assert_eq!(enc.offsets, vec![(0, 5), (5, 15)]);
        assert_eq!(
            tok.encode("zebra", false).expect("encode").ids,
            vec![fixtures::UNK]
        );
    }

    #[test]
    fn add_bos_and_eos_flags_override_post_processor() {
        let dir = fixtures::model_dir(fixtures::CHATML);
        let cfg = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                         "add_bos_token": false, "add_eos_token": true, "chat_template": "x"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).expect("write");
        let tok = TextTokenizer::load(dir.path()).expect("load");
        assert_eq!(
            tok.encode("hello", true).expect("encode").ids,
            vec![fixtures::HELLO, 2]
        );
    }

    #[test]
    fn template_sources_and_missing_files() {
        let dir = fixtures::model_dir(fixtures::CHATML);
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "J{{ messages|length }}",
        )
        .expect("write");
        let tok = TextTokenizer::load(dir.path()).expect("load");
        let t = tok.chat_template().expect("template");
        assert_eq!(
            t.render(&[json!({"role": "user"})], false).expect("render"),
            "J1"
        );

        let cfg = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        std::fs::remove_file(dir.path().join("chat_template.jinja")).expect("rm");
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).expect("write");
        let tok = TextTokenizer::load(dir.path()).expect("load");
        assert_eq!(
            tok.chat_template()
                .expect("t")
                .render(&[], false)
                .expect("render"),
            "D"
        );
        assert_eq!(tok.eos_id(), None);

        std::fs::remove_file(dir.path().join("tokenizer_config.json")).expect("rm");
        let tok = TextTokenizer::load(dir.path()).expect("load without config");
        let err = tok.chat_template().expect_err("no template").to_string();
        assert!(err.contains("has no `chat_template`"), "{err}");

        std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
        let err = TextTokenizer::load(dir.path())
            .expect_err("no tokenizer")
            .to_string();
        assert!(
            err.contains("tokenizer.json: cannot load tokenizer: file not found"),
            "{err}"
        );
    }
}
