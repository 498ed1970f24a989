//! The SFT data pipeline: a JSONL file in, training rows out.
//!
//! Each non-blank line is one sample, in one of four shapes (HF/TRL conventions):
//!
//! | line | tokens | supervised |
//! |---|---|---|
//! | `{"messages": [{"role", "content"}..]}` | chat template, no extra specials | the text each assistant message adds |
//! | `{"prompt", "completion"}` | `prompt + completion` with specials, + EOS | completion and EOS |
//! | `{"text"}` | with specials, + EOS | all |
//! | `{"input_ids", "labels"?}` | as given | `labels`, else all |
//!
//! `train_on_prompt` supervises every token (except given `labels`). Samples are cut to
//! `max_seq_len`, shifted to next-token targets and, with `packing`, packed first-fit into
//! rows of `max_seq_len` with positions restarting per sample.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # use tidemill_trainer as trainer;
//! use std::path::Path;
//! use trainer::data::{load_dataset, needs_tokenizer, DataOptions, TextTokenizer};
//!
//! let path = Path::new("data/train.jsonl");
//! let tokenizer = match needs_tokenizer(path)? {
//!     true => Some(TextTokenizer::load(Path::new("models/qwen2-0.5b"))?),
//!     false => None,
//! };
//! let opts = DataOptions { max_seq_len: 2048, ..Default::default() };
//! let (rows, audit) = load_dataset(path, tokenizer.as_ref(), &opts)?;
//! println!("{audit}");
//! # Ok(()) }
//! ```

mod audit;
mod error;
mod jsonl;
mod order;
mod pack;
mod template;
mod tokenize;
mod tokenizer;

#[cfg(test)]
mod fixtures;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use audit::{drop_unsupervised, DataAudit};
pub use error::{DataError, SampleError};
pub use jsonl::{parse_line, read_jsonl, visit_jsonl, RawSample, IGNORE_INDEX};
pub use order::{epoch_order, Epochs};
pub use pack::{build_rows, collate, Batch, Row, PAD_SEGMENT};
pub use template::{ChatTemplate, TemplateTokens};
pub use tokenize::{tokenize_sample, Sample};
pub use tokenizer::{Encoding, TextTokenizer};

/// Which data, and how it becomes rows (the job file's `[data]` section). Every default
/// is declared in [`Default`]; serde fills a missing key from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataOptions {
    /// Training JSONL (needed by `launch train`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<PathBuf>,
    /// Evaluation JSONL (needed by `launch eval`; with `train`, evaluated every
    /// `training.eval_every` steps and at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<PathBuf>,
    /// Longest row in tokens; longer samples keep their first `max_seq_len` tokens (and are
    /// counted in the audit).
    pub max_seq_len: usize,
    /// Pack several samples per row (attention stays within each sample).
    pub packing: bool,
    /// Supervise prompt tokens too, not only the answers.
    pub train_on_prompt: bool,
    /// Drop samples with no supervised token instead of failing.
    pub allow_empty_samples: bool,
    /// Shuffle rows every epoch (deterministically from `training.seed`).
    pub shuffle: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            train: None,
            eval: None,
            max_seq_len: 2048,
            packing: true,
            train_on_prompt: false,
            allow_empty_samples: false,
            shuffle: true,
        }
    }
}

/// Reads, tokenizes, checks and packs `path`. `tokenizer` is needed unless every line is
/// pre-tokenized (see [`needs_tokenizer`]).
pub fn load_dataset(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    opts: &DataOptions,
) -> Result<(Vec<Row>, DataAudit), DataError> {
    if opts.max_seq_len == 0 {
        return Err(DataError::Option {
            key: "max_seq_len",
            message: "must be at least 1".into(),
        });
    }
    let raw = read_jsonl(path)?;
    let mut truncated = 0;
    let mut samples = Vec::with_capacity(raw.len());
    for (line, raw) in &raw {
        let mut sample =
            tokenize_sample(raw, tokenizer, opts.train_on_prompt).map_err(|source| {
                DataError::Sample {
                    path: path.to_path_buf(),
                    line: *line,
                    source,
                }
            })?;
        if sample.truncate(opts.max_seq_len) {
            truncated += 1;
        }
        samples.push((*line, sample));
    }
    drop(raw);
    let (samples, zero_supervised) = drop_unsupervised(path, samples, opts.allow_empty_samples)?;
    if samples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let rows = build_rows(&samples, opts.max_seq_len, opts.packing);
    let audit = DataAudit::new(path, &samples, &rows, truncated, zero_supervised);
    tracing::debug!(target: "tidemill::data", "{audit}");
    Ok((rows, audit))
}

