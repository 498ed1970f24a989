//! Helpers shared by the TCP communicator tests: a seeded generator, local groups,
//! running a closure on every rank, reference checks.
#![allow(dead_code)]

use std::time::Duration;

use half::bf16;
use parallel::{Error, ReduceOp, TcpComm, TcpOptions};
use tidemill_parallel as parallel;

/// splitmix64: deterministic cases without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn f32s(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.unit()).collect()
    }
}

pub fn group(n: usize, timeout: Duration) -> Vec<TcpComm> {
    let opts = TcpOptions {
        timeout,
        connect_timeout: Duration::from_secs(20),
        nonce: 0x5eed ^ n as u64,
    };
    TcpComm::local_group(n, opts).expect("local group")
}

/// Run `f(rank, comm)` on every rank at once; results in rank order.
pub fn on_all<C: Sync, T: Send>(comms: &[C], f: impl Fn(usize, &C) -> T + Sync) -> Vec<T> {
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
pub fn lengths(rng: &mut Rng) -> Vec<usize> {
    let mut v = vec![
        0, 1, 2, 3, 5, 7, 13, 64, 1000, 16383, 16384, 16385, 32767, 32768, 32769,
    ];
    v.extend((0..6).map(|_| 1 + rng.below(40_000)));
    v
}

/// A value type under test: f32 or bf16, converted through f64 for references.
pub trait Val: parallel::Element + Copy + PartialEq + std::fmt::Debug {
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

pub fn inputs<T: Val>(seed: u64, n: usize, len: usize) -> Vec<Vec<T>> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| rng.f32s(len).into_iter().map(T::from_f32).collect())
        .collect()
}

/// Check `got` against the element-wise reduction of `ins` (sums within rounding error).
pub fn check_reduced<T: Val>(got: &[T], ins: &[Vec<T>], offset: usize, op: ReduceOp, what: &str) {
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

pub fn assert_same_everywhere<T: Val>(outs: &[Vec<T>], what: &str) {
    let bytes = |v: &Vec<T>| bytemuck::cast_slice::<T, u8>(v).to_vec();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            bytes(o) == bytes(&outs[0]),
            "{what}: rank {r} differs from rank 0"
        );
    }
}

/// The peer a failure names and the rank it was reported on.
pub fn named(e: &Error) -> Option<(usize, usize)> {
    match e {
        Error::Timeout { peer, rank, .. }
        | Error::PeerLost { peer, rank, .. }
        | Error::Mismatch { peer, rank, .. } => Some((*peer, *rank)),
        _ => None,
    }
}
