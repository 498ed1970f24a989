//! When each pipeline rank runs which micro-batch, and what passes between ranks after
//! each piece of work.
//!
//! A schedule is first an order of work per rank (Megatron's: GPipe, 1F1B, interleaved
//! 1F1B over virtual stages). [`plan`] then plays all ranks' orders together, one piece of
//! work per rank per tick, each starting once its input has arrived, so that every send has
//! its receive in the same tick. A rank runs its own steps in order without waiting for
//! ticks: a step's transfers are its only synchronisation, with one neighbour each way,
//! downstream (activations) before upstream (gradients); since both sides of a transfer
//! come from the same plan, no rank ever waits for a message that is not coming.

use std::collections::HashSet;

/// Order of forwards and backwards on each rank (the job file's `parallel.schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PipelineSchedule {
    /// After a warm-up of `ranks - rank - 1` forwards, one forward and one backward in
    /// turn: at most `ranks - rank` micro-batches in flight.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Every forward, then every backward (the baseline; all micro-batches in flight).
    #[serde(rename = "gpipe")]
    GPipe,
    /// 1F1B over several chunks of layers per rank (virtual stages): the bubble shrinks by
    /// the number of chunks, for more transfers. Micro-batches go in groups of `ranks`.
    #[serde(rename = "interleaved")]
    Interleaved,
}

impl PipelineSchedule {
    /// As the job file writes it.
    pub fn name(self) -> &'static str {
        match self {
            PipelineSchedule::OneFOneB => "1f1b",
            PipelineSchedule::GPipe => "gpipe",
            PipelineSchedule::Interleaved => "interleaved",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    Backward,
}

/// One forward or backward of one micro-batch through one chunk of a rank's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Work {
    pub pass: Pass,
    pub chunk: usize,
    pub micro: usize,
}

/// One step of a rank's part: some work (or none, while it only relays), then whether its
/// result goes downstream (a forward's output, to the next rank) or upstream (a backward's
/// input gradient, to the previous rank), and which later work of this rank the tensors
/// received from the previous (`recv_down`) and the next rank (`recv_up`) are for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// When, with every piece of work taking the same time (for tests and traces).
    pub tick: usize,
    pub work: Option<Work>,
    pub send_down: bool,
    pub send_up: bool,
    pub recv_down: Option<Work>,
    pub recv_up: Option<Work>,
}

/// The shape of a pipeline run: `ranks` ranks holding `chunks` chunks each, `micro`
/// micro-batches; without backward for evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub ranks: usize,
    pub chunks: usize,
    pub micro: usize,
    pub backward: bool,
}

impl Shape {
    fn virtual_stage(&self, rank: usize, chunk: usize) -> usize {
        chunk * self.ranks + rank
    }

    fn last_virtual_stage(&self) -> usize {
        self.ranks * self.chunks - 1
    }
}

/// Why a shape cannot run under a schedule (a configuration error, said in its terms).
pub fn check(schedule: PipelineSchedule, shape: Shape) -> Result<(), String> {
    let Shape {
        ranks,
        chunks,
        micro,
        ..
    } = shape;
    match schedule {
        PipelineSchedule::Interleaved if chunks < 2 || ranks < 2 => Err(
            "the interleaved schedule needs pp ≥ 2 and at least 2 virtual stages per rank".into(),
        ),
        PipelineSchedule::Interleaved if shape.backward && !micro.is_multiple_of(ranks) => {
            Err(format!(
                "the interleaved schedule runs micro-batches in groups of pp={ranks}; {micro} \
             micro-batches per step is not a multiple"
            ))
        }
        PipelineSchedule::OneFOneB | PipelineSchedule::GPipe if chunks != 1 => Err(format!(
            "{chunks} virtual stages per rank need the interleaved schedule"
        )),
        _ if ranks == 0 || micro == 0 => Err("a pipeline needs ranks and micro-batches".into()),
        _ => Ok(()),
    }
}

/// (chunk, micro-batch) of each forward in the order every rank runs them: micro-batches
/// in groups of `ranks`, each group through chunk 0, then chunk 1, … (Megatron's
/// interleaved order; with one chunk simply micro-batch order). Backwards go through the
/// chunks of each group in reverse.
fn sequence(shape: Shape, pass: Pass) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(shape.chunks * shape.micro);
    for group in (0..shape.micro).step_by(shape.ranks) {
        let members = group..(group + shape.ranks).min(shape.micro);
        for c in 0..shape.chunks {
            let chunk = match pass {
                Pass::Forward => c,
                Pass::Backward => shape.chunks - 1 - c,
            };
            out.extend(members.clone().map(|m| (chunk, m)));
        }
    }
    out
}

