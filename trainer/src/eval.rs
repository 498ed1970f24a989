//! Evaluation: mean token loss over a set of rows, `micro_batch` rows at a time.

use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;

use crate::collective::ParallelBackend;
use crate::collective::TrainBackend;
use crate::data::{collate, Batch, Row};
use crate::error::{Error, Result};
use crate::loss::supervised;
use crate::model::{CausalLm, Inputs};

/// Host-side view of a batch for [`CausalLm::forward`].
pub fn inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        batch: batch.batch,
        seq: batch.seq,
        tokens: &batch.tokens,
        positions: &batch.positions,
        segments: &batch.segments,
        dropout_seed: None,
    }
}

/// Every token and target id must be inside the vocabulary.
pub fn check_vocab(rows: &[Row], vocab: usize) -> Result<()> {
    for (r, row) in rows.iter().enumerate() {
        let bad_token = row
            .tokens
            .iter()
            .find(|&&t| t as usize >= vocab)
            .map(|&t| i64::from(t));
        let bad_target = row
            .targets
            .iter()
            .find(|&&t| t != crate::loss::IGNORE && (t < 0 || t as usize >= vocab));
        if let Some(id) = bad_token.or(bad_target.copied()) {
            return Err(Error::Training {
                key: "data".into(),
                message: format!(
                    "row {r}: token id {id} is outside the model's vocabulary of {vocab}"
                ),
            });
        }
    }
    Ok(())
}

/// Mean token loss of a model over a set of rows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub tokens: usize,
}

/// Mean cross-entropy over all supervised tokens of `rows`, `micro_batch` rows at a time.
pub fn evaluate<B: ParallelBackend>(
    model: &CausalLm<B>,
    rows: &[Row],
    micro_batch: usize,
) -> Result<EvalResult> {
    check_vocab(rows, model.config.vocab_size)?;
    let mut sum = 0.0;
    let mut tokens = 0;
    for chunk in rows.chunks(micro_batch.max(1)) {
        let batch = collate(&chunk.iter().collect::<Vec<_>>());
        sum += model
            .loss(&inputs(&batch), &batch.targets, 1.0, false)
            .into_scalar()
            .elem::<f64>();
        tokens += supervised(&batch.targets);
        model.check_collectives()?;
    }
    Ok(EvalResult {
        loss: if tokens == 0 {
            0.0
        } else {
            sum / tokens as f64
        },
        tokens,
    })
}

/// [`evaluate`] on the inner (non-autodiff) backend of a training model.
pub fn evaluate_trained<B: TrainBackend>(
    model: &CausalLm<B>,
    rows: &[Row],
    micro_batch: usize,
) -> Result<EvalResult> {
    evaluate(&model.valid(), rows, micro_batch)
}
