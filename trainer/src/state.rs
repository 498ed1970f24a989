//! A trainer's state in the sharded checkpoint format (`checkpoint::sharded`): parameters
//! and AdamW moments as boxes of the global HF tensors (`model::names`), plus the step
//! and data position. Any rank of any layout reads back the boxes it holds.
//!
//! Names: `<hf name>` for a parameter, `optimizer.<hf name>.exp_avg` / `.exp_avg_sq` for
//! its moments and `optimizer.<hf name>.step` (a scalar) for its AdamW step count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState, Optimizer};
use burn::tensor::{Tensor, TensorData};
use checkpoint::sharded::{self, Checkpoint, Part, Piece, ShardWriter, Slice, TensorEntry};
use checkpoint::{DType, HostTensor};

use crate::collective::TrainBackend;
use crate::error::{Error, Result};
use crate::model::experts::is_expert_path;
use crate::model::linear::{to_host, transpose, transposed};
use crate::model::names::{named, tp_box};
use crate::model::CausalLm;

/// Which of the copies this rank holds it writes (each box goes to disk once).
#[derive(Clone, Copy, Debug)]
pub struct Writes {
    /// Data-parallel rank 0: writes the parameters (and, without ZeRO-1, their moments).
    pub replica: bool,
    /// Expert-parallel rank 0: writes what is replicated over ep (all but the experts).
    pub first_expert_rank: bool,
    /// ZeRO-1: each rank writes the moments it owns.
    pub zero1: bool,
}

/// One box of a global tensor, on the host.
pub struct Boxed {
    pub name: String,
    pub shape: Vec<usize>,
    pub slice: Slice,
    /// The box's values, row-major; transposed (the parameter's own layout, `[in, out]`)
    /// when `transposed`, which the writer undoes off the training thread.
    pub data: Vec<f32>,
    pub transposed: bool,
}

/// What a rank writes of a checkpoint, copied off the device (so training may go on).
pub struct Snapshot {
    pub tensors: Vec<Boxed>,
}

/// One parameter of this rank: where it is in the model and in the HF tensor.
struct Held {
    id: ParamId,
    path: String,
    name: String,
    transposed: bool,
    /// Internal shape.
    shape: Vec<usize>,
    global: Vec<usize>,
    slice: Slice,
    /// Whether this rank writes it (the first of the ranks holding this box).
    first: bool,
}

fn held<B: burn::tensor::backend::Backend>(model: &CausalLm<B>) -> Vec<Held> {
    let paths: BTreeMap<ParamId, (String, Vec<usize>)> = parallel::dp::params_by_path(model)
        .into_iter()
        .map(|p| (p.id, (p.path, p.shape)))
        .collect();
    let (tp, rank) = model
        .sharding
        .tp
        .as_ref()
        .map_or((1, 0), |g| (g.size(), g.rank()));
    let tied_copy = model.sharding.stage.as_ref().is_some_and(|s| !s.is_first());
    named(model)
        .into_iter()
        .filter_map(|n| {
            let (path, shape) = paths.get(&n.id)?.clone();
            let hf: Vec<usize> = if n.transposed {
                shape.iter().rev().copied().collect()
            } else {
                shape.clone()
            };
            let (global, slice, copies) = tp_box(&n.name, &hf, &model.config, tp, rank);
            let tied = tied_copy && n.name == "model.embed_tokens.weight";
            Some(Held {
                id: n.id,
                path,
                first: rank % copies == 0 && !tied,
                name: n.name,
                transposed: n.transposed,
                shape,
                global,
                slice,
            })
        })
        .collect()
}

type Optim<B> = OptimizerAdaptor<AdamW, CausalLm<B>, B>;

