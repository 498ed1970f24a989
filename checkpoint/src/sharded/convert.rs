//! Conversion between Hugging Face model directories and sharded checkpoints, and from one
//! sharded layout to another: tensor bytes copied box by box in their own dtype, one
//! tensor (or one box of it) in memory at a time, read with positioned reads.
//!
//! Outputs are built in a hidden sibling directory and renamed into place, so an
//! interrupted conversion leaves no directory that looks complete.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::file::BoxFile;
use super::write::{check_cover, hex};
use super::MANIFEST;
use super::{
    each_in_parallel, Checkpoint, FileEntry, Manifest, Piece, ShardWriter, Slice, TensorEntry,
};
use crate::atomic::{parent_dir, sibling_temp_path, sync_parent_dir};
use crate::hf::{index_json, plan_shards, shard_names, WeightFiles, INDEX};
use crate::{DType, Error, HostTensor, LoadedWeights, TensorMap};

/// Tensors to convert: their dtypes and global shapes, and any box of each as stored.
pub trait Source: Sync {
    /// Every tensor: name → (dtype, global shape).
    fn tensors(&self) -> BTreeMap<String, (DType, Vec<usize>)>;
    /// The box `want` of tensor `name`, row-major bytes in its dtype.
    fn read_bytes(&self, name: &str, want: &Slice) -> Result<Vec<u8>, Error>;
}

impl Source for Checkpoint {
    fn tensors(&self) -> BTreeMap<String, (DType, Vec<usize>)> {
        self.manifest
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), (t.dtype, t.shape.clone())))
            .collect()
    }

    fn read_bytes(&self, name: &str, want: &Slice) -> Result<Vec<u8>, Error> {
        Ok(Checkpoint::read_bytes(self, name, want)?)
    }
}

/// A Hugging Face model directory: every weight file's header parsed once, boxes read
/// with positioned reads.
pub struct HfDir {
    pub dir: PathBuf,
    files: Vec<BoxFile>,
    /// Tensor → index in `files`, dtype.
    tensors: BTreeMap<String, (usize, DType)>,
}

impl HfDir {
    /// Open `model.safetensors`, or the shards `model.safetensors.index.json` names (each
    /// must hold exactly the tensors the index gives it), as [`crate::load_hf_weights`] does.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let weights = WeightFiles::find(dir)?;
        let mut out = Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for shard in &weights.shards {
            let path = dir.join(shard);
            let file = BoxFile::open(&path).map_err(|message| Error::Safetensors {
                file: path.clone(),
                message,
            })?;
            weights.check_shard(shard, &path, file.tensors.keys().map(String::as_str))?;
            for (key, stored) in &file.tensors {
                let dtype = stored.dtype.ok_or_else(|| Error::UnsupportedDtype {
                    file: path.clone(),
                    key: key.clone(),
                    dtype: stored.dtype_name.clone(),
                })?;
                out.tensors.insert(key.clone(), (out.files.len(), dtype));
            }
            out.files.push(file);
        }
        Ok(out)
    }
}

impl Source for HfDir {
    fn tensors(&self) -> BTreeMap<String, (DType, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|(k, &(f, dtype))| (k.clone(), (dtype, self.files[f].tensors[k].shape.clone())))
            .collect()
    }

    fn read_bytes(&self, name: &str, want: &Slice) -> Result<Vec<u8>, Error> {
        let &(f, dtype) = self.tensors.get(name).ok_or_else(|| Error::Convert {
            file: self.dir.clone(),
            reason: format!("no tensor `{name}`"),
        })?;
        let file = &self.files[f];
        let whole = Slice::whole(&file.tensors[name].shape);
        if !want.fits(&whole.len) {
            return Err(Error::Convert {
                file: file.path.clone(),
                reason: format!("`{name}` is {:?}; {want:?} is not inside it", whole.len),
            });
        }
        let size = dtype.size_in_bytes();
        let mut out = vec![0u8; want.numel() * size];
        file.copy(name, &whole, &mut out, want, want, size)
            .map_err(|e| Error::io(&file.path, e))?;
        Ok(out)
    }
}

