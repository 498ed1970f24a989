//! The dp × tp × pp × ep layout of a job: checked once, at construction ([`Layout::new`],
//! [`Layout::for_world`]), against the model ([`Layout::check_model`]) and the batch
//! ([`Layout::check_batch`]). The strategy search, the mesh, tensor/expert sharding and
//! the launcher all refuse a layout through these, so each refusal has one wording.
//!
//! Rank order follows Megatron-Core: tensor parallel fastest, then expert, then data, then
//! pipeline — `rank = tp + TP·(ep + EP·(dp + DP·pp))`. Consecutive ranks share a tensor-
//! parallel group, so with `nproc_per_node` a multiple of `tp` every TP group lives inside
//! one node (its all-reduces run twice per layer and must not cross the network).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::plan::ModelShape;

/// Sizes of the four mesh axes. Built only through [`Layout::new`] or
/// [`Layout::for_world`] (`#[non_exhaustive]`), so every `Layout` has each axis at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
}

/// A mesh axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Tp,
    Ep,
    Dp,
    Pp,
}

impl Axis {
    pub fn name(self) -> &'static str {
        match self {
            Axis::Tp => "tp",
            Axis::Ep => "ep",
            Axis::Dp => "dp",
            Axis::Pp => "pp",
        }
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one rank sits in the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coords {
    pub tp: usize,
    pub ep: usize,
    pub dp: usize,
    pub pp: usize,
}

impl Coords {
    fn get(&self, axis: Axis) -> usize {
        match axis {
            Axis::Tp => self.tp,
            Axis::Ep => self.ep,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        }
    }

    fn set(&mut self, axis: Axis, v: usize) {
        match axis {
            Axis::Tp => self.tp = v,
            Axis::Ep => self.ep = v,
            Axis::Dp => self.dp = v,
            Axis::Pp => self.pp = v,
        }
    }
}

/// Why a layout cannot run: one variant (and one sentence) per refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{0} must be at least 1")]
    Zero(Axis),
    #[error(
        "tp×pp×ep = {tp}×{pp}×{ep} = {ranks} must divide the {world} ranks of the job",
        ranks = tp * pp * ep
    )]
    Indivisible {
        tp: usize,
        pp: usize,
        ep: usize,
        world: usize,
    },
    #[error("dp×tp×pp×ep = {dp}×{tp}×{pp}×{ep} = {ranks} ranks, but the job has {world}", ranks = dp * tp * pp * ep)]
    World {
        dp: usize,
        tp: usize,
        pp: usize,
        ep: usize,
        world: usize,
    },
    #[error(
        "tp={tp} must divide the {local} devices of a node: a tensor-parallel group \
         all-reduces twice per layer and must stay inside one node"
    )]
    AcrossNodes { tp: usize, local: usize },
    #[error("tp={tp} must divide the {what} ({n})")]
    TpDivides {
        tp: usize,
        what: &'static str,
        n: usize,
    },
    #[error("tp={tp} must divide the key/value heads ({kv}) or be a multiple of them")]
    KvHeads { tp: usize, kv: usize },
    #[error("ep={ep} needs a mixture-of-experts model; this model has no experts")]
    NoExperts { ep: usize },
    #[error("ep={ep} must divide the experts ({experts})")]
    Experts { ep: usize, experts: usize },
    #[error("pp={pp} cannot exceed the layers ({layers}): every stage needs at least one")]
    Layers { pp: usize, layers: usize },
    #[error(
        "global_batch {global_batch} must be a multiple of micro_batch {micro_batch} × data \
         ranks {ranks} (dp×ep: every data rank takes an equal share of whole micro-batches)"
    )]
    Batch {
        global_batch: usize,
        micro_batch: usize,
        ranks: usize,
    },
}

impl Default for Layout {
    fn default() -> Self {
        Self::data_parallel(1)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dp={} tp={} pp={} ep={}",
            self.dp, self.tp, self.pp, self.ep
        )
    }
}

impl<'de> Deserialize<'de> for Layout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            dp: usize,
            tp: usize,
            pp: usize,
            ep: usize,
        }
        let r = Raw::deserialize(d)?;
        Layout::new(r.dp, r.tp, r.pp, r.ep).map_err(serde::de::Error::custom)
    }
}

