//! PEFT's `adapter_config.json`, the LoRA subset tidemill implements, and
//! the checks that refuse adapters using features it does not.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::Error;

/// String values of `init_lora_weights` that only change how a fresh
/// adapter is initialised (base weights untouched), so a trained adapter
/// saved with them loads like any other.
const INIT_ONLY: &[&str] = &["gaussian", "orthogonal", "eva"];

/// PEFT's `adapter_config.json`, LoRA subset.
///
/// Unknown fields are ignored on load (PEFT writes many); fields that would
/// change the adapter's meaning are checked by [`crate::load_peft_adapter`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterConfig {
    /// Adapter kind; only `"LORA"` is supported.
    pub peft_type: String,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha; the update is scaled by [`AdapterConfig::scaling`].
    pub lora_alpha: f64,
    /// Dropout on the LoRA input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (or one regex, which PEFT writes as a string) that get adapters.
    #[serde(default, deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which biases are trained; only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// PEFT task type, e.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on (HF id or path).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the base layer stores its weight transposed (GPT-2 Conv1D); unsupported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT loads the adapter frozen when true.
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// Extra fully trained modules saved with the adapter; unsupported.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// How a fresh adapter is initialised (`true`: PEFT's default).
    #[serde(default = "yes", deserialize_with = "init_weights")]
    pub init_lora_weights: bool,
    /// Per-module rank overrides; unsupported when non-empty.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides; unsupported when non-empty.
    #[serde(default, deserialize_with = "null_as_default")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Layer indices that get adapters (an int or a list), kept as written.
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    /// Revision of the base model.
    #[serde(default)]
    pub revision: Option<String>,
}

fn default_bias() -> String {
    "none".to_string()
}

fn yes() -> bool {
    true
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

fn init_weights<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrName {
        Bool(bool),
        Name(String),
    }
    match BoolOrName::deserialize(d)? {
        BoolOrName::Bool(b) => Ok(b),
        BoolOrName::Name(n) if INIT_ONLY.contains(&n.as_str()) => Ok(true),
        BoolOrName::Name(n) => Err(serde::de::Error::custom(format!(
            "init_lora_weights = \"{n}\" is not supported (it changes the base weights)"
        ))),
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl AdapterConfig {
    /// A plain LoRA config for a causal LM: bias `"none"`, inference mode,
    /// PEFT's default initialisation, no per-module patterns.
    pub fn lora(
        r: usize,
        alpha: f64,
        dropout: f64,
        targets: Vec<String>,
        use_rslora: bool,
        base_model: Option<String>,
    ) -> Self {
        AdapterConfig {
            peft_type: "LORA".to_string(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: targets,
            use_rslora,
            bias: default_bias(),
            task_type: Some("CAUSAL_LM".to_string()),
            base_model_name_or_path: base_model,
            fan_in_fan_out: false,
            inference_mode: true,
            modules_to_save: None,
            init_lora_weights: true,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            revision: None,
        }
    }

    /// The factor applied to `B·A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        let r = self.r as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// Refuse configs using features tidemill does not implement.
    /// `file` is the config file named in the error.
    pub(crate) fn check_supported(&self, file: &Path) -> Result<(), Error> {
        let unsupported = |reason: String| Error::UnsupportedAdapter {
            file: file.to_path_buf(),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(unsupported(format!(
                "peft_type = \"{}\"; only \"LORA\" is supported",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(unsupported(
                "r = 0; the rank must be at least 1".to_string(),
            ));
        }
        if !self.rank_pattern.is_empty() {
            return Err(unsupported(
                "rank_pattern is not empty (per-module ranks)".to_string(),
            ));
        }
        if !self.alpha_pattern.is_empty() {
            return Err(unsupported(
                "alpha_pattern is not empty (per-module alphas)".to_string(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(unsupported(
                "fan_in_fan_out = true (transposed base weights)".to_string(),
            ));
        }
        if self.bias != "none" {
            return Err(unsupported(format!(
                "bias = \"{}\"; only \"none\" is supported",
                self.bias
            )));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("modules_to_save is not empty".to_string()));
        }
        Ok(())
    }
}

/// Checks on the raw JSON, before it is parsed into [`AdapterConfig`]:
/// the adapter type, and fields outside the LoRA subset that change what
/// the adapter computes (ignoring them would load a different model).
pub(crate) fn check_raw(raw: &Value, file: &Path) -> Result<(), Error> {
    let unsupported = |reason: String| Error::UnsupportedAdapter {
        file: file.to_path_buf(),
        reason,
    };
    match raw.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => {}
        Some(other) => {
            return Err(unsupported(format!(
                "peft_type = {other}; only \"LORA\" is supported"
            )))
        }
        None => return Err(unsupported("peft_type is missing".to_string())),
    }
    let set = |field: &str| match raw.get(field) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    for (field, what) in [
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias terms"),
        ("layer_replication", "layer replication"),
        ("target_parameters", "LoRA on raw parameters"),
        ("trainable_token_indices", "trainable token embeddings"),
        ("alora_invocation_tokens", "activated LoRA"),
    ] {
        if set(field) {
            return Err(unsupported(format!("{field} is set ({what})")));
        }
    }
    if let Some(Value::String(init)) = raw.get("init_lora_weights") {
        if !INIT_ONLY.contains(&init.as_str()) {
            return Err(unsupported(format!(
                "init_lora_weights = \"{init}\" (the adapter needs a modified base model; \
                 save it from PEFT with weight conversion)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