/// A tensor of the model itself: not AdamW state (`optimizer.…`), not a LoRA adapter.
pub fn is_model_tensor(name: &str) -> bool {
    !name.starts_with("optimizer.") && !name.contains(".lora_A.") && !name.contains(".lora_B.")
}

/// The model weights of the sharded checkpoint in `dir` as whole f32 tensors, as
/// [`crate::load_hf_weights`] reads an HF directory (which it does for a checkpoint).
pub fn load_model_weights(dir: &Path) -> Result<LoadedWeights, Error> {
    let ckpt = Checkpoint::open(dir, true)?;
    let mut out = LoadedWeights {
        tensors: TensorMap::new(),
        dtypes: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    for (name, t) in &ckpt.manifest.tensors {
        if !is_model_tensor(name) {
            continue;
        }
        let data = ckpt.read(name, &Slice::whole(&t.shape))?;
        out.tensors
            .insert(name.clone(), HostTensor::new(t.shape.clone(), data));
        out.dtypes.insert(name.clone(), t.dtype);
        let file = t.pieces.first().map_or(MANIFEST, |p| p.file.as_str());
        out.files.insert(name.clone(), dir.join(file));
    }
    Ok(out)
}

/// The files of an HF model directory besides the weights that a converted model carries
/// along: its config, generation config and tokenizer files (`*.json`, `*.txt`, `*.model`,
/// `*.jinja`, `*.tiktoken`), by name.
pub fn model_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(String::from) else {
            continue;
        };
        let kept = ["json", "txt", "model", "jinja", "tiktoken"]
            .iter()
            .any(|ext| name.ends_with(&format!(".{ext}")));
        if kept && path.is_file() && name != INDEX && name != MANIFEST && !name.starts_with('.') {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The boxes each output file holds: file name → (tensor, box), in file order.
pub type Placement = BTreeMap<String, Vec<(String, Slice)>>;

/// Write `src` as a sharded checkpoint at `out` (which must not exist, or be an empty
/// directory): the files and boxes `placement` says, each tensor in its source dtype, the
/// `extras` copied along, then the manifest; checked to cover every tensor exactly once.
pub fn write_sharded(
    src: &dyn Source,
    placement: &Placement,
    out: &Path,
    step: u64,
    state: serde_json::Value,
    extras: &[(String, PathBuf)],
) -> Result<Manifest, Error> {
    let all = src.tensors();
    build(out, |staging| {
        let mut manifest = Manifest::new(step, state);
        manifest.extras = copy_extras(extras, staging)?;
        let mut layouts = Vec::with_capacity(placement.len());
        for (file, pieces) in placement {
            let mut layout = Vec::with_capacity(pieces.len());
            for (name, slice) in pieces {
                let (dtype, shape) = all.get(name).ok_or_else(|| Error::Convert {
                    file: staging.join(file),
                    reason: format!("no tensor `{name}` in the source"),
                })?;
                layout.push((name.clone(), *dtype, slice.len.clone()));
                let entry = manifest
                    .tensors
                    .entry(name.clone())
                    .or_insert_with(|| TensorEntry {
                        shape: shape.clone(),
                        dtype: *dtype,
                        pieces: Vec::new(),
                    });
                entry.pieces.push(Piece {
                    file: file.clone(),
                    slice: slice.clone(),
                });
            }
            layouts.push((file, pieces, layout));
        }
        let written = each_in_parallel(&layouts, |(file, pieces, layout)| {
            let mut w = ShardWriter::create(&staging.join(file), layout)?;
            for (name, slice) in pieces.iter() {
                w.append(&src.read_bytes(name, slice)?)?;
            }
            w.finish()
        })?;
        for ((file, _, _), entry) in layouts.iter().zip(written) {
            manifest.files.insert((*file).clone(), entry);
        }
        if let Some(name) = all.keys().find(|n| !manifest.tensors.contains_key(*n)) {
            return Err(Error::Convert {
                file: out.to_path_buf(),
                reason: format!("the placement leaves out tensor `{name}`"),
            });
        }
        check_cover(&manifest.tensors, out)?;
        let path = staging.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        write_synced(&path, &bytes)?;
        Ok(manifest)
    })
}

/// Write the tensors `names` of `src` as a Hugging Face model directory at `out` (which
/// must not exist, or be an empty directory): shards of at most `max_shard_bytes` split
/// as transformers splits them, `model.safetensors.index.json` when there are several,
/// each tensor in its source dtype, and the `extras` copied along. The number of weight
/// files written.
pub fn write_hf(
    src: &dyn Source,
    names: &[String],
    out: &Path,
    max_shard_bytes: u64,
    extras: &[(String, PathBuf)],
) -> Result<usize, Error> {
    let all = src.tensors();
    let mut sizes = Vec::with_capacity(names.len());
    for name in names {
        let (dtype, shape) = all.get(name).ok_or_else(|| Error::Convert {
            file: out.to_path_buf(),
            reason: format!("no tensor `{name}` in the source"),
        })?;
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        sizes.push((name.as_str(), bytes as u64));
    }
    let (shards, total) = plan_shards(&sizes, max_shard_bytes);
    let files = shard_names(shards.len());
    build(out, |staging| {
        copy_extras(extras, staging)?;
        let jobs: Vec<(&String, &Vec<&str>)> = files.iter().zip(&shards).collect();
        each_in_parallel(&jobs, |&(file, shard)| {
            let layout: Vec<(String, DType, Vec<usize>)> = shard
                .iter()
                .map(|&n| (n.to_string(), all[n].0, all[n].1.clone()))
                .collect();
            let path = staging.join(file);
            let metadata = serde_json::json!({"format": "pt"});
            let mut w = ShardWriter::with_metadata(&path, &layout, metadata)?;
            for &name in shard {
                w.append(&src.read_bytes(name, &Slice::whole(&all[name].1))?)?;
            }
            w.finish()
        })?;
        let mut weight_map = BTreeMap::new();
        for (file, shard) in &jobs {
            weight_map.extend(shard.iter().map(|&n| (n, file.as_str())));
        }
        if files.len() > 1 {
            let path = staging.join(INDEX);
            write_synced(&path, index_json(&path, total, weight_map)?.as_bytes())?;
        }
        Ok(files.len())
    })
}

/// Run `fill` on a fresh hidden directory next to `out`, then rename it to `out`; on any
/// error the hidden directory is removed and `out` is left as it was.
fn build<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T, Error>) -> Result<T, Error> {
    let occupied = fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied || out.is_file() {
        return Err(Error::Convert {
            file: out.to_path_buf(),
            reason: "already exists and is not empty; give a new directory".into(),
        });
    }
    let parent = parent_dir(out);
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = sibling_temp_path(out, "partial")?;
    fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let done = fill(&staging).and_then(|v| {
        if out.is_dir() {
            fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
        sync_parent_dir(out);
        Ok(v)
    });
    if done.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    done
}

/// Copy each `(name, path)` into `dir` as `name`, hashing as it goes.
pub fn copy_extras(
    extras: &[(String, PathBuf)],
    dir: &Path,
) -> Result<BTreeMap<String, FileEntry>, Error> {
    let mut out = BTreeMap::new();
    for (name, from) in extras {
        let to = dir.join(name);
        let mut input = File::open(from).map_err(|e| Error::io(from, e))?;
        let mut output = File::create(&to).map_err(|e| Error::io(&to, e))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut bytes = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(|e| Error::io(from, e))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            output.write_all(&buf[..n]).map_err(|e| Error::io(&to, e))?;
            bytes += n as u64;
        }
        output.sync_all().map_err(|e| Error::io(&to, e))?;
        let sha256 = hex(&hash.finalize());
        out.insert(name.clone(), FileEntry { bytes, sha256 });
    }
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}
