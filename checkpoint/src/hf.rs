//! Hugging Face model directories: `model.safetensors`, or shards named by
//! `model.safetensors.index.json`, laid out exactly as transformers'
//! `save_pretrained` writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::atomic::atomic_write;
use crate::host::{DType, HostTensor, TensorMap};
use crate::safetensors_io::{check_lengths, read_safetensors_with_dtypes, write_entries};
use crate::Error;

/// The single-file weights name transformers uses.
pub(crate) const SINGLE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub(crate) const INDEX: &str = "model.safetensors.index.json";

/// Everything [`load_hf_weights`] read from a model directory.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedWeights {
    /// The weights, converted to f32.
    pub tensors: TensorMap,
    /// The on-disk dtype of each tensor.
    pub dtypes: BTreeMap<String, DType>,
    /// Which file each key came from (for error messages).
    pub files: BTreeMap<String, PathBuf>,
}

/// The parts of `model.safetensors.index.json` this crate uses; other
/// fields (`metadata`) are ignored.
#[derive(serde::Deserialize)]
struct IndexIn {
    weight_map: BTreeMap<String, String>,
}

#[derive(serde::Serialize)]
struct IndexOut<'a> {
    metadata: IndexMetadata,
    weight_map: BTreeMap<&'a str, &'a str>,
}

#[derive(serde::Serialize)]
struct IndexMetadata {
    total_size: u64,
}

/// Load all weights of a Hugging Face model directory.
///
/// A sharded checkpoint (a `manifest.json`, as `launch convert` or training write) is read
/// too: its model weights, not its training state.
/// Otherwise reads `model.safetensors` if present (transformers prefers it too), else
/// `model.safetensors.index.json` and every shard its `weight_map` names.
/// Errors: neither file present ([`Error::NoWeights`]); a shard the index
/// names is missing ([`Error::Io`] with its path); a shard lacks a key the
/// index assigns to it, holds a key the index does not list, or holds a key
/// the index assigns to another shard, which covers a key duplicated across
/// shards ([`Error::IndexMismatch`]).
pub fn load_hf_weights(dir: &Path) -> Result<LoadedWeights, Error> {
    if dir.join(crate::sharded::MANIFEST).is_file() {
        return crate::sharded::load_model_weights(dir);
    }
    let weights = WeightFiles::find(dir)?;
    let mut out = LoadedWeights {
        tensors: TensorMap::new(),
        dtypes: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    for shard in &weights.shards {
        let path = dir.join(shard);
        let (tensors, dtypes) = read_safetensors_with_dtypes(&path)?;
        weights.check_shard(shard, &path, tensors.keys().map(String::as_str))?;
        for key in tensors.keys() {
            out.files.insert(key.clone(), path.clone());
        }
        out.tensors.extend(tensors);
        out.dtypes.extend(dtypes);
    }
    Ok(out)
}

/// Check a model directory's weight files as [`load_hf_weights`] would read them, without
/// reading their data: every file present, every header sound and inside its file, every
/// index entry in its shard (a sharded checkpoint: its manifest and files).
pub fn check_hf_weights(dir: &Path) -> Result<(), Error> {
    if dir.join(crate::sharded::MANIFEST).is_file() {
        crate::sharded::Checkpoint::open(dir, false)?;
        return Ok(());
    }
    let weights = WeightFiles::find(dir)?;
    for shard in &weights.shards {
        let path = dir.join(shard);
        let names = crate::safetensors_io::check_safetensors(&path)?;
        weights.check_shard(shard, &path, names.iter().map(String::as_str))?;
    }
    Ok(())
}

fn present(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|e| Error::io(path, e))
}

/// The weight files of an HF model directory: `model.safetensors` if present (transformers
/// prefers it too), else the shards `model.safetensors.index.json` names.
pub(crate) struct WeightFiles {
    /// File names in the directory.
    pub shards: Vec<String>,
    /// The index's path and its `weight_map`, when sharded.
    index: Option<(PathBuf, BTreeMap<String, String>)>,
}

impl WeightFiles {
    pub(crate) fn find(dir: &Path) -> Result<Self, Error> {
        let single = dir.join(SINGLE);
        if present(&single)? {
            return Ok(Self {
                shards: vec![SINGLE.to_string()],
                index: None,
            });
        }
        let index_path = dir.join(INDEX);
        if !present(&index_path)? {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let text = fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: IndexIn = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index_path.clone(),
            source,
        })?;
        if index.weight_map.is_empty() {
            return Err(Error::InvalidIndex {
                file: index_path,
                reason: "weight_map is empty".to_string(),
            });
        }
        let mut shards = BTreeSet::new();
        for (key, shard) in &index.weight_map {
            let mut parts = Path::new(shard).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(Error::IndexMismatch {
                    file: index_path,
                    key: key.clone(),
                    reason: format!(
                        "shard `{shard}` is not a plain file name in the model directory"
                    ),
                });
            }
            shards.insert(shard.clone());
        }
        Ok(Self {
            shards: shards.into_iter().collect(),
            index: Some((index_path, index.weight_map)),
        })
    }

    /// Shard `shard` (at `path`) must hold exactly the `keys` the index assigns to it.
    pub(crate) fn check_shard<'a>(
        &self,
        shard: &str,
        path: &Path,
        keys: impl Iterator<Item = &'a str>,
    ) -> Result<(), Error> {
        let Some((index_path, weight_map)) = &self.index else {
            return Ok(());
        };
        let mismatch = |key: &str, reason: String| Error::IndexMismatch {
            file: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let mut held = BTreeSet::new();
        for key in keys {
            match weight_map.get(key) {
                None => {
                    return Err(mismatch(
                        key,
                        format!(
                            "present in the shard but not listed in {}",
                            index_path.display()
                        ),
                    ))
                }
                Some(owner) if owner != shard => {
                    return Err(mismatch(
                        key,
                        format!("present in this shard but {INDEX} assigns it to `{owner}`"),
                    ))
                }
                Some(_) => held.insert(key),
            };
        }
        let promised = weight_map.iter().filter(|(_, s)| *s == shard);
        if let Some((missing, _)) = promised
            .into_iter()
            .find(|(k, _)| !held.contains(k.as_str()))
        {
            return Err(mismatch(
                missing,
                format!("{INDEX} assigns it to this shard but the shard does not contain it"),
            ));
        }
        Ok(())
    }
}

