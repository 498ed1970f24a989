//! LoRA: add low-rank adapters to chosen projections, freeze the base, and read/write
//! PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use checkpoint::{AdapterConfig, HostTensor, TensorMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::hf::{leaf_name, linears_mut};
use crate::model::linear::{param, to_host, transpose, Lora};
use crate::model::CausalLm;

/// Module names LoRA can target (PEFT's `target_modules`). Mixtral's router (`gate`) is not
/// among them: transformers 5 makes it a custom module peft does not adapt.
pub const TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
    "lm_head",
];

/// LoRA hyper-parameters, as PEFT's `LoraConfig` (the job file's `[lora]` section; its
/// absence means full-parameter fine-tuning). Defaults are declared in [`Default`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank of the update.
    pub r: usize,
    /// Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    pub dropout: f64,
    /// PEFT module names to adapt (see [`TARGETS`]).
    pub targets: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r).
    pub use_rslora: bool,
    /// Start from this PEFT adapter directory instead of fresh adapters (its
    /// adapter_config.json then defines r, alpha, targets and rsLoRA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            init_adapter: None,
        }
    }
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Lora("r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Lora(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Lora("targets is empty".into()));
        }
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(Error::Lora(format!(
                    "unknown target `{t}`; known: {}",
                    TARGETS.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The PEFT `adapter_config.json` for this spec.
    pub fn adapter_config(&self, base_model: Option<String>) -> AdapterConfig {
        AdapterConfig::lora(
            self.r,
            self.alpha,
            self.dropout,
            self.targets.clone(),
            self.use_rslora,
            base_model,
        )
    }

    /// Read back from a PEFT adapter config.
    pub fn from_adapter_config(c: &AdapterConfig) -> Self {
        Self {
            r: c.r,
            alpha: c.lora_alpha,
            dropout: c.lora_dropout,
            targets: c.target_modules.clone(),
            use_rslora: c.use_rslora,
            init_adapter: None,
        }
    }
}

/// Adapters on `model` as `spec` says: loaded from `spec.init_adapter` (trainable), or
/// fresh ([`add_lora`], drawn from `seed`); returns the spec in force (the loaded adapter's
/// own when there is one).
pub fn apply<B: Backend>(
    model: CausalLm<B>,
    spec: &LoraSpec,
    seed: u64,
) -> Result<(CausalLm<B>, LoraSpec)> {
    match &spec.init_adapter {
        Some(dir) => load_adapter(model, dir, true),
        None => Ok((add_lora(model, spec, seed)?, spec.clone())),
    }
}

/// Freeze every base weight and add fresh adapters (A: PEFT's kaiming-uniform init, B: 0) to
/// each targeted projection. A is drawn from `seed` and the module's name, so the same seed
/// gives the same adapter whatever else changes.
pub fn add_lora<B: Backend>(model: CausalLm<B>, spec: &LoraSpec, seed: u64) -> Result<CausalLm<B>> {
    spec.validate()?;
    let mut model = model.no_grad();
    let device = model.device();
    let mut matched = 0;
    for (name, linear) in linears_mut(&mut model) {
        if !spec.targets.iter().any(|t| t == leaf_name(&name)) {
            continue;
        }
        matched += 1;
        let (fan_in, fan_out) = (linear.in_features(), linear.out_features());
        // kaiming_uniform_(a=sqrt(5)) on [r, in] has bound 1/sqrt(in).
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&name));
        let a: Vec<f32> = (0..fan_in * spec.r)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        linear.lora = Some(Lora {
            a: param(HostTensor::new(vec![fan_in, spec.r], a), true, &device),
            b: param(
                HostTensor::new(vec![spec.r, fan_out], vec![0.0; spec.r * fan_out]),
                true,
                &device,
            ),
            scale: spec.scale(),
            dropout: spec.dropout,
        });
    }
    if matched == 0 {
        return Err(Error::Lora(format!(
            "targets {:?} match no module of this {} model",
            spec.targets,
            model.config.family.name()
        )));
    }
    check_expert_targets(spec, &model)?;
    Ok(model)
}

/// Mixtral experts' w1/w3 are one fused tensor in transformers 5, and peft converts a
/// classic adapter only when w1, w3 and w2 are all targeted (w1 alone fails to load, w1+w3
/// without w2 loads silently as a no-op). Refuse what peft could not load.
fn check_expert_targets<B: Backend>(spec: &LoraSpec, model: &CausalLm<B>) -> Result<()> {
    let has = |t: &str| spec.targets.iter().any(|x| x == t);
    if model.config.moe.is_some()
        && (has("w1") || has("w3"))
        && !(has("w1") && has("w2") && has("w3"))
    {
        return Err(Error::Lora(format!(
            "targets {:?}: Mixtral experts take LoRA on w1, w2 and w3 together (or w2 alone), \
             the forms peft loads for transformers' fused experts",
            spec.targets
        )));
    }
    Ok(())
}

