//! Hugging Face weight names: building a [`CausalLm`] from an HF state dict and writing one
//! back (torchtitan's `state_dict_adapter`).
//!
//! Mixtral experts are read in the Hub layout (`block_sparse_moe.experts.E.w1.weight`) and
//! in transformers 5's fused layout (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use checkpoint::{HostTensor, TensorMap};

use super::config::ModelConfig;
use super::decoder::{Attention, CausalLm, FeedForward, Layer, Mlp, Moe, RmsNorm};
use super::linear::{param, to_host, Linear};
use super::rope;
use crate::error::{Error, Result};

/// Tensors in HF checkpoints that carry no weights of ours (recomputed buffers).
fn is_ignorable(key: &str) -> bool {
    key.ends_with("rotary_emb.inv_freq")
}

/// Takes tensors out of a state dict by name, checking shapes.
struct Take<'a> {
    tensors: TensorMap,
    files: &'a BTreeMap<String, PathBuf>,
    dir: &'a Path,
}

impl Take<'_> {
    fn get(&mut self, key: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self
            .tensors
            .remove(key)
            .ok_or_else(|| Error::MissingTensor {
                dir: self.dir.to_path_buf(),
                key: key.into(),
                expected: shape.to_vec(),
            })?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                file: self.file(key),
                key: key.into(),
                expected: shape.to_vec(),
                found: t.shape,
            });
        }
        Ok(t)
    }

    fn file(&self, key: &str) -> PathBuf {
        self.files
            .get(key)
            .cloned()
            .unwrap_or_else(|| self.dir.to_path_buf())
    }

    fn linear<B: Backend>(
        &mut self,
        name: &str,
        (out_f, in_f): (usize, usize),
        bias: bool,
        trainable: bool,
        device: &B::Device,
    ) -> Result<Linear<B>> {
        let w = self.get(&format!("{name}.weight"), &[out_f, in_f])?;
        let b = if bias {
            Some(self.get(&format!("{name}.bias"), &[out_f])?)
        } else {
            None
        };
        Ok(Linear::from_hf(w, b, trainable, device))
    }

    fn norm<B: Backend>(
        &mut self,
        name: &str,
        c: &ModelConfig,
        trainable: bool,
        device: &B::Device,
    ) -> Result<RmsNorm<B>> {
        let w = self.get(&format!("{name}.weight"), &[c.hidden_size])?;
        Ok(RmsNorm {
            weight: param(w, trainable, device),
            eps: c.rms_norm_eps,
        })
    }
}

