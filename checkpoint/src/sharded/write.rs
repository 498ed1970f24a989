//! Writing a checkpoint: each rank's shard (streamed, hashed as it goes), its part file,
//! the commit (manifest last, then an atomic rename) and retention.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{committed, dir_name, encode, FileEntry, Manifest, TensorEntry, FORMAT, MANIFEST};
use crate::atomic::{atomic_write, sync_parent_dir};
use crate::{DType, Error};

/// Test-only fault injection: when `TIDEMILL_CRASH_AT` names `point`, the process aborts
/// there, as a power cut or a SIGKILL would leave it. The points are `before_shards`,
/// `between_shards` (after this rank's shard, before its part file), `before_manifest`
/// and `before_rename`.
/// Compiled only with the `test-hooks` feature (the project's tests turn it on; release
/// builds have no such hook).
#[cfg(feature = "test-hooks")]
pub fn crash_point(point: &str) {
    if std::env::var("TIDEMILL_CRASH_AT").is_ok_and(|v| v == point) {
        eprintln!("TIDEMILL_CRASH_AT={point}: aborting here");
        std::process::abort();
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn crash_point(_point: &str) {}

/// Writes one safetensors file front to back: the header (from the tensors' names, dtypes
/// and shapes, given up front), then each tensor's bytes in that order, hashing as it
/// goes, so no tensor needs to be held whole and the file is never read back.
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    written: u64,
    total: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, tensors: &[(String, DType, Vec<usize>)]) -> Result<Self, Error> {
        Self::with_metadata(
            path,
            tensors,
            serde_json::json!({"format": "pt", "writer": FORMAT}),
        )
    }

    /// [`ShardWriter::create`] with the header's `__metadata__` given (string values).
    pub fn with_metadata(
        path: &Path,
        tensors: &[(String, DType, Vec<usize>)],
        metadata: serde_json::Value,
    ) -> Result<Self, Error> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), metadata);
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let bytes = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
            let dtype = match dtype {
                DType::F32 => "F32",
                DType::BF16 => "BF16",
                DType::F16 => "F16",
            };
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut head = serde_json::to_vec(&header).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        // The data starts 8-aligned, as the safetensors writers leave it.
        while (head.len() + 8) % 8 != 0 {
            head.push(b' ');
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            written: 0,
            total: 0,
        };
        w.append(&(head.len() as u64).to_le_bytes())?;
        w.append(&head)?;
        w.total = w.written + offset;
        Ok(w)
    }

    /// The next bytes of the data, in the order the tensors were declared.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// [`ShardWriter::append`] of values encoded in `dtype`.
    pub fn append_f32(&mut self, values: &[f32], dtype: DType) -> Result<(), Error> {
        self.append(&encode(values, dtype))
    }

    /// Flush and fsync; the file's size and hash.
    pub fn finish(self) -> Result<FileEntry, Error> {
        let path = self.path;
        if self.written != self.total {
            return Err(Error::Safetensors {
                file: path,
                message: format!(
                    "{} bytes written where the header announces {}",
                    self.written, self.total
                ),
            });
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok(FileEntry {
            bytes: self.written,
            sha256: hex(&self.hash.finalize()),
        })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one rank wrote into the staging directory: its files and the pieces in them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub files: BTreeMap<String, FileEntry>,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Files copied along (config, tokenizer): see [`super::Manifest::extras`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extras: BTreeMap<String, FileEntry>,
}

/// The staging directory of the checkpoint of `step` under `root` (created; hidden, so
/// never taken for a checkpoint).
pub fn stage(root: &Path, step: u64) -> Result<PathBuf, Error> {
    let dir = root.join(format!(".{}.staging", dir_name(step)));
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Remove staging directories left by saves that never committed.
pub fn clean_staging(root: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".step-") && name.ends_with(".staging") {
            fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

fn part_path(staging: &Path, rank: usize) -> PathBuf {
    staging.join(format!("rank-{rank:05}.part.json"))
}

/// Record what rank `rank` wrote (after its files are complete and synced): the sign the
/// committer waits for.
pub fn write_part(staging: &Path, rank: usize, part: &Part) -> Result<(), Error> {
    let path = part_path(staging, rank);
    let bytes = serde_json::to_vec(part).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    atomic_write(&path, &bytes)
}

/// Once all `ranks` parts are in `staging` (waiting up to `timeout`), write the manifest
/// and move the directory into place as `root/step-…`; the committed directory.
pub fn commit(
    root: &Path,
    staging: &Path,
    step: u64,
    ranks: usize,
    state: serde_json::Value,
    timeout: Duration,
) -> Result<PathBuf, Error> {
    let deadline = Instant::now() + timeout;
    let paths: Vec<PathBuf> = (0..ranks).map(|r| part_path(staging, r)).collect();
    while let Some(missing) = paths.iter().find(|p| !p.exists()) {
        if Instant::now() > deadline {
            return Err(Error::io(
                missing,
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("this rank's part of the checkpoint did not come within {timeout:?}"),
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut manifest = Manifest::new(step, state);
    for path in &paths {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let part: Part = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        manifest.files.extend(part.files);
        manifest.extras.extend(part.extras);
        for (name, t) in part.tensors {
            match manifest.tensors.get_mut(&name) {
                Some(have)
                    if (have.shape.as_slice(), have.dtype) != (t.shape.as_slice(), t.dtype) =>
                {
                    return Err(Error::IndexMismatch {
                        file: path.clone(),
                        key: name,
                        reason: format!(
                            "shape {:?} {:?} here, {:?} {:?} in another rank's part",
                            t.shape, t.dtype, have.shape, have.dtype
                        ),
                    })
                }
                Some(have) => have.pieces.extend(t.pieces),
                None => {
                    manifest.tensors.insert(name, t);
                }
            }
        }
    }
    check_cover(&manifest.tensors, staging)?;
    crash_point("before_manifest");
    let path = staging.join(MANIFEST);
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    atomic_write(&path, &bytes)?;
    for p in &paths {
        fs::remove_file(p).map_err(|e| Error::io(p, e))?;
    }
    crash_point("before_rename");
    let target = root.join(dir_name(step));
    if target.exists() {
        // The same step saved again (a resumed run ending where it resumed): keep the
        // first, which is complete.
        fs::remove_dir_all(staging).map_err(|e| Error::io(staging, e))?;
        return Ok(target);
    }
    fs::rename(staging, &target).map_err(|e| Error::io(&target, e))?;
    sync_parent_dir(&target);
    Ok(target)
}

/// Every tensor's pieces must lie inside it and hold as many elements as it has (each
/// exactly once); `at` is named in the error.
pub(crate) fn check_cover(tensors: &BTreeMap<String, TensorEntry>, at: &Path) -> Result<(), Error> {
    for (name, t) in tensors {
        let covered: usize = t.pieces.iter().map(|p| p.slice.numel()).sum();
        let whole: usize = t.shape.iter().product();
        if covered != whole || !t.pieces.iter().all(|p| p.slice.fits(&t.shape)) {
            return Err(Error::IndexMismatch {
                file: at.to_path_buf(),
                key: name.clone(),
                reason: format!(
                    "the ranks' pieces hold {covered} of its {whole} elements (each exactly once, \
                     inside {:?}, is needed)",
                    t.shape
                ),
            });
        }
    }
    Ok(())
}

/// Delete committed checkpoints beyond the newest `keep_last` (at least the newest one
/// always stays); the deleted directories.
pub fn retire(root: &Path, keep_last: usize) -> Result<Vec<PathBuf>, Error> {
    let all = committed(root);
    let keep = keep_last.max(1);
    let old = all.len().saturating_sub(keep);
    let mut gone = Vec::new();
    for (_, dir) in all.into_iter().take(old) {
        fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        gone.push(dir);
    }
    Ok(gone)
}
