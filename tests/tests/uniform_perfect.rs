//! Property 3 — uniform predictor: L_∞ = (α_0 − α_1)·N·log V for every schedule; perfect
//! predictor: the diffusion term is 0 (spec §3.5), by the exact oracle, the Monte-Carlo
//! estimators and the dfdx loss. Also §11.7 (uniform text8/OWT/image values), §11.8 (recon
//! constants) and §11.21 (metric conversions).

mod common;

use approx::assert_relative_eq;
use common::{any_schedule, t_quadrature_nelbo, TablePredictor};
use dfdx::prelude::*;
use maskdiff_objective::metrics::{
    bits_from_perplexity, bits_per_token, perplexity_from_bits, perplexity_from_nats,
};
use maskdiff_objective::reference::{
    continuous_estimate, discrete_estimate, exact_continuous_nelbo, prior_kl, recon_term,
};
use maskdiff_objective::{md4_diffusion_loss, md4_recon_constant, MaskedBatch};
use maskdiff_schedule::{Linear, MaskingSchedule, Shifted, TimeSampling};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

proptest! {
    #![proptest_config(common::config(48))]

    /// Uniform μ: exact L_∞ = (α_0 − α_1)·N·ln V (1e−10 relative) for any schedule, also by
    /// t-quadrature (1e−6 relative; geometric schedules are stiff).
    #[test]
    fn uniform_predictor(s in any_schedule(), n in 1usize..=5, vocab in 2usize..=30, x0_seed in any::<u64>()) {
        let x0: Vec<u32> = (0..n).map(|i| ((x0_seed >> (6 * i)) % vocab as u64) as u32).collect();
        let p = TablePredictor::uniform(n, vocab);
        let a0 = MaskingSchedule::<f64>::alpha(&s, 0.0);
        let a1 = MaskingSchedule::<f64>::alpha(&s, 1.0);
        let expect = (a0 - a1) * n as f64 * (vocab as f64).ln();
        let exact = exact_continuous_nelbo(&s, &x0, vocab, |xt: &[u32]| p.log_probs(xt)).unwrap();
        prop_assert!((exact - expect).abs() <= 1e-10 * expect, "{exact} vs {expect}");
        let q = t_quadrature_nelbo(&s, &x0, &p, 4000);
        prop_assert!((q - expect).abs() <= 1e-6 * expect, "quadrature {q} vs {expect}");
    }

    /// Perfect μ = onehot(x_0): the exact ELBO, every continuous and discrete one-sample
    /// estimate and the dfdx loss are exactly 0.
    #[test]
    fn perfect_predictor(s in any_schedule(), n in 1usize..=5, vocab in 1usize..=6, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let perfect = |_: &[u32]| -> Vec<f64> {
            (0..n * vocab)
                .map(|i| if i % vocab == x0[i / vocab] as usize { 0.0 } else { f64::NEG_INFINITY })
                .collect()
        };
        prop_assert_eq!(exact_continuous_nelbo(&s, &x0, vocab, perfect).unwrap(), 0.0);
        let b = 4;
        let xs: Vec<u32> = x0.iter().cycle().take(b * n).copied().collect();
        let mb = MaskedBatch::sample(&xs, b, n, vocab, &s, TimeSampling::Iid, &mut rng).unwrap();
        for r in 0..b {
            let xt = &mb.xt()[r * n..(r + 1) * n];
            prop_assert_eq!(continuous_estimate(&s, mb.t()[r], &x0, xt, vocab, &perfect(xt)).unwrap(), 0.0);
            let u: f64 = rng.gen();
            prop_assert_eq!(discrete_estimate(&s, 10, u, &x0, xt, vocab, &perfect(xt)).unwrap(), 0.0);
        }
        let dev = Cpu::default();
        let logits: Vec<f32> = (0..b * n * vocab)
            .map(|i| if i % vocab == xs[i / vocab] as usize { 0.0 } else { -1e4 })
            .collect();
        let logits = dev.tensor_from_vec(logits, (b, n, vocab));
        let loss = md4_diffusion_loss(logits, &mb).unwrap();
        prop_assert!(loss.as_vec().iter().all(|&x| x == 0.0));
    }
}

