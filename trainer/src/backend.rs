//! The compute backends tidemill trains on, as burn types: the CPU (burn's pure-Rust
//! Flex) always, CUDA with the `cuda` feature; `*Train` is the autodiff form a
//! [`crate::Trainer`] runs on.

/// burn's Flex backend (pure Rust, SIMD and threads).
pub type Cpu = burn::backend::Flex;
/// [`Cpu`] with autodiff, for training.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;

/// burn-cuda (kernels compiled with NVRTC at run time).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;
/// [`Cuda`] with autodiff, for training.
#[cfg(feature = "cuda")]
pub type CudaTrain = burn::backend::Autodiff<Cuda>;
/// [`Cuda`] under burn's kernel fusion (`job.fusion`): element-wise chains and reductions
/// are compiled into fewer kernels at run time.
#[cfg(feature = "cuda")]
pub type CudaFused = burn_fusion::Fusion<Cuda>;

/// burn's wgpu backend: a developer's check of the cubecl kernels (which the CUDA backend
/// shares) on any Vulkan driver, without a GPU (`tools/cubecl_check.sh`).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;
/// [`Wgpu`] under burn's kernel fusion, as `CudaFused` is CUDA's.
#[cfg(feature = "wgpu")]
pub type WgpuFused = burn_fusion::Fusion<Wgpu>;

/// The process's peak resident memory (`VmHWM` in /proc/self/status), in bytes; `None`
/// where there is no such file.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes the CUDA device's memory pools hold (cubecl's `bytes_reserved`).
#[cfg(feature = "cuda")]
pub fn cuda_memory_reserved(device: &burn::backend::cuda::CudaDevice) -> Option<u64> {
    use cubecl::Runtime;
    let client = cubecl::cuda::CudaRuntime::client(device);
    client.memory_usage().ok().map(|m| m.bytes_reserved)
}

/// Total memory of CUDA device `ordinal`, bytes.
#[cfg(feature = "cuda")]
pub fn cuda_memory_total(ordinal: usize) -> Option<u64> {
    libs::total_mem(ordinal)
}

/// What a GPU host offers tidemill's CUDA path, found without starting it: the CUDA
/// headers NVRTC compiles the kernels against (cubecl looks in `$CUDA_PATH`,
/// `/usr/local/cuda`, `/opt/cuda`, then `/usr` when `/usr/bin/nvcc` exists), the driver
/// library and its GPUs, NVRTC, and NCCL (for more than one GPU rank).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CudaProbe {
    /// The CUDA directory whose `include/cuda_runtime.h` the kernels will include.
    pub cuda_path: Option<std::path::PathBuf>,
    pub headers: bool,
    pub driver: bool,
    pub devices: Option<usize>,
    pub nvrtc: bool,
    pub nccl: bool,
    /// The names NVRTC is looked for by (they carry the CUDA major version the bindings
    /// were built for: `CUDARC_CUDA_VERSION` at build time).
    pub nvrtc_names: Vec<String>,
}

impl CudaProbe {
    /// Look (loading the libraries to see that they load, nothing more).
    #[cfg(feature = "cuda")]
    pub fn run() -> Self {
        let cuda_path = cubecl::cuda::install::cuda_path();
        let headers = cuda_path
            .as_ref()
            .is_some_and(|p| p.join("include/cuda_runtime.h").is_file());
        let driver = libs::driver();
        let devices = if driver { libs::device_count() } else { None };
        Self {
            cuda_path,
            headers,
            driver,
            devices,
            nvrtc: libs::nvrtc(),
            nccl: libs::nccl(),
            nvrtc_names: {
                let mut names: Vec<String> = cudarc::get_lib_name_candidates("nvrtc")
                    .into_iter()
                    .filter(|n| n.starts_with("libnvrtc.so"))
                    .collect();
                names.dedup();
                names
            },
        }
    }

