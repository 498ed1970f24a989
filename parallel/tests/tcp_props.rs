//! Properties of the TCP communicator over generated cases: every collective, at world
//! sizes 1..=5, f32 and bf16, lengths around the tree/ring switch, against references
//! computed from all ranks' inputs; plus deadlines, lost peers and mismatched collectives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::bf16;
use parallel::{Collectives, Communicator, Error, ReduceOp, TcpComm, TcpOptions};
use tidemill_parallel as parallel;

/// splitmix64: deterministic cases without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn f32s(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.unit()).collect()
    }
}

fn group(n: usize, timeout: Duration) -> Vec<TcpComm> {
    let opts = TcpOptions {
        timeout,
        connect_timeout: Duration::from_secs(20),
        nonce: 0x5eed ^ n as u64,
    };
    TcpComm::local_group(n, opts).expect("local group")
}

/// Run `f(rank, comm)` on every rank at once; results in rank order.
fn on_all<C: Sync, T: Send>(comms: &[C], f: impl Fn(usize, &C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| s.spawn(move || f(r, c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// The lengths every collective is tried at: edges, odd sizes, and around the 64 KiB
/// tree/ring switch for both element sizes.
fn lengths(rng: &mut Rng) -> Vec<usize> {
    let mut v = vec![
        0, 1, 2, 3, 5, 7, 13, 64, 1000, 16383, 16384, 16385, 32767, 32768, 32769,
    ];
    v.extend((0..6).map(|_| 1 + rng.below(40_000)));
    v
}

/// A value type under test: f32 or bf16, converted through f64 for references.
trait Val: parallel::Element + Copy + PartialEq + std::fmt::Debug {
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
    /// Relative error of one rounding.
    const EPS: f64;
}
impl Val for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    const EPS: f64 = 1.2e-7;
}
impl Val for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    const EPS: f64 = 7.9e-3;
}

fn inputs<T: Val>(seed: u64, n: usize, len: usize) -> Vec<Vec<T>> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| rng.f32s(len).into_iter().map(T::from_f32).collect())
        .collect()
}

/// Check `got` against the element-wise reduction of `ins` (sums within rounding error).
fn check_reduced<T: Val>(got: &[T], ins: &[Vec<T>], offset: usize, op: ReduceOp, what: &str) {
    let n = ins.len() as f64;
    for (i, g) in got.iter().enumerate() {
        let xs = ins.iter().map(|v| v[offset + i].to_f64());
        let g = g.to_f64();
        match op {
            ReduceOp::Max => {
                let want = xs.fold(f64::MIN, f64::max);
                assert_eq!(g, want, "{what}: element {i}");
            }
            ReduceOp::Sum | ReduceOp::Avg => {
                let (sum, abs) = xs.fold((0.0, 0.0), |(s, a), x| (s + x, a + x.abs()));
                let scale = if op == ReduceOp::Avg { 1.0 / n } else { 1.0 };
                let want = sum * scale;
                let tol = (abs * scale * n + want.abs()) * T::EPS * 2.0 + 1e-30;
                assert!(
                    (g - want).abs() <= tol,
                    "{what}: element {i}: got {g}, want {want} (tol {tol})"
                );
            }
        }
    }
}