/// AdamW step count and moments (host, internal orientation) of a parameter.
fn moments<B: TrainBackend>(
    record: &AdaptorRecord<AdamW, B>,
    dims: usize,
) -> (usize, HostTensor, HostTensor) {
    let r = record.clone();
    if dims == 1 {
        let s: AdamWState<B::InnerBackend, 1> = r.into_state();
        let m = s.momentum;
        (m.time, to_host(m.moment_1), to_host(m.moment_2))
    } else {
        let s: AdamWState<B::InnerBackend, 2> = r.into_state();
        let m = s.momentum;
        (m.time, to_host(m.moment_1), to_host(m.moment_2))
    }
}

/// This rank's share of a checkpoint: its parameters and AdamW state as HF boxes.
pub fn snapshot<B: TrainBackend>(
    model: &CausalLm<B>,
    optim: &Optim<B>,
    writes: Writes,
) -> Snapshot {
    let mut values = parallel::dp::values_by_path(model);
    let records = optim.to_record();
    let mut tensors = Vec::new();
    for h in held(model) {
        let dense_ok = writes.first_expert_rank || is_expert_path(&h.path);
        if !(h.first && dense_ok) {
            continue;
        }
        if writes.replica {
            tensors.push(Boxed {
                name: h.name.clone(),
                shape: h.global.clone(),
                slice: h.slice.clone(),
                data: values.remove(&h.path).unwrap_or_default(),
                transposed: h.transposed,
            });
        }
        let Some(record) = records.get(&h.id) else {
            continue;
        };
        if !(writes.replica || writes.zero1) {
            continue;
        }
        let (time, m1, m2) = moments::<B>(record, h.shape.len());
        for (what, t) in [("exp_avg", m1), ("exp_avg_sq", m2)] {
            tensors.push(Boxed {
                name: format!("optimizer.{}.{what}", h.name),
                shape: h.global.clone(),
                slice: h.slice.clone(),
                data: t.data,
                transposed: h.transposed,
            });
        }
        if h.slice.start.iter().all(|&s| s == 0) {
            tensors.push(Boxed {
                name: format!("optimizer.{}.step", h.name),
                shape: Vec::new(),
                slice: Slice::whole(&[]),
                data: vec![time as f32],
                transposed: false,
            });
        }
    }
    Snapshot { tensors }
}

/// The file rank `rank` saves its boxes in.
pub fn shard_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// burn's AdamW record of a `D`-dimensional parameter from its step count and moments.
fn adamw_record<B: TrainBackend, const D: usize>(
    time: usize,
    m1: Vec<f32>,
    m2: Vec<f32>,
    shape: &[usize],
    device: &B::Device,
) -> AdaptorRecord<AdamW, B> {
    let t = |v: Vec<f32>| {
        Tensor::<B::InnerBackend, D>::from_data(TensorData::new(v, shape.to_vec()), device)
    };
    AdaptorRecord::from_state(AdamWState::new(AdaptiveMomentumState::new(
        time,
        t(m1),
        t(m2),
    )))
}

/// Write rank `rank`'s snapshot into `staging` (its shard, the `extras` files copied
/// along, then its part file).
pub fn write_snapshot(
    snapshot: &Snapshot,
    staging: &Path,
    rank: usize,
    extras: &[(String, PathBuf)],
) -> Result<()> {
    let file = shard_file(rank);
    let mut part = Part {
        extras: sharded::copy_extras(extras, staging)?,
        ..Part::default()
    };
    if !snapshot.tensors.is_empty() {
        let layout: Vec<(String, DType, Vec<usize>)> = snapshot
            .tensors
            .iter()
            .map(|t| (t.name.clone(), DType::F32, t.slice.len.clone()))
            .collect();
        let mut w = ShardWriter::create(&staging.join(&file), &layout)?;
        for t in &snapshot.tensors {
            if t.transposed {
                // Held as `[in, out]`: the HF box is `[out, in]` = slice.len.
                let (out, inn) = (t.slice.len[0], t.slice.len[1]);
                w.append_f32(&transposed(inn, out, &t.data), DType::F32)?;
            } else {
                w.append_f32(&t.data, DType::F32)?;
            }
            part.tensors.insert(
                t.name.clone(),
                TensorEntry {
                    shape: t.shape.clone(),
                    dtype: DType::F32,
                    pieces: vec![Piece {
                        file: file.clone(),
                        slice: t.slice.clone(),
                    }],
                },
            );
        }
        part.files.insert(file, w.finish()?);
    }
    sharded::crash_point("between_shards");
    sharded::write_part(staging, rank, &part)?;
    Ok(())
}

