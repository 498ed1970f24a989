//! How a model is cut into pipeline stages (and virtual stages), and put together again.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::model::decoder::Stage;
use crate::model::{CausalLm, ModelConfig};
use parallel::{Collectives, Communicator};

/// Relative forward cost of each layer (multiply-adds per token of its active
/// parameters), with the head's added to the last layer: what [`balance`] evens out.
pub fn layer_costs(c: &ModelConfig) -> Vec<f64> {
    c.shape().layer_costs()
}

pub use parallel::plan::balance;

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
