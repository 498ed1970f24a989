//! Each parameter's global name and box in Hugging Face terms: what the sharded checkpoint
//! format stores (HF names and orientation, so conversion to and from HF is slicing only).
//!
//! A rank's parameter is a box of the global HF tensor: whole, or cut along one dimension
//! by tensor parallelism (Megatron's cuts, as [`super::shard`] makes them; k/v heads when
//! tp exceeds them are held in copies by `tp / kv` consecutive ranks).

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use checkpoint::sharded::Slice;
use parallel::{Coords, Layout};

use super::config::ModelConfig;
use super::decoder::CausalLm;
use super::hf::linears_mut;

/// One parameter of a rank's model in HF terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    pub id: ParamId,
    /// The HF (PEFT for adapters) tensor name, global layer and expert indices.
    pub name: String,
    /// Whether the parameter is held transposed relative to HF (linear weights, adapters).
    pub transposed: bool,
}

/// Every parameter of `model` with its HF name.
pub fn named<B: Backend>(model: &CausalLm<B>) -> Vec<Named> {
    let mut out = Vec::new();
    let mut add = |id: ParamId, name: String, transposed: bool| {
        out.push(Named {
            id,
            name,
            transposed,
        })
    };
    if let Some(e) = &model.embed_tokens {
        add(e.id, "model.embed_tokens.weight".into(), false);
    }
    let mut copy = model.clone();
    for (name, linear) in linears_mut(&mut copy) {
        add(linear.weight.id, format!("{name}.weight"), true);
        if let Some(b) = &linear.bias {
            add(b.id, format!("{name}.bias"), false);
        }
        if let Some(l) = &linear.lora {
            add(l.a.id, format!("{name}.lora_A.weight"), true);
            add(l.b.id, format!("{name}.lora_B.weight"), true);
        }
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{}", model.global_layer(i));
        add(
            layer.input_layernorm.weight.id,
            format!("{p}.input_layernorm.weight"),
            false,
        );
        add(
            layer.post_attention_layernorm.weight.id,
            format!("{p}.post_attention_layernorm.weight"),
            false,
        );
    }
    if let Some(n) = &model.norm {
        add(n.weight.id, "model.norm.weight".into(), false);
    }
    out
}

/// How tensor parallelism cuts the HF tensor `name`: the dimension, and into how many
/// distinct boxes (tp, or the kv heads when tp exceeds them); `None`: not cut.
pub fn tp_cut(name: &str, config: &ModelConfig, tp: usize) -> Option<(usize, usize)> {
    if tp == 1 {
        return None;
    }
    let (module, leaf) = split_leaf(name);
    let kind = module.rsplit('.').next().unwrap_or(module);
    let distinct = if matches!(kind, "k_proj" | "v_proj") {
        config.num_kv_heads.min(tp)
    } else {
        tp
    };
    let column = matches!(
        kind,
        "q_proj" | "k_proj" | "v_proj" | "gate_proj" | "up_proj" | "w1" | "w3" | "lm_head"
    );
    let row = matches!(kind, "o_proj" | "down_proj" | "w2");
    let dim = match leaf {
        _ if kind == "embed_tokens" => Some(0),
        "weight" | "bias" if column => Some(0),
        "weight" if row => Some(1),
        "lora_A.weight" if row => Some(1),
        "lora_B.weight" if column => Some(0),
        _ => None,
    }?;
    Some((dim, distinct))
}

/// `(module, leaf)`: `model.layers.0.self_attn.q_proj` and `weight` / `bias` /
/// `lora_A.weight` / `lora_B.weight`.
fn split_leaf(name: &str) -> (&str, &str) {
    for leaf in [".lora_A.weight", ".lora_B.weight"] {
        if let Some(m) = name.strip_suffix(leaf) {
            return (m, &leaf[1..]);
        }
    }
    name.rsplit_once('.').unwrap_or((name, ""))
}

/// The global shape of `name` and the box of it tensor-parallel rank `rank` of `tp` holds,
/// from the box's (HF-oriented) shape; and how many ranks hold that same box.
pub fn tp_box(
    name: &str,
    local: &[usize],
    config: &ModelConfig,
    tp: usize,
    rank: usize,
) -> (Vec<usize>, Slice, usize) {
    match tp_cut(name, config, tp) {
        None => (local.to_vec(), Slice::whole(local), tp),
        Some((dim, distinct)) => {
            let copies = tp / distinct;
            let mut global = local.to_vec();
            global[dim] *= distinct;
            let slice = Slice::along(&global, dim, rank / copies * local[dim], local[dim]);
            (global, slice, copies)
        }
    }
}

/// Where a trainer of `layout` keeps tensor `name` of global `shape` (a parameter's HF name,
/// or its AdamW state's: `optimizer.<name>.exp_avg`, `.exp_avg_sq`, `.step`): each box of it
/// and the rank (of data-parallel rank 0) that saves it, as [`crate::state::snapshot`] does.
/// `sizes`: layers per pipeline stage (per virtual stage, in pipeline order). Names of no
/// layer, expert or cut this knows stay whole on the first rank of their stage.
pub fn place(
    name: &str,
    shape: &[usize],
    config: &ModelConfig,
    layout: &Layout,
    sizes: &[usize],
) -> Vec<(usize, Slice)> {
    let (base, scalar) = param_of(name);
    let pp = pipeline_rank(base, layout.pp, sizes);
    let ep = match (&config.moe, number_after(base, ".experts.")) {
        (Some(m), Some(e)) if m.num_experts.is_multiple_of(layout.ep) => {
            e / (m.num_experts / layout.ep)
        }
        _ => 0,
    };
    let rank = |tp| layout.rank(Coords { tp, ep, dp: 0, pp });
    match tp_cut(base, config, layout.tp) {
        Some((dim, distinct))
            if !scalar && dim < shape.len() && shape[dim].is_multiple_of(distinct) =>
        {
            let len = shape[dim] / distinct;
            let copies = layout.tp / distinct;
            (0..distinct)
                .map(|i| (rank(i * copies), Slice::along(shape, dim, i * len, len)))
                .collect()
        }
        _ => vec![(rank(0), Slice::whole(shape))],
    }
}

