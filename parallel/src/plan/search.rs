//! The strategy search: every dp × tp × pp × ep layout of a world, with every micro-batch,
//! recomputation, ZeRO-1 and virtual-stage choice, priced by the cost model and ranked by
//! predicted step time. Every layout or variant left out keeps the reason.

use std::collections::HashMap;

use serde::Serialize;

use super::cost::{balance, estimate, Candidate, Estimate, Job};
use super::hardware::{human_bytes, Hardware};
use crate::{Layout, LayoutError};

/// What the search may vary; `Some` fixes a choice (to price one layout).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Space {
    pub dp: Option<usize>,
    pub tp: Option<usize>,
    pub pp: Option<usize>,
    pub ep: Option<usize>,
    pub micro_batch: Option<usize>,
    pub virtual_stages: Option<usize>,
    pub zero1: Option<bool>,
    pub recompute: Option<bool>,
}

/// A layout or variant the search left out, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejection {
    pub layout: String,
    pub reason: String,
}

/// A candidate with its predicted cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Priced {
    pub candidate: Candidate,
    pub estimate: Estimate,
}

/// The search's result: candidates best first, and what was left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub world: usize,
    pub candidates: Vec<Priced>,
    pub rejected: Vec<Rejection>,
}

impl Plan {
    pub fn best(&self) -> Option<&Priced> {
        self.candidates.first()
    }
}

/// The divisors of `n`, ascending, in O(√n).
pub(super) fn divisors(n: usize) -> Vec<usize> {
    let (mut low, mut high) = (Vec::new(), Vec::new());
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            low.push(d);
            if d * d != n {
                high.push(n / d);
            }
        }
        d += 1;
    }
    low.extend(high.into_iter().rev());
    low
}

/// The largest world the search takes (a million devices).
pub const MAX_WORLD: usize = 1 << 20;

fn layout_name(dp: usize, tp: usize, pp: usize, ep: usize) -> String {
    format!("dp={dp} tp={tp} pp={pp} ep={ep}")
}

/// The layout of tp/pp/ep over `world` devices of `hw`, or why the model, the node or
/// the batch rules it out (dp follows): the checks `launch train` makes.
fn layout_for(
    job: &Job,
    hw: &Hardware,
    world: usize,
    tp: usize,
    pp: usize,
    ep: usize,
) -> Result<Layout, LayoutError> {
    let layout = Layout::for_world(None, tp, pp, ep, world, Some(hw.gpus_per_node))?;
    layout.check_model(&job.model)?;
    layout.check_batch(job.global_batch, 1)?;
    Ok(layout)
}

/// A tp/pp/ep choice that does not divide the world, refused with the layout's words.
fn refusal(layout: String, world: usize, tp: usize, pp: usize, ep: usize) -> Rejection {
    let reason = match Layout::for_world(None, tp, pp, ep, world, None) {
        Err(e) => e.to_string(),
        Ok(_) => format!("{layout} does not divide the {world} devices"),
    };
    Rejection { layout, reason }
}