fn damaged(e: checkpoint::sharded::Damaged) -> Error {
    Error::Training {
        key: "checkpoint".into(),
        message: e.to_string(),
    }
}

/// A checkpoint's state for one rank, read and checked against its model: applying it
/// cannot fail, so a damaged or mismatched checkpoint leaves the model as it was.
pub struct Restored<B: TrainBackend> {
    values: BTreeMap<String, Vec<f32>>,
    records: <Optim<B> as Optimizer<CausalLm<B>, B>>::Record,
}

impl<B: TrainBackend> Restored<B> {
    /// The model and optimizer with the checkpoint's values in place.
    pub fn apply(self, model: CausalLm<B>, optim: Optim<B>) -> (CausalLm<B>, Optim<B>) {
        let model = parallel::dp::replace_by_path(model, self.values);
        (model, optim.load_record(self.records))
    }
}

/// `model`'s parameters read from `ckpt` (each rank its own boxes, whatever layout wrote
/// them), and the AdamW state for those whose state this rank keeps (`owned`: all when
/// `None`).
pub fn restore<B: TrainBackend>(
    model: &CausalLm<B>,
    optim: &Optim<B>,
    ckpt: &Checkpoint,
    owned: Option<&BTreeSet<String>>,
) -> Result<Restored<B>> {
    let device = model.device();
    let mut values = BTreeMap::new();
    // (burn's record map type, emptied.)
    let mut records = optim.to_record();
    records.clear();
    let read = |name: &str, h: &Held| -> Result<Vec<f32>> {
        let entry = ckpt.tensor(name).ok_or_else(|| Error::Training {
            key: "checkpoint".into(),
            message: format!(
                "{}: no tensor `{name}` (a different model or mode?)",
                ckpt.dir.display()
            ),
        })?;
        if entry.shape != h.global {
            return Err(Error::Training {
                key: "checkpoint".into(),
                message: format!(
                    "{}: `{name}` is {:?} there, {:?} in this model",
                    ckpt.dir.display(),
                    entry.shape,
                    h.global
                ),
            });
        }
        let data = ckpt.read(name, &h.slice).map_err(damaged)?;
        let hf: Vec<usize> = h.slice.len.clone();
        Ok(if h.transposed {
            transpose(&HostTensor::new(hf, data)).data
        } else {
            data
        })
    };
    let trainable: BTreeSet<ParamId> = parallel::dp::params_by_path(model)
        .into_iter()
        .filter(|p| p.trainable)
        .map(|p| p.id)
        .collect();
    for h in held(model) {
        values.insert(h.path.clone(), read(&h.name, &h)?);
        let trainable = trainable.contains(&h.id);
        let keeps = owned.is_none_or(|o| o.contains(&h.path));
        let step_name = format!("optimizer.{}.step", h.name);
        if !(trainable && keeps) || ckpt.tensor(&step_name).is_none() {
            continue;
        }
        let time = ckpt.read(&step_name, &Slice::whole(&[])).map_err(damaged)?[0] as usize;
        let m1 = read(&format!("optimizer.{}.exp_avg", h.name), &h)?;
        let m2 = read(&format!("optimizer.{}.exp_avg_sq", h.name), &h)?;
        let record = if h.shape.len() == 1 {
            adamw_record::<B, 1>(time, m1, m2, &h.shape, &device)
        } else {
            adamw_record::<B, 2>(time, m1, m2, &h.shape, &device)
        };
        records.insert(h.id, record);
    }
    Ok(Restored { values, records })
}
