//! Training rows (samples shifted to next-token targets, optionally packed several to a
//! row) and their collation into padded batches.

use super::jsonl::IGNORE_INDEX;
use super::tokenize::Sample;

/// One training row: one sample, or several packed back to back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub tokens: Vec<u32>,
    /// already-shifted: targets[t] is the token predicted from position t, or -100
    pub targets: Vec<i64>,
    /// position ids, restarting at 0 for every sample in the row
    pub positions: Vec<u32>,
    /// sample index within the row (0,1,2..); attention never crosses segments
    pub segments: Vec<u32>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends `sample` as the next segment: targets = labels[1..] ++ [-100], so no target
    /// crosses into the next sample.
    fn push(&mut self, sample: &Sample) {
        let segment = self.segments.last().map_or(0, |&s| s + 1);
        self.tokens.extend_from_slice(&sample.input_ids);
        self.targets.extend(sample.labels.iter().skip(1).copied());
        self.targets.push(IGNORE_INDEX);
        self.positions.extend((0..sample.len()).map(|p| p as u32));
        self.segments
            .extend(std::iter::repeat_n(segment, sample.len()));
    }
}

/// Builds the rows. Without `packing` each sample is a row. With `packing`, samples are
/// placed in dataset order, each into the first row that still has room for it (first
/// fit) among rows of `max_seq_len` tokens; no sorting, so the result depends only on
/// the samples. Samples are expected to be at most `max_seq_len` long (a longer one gets
/// a row of its own); empty samples are skipped.
pub fn build_rows(samples: &[Sample], max_seq_len: usize, packing: bool) -> Vec<Row> {
    let samples = samples.iter().filter(|s| !s.is_empty());
    if !packing {
        return samples
            .map(|s| {
                let mut row = Row::default();
                row.push(s);
                row
            })
            .collect();
    }
    let count = samples.clone().count();
    let mut free = FirstFit::new(count, max_seq_len);
    let mut rows: Vec<Row> = Vec::new();
    for sample in samples {
        let index = free.place(sample.len().min(max_seq_len), sample.len());
        if index == rows.len() {
            rows.push(Row::default());
        }
        rows[index].push(sample);
    }
    rows
}

/// First-fit bin packing in O(log n) per item: a max-tree over the free space of `n`
/// bins that all start with `capacity` (unopened bins are the empty ones at the end).
struct FirstFit {
    leaves: usize,
    tree: Vec<usize>,
}

impl FirstFit {
    fn new(n: usize, capacity: usize) -> Self {
        let leaves = n.max(1).next_power_of_two();
        let mut tree = vec![0; 2 * leaves];
        for leaf in &mut tree[leaves..leaves + n] {
            *leaf = capacity;
        }
        for i in (1..leaves).rev() {
            tree[i] = tree[2 * i].max(tree[2 * i + 1]);
        }
        Self { leaves, tree }
    }

    /// Index of the first bin with at least `need` free; `take` is then used from it.
    /// `need` must not exceed the capacity and there must be an unused bin left.
    fn place(&mut self, need: usize, take: usize) -> usize {
        let mut i = 1;
        while i < self.leaves {
            i = if self.tree[2 * i] >= need {
                2 * i
            } else {
                2 * i + 1
            };
        }
        self.tree[i] = self.tree[i].saturating_sub(take);
        let bin = i - self.leaves;
        while i > 1 {
            i /= 2;
            self.tree[i] = self.tree[2 * i].max(self.tree[2 * i + 1]);
        }
        bin
    }
}

/// Rows padded to a common length, row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    /// `[batch * seq]`; padding is token 0.
    pub tokens: Vec<u32>,
    /// `[batch * seq]`; padding is -100.
    pub targets: Vec<i64>,
    /// `[batch * seq]`; padding is 0.
    pub positions: Vec<u32>,
    /// `[batch * seq]`; padding is `u32::MAX`, a segment no real token uses, so pads
    /// attend only to pads.
    pub segments: Vec<u32>,
}

/// Segment id of padding positions.
pub const PAD_SEGMENT: u32 = u32::MAX;

impl Batch {
    /// Number of targets the loss sees (not -100).
    pub fn supervised_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }
}