/// The order of work on `rank`: a warm-up of forwards, then one forward and one backward
/// in turn, then the remaining backwards.
pub fn order(schedule: PipelineSchedule, shape: Shape, rank: usize) -> Vec<Work> {
    let work = |pass, (chunk, micro)| Work { pass, chunk, micro };
    let forwards: Vec<Work> = sequence(shape, Pass::Forward)
        .into_iter()
        .map(|cm| work(Pass::Forward, cm))
        .collect();
    if !shape.backward {
        return forwards;
    }
    let backwards: Vec<Work> = sequence(shape, Pass::Backward)
        .into_iter()
        .map(|cm| work(Pass::Backward, cm))
        .collect();
    let total = forwards.len();
    let before = shape.ranks - rank - 1;
    let warmup = match schedule {
        PipelineSchedule::GPipe => total,
        PipelineSchedule::OneFOneB => before,
        // Megatron: two per later rank, and a whole round of the other chunks.
        PipelineSchedule::Interleaved => 2 * before + (shape.chunks - 1) * shape.ranks,
    }
    .min(total);
    let mut out = forwards[..warmup].to_vec();
    for (f, b) in forwards[warmup..].iter().zip(&backwards) {
        out.extend([*f, *b]);
    }
    out.extend_from_slice(&backwards[total - warmup..]);
    out
}

