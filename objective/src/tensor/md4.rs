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
    // ids, x_t against x_0 and the times were checked when the batch was built
    if let Some(&w) = batch
        .weight
        .iter()
        .find(|w| !(w.is_finite() && **w >= 0.0 && (**w as f32).is_finite()))
    {
        return Err(ObjectiveError::BadValue {
            name: "loss weight (must be finite in f32)",
            value: w,
        });
    }
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