/// Pads every row to the longest one of the batch.
pub fn collate(rows: &[&Row]) -> Batch {
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let n = rows.len() * seq;
    let mut batch = Batch {
        batch: rows.len(),
        seq,
        tokens: Vec::with_capacity(n),
        targets: Vec::with_capacity(n),
        positions: Vec::with_capacity(n),
        segments: Vec::with_capacity(n),
    };
    for row in rows {
        let pad = seq - row.len();
        batch.tokens.extend(
            row.tokens
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        batch.targets.extend(
            row.targets
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_INDEX, pad)),
        );
        batch.positions.extend(
            row.positions
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        batch.segments.extend(
            row.segments
                .iter()
                .copied()
                .chain(std::iter::repeat_n(PAD_SEGMENT, pad)),
        );
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: i64 = IGNORE_INDEX;

    /// A sample of `len` tokens `base, base+1, ..`, all supervised.
    fn sample(base: u32, len: usize) -> Sample {
        let input_ids: Vec<u32> = (base..base + len as u32).collect();
        let labels = input_ids.iter().map(|&t| i64::from(t)).collect();
        Sample { input_ids, labels }
    }

    #[test]
    fn unpacked_rows_shift_targets() {
        let s = Sample {
            input_ids: vec![5, 6, 7, 8],
            labels: vec![I, I, 7, 8],
        };
        let rows = build_rows(&[s, sample(1, 0)], 16, false);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].tokens, vec![5, 6, 7, 8]);
        assert_eq!(rows[0].targets, vec![I, 7, 8, I]);
        assert_eq!(rows[0].positions, vec![0, 1, 2, 3]);
        assert_eq!(rows[0].segments, vec![0, 0, 0, 0]);
    }

    #[test]
    fn packing_is_first_fit_in_dataset_order() {
        let samples = [
            sample(10, 6),
            sample(20, 5),
            sample(30, 3),
            sample(40, 2),
            sample(50, 4),
        ];
        let rows = build_rows(&samples, 8, true);
        // 6 -> row0 (2 left); 5 -> row1 (3 left); 3 -> row1 (0 left); 2 -> row0; 4 -> row2
        let firsts: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                r.tokens
                    .iter()
                    .zip(&r.positions)
                    .filter(|(_, &p)| p == 0)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect();
        assert_eq!(firsts, vec![vec![10, 40], vec![20, 30], vec![50]]);
        let r0 = &rows[0];
        assert_eq!(r0.tokens, vec![10, 11, 12, 13, 14, 15, 40, 41]);
        assert_eq!(r0.positions, vec![0, 1, 2, 3, 4, 5, 0, 1]);
        assert_eq!(r0.segments, vec![0, 0, 0, 0, 0, 0, 1, 1]);
        // the last target of each sample is -100: nothing is predicted across the boundary
        assert_eq!(r0.targets, vec![11, 12, 13, 14, 15, I, 41, I]);
        assert_eq!(rows[1].segments, vec![0, 0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn packing_properties_over_many_cases() {
        for case in 0..200u32 {
            // deterministic pseudo-random lengths in 1..=max
            let max = 4 + (case % 13) as usize;
            let lens: Vec<usize> = (0..(case % 37 + 1))
                .map(|i| {
                    (i.wrapping_mul(2_654_435_761)
                        .wrapping_add(case.wrapping_mul(40_503))
                        >> 7) as usize
                        % max
                        + 1
                })
                .collect();
            let samples: Vec<Sample> = lens
                .iter()
                .enumerate()
                .map(|(i, &l)| sample(1000 * i as u32, l))
                .collect();
            let rows = build_rows(&samples, max, true);
            let mut seen = 0;
            for row in &rows {
                assert!(row.len() <= max && !row.is_empty());
                for t in 0..row.len() {
                    let boundary = t + 1 == row.len() || row.segments[t + 1] != row.segments[t];
                    if boundary {
                        assert_eq!(row.targets[t], I, "case {case}: target crosses a boundary");
                        seen += 1;
                    } else {
                        assert_eq!(row.targets[t], i64::from(row.tokens[t + 1]));
                        assert_eq!(row.positions[t + 1], row.positions[t] + 1);
                    }
                    if t == 0 || row.segments[t] != row.segments[t - 1] {
                        assert_eq!(row.positions[t], 0);
                        assert_eq!(
                            row.segments[t],
                            if t == 0 { 0 } else { row.segments[t - 1] + 1 }
                        );
                    }
                }
            }
            assert_eq!(seen, samples.len(), "case {case}: every sample placed once");
            // same rows as a naive first fit
            let mut naive: Vec<(usize, Vec<usize>)> = Vec::new();
            for &len in &lens {
                match naive.iter_mut().find(|(free, _)| *free >= len) {
                    Some((free, row)) => {
                        *free -= len;
                        row.push(len);
                    }
                    None => naive.push((max - len, vec![len])),
                }
            }
            let got: Vec<Vec<usize>> = rows
                .iter()
                .map(|r| {
                    let mut lens = vec![0; r.segments.last().map_or(0, |&s| s as usize + 1)];
                    r.segments.iter().for_each(|&s| lens[s as usize] += 1);
                    lens
                })
                .collect();
            let want: Vec<Vec<usize>> = naive.into_iter().map(|(_, r)| r).collect();
            assert_eq!(got, want, "case {case}");
        }
    }

    #[test]
    fn oversize_sample_gets_its_own_row() {
        let rows = build_rows(&[sample(0, 2), sample(10, 9), sample(20, 2)], 4, true);
        let lens: Vec<usize> = rows.iter().map(Row::len).collect();
        assert_eq!(lens, vec![4, 9]);
    }

    #[test]
    fn collate_pads_to_longest_row() {
        let rows = build_rows(&[sample(1, 3), sample(7, 1)], 8, false);
        let batch = collate(&[&rows[0], &rows[1]]);
        assert_eq!((batch.batch, batch.seq), (2, 3));
        assert_eq!(batch.tokens, vec![1, 2, 3, 7, 0, 0]);
        assert_eq!(batch.targets, vec![2, 3, I, I, I, I]);
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(batch.segments, vec![0, 0, 0, 0, PAD_SEGMENT, PAD_SEGMENT]);
        assert_eq!(batch.supervised_tokens(), 2);
        let empty = collate(&[]);
        assert_eq!((empty.batch, empty.seq, empty.tokens.len()), (0, 0, 0));
    }
}
