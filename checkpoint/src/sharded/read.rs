//! Reading a checkpoint: verify it (manifest, every file's presence, size and SHA-256, the
//! headers against the manifest), then read any box of any tensor from the pieces that
//! overlap it, memory-mapped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::file::BoxFile;
use super::write::hex;
use super::{
    committed, decode_into, each_in_parallel, Damaged, FileEntry, Manifest, Slice, TensorEntry,
    FORMAT, MANIFEST, VERSION,
};

/// A committed checkpoint, verified and open for reading.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    files: BTreeMap<String, BoxFile>,
}

/// A checkpoint [`latest`] passed over, and why.
#[derive(Debug)]
pub struct Skipped {
    pub dir: PathBuf,
    pub error: Damaged,
}

/// The newest checkpoint under `root` that verifies, and the newer ones that did not.
pub fn latest(root: &Path) -> (Option<Checkpoint>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    for (_, dir) in committed(root).into_iter().rev() {
        match Checkpoint::open(&dir, true) {
            Ok(c) => return (Some(c), skipped),
            Err(error) => skipped.push(Skipped { dir, error }),
        }
    }
    (None, skipped)
}

fn damaged(file: impl Into<PathBuf>, reason: impl Into<String>) -> Damaged {
    Damaged {
        file: file.into(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Open the checkpoint in `dir`; with `verify`, every file's SHA-256 is checked too
    /// (sizes and headers always are).
    pub fn open(dir: &Path, verify: bool) -> Result<Self, Damaged> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => damaged(&path, "no manifest: the save never committed"),
            _ => damaged(&path, e.to_string()),
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| damaged(&path, format!("not a manifest: {e}")))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(damaged(
                &path,
                format!(
                    "format {} version {}; this build reads {FORMAT} version {VERSION}",
                    manifest.format, manifest.version
                ),
            ));
        }
        let extras: Vec<_> = manifest.extras.iter().collect();
        each_in_parallel(&extras, |(name, want)| check_file(dir, name, want, verify))?;
        let shards: Vec<_> = manifest.files.iter().collect();
        let opened = each_in_parallel(&shards, |(name, want)| {
            let (path, _) = check_file(dir, name, want, verify)?;
            BoxFile::open(&path).map_err(|reason| damaged(&path, reason))
        })?;
        let files: BTreeMap<String, BoxFile> = shards
            .iter()
            .map(|(name, _)| (*name).clone())
            .zip(opened)
            .collect();
        let c = Self {
            dir: dir.to_path_buf(),
            manifest,
            files,
        };
        c.check_pieces()?;
        Ok(c)
    }

    /// Every piece the manifest names is in its file with the dtype and shape it says.
    fn check_pieces(&self) -> Result<(), Damaged> {
        for (name, t) in &self.manifest.tensors {
            for p in &t.pieces {
                let file = self.dir.join(&p.file);
                let shard = self.files.get(&p.file).ok_or_else(|| {
                    damaged(
                        self.dir.join(MANIFEST),
                        format!("`{name}` is in `{}`, which it does not list", p.file),
                    )
                })?;
                let stored = shard.tensors.get(name).ok_or_else(|| {
                    damaged(
                        &file,
                        format!("no tensor `{name}`, which the manifest puts here"),
                    )
                })?;
                if stored.dtype != Some(t.dtype)
                    || stored.shape != p.slice.len
                    || !p.slice.fits(&t.shape)
                {
                    return Err(damaged(
                        &file,
                        format!(
                            "`{name}` is {:?} {:?} here; the manifest says {:?} {:?} of {:?}",
                            stored.dtype, stored.shape, t.dtype, p.slice.len, t.shape
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.manifest.tensors.get(name)
    }

    /// The box `want` of tensor `name`, as f32.
    pub fn read(&self, name: &str, want: &Slice) -> Result<Vec<f32>, Damaged> {
        let dtype = self.entry(name)?.dtype;
        let bytes = self.read_bytes(name, want)?;
        let mut out = Vec::with_capacity(want.numel());
        decode_into(&bytes, dtype, &mut out);
        Ok(out)
    }

    /// The box `want` of tensor `name`, as stored (its entry's dtype), row-major.
    pub fn read_bytes(&self, name: &str, want: &Slice) -> Result<Vec<u8>, Damaged> {
        let t = self.entry(name)?;
        let manifest = self.dir.join(MANIFEST);
        if !want.fits(&t.shape) {
            return Err(damaged(
                manifest,
                format!("`{name}` is {:?}; {want:?} is not inside it", t.shape),
            ));
        }
        let size = t.dtype.size_in_bytes();
        let mut out = vec![0u8; want.numel() * size];
        let mut covered = 0;
        for p in &t.pieces {
            let Some(common) = p.slice.intersect(want) else {
                continue;
            };
            // Present: checked when opened.
            let file = &self.files[&p.file];
            file.copy(name, &p.slice, &mut out, want, &common, size)
                .map_err(|e| damaged(&file.path, e.to_string()))?;
            covered += common.numel();
        }
        if covered != want.numel() {
            return Err(damaged(
                manifest,
                format!(
                    "the pieces of `{name}` cover {covered} of the {} elements asked for",
                    want.numel()
                ),
            ));
        }
        Ok(out)
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry, Damaged> {
        self.tensor(name)
            .ok_or_else(|| damaged(self.dir.join(MANIFEST), format!("no tensor `{name}`")))
    }
}

/// Open `name` of the checkpoint in `dir`, checking that it stays in the directory and has
/// the size (and, with `verify`, the SHA-256) the manifest says.
fn check_file(
    dir: &Path,
    name: &str,
    want: &FileEntry,
    verify: bool,
) -> Result<(PathBuf, File), Damaged> {
    let path = dir.join(MANIFEST);
    let file_path = dir.join(name);
    if name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(damaged(
            &path,
            format!("file name `{name}` leaves the directory"),
        ));
    }
    let file = File::open(&file_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => damaged(&file_path, "missing (the manifest lists it)"),
        _ => damaged(&file_path, e.to_string()),
    })?;
    let size = file
        .metadata()
        .map_err(|e| damaged(&file_path, e.to_string()))?
        .len();
    if size != want.bytes {
        return Err(damaged(
            &file_path,
            format!(
                "{size} bytes, the manifest says {}: truncated or overwritten",
                want.bytes
            ),
        ));
    }
    if verify {
        let got = sha256_of(&file_path)?;
        if got != want.sha256 {
            return Err(damaged(
                &file_path,
                format!("SHA-256 {got}, the manifest says {}", want.sha256),
            ));
        }
    }
    Ok((file_path, file))
}

fn sha256_of(path: &Path) -> Result<String, Damaged> {
    let mut file = File::open(path).map_err(|e| damaged(path, e.to_string()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| damaged(path, e.to_string()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex(&hash.finalize()))
}
