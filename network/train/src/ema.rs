//! Exponential moving average of the parameters (spec §8): initialised to the initial
//! parameters and updated after every optimizer step, ema ← ema + (1 − r)(θ − ema), r = 0.9999
//! in the official configs. Evaluation and sampling use the EMA weights (the network's and the
//! objective's own parameters alike).

use crate::TrainError;
use maskdiff_network::dfdx::prelude::HasShape;
use maskdiff_network::{Kernels, Network};
use maskdiff_objective::Flat;

fn check_decay(decay: f64) -> Result<f64, TrainError> {
    if decay.is_finite() && (0.0..=1.0).contains(&decay) {
        Ok(1.0 - decay)
    } else {
        Err(TrainError::Config(format!(
            "EMA decay {decay} not in [0, 1]"
        )))
    }
}

/// Move every EMA tensor towards its live one (pairs in order; lengths must agree).
pub fn ema_tensors<'a, D: Kernels<f32> + 'a>(
    ema: impl IntoIterator<Item = &'a mut Flat<D>>,
    live: impl IntoIterator<Item = &'a Flat<D>>,
    decay: f64,
) -> Result<(), TrainError> {
    let rate = check_decay(decay)?;
    let (ema, live): (Vec<_>, Vec<_>) = (ema.into_iter().collect(), live.into_iter().collect());
    if ema.len() != live.len() || ema.iter().zip(&live).any(|(e, p)| e.shape() != p.shape()) {
        return Err(TrainError::Input(
            "EMA and live parameters have different shapes".into(),
        ));
    }
    for (e, p) in ema.into_iter().zip(live) {
        *e = D::ema(e, p, rate).map_err(TrainError::device)?;
    }
    Ok(())
}

/// Move every EMA parameter of a model towards the live one.
pub fn ema_update<D: Kernels<f32>>(
    ema: &mut Network<f32, D>,
    live: &Network<f32, D>,
    decay: f64,
) -> Result<(), TrainError> {
    let same = ema.params().len() == live.params().len()
        && ema
            .params()
            .iter()
            .zip(live.params())
            .all(|(e, p)| e.name == p.name && e.numel() == p.numel());
    if !same {
        return Err(TrainError::Input(
            "EMA and live models have different parameters".into(),
        ));
    }
    ema_tensors(
        ema.params_mut().iter_mut().map(|p| &mut p.value),
        live.params().iter().map(|p| &p.value),
        decay,
    )
}
