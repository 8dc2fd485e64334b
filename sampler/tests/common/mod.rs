//! Hand-written denoisers with known answers and chi-square helpers shared by the tests.
#![allow(dead_code)]

use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use std::collections::HashMap;

/// Turn per-position probability rows into a LogProbs (f32 logs).
pub fn to_logprobs(rows: Vec<Vec<f64>>, batch: usize, len: usize, vocab: usize) -> LogProbs {
    let data = rows
        .into_iter()
        .flat_map(|r| r.into_iter().map(|p| p.ln() as f32))
        .collect();
    LogProbs {
        data,
        batch,
        len,
        vocab,
    }
}

/// A joint distribution over V^N sequences; index = Σ x_k V^k.
#[derive(Clone, Debug)]
pub struct Joint {
    pub v: usize,
    pub n: usize,
    pub p: Vec<f64>,
}

impl Joint {
    /// A fixed, full-support, tie-free joint built from a smooth formula.
    pub fn new(v: usize, n: usize) -> Self {
        let m = v.pow(n as u32);
        let raw: Vec<f64> = (0..m)
            .map(|k| (1.3 * (1.7 * k as f64 + 0.4).sin()).exp() + 0.05)
            .collect();
        let z: f64 = raw.iter().sum();
        Joint {
            v,
            n,
            p: raw.into_iter().map(|x| x / z).collect(),
        }
    }
    pub fn decode(&self, mut k: usize) -> Vec<u32> {
        (0..self.n)
            .map(|_| {
                let d = k % self.v;
                k /= self.v;
                d as u32
            })
            .collect()
    }
    pub fn index(&self, x: &[u32]) -> usize {
        x.iter().rev().fold(0, |a, &d| a * self.v + d as usize)
    }
    /// P(x_pos = · | the real tokens of `x` (mask = V elsewhere)).
    pub fn conditional(&self, x: &[u32], pos: usize) -> Vec<f64> {
        let mut out = vec![0.0; self.v];
        for (k, &p) in self.p.iter().enumerate() {
            let y = self.decode(k);
            if x.iter()
                .zip(&y)
                .all(|(&a, &b)| a as usize == self.v || a == b)
            {
                out[y[pos] as usize] += p;
            }
        }
        let z: f64 = out.iter().sum();
        out.iter().map(|q| q / z).collect()
    }
    /// The joint restricted to sequences that agree with the fixed positions, renormalised.
    pub fn conditioned(&self, fixed: &[Option<u32>]) -> Vec<f64> {
        let mut q: Vec<f64> = (0..self.p.len())
            .map(|k| {
                let y = self.decode(k);
                if fixed
                    .iter()
                    .zip(&y)
                    .all(|(f, &b)| !matches!(f, Some(a) if *a != b))
                {
                    self.p[k]
                } else {
                    0.0
                }
            })
            .collect();
        let z: f64 = q.iter().sum();
        q.iter_mut().for_each(|x| *x /= z);
        q
    }
}

/// The exact conditional μ^n(x_t) = P(x^n | unmasked part of x_t) of a joint: the ideal,
/// time-free MD4 denoiser. `time_conditioned` only changes what it declares.
pub struct ExactDenoiser {
    pub joint: Joint,
    pub time_conditioned: bool,
    pub calls: usize,
    memo: HashMap<Vec<u32>, Vec<Vec<f64>>>,
}

impl ExactDenoiser {
    pub fn new(joint: Joint) -> Self {
        Self {
            joint,
            time_conditioned: false,
            calls: 0,
            memo: HashMap::new(),
        }
    }
    pub fn rows(&mut self, x: &[u32]) -> Vec<Vec<f64>> {
        if let Some(r) = self.memo.get(x) {
            return r.clone();
        }
        let r: Vec<Vec<f64>> = (0..x.len()).map(|n| self.joint.conditional(x, n)).collect();
        self.memo.insert(x.to_vec(), r.clone());
        r
    }
}

impl Denoiser for ExactDenoiser {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.joint.v).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        self.time_conditioned
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        b.validate(self.vocab())?;
        self.calls += 1;
        let mut rows = Vec::new();
        for i in 0..b.batch {
            rows.extend(self.rows(&b.ids[i * b.len..(i + 1) * b.len]));
        }
        Ok(to_logprobs(rows, b.batch, b.len, self.joint.v))
    }
}

/// The same μ at every position, whatever the input.
pub struct FixedDenoiser {
    pub mu: Vec<f64>,
    pub time_conditioned: bool,
}

