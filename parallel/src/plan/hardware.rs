//! A hardware profile: what one device computes and moves per second, and how devices are
//! grouped into nodes. Profiles are TOML files (`configs/hardware/*.toml`); users add
//! their own, or measure this machine with `launch plan --calibrate`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// Shown in plans.
    pub name: String,
    /// Peak dense bf16 matmul rate of one device, TFLOP/s.
    pub peak_tflops: f64,
    /// Peak f32 matmul rate (TF32 where the framework uses it), TFLOP/s.
    pub peak_tflops_f32: f64,
    /// Fraction of the peak that large matmuls reach in practice.
    pub achievable_fraction: f64,
    /// Device memory, GiB (2³⁰ bytes, as `nvidia-smi` counts MiB).
    pub memory_gib: f64,
    /// Memory the runtime keeps for itself (CUDA context, allocator slack), GiB.
    #[serde(default)]
    pub reserved_gib: f64,
    /// Achievable device-memory bandwidth, GB/s: what element-wise kernels (norms,
    /// activations, softmax, the optimizer) run at.
    pub memory_bandwidth_gbs: f64,
    /// All-reduce bus bandwidth between devices of one node, GB/s per device (NVLink).
    pub intra_node_gbs: f64,
    /// Network bandwidth of one node, all its NICs together, GB/s.
    pub inter_node_gbs: f64,
    /// Devices per node: tensor-parallel groups stay inside one.
    pub gpus_per_node: usize,
    /// Launch overhead of one kernel, µs.
    #[serde(default)]
    pub kernel_overhead_us: f64,
    /// Latency of one collective or point-to-point transfer, µs.
    #[serde(default)]
    pub latency_us: f64,
}

impl Hardware {
    /// Every rate and size positive; names the first field that is not.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("peak_tflops", self.peak_tflops),
            ("peak_tflops_f32", self.peak_tflops_f32),
            ("achievable_fraction", self.achievable_fraction),
            ("memory_gib", self.memory_gib),
            ("memory_bandwidth_gbs", self.memory_bandwidth_gbs),
            ("intra_node_gbs", self.intra_node_gbs),
            ("inter_node_gbs", self.inter_node_gbs),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{key}: {v} must be a positive number"));
            }
        }
        if self.achievable_fraction > 1.0 {
            return Err(format!(
                "achievable_fraction: {} is a fraction of the peak (at most 1)",
                self.achievable_fraction
            ));
        }
        for (key, v) in [
            ("reserved_gib", self.reserved_gib),
            ("kernel_overhead_us", self.kernel_overhead_us),
            ("latency_us", self.latency_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{key}: {v} must be zero or more"));
            }
        }
        if self.reserved_gib >= self.memory_gib {
            return Err(format!(
                "reserved_gib: {} leaves nothing of memory_gib {}",
                self.reserved_gib, self.memory_gib
            ));
        }
        if self.gpus_per_node == 0 {
            return Err("gpus_per_node: must be at least 1".into());
        }
        Ok(())
    }

    /// Bytes of device memory; a plan's total (which counts `reserved_gib`) must fit.
    pub fn memory_bytes(&self) -> f64 {
        self.memory_gib * GIB
    }

    /// Bus bandwidth (bytes/s) of a collective over `size` ranks spaced `stride` apart in
    /// rank order: NVLink inside a node; across nodes, the members on one node share its
    /// network (each device its own share of the NICs).
    pub fn group_bandwidth(&self, size: usize, stride: usize) -> f64 {
        let g = self.gpus_per_node;
        let intra = self.intra_node_gbs * 1e9;
        if (size * stride <= g && g.is_multiple_of(size * stride)) || size == 1 {
            return intra;
        }
        let per_node = (g / stride).clamp(1, size);
        let inter = self.inter_node_gbs * 1e9 / g as f64 * per_node as f64;
        inter.min(intra)
    }
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// `bytes` for people: GiB, MiB or KiB with three significant digits.
pub fn human_bytes(bytes: f64) -> String {
    let (unit, scale) = if bytes >= GIB {
        ("GiB", GIB)
    } else if bytes >= GIB / 1024.0 {
        ("MiB", GIB / 1024.0)
    } else {
        ("KiB", 1024.0)
    };
    let v = bytes / scale;
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.decimals$} {unit}")
}
