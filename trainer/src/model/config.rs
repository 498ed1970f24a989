//! The architecture, read from a Hugging Face `config.json`.
//!
//! One decoder family covers Llama 1/2/3/3.1, Mistral, Qwen2/2.5 and Mixtral: they differ
//! only in biases, RoPE scaling, tied embeddings and a sparse MoE block in place of the MLP.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The model families tidemill knows (HF `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Mixtral,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Mixtral => "mixtral",
        }
    }
}

/// How RoPE frequencies are scaled (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's smooth frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The sparse mixture-of-experts block of Mixtral.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
}

/// Everything the forward pass needs to know about an architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v projections (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Attend only to the last `sliding_window` positions (Mistral/Mixtral, Qwen2 when enabled).
    pub sliding_window: Option<usize>,
    pub moe: Option<MoeConfig>,
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    /// The dimensions the cost model works from (every family here: RMSNorm, SwiGLU, no
    /// dropout).
    pub fn shape(&self) -> parallel::plan::ModelShape {
        let (experts, top_k) = self
            .moe
            .as_ref()
            .map_or((0, 0), |m| (m.num_experts, m.top_k));
        parallel::plan::ModelShape {
            layers: self.num_layers,
            hidden: self.hidden_size,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            ffn: self.intermediate_size,
            vocab: self.vocab_size,
            experts,
            top_k,
            gated_mlp: true,
            tied_embeddings: self.tie_word_embeddings,
            qkv_bias: self.qkv_bias,
            o_bias: self.o_bias,
            mlp_bias: self.mlp_bias,
            norm_bias: false,
            dropout: false,
        }
    }

    /// Read `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text, &path)
    }

    /// Parse the text of a config.json; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(Error::Json {
                path: path.to_path_buf(),
                message: "expected a JSON object".into(),
            });
        };
        Keys { map: &map, path }.parse()
    }

    /// Number of query heads per key/value head (grouped-query attention).
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Typed access to the keys of one config.json, with errors naming the key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::ModelConfig {
            path: PathBuf::from(self.path),
            key: key.into(),
            message: message.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.opt_usize(key)? {
            Some(v) => Ok(v),
            None => Err(self.err(key, "missing")),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| self.err(key, format!("expected a positive integer, found {v}")))
            })
            .transpose()
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn parse(&self) -> Result<ModelConfig> {
        let model_type = self
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| self.err("model_type", "missing"))?;
        let family = match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "mixtral" => Family::Mixtral,
            other => {
                return Err(self.err(
                    "model_type",
                    format!(
                        "`{other}` is not supported; supported: llama, mistral, qwen2, mixtral"
                    ),
                ))
            }
        };
        let act = self
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(self.err("hidden_act", format!("`{act}` is not supported; only silu")));
        }
        let hidden_size = self.usize("hidden_size")?;
        let num_heads = self.usize("num_attention_heads")?;
        let num_kv_heads = self.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(self.err(
                    "head_dim",
                    format!("missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head_dim"),
            ));
        }
        let (rope_theta, rope_scaling) = self.rope(family)?;
        let attention_bias = self.bool_or("attention_bias", false)?;
        let sliding_window = match family {
            Family::Llama | Family::Qwen2 => None,
            // transformers' MistralConfig default when the key is absent (null means none).
            Family::Mistral if !self.map.contains_key("sliding_window") => Some(4096),
            Family::Mistral | Family::Mixtral => self.opt_usize("sliding_window")?,
        };
        // Qwen2 windows only the layers from `max_window_layers` on; not supported yet.
        if family == Family::Qwen2 && self.bool_or("use_sliding_window", false)? {
            return Err(self.err(
                "use_sliding_window",
                "per-layer sliding windows (Qwen2) are not supported",
            ));
        }
        if self.bool_or("output_router_logits", false)? {
            return Err(self.err(
                "output_router_logits",
                "the router load-balancing loss is not supported; set it to false",
            ));
        }
        if self.f64_or("router_jitter_noise", 0.0)? != 0.0 {
            return Err(self.err(
                "router_jitter_noise",
                "router jitter is not supported; set it to 0",
            ));
        }
        let moe = match family {
            Family::Mixtral => Some(MoeConfig {
                num_experts: self.usize("num_local_experts")?,
                top_k: self.usize("num_experts_per_tok")?,
            }),
            Family::Llama | Family::Mistral | Family::Qwen2 => None,
        };
        if let Some(m) = &moe {
            if m.top_k > m.num_experts {
                return Err(self.err(
                    "num_experts_per_tok",
                    format!(
                        "{} is more than num_local_experts {}",
                        m.top_k, m.num_experts
                    ),
                ));
            }
        }
        Ok(ModelConfig {
            family,
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            num_layers: self.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            // transformers' per-family defaults for an absent key.
            rms_norm_eps: self.f64_or(
                "rms_norm_eps",
                if matches!(family, Family::Mistral | Family::Mixtral) {
                    1e-5
                } else {
                    1e-6
                },
            )?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: attention_bias && family != Family::Qwen2,
            mlp_bias: family == Family::Llama && self.bool_or("mlp_bias", false)?,
            sliding_window,
            moe,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        })
    }

    /// RoPE base and scaling, from the newer `rope_parameters` or the older
    /// `rope_theta` + `rope_scaling` keys.
    fn rope(&self, family: Family) -> Result<(f64, RopeScaling)> {
        let (key, params) = match self.get("rope_parameters") {
            Some(v) => ("rope_parameters", Some(v)),
            None => ("rope_scaling", self.get("rope_scaling")),
        };
        let params = match params {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => return Err(self.err(key, format!("expected an object, found {v}"))),
        };
        let field = |name: &str| params.and_then(|m| m.get(name)).filter(|v| !v.is_null());
        let number = |name: &str| -> Result<Option<f64>> {
            field(name)
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        self.err(
                            &format!("{key}.{name}"),
                            format!("expected a number, found {v}"),
                        )
                    })
                })
                .transpose()
        };
        let theta = match number("rope_theta")? {
            Some(t) => t,
            None => self.f64_or(
                "rope_theta",
                if family == Family::Mixtral { 1e6 } else { 1e4 },
            )?,
        };
        let rope_type = field("rope_type")
            .or_else(|| field("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let required = |name: &str| -> Result<f64> {
            number(name)?.ok_or_else(|| self.err(&format!("{key}.{name}"), "missing"))
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: required("original_max_position_embeddings")?,
            },
            other => {
                return Err(self.err(
                    &format!("{key}.rope_type"),
                    format!("`{other}` is not supported; supported: default, linear, llama3"),
                ))
            }
        };
        Ok((theta, scaling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":96,"hidden_size":32,
        "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"rope_theta":10000.0,
        "rope_scaling":null}"#;

    #[test]
    fn old_style_llama() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn new_style_llama3_rope_parameters() {
        let c = parse(
            r#"{"model_type":"llama","vocab_size":96,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "tie_word_embeddings":true,"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8}}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn errors_name_the_key() {
        let bad = LLAMA.replace("\"hidden_size\":32", "\"hidden_size\":\"big\"");
        let msg = parse(&bad).unwrap_err().to_string();
        assert!(msg.contains("hidden_size"), "{msg}");
        let bad = LLAMA.replace("\"model_type\":\"llama\"", "\"model_type\":\"gpt2\"");
        let msg = parse(&bad).unwrap_err().to_string();
        assert!(msg.contains("model_type") && msg.contains("gpt2"), "{msg}");
        let bad = LLAMA.replace(
            "\"rope_scaling\":null",
            "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":2}",
        );
        let msg = parse(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("rope_scaling.rope_type") && msg.contains("yarn"),
            "{msg}"
        );
    }
}
