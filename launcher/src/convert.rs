//! `launch convert`: Hugging Face model directories to sharded checkpoints laid out for a
//! parallel layout (each rank's boxes in its own file, as training would save them), back
//! to HF (sharded as transformers shards, with the index, config and tokenizer files), and
//! from one layout to another. Tensors keep their dtype; one box is in memory at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use checkpoint::sharded::{self, Checkpoint, HfDir, Placement, Source};
use parallel::Layout;
use serde_json::{json, Value};
use trainer::ModelConfig;

use trainer::{ParallelOptions, PipelineSchedule};

use crate::error::{Error, Result};

/// One side of a conversion.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoint {
    Hf(PathBuf),
    Sharded(PathBuf),
}

impl Endpoint {
    /// `hf:DIR` or `sharded:DIR`; `flag` names the argument in errors.
    pub fn parse(flag: &str, text: &str) -> Result<Self> {
        match text.split_once(':') {
            Some(("hf", dir)) if !dir.is_empty() => Ok(Self::Hf(dir.into())),
            Some(("sharded", dir)) if !dir.is_empty() => Ok(Self::Sharded(dir.into())),
            _ => Err(Error::Config {
                file: flag.into(),
                message: format!("`{text}`: expected hf:DIR or sharded:DIR"),
            }),
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Self::Hf(d) | Self::Sharded(d) => d,
        }
    }
}

/// `launch convert`'s command line.
#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// hf:DIR (a Hugging Face model directory) or sharded:DIR (a checkpoint).
    #[arg(long)]
    pub from: String,
    /// hf:DIR or sharded:DIR; must not exist yet (or be empty).
    #[arg(long)]
    pub to: String,
    /// Tensor-parallel ranks of a sharded output.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline stages of a sharded output.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Expert-parallel ranks of a sharded output.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Chunks of layers per pipeline rank (the interleaved schedule).
    #[arg(long)]
    pub virtual_stages: Option<usize>,
    /// Layers of each (virtual) stage, comma-separated; balanced by cost by default.
    #[arg(long, value_delimiter = ',')]
    pub stage_layers: Option<Vec<usize>>,
    /// Largest HF shard file: bytes, or 5GB, 500MB, 2GiB …
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

impl ConvertArgs {
    /// The conversion asked for.
    pub fn request(&self) -> Result<Request> {
        let schedule = match self.virtual_stages {
            Some(_) => PipelineSchedule::Interleaved,
            None => ParallelOptions::default().schedule,
        };
        Ok(Request {
            from: Endpoint::parse("--from", &self.from)?,
            to: Endpoint::parse("--to", &self.to)?,
            parallel: ParallelOptions {
                tp: self.tp,
                pp: self.pp,
                ep: self.ep,
                schedule,
                virtual_stages: self.virtual_stages,
                stage_layers: self.stage_layers.clone(),
                ..Default::default()
            },
            max_shard_bytes: parse_size(&self.max_shard_size)?,
        })
    }
}

/// What to convert, and into which layout (for a sharded output).
#[derive(Clone, Debug)]
pub struct Request {
    pub from: Endpoint,
    pub to: Endpoint,
    /// tp, pp, ep, virtual stages and stage sizes of a sharded output.
    pub parallel: ParallelOptions,
    pub max_shard_bytes: u64,
}

