//! Host-side tensors: the currency between files and the rest of tidemill.

use std::collections::BTreeMap;

/// A dense f32 tensor on the host, row-major.
///
/// The fields are public; writers check that `data.len()` matches `shape`
/// and return [`crate::Error::DataLength`] when it does not.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first. `[]` is a scalar (one element).
    pub shape: Vec<usize>,
    /// The values, row-major, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Build a tensor. Debug builds assert that `data` has `numel(shape)` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        let t = HostTensor { shape, data };
        debug_assert_eq!(
            t.numel(),
            t.data.len(),
            "HostTensor::new: shape {:?} does not match {} values",
            t.shape,
            t.data.len()
        );
        t
    }

    /// Number of elements the shape describes (saturates at `usize::MAX`
    /// for absurd shapes instead of overflowing).
    pub fn numel(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }
}

/// Product of the dims, `None` on overflow.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Element type of a tensor as stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// IEEE 754 half precision.
    F16,
}

impl DType {
    /// As job files and the command line write it (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// Ordered map name -> tensor.
pub type TensorMap = BTreeMap<String, HostTensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numel_of_scalar_empty_and_overflowing_shapes() {
        assert_eq!(HostTensor::new(vec![], vec![1.0]).numel(), 1);
        assert_eq!(HostTensor::new(vec![2, 0], vec![]).numel(), 0);
        let huge = HostTensor {
            shape: vec![usize::MAX, 2],
            data: vec![],
        };
        assert_eq!(huge.numel(), usize::MAX);
    }

    #[test]
    fn dtype_serde_is_lowercase() -> Result<(), serde_json::Error> {
        assert_eq!(serde_json::to_string(&DType::BF16)?, "\"bf16\"");
        assert_eq!(serde_json::from_str::<DType>("\"f16\"")?, DType::F16);
        Ok(())
    }
}
