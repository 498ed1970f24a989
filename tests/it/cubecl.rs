//! The GPU code path on a machine without a GPU (feature `wgpu`, run by
//! `tools/cubecl_check.sh`): burn's wgpu backend runs the cubecl kernels that the CUDA
//! backend shares with it (matmul, reductions, softmax, gather and scatter, indexing) on
//! any Vulkan driver, Mesa's software llvmpipe included. What it cannot check is
//! CUDA's own: NVRTC, bf16 kernels, NCCL, device memory statistics.
//!
//! Each run trains the same fixture model on the CPU backend, on wgpu, and on wgpu under
//! burn's kernel fusion (`job.fusion`), f32 all, and holds every step's loss and the final
//! evaluation loss to the CPU's (only the order of the floating-point sums differs).

use std::sync::Arc;

use crate::common::*;
use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorPrimitive};
use tidemill::parallel::device::DeviceBackend;
use tidemill::parallel::{Communicator, Mesh, TcpComm, TcpOptions};
use tidemill::trainer::backend::{Wgpu, WgpuFused};
use tidemill::trainer::{
    evaluate_trained, load_hf_model, lora, LoraSpec, LrSchedule, ParallelOptions, TrainBackend,
    TrainOptions, Trainer,
};

type Gpu = Autodiff<Wgpu>;
type Fused = Autodiff<WgpuFused>;

/// Each step's loss, then the evaluation loss.
fn run<B: TrainBackend>(model: &str, adapter: bool, recompute: bool, steps: u64) -> Vec<f64> {
    let device = Default::default();
    let mut m = load_hf_model::<B>(&model_dir(model), !adapter, &device).expect("loads");
    if adapter {
        let spec = LoraSpec {
            r: 8,
            alpha: 16.0,
            ..Default::default()
        };
        m = lora::apply(m, &spec, 7).expect("adapter").0;
    }
    let opts = options(adapter, recompute, steps);
    let rows = token_rows("train_tokens.jsonl", true, 64);
    let mut trainer = Trainer::builder(m, rows, &opts).build().expect("trainer");
    let mut out: Vec<f64> = (0..steps)
        .map(|_| trainer.step().expect("step").loss)
        .collect();
    let eval = token_rows("eval_tokens.jsonl", false, 64);
    out.push(
        evaluate_trained(trainer.model(), &eval, 4)
            .expect("eval")
            .loss,
    );
    out
}

fn options(adapter: bool, recompute: bool, steps: u64) -> TrainOptions {
    TrainOptions {
        max_steps: steps,
        global_batch: 4,
        micro_batch: 2,
        lr: if adapter { 1e-3 } else { 1e-4 },
        schedule: LrSchedule::Cosine,
        warmup_steps: 2,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        seed: 3,
        recompute,
        ..Default::default()
    }
}

fn same(model: &str, adapter: bool, recompute: bool) {
    let steps = 6;
    let cpu = run::<Train>(model, adapter, recompute, steps);
    for (name, got) in [
        ("wgpu", run::<Gpu>(model, adapter, recompute, steps)),
        ("wgpu fused", run::<Fused>(model, adapter, recompute, steps)),
    ] {
        let worst = cpu
            .iter()
            .zip(&got)
            .map(|(a, b)| rel_diff(*b, *a))
            .fold(0.0, f64::max);
        println!(
            "{model} adapter={adapter} recompute={recompute}: cpu {cpu:?} {name} {got:?} \
             worst {worst:.2e}"
        );
        assert_eq!(got.len(), cpu.len());
        assert!(
            worst < 1e-4,
            "{model} (adapter {adapter}, recompute {recompute}): {name} {got:?} vs cpu {cpu:?}"
        );
    }
}

#[test]
fn llama_lora_on_cubecl_kernels_matches_the_cpu() {
    same("llama3", true, false);
}

#[test]
fn qwen2_full_with_recompute_on_cubecl_kernels_matches_the_cpu() {
    same("qwen2", false, true);
}

#[test]
fn mixtral_full_on_cubecl_kernels_matches_the_cpu() {
    same("mixtral", false, false);
}