/// The adapter_config.json to write. peft fuses w1/w3 adapters into one of rank 2r and, with
/// rsLoRA, would scale it by alpha/sqrt(2r); writing `use_rslora: false` with
/// `lora_alpha = alpha·sqrt(r)` gives every branch the same alpha/sqrt(r) scale in any peft.
fn adapter_config<B: Backend>(
    model: &CausalLm<B>,
    spec: &LoraSpec,
    base_model: Option<String>,
) -> AdapterConfig {
    let experts = spec
        .targets
        .iter()
        .any(|t| ["w1", "w2", "w3"].contains(&t.as_str()));
    if spec.use_rslora && model.config.moe.is_some() && experts {
        let equivalent = LoraSpec {
            alpha: spec.alpha * (spec.r as f64).sqrt(),
            use_rslora: false,
            ..spec.clone()
        };
        return equivalent.adapter_config(base_model);
    }
    spec.adapter_config(base_model)
}

/// The adapter tensors under PEFT's names and layout.
pub fn peft_tensors<B: Backend>(model: &CausalLm<B>) -> TensorMap {
    let mut model = model.clone();
    let mut out = TensorMap::new();
    for (name, linear) in linears_mut(&mut model) {
        if let Some(lora) = &linear.lora {
            let prefix = format!("base_model.model.{name}");
            out.insert(
                format!("{prefix}.lora_A.weight"),
                transpose(&to_host(lora.a.val())),
            );
            out.insert(
                format!("{prefix}.lora_B.weight"),
                transpose(&to_host(lora.b.val())),
            );
        }
    }
    out
}

/// Write the model's adapters as a PEFT adapter directory.
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    spec: &LoraSpec,
    base_model: Option<String>,
    dir: &Path,
) -> Result<()> {
    let tensors = peft_tensors(model);
    if tensors.is_empty() {
        return Err(Error::Lora("the model has no LoRA adapters to save".into()));
    }
    checkpoint::save_peft_adapter(dir, &adapter_config(model, spec, base_model), &tensors)?;
    Ok(())
}

/// Load a PEFT adapter directory into the model (frozen base, adapters `trainable` or not).
pub fn load_adapter<B: Backend>(
    model: CausalLm<B>,
    dir: &Path,
    trainable: bool,
) -> Result<(CausalLm<B>, LoraSpec)> {
    let (config, mut tensors) = checkpoint::load_peft_adapter(dir)?;
    let spec = LoraSpec::from_adapter_config(&config);
    spec.validate()?;
    let file = dir.join("adapter_model.safetensors");
    let mut model = model.no_grad();
    let device = model.device();
    for (name, linear) in linears_mut(&mut model) {
        let prefix = format!("base_model.model.{name}");
        let (ka, kb) = (
            format!("{prefix}.lora_A.weight"),
            format!("{prefix}.lora_B.weight"),
        );
        let (Some(a), Some(b)) = (tensors.remove(&ka), tensors.remove(&kb)) else {
            if spec.targets.iter().any(|t| t == leaf_name(&name)) {
                return Err(Error::Lora(format!(
                    "{}: no `{ka}`/`{kb}` for targeted module",
                    file.display()
                )));
            }
            continue;
        };
        let (fan_in, fan_out) = (linear.in_features(), linear.out_features());
        for (key, t, want) in [(&ka, &a, [spec.r, fan_in]), (&kb, &b, [fan_out, spec.r])] {
            if t.shape != want {
                return Err(Error::ShapeMismatch {
                    file: file.clone(),
                    key: key.clone(),
                    expected: want.to_vec(),
                    found: t.shape.clone(),
                });
            }
        }
        linear.lora = Some(Lora {
            a: param(transpose(&a), trainable, &device),
            b: param(transpose(&b), trainable, &device),
            scale: spec.scale(),
            dropout: spec.dropout,
        });
    }
    if let Some(key) = tensors.keys().next() {
        return Err(Error::UnexpectedTensor {
            file,
            key: key.clone(),
            more: String::new(),
        });
    }
    Ok((model, spec))
}

/// 64-bit FNV-1a, to give each module its own deterministic RNG stream.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