/// Build the model from an HF state dict. Every tensor the config implies must be present
/// with its exact shape, and no other tensor may be left over.
pub fn from_hf_tensors<B: Backend>(
    config: &ModelConfig,
    tensors: TensorMap,
    files: &BTreeMap<String, PathBuf>,
    dir: &Path,
    trainable: bool,
    device: &B::Device,
) -> Result<CausalLm<B>> {
    let c = config;
    let tensors = unfuse_experts(tensors, c)?;
    let mut take = Take {
        tensors,
        files,
        dir,
    };
    let (h, inter, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let embed = take.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let mut lin =
            |name: &str, shape, bias| take.linear::<B>(name, shape, bias, trainable, device);
        let self_attn = Attention {
            q_proj: lin(&format!("{a}.q_proj"), (c.num_heads * d, h), c.qkv_bias)?,
            k_proj: lin(&format!("{a}.k_proj"), (c.num_kv_heads * d, h), c.qkv_bias)?,
            v_proj: lin(&format!("{a}.v_proj"), (c.num_kv_heads * d, h), c.qkv_bias)?,
            o_proj: lin(&format!("{a}.o_proj"), (h, c.num_heads * d), c.o_bias)?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: d,
        };
        let ffn = match &c.moe {
            None => {
                let m = format!("{p}.mlp");
                FeedForward::Dense(Mlp {
                    gate_proj: lin(&format!("{m}.gate_proj"), (inter, h), c.mlp_bias)?,
                    up_proj: lin(&format!("{m}.up_proj"), (inter, h), c.mlp_bias)?,
                    down_proj: lin(&format!("{m}.down_proj"), (h, inter), c.mlp_bias)?,
                })
            }
            Some(moe) => {
                let m = format!("{p}.block_sparse_moe");
                let gate = lin(&format!("{m}.gate"), (moe.num_experts, h), false)?;
                let experts = (0..moe.num_experts)
                    .map(|e| {
                        let x = format!("{m}.experts.{e}");
                        Ok(Mlp {
                            gate_proj: lin(&format!("{x}.w1"), (inter, h), false)?,
                            up_proj: lin(&format!("{x}.w3"), (inter, h), false)?,
                            down_proj: lin(&format!("{x}.w2"), (h, inter), false)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                FeedForward::Sparse(Moe {
                    gate,
                    experts,
                    top_k: moe.top_k,
                    first_expert: 0,
                    capacity_factor: None,
                })
            }
        };
        layers.push(Layer {
            input_layernorm: take.norm(&format!("{p}.input_layernorm"), c, trainable, device)?,
            self_attn,
            post_attention_layernorm: take.norm(
                &format!("{p}.post_attention_layernorm"),
                c,
                trainable,
                device,
            )?,
            ffn,
        });
    }
    let norm = take.norm("model.norm", c, trainable, device)?;
    let lm_head = if c.tie_word_embeddings {
        // Some tied checkpoints also store the head; transformers ignores it, so do we.
        take.tensors.remove("lm_head.weight");
        None
    } else {
        Some(take.linear("lm_head", (c.vocab_size, h), false, trainable, device)?)
    };
    let leftover: Vec<String> = take
        .tensors
        .keys()
        .filter(|k| !is_ignorable(k))
        .cloned()
        .collect();
    if let Some(first) = leftover.first() {
        return Err(Error::UnexpectedTensor {
            file: take.file(first),
            key: first.clone(),
            more: match leftover.len() {
                1 => String::new(),
                n => format!(", and {} more", n - 1),
            },
        });
    }
    Ok(CausalLm {
        embed_tokens: Some(param(embed, trainable, device)),
        layers,
        norm: Some(norm),
        lm_head,
        config: config.clone(),
        inv_freq: rope::inv_freq(config),
        sharding: Default::default(),
        compute: burn::tensor::FloatDType::F32,
    })
}

/// Rewrite transformers 5's fused Mixtral experts into the Hub's per-expert keys.
fn unfuse_experts(mut tensors: TensorMap, c: &ModelConfig) -> Result<TensorMap> {
    let Some(moe) = &c.moe else {
        return Ok(tensors);
    };
    for i in 0..c.num_layers {
        let fused = format!("model.layers.{i}.mlp");
        let legacy = format!("model.layers.{i}.block_sparse_moe");
        if let Some(gate) = tensors.remove(&format!("{fused}.gate.weight")) {
            tensors.insert(format!("{legacy}.gate.weight"), gate);
        }
        let (e, h, inter) = (moe.num_experts, c.hidden_size, c.intermediate_size);
        if let Some(gu) = tensors.remove(&format!("{fused}.experts.gate_up_proj")) {
            let key = format!("{fused}.experts.gate_up_proj");
            check_shape(&key, &gu, &[e, 2 * inter, h])?;
            for x in 0..e {
                let block = &gu.data[x * 2 * inter * h..(x + 1) * 2 * inter * h];
                let (w1, w3) = block.split_at(inter * h);
                tensors.insert(
                    format!("{legacy}.experts.{x}.w1.weight"),
                    HostTensor::new(vec![inter, h], w1.to_vec()),
                );
                tensors.insert(
                    format!("{legacy}.experts.{x}.w3.weight"),
                    HostTensor::new(vec![inter, h], w3.to_vec()),
                );
            }
        }
        if let Some(down) = tensors.remove(&format!("{fused}.experts.down_proj")) {
            let key = format!("{fused}.experts.down_proj");
            check_shape(&key, &down, &[e, h, inter])?;
            for (x, w2) in down.data.chunks(h * inter).enumerate() {
                tensors.insert(
                    format!("{legacy}.experts.{x}.w2.weight"),
                    HostTensor::new(vec![h, inter], w2.to_vec()),
                );
            }
        }
    }
    Ok(tensors)
}

fn check_shape(key: &str, t: &HostTensor, expected: &[usize]) -> Result<()> {
    if t.shape == expected {
        return Ok(());
    }
    Err(Error::ShapeMismatch {
        file: PathBuf::from("(fused experts)"),
        key: key.into(),
        expected: expected.to_vec(),
        found: t.shape.clone(),
    })
}

/// Every linear projection of the model with its HF module path (without `.weight`), in a
/// fixed order.
pub fn linears_mut<B: Backend>(model: &mut CausalLm<B>) -> Vec<(String, &mut Linear<B>)> {
    let mut out = Vec::new();
    let global: Vec<usize> = (0..model.layers.len())
        .map(|i| model.global_layer(i))
        .collect();
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        let p = format!("model.layers.{}", global[i]);
        out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
        out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
        out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
        out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
        match &mut layer.ffn {
            FeedForward::Dense(m) => {
                out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
                out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
                out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
            }
            FeedForward::Sparse(moe) => {
                out.push((format!("{p}.block_sparse_moe.gate"), &mut moe.gate));
                let first = moe.first_expert;
                for (e, m) in moe.experts.iter_mut().enumerate() {
                    let x = format!("{p}.block_sparse_moe.experts.{}", first + e);
                    out.push((format!("{x}.w1"), &mut m.gate_proj));
                    out.push((format!("{x}.w3"), &mut m.up_proj));
                    out.push((format!("{x}.w2"), &mut m.down_proj));
                }
            }
        }
    }
    if let Some(head) = &mut model.lm_head {
        out.push(("lm_head".into(), head));
    }
    out
}

/// The HF state dict of the model, LoRA updates merged into the base weights.
pub fn to_hf_tensors<B: Backend>(model: &CausalLm<B>) -> TensorMap {
    let mut out = TensorMap::new();
    if let Some(embed) = &model.embed_tokens {
        out.insert("model.embed_tokens.weight".into(), to_host(embed.val()));
    }
    let mut copy = model.clone();
    for (name, linear) in linears_mut(&mut copy) {
        out.insert(format!("{name}.weight"), linear.merged_hf_weight());
        if let Some(b) = &linear.bias {
            out.insert(format!("{name}.bias"), to_host(b.val()));
        }
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{}", model.global_layer(i));
        out.insert(
            format!("{p}.input_layernorm.weight"),
            to_host(layer.input_layernorm.weight.val()),
        );
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            to_host(layer.post_attention_layernorm.weight.val()),
        );
    }
    if let Some(norm) = &model.norm {
        out.insert("model.norm.weight".into(), to_host(norm.weight.val()));
    }
    out
}

/// The leaf module name PEFT matches `target_modules` against (`q_proj`, `w1`, …).
pub fn leaf_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}
