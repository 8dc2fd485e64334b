//! The forward masking process (paper §2, spec §1): each position independently keeps its token
//! with probability α_t and is absorbed into the mask otherwise; q(x_t | x_s) and the posterior
//! q(x_s | x_t, x_0) for s < t (App. C).

use crate::{ProcessError, State, Token};
use rand::Rng;

fn check_prob(name: &'static str, value: f64) -> Result<f64, ProcessError> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ProcessError::BadProbability { name, value })
    }
}

/// Sample x_t ~ q(x_t | x_0) with one α_t shared by every position (MD4; spec §1.3).
pub fn forward_sample<R: Rng + ?Sized>(
    x0: &[Token],
    alpha_t: f64,
    rng: &mut R,
) -> Result<Vec<State>, ProcessError> {
    let a = check_prob("alpha_t", alpha_t)?;
    Ok(x0
        .iter()
        .map(|&x| {
            if rng.gen::<f64>() < a {
                State::Real(x)
            } else {
                State::Mask
            }
        })
        .collect())
}

/// Sample x_t with a per-token-value α_{t,v} (GenMD4, spec §5.1): `alpha_of(v)` gives α_{t,v}.
pub fn forward_sample_per_token<R: Rng + ?Sized>(
    x0: &[Token],
    alpha_of: impl Fn(Token) -> f64,
    rng: &mut R,
) -> Result<Vec<State>, ProcessError> {
    x0.iter()
        .map(|&x| {
            let a = check_prob("alpha_t_v", alpha_of(x))?;
            Ok(if rng.gen::<f64>() < a {
                State::Real(x)
            } else {
                State::Mask
            })
        })
        .collect()
}

/// q(x_t | x_s) for one position, s < t: a real token survives with α_t/α_s, the mask stays.
pub fn transition_prob(
    x_s: State,
    x_t: State,
    alpha_s: f64,
    alpha_t: f64,
) -> Result<f64, ProcessError> {
    check_prob("alpha_s", alpha_s)?;
    check_prob("alpha_t", alpha_t)?;
    if alpha_t > alpha_s || alpha_s == 0.0 {
        return Err(ProcessError::BadProbability {
            name: "alpha_t/alpha_s",
            value: alpha_t / alpha_s,
        });
    }
    let keep = alpha_t / alpha_s;
    Ok(match (x_s, x_t) {
        (State::Mask, State::Mask) => 1.0,
        (State::Mask, State::Real(_)) => 0.0,
        (State::Real(a), State::Real(b)) => {
            if a == b {
                keep
            } else {
                0.0
            }
        }
        (State::Real(_), State::Mask) => 1.0 - keep,
    })
}

/// The posterior q(x_s | x_t, x_0) of one position (spec §1.4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Posterior {
    /// x_t is a real token: x_s = x_t with probability 1.
    Carry(Token),
    /// x_t is the mask: x_s = x_0 with probability `reveal`, mask with `1 − reveal`.
    Unmask { token: Token, reveal: f64 },
}

impl Posterior {
    /// The probability of x_s = `x_s`.
    pub fn prob(&self, x_s: State) -> f64 {
        match (*self, x_s) {
            (Posterior::Carry(a), State::Real(b)) => f64::from(u8::from(a == b)),
            (Posterior::Carry(_), State::Mask) => 0.0,
            (Posterior::Unmask { token, reveal }, State::Real(b)) => {
                if token == b {
                    reveal
                } else {
                    0.0
                }
            }
            (Posterior::Unmask { reveal, .. }, State::Mask) => 1.0 - reveal,
        }
    }
}

/// q(x_s | x_t, x_0) given the reveal probability (α_s − α_t)/(1 − α_t) of the schedule
/// (see `MaskingSchedule::reveal_prob`). A real x_t must equal x_0 (else the pair is impossible).
pub fn posterior(x_t: State, x0: Token, reveal_prob: f64) -> Result<Posterior, ProcessError> {
    let reveal = check_prob("reveal_prob", reveal_prob)?;
    match x_t {
        State::Real(t) if t == x0 => Ok(Posterior::Carry(t)),
        State::Real(t) => Err(ProcessError::Shape(format!(
            "x_t = {} is a real token different from x_0 = {}: impossible under the forward process",
            t.id(),
            x0.id()
        ))),
        State::Mask => Ok(Posterior::Unmask { token: x0, reveal }),
    }
}