/// Search `world` devices of `hw` for `job`, within `space`.
pub fn search(job: &Job, hw: &Hardware, world: usize, space: &Space) -> Plan {
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    let invalid = if world == 0 || world > MAX_WORLD {
        Some((
            format!("{world} devices"),
            format!("the search takes 1 to {MAX_WORLD} devices"),
        ))
    } else {
        job.validate().err().map(|e| ("the model".to_string(), e))
    };
    if let Some((layout, reason)) = invalid {
        rejected.push(Rejection { layout, reason });
        return Plan {
            world,
            candidates,
            rejected,
        };
    }
    let costs = job.model.layer_costs();
    let mut sizes: HashMap<usize, Vec<usize>> = HashMap::new();
    let limit = hw.memory_bytes();
    let pick = |fixed: Option<usize>, all: Vec<usize>| match fixed {
        Some(v) => vec![v],
        None => all,
    };
    for tp in pick(space.tp, divisors(world)) {
        if !world.is_multiple_of(tp) {
            rejected.push(refusal(format!("tp={tp}"), world, tp, 1, 1));
            continue;
        }
        for pp in pick(space.pp, divisors(world / tp)) {
            if !(world / tp).is_multiple_of(pp) {
                rejected.push(refusal(format!("tp={tp} pp={pp}"), world, tp, pp, 1));
                continue;
            }
            for ep in pick(space.ep, divisors(world / tp / pp)) {
                let rest = world / tp / pp;
                if !rest.is_multiple_of(ep) {
                    rejected.push(refusal(
                        format!("tp={tp} pp={pp} ep={ep}"),
                        world,
                        tp,
                        pp,
                        ep,
                    ));
                    continue;
                }
                let dp = rest / ep;
                let name = layout_name(dp, tp, pp, ep);
                if space.dp.is_some_and(|d| d != dp) {
                    continue;
                }
                if let Err(e) = layout_for(job, hw, world, tp, pp, ep) {
                    rejected.push(Rejection {
                        layout: name,
                        reason: e.to_string(),
                    });
                    continue;
                }
                let rows = job.global_batch / (dp * ep);
                for mb in pick(space.micro_batch, divisors(rows)) {
                    if !rows.is_multiple_of(mb) {
                        rejected.push(Rejection {
                            layout: format!("{name} mb={mb}"),
                            reason: format!(
                                "micro-batch {mb} must divide the {rows} sequences per data rank"
                            ),
                        });
                        continue;
                    }
                    let micro = rows / mb;
                    let max_v = if pp > 1 { job.model.layers / pp } else { 1 };
                    for v in pick(space.virtual_stages, (1..=max_v).collect()) {
                        if let Some(reason) = check_virtual(job, pp, v, micro) {
                            rejected.push(Rejection {
                                layout: format!("{name} mb={mb} v={v}"),
                                reason,
                            });
                            continue;
                        }
                        let stage_sizes = sizes
                            .entry(pp * v)
                            .or_insert_with(|| balance(&costs, pp * v))
                            .clone();
                        let recomputes: &[bool] = match space.recompute {
                            Some(r) => &[r][..],
                            None => &[false, true],
                        };
                        let zero1s: &[bool] = match space.zero1 {
                            Some(z) => &[z][..],
                            None if dp * ep > 1 => &[false, true],
                            None => &[false],
                        };
                        for &recompute in recomputes.iter() {
                            for &zero1 in zero1s.iter() {
                                let candidate = Candidate {
                                    dp,
                                    tp,
                                    pp,
                                    ep,
                                    micro_batch: mb,
                                    recompute,
                                    zero1,
                                    virtual_stages: v,
                                };
                                let estimate = estimate(job, hw, candidate, &stage_sizes);
                                let need = estimate.memory.total();
                                if need > limit {
                                    rejected.push(Rejection {
                                        layout: candidate.to_string(),
                                        reason: format!(
                                            "does not fit: needs {} per device, has {}",
                                            human_bytes(need),
                                            human_bytes(limit)
                                        ),
                                    });
                                    continue;
                                }
                                candidates.push(Priced {
                                    candidate,
                                    estimate,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    if candidates.is_empty() && rejected.is_empty() {
        rejected.push(Rejection {
            layout: format!("{space:?}"),
            reason: format!("no dp × tp × pp × ep of these choices makes {world} devices"),
        });
    }
    candidates.sort_by(|a, b| a.estimate.step_time_s.total_cmp(&b.estimate.step_time_s));
    Plan {
        world,
        candidates,
        rejected,
    }
}

/// Why `v` virtual stages per rank cannot run `micro` micro-batches on `pp` ranks.
fn check_virtual(job: &Job, pp: usize, v: usize, micro: usize) -> Option<String> {
    if v == 0 {
        return Some("virtual_stages must be at least 1".into());
    }
    if v == 1 {
        return None;
    }
    if pp < 2 {
        return Some("the interleaved schedule needs pp ≥ 2".into());
    }
    if pp * v > job.model.layers {
        return Some(format!(
            "pp × virtual stages = {} exceeds the layers ({})",
            pp * v,
            job.model.layers
        ));
    }
    (!micro.is_multiple_of(pp)).then(|| {
        format!(
            "the interleaved schedule runs micro-batches in groups of pp={pp}; {micro} per step \
             is not a multiple"
        )
    })
}
