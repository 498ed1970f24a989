//! Writing a fine-tuned model as a Hugging Face model directory that
//! `AutoModelForCausalLM.from_pretrained` loads unchanged.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use checkpoint::DType;

use crate::error::{Error, Result};
use crate::model::hf::to_hf_tensors;
use crate::model::CausalLm;

/// Files of an HF model directory, besides the weights, that travel with an export.
const COMPANION_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Largest single safetensors file before the export is sharded (as transformers' 5 GB).
const MAX_SHARD_BYTES: u64 = 5_000_000_000;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `model` (LoRA merged) into `out` as an HF model: the weights in `dtype`, and
/// config/tokenizer files copied from `base_dir`. Written into a sibling temporary directory
/// and renamed into place, so a failed export leaves nothing that looks complete.
pub fn save_hf_model<B: Backend>(
    model: &CausalLm<B>,
    base_dir: &Path,
    out: &Path,
    dtype: DType,
) -> Result<()> {
    check_replaceable(out, base_dir)?;
    let tmp = sibling_tmp(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        for name in COMPANION_FILES.iter().filter(|n| **n != "config.json") {
            let src = base_dir.join(name);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(name)).map_err(io(&src))?;
            }
        }
        write_config(
            &base_dir.join("config.json"),
            &tmp.join("config.json"),
            dtype,
        )?;
        checkpoint::save_hf_weights(&tmp, &to_hf_tensors(model), dtype, MAX_SHARD_BYTES)?;
        replace_dir(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Copy config.json with its dtype key (`dtype` in transformers 5, `torch_dtype` before)
/// saying what the weights now are, so `from_pretrained(dtype="auto")` keeps them as written.
fn write_config(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    let text = std::fs::read_to_string(src).map_err(io(src))?;
    let json_err = |e: serde_json::Error| Error::Json {
        path: src.to_path_buf(),
        message: e.to_string(),
    };
    let mut config: serde_json::Value = serde_json::from_str(&text).map_err(json_err)?;
    let name = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
    };
    if let Some(map) = config.as_object_mut() {
        let keys: Vec<&str> = ["dtype", "torch_dtype"]
            .into_iter()
            .filter(|k| map.contains_key(*k))
            .collect();
        for key in if keys.is_empty() {
            vec!["torch_dtype"]
        } else {
            keys
        } {
            map.insert(key.into(), name.into());
        }
    }
    let text = serde_json::to_string_pretty(&config).map_err(json_err)?;
    std::fs::write(dst, text + "\n").map_err(io(dst))
}

/// `out` may be replaced only if it is absent, empty, or an earlier export (nothing but HF
/// model files in it), and is not the base model itself: never delete a user's directory.
fn check_replaceable(out: &Path, base_dir: &Path) -> Result<()> {
    let refuse = |why: &str| Error::Io {
        path: out.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, why.to_string()),
    };
    if out.file_name().is_none() {
        return Err(refuse("not a directory name an export can be written to"));
    }
    if !out.exists() {
        return Ok(());
    }
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if y.starts_with(&x));
    if same(out, base_dir) {
        return Err(refuse(
            "is (or contains) the base model; choose another output directory",
        ));
    }
    let entries = std::fs::read_dir(out).map_err(io(out))?;
    for entry in entries {
        let name = entry
            .map_err(io(out))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let is_weights = name.starts_with("model")
            && (name.ends_with(".safetensors") || name.ends_with(".index.json"));
        if !is_weights && !COMPANION_FILES.contains(&name.as_str()) {
            return Err(refuse(&format!(
                "exists and holds `{name}`, which an export does not write; refusing to replace it"
            )));
        }
    }
    Ok(())
}

/// `out` with a `.tmp-<pid>` suffix, in the same parent directory (same filesystem).
pub fn sibling_tmp(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Move a finished directory into place, replacing what was there.
pub fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::rename(tmp, out).map_err(io(out))
}
