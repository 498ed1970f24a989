//! Properties of the TCP communicator over generated cases: every collective, at world
//! sizes 1..=5, f32 and bf16, lengths around the tree/ring switch, against references
//! computed from all ranks' inputs.

use crate::common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::bf16;
use parallel::{Collectives, Communicator, ReduceOp, TcpComm};
use tidemill_parallel as parallel;

fn all_reduce_cases<T: Val>(comms: &[TcpComm], rng: &mut Rng, name: &str) {
    let n = comms.len();
    let mut lens = lengths(rng);
    lens.push(1 << 20);
    for len in lens {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let ins = inputs::<T>(rng.next(), n, len);
            let outs = on_all(comms, |r, c| {
                let mut buf = ins[r].clone();
                c.all_reduce(&mut buf, op).expect("all_reduce");
                buf
            });
            let what = format!("{name} all_reduce {op:?} of {len} at world {n}");
            assert_same_everywhere(&outs, &what);
            check_reduced(&outs[0], &ins, 0, op, &what);
        }
    }
}

#[test]
fn all_reduce_matches_the_reference() {
    let mut rng = Rng(1);
    for n in 1..=5 {
        let comms = group(n, Duration::from_secs(30));
        all_reduce_cases::<f32>(&comms, &mut rng, "f32");
        all_reduce_cases::<bf16>(&comms, &mut rng, "bf16");
        assert!(comms
            .iter()
            .all(|c| c.seq() == comms[0].seq() && c.seq() > 0));
    }
}

fn gather_scatter_cases<T: Val>(comms: &[TcpComm], rng: &mut Rng, name: &str) {
    let n = comms.len();
    for len in lengths(rng) {
        let ins = inputs::<T>(rng.next(), n, len);
        let outs = on_all(comms, |r, c| c.all_gather(&ins[r]).expect("all_gather"));
        let want: Vec<T> = ins.concat();
        assert!(
            outs.iter().all(|o| *o == want),
            "{name} all_gather of {len} at world {n}"
        );

        let per = len.div_ceil(n.max(1));
        let ins = inputs::<T>(rng.next(), n, per * n);
        let op = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max][rng.below(3)];
        let outs = on_all(comms, |r, c| {
            c.reduce_scatter(&ins[r], op).expect("reduce_scatter")
        });
        for (r, o) in outs.iter().enumerate() {
            assert_eq!(o.len(), per);
            check_reduced(
                o,
                &ins,
                r * per,
                op,
                &format!("{name} reduce_scatter {op:?} of {per}x{n}, rank {r}"),
            );
        }
    }
}

#[test]
fn all_gather_and_reduce_scatter_match_the_reference() {
    let mut rng = Rng(2);
    for n in 1..=5 {
        let comms = group(n, Duration::from_secs(30));
        gather_scatter_cases::<f32>(&comms, &mut rng, "f32");
        gather_scatter_cases::<bf16>(&comms, &mut rng, "bf16");
    }
}

#[test]
fn broadcast_from_every_root() {
    let mut rng = Rng(3);
    for n in 1..=5 {
        let comms = group(n, Duration::from_secs(30));
        for len in lengths(&mut rng) {
            for root in 0..n {
                let ins = inputs::<bf16>(rng.next(), n, len);
                let outs = on_all(&comms, |r, c| {
                    let mut buf = ins[r].clone();
                    c.broadcast(&mut buf, root).expect("broadcast");
                    buf
                });
                assert!(
                    outs.iter().all(|o| *o == ins[root]),
                    "broadcast of {len} from {root} at world {n}"
                );
            }
        }
    }
}

