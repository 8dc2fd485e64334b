//! Independent oracles and generators shared by the property tests. Nothing here calls the code
//! under test to obtain an expected value: enumeration, permutations and quadrature are written
//! out from the spec's formulas (§1, §3.1, §3.5, §5.3).
#![allow(dead_code)]

use maskdiff_schedule::{
    AnySchedule, Cosine, Geometric, Linear, MaskingSchedule, Polynomial, Shifted,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Proptest settings: `cases` cases, no regression files written into the source tree, and a
/// fixed RNG seed so every run checks the same cases (set `PROPTEST_RNG_SEED` to explore others).
pub fn config(cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    let rng_seed = if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
        base.rng_seed
    } else {
        proptest::test_runner::RngSeed::Fixed(0x6d64_345f_7465_7374)
    };
    ProptestConfig {
        cases,
        failure_persistence: None,
        rng_seed,
        ..base
    }
}

/// A schedule with α_0 = 1 − ε and α_1 = ε exactly (linear, cosine, poly-w), shift ε.
pub fn exact_endpoint_schedule(kind: u8, w: f64, eps: f64) -> Shifted<AnySchedule> {
    let base = match kind % 3 {
        0 => AnySchedule::Linear(Linear),
        1 => AnySchedule::Cosine(Cosine),
        _ => AnySchedule::Poly(Polynomial::new(w).unwrap()),
    };
    Shifted::new(base, eps).unwrap()
}

/// Any of the four schedules (poly-w with w ∈ [0.5, 5], geometric with β̄_min ∈ [1e−6, 1e−4], β̄_max ∈ [10, 31.6], so
/// α_0 ≥ 1 − 1e−4 and α_1 ≤ 5e−5), any shift ε ∈ [0, 0.1].
pub fn any_schedule() -> impl Strategy<Value = Shifted<AnySchedule>> {
    (
        0u8..4,
        0.5f64..5.0,
        -6.0f64..-4.0,
        1.0f64..1.5,
        prop_oneof![Just(0.0), Just(1e-4), 1e-4f64..0.1],
    )
        .prop_map(|(k, w, lmin, lmax, eps)| {
            let base = match k {
                0 => AnySchedule::Linear(Linear),
                1 => AnySchedule::Cosine(Cosine),
                2 => AnySchedule::Poly(Polynomial::new(w).unwrap()),
                _ => AnySchedule::Geometric(
                    Geometric::new(10f64.powf(lmin), 10f64.powf(lmax)).unwrap(),
                ),
            };
            Shifted::new(base, eps).unwrap()
        })
}

/// Row-wise log-softmax in f64.
pub fn log_softmax(logits: &[f64], vocab: usize) -> Vec<f64> {
    logits
        .chunks(vocab)
        .flat_map(|r| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            r.iter().map(move |x| x - lse).collect::<Vec<_>>()
        })
        .collect()
}

/// Bit mask of the masked positions of x_t.
pub fn mask_bits(xt: &[u32], vocab: usize) -> u64 {
    xt.iter()
        .enumerate()
        .filter(|(_, &x)| x as usize == vocab)
        .fold(0, |m, (i, _)| m | 1 << i)
}

/// x_t of x_0 with mask pattern `mask`.
pub fn noised(x0: &[u32], vocab: usize, mask: u64) -> Vec<u32> {
    x0.iter()
        .enumerate()
        .map(|(n, &x)| if mask >> n & 1 == 1 { vocab as u32 } else { x })
        .collect()
}

/// A time-independent predictor for one fixed x_0: an arbitrary table of log μ per mask pattern
/// (x_t determines the pattern). `log_probs(x_t)` is `[N, V]`.
#[derive(Debug, Clone)]
pub struct TablePredictor {
    pub n: usize,
    pub vocab: usize,
    pub table: Vec<Vec<f64>>,
}

impl TablePredictor {
    /// Random logits ~ U(−spread, spread) per (pattern, position, value).
    pub fn random(n: usize, vocab: usize, spread: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let table = (0..1usize << n)
            .map(|_| {
                let l: Vec<f64> = (0..n * vocab)
                    .map(|_| rng.gen_range(-spread..spread))
                    .collect();
                log_softmax(&l, vocab)
            })
            .collect();
        Self { n, vocab, table }
    }

    /// "More context never hurts": CE_n(S) = base_n + Σ_{m ∈ S, m ≠ n} inc_{nm} (inc ≥ 0), μ_n[x_0^n]
    /// = e^{−CE}, the rest spread evenly over the other V − 1 values (needs V ≥ 2).
    pub fn monotone(x0: &[u32], vocab: usize, seed: u64) -> Self {
        assert!(vocab >= 2);
        let n = x0.len();
        let mut rng = StdRng::seed_from_u64(seed);
        let base: Vec<f64> = (0..n).map(|_| rng.gen_range(0.01..1.0)).collect();
        let inc: Vec<f64> = (0..n * n).map(|_| rng.gen_range(0.0..1.0)).collect();
        let table = (0..1u64 << n)
            .map(|mask| {
                let mut lp = vec![0.0; n * vocab];
                for i in 0..n {
                    let ce = base[i]
                        + (0..n)
                            .filter(|&m| m != i && mask >> m & 1 == 1)
                            .map(|m| inc[i * n + m])
                            .sum::<f64>();
                    let rest = (-(-ce).exp_m1() / (vocab - 1) as f64).ln();
                    for v in 0..vocab {
                        lp[i * vocab + v] = if v == x0[i] as usize { -ce } else { rest };
                    }
                }
                lp
            })
            .collect();
        Self { n, vocab, table }
    }

