//! MD4's continuous-time (and discrete-time) diffusion loss on tensors: a weighted masked
//! cross-entropy (paper eq. (4); spec §3.1): weight_b · Σ_{n masked} −log softmax(logits)[x_0].

use super::{check_logits, host, MaskedBatch};
use crate::ObjectiveError;
use dfdx::prelude::*;
use maskdiff_schedule::MaskingSchedule;

/// Per-sequence MD4 diffusion loss in nats: `weight_b · Σ_{n masked} −log_softmax(logits)[x0]`
/// (for a per-block batch, each position weighted by its block's weight: the sum of the blocks'
/// losses).
/// `logits`: `[batch, len, vocab]` f32 with any tape; the output `(batch,)` keeps the tape.
///
/// The network's outputs at unmasked positions get no gradient (carry-over, spec §4.1). Add
/// [`md4_recon_constant`] (no gradient) to the batch mean to get the official code's total.
pub fn md4_diffusion_loss<D: Device<f32>, T: Tape<f32, D>>(
    logits: Tensor<(usize, usize, usize), f32, D, T>,
    batch: &MaskedBatch,
) -> Result<Tensor<(usize,), f32, D, T>, ObjectiveError> {
    let (b, l, v) = *logits.shape();
    check_logits((b, l, v), batch.batch, batch.len, batch.vocab)?;
    check_weights(batch)?;
    let dev = logits.device().clone();
    let idx = host(&dev, batch.x0.iter().map(|&x| x as usize).collect(), (b, l))?;
    let coef: Vec<f32> = (0..b * l)
        .map(|i| {
            if batch.is_masked(i) {
                batch.weight_at(i) as f32
            } else {
                0.0
            }
        })
        .collect();
    let coef = host(&dev, coef, (b, l))?;
    let logp = logits
        .try_log_softmax::<Axis<2>>()
        .map_err(ObjectiveError::backend)?;
    let picked = logp.try_select(idx).map_err(ObjectiveError::backend)?;
    let weighted = picked.try_mul(coef).map_err(ObjectiveError::backend)?;
    let summed = weighted
        .try_sum::<(usize,), Axis<1>>()
        .map_err(ObjectiveError::backend)?;
    summed.try_negate().map_err(ObjectiveError::backend)
}

/// Per-row MD4 diffusion loss in nats at the masked positions of `batch`,
/// `weight · −log_softmax(logits)[x0]`, one value per row of `logits` `[rows, vocab]`: the
/// logits at the flat positions [`MaskedBatch::masked_rows`], in that order (from
/// [`crate::LogitsNet::logits_at`]). Summed per sequence this is [`md4_diffusion_loss`]
/// without the network's work at unmasked positions, whose terms are zero.
pub fn md4_row_losses<D: Device<f32>, T: Tape<f32, D>>(
    logits: Tensor<(usize, usize), f32, D, T>,
    batch: &MaskedBatch,
) -> Result<Tensor<(usize,), f32, D, T>, ObjectiveError> {
    let rows = batch.masked_rows();
    let (m, v) = *logits.shape();
    if m != rows.len() || v != batch.vocab {
        return Err(ObjectiveError::Shape(format!(
            "row logits [{m}, {v}] for {} masked positions and vocabulary {}",
            rows.len(),
            batch.vocab
        )));
    }
    check_weights(batch)?;
    let dev = logits.device().clone();
    let idx = host(
        &dev,
        rows.iter().map(|&i| batch.x0[i] as usize).collect(),
        (m,),
    )?;
    let coef: Vec<f32> = rows.iter().map(|&i| -batch.weight_at(i) as f32).collect();
    let coef = host(&dev, coef, (m,))?;
    let logp = logits
        .try_log_softmax::<Axis<1>>()
        .map_err(ObjectiveError::backend)?;
    let picked = logp.try_select(idx).map_err(ObjectiveError::backend)?;
    picked.try_mul(coef).map_err(ObjectiveError::backend)
}

/// Every loss weight finite and ≥ 0 in f32 (ids, x_t against x_0 and the times were checked
/// when the batch was built).
fn check_weights(batch: &MaskedBatch) -> Result<(), ObjectiveError> {
    match batch
        .weight
        .iter()
        .find(|w| !(w.is_finite() && **w >= 0.0 && (**w as f32).is_finite()))
    {
        Some(&w) => Err(ObjectiveError::BadValue {
            name: "loss weight (must be finite in f32)",
            value: w,
        }),
        None => Ok(()),
    }
}

