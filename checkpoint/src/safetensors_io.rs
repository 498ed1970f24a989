//! Reading and writing single `.safetensors` files as f32 [`HostTensor`]s.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::atomic::atomic_write_via;
use crate::host::{checked_numel, DType, HostTensor, TensorMap};
use crate::Error;

/// Read one `.safetensors` file, converting F32, BF16 and F16 tensors to f32.
///
/// Any other dtype gives [`Error::UnsupportedDtype`]; a truncated or
/// otherwise malformed file gives [`Error::Safetensors`].
pub fn read_safetensors(path: &Path) -> Result<TensorMap, Error> {
    read_safetensors_with_dtypes(path).map(|(tensors, _)| tensors)
}

/// Like [`read_safetensors`], and also return the dtype each tensor had on disk.
pub fn read_safetensors_with_dtypes(
    path: &Path,
) -> Result<(TensorMap, BTreeMap<String, DType>), Error> {
    with_tensors(path, |st| {
        let mut tensors = TensorMap::new();
        let mut dtypes = BTreeMap::new();
        for (key, view) in st.iter() {
            let (tensor, dtype) = to_host(path, key, &view)?;
            tensors.insert(key.to_string(), tensor);
            dtypes.insert(key.to_string(), dtype);
        }
        Ok((tensors, dtypes))
    })
}

/// `use_` the tensors of `path`, mapped and validated (header, offsets, lengths).
fn with_tensors<R>(
    path: &Path,
    use_: impl FnOnce(&SafeTensors<'_>) -> Result<R, Error>,
) -> Result<R, Error> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns.
    // Its contents are validated (header, offsets, lengths) before use. The
    // one hazard left is another process truncating the file while it is
    // mapped (SIGBUS); checkpoints are written by atomic rename and never
    // modified in place, so that does not happen to files this project writes.
    #[allow(unsafe_code)]
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let buffer: &[u8] = &mmap;
    check_offsets_fit(buffer).map_err(|message| malformed(path, message))?;
    let st = SafeTensors::deserialize(buffer).map_err(|e| malformed(path, e.to_string()))?;
    use_(&st)
}

/// Check one `.safetensors` file without reading its data: the header parses, every
/// tensor's bytes lie inside the file (a truncated file is refused, naming it) and its
/// dtype is one [`read_safetensors`] reads. Returns the tensor names.
pub fn check_safetensors(path: &Path) -> Result<Vec<String>, Error> {
    with_tensors(path, |st| {
        st.iter()
            .map(|(key, view)| match view.dtype() {
                Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(key.to_string()),
                other => Err(Error::UnsupportedDtype {
                    file: path.to_path_buf(),
                    key: key.to_string(),
                    dtype: other.to_string(),
                }),
            })
            .collect()
    })
}

fn malformed(path: &Path, message: String) -> Error {
    Error::Safetensors {
        file: path.to_path_buf(),
        message,
    }
}

/// Reject headers whose `data_offsets` point past the end of the file,
/// naming the tensor. `SafeTensors::deserialize` rejects these too, but with
/// a less helpful message, and for offsets near `usize::MAX` it can overflow
/// (a panic in debug builds) before it gets there. Anything this check
/// cannot parse is left for `deserialize` to report.
fn check_offsets_fit(buffer: &[u8]) -> Result<(), String> {
    let Some(len_bytes) = buffer.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return Ok(());
    };
    let Ok(header_len) = usize::try_from(u64::from_le_bytes(len_bytes)) else {
        return Ok(());
    };
    let Some(header) = header_len.checked_add(8).and_then(|end| buffer.get(8..end)) else {
        let have = buffer.len() - 8;
        return Err(format!(
            "header claims {header_len} bytes but only {have} bytes follow the length prefix \
             (file truncated?)"
        ));
    };
    let data_len = buffer.len() - 8 - header.len();
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header)
    else {
        return Ok(());
    };
    for (key, info) in &map {
        if key == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|v| v.as_array());
        if let Some([start, end]) = offsets.map(Vec::as_slice) {
            if let (Some(start), Some(end)) = (start.as_u64(), end.as_u64()) {
                if start > end || end > data_len as u64 {
                    return Err(format!(
                        "tensor `{key}` claims bytes {start}..{end} of the data section, \
                         which holds {data_len} bytes (file truncated or header corrupt)"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn to_host(path: &Path, key: &str, view: &TensorView<'_>) -> Result<(HostTensor, DType), Error> {
    let bytes = view.data();
    let (data, dtype) = match view.dtype() {
        Dtype::F32 => (
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F32,
        ),
        Dtype::BF16 => (
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::BF16,
        ),
        Dtype::F16 => (
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16,
        ),
        other => {
            return Err(Error::UnsupportedDtype {
                file: path.to_path_buf(),
                key: key.to_string(),
                dtype: other.to_string(),
            })
        }
    };
    Ok((
        HostTensor {
            shape: view.shape().to_vec(),
            data,
        },
        dtype,
    ))
}

/// Write `tensors` to `path` in `dtype` (f32, or bf16/f16 rounded to
/// nearest-even), with `metadata` as the header's `__metadata__`.
///
/// `"format": "pt"` is always set in the metadata (overriding any
/// `format` given) because transformers refuses files without it.
/// The write is atomic: on error nothing is left at `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &TensorMap,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let entries: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    write_entries(path, &entries, dtype, metadata)
}

/// Check that every tensor's data length matches its shape.
pub(crate) fn check_lengths(path: &Path, entries: &[(&str, &HostTensor)]) -> Result<(), Error> {
    for &(key, t) in entries {
        if checked_numel(&t.shape) != Some(t.data.len()) {
            return Err(Error::DataLength {
                file: path.to_path_buf(),
                key: key.to_string(),
                shape: t.shape.clone(),
                len: t.data.len(),
            });
        }
    }
    Ok(())
}

/// [`write_safetensors`] over borrowed entries (used to write shards
/// without copying tensors).
pub(crate) fn write_entries(
    path: &Path,
    entries: &[(&str, &HostTensor)],
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    check_lengths(path, entries)?;
    let mut info: HashMap<String, String> = metadata.clone().into_iter().collect();
    info.insert("format".to_string(), "pt".to_string());
    let views = entries
        .iter()
        .map(|&(k, t)| (k, Encoded { tensor: t, dtype }));
    atomic_write_via(path, |tmp| {
        safetensors::serialize_to_file(views, Some(info), tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => Error::io(path, source),
            other => Error::Safetensors {
                file: path.to_path_buf(),
                message: other.to_string(),
            },
        })
    })
}

/// A host tensor viewed as safetensors bytes in `dtype`, encoded on demand
/// so a whole model is never held twice in memory.
struct Encoded<'a> {
    tensor: &'a HostTensor,
    dtype: DType,
}

impl View for Encoded<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let v = &self.tensor.data;
        let bytes: Vec<u8> = match self.dtype {
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            DType::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        };
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.data.len() * self.dtype.size_in_bytes()
    }
}

#[cfg(test)]
mod tests;
