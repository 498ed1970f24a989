//! tidemill's sharded checkpoint format: one safetensors file per rank plus a JSON
//! manifest, written last, that says for every global tensor its shape, dtype and which
//! box of it each file holds (see `checkpoint/README.md`).
//!
//! Saving goes to a hidden staging directory; each rank writes its file and then a small
//! part file naming what it wrote and its checksum; one committer merges the parts into the
//! manifest and renames the directory into place, so a checkpoint directory either has a
//! manifest whose files verify or is not one ([`latest`] skips it, saying why).
//! Reading assembles any box of any tensor from the pieces that overlap it (positioned reads),
//! so a rank of a different layout reads only the bytes it needs.

mod convert;
mod file;
mod read;
mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

pub use convert::{
    copy_extras, is_model_tensor, load_model_weights, model_files, write_hf, write_sharded, HfDir,
    Placement, Source,
};
pub use read::{latest, Checkpoint, Skipped};
pub use write::{clean_staging, commit, crash_point, retire, stage, write_part, Part, ShardWriter};

use crate::DType;

/// `format` of every manifest.
pub const FORMAT: &str = "tidemill-sharded";
/// Version of the layout described here; readers refuse others.
pub const VERSION: u32 = 1;
/// Name of the manifest in a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";

/// A box of a tensor: `len[d]` entries from `start[d]` along each dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
}

impl Slice {
    /// The whole of a tensor of `shape`.
    pub fn whole(shape: &[usize]) -> Self {
        Self {
            start: vec![0; shape.len()],
            len: shape.to_vec(),
        }
    }

    /// `len` entries from `start` along `dim`, all of the others.
    pub fn along(shape: &[usize], dim: usize, start: usize, len: usize) -> Self {
        let mut s = Self::whole(shape);
        s.start[dim] = start;
        s.len[dim] = len;
        s
    }

    pub fn numel(&self) -> usize {
        self.len.iter().product()
    }

    /// The part of `self` also in `other`, if any.
    pub fn intersect(&self, other: &Slice) -> Option<Slice> {
        let mut out = Slice {
            start: Vec::with_capacity(self.start.len()),
            len: Vec::with_capacity(self.start.len()),
        };
        for d in 0..self.start.len() {
            let lo = self.start[d].max(other.start[d]);
            let hi = (self.start[d] + self.len[d]).min(other.start[d] + other.len[d]);
            if hi <= lo {
                return None;
            }
            out.start.push(lo);
            out.len.push(hi - lo);
        }
        Some(out)
    }

    /// Whether `self` lies inside a tensor of `shape`.
    pub fn fits(&self, shape: &[usize]) -> bool {
        self.start.len() == shape.len()
            && self.len.len() == shape.len()
            && (0..shape.len()).all(|d| self.start[d] + self.len[d] <= shape[d])
    }
}

/// One file of a checkpoint: its size and SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// One box of a tensor held by a file, stored there under the tensor's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub file: String,
    #[serde(flatten)]
    pub slice: Slice,
}

/// A global tensor: its shape and dtype, and the pieces that together cover it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub pieces: Vec<Piece>,
}

/// The manifest: everything a reader needs besides the bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Files kept next to the shards that are not tensors — the model's `config.json` and
    /// tokenizer files — checked like the shards when opened; what conversion to HF copies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extras: BTreeMap<String, FileEntry>,
    /// What the trainer needs to go on (step, data position, RNG, schedule, resolved
    /// config, parallel plan): opaque here.
    pub state: serde_json::Value,
}

impl Manifest {
    /// An empty manifest of this format and version.
    pub fn new(step: u64, state: serde_json::Value) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            step,
            files: BTreeMap::new(),
            tensors: BTreeMap::new(),
            extras: BTreeMap::new(),
            state,
        }
    }
}

/// Directory name of the committed checkpoint of `step`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a committed checkpoint directory's name, if it is one.
pub fn step_of(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_str()?;
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Committed checkpoint directories under `root`, oldest first (by step).
pub fn committed(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|p| step_of(&p).map(|s| (s, p)))
        .collect();
    out.sort();
    out
}

/// Why a checkpoint cannot be used: the file at fault and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct Damaged {
    pub file: PathBuf,
    pub reason: String,
}

/// `job` of every item, on as many threads as there are cores (files are independent, and
/// writing or checking one is CPU-bound: the copy through the page cache and the hash);
/// the results in order, or the first error.
pub(crate) fn each_in_parallel<T: Sync, R: Send, E: Send>(
    items: &[T],
    job: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<Vec<(usize, Result<R, E>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let r = job(item);
                        failed.fetch_or(r.is_err(), Ordering::Relaxed);
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut all: Vec<(usize, Result<R, E>)> = results.into_iter().flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

pub(crate) fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    use half::{bf16, f16};
    match dtype {
        DType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

pub(crate) fn decode_into(bytes: &[u8], dtype: DType, out: &mut Vec<f32>) {
    use half::{bf16, f16};
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
    }
}

#[cfg(test)]
mod tests;
