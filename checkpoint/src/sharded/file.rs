//! A safetensors file read box by box with positioned reads: the header parsed once (by the
//! safetensors crate's own validating parser), then only the bytes a box needs: whole rows
//! a few MB at a time, or each row's run of a narrower box. Nothing is mapped, so a process copying a model holds the box it builds and one
//! chunk, not every page it has touched.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;

use super::Slice;
use crate::DType;

/// Bytes read at a time when copying a box of whole rows.
const CHUNK: usize = 8 << 20;
/// A box narrower than the stored rows is read run by run (one read per row of the box)
/// when its runs are at least this long; shorter runs come from whole rows read in chunks.
const MIN_RUN: usize = 4 << 10;

/// One tensor in a file: its dtype (`None`: one this crate does not read, named in
/// `dtype_name`), shape, and where its bytes are.
pub(crate) struct Stored {
    pub dtype: Option<DType>,
    pub dtype_name: String,
    pub shape: Vec<usize>,
    pub offset: u64,
}

pub(crate) struct BoxFile {
    pub path: PathBuf,
    file: File,
    pub tensors: HashMap<String, Stored>,
    /// Bytes read at a time when copying a box of whole rows (one row at least).
    chunk: usize,
}

impl BoxFile {
    /// Open `path` and parse its header; the error says what is wrong with the file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| "not a valid safetensors file: shorter than its header".to_string())?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > size {
            return Err(format!(
                "not a valid safetensors file: a {n}-byte header in {size} bytes"
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| e.to_string())?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| format!("not a valid safetensors file: header: {e}"))?;
        let data = 8 + n;
        if data + metadata.data_len() as u64 != size {
            return Err(format!(
                "not a valid safetensors file: {size} bytes, the header accounts for {}: truncated?",
                data + metadata.data_len() as u64
            ));
        }
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => Some(DType::F32),
                    safetensors::Dtype::BF16 => Some(DType::BF16),
                    safetensors::Dtype::F16 => Some(DType::F16),
                    _ => None,
                };
                let stored = Stored {
                    dtype,
                    dtype_name: format!("{:?}", info.dtype),
                    shape: info.shape.clone(),
                    offset: data + info.data_offsets.0 as u64,
                };
                (name, stored)
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
            chunk: CHUNK,
        })
    }

    /// Copy `common` of tensor `name`, which this file holds as the box `from`, into `dst`
    /// holding the box `to` (all in the tensor's global coordinates; `size`-byte elements).
    /// Reads only the rows (along the first dimension) that `common` touches.
    pub fn copy(
        &self,
        name: &str,
        from: &Slice,
        dst: &mut [u8],
        to: &Slice,
        common: &Slice,
        size: usize,
    ) -> std::io::Result<()> {
        let offset = self.tensors[name].offset;
        if from.len.is_empty() {
            let mut one = vec![0u8; size];
            self.file.read_exact_at(&mut one, offset)?;
            dst[..size].copy_from_slice(&one);
            return Ok(());
        }
        let dims = from.len.len();
        let run = common.len[dims - 1] * size;
        let narrow = (1..dims).any(|d| common.len[d] != from.len[d]);
        if narrow && run >= MIN_RUN {
            return self.read_runs(offset, from, dst, to, common, size);
        }
        let row = from.len[1..].iter().product::<usize>() * size;
        let rows_per_chunk = (self.chunk / row.max(1)).max(1);
        let mut buf = Vec::new();
        let end = common.start[0] + common.len[0];
        let mut first = common.start[0];
        while first < end {
            let rows = rows_per_chunk.min(end - first);
            buf.resize(rows * row, 0);
            let at = offset + ((first - from.start[0]) * row) as u64;
            self.file.read_exact_at(&mut buf, at)?;
            let mut held = from.clone();
            held.start[0] = first;
            held.len[0] = rows;
            let mut part = common.clone();
            part.start[0] = first;
            part.len[0] = rows;
            copy_box(&buf, &held, dst, to, &part, size);
            first += rows;
        }
        Ok(())
    }

    /// One positioned read per run of `common` along the last dimension, straight into
    /// its place in `dst`: only the bytes the box needs.
    fn read_runs(
        &self,
        offset: u64,
        from: &Slice,
        dst: &mut [u8],
        to: &Slice,
        common: &Slice,
        size: usize,
    ) -> std::io::Result<()> {
        for_each_run(from, to, common, size, |s, d, n| {
            self.file
                .read_exact_at(&mut dst[d..d + n], offset + s as u64)
        })
    }
}