/// Every rank's steps (indexed by rank), found by playing the orders together.
pub fn plan(schedule: PipelineSchedule, shape: Shape) -> Result<Vec<Vec<Step>>, String> {
    check(schedule, shape)?;
    let p = shape.ranks;
    let orders: Vec<Vec<Work>> = (0..p).map(|r| order(schedule, shape, r)).collect();
    let mut next = vec![0usize; p];
    let mut arrived: HashSet<(usize, Work)> = HashSet::new();
    let mut steps: Vec<Vec<Step>> = vec![Vec::new(); p];
    let mut ticks = 0;
    while (0..p).any(|r| next[r] < orders[r].len()) {
        let mut tick = vec![
            Step {
                tick: ticks,
                ..Step::default()
            };
            p
        ];
        ticks += 1;
        for r in 0..p {
            let Some(&w) = orders[r].get(next[r]) else {
                continue;
            };
            let vs = shape.virtual_stage(r, w.chunk);
            let needs_input = match w.pass {
                Pass::Forward => vs > 0,
                Pass::Backward => vs < shape.last_virtual_stage(),
            };
            if needs_input && !arrived.remove(&(r, w)) {
                continue;
            }
            next[r] += 1;
            tick[r].work = Some(w);
            match w.pass {
                Pass::Forward if vs < shape.last_virtual_stage() => {
                    let to = (r + 1) % p;
                    let chunk = if to == 0 { w.chunk + 1 } else { w.chunk };
                    tick[r].send_down = true;
                    tick[to].recv_down = Some(Work { chunk, ..w });
                }
                Pass::Backward if vs > 0 => {
                    let to = (r + p - 1) % p;
                    let chunk = if r == 0 { w.chunk - 1 } else { w.chunk };
                    tick[r].send_up = true;
                    tick[to].recv_up = Some(Work { chunk, ..w });
                }
                _ => {}
            }
        }
        if tick.iter().all(|s| s.work.is_none()) {
            return Err(format!(
                "the {schedule:?} schedule stalls for {shape:?} at {next:?} (a bug)"
            ));
        }
        for (r, step) in tick.into_iter().enumerate() {
            arrived.extend(
                [step.recv_down, step.recv_up]
                    .into_iter()
                    .flatten()
                    .map(|w| (r, w)),
            );
            if step.work.is_some() || step.recv_down.is_some() || step.recv_up.is_some() {
                steps[r].push(step);
            }
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> impl Iterator<Item = (PipelineSchedule, Shape)> {
        let mut out = Vec::new();
        for ranks in 1..=5 {
            for micro in 1..=12 {
                for backward in [true, false] {
                    for schedule in [PipelineSchedule::OneFOneB, PipelineSchedule::GPipe] {
                        out.push((
                            schedule,
                            Shape {
                                ranks,
                                chunks: 1,
                                micro,
                                backward,
                            },
                        ));
                    }
                    for chunks in 2..=4 {
                        let shape = Shape {
                            ranks,
                            chunks,
                            micro,
                            backward,
                        };
                        if check(PipelineSchedule::Interleaved, shape).is_ok() {
                            out.push((PipelineSchedule::Interleaved, shape));
                        }
                    }
                }
            }
        }
        out.into_iter()
    }

    #[test]
    fn every_schedule_runs_every_piece_of_work_once_and_never_stalls() {
        for (schedule, shape) in shapes() {
            let steps = plan(schedule, shape).unwrap();
            for (r, steps) in steps.iter().enumerate() {
                let done: Vec<Work> = steps.iter().filter_map(|s| s.work).collect();
                assert_eq!(done, order(schedule, shape, r), "{schedule:?} {shape:?}");
                let passes = if shape.backward { 2 } else { 1 };
                let unique: HashSet<_> = done.iter().collect();
                assert_eq!(unique.len(), passes * shape.chunks * shape.micro);
            }
        }
    }

    /// Each send has its receive in the same step on the neighbour, and what is received
    /// is for work the receiver runs later (on the chunk the sender's output feeds).
    #[test]
    fn transfers_pair_up_and_arrive_before_they_are_needed() {
        for (schedule, shape) in shapes() {
            let steps = plan(schedule, shape).unwrap();
            let p = shape.ranks;
            // Replay in lockstep: the k-th transfer between two ranks each way matches.
            let mut sent: Vec<Vec<Vec<Work>>> = vec![vec![Vec::new(); p]; p];
            let mut received: Vec<Vec<Vec<Work>>> = vec![vec![Vec::new(); p]; p];
            for (r, steps) in steps.iter().enumerate() {
                let mut pending: HashSet<Work> = HashSet::new();
                for s in steps {
                    if let Some(w) = s.work {
                        let first = shape.virtual_stage(r, w.chunk) == 0;
                        let last = shape.virtual_stage(r, w.chunk) == shape.last_virtual_stage();
                        let needs = match w.pass {
                            Pass::Forward => !first,
                            Pass::Backward => !last,
                        };
                        assert_eq!(needs, pending.remove(&w), "{schedule:?} {shape:?} {w:?}");
                        assert_eq!(s.send_down, w.pass == Pass::Forward && !last);
                        assert_eq!(s.send_up, w.pass == Pass::Backward && !first);
                        if s.send_down {
                            sent[r][(r + 1) % p].push(w);
                        }
                        if s.send_up {
                            sent[r][(r + p - 1) % p].push(w);
                        }
                    }
                    for (got, from) in [(s.recv_down, (r + p - 1) % p), (s.recv_up, (r + 1) % p)] {
                        if let Some(got) = got {
                            pending.insert(got);
                            received[from][r].push(got);
                        }
                    }
                }
                assert!(pending.is_empty(), "{schedule:?} {shape:?}: {pending:?}");
            }
            for a in 0..p {
                for b in 0..p {
                    let micros =
                        |v: &Vec<Work>| v.iter().map(|w| (w.pass, w.micro)).collect::<Vec<_>>();
                    assert_eq!(micros(&sent[a][b]), micros(&received[a][b]), "{a}→{b}");
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_keeps_at_most_the_later_ranks_in_flight() {
        for (schedule, shape) in shapes().filter(|(_, s)| s.backward) {
            for r in 0..shape.ranks {
                let mut flight = 0usize;
                let mut most = 0;
                for w in order(schedule, shape, r) {
                    match w.pass {
                        Pass::Forward => flight += 1,
                        Pass::Backward => flight -= 1,
                    }
                    most = most.max(flight);
                }
                let total = shape.chunks * shape.micro;
                let bound = match schedule {
                    PipelineSchedule::GPipe => total,
                    PipelineSchedule::OneFOneB => shape.ranks - r,
                    PipelineSchedule::Interleaved => {
                        2 * (shape.ranks - r - 1) + (shape.chunks - 1) * shape.ranks + 1
                    }
                };
                assert_eq!(most, bound.min(total), "{schedule:?} {shape:?} rank {r}");
            }
        }
    }

    /// Ticks of the plan (unit-time work): the interleaved schedule's bubble is smaller.
    #[test]
    fn interleaving_shrinks_the_bubble() {
        let ticks = |schedule, chunks| {
            let shape = Shape {
                ranks: 4,
                chunks,
                micro: 8,
                backward: true,
            };
            // Work on one chunk costs 1/chunks of a whole stage's.
            let steps = plan(schedule, shape).unwrap();
            let ticks = steps.iter().flatten().map(|s| s.tick + 1).max().unwrap();
            ticks as f64 / chunks as f64
        };
        // 2·8 micro-batch passes plus the bubble: 2·(p − 1) for 1F1B, 2·(p − 1)/chunks
        // interleaved (Narayanan et al. 2021, §2.2).
        assert_eq!(ticks(PipelineSchedule::OneFOneB, 1), 16.0 + 6.0);
        assert_eq!(ticks(PipelineSchedule::GPipe, 1), 16.0 + 6.0);
        assert_eq!(ticks(PipelineSchedule::Interleaved, 2), 16.0 + 3.0);
    }

    #[test]
    fn interleaving_needs_whole_groups_of_micro_batches() {
        let shape = Shape {
            ranks: 4,
            chunks: 2,
            micro: 6,
            backward: true,
        };
        assert!(check(PipelineSchedule::Interleaved, shape)
            .unwrap_err()
            .contains("groups of pp=4"));
        assert!(check(
            PipelineSchedule::Interleaved,
            Shape {
                backward: false,
                ..shape
            }
        )
        .is_ok());
        assert!(check(PipelineSchedule::OneFOneB, shape).is_err());
    }
}
