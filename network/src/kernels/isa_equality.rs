//! Every fused CPU op at every instruction-set level this CPU supports gives the portable
//! instance's bits: outputs and input gradients in f32 (where the wide instances could differ
//! if anything reassociated or contracted), over shapes with ragged vector tails; and
//! attention at bf16 precision, where the AVX512-BF16 microkernel must give the portable loop's
//! bits. At the AMX level, whose tiles sum a row's products in an order of their own
//! (`kernels::amx`), the bf16 entries are held to the portable values within f32 rounding
//! (2e-5·(1 + |portable|)) and everything else to the bits.

use super::isa::{self, Isa};
use super::test_util::{grads, rand32};
use super::{AdamWStep, Kernels};
use crate::layers::{Rope, T1, T2, T4};
use crate::precision::{with_precision, Precision};
use crate::MlpKind;
use dfdx::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

const B: usize = 2;
const N: usize = 37;
const H: usize = 3;
const HD: usize = 6;
const D: usize = H * HD;
const HIDDEN: usize = 70;

type K = Cpu;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The outputs and gradients of every op, as bits, computed at the current level.
fn run_all(dev: &Cpu) -> Vec<(String, Vec<u32>)> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut out = Vec::new();
    let mut push = |name: &str, v: Vec<f32>| out.push((name.to_string(), bits(&v)));
    let t2 = |rng: &mut StdRng, (m, d): (usize, usize), s: f32| -> T2<f32, Cpu> {
        dev.tensor_from_vec(rand32(rng, m * d, s), (m, d))
    };

    // gated units (sigmoid tails included)
    let a = t2(&mut rng, (B * N, HIDDEN), 12.0);
    let u = t2(&mut rng, (B * N, HIDDEN), 1.0);
    let r = rand32(&mut rng, B * N * HIDDEN, 1.0);
    for kind in [MlpKind::Glu, MlpKind::Swiglu] {
        let y = <K as Kernels<f32>>::glu(kind, a.leaky_trace(), u.leaky_trace()).unwrap();
        let (f, g) = grads(y, &r);
        push("glu", f);
        push("glu da", g.get(&a).as_vec());
        push("glu du", g.get(&u).as_vec());
    }

    // the one-op FFN (its in-place gate backward)
    let xf = t2(&mut rng, (B * N, D), 2.0);
    let (w1, w3, w2) = (
        t2(&mut rng, (D, HIDDEN), 1.0),
        t2(&mut rng, (D, HIDDEN), 1.0),
        t2(&mut rng, (HIDDEN, D), 1.0),
    );
    let rf = rand32(&mut rng, B * N * D, 1.0);
    for kind in [MlpKind::Glu, MlpKind::Swiglu] {
        let w = (w1.clone(), w3.clone(), w2.clone());
        let y = <K as Kernels<f32>>::ffn(kind, xf.leaky_trace(), w).unwrap();
        let (f, g) = grads(y, &rf);
        push("ffn", f);
        for (t, name) in [
            (&xf, "ffn dx"),
            (&w1, "ffn dw1"),
            (&w3, "ffn dw3"),
            (&w2, "ffn dw2"),
        ] {
            push(name, g.get(t).as_vec());
        }
    }

    // row norms, modulation, gated residual, residual
    let x = t2(&mut rng, (B * N, D), 2.0);
    let sh = t2(&mut rng, (B, D), 1.0);
    let sc = t2(&mut rng, (B, D), 1.0);
    let gate = t2(&mut rng, (B, D), 1.0);
    let yv = t2(&mut rng, (B * N, D), 1.0);
    let r = rand32(&mut rng, B * N * D, 1.0);
    let ln = <K as Kernels<f32>>::layer_norm(x.leaky_trace()).unwrap();
    let m = <K as Kernels<f32>>::modulate(ln, sh.leaky_trace(), sc.leaky_trace(), B, N).unwrap();
    let z =
        <K as Kernels<f32>>::gated_residual(m, yv.leaky_trace(), gate.leaky_trace(), B, N).unwrap();
    let (f, g) = grads(z, &r);
    push("ln/modulate/gated", f);
    for (t, name) in [
        (&x, "x"),
        (&sh, "shift"),
        (&sc, "scale"),
        (&gate, "gate"),
        (&yv, "y"),
    ] {
        push(name, g.get(t).as_vec());
    }
    let s: T1<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, D, 1.0), (D,));
    let y = <K as Kernels<f32>>::rms_norm(x.leaky_trace(), s.clone()).unwrap();
    let (f, g) = grads(y, &r);
    push("rms", f);
    push("rms dx", g.get(&x).as_vec());
    push("rms ds", g.get(&s).as_vec());
    let z = <K as Kernels<f32>>::residual(x.leaky_trace(), yv.leaky_trace()).unwrap();
    let (f, g) = grads(z, &r);
    push("residual", f);
    push("residual dh", g.get(&x).as_vec());
    push("residual dy", g.get(&yv).as_vec());

    // softmax over the last axis, RoPE and attention
    let s4 = (B, N, H, HD);
    let x4: T4<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, B * N * D, 8.0), s4);
    let y = <K as Kernels<f32>>::softmax_last(x4.leaky_trace()).unwrap();
    let (f, g) = grads(y, &r);
    push("softmax", f);
    push("softmax dx", g.get(&x4).as_vec());
    let rope = Rope::<f32, Cpu>::new(dev, N, HD, 10_000.0).unwrap();
    let y = <K as Kernels<f32>>::rope(&rope, x.leaky_trace(), B, N, H, 0.5).unwrap();
    let (f, g) = grads(y, &r);
    push("rope", f);
    push("rope dx", g.get(&x).as_vec());
    let q: T4<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, B * N * D, 2.0), s4);
    let k: T4<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, B * N * D, 2.0), s4);
    let v: T4<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, B * N * D, 1.0), s4);
    let o =
        <K as Kernels<f32>>::attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace()).unwrap();
    let (f, g) = grads(o, &r);
    push("attention", f);
    for (t, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
        push(name, g.get(t).as_vec());
    }
    // the backward pass that recomputes P from the log-sum-exps instead of keeping it
    super::attention::with_keep_p_bytes(0, || {
        let o = <K as Kernels<f32>>::attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
            .unwrap();
        let (_, g) = grads(o, &r);
        for (t, name) in [
            (&q, "dq, P recomputed"),
            (&k, "dk, P recomputed"),
            (&v, "dv, P recomputed"),
        ] {
            push(name, g.get(t).as_vec());
        }
    });
    // bf16 products: the AVX512-BF16 microkernel (at avx512 where the CPU has it) against the
    // portable loop, unmasked and block-masked, and ragged queries
    let mask = crate::BlockMask::new(N / 2, 4).unwrap();
    let n2 = 2 * (N / 2);
    let s2 = (B, n2, H, HD);
    let cut = |x: &T4<f32, Cpu>| -> T4<f32, Cpu> {
        dev.tensor_from_vec(x.as_vec()[..B * n2 * D].to_vec(), s2)
    };
    let (qm, km, vm) = (cut(&q), cut(&k), cut(&v));
    let rm = r[..B * n2 * D].to_vec();
    with_precision(Precision::Bf16, || {
        let o = <K as Kernels<f32>>::attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
            .unwrap();
        let (f, g) = grads(o, &r);
        push("bf16 attention", f);
        for (t, name) in [(&q, "bf16 dq"), (&k, "bf16 dk"), (&v, "bf16 dv")] {
            push(name, g.get(t).as_vec());
        }
        let o = <K as Kernels<f32>>::block_attention(
            qm.leaky_trace(),
            km.leaky_trace(),
            vm.leaky_trace(),
            mask,
        )
        .unwrap();
        let (f, g) = grads(o, &rm);
        push("bf16 block attention", f);
        for (t, name) in [
            (&qm, "bf16 block dq"),
            (&km, "bf16 block dk"),
            (&vm, "bf16 block dv"),
        ] {
            push(name, g.get(t).as_vec());
        }
        // ragged queries: 3 rows of sequence 0, none of sequence 1
        let qr = t2(&mut rng, (3, D), 1.5);
        let rr = rand32(&mut rng, 3 * D, 1.0);
        let o = <K as Kernels<f32>>::attention_ragged(
            qr.leaky_trace(),
            k.leaky_trace(),
            v.leaky_trace(),
            &[0, 3, 3],
        )
        .unwrap();
        let (f, g) = grads(o, &rr);
        push("bf16 ragged attention", f);
        push("bf16 ragged dq", g.get(&qr).as_vec());
        push("bf16 ragged dk", g.get(&k).as_vec());
        push("bf16 ragged dv", g.get(&v).as_vec());
    });

    // 3×3 convolution and GroupNorm (ragged channel counts, an image over several row tasks)
    let (ih, iw, cin, cout) = (5, 7, 13, 11);
    let xi = t2(&mut rng, (B * ih * iw, cin), 1.0);
    let wi = t2(&mut rng, (9 * cin, cout), 1.0);
    let r = rand32(&mut rng, B * ih * iw * cout, 1.0);
    let y = <K as Kernels<f32>>::conv3x3(xi.leaky_trace(), wi.clone(), B, ih, iw).unwrap();
    let (f, g) = grads(y, &r);
    push("conv3x3", f);
    push("conv3x3 dx", g.get(&xi).as_vec());
    push("conv3x3 dw", g.get(&wi).as_vec());
    let (gn, gc, groups) = (300, 21, 3);
    let xg = t2(&mut rng, (B * gn, gc), 3.0);
    let sg: T1<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, gc, 1.0), (gc,));
    let bg: T1<f32, Cpu> = dev.tensor_from_vec(rand32(&mut rng, gc, 1.0), (gc,));
    let r = rand32(&mut rng, B * gn * gc, 1.0);
    let y = <K as Kernels<f32>>::group_norm(xg.leaky_trace(), sg.clone(), bg.clone(), B, groups)
        .unwrap();
    let (f, g) = grads(y, &r);
    push("group_norm", f);
    push("group_norm dx", g.get(&xg).as_vec());
    push("group_norm dscale", g.get(&sg).as_vec());
    push("group_norm dbias", g.get(&bg).as_vec());
    let keep: Vec<f32> = rand32(&mut rng, B * gn * gc, 1.0)
        .iter()
        .map(|&u| if u < -0.5 { 0.0 } else { 4.0 / 3.0 })
        .collect();
    let y = <K as Kernels<f32>>::group_norm_swish(
        xg.leaky_trace(),
        sg.clone(),
        bg.clone(),
        B,
        groups,
        Some(keep),
    )
    .unwrap();
    let (f, g) = grads(y, &r);
    push("group_norm_swish", f);
    push("group_norm_swish dx", g.get(&xg).as_vec());
    push("group_norm_swish dscale", g.get(&sg).as_vec());
    push("group_norm_swish dbias", g.get(&bg).as_vec());

    // optimizer passes over several parallel chunks and a ragged tail
    let len = (1 << 16) + 37;
    let t1 = |rng: &mut StdRng, s: f32| -> T1<f32, Cpu> {
        dev.tensor_from_vec(rand32(rng, len, s), (len,))
    };
    let (p, gr, m1) = (t1(&mut rng, 1.0), t1(&mut rng, 0.1), t1(&mut rng, 0.01));
    let v1: T1<f32, Cpu> = dev.tensor_from_vec(
        rand32(&mut rng, len, 1e-3)
            .iter()
            .map(|x| x.abs())
            .collect(),
        (len,),
    );
    let step = AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.03,
        bias_correction1: 0.1,
        bias_correction2: 0.002,
        grad_scale: Some(0.7),
    };
    let (p2, m2, v2) = <K as Kernels<f32>>::adamw(&p, &gr, &m1, &v1, &step).unwrap();
    push("adamw p", p2.as_vec());
    push("adamw m", m2.as_vec());
    push("adamw v", v2.as_vec());
    push(
        "ema",
        <K as Kernels<f32>>::ema(&m1, &p, 0.01).unwrap().as_vec(),
    );
    let ss = <K as Kernels<f32>>::sum_squares(&gr).unwrap();
    out.push(("sum_squares".into(), {
        let b = ss.to_bits();
        vec![b as u32, (b >> 32) as u32]
    }));
    out
}

#[test]
fn every_level_gives_the_portable_bits() {
    let dev = Cpu::default();
    let levels = isa::supported();
    let reference = isa::with_level(levels[0], || run_all(&dev));
    assert_eq!(levels[0].isa(), Isa::Portable);
    for &level in &levels[1..] {
        let got = isa::with_level(level, || run_all(&dev));
        assert_eq!(got.len(), reference.len());
        for ((name, a), (_, b)) in got.iter().zip(&reference) {
            let tiles = level.amx().is_some() && name.starts_with("bf16 ");
            let differs = |x: &u32, y: &u32| {
                if tiles {
                    let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
                    // NaN (never expected) counts as a difference
                    (x - y).abs() > 2e-5 * (1.0 + y.abs()) || x.is_nan() != y.is_nan()
                } else {
                    x != y
                }
            };
            let diff = a.iter().zip(b).filter(|(x, y)| differs(x, y)).count();
            assert!(
                a.len() == b.len() && diff == 0,
                "{name}: {diff} of {} values differ at {} from portable",
                b.len(),
                level.isa()
            );
        }
    }
    // a machine without AVX2 still checks the portable path against itself, and says so
    if levels.len() == 1 {
        eprintln!("only the portable level is supported here: nothing to compare it with");
    }
}
