//! The order rows are visited in: a fresh permutation per epoch, reproducible from the
//! seed on every platform (ChaCha8 with our own Fisher–Yates, so no dependence on
//! `rand`'s shuffle algorithm or on the pointer width).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The row order of `epoch`: a permutation of `0..n_rows` when `shuffle`, else
/// `0..n_rows` in order. The generator is ChaCha8 keyed by `seed`, on stream `epoch`.
pub fn epoch_order(n_rows: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_rows).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        for i in (1..n_rows).rev() {
            let j = below(&mut rng, i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Uniform integer in `0..n` (`n > 0`), Lemire's multiply-and-reject on 64-bit draws.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Batches of row indices, epoch after epoch. The last batch of an epoch may be short
/// (no batch spans two epochs, like a PyTorch DataLoader with `drop_last=False`).
#[derive(Debug, Clone)]
pub struct Epochs {
    n_rows: usize,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    order: Vec<usize>,
    next: usize,
}

impl Epochs {
    pub fn new(n_rows: usize, seed: u64, shuffle: bool) -> Self {
        Self::resume(n_rows, seed, shuffle, 0, 0)
    }

    /// Continues at `offset` rows into `epoch` (what [`Epochs::position`] returned).
    pub fn resume(n_rows: usize, seed: u64, shuffle: bool, epoch: u64, offset: usize) -> Self {
        Self {
            n_rows,
            seed,
            shuffle,
            epoch,
            order: epoch_order(n_rows, seed, epoch, shuffle),
            next: offset.min(n_rows),
        }
    }

    /// `(epoch, rows already handed out in it)`, to save with a checkpoint.
    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.next)
    }

    /// The next `batch_size` row indices and the epoch they belong to; empty only when
    /// there are no rows or `batch_size` is 0.
    pub fn next_batch(&mut self, batch_size: usize) -> (u64, Vec<usize>) {
        if self.n_rows == 0 || batch_size == 0 {
            return (self.epoch, Vec::new());
        }
        if self.next >= self.n_rows {
            self.epoch += 1;
            self.order = epoch_order(self.n_rows, self.seed, self.epoch, self.shuffle);
            self.next = 0;
        }
        let end = (self.next + batch_size).min(self.n_rows);
        let rows = self.order[self.next..end].to_vec();
        self.next = end;
        (self.epoch, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(order: &[usize]) -> bool {
        let mut seen = vec![false; order.len()];
        order
            .iter()
            .all(|&i| i < seen.len() && !std::mem::replace(&mut seen[i], true))
    }

    #[test]
    fn orders_are_deterministic_permutations() {
        for n in [0, 1, 2, 3, 10, 97] {
            for seed in [0, 1, 42] {
                for epoch in 0..4 {
                    let a = epoch_order(n, seed, epoch, true);
                    assert!(is_permutation(&a) && a.len() == n);
                    assert_eq!(a, epoch_order(n, seed, epoch, true));
                }
            }
        }
        assert_eq!(epoch_order(5, 1, 0, false), vec![0, 1, 2, 3, 4]);
        let e0 = epoch_order(100, 7, 0, true);
        assert_ne!(e0, epoch_order(100, 7, 1, true), "epochs differ");
        assert_ne!(e0, epoch_order(100, 8, 0, true), "seeds differ");
        assert_ne!(e0, (0..100).collect::<Vec<_>>(), "shuffled");
    }

    #[test]
    fn shuffle_is_unbiased_enough() {
        // every row lands in position 0 roughly equally often over many seeds
        let n = 5;
        let mut counts = [0usize; 5];
        for seed in 0..5000 {
            counts[epoch_order(n, seed, 0, true)[0]] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn epochs_batches_and_resume() {
        let mut e = Epochs::new(5, 3, true);
        let (ep, a) = e.next_batch(2);
        let (_, b) = e.next_batch(2);
        let (_, c) = e.next_batch(2);
        assert_eq!(ep, 0);
        assert_eq!(c.len(), 1, "short last batch");
        assert_eq!([a.clone(), b, c].concat(), epoch_order(5, 3, 0, true));
        assert_eq!(e.position(), (0, 5));
        let (ep1, d) = e.next_batch(2);
        assert_eq!((ep1, d.as_slice()), (1, &epoch_order(5, 3, 1, true)[..2]));
        let mut r = Epochs::resume(5, 3, true, 0, 2);
        assert_eq!(r.next_batch(3).1, epoch_order(5, 3, 0, true)[2..5].to_vec());
        assert!(Epochs::new(0, 3, true).next_batch(4).1.is_empty());
    }
}
