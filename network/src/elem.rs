//! The floating-point element types the model runs in: f32 (training, inference, CUDA) and f64
//! (reference computations such as finite-difference gradient checks).

use dfdx::dtypes::Dtype;

/// A dfdx element type the network supports, with its safetensors encoding.
pub trait Elem: Dtype + num_traits::Float {
    const SAFETENSORS: ::safetensors::Dtype;
    const BYTES: usize;
    fn to_le(xs: &[Self]) -> Vec<u8>;
    /// Decodes little-endian bytes; `None` if the length is not a multiple of the element size.
    fn from_le(bytes: &[u8]) -> Option<Vec<Self>>;
    fn c(x: f64) -> Self {
        <Self as num_traits::NumCast>::from(x).unwrap_or_else(Self::nan)
    }
}

macro_rules! elem {
    ($t:ty, $st:ident, $n:expr) => {
        impl Elem for $t {
            const SAFETENSORS: ::safetensors::Dtype = ::safetensors::Dtype::$st;
            const BYTES: usize = $n;
            fn to_le(xs: &[Self]) -> Vec<u8> {
                xs.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            fn from_le(bytes: &[u8]) -> Option<Vec<Self>> {
                if bytes.len() % $n != 0 {
                    return None;
                }
                Some(
                    bytes
                        .chunks_exact($n)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                        .collect(),
                )
            }
        }
    };
}
elem!(f32, F32, 4);
elem!(f64, F64, 8);
