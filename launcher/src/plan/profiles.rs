//! Hardware profiles: the built-in ones (`configs/hardware/*.toml`, compiled in), any
//! TOML file given by path, and `--calibrate`, which measures this machine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use parallel::plan::Hardware;

use crate::error::{Error, Result};

/// Built-in profiles by name, as shipped in `configs/hardware/`.
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "a100-80g",
        include_str!("../../../configs/hardware/a100-80g.toml"),
    ),
    (
        "h100-80g",
        include_str!("../../../configs/hardware/h100-80g.toml"),
    ),
    ("h200", include_str!("../../../configs/hardware/h200.toml")),
    ("cpu", include_str!("../../../configs/hardware/cpu.toml")),
];

/// Directory searched for `NAME.toml` before the built-ins: `TIDEMILL_HARDWARE_DIR`.
pub const DIR_ENV: &str = "TIDEMILL_HARDWARE_DIR";

/// A profile by built-in name, by `NAME` in `$TIDEMILL_HARDWARE_DIR`, or by path to a
/// TOML file. Errors name the file and the key.
pub fn load(name: &str) -> Result<Hardware> {
    let as_path = Path::new(name);
    if name.ends_with(".toml") || as_path.components().count() > 1 {
        return from_file(as_path);
    }
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        let path = PathBuf::from(dir).join(format!("{name}.toml"));
        if path.is_file() {
            return from_file(&path);
        }
    }
    match BUILT_IN.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => parse(text, Path::new(&format!("configs/hardware/{n}.toml"))),
        None => Err(Error::Config {
            file: "--hardware".into(),
            message: format!(
                "`{name}`: no such profile; built in: {} (or a path to a .toml file, or \
                 NAME.toml in ${DIR_ENV})",
                BUILT_IN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn from_file(path: &Path) -> Result<Hardware> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigIo {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parse and check a profile; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Hardware> {
    let bad = |message: String| Error::Config {
        file: path.to_path_buf(),
        message,
    };
    let hw: Hardware = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    hw.validate().map_err(bad)?;
    Ok(hw)
}

/// The profile as TOML, as `--calibrate` writes it.
pub fn to_toml(hw: &Hardware) -> Result<String> {
    toml::to_string(hw).map_err(|e| Error::Launch(format!("writing a hardware profile: {e}")))
}

/// Measure this machine's CPU backend for `workers` worker processes sharing it: the f32
/// matmul rate of the backend tidemill trains with (the best of a few 512² … 1024²
/// products, on all cores), the memory copy bandwidth (a 128 MB copy) and the loopback
/// bandwidth; rates and the available memory are split over the workers. The peak is
/// taken as what was measured (achievable fraction 1).
pub fn calibrate(workers: usize) -> Result<Hardware> {
    let share = workers.max(1) as f64;
    let tflops = matmul_tflops() / share;
    let copy = copy_gbs() / share;
    let loopback = loopback_gbs().unwrap_or(copy / 4.0);
    let memory = available_gib().unwrap_or(8.0) / share;
    let hw = Hardware {
        name: "calibrated-cpu".into(),
        peak_tflops: tflops,
        peak_tflops_f32: tflops,
        achievable_fraction: 1.0,
        memory_gib: memory,
        reserved_gib: 0.25_f64.min(memory / 4.0),
        memory_bandwidth_gbs: copy,
        intra_node_gbs: loopback,
        inter_node_gbs: loopback,
        gpus_per_node: std::thread::available_parallelism()
            .map_or(1, usize::from)
            .max(workers),
        kernel_overhead_us: 20.0,
        latency_us: 100.0,
    };
    hw.validate()
        .map_err(|e| Error::Launch(format!("calibration measured nonsense: {e}")))?;
    Ok(hw)
}

/// Measure this machine's first GPU through the CUDA backend tidemill trains with: the
/// best bf16 and f32 (TF32) matmul rates over 4096² and 8192² products, the device memory
/// copy bandwidth (a 1 GiB copy), the launch overhead of a tiny kernel, the device's
/// memory and count. What one GPU cannot show (NVLink and network bandwidth, collective
/// latency) is taken from the built-in `h100-80g` profile.
#[cfg(feature = "cuda")]
pub fn calibrate_cuda() -> Result<Hardware> {
    use burn::tensor::{Distribution, FloatDType, Tensor};
    type B = trainer::backend::Cuda;
    crate::config::Device::Cuda.ready()?;
    let probe = trainer::backend::CudaProbe::run();
    let device = burn::backend::cuda::CudaDevice::new(0);
    let rate = |dtype: FloatDType| {
        let mut best: f64 = 0.0;
        for n in [4096usize, 8192] {
            let a = Tensor::<B, 2>::random([n, n], Distribution::Default, &device).cast(dtype);
            let b = Tensor::<B, 2>::random([n, n], Distribution::Default, &device).cast(dtype);
            // Warm up (compiles and tunes the kernel), then time a few products; reading
            // one value of the last waits for all of them.
            let _ = a.clone().matmul(b.clone()).slice([0..1, 0..1]).into_data();
            let reps = 10;
            let start = Instant::now();
            let mut last = None;
            for _ in 0..reps {
                last = Some(a.clone().matmul(b.clone()));
            }
            if let Some(c) = last {
                let _ = c.slice([0..1, 0..1]).into_data();
            }
            let s = start.elapsed().as_secs_f64() / reps as f64;
            best = best.max(2.0 * (n * n * n) as f64 / s / 1e12);
        }
        best
    };
    let bf16 = rate(FloatDType::BF16);
    let f32 = rate(FloatDType::F32);
    // A 1 GiB copy: read and written.
    let n = 1usize << 28;
    let x = Tensor::<B, 1>::zeros([n], &device);
    let _ = x.clone().add_scalar(1.0).slice([0..1]).into_data();
    let start = Instant::now();
    let reps = 10;
    let mut y = x.clone();
    for _ in 0..reps {
        y = x.clone().add_scalar(1.0);
    }
    let _ = y.slice([0..1]).into_data();
    let copy = 2.0 * (n * 4 * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
    // A one-element kernel, many times: the launch overhead.
    let one = Tensor::<B, 1>::zeros([1], &device);
    let _ = one.clone().add_scalar(1.0).into_data();
    let launches = 1000;
    let start = Instant::now();
    let mut z = one.clone();
    for _ in 0..launches {
        z = z.add_scalar(1.0);
    }
    let _ = z.into_data();
    let overhead_us = start.elapsed().as_secs_f64() / launches as f64 * 1e6;
    let reference = load("h100-80g")?;
    let memory = trainer::backend::cuda_memory_total(0)
        .map_or(reference.memory_gib, |b| b as f64 / (1u64 << 30) as f64);
    let hw = Hardware {
        name: "calibrated-cuda".into(),
        peak_tflops: bf16,
        peak_tflops_f32: f32,
        achievable_fraction: 1.0,
        memory_gib: memory,
        reserved_gib: reference.reserved_gib,
        memory_bandwidth_gbs: copy,
        gpus_per_node: probe.devices.unwrap_or(1).max(1),
        kernel_overhead_us: overhead_us,
        ..reference
    };
    hw.validate()
        .map_err(|e| Error::Launch(format!("calibration measured nonsense: {e}")))?;
    Ok(hw)
}

/// `--device cuda` in a build without the GPU path.
#[cfg(not(feature = "cuda"))]
pub fn calibrate_cuda() -> Result<Hardware> {
    Err(Error::Config {
        file: "--device".into(),
        message: crate::config::Device::Cuda
            .check()
            .err()
            .unwrap_or_default(),
    })
}

/// Best f32 matmul rate of the CPU backend, TFLOP/s.
fn matmul_tflops() -> f64 {
    use burn::tensor::{Distribution, Tensor};
    type B = trainer::backend::Cpu;
    let device = Default::default();
    let mut best: f64 = 0.0;
    for n in [512usize, 768, 1024] {
        let a = Tensor::<B, 2>::random([n, n], Distribution::Default, &device);
        let b = Tensor::<B, 2>::random([n, n], Distribution::Default, &device);
        // Warm up, then time a few products (reading one value forces the work).
        let _ = a.clone().matmul(b.clone()).into_data();
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            let _ = a.clone().matmul(b.clone()).slice([0..1, 0..1]).into_data();
        }
        let s = start.elapsed().as_secs_f64() / reps as f64;
        best = best.max(2.0 * (n * n * n) as f64 / s / 1e12);
    }
    best
}

/// Memory copy bandwidth, GB/s (bytes read plus written, as STREAM's copy counts).
fn copy_gbs() -> f64 {
    let n = 1 << 25;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        dst.copy_from_slice(&src);
        let s = start.elapsed().as_secs_f64();
        best = best.max(2.0 * (n * 4) as f64 / s / 1e9);
    }
    std::hint::black_box(&dst);
    best
}

/// Loopback TCP bandwidth, GB/s: what workers on one machine exchange tensors at.
fn loopback_gbs() -> Option<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    let addr = listener.local_addr().ok()?;
    let total = 256usize << 20;
    let reader = std::thread::spawn(move || -> Option<()> {
        let (mut s, _) = listener.accept().ok()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            got += n;
        }
        Some(())
    });
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..(total >> 20) {
        s.write_all(&chunk).ok()?;
    }
    drop(s);
    reader.join().ok()??;
    Some(total as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Available memory from /proc/meminfo, GiB.
fn available_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_parses_and_bad_ones_name_the_key() {
        for (name, _) in BUILT_IN {
            let hw = load(name).expect(name);
            assert_eq!(hw.name, *name);
        }
        let err = parse("name = \"x\"\npeak_tflops = 1.0\n", Path::new("mine.toml"))
            .expect_err("refused");
        assert!(err.to_string().contains("mine.toml"), "{err}");
        let text = BUILT_IN[0]
            .1
            .replace("achievable_fraction = 0.7", "achievable_fraction = 7.0");
        let err = parse(&text, Path::new("mine.toml"))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("achievable_fraction"), "{err}");
        let err = load("b200").expect_err("refused").to_string();
        assert!(err.contains("h100-80g"), "{err}");
    }
}
