//! PEFT LoRA adapter directories: `adapter_config.json` plus
//! `adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained`.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use crate::atomic::{atomic_write, parent_dir, sibling_temp_path, sync_parent_dir};
use crate::host::{DType, HostTensor, TensorMap};
use crate::peft_config::{check_raw, AdapterConfig};
use crate::safetensors_io::{check_lengths, read_safetensors, write_entries};
use crate::Error;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
const WEIGHTS_BIN: &str = "adapter_model.bin";
/// PEFT's prefix for every adapter key (`PeftModel.base_model.model`).
const KEY_PREFIX: &str = "base_model.model.";

/// Write `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32),
/// creating `dir`'s parent directories if needed.
///
/// Keys are given already in PEFT form, e.g.
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` with
/// shape `[r, in]`, and `...lora_B.weight` with shape `[out, r]`.
///
/// Both files are staged in a temporary directory next to `dir`. If `dir`
/// does not exist the staging directory is renamed to it, so a failed save
/// leaves nothing. If it exists (other files in it are kept), its old
/// `adapter_config.json` is removed first and the new one is moved in last,
/// so an interrupted save leaves a directory that fails to load rather
/// than a mismatched adapter.
pub fn save_peft_adapter(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &TensorMap,
) -> Result<(), Error> {
    config.check_supported(&dir.join(CONFIG))?;
    check_tensors(&dir.join(WEIGHTS), config, tensors)?;
    let entries: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    check_lengths(&dir.join(WEIGHTS), &entries)?;
    let mut json = serde_json::to_string_pretty(config).map_err(|source| Error::Json {
        path: dir.join(CONFIG),
        source,
    })?;
    json.push('\n');

    let parent = parent_dir(dir);
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let stage = sibling_temp_path(dir, "tmp")?;
    let result = stage_and_commit(dir, &stage, json.as_bytes(), &entries);
    if result.is_err() {
        let _ = fs::remove_dir_all(&stage);
    }
    result
}

fn stage_and_commit(
    dir: &Path,
    stage: &Path,
    config_json: &[u8],
    entries: &[(&str, &HostTensor)],
) -> Result<(), Error> {
    fs::create_dir(stage).map_err(|e| Error::io(stage, e))?;
    write_entries(&stage.join(WEIGHTS), entries, DType::F32, &BTreeMap::new())?;
    atomic_write(&stage.join(CONFIG), config_json)?;

    let exists = dir.try_exists().map_err(|e| Error::io(dir, e))?;
    if !exists {
        fs::rename(stage, dir).map_err(|e| Error::io(dir, e))?;
        sync_parent_dir(dir);
        return Ok(());
    }
    let config_path = dir.join(CONFIG);
    match fs::remove_file(&config_path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(Error::io(&config_path, e)),
        _ => {}
    }
    let weights_path = dir.join(WEIGHTS);
    fs::rename(stage.join(WEIGHTS), &weights_path).map_err(|e| Error::io(&weights_path, e))?;
    fs::rename(stage.join(CONFIG), &config_path).map_err(|e| Error::io(&config_path, e))?;
    sync_parent_dir(&config_path);
    // The staging directory is empty now; failing to remove it is harmless.
    let _ = fs::remove_dir(stage);
    Ok(())
}

/// Read a PEFT LoRA adapter directory written by PEFT or [`save_peft_adapter`].
///
/// Only `adapter_model.safetensors` is read; a directory with only
/// `adapter_model.bin` gets [`Error::UnsupportedAdapter`] asking for a
/// conversion. Adapters using features outside plain LoRA (`peft_type`
/// other than `"LORA"`, non-empty `rank_pattern`/`alpha_pattern`/
/// `modules_to_save`, `fan_in_fan_out`, `bias` other than `"none"`, DoRA,
/// LoRA bias, ...) get [`Error::UnsupportedAdapter`] naming the field.
/// Tensor shapes are checked against `r` ([`Error::InvalidAdapter`]).
pub fn load_peft_adapter(dir: &Path) -> Result<(AdapterConfig, TensorMap), Error> {
    let config_path = dir.join(CONFIG);
    let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let json_err = |source| Error::Json {
        path: config_path.clone(),
        source,
    };
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(json_err)?;
    check_raw(&raw, &config_path)?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(json_err)?;
    config.check_supported(&config_path)?;

    let weights_path = dir.join(WEIGHTS);
    let has_weights = weights_path
        .try_exists()
        .map_err(|e| Error::io(&weights_path, e))?;
    let bin_path = dir.join(WEIGHTS_BIN);
    if !has_weights && bin_path.exists() {
        return Err(Error::UnsupportedAdapter {
            file: bin_path,
            reason: format!(
                "only {WEIGHTS} is supported; convert the adapter (load it with peft and call \
                 save_pretrained(..., safe_serialization=True))"
            ),
        });
    }
    let tensors = read_safetensors(&weights_path)?;
    check_tensors(&weights_path, &config, &tensors)?;
    Ok((config, tensors))
}

/// Check keys and LoRA shapes against the config.
fn check_tensors(file: &Path, config: &AdapterConfig, tensors: &TensorMap) -> Result<(), Error> {
    let r = config.r;
    for (key, t) in tensors {
        let invalid = |reason: String| Error::InvalidAdapter {
            file: file.to_path_buf(),
            key: key.clone(),
            reason,
        };
        if !key.starts_with(KEY_PREFIX) {
            return Err(invalid(format!(
                "PEFT adapter keys must start with `{KEY_PREFIX}`"
            )));
        }
        // Which dim of a LoRA factor holds the rank.
        let rank_dim = if key.ends_with(".lora_A.weight") || key.ends_with(".lora_embedding_A") {
            Some(0)
        } else if key.ends_with(".lora_B.weight") || key.ends_with(".lora_embedding_B") {
            Some(1)
        } else {
            None
        };
        if let Some(dim) = rank_dim {
            if t.shape.len() != 2 || t.shape[dim] != r {
                let want = if dim == 0 { "[r, in]" } else { "[out, r]" };
                return Err(invalid(format!(
                    "shape {:?} does not match {want} with r = {r}",
                    t.shape
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