impl Layout {
    /// Axes from fastest-varying to slowest.
    pub const ORDER: [Axis; 4] = [Axis::Tp, Axis::Ep, Axis::Dp, Axis::Pp];

    /// A layout of these sizes, each at least 1.
    pub fn new(dp: usize, tp: usize, pp: usize, ep: usize) -> Result<Self, LayoutError> {
        let layout = Self { dp, tp, pp, ep };
        match Self::ORDER.into_iter().find(|&a| layout.size(a) == 0) {
            Some(axis) => Err(LayoutError::Zero(axis)),
            None => Ok(layout),
        }
    }

    /// Pure data parallelism over `world` ranks (at least one).
    pub fn data_parallel(world: usize) -> Self {
        Self {
            dp: world.max(1),
            tp: 1,
            pp: 1,
            ep: 1,
        }
    }

    /// The layout of a job of `world` ranks, `local_world` of them per node when known:
    /// `dp` is the world divided by tp × pp × ep unless given; the layout must use every
    /// rank, and tensor-parallel groups must not straddle nodes.
    pub fn for_world(
        dp: Option<usize>,
        tp: usize,
        pp: usize,
        ep: usize,
        world: usize,
        local_world: Option<usize>,
    ) -> Result<Self, LayoutError> {
        let model_ranks = tp * pp * ep;
        let dp = match dp {
            Some(dp) => dp,
            None if model_ranks > 0 && world.is_multiple_of(model_ranks) => world / model_ranks,
            None if model_ranks == 0 => 0,
            None => {
                return Err(LayoutError::Indivisible { tp, pp, ep, world });
            }
        };
        let layout = Self::new(dp, tp, pp, ep)?;
        layout.check_world(world)?;
        if let Some(local) = local_world {
            if !local.is_multiple_of(tp) {
                return Err(LayoutError::AcrossNodes { tp, local });
            }
        }
        Ok(layout)
    }

    /// The layout uses exactly `world` ranks.
    pub fn check_world(&self, world: usize) -> Result<(), LayoutError> {
        if self.world() == world {
            return Ok(());
        }
        let Layout { dp, tp, pp, ep } = *self;
        Err(LayoutError::World {
            dp,
            tp,
            pp,
            ep,
            world,
        })
    }

    /// What the model requires of the layout: heads, MLP width and vocabulary split over
    /// tp, experts over ep, at least one layer per pipeline stage.
    pub fn check_model(&self, m: &ModelShape) -> Result<(), LayoutError> {
        let tp = self.tp;
        for (what, n) in [("attention heads", m.heads)] {
            if !n.is_multiple_of(tp) {
                return Err(LayoutError::TpDivides { tp, what, n });
            }
        }
        if !(m.kv_heads.is_multiple_of(tp) || tp.is_multiple_of(m.kv_heads.max(1))) {
            return Err(LayoutError::KvHeads { tp, kv: m.kv_heads });
        }
        for (what, n) in [("intermediate size", m.ffn), ("vocabulary size", m.vocab)] {
            if !n.is_multiple_of(tp) {
                return Err(LayoutError::TpDivides { tp, what, n });
            }
        }
        match m.experts {
            0 if self.ep > 1 => return Err(LayoutError::NoExperts { ep: self.ep }),
            e if e > 0 && !e.is_multiple_of(self.ep) => {
                return Err(LayoutError::Experts {
                    ep: self.ep,
                    experts: e,
                })
            }
            _ => {}
        }
        if self.pp > m.layers {
            return Err(LayoutError::Layers {
                pp: self.pp,
                layers: m.layers,
            });
        }
        Ok(())
    }

    /// Every data rank (`dp × ep`) takes an equal share of whole micro-batches of every
    /// global batch.
    pub fn check_batch(&self, global_batch: usize, micro_batch: usize) -> Result<(), LayoutError> {
        let per_step = micro_batch * self.data_ranks();
        if per_step == 0 || global_batch == 0 || !global_batch.is_multiple_of(per_step) {
            return Err(LayoutError::Batch {
                global_batch,
                micro_batch,
                ranks: self.data_ranks(),
            });
        }
        Ok(())
    }

    /// Ranks the layout needs.
    pub fn world(&self) -> usize {
        self.dp * self.tp * self.pp * self.ep
    }

