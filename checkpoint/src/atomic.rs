//! Atomic file replacement: write a temporary file in the target's
//! directory, fsync it, rename it over the target, fsync the directory.
//! A reader sees the old file or the new one, never a torn one, and a
//! failed write leaves nothing at the target path.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `bytes` to `path` atomically (temp file in the same directory,
/// fsync, rename, fsync of the directory). On error nothing is left at
/// `path` (an existing file there is untouched) and the temp file is removed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    atomic_write_via(path, |tmp| {
        fs::write(tmp, bytes).map_err(|e| Error::io(path, e))
    })
}

/// Like [`atomic_write`], but `write` creates the temporary file itself
/// (given its path). Errors from `write` are returned as they are.
pub(crate) fn atomic_write_via(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), Error>,
) -> Result<(), Error> {
    let tmp = sibling_temp_path(path, "tmp")?;
    let result = write(&tmp)
        .and_then(|()| sync_file(&tmp).map_err(|e| Error::io(path, e)))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        // Best effort: the temp file may not exist if `write` failed early.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_parent_dir(path);
    Ok(())
}

/// A unique hidden path next to `path`: `<dir>/.<name>.<tag>.<pid>.<n>`.
pub(crate) fn sibling_temp_path(path: &Path, tag: &str) -> Result<PathBuf, Error> {
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "path has no file name component",
            ),
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_name = format!(
        ".{}.{tag}.{}.{n}",
        name.to_string_lossy(),
        std::process::id()
    );
    Ok(parent_dir(path).join(tmp_name))
}

/// The directory holding `path` (`.` for a bare relative name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// fsync the directory holding `path` so the rename itself is durable.
/// Best effort: some filesystems refuse fsync on directories.
pub(crate) fn sync_parent_dir(path: &Path) {
    if let Ok(dir) = File::open(parent_dir(path)) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn writes_and_replaces_leaving_no_temp_files() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.json");
        atomic_write(&path, b"one")?;
        atomic_write(&path, b"two")?;
        assert_eq!(fs::read(&path)?, b"two");
        let names: Vec<_> = fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        Ok(())
    }

    #[test]
    fn failed_write_leaves_nothing() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.bin");
        let r = atomic_write_via(&path, |tmp| {
            fs::write(tmp, b"partial").map_err(|e| Error::io(tmp, e))?;
            Err(Error::io(
                tmp,
                std::io::Error::new(std::io::ErrorKind::Other, "simulated"),
            ))
        });
        assert!(r.is_err());
        assert_eq!(fs::read_dir(dir.path())?.count(), 0);
        Ok(())
    }

    #[test]
    fn missing_directory_is_an_io_error_naming_the_path() {
        let path = Path::new("/nonexistent-tidemill-dir/file.bin");
        match atomic_write(path, b"x") {
            Err(e @ Error::Io { .. }) => {
                assert!(e.to_string().contains("/nonexistent-tidemill-dir/file.bin"))
            }
            other => panic!("expected Io error, got {other:?}"),
        }
    }
}
