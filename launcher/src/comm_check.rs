//! `launch comm-check`: this host's data plane put through the communicator contract
//! ([`parallel::contract`]) on the process's group — every rank's under `launch run`, a
//! group of one alone — with the chosen device's tensors, and an all-reduce timed through
//! the device path (NCCL on device memory) against the host path (the same tensor copied
//! to host memory and back), interleaved, median of the repeats.

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::FloatDType;
use parallel::device::{self, DeviceBackend};
use parallel::{contract, Communicator, ReduceOp};
use serde_json::{json, Value};

use crate::config::Device;
use crate::error::{Error, Result};

/// Run the check as this process's rank; one JSON line on stdout per rank.
pub fn run(device: Device, bench_mb: usize, repeats: usize) -> Result<()> {
    device.check().map_err(|message| Error::Config {
        file: "--device".into(),
        message,
    })?;
    device.ready()?;
    let mut ctx = parallel::init()?;
    // Dropped before `ctx`: a failure marks the process failed before its NCCL groups go.
    let failing = parallel::nccl::FailGuard::new();
    let host: Arc<dyn Communicator> = ctx.comm.clone();
    let out = match device {
        Device::Cpu => {
            check::<trainer::backend::Cpu>(&ctx.comm, &host, &Default::default(), bench_mb, repeats)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            ctx.use_nccl()?;
            let gpu = burn::backend::cuda::CudaDevice::new(ctx.local_rank);
            check::<burn::backend::Cuda>(&ctx.comm, &host, &gpu, bench_mb, repeats)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => unreachable!("refused by Device::check"),
    };
    let mut line = out?;
    line["rank"] = ctx.rank.into();
    line["world"] = ctx.world_size.into();
    line["device"] = format!("{device:?}").to_lowercase().into();
    println!("{line}");
    ctx.reporter.flush(std::time::Duration::from_secs(2));
    failing.ended_well();
    Ok(())
}

fn check<B: DeviceBackend>(
    comm: &Arc<dyn Communicator>,
    host: &Arc<dyn Communicator>,
    device: &B::Device,
    bench_mb: usize,
    repeats: usize,
) -> Result<Value> {
    let start = Instant::now();
    let cases = contract::check::<B>(comm.as_ref(), device)
        .map_err(|e| Error::Launch(format!("the communicator contract failed: {e}")))?;
    let mut out = json!({
        "data_plane": if comm.device().is_some() { "nccl" } else { "tcp" },
        "contract": {"cases": cases, "seconds": start.elapsed().as_secs_f64()},
    });
    if bench_mb > 0 {
        out["all_reduce"] = bench::<B>(comm, host, device, bench_mb, repeats.max(1))?;
    }
    Ok(out)
}

/// Seconds per all-reduce of `mb` MiB of f32 through `comm`'s device path and through
/// `host` (host memory), interleaved.
fn bench<B: DeviceBackend>(
    comm: &Arc<dyn Communicator>,
    host: &Arc<dyn Communicator>,
    device: &B::Device,
    mb: usize,
    repeats: usize,
) -> Result<Value> {
    let elems = mb * (1 << 20) / 4;
    let mut x = B::float_zeros([elems].into(), device, FloatDType::F32);
    let time = |c: &dyn Communicator, x: &mut _| -> Result<f64> {
        let _ = B::sync(device);
        let t = Instant::now();
        let input = std::mem::replace(x, B::float_zeros([1].into(), device, FloatDType::F32));
        *x = device::all_reduce::<B>(c, input, ReduceOp::Sum)?;
        let _ = B::sync(device);
        Ok(t.elapsed().as_secs_f64())
    };
    // One of each first: NCCL's connections and the allocator's pools are made then.
    time(comm.as_ref(), &mut x)?;
    time(host.as_ref(), &mut x)?;
    let (mut dev, mut via_host) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        dev.push(time(comm.as_ref(), &mut x)?);
        via_host.push(time(host.as_ref(), &mut x)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, h) = (median(&mut dev), median(&mut via_host));
    Ok(json!({
        "mib": mb,
        "repeats": repeats,
        "device_path_s": d,
        "host_path_s": h,
        "host_over_device": h / d,
        "device_path_spread_s": [dev[0], dev[dev.len() - 1]],
        "host_path_spread_s": [via_host[0], via_host[via_host.len() - 1]],
    }))
}