/// Save `tensors` as a Hugging Face model directory (created if missing).
///
/// Shards exactly as transformers does (huggingface_hub's
/// `split_state_dict_into_shards`): tensors in key order fill a shard until
/// the next would push it past `max_shard_bytes`; a tensor larger than that
/// gets a shard of its own. One shard is written as `model.safetensors`;
/// several as `model-00001-of-0000N.safetensors` plus
/// `model.safetensors.index.json` (`{"metadata":{"total_size":N},"weight_map":{...}}`,
/// 2-space indent, sorted keys, trailing newline), written last. Weight
/// files of an earlier save that the new layout does not use are removed.
/// Each file is written atomically.
pub fn save_hf_weights(
    dir: &Path,
    tensors: &TensorMap,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<(), Error> {
    let entries: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    // Fail before writing any shard if a tensor is inconsistent.
    check_lengths(&dir.join(SINGLE), &entries)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let no_metadata = BTreeMap::new();
    let sizes: Vec<(&str, u64)> = entries
        .iter()
        .map(|&(k, t)| {
            let bytes = (t.data.len() as u64).saturating_mul(dtype.size_in_bytes() as u64);
            (k, bytes)
        })
        .collect();
    let (plan, total_size) = plan_shards(&sizes, max_shard_bytes);
    let shards: Vec<Vec<(&str, &HostTensor)>> = plan
        .iter()
        .map(|keys| keys.iter().map(|&k| (k, &tensors[k])).collect())
        .collect();

    if shards.len() <= 1 {
        write_entries(&dir.join(SINGLE), &entries, dtype, &no_metadata)?;
        return remove_stale(dir, &BTreeSet::from([SINGLE.to_string()]));
    }

    let names = shard_names(shards.len());
    let mut weight_map: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, shard) in names.iter().zip(&shards) {
        write_entries(&dir.join(name), shard, dtype, &no_metadata)?;
        weight_map.extend(shard.iter().map(|&(key, _)| (key, name.as_str())));
    }
    let mut keep: BTreeSet<String> = names.iter().cloned().collect();
    keep.insert(INDEX.to_string());
    // Remove a stale model.safetensors before the index appears, so a
    // reader never prefers an old single file over the new shards.
    remove_stale(dir, &keep)?;
    let index_path = dir.join(INDEX);
    atomic_write(
        &index_path,
        index_json(&index_path, total_size, weight_map)?.as_bytes(),
    )
}

/// The file names of `n` shards: `model.safetensors` alone, else
/// `model-00001-of-0000N.safetensors`, ….
pub(crate) fn shard_names(n: usize) -> Vec<String> {
    if n <= 1 {
        return vec![SINGLE.to_string()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// `model.safetensors.index.json` as transformers writes it (2-space indent, sorted keys,
/// trailing newline).
pub(crate) fn index_json(
    path: &Path,
    total_size: u64,
    weight_map: BTreeMap<&str, &str>,
) -> Result<String, Error> {
    let index = IndexOut {
        metadata: IndexMetadata { total_size },
        weight_map,
    };
    let mut json = serde_json::to_string_pretty(&index).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    json.push('\n');
    Ok(json)
}

/// Split tensors (name, size in bytes), in order, into shards the way huggingface_hub
/// does: fill a shard until the next tensor would push it past `max_shard_bytes`; a
/// tensor larger than that gets a shard of its own. Also returns the total size.
pub(crate) fn plan_shards<'a>(
    sizes: &[(&'a str, u64)],
    max_shard_bytes: u64,
) -> (Vec<Vec<&'a str>>, u64) {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    let mut total = 0u64;
    for &(key, size) in sizes {
        total = total.saturating_add(size);
        if size > max_shard_bytes {
            shards.push(vec![key]);
            continue;
        }
        if current_size + size > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(key);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    (shards, total)
}

/// Whether `name` is one of the weight files [`save_hf_weights`] writes.
fn is_weights_file(name: &str) -> bool {
    if name == SINGLE || name == INDEX {
        return true;
    }
    // model-NNNNN-of-NNNNN.safetensors (5 or more digits each)
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(rest.split_once("-of-"), Some((a, b)) if digits(a) && digits(b))
}

/// Delete weight files in `dir` that are not in `keep`.
fn remove_stale(dir: &Path, keep: &BTreeSet<String>) -> Result<(), Error> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_weights_file(name) && !keep.contains(name) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
