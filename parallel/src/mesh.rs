//! The device mesh: how `dp × ep × tp × pp` ranks are laid out, and the communicator of
//! each axis.
//!
//! Rank order follows Megatron-Core: tensor parallel fastest, then expert, then data, then
//! pipeline — `rank = tp + TP·(ep + EP·(dp + DP·pp))`. Consecutive ranks share a tensor-
//! parallel group, so with `nproc_per_node` a multiple of `tp` every TP group lives inside
//! one node (its all-reduces run twice per layer and must not cross the network).
//!
//! Expert parallelism is carved out of data parallelism, as in Megatron: the dense part of
//! the model is replicated over `dp × ep` ranks that each take their own share of the batch
//! (the *data* group), while each expert lives on one of the `ep` ranks and is replicated
//! only over `dp`.

use std::fmt;
use std::sync::Arc;

use crate::comm::Communicator;
use crate::error::{Error, Result};

/// Sizes of the four mesh axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Where one rank sits in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

impl Layout {
    /// Pure data parallelism over `world` ranks.
    pub fn data_parallel(world: usize) -> Self {
        Self {
            dp: world,
            tp: 1,
            pp: 1,
            ep: 1,
        }
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

    /// Axes from fastest-varying to slowest.
    pub const ORDER: [Axis; 4] = [Axis::Tp, Axis::Ep, Axis::Dp, Axis::Pp];

    /// The layout must use every rank of `world`, each axis at least 1 wide; with
    /// `local_world` ranks per node, tensor-parallel groups must not straddle nodes.
    pub fn check(&self, world: usize, local_world: Option<usize>) -> Result<(), String> {
        for axis in Self::ORDER {
            if self.size(axis) == 0 {
                return Err(format!("{} must be at least 1", axis_name(axis)));
            }
        }
        if self.world() != world {
            return Err(format!(
                "dp×tp×pp×ep = {}×{}×{}×{} = {} ranks, but the job has {world}",
                self.dp,
                self.tp,
                self.pp,
                self.ep,
                self.world()
            ));
        }
        if let Some(local) = local_world {
            if !local.is_multiple_of(self.tp) {
                return Err(format!(
                    "tp={} must divide the {local} ranks per node: a tensor-parallel group \
                     all-reduces twice per layer and must stay inside one node",
                    self.tp
                ));
            }
        }
        Ok(())
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let mut r = rank;
        let mut c = Coords {
            tp: 0,
            ep: 0,
            dp: 0,
            pp: 0,
        };
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

pub fn axis_name(axis: Axis) -> &'static str {
    match axis {
        Axis::Tp => "tp",
        Axis::Ep => "ep",
        Axis::Dp => "dp",
        Axis::Pp => "pp",
    }
}

/// This rank's place in the mesh and a communicator for each group it belongs to.
#[derive(Clone)]
pub struct Mesh {
    pub layout: Layout,
    pub coords: Coords,
    pub world: Arc<dyn Communicator>,
    /// Same layer shard, different tensor-parallel slice.
    pub tp: Arc<dyn Communicator>,
    /// Same dense replica, different experts.
    pub ep: Arc<dyn Communicator>,
    /// Same shard of everything, different data (expert gradients are summed here).
    pub dp: Arc<dyn Communicator>,
    /// Same slices, different pipeline stages.
    pub pp: Arc<dyn Communicator>,
    /// `dp × ep`: the ranks holding the same dense shard (dense gradients are summed here).
    pub data: Arc<dyn Communicator>,
    /// `tp × ep × pp`: one whole model replica (global gradient norms are summed here).
    pub model: Arc<dyn Communicator>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("layout", &self.layout)
            .field("coords", &self.coords)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Split `world` into the groups of `layout`. Every rank must call this at the same
    /// point of its program (splitting is local, but group identities depend on it).
    pub fn new(layout: Layout, world: Arc<dyn Communicator>) -> Result<Self> {
        layout
            .check(world.size(), None)
            .map_err(Error::InvalidArgument)?;
        let rank = world.rank();
        let split = |axes: &[Axis]| world.split(&layout.group(rank, axes));
        Ok(Self {
            layout,
            coords: layout.coords(rank),
            tp: split(&[Axis::Tp])?,
            ep: split(&[Axis::Ep])?,
            dp: split(&[Axis::Dp])?,
            pp: split(&[Axis::Pp])?,
            data: split(&[Axis::Ep, Axis::Dp])?,
            model: split(&[Axis::Tp, Axis::Ep, Axis::Pp])?,
            world,
        })
    }

    /// One rank, every axis 1.
    pub fn solo() -> Self {
        let world: Arc<dyn Communicator> = Arc::new(crate::SoloComm::new());
        // A group of one always splits into itself.
        Self::new(Layout::default(), world).expect("a world of one splits")
    }

    /// This rank's index among the ranks that take different data (`dp × ep`).
    pub fn data_rank(&self) -> usize {
        self.coords.ep + self.layout.ep * self.coords.dp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_order_is_tp_then_ep_then_dp_then_pp() {
        let l = Layout {
            dp: 2,
            tp: 2,
            pp: 2,
            ep: 1,
        };
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
        let e = Layout {
            dp: 2,
            tp: 1,
            pp: 1,
            ep: 2,
        };
        assert_eq!(e.group(1, &[Axis::Ep]), vec![0, 1]);
        assert_eq!(e.group(1, &[Axis::Dp]), vec![1, 3]);
        assert_eq!(e.group(1, &[Axis::Ep, Axis::Dp]), vec![0, 1, 2, 3]);
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        let l = Layout {
            dp: 1,
            tp: 4,
            pp: 1,
            ep: 1,
        };
        let refused = |l: Layout, world, local, what: &str| match l.check(world, local) {
            Err(e) => assert!(e.contains(what), "{e}"),
            Ok(()) => panic!("{l} over {world} ranks was accepted"),
        };
        assert!(l.check(4, Some(4)).is_ok());
        refused(l, 8, None, "= 4 ranks, but the job has 8");
        refused(l, 4, Some(2), "inside one node");
        refused(Layout { tp: 0, ..l }, 0, None, "tp must be at least 1");
    }
}