    /// Ranks that each take their own share of every batch (`dp × ep`).
    pub fn data_ranks(&self) -> usize {
        self.dp * self.ep
    }

    pub fn size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Tp => self.tp,
            Axis::Ep => self.ep,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        }
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let mut r = rank;
        let mut c = Coords::default();
        for axis in Self::ORDER {
            c.set(axis, r % self.size(axis));
            r /= self.size(axis);
        }
        c
    }

    pub fn rank(&self, c: Coords) -> usize {
        Self::ORDER
            .iter()
            .rev()
            .fold(0, |acc, &axis| acc * self.size(axis) + c.get(axis))
    }

    /// The ranks that differ from `rank` only along `axes`, ascending.
    pub fn group(&self, rank: usize, axes: &[Axis]) -> Vec<usize> {
        let base = self.coords(rank);
        let mut out = vec![base];
        for &axis in axes {
            out = out
                .into_iter()
                .flat_map(|c| {
                    (0..self.size(axis)).map(move |v| {
                        let mut c = c;
                        c.set(axis, v);
                        c
                    })
                })
                .collect();
        }
        let mut ranks: Vec<usize> = out.into_iter().map(|c| self.rank(c)).collect();
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dp: usize, tp: usize, pp: usize, ep: usize) -> Layout {
        Layout::new(dp, tp, pp, ep).expect("valid")
    }

    #[test]
    fn rank_order_is_tp_then_ep_then_dp_then_pp() {
        let l = layout(2, 2, 2, 1);
        assert_eq!(l.world(), 8);
        for r in 0..8 {
            assert_eq!(l.rank(l.coords(r)), r);
        }
        assert_eq!(
            l.coords(5),
            Coords {
                tp: 1,
                ep: 0,
                dp: 0,
                pp: 1
            }
        );
        assert_eq!(l.group(5, &[Axis::Tp]), vec![4, 5]);
        assert_eq!(l.group(5, &[Axis::Dp]), vec![5, 7]);
        assert_eq!(l.group(5, &[Axis::Pp]), vec![1, 5]);
        assert_eq!(
            l.group(5, &[Axis::Tp, Axis::Ep, Axis::Pp]),
            vec![0, 1, 4, 5]
        );
        let e = layout(2, 1, 1, 2);
        assert_eq!(e.group(1, &[Axis::Ep]), vec![0, 1]);
        assert_eq!(e.group(1, &[Axis::Dp]), vec![1, 3]);
        assert_eq!(e.group(1, &[Axis::Ep, Axis::Dp]), vec![0, 1, 2, 3]);
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        let refused = |r: Result<Layout, LayoutError>, what: &str| match r {
            Err(e) => assert!(e.to_string().contains(what), "{e}"),
            Ok(l) => panic!("{l} was accepted"),
        };
        assert!(Layout::for_world(None, 4, 1, 1, 4, Some(4)).is_ok());
        refused(
            Layout::for_world(Some(1), 4, 1, 1, 8, None),
            "= 4 ranks, but the job has 8",
        );
        refused(
            Layout::for_world(None, 4, 1, 1, 4, Some(2)),
            "inside one node",
        );
        refused(Layout::new(1, 0, 1, 1), "tp must be at least 1");
        refused(
            Layout::for_world(None, 2, 1, 1, 3, None),
            "= 2 must divide the 3 ranks",
        );
        let json = serde_json::json!({"dp": 1, "tp": 0, "pp": 1, "ep": 1});
        assert!(serde_json::from_value::<Layout>(json).is_err());
    }

    /// Every factorisation of every world up to 64 is accepted with the implied dp, and
    /// maps ranks to coordinates and back.
    #[test]
    fn every_factorisation_round_trips() {
        for world in 1..=64usize {
            for tp in (1..=world).filter(|t| world.is_multiple_of(*t)) {
                for pp in (1..=world / tp).filter(|p| (world / tp).is_multiple_of(*p)) {
                    for ep in (1..=world / tp / pp).filter(|e| (world / tp / pp).is_multiple_of(*e))
                    {
                        let l = Layout::for_world(None, tp, pp, ep, world, None).expect("fits");
                        assert_eq!(l.world(), world);
                        for r in 0..world {
                            assert_eq!(l.rank(l.coords(r)), r);
                        }
                    }
                }
            }
        }
    }
}