/// True if some line of `path` is not pre-tokenized, so a tokenizer must be loaded. Stops
/// at the first such line; a fully pre-tokenized file is read (and checked) to the end.
pub fn needs_tokenizer(path: &Path) -> Result<bool, DataError> {
    let mut needs = false;
    visit_jsonl(path, |_, raw| {
        needs = !matches!(raw, RawSample::Tokens { .. });
        !needs
    })?;
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::fixtures::{self, *};
    use super::*;
    use serde_json::json;

    fn opts(max_seq_len: usize, packing: bool) -> DataOptions {
        DataOptions {
            max_seq_len,
            packing,
            ..Default::default()
        }
    }

    #[test]
    fn end_to_end_rows_and_audit() {
        let dir = fixtures::model_dir(CHATML);
        let tok = TextTokenizer::load(dir.path()).expect("load");
        let path = fixtures::jsonl(
            dir.path(),
            &[
                json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
                json!({"prompt": "how are you", "completion": " fine"}),
                json!({"input_ids": [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]}),
            ],
        );
        assert!(needs_tokenizer(&path).expect("scan"));
        let (rows, audit) = load_dataset(&path, Some(&tok), &opts(8, true)).expect("load");
        // messages: <s> <|im_start|> user hi <|im_end|> <|im_start|> assistant hello <|im_end|> = 9 -> cut to 8
        // prompt/completion: <s> how are you fine </s> = 6; tokens: 10 -> 8
        assert_eq!(audit.truncated, 2);
        assert_eq!((audit.samples, audit.tokens, audit.rows), (3, 22, 3));
        // supervised targets: "hello" (the cut <|im_end|> is gone), "fine", "</s>", 7 of the ids
        assert_eq!(audit.supervised_tokens, 1 + 2 + 7);
        assert_eq!(
            rows[0].tokens,
            vec![BOS, IM_START, USER, HI, IM_END, IM_START, ASSISTANT, HELLO]
        );
        assert_eq!(
            rows[0].targets,
            [vec![-100; 6], vec![HELLO as i64, -100]].concat()
        );
        assert_eq!(rows[1].tokens, vec![BOS, HOW, ARE, YOU, FINE, EOS]);
        assert_eq!(
            rows[1].targets,
            vec![-100, -100, -100, FINE as i64, EOS as i64, -100]
        );
    }

    #[test]
    fn pre_tokenized_needs_no_tokenizer_but_text_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fixtures::jsonl(
            dir.path(),
            &[
                json!({"input_ids": [1, 2, 3]}),
                json!({"input_ids": [4, 5], "labels": [-100, 5]}),
            ],
        );
        assert!(!needs_tokenizer(&path).expect("scan"));
        let (rows, audit) = load_dataset(&path, None, &opts(16, true)).expect("load");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].targets, vec![2, 3, -100, 5, -100]);
        assert_eq!(rows[0].positions, vec![0, 1, 2, 0, 1]);
        assert_eq!(rows[0].segments, vec![0, 0, 0, 1, 1]);
        assert_eq!((audit.supervised_tokens, audit.max_token_id), (3, 5));

        let path = fixtures::jsonl(
            dir.path(),
            &[json!({"input_ids": [1, 2]}), json!({"text": "hi"})],
        );
        let err = load_dataset(&path, None, &opts(16, true))
            .expect_err("needs tokenizer")
            .to_string();
        assert!(
            err.contains("train.jsonl:2: ") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn sample_errors_name_the_line() {
        let dir = fixtures::model_dir(CHATML);
        let tok = TextTokenizer::load(dir.path()).expect("load");
        let path = fixtures::jsonl(
            dir.path(),
            &[
                json!({"text": "hi"}),
                json!({"messages": [{"role": "robot", "content": "x"}]}),
            ],
        );
        let err = load_dataset(&path, Some(&tok), &opts(16, false))
            .expect_err("bad role")
            .to_string();
        assert!(
            err.contains("train.jsonl:2: chat template: ") && err.contains("Unknown role: robot"),
            "{err}"
        );
    }

    #[test]
    fn unsupervised_samples_fail_unless_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fixtures::jsonl(
            dir.path(),
            &[
                json!({"input_ids": [1, 2]}),
                json!({"input_ids": [1, 2], "labels": [1, -100]}),
            ],
        );
        let err = load_dataset(&path, None, &opts(16, false)).expect_err("unsupervised");
        assert!(
            matches!(&err, DataError::NoSupervisedTokens { count: 1, first_lines, .. } if first_lines == &[2]),
            "{err}"
        );
        let mut o = opts(16, false);
        o.allow_empty_samples = true;
        let (rows, audit) = load_dataset(&path, None, &o).expect("allowed");
        assert_eq!((rows.len(), audit.zero_supervised.clone()), (1, vec![2]));
        let path = fixtures::jsonl(dir.path(), &[json!({"input_ids": [1], "labels": [1]})]);
        let err = load_dataset(&path, None, &o)
            .expect_err("nothing left")
            .to_string();
        assert!(err.ends_with("the dataset has no samples"), "{err}");
        assert!(load_dataset(&path, None, &opts(0, false)).is_err());
    }
}
