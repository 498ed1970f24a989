//! How a model is cut into pipeline stages (and virtual stages), and put together again.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::model::decoder::Stage;
use crate::model::{CausalLm, ModelConfig};
use parallel::{Collectives, Communicator};

/// Relative forward cost of each layer (multiply-adds per token of its active
/// parameters), with the head's added to the last layer: what [`balance`] evens out.
pub fn layer_costs(c: &ModelConfig) -> Vec<f64> {
    let (h, d) = (c.hidden_size as f64, c.head_dim as f64);
    let attn = h * d * (2 * c.num_heads + 2 * c.num_kv_heads) as f64;
    let ffn = match &c.moe {
        None => 3.0 * h * c.intermediate_size as f64,
        Some(m) => h * m.num_experts as f64 + m.top_k as f64 * 3.0 * h * c.intermediate_size as f64,
    };
    let mut costs = vec![attn + ffn; c.num_layers];
    if let Some(last) = costs.last_mut() {
        *last += h * c.vocab_size as f64;
    }
    costs
}

/// Layers per stage: contiguous, at least one each, minimising the costliest stage.
pub fn balance(costs: &[f64], stages: usize) -> Vec<usize> {
    let n = costs.len();
    if stages == 0 || stages > n {
        return Vec::new();
    }
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    // best[k][i]: the lowest possible maximum over the first i layers in k stages.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for k in 1..=stages {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[i] - prefix[j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut sizes = vec![0; stages];
    let mut i = n;
    for k in (1..=stages).rev() {
        let j = cut[k][i];
        sizes[k - 1] = i - j;
        i = j;
    }
    sizes
}

/// Keep pipeline rank `index`'s layers (and the embedding, norm and head where they
/// belong) of a whole model: `sizes` are the layers of each virtual stage along the
/// pipeline, `ranks` of them or a multiple (interleaved: rank `index` runs virtual stages
/// `index`, `index + ranks`, …).
pub fn keep_stage<B: burn::tensor::backend::Backend>(
    mut model: CausalLm<B>,
    sizes: &[usize],
    ranks: usize,
    index: usize,
) -> CausalLm<B> {
    let chunks: Vec<Range<usize>> = (index..sizes.len())
        .step_by(ranks)
        .map(|vs| {
            let start: usize = sizes[..vs].iter().sum();
            start..start + sizes[vs]
        })
        .collect();
    let stage = Stage {
        index,
        count: ranks,
        chunks,
    };
    model.layers = model
        .layers
        .into_iter()
        .enumerate()
        .filter(|(i, _)| stage.chunks.iter().any(|c| c.contains(i)))
        .map(|(_, layer)| layer)
        .collect();
    let tied = model.config.tie_word_embeddings;
    if !(stage.is_first() || (stage.is_last() && tied)) {
        model.embed_tokens = None;
    }
    if !stage.is_last() {
        model.norm = None;
        model.lm_head = None;
    }
    model.sharding.stage = Some(stage);
    model
}

/// Rank 0 of the pipeline group gets every stage's parameters (a collective): put into
/// `whole`, a model with every layer, which it returns; the other stages send theirs and
/// return `None`. Used to export a model trained in stages.
pub fn gather_stages<B: burn::tensor::backend::Backend>(
    stage: &CausalLm<B>,
    comm: &dyn Communicator,
    whole: Option<CausalLm<B>>,
) -> Result<Option<CausalLm<B>>> {
    // Paths name layers by their index on this rank; make them global.
    let global = |path: String| -> String {
        let renamed = path.strip_prefix("layers.").and_then(|rest| {
            let (i, tail) = rest.split_once('.')?;
            let i = i
                .parse::<usize>()
                .ok()
                .filter(|&i| i < stage.layers.len())?;
            Some(format!("layers.{}.{tail}", stage.global_layer(i)))
        });
        renamed.unwrap_or(path)
    };
    let mine: Vec<(String, Vec<f32>)> = parallel::dp::values_by_path(stage)
        .into_iter()
        .map(|(path, v)| (global(path), v))
        .collect();
    if comm.rank() != 0 {
        let bytes = serde_json::to_vec(&mine).map_err(|e| Error::Training {
            key: "export".into(),
            message: e.to_string(),
        })?;
        comm.send(&[bytes.len() as i64], 0)?;
        comm.send_bytes(&bytes, 0)?;
        return Ok(None);
    }
    let mut values: std::collections::BTreeMap<String, Vec<f32>> = mine.into_iter().collect();
    for r in 1..comm.size() {
        let mut len = [0i64];
        comm.recv(&mut len, r)?;
        let mut bytes = vec![0u8; usize::try_from(len[0]).unwrap_or(0)];
        comm.recv_bytes(&mut bytes, r)?;
        let theirs: Vec<(String, Vec<f32>)> =
            serde_json::from_slice(&bytes).map_err(|e| Error::Training {
                key: "export".into(),
                message: format!("stage {r}'s parameters: {e}"),
            })?;
        values.extend(theirs);
    }
    Ok(whole.map(|w| parallel::dp::replace_by_path(w, values)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_evens_out_the_costliest_stage() {
        assert_eq!(balance(&[1.0; 4], 2), vec![2, 2]);
        assert_eq!(balance(&[1.0, 1.0, 1.0, 3.0], 2), vec![3, 1]);
        assert_eq!(balance(&[1.0; 5], 5), vec![1; 5]);
        assert!(balance(&[1.0; 2], 3).is_empty());
        for n in 1..12 {
            for p in 1..=n {
                let costs: Vec<f64> = (0..n).map(|i| ((i * 7) % 5 + 1) as f64).collect();
                let sizes = balance(&costs, p);
                assert_eq!(sizes.iter().sum::<usize>(), n);
                assert!(sizes.iter().all(|&s| s >= 1), "{sizes:?}");
            }
        }
    }
}
