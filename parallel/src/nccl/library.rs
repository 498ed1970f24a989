//! Finding the NCCL library. NCCL installs `libnccl.so.2` (the distribution packages'
//! runtime, the `nvidia-nccl-cu*` wheels PyTorch ships, inside the package folder), while
//! cudarc loads `libnccl.so` or `libnccl.so.{13,12,11,10,9,1}` from the library path. The
//! launcher calls [`link_dir`] before it starts the workers and puts the directory on their
//! `LD_LIBRARY_PATH` (the loader reads it only when a process starts).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file names NCCL is installed under, most specific first.
pub const NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// Where to look, in order: `TIDEMILL_NCCL` (a file or a directory), `LD_LIBRARY_PATH`,
/// the CUDA toolkit (`CUDA_PATH`, `/usr/local/cuda`), the system's library directories,
/// then the `nvidia/nccl/lib` folder of Python packages (the virtual environment's, the
/// user's and the system's).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("TIDEMILL_NCCL") {
        let p = PathBuf::from(p);
        dirs.push(if p.is_file() {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            p
        });
    }
    if let Some(p) = env("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    for cuda in [
        env("CUDA_PATH").map(PathBuf::from),
        Some("/usr/local/cuda".into()),
    ]
    .into_iter()
    .flatten()
    {
        dirs.push(cuda.join("lib64"));
        dirs.push(cuda.join("lib"));
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(d.into());
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = env("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = env("HOME") {
        roots.push(PathBuf::from(h).join(".local/lib"));
    }
    roots.extend(["/usr/local/lib", "/usr/lib", "/opt/conda/lib"].map(PathBuf::from));
    for root in roots {
        dirs.extend(python_nccl_dirs(&root));
    }
    dirs
}

/// `ROOT/python3*/{site,dist}-packages/nvidia/nccl/lib` that exist.
fn python_nccl_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut pythons: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    pythons.sort();
    pythons
        .into_iter()
        .flat_map(|p| ["site-packages", "dist-packages"].map(|k| p.join(k).join("nvidia/nccl/lib")))
        .filter(|p| p.is_dir())
        .collect()
}

/// The first NCCL library file in `dirs`.
pub fn find_in(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .flat_map(|d| NAMES.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

/// The NCCL library on this host, if any.
pub fn find() -> Option<PathBuf> {
    find_in(&search_dirs())
}

/// A directory holding `libnccl.so`, a link to the NCCL found on this host, made under
/// `under`; `None` when there is no NCCL (the workers' own check then names what is
/// missing, where they need it).
pub fn link_dir(under: &Path) -> Result<Option<PathBuf>> {
    let Some(lib) = find() else {
        return Ok(None);
    };
    let dir = under.join("nccl-lib");
    let link = dir.join("libnccl.so");
    // Linked beside it, then renamed over it: agents sharing a run directory on one host
    // never see a missing link.
    let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
    let made = std::fs::create_dir_all(&dir)
        .and_then(|()| match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .and_then(|()| std::os::unix::fs::symlink(&lib, &tmp))
        .and_then(|()| std::fs::rename(&tmp, &link));
    made.map_err(|e| {
        Error::Connect(format!(
            "linking {} as {}: {e}",
            lib.display(),
            link.display()
        ))
    })?;
    Ok(Some(dir))
}

/// What to tell a user whose process cannot load NCCL.
pub fn missing() -> Error {
    let hint = match find() {
        Some(lib) => format!(
            "{} is installed, but not under a name cudarc loads: put a `libnccl.so` link to it \
             in a directory on LD_LIBRARY_PATH before the process starts (`launch` does this \
             for its workers)",
            lib.display()
        ),
        None => "libnccl.so.2 was not found (searched TIDEMILL_NCCL, LD_LIBRARY_PATH, the CUDA \
                 toolkit, the system's library directories and Python's nvidia/nccl/lib): \
                 install NCCL, or set TIDEMILL_NCCL to its file"
            .into(),
    };
    Error::Connect(format!("NCCL cannot be loaded: {hint}"))
}

/// Whether this process can load NCCL (cudarc's names on the library path); the error
/// names what is missing.
pub fn check() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to open the library by its candidate names.
        #[allow(unsafe_code)]
        let present = unsafe { cudarc::nccl::sys::is_culib_present() };
        if present {
            return Ok(());
        }
        Err(missing())
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::NotCompiledWith("cuda"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioned_name_is_found_and_linked() {
        let tmp = std::env::temp_dir().join(format!("nccl-find-{}", std::process::id()));
        let (a, b) = (tmp.join("a"), tmp.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(find_in(&[a.clone(), b.clone()]), None);
        std::fs::write(b.join("libnccl.so.2"), b"elf").unwrap();
        assert_eq!(
            find_in(&[a.clone(), b.clone()]),
            Some(b.join("libnccl.so.2"))
        );
        std::fs::write(a.join("libnccl.so"), b"elf").unwrap();
        assert_eq!(find_in(&[a.clone(), b.clone()]), Some(a.join("libnccl.so")));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn python_wheels_are_searched() {
        let tmp = std::env::temp_dir().join(format!("nccl-py-{}", std::process::id()));
        let lib = tmp.join("python3.12/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&lib).unwrap();
        assert_eq!(python_nccl_dirs(&tmp), vec![lib]);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
