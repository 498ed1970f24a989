//! How to train (the job file's `[training]` section): batch sizes, optimizer, schedule,
//! clipping, seed. One type for the library and the job file; every default is declared
//! here, in [`Default`], and serde fills a missing key from it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::LrSchedule;

/// How to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Optimizer steps to take.
    pub max_steps: u64,
    /// Rows (packed or single samples) per optimizer step.
    pub global_batch: usize,
    /// Rows per forward/backward pass; `global_batch / micro_batch` passes (over all data
    /// ranks) are accumulated.
    pub micro_batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// The curve after warm-up, as in transformers.
    pub schedule: LrSchedule,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient L2 norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Seeds data order, LoRA init and dropout.
    pub seed: u64,
    /// Evaluate every N steps (0: only at the end), where there is evaluation data.
    pub eval_every: u64,
    /// Mixture of experts: each expert takes at most this multiple of an even share of a
    /// micro-batch's routed tokens, the most probable first; the rest are dropped (Megatron's
    /// `--moe-expert-capacity-factor`). Unset: no token is ever dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_capacity_factor: Option<f64>,
    /// Keep only each decoder layer's input through the forward pass and run the layer
    /// again in the backward pass (Megatron's full recomputation, `--recompute-granularity
    /// full --recompute-method uniform --recompute-num-layers 1`): the activations of one
    /// layer at a time, for a second forward pass's compute.
    pub recompute: bool,
}

impl Default for TrainOptions {
    /// PyTorch's AdamW (betas 0.9/0.999, eps 1e-8), transformers' linear schedule.
    fn default() -> Self {
        Self {
            max_steps: 100,
            global_batch: 8,
            micro_batch: 1,
            lr: 2e-4,
            schedule: LrSchedule::Linear,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            moe_capacity_factor: None,
            recompute: false,
        }
    }
}

impl TrainOptions {
    /// The checks that need no data and no model, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(Error::Training {
                key: key.into(),
                message,
            })
        };
        if self.micro_batch == 0 {
            return bad("micro_batch", "must be at least 1".into());
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.micro_batch) {
            return bad(
                "global_batch",
                format!(
                    "{} must be a positive multiple of micro_batch {}",
                    self.global_batch, self.micro_batch
                ),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("{} must be positive (0: no clipping)", self.max_grad_norm),
            );
        }
        for (key, v, ok) in [
            (
                "adam_beta1",
                self.adam_beta1,
                (0.0..1.0).contains(&self.adam_beta1),
            ),
            (
                "adam_beta2",
                self.adam_beta2,
                (0.0..1.0).contains(&self.adam_beta2),
            ),
            ("adam_eps", self.adam_eps, self.adam_eps > 0.0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0),
        ] {
            if !ok {
                return bad(key, format!("{v} is out of range"));
            }
        }
        if let Some(f) = self.moe_capacity_factor {
            if !(f.is_finite() && f > 0.0) {
                return bad(
                    "moe_capacity_factor",
                    format!("{f} must be a positive number"),
                );
            }
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.schedule
            .lr_at(self.lr, self.warmup_steps, self.max_steps, step)
    }

    /// The global gradient norm to clip to, if any.
    pub fn clip(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }

    pub(crate) fn optimizer<B, M>(
        &self,
    ) -> burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, M, B>
    where
        B: burn::tensor::backend::AutodiffBackend,
        M: burn::module::AutodiffModule<B>,
    {
        crate::optim::adamw(
            self.adam_beta1,
            self.adam_beta2,
            self.adam_eps,
            self.weight_decay,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_section_is_the_default_and_unknown_keys_are_named() {
        let empty: TrainOptions = toml::from_str("").expect("empty");
        assert_eq!(empty, TrainOptions::default());
        let err = toml::from_str::<TrainOptions>("learning_rate = 1.0").expect_err("unknown");
        assert!(err.to_string().contains("learning_rate"), "{err}");
        let err = toml::from_str::<TrainOptions>("schedule = \"step\"").expect_err("enum");
        let text = err.to_string();
        assert!(
            text.contains("step") && text.contains("constant") && text.contains("cosine"),
            "{text}"
        );
    }
}
