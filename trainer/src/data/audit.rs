//! What a dataset turned into: counts to log before training, and the check that every
//! sample trains something.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::pack::Row;
use super::tokenize::Sample;

/// How many line numbers an error lists.
const SHOWN_LINES: usize = 5;

/// Summary of a loaded dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataAudit {
    pub file: PathBuf,
    /// Samples kept (in the rows).
    pub samples: usize,
    /// Tokens of the kept samples, after truncation.
    pub tokens: usize,
    /// Targets the loss sees (labels after the first position that are not -100).
    pub supervised_tokens: usize,
    /// Samples cut to max_seq_len (kept ones and dropped ones).
    pub truncated: usize,
    /// Line numbers of samples with no supervised target; dropped (only allowed with
    /// `allow_empty_samples`).
    pub zero_supervised: Vec<usize>,
    /// Training rows (fewer than samples when packing).
    pub rows: usize,
    /// Longest kept sample, in tokens.
    pub max_len: usize,
    /// Mean kept sample length, in tokens.
    pub mean_len: f64,
    /// Largest token id of the kept samples, to check against the model's vocabulary.
    pub max_token_id: u32,
}

impl DataAudit {
    pub fn new(
        file: &Path,
        samples: &[Sample],
        rows: &[Row],
        truncated: usize,
        zero_supervised: Vec<usize>,
    ) -> Self {
        let tokens: usize = samples.iter().map(Sample::len).sum();
        Self {
            file: file.to_path_buf(),
            samples: samples.len(),
            tokens,
            supervised_tokens: samples.iter().map(Sample::supervised_tokens).sum(),
            truncated,
            zero_supervised,
            rows: rows.len(),
            max_len: samples.iter().map(Sample::len).max().unwrap_or(0),
            mean_len: if samples.is_empty() {
                0.0
            } else {
                tokens as f64 / samples.len() as f64
            },
            max_token_id: samples
                .iter()
                .flat_map(|s| s.input_ids.iter().copied())
                .max()
                .unwrap_or(0),
        }
    }
}

impl fmt::Display for DataAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = if self.tokens == 0 {
            0.0
        } else {
            100.0 * self.supervised_tokens as f64 / self.tokens as f64
        };
        writeln!(
            f,
            "{}: {} samples in {} rows",
            self.file.display(),
            self.samples,
            self.rows
        )?;
        writeln!(
            f,
            "  tokens: {} ({} supervised, {share:.1}%), length mean {:.1} max {}",
            self.tokens, self.supervised_tokens, self.mean_len, self.max_len
        )?;
        write!(
            f,
            "  truncated: {}, dropped (nothing supervised): {}",
            self.truncated,
            self.zero_supervised.len()
        )
    }
}

/// Splits off samples with no supervised target. They are an error naming the first few
/// line numbers unless `allow_empty`, in which case they are dropped and their line
/// numbers returned.
pub fn drop_unsupervised(
    file: &Path,
    samples: Vec<(usize, Sample)>,
    allow_empty: bool,
) -> Result<(Vec<Sample>, Vec<usize>), DataError> {
    let (kept, empty): (Vec<_>, Vec<_>) = samples
        .into_iter()
        .partition(|(_, s)| s.supervised_tokens() > 0);
    let empty_lines: Vec<usize> = empty.into_iter().map(|(line, _)| line).collect();
    if !empty_lines.is_empty() && !allow_empty {
        return Err(DataError::NoSupervisedTokens {
            path: file.to_path_buf(),
            count: empty_lines.len(),
            first_lines: empty_lines.iter().take(SHOWN_LINES).copied().collect(),
        });
    }
    Ok((kept.into_iter().map(|(_, s)| s).collect(), empty_lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(labels: Vec<i64>) -> Sample {
        Sample {
            input_ids: (0..labels.len() as u32).collect(),
            labels,
        }
    }

    #[test]
    fn zero_supervised_is_an_error_listing_lines() {
        let file = Path::new("data/train.jsonl");
        // a label at position 0 alone trains nothing
        let samples: Vec<(usize, Sample)> = (1..=8)
            .map(|line| {
                (
                    line,
                    sample(if line == 4 { vec![0, 1] } else { vec![0, -100] }),
                )
            })
            .collect();
        let err = drop_unsupervised(file, samples.clone(), false).expect_err("empty");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "data/train.jsonl: 7 sample(s) have no supervised token (lines 1, 2, 3, 5, 6, …)"
            ),
            "{msg}"
        );
        let (kept, dropped) = drop_unsupervised(file, samples, true).expect("allowed");
        assert_eq!(kept, vec![sample(vec![0, 1])]);
        assert_eq!(dropped, vec![1, 2, 3, 5, 6, 7, 8]);
    }

    #[test]
    fn audit_counts_and_displays() {
        let samples = [sample(vec![-100, 1, 2]), sample(vec![-100, -100, 2, 3, 4])];
        let audit = DataAudit::new(Path::new("t.jsonl"), &samples, &[], 1, vec![9]);
        assert_eq!(
            (audit.samples, audit.tokens, audit.supervised_tokens),
            (2, 8, 5)
        );
        assert_eq!(
            (audit.max_len, audit.mean_len, audit.max_token_id),
            (5, 4.0, 4)
        );
        let text = audit.to_string();
        assert!(text.contains("8 (5 supervised, 62.5%)"), "{text}");
        assert!(
            text.contains("truncated: 1, dropped (nothing supervised): 1"),
            "{text}"
        );
        let json = serde_json::to_value(&audit).expect("serialize");
        assert_eq!(json["zero_supervised"], serde_json::json!([9]));
    }
}