/// §11.7: uniform text8 (V = 27) with ε = 1e−4: diffusion (1 − 2ε)·log2 27 = 4.753937 bits/char,
/// recon 0.000475, total 4.754412; unshifted log2 27 = 4.754888; OWT log2 50257 = 15.617037
/// (ppl 50257); images 8 bits/dim, shifted total 7.9992 (1e−6 relative).
#[test]
fn spec_11_7_uniform_values() {
    let shifted = Shifted::official(Linear);
    let bits = |s: &Shifted<Linear>, n: usize, v: usize| {
        let x0 = vec![0u32; n];
        let p = TablePredictor::uniform(n, v);
        let d = exact_continuous_nelbo(s, &x0, v, |xt: &[u32]| p.log_probs(xt)).unwrap();
        (
            bits_per_token(d, n).unwrap(),
            bits_per_token(recon_term(s, n, v), n).unwrap(),
        )
    };
    let (d, r) = bits(&shifted, 3, 27);
    assert_relative_eq!(d, 4.753937, max_relative = 1e-6);
    assert!((r - 0.000475).abs() <= 5e-7);
    assert_relative_eq!(d + r, 4.754412, max_relative = 1e-6);
    let unshifted = Shifted::new(Linear, 0.0).unwrap();
    assert_relative_eq!(bits(&unshifted, 3, 27).0, 4.754888, max_relative = 1e-6);
    let (d, r) = bits(&unshifted, 1, 50257);
    assert_relative_eq!(d, 15.617037, max_relative = 1e-6);
    assert_eq!(r, 0.0);
    assert_relative_eq!(
        perplexity_from_bits(d).unwrap(),
        50257.0,
        max_relative = 1e-9
    );
    assert_relative_eq!(bits(&unshifted, 2, 256).0, 8.0, max_relative = 1e-12);
    let (d, r) = bits(&shifted, 2, 256);
    assert_relative_eq!(d + r, 7.9992, max_relative = 1e-9);
}

/// §11.8: recon N·ε·ln V: text8 0.0843734, OWT 1.1084703, CIFAR 1.7034785 (1e−6); the exact
/// prior KL N·α_1·ln V has the same value for ε-shifted schedules and is 0 unshifted.
#[test]
fn spec_11_8_recon_constants() {
    let s = Shifted::official(Linear);
    for (n, v, expect) in [
        (256, 27, 0.0843734),
        (1024, 50257, 1.1084703),
        (3072, 256, 1.7034785),
    ] {
        assert_relative_eq!(md4_recon_constant(&s, n, v), expect, max_relative = 1e-6);
        assert_relative_eq!(prior_kl(&s, n, v), expect, max_relative = 1e-6);
        assert_eq!(prior_kl(&Linear, n, v), 0.0);
    }
}

/// §11.21 and §3.4: 22.13 ↔ 4.4679315 bits, 21.80 ↔ 4.4462562, 16.64 ↔ 4.0565835,
/// 1.37 BPC ↔ 0.9496116 nats/char; 22.13 ppl ↔ 3.09693 nats/token (1e−6 relative).
#[test]
fn spec_11_21_metric_conversions() {
    for (ppl, bits) in [(22.13, 4.4679315), (21.80, 4.4462562), (16.64, 4.0565835)] {
        assert_relative_eq!(
            bits_from_perplexity(ppl).unwrap(),
            bits,
            max_relative = 1e-7
        );
        assert_relative_eq!(
            perplexity_from_bits(bits).unwrap(),
            ppl,
            max_relative = 1e-6
        );
    }
    assert_relative_eq!(
        bits_per_token(0.9496116 * 256.0, 256).unwrap(),
        1.37,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        perplexity_from_nats(3.09693).unwrap(),
        22.13,
        max_relative = 1e-5
    );
    assert!(bits_per_token(1.0, 0).is_err());
    assert!(bits_from_perplexity(0.5).is_err());
}
