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
    /// eˣ for the CPU kernels' softmax and sigmoid: [`fast_exp_f32`] for f32 (branch-free, so
    /// loops over it vectorise, unlike libm's scalar `expf`), the exact `exp` for f64 (the
    /// reference precision of the tests).
    fn fast_exp(self) -> Self;
}

/// eˣ in f32 within 2.5e-7 relative error for x ∈ [−87.3, 88.3] (tested against f64 `exp`);
/// 0 below −87.33 (where eˣ is subnormal), saturating at e^88.37 above; NaN stays NaN.
/// Cephes' `expf` scheme: x = k·ln 2 + r with k = round(x·log₂e) (by the 1.5·2²³ rounding
/// trick, which also leaves k in the low mantissa bits), |r| ≤ ln2/2, eʳ by its degree-7
/// minimax polynomial, 2ᵏ assembled in the exponent bits. No branches, no calls.
#[inline(always)]
pub fn fast_exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that k·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let xc = x.clamp(-87.33, 88.37);
    let kr = xc * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // low 9 bits of kr's pattern are k (two's complement); 0x4B40_0000 shifts out entirely
    let scale = f32::from_bits(kr.to_bits().wrapping_add(127) << 23);
    if x < -87.33 {
        0.0
    } else {
        er * scale
    }
}

macro_rules! elem {
    ($t:ty, $st:ident, $n:expr, $exp:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn fast_exp(self) -> Self {
                $exp(self)
            }
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
elem!(f32, F32, 4, fast_exp_f32);
elem!(f64, F64, 8, f64::exp);

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64's exp on a dense grid over the whole normal range, and the
    /// edge cases (underflow to 0, saturation, NaN).
    #[test]
    fn fast_exp_f32_is_accurate() {
        let mut worst = 0.0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = -87.3 + (88.3 + 87.3) * i as f64 / steps as f64;
            let xf = x as f32;
            let want = (xf as f64).exp();
            let got = fast_exp_f32(xf) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        for x in [0.0f32, -0.0, 1.0, -1.0, 1e-8, -1e-8] {
            assert!(((fast_exp_f32(x) as f64) - (x as f64).exp()).abs() < 2.5e-7);
        }
        assert_eq!(fast_exp_f32(-88.0), 0.0);
        assert_eq!(fast_exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(fast_exp_f32(100.0) > 1e38 && fast_exp_f32(100.0).is_finite());
        assert!(fast_exp_f32(f32::NAN).is_nan());
    }
}