    /// What is missing for one GPU rank, each with what to do about it (`None`: nothing).
    pub fn missing(&self) -> Option<String> {
        let mut out = Vec::new();
        if !self.driver {
            out.push(
                "the NVIDIA driver library libcuda.so.1 does not load: install the driver \
                      or add its directory to LD_LIBRARY_PATH"
                    .to_string(),
            );
        } else if self.devices.unwrap_or(0) == 0 {
            out.push("the driver sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)".into());
        }
        if !self.headers {
            out.push(format!(
                "no CUDA headers (include/cuda_runtime.h) under {}: the kernels are compiled \
                 at run time by NVRTC and include them; install the CUDA toolkit's headers \
                 (e.g. the cuda-cudart-dev and cuda-nvrtc-dev packages, or the pip package \
                 nvidia-cuda-runtime) and set CUDA_PATH to the directory holding include/",
                self.cuda_path
                    .as_ref()
                    .map_or("$CUDA_PATH, /usr/local/cuda or /opt/cuda".into(), |p| {
                        p.display().to_string()
                    })
            ));
        }
        if !self.nvrtc {
            out.push(format!(
                "NVRTC does not load (looked for {}): install it and add its directory to \
                 LD_LIBRARY_PATH",
                self.nvrtc_names.join(", ")
            ));
        }
        (!out.is_empty()).then(|| out.join("; "))
    }
}

/// The library checks: each loads the library the way cudarc will (by the same names), so
/// that a missing one is an error here rather than a panic inside cudarc.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod libs {
    pub fn driver() -> bool {
        // SAFETY: loads libcuda with libloading to see that it loads; no symbol is called.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    pub fn nvrtc() -> bool {
        // SAFETY: as above, for libnvrtc.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }

    pub fn nccl() -> bool {
        // SAFETY: as above, for libnccl.
        unsafe { cudarc::nccl::sys::is_culib_present() }
    }

    /// Total memory of device `ordinal` (only called once the driver loads).
    pub fn total_mem(ordinal: usize) -> Option<u64> {
        cudarc::driver::result::init().ok()?;
        let dev = cudarc::driver::result::device::get(i32::try_from(ordinal).ok()?).ok()?;
        // SAFETY: `dev` is a device handle the driver just returned.
        let bytes = unsafe { cudarc::driver::result::device::total_mem(dev) }.ok()?;
        u64::try_from(bytes).ok()
    }

    /// GPUs the driver sees (only called once the driver loads).
    pub fn device_count() -> Option<usize> {
        cudarc::driver::result::init().ok()?;
        cudarc::driver::result::device::get_count()
            .ok()
            .and_then(|n| usize::try_from(n).ok())
    }
}

/// Get a process ready for the CUDA backend, before its first use: check what the host
/// must offer ([`CudaProbe`]; a clear error, never a panic inside cubecl), and keep
/// cubecl's compiled kernels and autotune results on disk under `cache` so a restarted
/// worker does not compile them again (unless cubecl's own configuration says where).
/// Idempotent.
#[cfg(feature = "cuda")]
pub fn cuda_setup(cache: &std::path::Path) -> Result<(), String> {
    use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        if let Some(why) = CudaProbe::run().missing() {
            return Err(why);
        }
        // cubecl's own configuration (cubecl.toml or burn.toml found upwards from the
        // working directory, CUBECL_* variables), with the caches where a configuration
        // does not put them.
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = Some(CacheConfig::File(cache.join("kernels")));
        }
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(cache.join("autotune"));
        }
        CubeClRuntimeConfig::set(config);
        Ok(())
    })
    .clone()
}

/// Where compiled kernels are kept: `$TIDEMILL_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/tidemill` or `~/.cache/tidemill`.
pub fn kernel_cache_dir() -> std::path::PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = env("TIDEMILL_KERNEL_CACHE") {
        return dir.into();
    }
    if let Some(dir) = env("XDG_CACHE_HOME") {
        return std::path::PathBuf::from(dir).join("tidemill");
    }
    let home = env("HOME").map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    home.join(".cache/tidemill")
}

#[cfg(test)]
mod tests {
    use super::CudaProbe;

    #[test]
    fn a_probe_names_each_missing_piece_and_what_to_do() {
        let ready = CudaProbe {
            cuda_path: Some("/usr/local/cuda".into()),
            headers: true,
            driver: true,
            devices: Some(1),
            nvrtc: true,
            nccl: false,
            nvrtc_names: vec!["libnvrtc.so.13".into()],
        };
        assert_eq!(ready.missing(), None, "NCCL is not needed for one GPU rank");
        let bare = CudaProbe {
            nvrtc_names: vec!["libnvrtc.so.13".into()],
            ..CudaProbe::default()
        };
        let why = bare.missing().expect("nothing is there");
        for part in [
            "libcuda.so.1",
            "cuda_runtime.h",
            "CUDA_PATH",
            "libnvrtc.so.13",
        ] {
            assert!(why.contains(part), "{part} missing from: {why}");
        }
        let no_gpu = CudaProbe {
            devices: Some(0),
            ..ready
        };
        assert!(no_gpu.missing().expect("no GPU").contains("sees no GPU"));
    }
}