/// What a conversion did: `{"tensors","bytes","files","seconds"}`.
pub fn run(req: &Request) -> Result<Value> {
    let started = Instant::now();
    let input = req.from.dir();
    crate::error::require_path("--from", input, true)?;
    let (source, extras, step, state): (Box<dyn Source>, _, _, _) = match &req.from {
        Endpoint::Hf(dir) => {
            let extras = sharded::model_files(dir)?;
            let state = json!({"converted_from": format!("hf:{}", dir.display())});
            (Box::new(HfDir::open(dir)?), extras, 0, state)
        }
        Endpoint::Sharded(dir) => {
            let ckpt = Checkpoint::open(dir, true).map_err(checkpoint::Error::from)?;
            let extras: Vec<(String, PathBuf)> = ckpt
                .manifest
                .extras
                .keys()
                .map(|n| (n.clone(), dir.join(n)))
                .collect();
            let (step, state) = (ckpt.step(), ckpt.manifest.state.clone());
            (Box::new(ckpt), extras, step, state)
        }
    };
    let tensors = source.tensors();
    let (names, files) = match &req.to {
        Endpoint::Hf(out) => {
            if matches!(req.from, Endpoint::Hf(_)) {
                return Err(Error::Config {
                    file: "--to".into(),
                    message: "hf → hf is a copy; convert to sharded:DIR or from one".into(),
                });
            }
            let names: Vec<String> = tensors
                .keys()
                .filter(|n| sharded::is_model_tensor(n))
                .cloned()
                .collect();
            let left = tensors.len() - names.len();
            if left > 0 {
                eprintln!(
                    "leaving out {left} tensors of training state (AdamW moments, LoRA \
                     adapters: `launch export` writes adapters)"
                );
            }
            let files =
                sharded::write_hf(source.as_ref(), &names, out, req.max_shard_bytes, &extras)?;
            (names, files)
        }
        Endpoint::Sharded(out) => {
            let config = model_config(&req.from, &extras)?;
            let (layout, sizes) = layout_for(&req.parallel, &config)?;
            let placement = place_all(&tensors, &config, &layout, &sizes);
            let mut state = state;
            if let Some(s) = state.as_object_mut() {
                s.insert("layout".into(), layout_json(&layout, &sizes));
            }
            let manifest =
                sharded::write_sharded(source.as_ref(), &placement, out, step, state, &extras)?;
            let names = manifest.tensors.keys().cloned().collect();
            (names, manifest.files.len())
        }
    };
    let bytes: usize = names
        .iter()
        .map(|n| {
            let (dtype, shape) = &tensors[n];
            shape.iter().product::<usize>() * dtype.size_in_bytes()
        })
        .sum();
    Ok(json!({
        "tensors": names.len(),
        "bytes": bytes,
        "files": files,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// The model's config.json: in the HF directory, or carried in the checkpoint.
fn model_config(from: &Endpoint, extras: &[(String, PathBuf)]) -> Result<ModelConfig> {
    if !extras.iter().any(|(n, _)| n == "config.json") {
        return Err(Error::BadPath {
            key: "--from".into(),
            path: from.dir().join("config.json"),
            message: "no config.json: the layout is cut by the model's heads and layers".into(),
        });
    }
    Ok(ModelConfig::from_dir(from.dir())?)
}

/// The layout (one data-parallel replica) and layers per (virtual) stage, checked against
/// the model as `launch train` checks them.
fn layout_for(p: &ParallelOptions, config: &ModelConfig) -> Result<(Layout, Vec<usize>)> {
    let bad = |message: String| Error::Config {
        file: "launch convert".into(),
        message,
    };
    p.validate().map_err(bad)?;
    let layout = Layout::new(1, p.tp, p.pp, p.ep)
        .and_then(|l| l.check_model(&config.shape()).map(|()| l))
        .map_err(|e| bad(format!("--tp/--pp/--ep: {e}")))?;
    let sizes = if p.pp > 1 {
        p.stage_sizes(config).map_err(bad)?
    } else {
        vec![config.num_layers]
    };
    Ok((layout, sizes))
}

fn layout_json(layout: &Layout, sizes: &[usize]) -> Value {
    json!({"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "stage_layers": sizes})
}

/// Every tensor's boxes in the file of the rank that would save it.
fn place_all(
    tensors: &BTreeMap<String, (checkpoint::DType, Vec<usize>)>,
    config: &ModelConfig,
    layout: &Layout,
    sizes: &[usize],
) -> Placement {
    let mut out = Placement::new();
    for (name, (_, shape)) in tensors {
        for (rank, slice) in trainer::model::names::place(name, shape, config, layout, sizes) {
            out.entry(trainer::state::shard_file(rank))
                .or_default()
                .push((name.clone(), slice));
        }
    }
    out
}

/// Bytes of a size as transformers' `max_shard_size` reads it: a number of bytes, or with
/// KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let (number, unit) = units
        .iter()
        .find_map(|&(u, m)| t.strip_suffix(u).map(|n| (n.trim(), m)))
        .unwrap_or((t.as_str(), 1));
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok((n * unit as f64) as u64),
        _ => Err(Error::Config {
            file: "--max-shard-size".into(),
            message: format!("`{text}`: expected bytes, or a size like 5GB, 500MB or 2GiB"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_transformers_reads_them() {
        assert_eq!(parse_size("5GB").ok(), Some(5_000_000_000));
        assert_eq!(parse_size("2GiB").ok(), Some(2 << 30));
        assert_eq!(parse_size("500mb").ok(), Some(500_000_000));
        assert_eq!(parse_size("1234").ok(), Some(1234));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0GB").is_err());
    }

    #[test]
    fn endpoints_need_a_kind_and_a_dir() {
        assert_eq!(
            Endpoint::parse("--from", "hf:/m").ok(),
            Some(Endpoint::Hf("/m".into()))
        );
        assert!(Endpoint::parse("--from", "/m").is_err());
        assert!(Endpoint::parse("--to", "sharded:").is_err());
    }
}