/// Copy the box `common` from `src` (holding box `from`) into `dst` (holding box `to`),
/// both row-major with `size`-byte elements.
pub(crate) fn copy_box(
    src: &[u8],
    from: &Slice,
    dst: &mut [u8],
    to: &Slice,
    common: &Slice,
    size: usize,
) {
    let copied: Result<(), std::convert::Infallible> =
        for_each_run(from, to, common, size, |s, d, n| {
            dst[d..d + n].copy_from_slice(&src[s..s + n]);
            Ok(())
        });
    let Ok(()) = copied;
}

/// `f(source offset, destination offset, bytes)` for each contiguous run of the box
/// `common` (one per row of its last dimension; one element for a scalar), where the source
/// holds the box `from` and the destination the box `to`, row-major, `size`-byte elements.
fn for_each_run<E>(
    from: &Slice,
    to: &Slice,
    common: &Slice,
    size: usize,
    mut f: impl FnMut(usize, usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let dims = common.len.len();
    if dims == 0 {
        return f(0, 0, size);
    }
    let strides = |len: &[usize]| -> Vec<usize> {
        let mut s = vec![size; dims];
        for d in (0..dims - 1).rev() {
            s[d] = s[d + 1] * len[d + 1];
        }
        s
    };
    let (src_strides, dst_strides) = (strides(&from.len), strides(&to.len));
    let run = common.len[dims - 1] * size;
    let mut index = vec![0usize; dims - 1];
    loop {
        let (mut s, mut d_off) = (0, 0);
        for d in 0..dims {
            let at = common.start[d] + if d < dims - 1 { index[d] } else { 0 };
            s += (at - from.start[d]) * src_strides[d];
            d_off += (at - to.start[d]) * dst_strides[d];
        }
        f(s, d_off, run)?;
        // Next run: an odometer over the leading dimensions.
        let mut d = dims - 1;
        loop {
            if d == 0 {
                return Ok(());
            }
            d -= 1;
            index[d] += 1;
            if index[d] < common.len[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharded::ShardWriter;

    #[test]
    fn boxes_read_in_chunks_of_rows_equal_the_box() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.safetensors");
        let shape = vec![5, 4];
        let values: Vec<f32> = (0..20).map(|v| v as f32).collect();
        let layout = [
            ("s".to_string(), DType::F32, vec![]),
            ("t".to_string(), DType::F32, shape.clone()),
        ];
        let mut w = ShardWriter::create(&path, &layout).expect("create");
        w.append_f32(&[7.0], DType::F32).expect("s");
        w.append_f32(&values, DType::F32).expect("t");
        w.finish().expect("finish");
        let mut f = BoxFile::open(&path).expect("open");
        // The file holds rows 10..15 of a [20, 4] tensor; read its rows 11..14, columns 1..3.
        let held = Slice::along(&[20, 4], 0, 10, 5);
        let want = Slice {
            start: vec![11, 1],
            len: vec![3, 2],
        };
        for chunk in [1, 16, 40, 1 << 20] {
            f.chunk = chunk;
            let mut out = vec![0u8; 6 * 4];
            f.copy("t", &held, &mut out, &want, &want, 4).expect("copy");
            let got: Vec<f32> = out
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(got, vec![5.0, 6.0, 9.0, 10.0, 13.0, 14.0], "chunk {chunk}");
        }
        // Runs of 4 KiB and more are read one by one: columns 1024..2048 of a [3, 2048] tensor.
        let wide: Vec<f32> = (0..3 * 2048).map(|v| v as f32).collect();
        let path = dir.path().join("w.safetensors");
        let mut w =
            ShardWriter::create(&path, &[("w".into(), DType::F32, vec![3, 2048])]).expect("create");
        w.append_f32(&wide, DType::F32).expect("w");
        w.finish().expect("finish");
        let wf = BoxFile::open(&path).expect("open");
        let half = Slice::along(&[3, 2048], 1, 1024, 1024);
        let mut out = vec![0u8; 3 * 1024 * 4];
        wf.copy("w", &Slice::whole(&[3, 2048]), &mut out, &half, &half, 4)
            .expect("runs");
        let got: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let want: Vec<f32> = (0..3)
            .flat_map(|r| (1024..2048).map(move |c| (r * 2048 + c) as f32))
            .collect();
        assert_eq!(got, want);
        let mut one = vec![0u8; 4];
        let scalar = Slice::whole(&[]);
        f.copy("s", &scalar, &mut one, &scalar, &scalar, 4)
            .expect("scalar");
        assert_eq!(f32::from_le_bytes([one[0], one[1], one[2], one[3]]), 7.0);
    }
}
