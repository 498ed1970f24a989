//! AdamW with PyTorch's defaults, learning-rate schedules as in transformers, and
//! global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::error::{Error, Result};

/// Shape of the learning-rate curve after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// transformers' `get_{constant,linear,cosine}_schedule_with_warmup`: linear warm-up from 0
/// over `warmup_steps`, then constant, linear decay to 0, or half a cosine to 0 at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based), like the scheduler's value before its
    /// `step-th` call.
    pub fn lr_at(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return self.lr * s / w.max(1.0);
        }
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.lr * factor
    }
}

/// AdamW hyper-parameters; the defaults are PyTorch's (burn's differ: eps 1e-5, decay 1e-4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWOptions {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWOptions {
    pub fn validate(&self) -> Result<()> {
        let check = |key: &str, ok: bool, v: f64| {
            if ok {
                Ok(())
            } else {
                Err(Error::Training {
                    key: key.into(),
                    message: format!("{v} is out of range"),
                })
            }
        };
        check("adam_beta1", (0.0..1.0).contains(&self.beta1), self.beta1)?;
        check("adam_beta2", (0.0..1.0).contains(&self.beta2), self.beta2)?;
        check("adam_eps", self.eps > 0.0, self.eps)?;
        check("weight_decay", self.weight_decay >= 0.0, self.weight_decay)
    }

    pub fn build<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, M, B> {
        burn::optim::AdamWConfig::new()
            .with_beta_1(self.beta1 as f32)
            .with_beta_2(self.beta2 as f32)
            .with_epsilon(self.eps as f32)
            .with_weight_decay(self.weight_decay as f32)
            .init()
    }
}

/// The L2 norm of all gradients together; if above `max_norm`, scale them all by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: Option<f64>,
) -> f64 {
    let norm = grad_sq_sum(module, grads, |_| true).sqrt();
    clip_to(module, grads, norm, max_norm);
    norm
}

/// Sum of the squared gradient entries of the parameters `counted` selects (its share of
/// a global norm when parameters are spread over ranks).
pub fn grad_sq_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
    counted: impl Fn(&ParamId) -> bool,
) -> f64 {
    let mut ids = ParamIds::default();
    module.visit(&mut ids);
    let mut norm = SumSquares::<B::InnerBackend> { grads, total: None };
    for (id, dims) in ids.0.iter().filter(|(id, _)| counted(id)) {
        norm.add(*id, *dims);
    }
    norm.total
        .map(|t| t.into_scalar())
        .map(burn::tensor::ElementConversion::elem::<f64>)
        .unwrap_or(0.0)
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
        let s = |kind| Schedule {
            kind,
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert_eq!(s(ScheduleKind::Linear).lr_at(0), 0.0);
        assert_eq!(s(ScheduleKind::Linear).lr_at(5), 0.5);
        assert_eq!(s(ScheduleKind::Linear).lr_at(10), 1.0);
        assert!((s(ScheduleKind::Linear).lr_at(60) - 0.5).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Linear).lr_at(110), 0.0);
        assert!((s(ScheduleKind::Cosine).lr_at(60) - 0.5).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Constant).lr_at(100), 1.0);
    }
}