/// The parameter a state tensor's name belongs to, and whether it is its scalar step.
fn param_of(name: &str) -> (&str, bool) {
    let Some(rest) = name.strip_prefix("optimizer.") else {
        return (name, false);
    };
    for suffix in [".exp_avg_sq", ".exp_avg"] {
        if let Some(p) = rest.strip_suffix(suffix) {
            return (p, false);
        }
    }
    match rest.strip_suffix(".step") {
        Some(p) => (p, true),
        None => (name, false),
    }
}

/// The number right after `marker` in `name` (`model.layers.7.…` → 7).
fn number_after(name: &str, marker: &str) -> Option<usize> {
    let at = name.find(marker)? + marker.len();
    let digits: &str = name[at..].split('.').next()?;
    digits.parse().ok()
}

/// The pipeline rank holding `name`: its layer's virtual stage modulo the ranks; the
/// embedding on the first, the final norm and head on the last.
fn pipeline_rank(name: &str, ranks: usize, sizes: &[usize]) -> usize {
    if let Some(layer) = number_after(name, "model.layers.") {
        let mut end = 0;
        for (stage, &n) in sizes.iter().enumerate() {
            end += n;
            if layer < end {
                return stage % ranks;
            }
        }
        return ranks - 1;
    }
    if name.starts_with("model.norm.") || name.starts_with("lm_head.") {
        ranks - 1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kv: usize) -> ModelConfig {
        let text = format!(
            r#"{{"model_type":"llama","vocab_size":96,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":{kv},
            "rms_norm_eps":1e-5,"rope_theta":10000.0}}"#
        );
        ModelConfig::from_json_str(&text, std::path::Path::new("config.json")).expect("config")
    }

    #[test]
    fn megatron_cuts_in_hf_orientation() {
        let c = config(2);
        let cut = |n: &str, tp| tp_cut(n, &c, tp);
        assert_eq!(
            cut("model.layers.0.self_attn.q_proj.weight", 2),
            Some((0, 2))
        );
        assert_eq!(
            cut("model.layers.0.self_attn.o_proj.weight", 2),
            Some((1, 2))
        );
        assert_eq!(
            cut("model.layers.0.self_attn.o_proj.lora_A.weight", 2),
            Some((1, 2))
        );
        assert_eq!(
            cut("model.layers.0.self_attn.o_proj.lora_B.weight", 2),
            None
        );
        assert_eq!(
            cut("model.layers.0.self_attn.q_proj.lora_A.weight", 2),
            None
        );
        assert_eq!(
            cut("model.layers.0.self_attn.q_proj.lora_B.weight", 2),
            Some((0, 2))
        );
        assert_eq!(
            cut("model.layers.0.self_attn.k_proj.weight", 4),
            Some((0, 2))
        );
        assert_eq!(cut("model.layers.0.mlp.down_proj.bias", 2), None);
        assert_eq!(cut("model.embed_tokens.weight", 2), Some((0, 2)));
        assert_eq!(cut("lm_head.weight", 2), Some((0, 2)));
        assert_eq!(cut("model.layers.1.block_sparse_moe.gate.weight", 2), None);
        assert_eq!(
            cut("model.layers.1.block_sparse_moe.experts.3.w2.weight", 2),
            Some((1, 2))
        );
        assert_eq!(cut("model.norm.weight", 2), None);
        assert_eq!(cut("model.layers.0.self_attn.q_proj.weight", 1), None);
        // tp 4 over 2 kv heads: ranks 0, 1 hold head 0 and ranks 2, 3 head 1.
        let (global, slice, copies) =
            tp_box("model.layers.0.self_attn.k_proj.weight", &[8, 32], &c, 4, 3);
        assert_eq!((global, copies), (vec![16, 32], 2));
        assert_eq!(slice, Slice::along(&[16, 32], 0, 8, 8));
    }

    #[test]
    fn placement_follows_the_stages_experts_and_cuts() {
        let c = config(2);
        // tp2 × pp2, interleaved 2 virtual stages of 1 layer: layer 1 on pipeline rank 1.
        let layout = Layout::new(1, 2, 2, 1).expect("valid");
        let sizes = [1, 1];
        let place = |n: &str, shape: &[usize]| place(n, shape, &c, &layout, &sizes);
        let q = "model.layers.1.self_attn.q_proj.weight";
        assert_eq!(
            place(q, &[32, 32]),
            vec![
                (2, Slice::along(&[32, 32], 0, 0, 16)),
                (3, Slice::along(&[32, 32], 0, 16, 16))
            ]
        );
        let m = format!("optimizer.{q}.exp_avg_sq");
        assert_eq!(place(&m, &[32, 32]), place(q, &[32, 32]));
        let step = format!("optimizer.{q}.step");
        assert_eq!(place(&step, &[]), vec![(2, Slice::whole(&[]))]);
        assert_eq!(
            place("model.layers.0.input_layernorm.weight", &[32]),
            vec![(0, Slice::whole(&[32]))]
        );
        assert_eq!(place("model.norm.weight", &[32])[0].0, 2);
        assert_eq!(place("model.embed_tokens.weight", &[96, 32])[1].0, 1);
    }
}
