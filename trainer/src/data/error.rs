//! Errors of the data pipeline: whole-file problems in [`DataError`], problems of one
//! dataset line in [`SampleError`] (wrapped with the file and line number).

use std::path::PathBuf;

/// Everything that can go wrong while reading, tokenizing and packing a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.json` is missing or cannot be parsed by the tokenizers crate.
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// `tokenizer_config.json` (or `chat_template.jinja`/`.json`) is not what we expect.
    #[error("{path}: {message}")]
    TokenizerConfig { path: PathBuf, message: String },
    /// One line of the dataset is wrong.
    #[error("{path}:{line}: {source}")]
    Sample {
        path: PathBuf,
        /// 1-based line number in the JSONL file.
        line: usize,
        #[source]
        source: SampleError,
    },
    /// Samples that train nothing: every label is -100 (after truncation).
    #[error(
        "{path}: {count} sample(s) have no supervised token (lines {}{}); fix them, raise \
         max_seq_len, or set allow_empty_samples to drop them",
        join_lines(.first_lines),
        if *.count > .first_lines.len() { ", …" } else { "" }
    )]
    NoSupervisedTokens {
        path: PathBuf,
        count: usize,
        /// The first few offending line numbers.
        first_lines: Vec<usize>,
    },
    /// The file holds no usable sample.
    #[error("{path}: the dataset has no samples")]
    Empty { path: PathBuf },
    /// A data option out of range.
    #[error("data option `{key}`: {message}")]
    Option { key: &'static str, message: String },
}

/// What is wrong with one sample (one JSONL line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// The line is not valid JSON (or not UTF-8).
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The line is JSON but not of a known sample shape.
    #[error("expected one of messages, prompt/completion, text, input_ids")]
    UnknownFormat,
    /// One of a pair of keys is present without the other.
    #[error("has `{present}` but no `{missing}`")]
    MissingKey {
        present: &'static str,
        missing: &'static str,
    },
    /// A key holds a value of the wrong type.
    #[error("`{key}`: expected {expected}")]
    WrongType { key: String, expected: &'static str },
    /// `labels` and `input_ids` differ in length.
    #[error("`labels` has {labels} entries but `input_ids` has {input_ids}")]
    LabelsLength { input_ids: usize, labels: usize },
    /// An entry of `input_ids` that is not a token id.
    #[error("`input_ids[{index}]` = {value} is not a token id (an integer in 0..=4294967295)")]
    BadTokenId { index: usize, value: String },
    /// An entry of `labels` that is neither -100 nor a token id.
    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    OutsideVocabulary { id: u32, vocab: usize },
    #[error("`labels[{index}]` = {value}: expected -100 or a token id")]
    BadLabel { index: usize, value: String },
    /// The sample is text but no tokenizer was given.
    #[error("this sample is text, so a tokenizer is needed: the model directory must hold tokenizer.json")]
    NeedsTokenizer,
    /// A `messages` sample but the tokenizer has no usable chat template.
    #[error("messages need a chat template: {0}")]
    NoChatTemplate(String),
    /// Rendering the chat template failed (including `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// Rendering a conversation prefix is not a prefix of the whole rendering, so the
    /// assistant turns cannot be located.
    #[error(
        "chat template is not prefix-stable at message {turn}: rendering the first {turn} \
         messages{} is not a prefix of rendering more of them, so assistant turns cannot be \
         located",
        if *.with_generation_prompt { " with add_generation_prompt" } else { "" }
    )]
    NotPrefix {
        turn: usize,
        with_generation_prompt: bool,
    },
    /// The tokenizers crate failed on the text.
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

fn join_lines(lines: &[usize]) -> String {
    let parts: Vec<String> = lines.iter().map(usize::to_string).collect();
    parts.join(", ")
}