fn assert_same_everywhere<T: Val>(outs: &[Vec<T>], what: &str) {
    let bytes = |v: &Vec<T>| bytemuck::cast_slice::<T, u8>(v).to_vec();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            bytes(o) == bytes(&outs[0]),
            "{what}: rank {r} differs from rank 0"
        );
    }
}

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
fn bad_arguments_are_refused_without_traffic() {
    let comms = group(2, Duration::from_secs(5));
    let c = &comms[0];
    assert!(matches!(c.split(&[1]), Err(Error::InvalidArgument(_))));
    assert!(matches!(c.split(&[1, 0]), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        c.broadcast(&mut [0f32; 2], 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.send(&[0f32; 2], 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.reduce_scatter(&[0f32; 3], ReduceOp::Sum),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.all_to_all(&[0f32; 3], &[1, 1]),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(c.seq(), 0);
    // Still in step afterwards.
    on_all(&comms, |_, c| c.barrier().expect("barrier"));
}

#[test]
fn a_stray_connection_is_refused() {
    use std::io::Write;
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let mut stray = std::net::TcpStream::connect(addrs[0]).expect("stray");
    stray.write_all(&[7u8; 32]).expect("garbage");
    let opts = TcpOptions {
        nonce: 42,
        connect_timeout: Duration::from_secs(10),
        ..TcpOptions::default()
    };
    let comms: Vec<TcpComm> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, opts) = (&addrs, opts.clone());
                s.spawn(move || TcpComm::connect(r, addrs, l, opts).expect("connect"))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let outs = on_all(&comms, |r, c| {
        let mut x = [r as f32 + 1.0];
        c.all_reduce(&mut x, ReduceOp::Sum).expect("all_reduce");
        x[0]
    });
    assert_eq!(outs, [3.0, 3.0]);
}

/// The peer a failure names and the rank it was reported on.
fn named(e: &Error) -> Option<(usize, usize)> {
    match e {
        Error::Timeout { peer, rank, .. }
        | Error::PeerLost { peer, rank, .. }
        | Error::Mismatch { peer, rank, .. } => Some((*peer, *rank)),
        _ => None,
    }
}

#[test]
fn a_rank_that_never_comes_is_named_by_the_timeout() {
    let timeout = Duration::from_millis(300);
    // Small (tree) and large (ring) all-reduce: ranks 0 and 1 wait on each other and on 2.
    for len in [10, 200_000] {
        let comms = group(3, timeout);
        // Rank 2 holds its connections, silent, until the others have failed.
        let done = std::sync::Barrier::new(3);
        let outs = on_all(&comms, |r, c| {
            if r == 2 {
                done.wait();
                return None;
            }
            let start = Instant::now();
            let mut x = vec![1f32; len];
            let err = c
                .all_reduce(&mut x, ReduceOp::Sum)
                .expect_err("rank 2 never came");
            let took = start.elapsed();
            done.wait();
            Some((err, took))
        });
        for (r, out) in outs.iter().enumerate().take(2) {
            let (err, took) = out.as_ref().expect("an error");
            eprintln!("len {len}, rank {r} after {took:?}: {err}");
            assert!(
                matches!(err, Error::Timeout { .. }),
                "len {len}, rank {r}: {err}"
            );
            assert_eq!(named(err), Some((2, r)), "len {len}, rank {r}: {err}");
            let slack = Duration::from_millis(700);
            assert!(
                *took >= timeout && *took < timeout + slack,
                "rank {r} took {took:?}"
            );
        }
    }
}

#[test]
fn a_dropped_peer_is_named() {
    let timeout = Duration::from_secs(3);
    let mut comms = group(3, timeout);
    drop(comms.pop());
    let outs = on_all(&comms, |_, c| {
        let start = Instant::now();
        let mut x = vec![1f32; 100];
        let err = c
            .all_reduce(&mut x, ReduceOp::Sum)
            .expect_err("rank 2 is gone");
        (err, start.elapsed())
    });
    for (r, (err, took)) in outs.iter().enumerate() {
        assert!(
            matches!(err, Error::PeerLost { .. } | Error::Timeout { .. }),
            "rank {r}: {err}"
        );
        assert_eq!(named(err), Some((2, r)), "rank {r}: {err}");
        assert!(
            *took < timeout + Duration::from_secs(2),
            "rank {r} took {took:?}"
        );
        eprintln!("rank {r} after {took:?}: {err}");
        // Later collectives fail at once.
        let again = comms[r].barrier().expect_err("the data plane is down");
        assert_eq!(named(&again).map(|n| n.0), Some(2), "{again}");
    }
}

#[test]
fn different_collectives_are_a_mismatch() {
    let timeout = Duration::from_millis(500);
    // Rank 1 broadcasts from itself while rank 0 all-reduces: rank 0 sees a foreign frame.
    let comms = group(2, timeout);
    let outs = on_all(&comms, |r, c| {
        let mut x = vec![1f32; 8];
        if r == 0 {
            c.all_reduce(&mut x, ReduceOp::Sum)
        } else {
            c.broadcast(&mut x, 1)
        }
    });
    let err = outs[0].as_ref().expect_err("rank 0 must notice");
    assert!(
        matches!(
            err,
            Error::Mismatch {
                peer: 1,
                rank: 0,
                ..
            }
        ),
        "{err}"
    );
    eprintln!("{err}");

    // Both wait on each other (broadcast from 0 vs all_reduce): a deadlock, reported as a
    // mismatch once the deadline passes.
    let comms = group(2, timeout);
    let start = Instant::now();
    let outs = on_all(&comms, |r, c| {
        let mut x = vec![1f32; 8];
        if r == 0 {
            c.all_reduce(&mut x, ReduceOp::Sum)
        } else {
            c.broadcast(&mut x, 0)
        }
    });
    assert!(
        start.elapsed() < timeout + Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    for (r, out) in outs.iter().enumerate() {
        let err = out.as_ref().expect_err("deadlock");
        assert!(matches!(err, Error::Mismatch { .. }), "rank {r}: {err}");
        assert_eq!(named(err), Some((1 - r, r)), "rank {r}: {err}");
        eprintln!("{err}");
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

const CHILD_ENV: &str = "TIDEMILL_TCP_PROPS_CHILD";

/// Rank 2 of `a_stopped_process_is_named`, run in a child process (a no-op otherwise):
/// prints its address, reads everyone's, then all-reduces until the group breaks.
#[test]
fn child_rank_of_the_sigstop_test() {
    use std::io::BufRead;
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("ADDR {}", listener.local_addr().expect("addr"));
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .expect("addresses");
    let addrs: Vec<std::net::SocketAddr> = line
        .trim()
        .split(',')
        .map(|a| a.parse().expect("addr"))
        .collect();
    let opts = TcpOptions {
        timeout: Duration::from_secs(5),
        ..TcpOptions::default()
    };
    let comm = TcpComm::connect(2, &addrs, listener, opts).expect("connect");
    let mut x = [1f32];
    while comm.all_reduce(&mut x, ReduceOp::Sum).is_ok() {
        x = [1.0];
    }
}

/// Kills and reaps the child process however the test ends.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stopped_process_is_named() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let timeout = Duration::from_millis(500);
    let listeners: Vec<_> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_rank_of_the_sigstop_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rank 2");
    let mut child = Reaper(child);
    let mut lines = BufReader::new(child.0.stdout.take().expect("stdout")).lines();
    let child_addr = loop {
        let line = lines
            .next()
            .expect("rank 2 printed its address")
            .expect("line");
        // The harness prints `test NAME ... ` on the same line.
        if let Some(at) = line.find("ADDR ") {
            break line[at + 5..].trim().to_string();
        }
    };
    let mut addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    addrs.push(child_addr);
    writeln!(child.0.stdin.take().expect("stdin"), "{}", addrs.join(",")).expect("send addresses");
    let addrs: Vec<std::net::SocketAddr> = addrs.iter().map(|a| a.parse().expect("addr")).collect();
    let opts = TcpOptions {
        timeout,
        ..TcpOptions::default()
    };
    let comms: Vec<TcpComm> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, opts) = (&addrs, opts.clone());
                s.spawn(move || TcpComm::connect(r, addrs, l, opts).expect("connect"))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let sum = |c: &TcpComm| {
        let mut x = [1f32];
        c.all_reduce(&mut x, ReduceOp::Sum).map(|()| x[0])
    };
    for _ in 0..3 {
        assert_eq!(
            on_all(&comms, |_, c| sum(c).expect("all_reduce with rank 2")),
            [3.0, 3.0]
        );
    }
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &child.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    // Rank 2 may already have sent its part of the next all-reduce: that one can succeed.
    let outs = on_all(&comms, |_, c| {
        let start = Instant::now();
        for _ in 0..3 {
            if let Err(e) = sum(c) {
                return (e, start.elapsed());
            }
        }
        panic!("all-reduces went on with rank 2 stopped");
    });
    drop(child);
    for (r, (err, took)) in outs.iter().enumerate() {
        eprintln!("rank {r} after {took:?}: {err}");
        assert!(matches!(err, Error::Timeout { .. }), "rank {r}: {err}");
        assert_eq!(named(err), Some((2, r)), "rank {r}: {err}");
        assert!(
            *took < 2 * timeout + Duration::from_secs(1),
            "rank {r} took {took:?}"
        );
    }
}