#[test]
fn send_recv_around_the_ring() {
    let mut rng = Rng(4);
    for n in 2..=5 {
        let comms = group(n, Duration::from_secs(30));
        let mut lens = lengths(&mut rng);
        lens.push(1 << 20);
        for len in lens {
            let ins = inputs::<f32>(rng.next(), n, len);
            let outs = on_all(&comms, |r, c| {
                let mut got = vec![0f32; len];
                let (to, from) = ((r + 1) % n, (r + n - 1) % n);
                // Even ranks send first, odd ranks receive first: no cycle of blocked sends.
                if r % 2 == 0 {
                    c.send(&ins[r], to).expect("send");
                    c.recv(&mut got, from).expect("recv");
                } else {
                    c.recv(&mut got, from).expect("recv");
                    c.send(&ins[r], to).expect("send");
                }
                got
            });
            for (r, o) in outs.iter().enumerate() {
                assert!(
                    *o == ins[(r + n - 1) % n],
                    "send/recv of {len} at world {n}, rank {r}"
                );
            }
        }
        // Point to point is not a collective: it leaves seq alone.
        assert!(comms.iter().all(|c| c.seq() == 0));
    }
}

#[test]
fn all_to_all_with_uneven_counts() {
    let mut rng = Rng(5);
    for n in 1..=5 {
        let comms = group(n, Duration::from_secs(30));
        for case in 0..30 {
            // Mostly small counts with many zeros; a few large ones to exercise full duplex.
            let cap = if case % 10 == 9 { 200_000 } else { 40 };
            let counts: Vec<Vec<usize>> = (0..n)
                .map(|_| {
                    (0..n)
                        .map(|_| if rng.below(3) == 0 { 0 } else { rng.below(cap) })
                        .collect()
                })
                .collect();
            let ins: Vec<Vec<f32>> = counts.iter().map(|c| rng.f32s(c.iter().sum())).collect();
            let outs = on_all(&comms, |r, c| {
                c.all_to_all(&ins[r], &counts[r]).expect("all_to_all")
            });
            for (j, (got, got_counts)) in outs.iter().enumerate() {
                let mut want = Vec::new();
                for (r, input) in ins.iter().enumerate() {
                    let at: usize = counts[r][..j].iter().sum();
                    want.extend_from_slice(&input[at..at + counts[r][j]]);
                }
                let want_counts: Vec<usize> = (0..n).map(|r| counts[r][j]).collect();
                assert_eq!(
                    *got_counts, want_counts,
                    "case {case} at world {n}, rank {j}"
                );
                assert!(*got == want, "case {case} at world {n}, rank {j}");
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    for n in 1..=5 {
        let comms = group(n, Duration::from_secs(30));
        let start = Instant::now();
        let times = on_all(&comms, |r, c| {
            std::thread::sleep(Duration::from_millis(30 * r as u64));
            let entered = start.elapsed();
            c.barrier().expect("barrier");
            (entered, start.elapsed())
        });
        let last_in = times.iter().map(|t| t.0).max().expect("ranks");
        assert!(times.iter().all(|t| t.1 >= last_in), "world {n}: {times:?}");
    }
}

#[test]
fn split_groups_run_their_own_collectives() {
    let mut rng = Rng(6);
    for n in 2..=5 {
        let comms = group(n, Duration::from_secs(30));
        let parity: Vec<Vec<usize>> = (0..2)
            .map(|p| (0..n).filter(|r| r % 2 == p).collect())
            .collect();
        for len in [0, 3, 1000, 16384, 70_001] {
            let ins = inputs::<f32>(rng.next(), n, len);
            let root = rng.below(2);
            let outs = on_all(&comms, |r, c| {
                let sub = c.split(&parity[r % 2]).expect("split");
                let mine = &parity[r % 2];
                assert_eq!((sub.size(), sub.rank()), (mine.len(), r / 2));
                let mut sum = ins[r].clone();
                sub.all_reduce(&mut sum, ReduceOp::Sum)
                    .expect("sub all_reduce");
                let gathered = sub.all_gather(&ins[r]).expect("sub all_gather");
                let mut b = ins[r].clone();
                let root = root.min(sub.size() - 1);
                sub.broadcast(&mut b, root).expect("sub broadcast");
                // A group split from the sub-group: its first one or two members.
                let inner: Vec<usize> = (0..sub.size().min(2)).collect();
                let nested = if sub.rank() < inner.len() {
                    let g = sub.split(&inner).expect("nested split");
                    let mut x = ins[r].clone();
                    g.all_reduce(&mut x, ReduceOp::Max)
                        .expect("nested all_reduce");
                    Some(x)
                } else {
                    None
                };
                assert_eq!(sub.seq(), 3);
                // The world still works after the sub-groups used its connections.
                let mut world = ins[r].clone();
                c.all_reduce(&mut world, ReduceOp::Sum)
                    .expect("world all_reduce");
                (sum, gathered, b, nested, world)
            });
            for (r, (sum, gathered, b, nested, world)) in outs.iter().enumerate() {
                let mine = &parity[r % 2];
                let sub_ins: Vec<Vec<f32>> = mine.iter().map(|&w| ins[w].clone()).collect();
                let what = format!("split at world {n}, len {len}, rank {r}");
                check_reduced(sum, &sub_ins, 0, ReduceOp::Sum, &what);
                assert!(*gathered == sub_ins.concat(), "{what}: all_gather");
                assert!(*b == sub_ins[root.min(mine.len() - 1)], "{what}: broadcast");
                if let Some(x) = nested {
                    check_reduced(x, &sub_ins[..mine.len().min(2)], 0, ReduceOp::Max, &what);
                }
                check_reduced(world, &ins, 0, ReduceOp::Sum, &what);
            }
        }
    }
}

/// One step of a random program every rank runs.
#[derive(Clone, Debug)]
enum Step {
    AllReduce(ReduceOp, usize),
    AllGather(usize),
    ReduceScatter(ReduceOp, usize),
    Broadcast(usize, usize),
    /// Counts `[from][to]`.
    AllToAll(Vec<Vec<usize>>),
    Barrier,
    /// `from` sends `len` elements to `to`.
    SendRecv(usize, usize, usize),
}

fn random_step(rng: &mut Rng, n: usize) -> Step {
    let len = match rng.below(4) {
        0 => rng.below(4),
        1 => rng.below(100),
        2 => rng.below(20_000),
        _ => 16_000 + rng.below(800),
    };
    let op = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max][rng.below(3)];
    match rng.below(7) {
        0 => Step::AllReduce(op, len),
        1 => Step::AllGather(len),
        2 => Step::ReduceScatter(op, len.div_ceil(n)),
        3 => Step::Broadcast(rng.below(n), len),
        4 => Step::AllToAll(
            (0..n)
                .map(|_| (0..n).map(|_| rng.below(3) * rng.below(50)).collect())
                .collect(),
        ),
        5 => Step::Barrier,
        _ if n > 1 => {
            let from = rng.below(n);
            Step::SendRecv(from, (from + 1 + rng.below(n - 1)) % n, len)
        }
        _ => Step::Barrier,
    }
}

/// Rank `r`'s result of `step` on inputs `ins` (one vector per rank).
fn perform(c: &TcpComm, r: usize, step: &Step, ins: &[Vec<f32>]) -> Vec<f32> {
    match step {
        Step::AllReduce(op, _) => {
            let mut x = ins[r].clone();
            c.all_reduce(&mut x, *op).expect("all_reduce");
            x
        }
        Step::AllGather(_) => c.all_gather(&ins[r]).expect("all_gather"),
        Step::ReduceScatter(op, _) => c.reduce_scatter(&ins[r], *op).expect("reduce_scatter"),
        Step::Broadcast(root, _) => {
            let mut x = ins[r].clone();
            c.broadcast(&mut x, *root).expect("broadcast");
            x
        }
        Step::AllToAll(counts) => c.all_to_all(&ins[r], &counts[r]).expect("all_to_all").0,
        Step::Barrier => {
            c.barrier().expect("barrier");
            Vec::new()
        }
        Step::SendRecv(from, to, len) => {
            let mut x = vec![0f32; *len];
            if r == *from {
                c.send(&ins[r], *to).expect("send");
            } else if r == *to {
                c.recv(&mut x, *from).expect("recv");
            }
            x
        }
    }
}

#[test]
fn a_random_program_of_collectives_stays_in_step() {
    let mut rng = Rng(8);
    for n in 1..=5 {
        let comms = group(n, Duration::from_secs(30));
        let steps: Vec<Step> = (0..150).map(|_| random_step(&mut rng, n)).collect();
        let inputs: Vec<Vec<Vec<f32>>> = steps
            .iter()
            .map(|step| match step {
                Step::AllReduce(_, len)
                | Step::AllGather(len)
                | Step::Broadcast(_, len)
                | Step::SendRecv(_, _, len) => (0..n).map(|_| rng.f32s(*len)).collect(),
                Step::ReduceScatter(_, per) => (0..n).map(|_| rng.f32s(per * n)).collect(),
                Step::AllToAll(counts) => counts.iter().map(|c| rng.f32s(c.iter().sum())).collect(),
                Step::Barrier => vec![Vec::new(); n],
            })
            .collect();
        // Every rank runs the whole program without waiting for the others between steps.
        let outs = on_all(&comms, |r, c| {
            steps
                .iter()
                .zip(&inputs)
                .map(|(step, ins)| perform(c, r, step, ins))
                .collect::<Vec<_>>()
        });
        for (i, (step, ins)) in steps.iter().zip(&inputs).enumerate() {
            let what = format!("world {n}, step {i}: {step:?}");
            for (r, out) in outs.iter().map(|o| &o[i]).enumerate() {
                match step {
                    Step::AllReduce(op, _) => check_reduced(out, ins, 0, *op, &what),
                    Step::AllGather(_) => assert!(*out == ins.concat(), "{what}"),
                    Step::ReduceScatter(op, per) => check_reduced(out, ins, r * per, *op, &what),
                    Step::Broadcast(root, _) => assert!(*out == ins[*root], "{what}"),
                    Step::AllToAll(counts) => {
                        let want: Vec<f32> = (0..n)
                            .flat_map(|f| {
                                let at: usize = counts[f][..r].iter().sum();
                                ins[f][at..at + counts[f][r]].to_vec()
                            })
                            .collect();
                        assert!(*out == want, "{what}, rank {r}");
                    }
                    Step::Barrier => {}
                    Step::SendRecv(from, to, _) if r == *to => {
                        assert!(*out == ins[*from], "{what}")
                    }
                    Step::SendRecv(..) => {}
                }
            }
            if matches!(step, Step::AllReduce(..)) {
                let same: Vec<Vec<f32>> = outs.iter().map(|o| o[i].clone()).collect();
                assert_same_everywhere(&same, &what);
            }
        }
        let seq = comms[0].seq();
        assert!(comms.iter().all(|c| c.seq() == seq));
        let collectives = steps
            .iter()
            .filter(|s| !matches!(s, Step::SendRecv(..)))
            .count();
        assert_eq!(seq, collectives as u64);
    }
}

#[test]
fn throughput_of_a_large_all_reduce() {
    let n = 4;
    let len = 1 << 20;
    let comms = group(n, Duration::from_secs(60));
    let ins = inputs::<f32>(7, n, len);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let outs = on_all(&comms, |r, c| {
            let mut buf = ins[r].clone();
            c.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
            buf
        });
        best = best.min(start.elapsed());
        assert_same_everywhere(&outs, "1M all_reduce");
        check_reduced(&outs[0], &ins, 0, ReduceOp::Sum, "1M all_reduce");
    }
    let bytes = (len * 4) as f64;
    eprintln!(
        "all_reduce of {len} f32 at world {n} on loopback: {best:?}, {:.2} GB/s algorithm bandwidth, {:.2} GB/s bus",
        bytes / best.as_secs_f64() / 1e9,
        bytes * 2.0 * (n - 1) as f64 / n as f64 / best.as_secs_f64() / 1e9
    );
}

#[test]
fn a_group_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TcpComm>();
    let comms: Vec<Arc<dyn Communicator>> = group(3, Duration::from_secs(10))
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let outs = on_all(&comms, |r, c| {
        let c = Arc::clone(c);
        std::thread::spawn(move || {
            let mut x = [r as f32];
            c.all_reduce(&mut x, ReduceOp::Max).expect("all_reduce");
            x[0]
        })
        .join()
        .expect("thread")
    });
    assert_eq!(outs, [2.0; 3]);
}
