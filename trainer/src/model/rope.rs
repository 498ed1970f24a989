//! Rotary position embeddings, computed the way transformers' `LlamaRotaryEmbedding` does.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `1 / theta^(2i/d)` for `i < d/2`, scaled as the config asks.
pub fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim as f64;
    let base: Vec<f64> = (0..config.head_dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim))
        .collect();
    let scaled: Vec<f64> = match config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// `cos` and `sin` for the given position ids, each `[tokens, 1, head_dim]` (the frequencies
/// repeated twice along the last dim, transformers' `rotate_half` form; the middle axis
/// broadcasts over the heads), computed on the device from the uploaded positions.
pub fn cos_sin<B: Backend>(
    inv_freq: &[f32],
    positions: &[u32],
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let (n, half) = (positions.len(), inv_freq.len());
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::<B, 2>::from_data(TensorData::new(pos, [n, 1]), device);
    let freq = Tensor::<B, 2>::from_data(TensorData::new(inv_freq.to_vec(), [1, half]), device);
    // Position × frequency in f32, as transformers computes it.
    let angles = pos.expand([n, half]) * freq.expand([n, half]);
    let angles = Tensor::cat(vec![angles.clone(), angles], 1).reshape([n, 1, 2 * half]);
    (angles.clone().cos(), angles.sin())
}

/// `x·cos + rotate_half(x)·sin` for `x: [tokens, heads, head_dim]`, where
/// `rotate_half(x) = cat(-x[d/2..], x[..d/2])`.
pub fn apply<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, heads, d] = x.dims();
    let half = d / 2;
    let first = x.clone().slice([0..n, 0..heads, 0..half]);
    let second = x.clone().slice([0..n, 0..heads, half..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 2);
    let full = [n, heads, d];
    x * cos.clone().expand(full) + rotated * sin.clone().expand(full)
}

/// `cos` and `sin` `[tokens·heads, head_dim]`, made on the host (where the CPU backend
/// runs, a host table is no upload).
fn per_head_cos_sin<B: Backend>(
    inv_freq: &[f32],
    positions: &[u32],
    heads: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dim = 2 * inv_freq.len();
    let rows = positions.len() * heads;
    let mut cos = Vec::with_capacity(rows * dim);
    let mut sin = Vec::with_capacity(rows * dim);
    for &p in positions {
        let (c, s): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| p as f32 * f)
            .map(|a| (a.cos(), a.sin()))
            .unzip();
        for _ in 0..heads {
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            sin.extend_from_slice(&s);
            sin.extend_from_slice(&s);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [rows, dim]), device),
        Tensor::from_data(TensorData::new(sin, [rows, dim]), device),
    )
}

/// The `[d, d]` matrix R with `x·R = rotate_half(x) = cat(-x[d/2..], x[..d/2])`. Each output
/// picks one input with sign ±1, so the product is exact.
pub fn rotate_half_matrix<B: Backend>(dim: usize, device: &B::Device) -> Tensor<B, 2> {
    let half = dim / 2;
    let mut r = vec![0.0f32; dim * dim];
    for j in 0..half {
        r[(j + half) * dim + j] = -1.0; // out[j] = -x[j + half]
        r[j * dim + j + half] = 1.0; // out[j + half] = x[j]
    }
    Tensor::from_data(TensorData::new(r, [dim, dim]), device)
}

/// RoPE for one forward pass, made on the device once and laid out the way the backend
/// applies it fastest.
pub enum Tables<B: Backend> {
    /// `[n, 1, d]`, broadcast over the heads; `rotate_half` by slicing (GPUs).
    Shared {
        cos: Tensor<B, 3>,
        sin: Tensor<B, 3>,
    },
    /// Copies per head, `[n·heads, d]`, for the query heads and for the key/value heads;
    /// `rotate_half` as a product with a signed permutation. No broadcasting and no strided
    /// slicing: both are the slow path of burn's CPU backend, where the shared form (with
    /// the mask broadcast too) made a 4-layer, hidden-256 model's step 1.4× slower.
    PerHead {
        q: (Tensor<B, 2>, Tensor<B, 2>),
        k: (Tensor<B, 2>, Tensor<B, 2>),
        rotate: Tensor<B, 2>,
    },
}

impl<B: Backend> Tables<B> {
    /// The tables for `positions`, for `heads` query and `kv_heads` key/value heads.
    pub fn new(
        inv_freq: &[f32],
        positions: &[u32],
        (heads, kv_heads): (usize, usize),
        per_head: bool,
        device: &B::Device,
    ) -> Self {
        if !per_head {
            let (cos, sin) = cos_sin::<B>(inv_freq, positions, device);
            return Tables::Shared { cos, sin };
        }
        Tables::PerHead {
            q: per_head_cos_sin(inv_freq, positions, heads, device),
            k: per_head_cos_sin(inv_freq, positions, kv_heads, device),
            rotate: rotate_half_matrix(2 * inv_freq.len(), device),
        }
    }

    /// `x: [n, heads, d]` rotated: query heads when `query`, else key heads.
    pub fn apply(&self, x: Tensor<B, 3>, query: bool) -> Tensor<B, 3> {
        match self {
            Tables::Shared { cos, sin } => apply(x, cos, sin),
            Tables::PerHead { q, k, rotate } => {
                let (cos, sin) = if query { q } else { k };
                let [n, h, d] = x.dims();
                let x = x.reshape([n * h, d]);
                let rotated = x.clone().matmul(rotate.clone());
                (x * cos.clone() + rotated * sin.clone()).reshape([n, h, d])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use std::path::Path;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let json = r#"{"model_type":"llama","vocab_size":8,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;
        let scaled = ModelConfig::from_json_str(json, Path::new("c.json")).unwrap();
        let mut plain = scaled.clone();
        plain.rope_scaling = RopeScaling::None;
        let (s, p) = (inv_freq(&scaled), inv_freq(&plain));
        // Highest frequency: wavelength 2π < 64/4, untouched.
        assert_eq!(s[0], p[0]);
        // Lowest frequency: wavelength far above 64, divided by the factor.
        let last = s.len() - 1;
        assert!((s[last] * 8.0 - p[last]).abs() <= p[last] * 1e-6);
    }
}
