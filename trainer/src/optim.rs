//! AdamW, learning-rate schedules as in transformers, and global-norm gradient clipping
//! (`torch.nn.utils.clip_grad_norm_`).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use serde::{Deserialize, Serialize};

/// transformers' `get_{constant,linear,cosine}_schedule_with_warmup`: linear warm-up from 0
/// over the warm-up steps, then constant, linear decay to 0, or half a cosine to 0 at the
/// last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

impl LrSchedule {
    /// Learning rate of optimizer step `step` (0-based) peaking at `lr` after `warmup`
    /// steps, of `total`: the scheduler's value before its `step`-th call.
    pub fn lr_at(self, lr: f64, warmup: u64, total: u64, step: u64) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if step < warmup {
            return lr * s / w.max(1.0);
        }
        let factor = match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrSchedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        lr * factor
    }
}

/// burn's AdamW with these hyper-parameters (burn's own defaults differ from PyTorch's:
/// eps 1e-5, decay 1e-4).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, M, B> {
    burn::optim::AdamWConfig::new()
        .with_beta_1(beta1 as f32)
        .with_beta_2(beta2 as f32)
        .with_epsilon(eps as f32)
        .with_weight_decay(weight_decay as f32)
        .init()
}

/// Sum of the squared gradient entries of the parameters `counted` selects (its share of
/// a global norm when parameters are spread over ranks).
pub fn grad_sq_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
    counted: impl Fn(&ParamId) -> bool,
) -> f64 {
    grad_sq_tensor::<B, M>(module, grads, counted)
        .map(|t| t.into_scalar())
        .map(burn::tensor::ElementConversion::elem::<f64>)
        .unwrap_or(0.0)
}

/// [`grad_sq_sum`] left on the device (`None`: no gradient counted).
pub fn grad_sq_tensor<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
    counted: impl Fn(&ParamId) -> bool,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let mut ids = ParamIds::default();
    module.visit(&mut ids);
    let mut norm = SumSquares::<B::InnerBackend> { grads, total: None };
    for (id, dims) in ids.0.iter().filter(|(id, _)| counted(id)) {
        norm.add(*id, *dims);
    }
    norm.total
}

/// Scale every gradient by `max_norm / (norm + 1e-6)` when that is below 1
/// (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_to<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    norm: f64,
    max_norm: Option<f64>,
) {
    let Some(max) = max_norm else { return };
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        let mut ids = ParamIds::default();
        module.visit(&mut ids);
        for (id, dims) in &ids.0 {
            scale::<B::InnerBackend>(grads, *id, *dims, coef);
        }
    }
}

/// Ids and ranks of a module's float parameters.
#[derive(Default)]
struct ParamIds(Vec<(ParamId, usize)>);

impl<B: Backend> ModuleVisitor<B> for ParamIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push((param.id, D));
    }
}

struct SumSquares<'a, B: Backend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B, 1>>,
}

impl<B: Backend> SumSquares<'_, B> {
    fn add(&mut self, id: ParamId, dims: usize) {
        let sq = match dims {
            1 => self.grads.get::<B, 1>(id).map(|g| g.powi_scalar(2).sum()),
            2 => self.grads.get::<B, 2>(id).map(|g| g.powi_scalar(2).sum()),
            3 => self.grads.get::<B, 3>(id).map(|g| g.powi_scalar(2).sum()),
            _ => None,
        };
        if let Some(sq) = sq {
            self.total = Some(match self.total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
}

fn scale<B: Backend>(grads: &mut GradientsParams, id: ParamId, dims: usize, coef: f64) {
    match dims {
        1 => rescale::<B, 1>(grads, id, coef),
        2 => rescale::<B, 2>(grads, id, coef),
        3 => rescale::<B, 3>(grads, id, coef),
        _ => {}
    }
}

fn rescale<B: Backend, const D: usize>(grads: &mut GradientsParams, id: ParamId, coef: f64) {
    if let Some(g) = grads.remove::<B, D>(id) {
        grads.register(id, g.mul_scalar(coef));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        let lr = |kind: LrSchedule, step| kind.lr_at(1.0, 10, 110, step);
        assert_eq!(lr(LrSchedule::Linear, 0), 0.0);
        assert_eq!(lr(LrSchedule::Linear, 5), 0.5);
        assert_eq!(lr(LrSchedule::Linear, 10), 1.0);
        assert!((lr(LrSchedule::Linear, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(LrSchedule::Linear, 110), 0.0);
        assert!((lr(LrSchedule::Cosine, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(LrSchedule::Constant, 100), 1.0);
    }
}
