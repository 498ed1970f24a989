//! Test fixtures: a tiny word-level `tokenizer.json` and a ChatML-like chat template.

use std::path::{Path, PathBuf};

use serde_json::json;

pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const IM_START: u32 = 3;
pub const IM_END: u32 = 4;
pub const SYSTEM: u32 = 5;
pub const USER: u32 = 6;
pub const ASSISTANT: u32 = 7;
pub const HELLO: u32 = 8;
pub const THERE: u32 = 9;
pub const HI: u32 = 10;
pub const HOW: u32 = 11;
pub const ARE: u32 = 12;
pub const YOU: u32 = 13;
pub const FINE: u32 = 14;
pub const THANKS: u32 = 15;
pub const BE: u32 = 16;
pub const BRIEF: u32 = 17;

const WORDS: [&str; 18] = [
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "hello",
    "there",
    "hi",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "be",
    "brief",
];

/// ChatML with a BOS, a role check through `raise_exception`, and a generation prompt.
pub const CHATML: &str = "{{ bos_token }}{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
";

/// A model directory holding tokenizer.json (word level, whitespace pre-tokenizer,
/// `<s>` prepended by the post-processor) and tokenizer_config.json with `template`.
pub fn model_dir(template: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let added: Vec<_> = WORDS[..5]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).expect("write");
    let config = json!({
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": false},
        "pad_token": null,
        "chat_template": template,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    dir
}

/// Writes `lines` to `dir/train.jsonl`.
pub fn jsonl(dir: &Path, lines: &[serde_json::Value]) -> PathBuf {
    let path = dir.join("train.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&path, text.join("\n")).expect("write");
    path
}