/// Each step's loss on rank 0 of `popts`' layout over `world` ranks, trained in threads
/// of this process over TCP on 127.0.0.1.
fn run_mesh<B: TrainBackend>(
    model: &str,
    world: usize,
    popts: &ParallelOptions,
    steps: u64,
) -> Vec<f64> {
    let comms = TcpComm::local_group(world, TcpOptions::default()).expect("local group");
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            let popts = popts.clone();
            let model = model.to_string();
            std::thread::spawn(move || {
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let layout = popts.layout(world, None).expect("layout");
                let mesh = Mesh::new(layout, comm).expect("mesh");
                let device = Default::default();
                let m = load_hf_model::<B>(&model_dir(&model), true, &device).expect("loads");
                let opts = options(false, false, steps);
                let rows = token_rows("train_tokens.jsonl", true, 64);
                let mut trainer = Trainer::builder(m, rows, &opts)
                    .parallel(&mesh, &popts)
                    .build()
                    .expect("trainer");
                (0..steps)
                    .map(|_| trainer.step().expect("step").loss)
                    .collect::<Vec<f64>>()
            })
        })
        .collect();
    let mut all: Vec<Vec<f64>> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    all.remove(0)
}

/// The GPU backend's tensors through the host collectives (`launch.data_plane = "tcp"`, or
/// a GPU without NCCL): data-parallel buckets, ZeRO-1's reduce-scatter and all-gather and
/// the pipeline's hand-offs give the one-process CPU losses.
///
/// The ranks are threads of this process, and burn 0.21's autodiff keeps its graphs in one
/// process-wide table: a rank ending its backward pass locks every other rank's graph in
/// turn (`cleanup_orphaned_entries`), so a rank waiting inside its backward pass for a
/// collective (tensor, sequence and expert parallelism's) can wait for ever on a rank
/// waiting for that lock. `launch` runs one rank per process; here only the layouts whose
/// collectives all come between backward passes run.
#[test]
fn layouts_on_cubecl_kernels_give_the_losses_of_one_cpu_process() {
    let steps = 4;
    for (model, world, popts) in [
        (
            "llama3",
            4,
            ParallelOptions {
                pp: 2,
                zero1: true,
                ..Default::default()
            },
        ),
        (
            "mixtral",
            2,
            ParallelOptions {
                pp: 2,
                ..Default::default()
            },
        ),
    ] {
        let one = run_mesh::<Train>(model, 1, &ParallelOptions::default(), steps);
        for (name, got) in [
            ("wgpu", run_mesh::<Gpu>(model, world, &popts, steps)),
            ("wgpu fused", run_mesh::<Fused>(model, world, &popts, steps)),
        ] {
            println!("{model} {popts:?}: one cpu process {one:?}, {name} {got:?}");
            assert_eq!(got.len(), one.len());
            for (i, (a, b)) in one.iter().zip(&got).enumerate() {
                assert!(
                    rel_diff(*b, *a) < 1e-4,
                    "{model} {popts:?} step {}: {name} {b} vs one cpu process {a}",
                    i + 1
                );
            }
        }
    }
}

/// The fusion client's side of a collective on a fused tensor (`DeviceBackend::dense`,
/// which NCCL's device path calls): the queued fused work runs, the inner tensor comes back
/// to the fusion client under a new id with its values, and later fused work reads it;
/// `dense_empty` gives a tensor fused work can overwrite. (wgpu's own `dense` takes no
/// buffer: the pointer NCCL gets is CUDA's, checked only on a GPU by gpu.sh's fused NCCL
/// run.)
#[test]
fn a_fused_tensor_handed_to_a_collective_keeps_its_values_and_goes_on_fusing() {
    let device = Default::default();
    let x = Tensor::<WgpuFused, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &device);
    // Lazy element-wise work the fusion client has queued, not yet run.
    let y = (x.clone() * 2.0 + 1.0).transpose();
    let (dense, _) = WgpuFused::dense(y.into_primitive().tensor());
    let dense = Tensor::<WgpuFused, 2>::from_primitive(TensorPrimitive::Float(dense));
    assert_eq!(dense.dims(), [3, 2]);
    let z = (dense.clone() - 1.0) / 2.0;
    assert_eq!(
        z.into_data().to_vec::<f32>().expect("f32"),
        vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
    assert_eq!(
        dense.into_data().to_vec::<f32>().expect("f32"),
        vec![3.0, 9.0, 5.0, 11.0, 7.0, 13.0]
    );
    let (empty, _) = WgpuFused::dense_empty([2, 2].into(), burn::tensor::FloatDType::F32, &device);
    let empty = Tensor::<WgpuFused, 2>::from_primitive(TensorPrimitive::Float(empty));
    assert_eq!(empty.dims(), [2, 2]);
    let sevens = Tensor::<WgpuFused, 2>::ones([2, 2], &device) * 7.0;
    let filled = empty.slice_assign([0..2, 0..2], sevens);
    assert_eq!(
        filled.into_data().to_vec::<f32>().expect("f32"),
        vec![7.0; 4]
    );
}
