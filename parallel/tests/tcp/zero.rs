//! ZeRO-1's windowed reduce-scatter and all-gather ([`parallel::zero`]) on TCP groups of 1
//! to 4 ranks, with buckets small enough that parameters span several windows and ranks
//! own runs of very different lengths (one owning nothing).

use crate::common::*;
use std::time::Duration;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use parallel::zero::{all_gather, reduce_scatter, Windows};
use tidemill_parallel as parallel;

type B = Flex;

fn tensor(v: Vec<f32>) -> burn::tensor::ops::FloatTensor<B> {
    let n = v.len();
    Tensor::<B, 1>::from_data(TensorData::new(v, [n]), &Default::default())
        .into_primitive()
        .tensor()
}

fn values(t: burn::tensor::ops::FloatTensor<B>) -> Vec<f32> {
    Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t))
        .into_data()
        .to_vec::<f32>()
        .expect("f32")
}

/// Rank `r`'s gradient of parameter `i`, element `k` (exact sums: multiples of 1/4).
fn grad(r: usize, i: usize, k: usize) -> f32 {
    ((r * 7 + i * 5 + k * 3) % 17) as f32 / 4.0 - 2.0
}

#[test]
fn windowed_zero1_collectives_give_every_rank_its_sums_and_everyone_the_values() {
    let sizes = [7, 130, 3, 3, 41, 1, 90, 2, 11];
    for n in 1..=4 {
        // Owners: non-decreasing, runs of very different lengths, rank 1 owning nothing
        // where there are several ranks.
        let owners: Vec<usize> = (0..sizes.len())
            .map(|i| match n {
                1 => 0,
                _ => (i * n / sizes.len()).max(if i > 0 { 2.min(n - 1) } else { 0 }),
            })
            .collect();
        let windows = Windows::new(&sizes, &owners, n, 24).expect("windows");
        assert!(windows.buckets() > 3, "{n}: {} buckets", windows.buckets());
        let comms = group(n, Duration::from_secs(30));
        let device = Default::default();
        let got = on_all(&comms, |r, c| {
            // Rank 0 has no gradient for parameter 2 (an expert no token reached).
            let grads: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    (r != 0 || i != 2).then(|| tensor((0..s).map(|k| grad(r, i, k)).collect()))
                })
                .collect();
            let sums =
                reduce_scatter::<B>(c, &windows, &sizes, &grads, &device).expect("reduce-scatter");
            let sums: Vec<Vec<f32>> = sums.into_iter().map(values).collect();
            // Then each rank gives its parameters' "new values" (its sums) back to all.
            let mut seen = vec![None; sizes.len()];
            let mine = sums.iter().map(|v| tensor(v.clone())).collect();
            all_gather::<B>(c, &windows, &sizes, mine, &device, |done| {
                for (i, v) in done {
                    assert!(seen[i].is_none(), "parameter {i} delivered twice");
                    seen[i] = Some(values(v));
                }
            })
            .expect("all-gather");
            (sums, seen)
        });
        let want = |i: usize| -> Vec<f32> {
            (0..sizes[i])
                .map(|k| {
                    (0..n)
                        .filter(|&r| r != 0 || i != 2)
                        .map(|r| grad(r, i, k))
                        .sum()
                })
                .collect()
        };
        for (r, (sums, seen)) in got.into_iter().enumerate() {
            let (first, end) = windows.run(r);
            assert_eq!(sums.len(), end - first, "world {n} rank {r}");
            for (k, s) in sums.iter().enumerate() {
                assert_eq!(
                    *s,
                    want(first + k),
                    "world {n} rank {r} parameter {}",
                    first + k
                );
            }
            for (i, v) in seen.into_iter().enumerate() {
                assert_eq!(
                    v,
                    Some(want(i)),
                    "world {n} rank {r} gathered parameter {i}"
                );
            }
        }
    }
}