    /// Uniform μ = 1/V everywhere.
    pub fn uniform(n: usize, vocab: usize) -> Self {
        let row = vec![-(vocab as f64).ln(); n * vocab];
        Self {
            n,
            vocab,
            table: vec![row; 1 << n],
        }
    }

    pub fn log_probs(&self, xt: &[u32]) -> Vec<f64> {
        self.table[mask_bits(xt, self.vocab) as usize].clone()
    }

    /// C(S) = Σ_{n ∈ S} −log μ_n(x_S)[x_0^n].
    pub fn cost(&self, x0: &[u32], mask: u64) -> f64 {
        let lp = &self.table[mask as usize];
        (0..self.n)
            .filter(|i| mask >> i & 1 == 1)
            .map(|i| -lp[i * self.vocab + x0[i] as usize])
            .sum()
    }
}

/// Any-order autoregressive NELBO by brute force over all N! reveal orders: starting from all
/// masked, reveal positions one at a time; each reveal costs −log μ_n(x_S)[x_0^n] with S the
/// still-masked set (spec §1.4: the reverse order is a uniform random permutation).
pub fn ao_arm_by_permutations(x0: &[u32], p: &TablePredictor) -> f64 {
    let n = x0.len();
    let mut perm: Vec<usize> = (0..n).collect();
    let (mut total, mut count) = (0.0, 0usize);
    permute(&mut perm, 0, &mut |order| {
        let mut mask: u64 = (1 << n) - 1;
        let mut cost = 0.0;
        for &pos in order {
            let lp = &p.table[mask as usize];
            cost -= lp[pos * p.vocab + x0[pos] as usize];
            mask &= !(1 << pos);
        }
        total += cost;
        count += 1;
    });
    total / count as f64
}

fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
    if k == v.len() {
        f(v);
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, f);
        v.swap(k, i);
    }
}

/// The continuous-time NELBO (paper eq. (4)) of a time-independent predictor by composite
/// Simpson quadrature over t = u⁴ (u ∈ [0, 1], 2·m intervals; graded towards t = 0), integrand
/// −α'_t Σ_S α_t^{N−|S|}(1 − α_t)^{|S|−1} C(S) — written out from the definition.
pub fn t_quadrature_nelbo<S: MaskingSchedule<f64>>(
    schedule: &S,
    x0: &[u32],
    p: &TablePredictor,
    m: usize,
) -> f64 {
    let n = x0.len();
    let costs: Vec<(i32, f64)> = (1u64..1 << n)
        .map(|mask| (mask.count_ones() as i32, p.cost(x0, mask)))
        .collect();
    let f = |u: f64| {
        if u == 0.0 {
            // −α'(u⁴)·4u³ → 0 for poly-w with w > 1/4 and every other schedule.
            return 0.0;
        }
        let t = u * u * u * u;
        let (a, da) = (schedule.alpha(t), schedule.dalpha(t));
        let om = 1.0 - a;
        -da * 4.0
            * u
            * u
            * u
            * costs
                .iter()
                .map(|&(k, c)| a.powi(n as i32 - k) * om.powi(k - 1) * c)
                .sum::<f64>()
    };
    simpson(f, 0.0, 1.0, m)
}

/// Composite Simpson's rule with 2m intervals.
pub fn simpson(f: impl Fn(f64) -> f64, lo: f64, hi: f64, m: usize) -> f64 {
    let h = (hi - lo) / (2 * m) as f64;
    let mut s = f(lo) + f(hi);
    for i in 1..2 * m {
        s += f(lo + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0
}

/// The exact discrete-time NELBO with T uniform steps, code convention (i = 1 included), by
/// enumeration: Σ_i ((α_s − α_t)/(1 − α_t))·Σ_S α_t^{N−|S|}(1 − α_t)^{|S|} C(S).
pub fn discrete_nelbo_by_enumeration<S: MaskingSchedule<f64>>(
    schedule: &S,
    steps: usize,
    x0: &[u32],
    p: &TablePredictor,
) -> f64 {
    let n = x0.len();
    let costs: Vec<(i32, f64)> = (1u64..1 << n)
        .map(|mask| (mask.count_ones() as i32, p.cost(x0, mask)))
        .collect();
    (1..=steps)
        .map(|i| {
            let (t, s) = (i as f64 / steps as f64, (i - 1) as f64 / steps as f64);
            let (at, as_) = (schedule.alpha(t), schedule.alpha(s));
            let omt = schedule.one_minus_alpha(t);
            let coef = (as_ - at) / omt;
            coef * costs
                .iter()
                .map(|&(k, c)| at.powi(n as i32 - k) * omt.powi(k) * c)
                .sum::<f64>()
        })
        .sum()
}

/// Mean and standard error of a sample.
pub fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

/// The §11.9 toy: N = 2, V = 2, x_0 = (0, 0); both masked → (0.5, 0.5) each; one masked → the
/// masked position predicts (0.9, 0.1).
pub fn toy_11_9() -> (Vec<u32>, TablePredictor) {
    let half = [0.5f64.ln(), 0.5f64.ln()];
    let sure = [0.9f64.ln(), 0.1f64.ln()];
    let mut table = vec![vec![0.0; 4]; 4];
    table[0] = [sure, sure].concat(); // nothing masked: unused
    table[1] = [sure, sure].concat(); // position 0 masked
    table[2] = [sure, sure].concat(); // position 1 masked
    table[3] = [half, half].concat(); // both masked
    (
        vec![0, 0],
        TablePredictor {
            n: 2,
            vocab: 2,
            table,
        },
    )
}
