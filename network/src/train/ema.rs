//! Exponential moving average of the parameters (spec §8): initialised to the initial
//! parameters and updated after every optimizer step, ema ← ema + (1 − r)(θ − ema), r = 0.9999
//! in the official configs. Evaluation and sampling use the EMA weights.

use crate::{Kernels, Md4Transformer, NetworkError};

/// Move every EMA parameter towards the live one.
pub fn ema_update<D: Kernels<f32>>(
    ema: &mut Md4Transformer<f32, D>,
    live: &Md4Transformer<f32, D>,
    decay: f64,
) -> Result<(), NetworkError> {
    if !(decay.is_finite() && (0.0..=1.0).contains(&decay)) {
        return Err(NetworkError::TrainConfig(format!(
            "EMA decay {decay} not in [0, 1]"
        )));
    }
    let (ep, lp) = (ema.params(), live.params());
    let same = ep.len() == lp.len()
        && ep
            .iter()
            .zip(lp)
            .all(|(e, p)| e.name == p.name && e.numel() == p.numel());
    if !same {
        return Err(NetworkError::Input(
            "EMA and live models have different parameters".into(),
        ));
    }
    let rate = 1.0 - decay;
    for (e, p) in ema.params_mut().iter_mut().zip(live.params()) {
        e.value = D::ema(&e.value, &p.value, rate).map_err(NetworkError::device)?;
    }
    Ok(())
}