/// The official code's MD4 reconstruction term per sequence, N·(1 − α_0)·log V nats (spec §3.3):
/// a constant without gradient (text8 with ε = 1e−4: 256·1e−4·ln 27 = 0.0843734).
pub fn md4_recon_constant<S: MaskingSchedule<f64>>(schedule: &S, len: usize, vocab: usize) -> f64 {
    crate::reference::recon_term(schedule, len, vocab)
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_schedule::Linear;

    fn batch() -> MaskedBatch {
        // x0 = [[0, 1], [2, 2]], masks at (0, 1) and (1, 0); weights 2 and 0.5.
        MaskedBatch::new(
            vec![0, 1, 2, 2],
            vec![0, 3, 3, 2],
            2,
            2,
            3,
            vec![0.5, 1.0],
            vec![2.0, 0.5],
        )
        .unwrap()
    }

    /// Zero logits = uniform μ: loss_b = weight_b · #masked_b · ln 3 (by hand).
    #[test]
    fn uniform_logits_by_hand() {
        let dev = Cpu::default();
        let out = md4_diffusion_loss(dev.zeros_like(&(2, 2, 3)), &batch()).unwrap();
        let v = out.as_vec();
        assert!((v[0] as f64 - 2.0 * 3f64.ln()).abs() < 1e-5);
        assert!((v[1] as f64 - 0.5 * 3f64.ln()).abs() < 1e-5);
    }

    /// The per-row loss at the masked rows, summed per sequence, is the per-sequence loss, and
    /// its gradient is the full loss's gradient at those rows (zero at the others), on random
    /// logits and a random masking.
    #[test]
    fn row_losses_equal_the_full_loss() {
        use rand::{Rng, SeedableRng};
        let dev = Cpu::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (b, l, v) = (3, 7, 5);
        let x0: Vec<u32> = (0..b * l).map(|_| rng.gen_range(0..v as u32)).collect();
        let xt: Vec<u32> = x0
            .iter()
            .map(|&x| if rng.gen::<f64>() < 0.5 { v as u32 } else { x })
            .collect();
        let batch =
            MaskedBatch::new(x0, xt, b, l, v, vec![0.2, 0.5, 0.9], vec![5.0, 2.0, 1.1]).unwrap();
        let rows = batch.masked_rows();
        assert!(rows.len() > 3 && rows.len() < b * l, "{rows:?}");
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        let data: Vec<f32> = (0..b * l * v)
            .map(|_| rng.gen::<f32>() * 6.0 - 3.0)
            .collect();
        let full = dev.tensor_from_vec(data.clone(), (b, l, v));
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| data[r * v..(r + 1) * v].to_vec())
            .collect();
        let at = dev.tensor_from_vec(picked, (rows.len(), v));
        let per_seq = md4_diffusion_loss(full.leaky_trace(), &batch).unwrap();
        let per_row = md4_row_losses(at.leaky_trace(), &batch).unwrap();
        let mut sums = [0.0f64; 3];
        for (&r, &x) in rows.iter().zip(&per_row.as_vec()) {
            sums[r / l] += x as f64;
        }
        for (s, w) in sums.iter().zip(per_seq.as_vec()) {
            assert!((s - w as f64).abs() < 1e-5 * (1.0 + s.abs()), "{s} vs {w}");
        }
        let g_full = per_seq.sum::<Rank0, _>().backward().get(&full).as_vec();
        let g_at = per_row.sum::<Rank0, _>().backward().get(&at).as_vec();
        for i in 0..b * l {
            let want = &g_full[i * v..(i + 1) * v];
            match rows.iter().position(|&r| r == i) {
                Some(k) => {
                    for (x, y) in g_at[k * v..(k + 1) * v].iter().zip(want) {
                        assert!((x - y).abs() < 1e-6, "row {i}: {x} vs {y}");
                    }
                }
                None => assert!(want.iter().all(|&g| g == 0.0), "unmasked row {i}"),
            }
        }
        // shape mismatch: rows of the wrong count
        let wrong = dev.zeros_like(&(rows.len() + 1, v));
        assert!(matches!(
            md4_row_losses(wrong, &batch),
            Err(ObjectiveError::Shape(_))
        ));
    }

    #[test]
    fn rejects_bad_shapes_and_weights() {
        let dev = Cpu::default();
        let wrong = md4_diffusion_loss(dev.zeros_like(&(2, 2, 4)), &batch());
        assert!(matches!(wrong, Err(ObjectiveError::Shape(_))));
        let mut b = batch();
        b.weight[0] = 1e300;
        let huge = md4_diffusion_loss(dev.zeros_like(&(2, 2, 3)), &b);
        assert!(matches!(huge, Err(ObjectiveError::BadValue { .. })));
        // x_t real but different from x_0.
        let bad = MaskedBatch::new(vec![0, 1], vec![1, 1], 1, 2, 3, vec![0.5], vec![1.0]);
        assert!(matches!(
            bad,
            Err(ObjectiveError::InconsistentPair { index: 0, .. })
        ));
        let bad = MaskedBatch::new(vec![0, 5], vec![0, 1], 1, 2, 3, vec![0.5], vec![1.0]);
        assert!(matches!(
            bad,
            Err(ObjectiveError::TokenOutOfRange { id: 5, .. })
        ));
        let bad = MaskedBatch::new(vec![0, 1], vec![0, 1], 1, 2, 3, vec![1.5], vec![1.0]);
        assert!(matches!(
            bad,
            Err(ObjectiveError::BadValue { name: "t", .. })
        ));
    }

    /// Unshifted linear at t = 0 has an infinite weight: sampling reports it instead of
    /// returning a batch that would produce inf/NaN losses.
    #[test]
    fn infinite_weight_is_an_error() {
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        let r = MaskedBatch::at_times(&[0, 1], 1, 2, 2, &Linear, vec![0.0], &mut rng);
        assert!(matches!(r, Err(ObjectiveError::BadValue { .. })));
    }
}
