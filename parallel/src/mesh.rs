//! The device mesh: this rank's place in a [`Layout`] and the communicator of each axis.
//!
//! Expert parallelism is carved out of data parallelism, as in Megatron: the dense part of
//! the model is replicated over `dp × ep` ranks that each take their own share of the batch
//! (the *data* group), while each expert lives on one of the `ep` ranks and is replicated
//! only over `dp`.

use std::fmt;
use std::sync::Arc;

use crate::comm::Communicator;
use crate::error::Result;
use crate::layout::{Axis, Coords, Layout};

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
        layout.check_world(world.size())?;
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
