//! Vectorisable reductions for the fused kernels' row loops: sums, maxima and dot products with
//! [`LANES`] interleaved partial results combined in a fixed order, so the compiler can keep
//! the partials in vector registers (a left-to-right fold cannot be vectorised without
//! reassociation, which Rust never does on its own) and every [`super::isa`] level gets the
//! same bits. The accuracy is that of pairwise-ish summation: no worse than left to right.

use super::isa::LANES;
use crate::Elem;

/// Σ xs.
#[inline(always)]
pub(crate) fn sum<E: Elem>(xs: &[E]) -> E {
    let mut acc = [E::zero(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let tail = chunks.remainder().iter().fold(E::zero(), |a, &x| a + x);
    fold(acc, tail)
}

/// Σ xs·ys over the common length.
#[inline(always)]
pub(crate) fn dot<E: Elem>(xs: &[E], ys: &[E]) -> E {
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mut acc = [E::zero(); LANES];
    let mut cx = xs.chunks_exact(LANES);
    let mut cy = ys.chunks_exact(LANES);
    for (a, b) in (&mut cx).zip(&mut cy) {
        for ((s, &x), &y) in acc.iter_mut().zip(a).zip(b) {
            *s += x * y;
        }
    }
    let tail = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .fold(E::zero(), |a, (&x, &y)| a + x * y);
    fold(acc, tail)
}

/// Σ (xs·ys)·zs over the common length.
#[inline(always)]
pub(crate) fn dot3<E: Elem>(xs: &[E], ys: &[E], zs: &[E]) -> E {
    let n = xs.len().min(ys.len()).min(zs.len());
    let (xs, ys, zs) = (&xs[..n], &ys[..n], &zs[..n]);
    let mut acc = [E::zero(); LANES];
    let full = n - n % LANES;
    for i in (0..full).step_by(LANES) {
        let (a, b, c) = (&xs[i..i + LANES], &ys[i..i + LANES], &zs[i..i + LANES]);
        for j in 0..LANES {
            acc[j] += a[j] * b[j] * c[j];
        }
    }
    let tail = (full..n).fold(E::zero(), |a, i| a + xs[i] * ys[i] * zs[i]);
    fold(acc, tail)
}

/// Σ (xs − c)², the centred sum of squares of a row.
#[inline(always)]
pub(crate) fn centred_squares<E: Elem>(xs: &[E], c: E) -> E {
    let mut acc = [E::zero(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a += (x - c) * (x - c);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(E::zero(), |a, &x| a + (x - c) * (x - c));
    fold(acc, tail)
}

/// max xs (−∞ for an empty row; NaN-ignoring like `f32::max`).
#[inline(always)]
pub(crate) fn max<E: Elem>(xs: &[E]) -> E {
    let mut acc = [E::neg_infinity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            // a branch-free select vectorises; `E::max` may not
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(E::neg_infinity(), |a, &x| a.max(x));
    acc.iter().fold(tail, |a, &x| a.max(x))
}

/// The partials combined pairwise in a fixed tree, then the tail.
#[inline(always)]
fn fold<E: Elem>(mut acc: [E; LANES], tail: E) -> E {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 left-to-right references, every length up to 3 × LANES (all tail sizes).
    #[test]
    fn reductions_match_references() {
        for n in 0..3 * LANES + 1 {
            let xs: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
            let ys: Vec<f64> = (0..n).map(|i| ((i * 13 % 7) as f64 - 3.0) / 2.0).collect();
            let s: f64 = xs.iter().sum();
            assert!((sum(&xs) - s).abs() < 1e-12, "sum n={n}");
            let d: f64 = xs.iter().zip(&ys).map(|(a, b)| a * b).sum();
            assert!((dot(&xs, &ys) - d).abs() < 1e-12, "dot n={n}");
            let d3: f64 = xs.iter().zip(&ys).map(|(a, b)| a * b * (b - 1.0)).sum();
            let zs: Vec<f64> = ys.iter().map(|b| b - 1.0).collect();
            assert!((dot3(&xs, &ys, &zs) - d3).abs() < 1e-12, "dot3 n={n}");
            let c = 0.25;
            let q: f64 = xs.iter().map(|x| (x - c) * (x - c)).sum();
            assert!((centred_squares(&xs, c) - q).abs() < 1e-12, "sq n={n}");
            let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max(&xs), m, "max n={n}");
        }
    }
}