impl Denoiser for FixedDenoiser {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.mu.len()).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        self.time_conditioned
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        b.validate(self.vocab())?;
        let rows = vec![self.mu.clone(); b.batch * b.len];
        Ok(to_logprobs(rows, b.batch, b.len, self.mu.len()))
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 33)).wrapping_mul(0xff51afd7ed558ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ceb9fe1a85ec53);
    z ^ (z >> 33)
}

/// Pseudo-random logits that depend on the whole input sequence, the position and (optionally)
/// t: any leak between sequences of a batch, or any change of input, changes its answers.
pub struct HashDenoiser {
    pub v: usize,
    pub time_conditioned: bool,
    pub classes: usize,
    pub calls: usize,
    /// Every input it was called with: (ids of one sequence, t).
    pub seen: Vec<(Vec<u32>, f64)>,
}

impl HashDenoiser {
    pub fn new(v: usize, time_conditioned: bool) -> Self {
        Self {
            v,
            time_conditioned,
            classes: 0,
            calls: 0,
            seen: Vec::new(),
        }
    }
}

impl Denoiser for HashDenoiser {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.v).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        self.time_conditioned
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        b.validate(self.vocab())?;
        self.calls += 1;
        let mut rows = Vec::new();
        for i in 0..b.batch {
            let ids = &b.ids[i * b.len..(i + 1) * b.len];
            self.seen.push((ids.to_vec(), b.t[i]));
            let mut h = ids.iter().fold(17u64, |a, &x| mix(a ^ x as u64));
            if self.time_conditioned {
                h = mix(h ^ b.t[i].to_bits());
            }
            if let Some(l) = b.labels {
                h = mix(h ^ (l[i] as u64 + 99));
            }
            for n in 0..b.len {
                let logits: Vec<f64> = (0..self.v)
                    .map(|v| {
                        let r = mix(h ^ mix((n * 1000 + v) as u64));
                        (r >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
                    })
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum();
                rows.push(logits.iter().map(|l| l.exp() / z).collect());
            }
        }
        Ok(to_logprobs(rows, b.batch, b.len, self.v))
    }
}

/// Pearson's statistic of `counts` against cell probabilities `probs` (cells with p = 0 must
/// be empty).
pub fn chi2(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            if p == 0.0 {
                assert_eq!(c, 0, "a zero-probability cell was hit");
                0.0
            } else {
                let e = n as f64 * p;
                (c as f64 - e).powi(2) / e
            }
        })
        .sum()
}

/// z-quantiles of the standard normal.
pub const Z_1E3: f64 = 3.090_232;

/// Upper critical value of χ²_df at level α (z = Φ⁻¹(1 − α)), Wilson–Hilferty approximation
/// (relative error about 1.3 % at df = 4, below 0.3 % for df ≥ 25 at this level).
pub fn chi2_critical(df: usize, z: f64) -> f64 {
    let d = df as f64;
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + z * a.sqrt()).powi(3)
}

/// Normal approximation of the power of the level-α chi-square test against an alternative
/// with non-centrality λ = n Σ (q − p)²/p.
pub fn chi2_power(df: usize, z: f64, n: usize, p: &[f64], q: &[f64]) -> f64 {
    let lambda: f64 = n as f64
        * p.iter()
            .zip(q)
            .filter(|(a, _)| **a > 0.0)
            .map(|(a, b)| (b - a).powi(2) / a)
            .sum::<f64>();
    let crit = chi2_critical(df, z);
    let (d, l) = (df as f64, lambda);
    let zz = (d + l - crit) / (2.0 * (d + 2.0 * l)).sqrt();
    0.5 * (1.0 + erf(zz / std::f64::consts::SQRT_2))
}

/// erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e−7).
pub fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    s * y
}

/// Assert that `counts` fit `probs` at level 1e−3 (degrees of freedom = non-empty cells − 1).
pub fn assert_fits(what: &str, counts: &[u64], probs: &[f64]) {
    let df = probs.iter().filter(|&&p| p > 0.0).count() - 1;
    let stat = chi2(counts, probs);
    let crit = chi2_critical(df, Z_1E3);
    assert!(
        stat < crit,
        "{what}: chi2 = {stat:.2} >= critical {crit:.2} (df {df})"
    );
    eprintln!("{what}: chi2 = {stat:.2} < {crit:.2} (df {df})");
}
