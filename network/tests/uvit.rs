//! U-ViT (spec §7.4) properties: the official ImageNet-64 likelihood network's parameter count
//! from the layer formula (the paper's 198M), the sin-cos initialisation of the positional table,
//! zero-initialised output (uniform prediction), configuration and input errors, gradients
//! against central finite differences (f64, every parameter tensor), save → load identity,
//! dropout's effect and the device round trip.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::uvit::sincos_2d;
use maskdiff_network::{Arch, Network, NetworkConfig, NetworkError};
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod image_common;

use image_common::{bad_inputs_are_errors, image_config as uvit, random_ids, randomize};

fn set_arch(
    cfg: &mut NetworkConfig,
    f: impl FnOnce(&mut usize, &mut usize, &mut usize, &mut usize),
) {
    match &mut cfg.arch {
        Arch::Uvit {
            groups,
            patch,
            dit_heads,
            dit_dim,
            ..
        } => f(groups, patch, dit_heads, dit_dim),
        _ => panic!("not a U-ViT"),
    }
}

/// The U-ViT's parameter count layer by layer (official `uvit.py`, `dit.py`, `backward.py`):
/// `ch` channels, `l` residual blocks per side, per-channel embedding `e`, image `h × w × c`,
/// V levels, conditioning width `dc` (time only; 0 = unconditioned: GroupNorm scale and bias,
/// RMSNorm DiT blocks), patch `p`, `k` DiT layers of width `d`.
#[allow(clippy::too_many_arguments)]
fn uvit_params(
    ch: usize,
    l: usize,
    e: usize,
    (h, w, c): (usize, usize, usize),
    v: usize,
    dc: usize,
    p: usize,
    (k, d): (usize, usize),
) -> usize {
    let dense = |i: usize, o: usize| i * o + o;
    let conv = |i: usize, o: usize| 9 * i * o + o;
    // CondGroupNorm: Dense(c → 2·channels) with bias, no GroupNorm parameters
    let cgn = |k: usize| if dc > 0 { dense(dc, 2 * k) } else { 2 * k };
    let res = |i: usize, o: usize| {
        cgn(i) + conv(i, o) + cgn(o) + conv(o, o) + if i != o { dense(i, o) } else { 0 }
    };
    let (cond, ada6, ada2) = if dc > 0 {
        (
            dense(dc, 4 * dc) + dense(4 * dc, dc),
            dense(dc, 6 * d),
            dense(dc, 2 * d),
        )
    } else {
        (0, 2 * d, d)
    };
    let block = ada6 + 3 * dense(d, d) + d * d + dense(d, 4 * d) + dense(4 * d, d);
    let tokens = (h / p) * (w / p);
    let dit = dense(p * p * ch, d) + tokens * d + k * block + ada2 + dense(d, p * p * ch);
    (v + 1) * e
        + cond
        + conv(c * e, ch)
        + l * res(ch, ch)
        + dit
        + (l + 1) * res(2 * ch, ch)
        + cgn(ch)
        + conv(ch, c * v)
}

#[test]
fn imagenet64_preset_has_the_official_parameter_count() {
    let dev = Cpu::default();
    let cfg = NetworkConfig::preset("uvit-imagenet64", 256).unwrap();
    assert_eq!(cfg.image(), Some((64, 64, 3)));
    assert_eq!(cfg.max_len, 64 * 64 * 3);
    assert_eq!(
        (
            cfg.dim,
            cfg.n_layers,
            cfg.cond_dim,
            cfg.embed_dim,
            cfg.dropout
        ),
        (256, 24, 256, Some(256), 0.1)
    );
    assert!(matches!(
        cfg.arch,
        Arch::Uvit {
            groups: 32,
            patch: 2,
            dit_layers: 12,
            dit_heads: 12,
            dit_dim: 768,
            ..
        }
    ));
    let m = Network::<f32, Cpu>::new(cfg, &dev, 0).unwrap();
    let n = m.num_params();
    assert_eq!(
        n,
        uvit_params(256, 24, 256, (64, 64, 3), 256, 256, 2, (12, 768))
    );
    // the paper's "198M" (App. J.4, Table 3): the exact count of the likelihood network
    assert_eq!(n, 198_279_680);
}

#[test]
fn small_presets_count_and_positions_start_as_sincos() {
    let dev = Cpu::default();
    for (preset, ch, l, e, dc, (k, d)) in [
        ("uvit-tiny", 16, 1, 8, 16, (1, 16)),
        ("uvit-small", 64, 2, 32, 64, (4, 128)),
    ] {
        let cfg = uvit(preset, 17, (8, 6, 1));
        let m = Network::<f64, Cpu>::new(cfg, &dev, 0).unwrap();
        assert_eq!(
            m.num_params(),
            uvit_params(ch, l, e, (8, 6, 1), 17, dc, 2, (k, d)),
            "{preset}"
        );
        let pos = m
            .params()
            .into_iter()
            .find(|p| p.name == "dit.pos")
            .unwrap();
        assert_eq!(pos.shape, vec![4 * 3, d]);
        assert_eq!(pos.value.as_vec(), sincos_2d(4, 3, d));
        // time-free: no conditioning MLP, GroupNorm scale/bias, RMSNorm DiT blocks
        let mut cfg = uvit(preset, 17, (8, 6, 1));
        cfg.time_conditioning = false;
        let m = Network::<f64, Cpu>::new(cfg, &dev, 0).unwrap();
        assert_eq!(
            m.num_params(),
            uvit_params(ch, l, e, (8, 6, 1), 17, 0, 2, (k, d)),
            "{preset} time-free"
        );
    }
}

#[test]
fn fresh_uvit_predicts_uniform_exactly() {
    for (time, classes) in [(true, 0), (true, 3), (false, 2), (false, 0)] {
        let mut cfg = uvit("uvit-tiny", 7, (4, 6, 2));
        cfg.time_conditioning = time;
        cfg.num_classes = classes;
        image_common::fresh_predicts_uniform_exactly(cfg, 4 * 6 * 2, (time, classes));
    }
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let dev = Cpu::default();
    let cfg = uvit("uvit-tiny", 5, (2, 2, 1));
    bad_inputs_are_errors(cfg.clone());
    let config_err = |c: &NetworkConfig| {
        assert!(
            matches!(c.validate(), Err(NetworkError::Config(_))),
            "{:?}",
            c.arch
        );
        assert!(matches!(
            Network::<f32, Cpu>::new(c.clone(), &dev, 0),
            Err(NetworkError::Config(_))
        ));
    };
    // an image not divisible into patches (both axes), patch 0
    let mut c = NetworkConfig::preset("uvit-tiny", 5).unwrap();
    assert!(matches!(c.set_image(5, 4, 1), Err(NetworkError::Config(_))));
    assert!(matches!(c.set_image(4, 3, 1), Err(NetworkError::Config(_))));
    for (patch, heads, dim, groups) in [(0, 2, 16, 4), (2, 3, 16, 4), (2, 2, 18, 4), (2, 2, 16, 3)]
    {
        // patch 0; width not divisible by the heads; width not a multiple of 4 (sin-cos
        // positions); groups not dividing the channels
        let mut c = cfg.clone();
        set_arch(&mut c, |g, p, h, d| {
            (*g, *p, *h, *d) = (groups, patch, heads, dim)
        });
        config_err(&c);
    }
    let mut c = cfg.clone();
    if let Arch::Uvit { dit_layers, .. } = &mut c.arch {
        *dit_layers = 0;
    }
    config_err(&c);

    assert!(matches!(
        NetworkConfig::preset("uvit-huge", 5),
        Err(NetworkError::UnknownPreset(_))
    ));
    // block diffusion is the transformer's
    let mut c = cfg.clone();
    c.block_size = Some(2);
    config_err(&c);
}

/// d/dθ Σ R ⊙ logits by the tape vs central differences in f64, for every parameter tensor (a
/// few random coordinates each), with every path live (randomised weights, dropout off), for a
/// time-and-label-conditioned, a label-only and an unconditioned U-ViT on a non-square image
/// with GroupNorm over several groups and a DiT of two blocks of two heads.
#[test]
fn uvit_gradients_match_central_differences() {
    for (time, classes) in [(true, 2), (false, 3), (false, 0)] {
        let mut cfg = uvit("uvit-tiny", 4, (4, 2, 2));
        cfg.dim = 4;
        cfg.cond_dim = 4;
        cfg.embed_dim = Some(3);
        cfg.time_conditioning = time;
        cfg.num_classes = classes;
        set_arch(&mut cfg, |g, p, h, d| (*g, *p, *h, *d) = (2, 2, 2, 8));
        if let Arch::Uvit { dit_layers, .. } = &mut cfg.arch {
            *dit_layers = 2;
        }
        let checked = image_common::gradients_match_central_differences(cfg, 4 * 2 * 2, classes);
        // embed, cond (0, 4 or 5), conv_in 2, 1 down block 8 (or 12), DiT 4 + 2·(12 or 13) + 4,
        // 2 up blocks 2·10 (or 2·14), out 4
        assert!(checked >= 2 * 60, "{checked}");
    }
}

#[test]
fn uvit_save_load_roundtrip_dropout_and_device_copy() {
    let dev = Cpu::default();
    let mut cfg = uvit("uvit-tiny", 6, (4, 4, 1));
    cfg.dropout = 0.5;
    let mut m = Network::<f32, Cpu>::new(cfg.clone(), &dev, 1).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    randomize(&mut m, &mut rng, |r| r.gen::<f32>() * 0.4 - 0.2);
    let dir = std::env::temp_dir().join(format!("maskdiff-uvit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    m.save_safetensors(&path).unwrap();
    let mut m2 = Network::<f32, Cpu>::new(cfg.clone(), &dev, 99).unwrap();
    m2.load_safetensors(&path).unwrap();
    let ids = random_ids(&mut rng, 2 * 16, 6);
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 2,
        len: 16,
        t: &[0.2, 0.7],
        labels: None,
    };
    let a = m.forward(&batch, NoneTape, None).unwrap().as_vec();
    assert!(a.iter().any(|&x| x != 0.0));
    assert_eq!(a, m2.forward(&batch, NoneTape, None).unwrap().as_vec());
    assert_eq!(
        a,
        m.to_device(&dev)
            .unwrap()
            .forward(&batch, NoneTape, None)
            .unwrap()
            .as_vec()
    );
    // a U-Net checkpoint does not load into a U-ViT
    let mut unet = NetworkConfig::preset("unet-tiny", 6).unwrap();
    unet.set_image(4, 4, 1).unwrap();
    let u = Network::<f32, Cpu>::new(unet, &dev, 0).unwrap();
    let upath = dir.join("u.safetensors");
    u.save_safetensors(&upath).unwrap();
    assert!(m2.load_safetensors(&upath).is_err());
    // dropout changes the output only in training
    let mut drng = StdRng::seed_from_u64(4);
    let d = m
        .forward(&batch, NoneTape, Some(&mut drng as &mut dyn rand::RngCore))
        .unwrap()
        .as_vec();
    assert_ne!(a, d);
    assert!(m.clone().into_transformer().is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The U-ViT forward pass written directly from spec §7.4 / the official `uvit.py` and `dit.py`
/// in f64 loops over named parameters (no dfdx): NHWC images, HWIO convolution kernels.
mod reference {
    use std::collections::HashMap;

    pub struct P(pub HashMap<String, Vec<f64>>);
    impl P {
        pub fn get(&self, n: &str) -> &[f64] {
            self.0.get(n).unwrap_or_else(|| panic!("no parameter {n}"))
        }
    }

    /// `x (rows, i) @ w (i, o) + b`.
    pub fn dense(x: &[f64], w: &[f64], b: Option<&[f64]>, i: usize, o: usize) -> Vec<f64> {
        let rows = x.len() / i;
        let mut y = vec![0.0; rows * o];
        for r in 0..rows {
            for k in 0..o {
                let mut s = b.map_or(0.0, |b| b[k]);
                for j in 0..i {
                    s += x[r * i + j] * w[j * o + k];
                }
                y[r * o + k] = s;
            }
        }
        y
    }

    pub fn swish(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }

    pub fn gelu_tanh(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
    }

    /// 3×3 same convolution of one image (h, w, i) with a `[3, 3, i, o]` kernel, plus bias.
    pub fn conv(
        x: &[f64],
        w: &[f64],
        b: &[f64],
        (h, wd, i, o): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut y = vec![0.0; h * wd * o];
        for r in 0..h {
            for c in 0..wd {
                for k in 0..o {
                    let mut s = b[k];
                    for dy in 0..3 {
                        for dx in 0..3 {
                            let (sr, sc) =
                                (r as isize + dy as isize - 1, c as isize + dx as isize - 1);
                            if sr < 0 || sc < 0 || sr >= h as isize || sc >= wd as isize {
                                continue;
                            }
                            for j in 0..i {
                                s += x[(sr as usize * wd + sc as usize) * i + j]
                                    * w[((dy * 3 + dx) * i + j) * o + k];
                            }
                        }
                    }
                    y[(r * wd + c) * o + k] = s;
                }
            }
        }
        y
    }

    /// CondGroupNorm of one image (n pixels, ch): affine-free GroupNorm (ε = 1e-6), then
    /// ·(1 + scale) + shift with [scale, shift] = Dense(c); without c, GroupNorm's own affine
    /// parameters in their place (·scale + bias).
    pub fn cond_gn(
        x: &[f64],
        ch: usize,
        groups: usize,
        c: Option<&[f64]>,
        p: &P,
        name: &str,
    ) -> Vec<f64> {
        let (scale, shift): (Vec<f64>, Vec<f64>) = match c {
            Some(c) => {
                let m = dense(
                    c,
                    p.get(&format!("{name}.w")),
                    Some(p.get(&format!("{name}.b"))),
                    c.len(),
                    2 * ch,
                );
                (m[..ch].to_vec(), m[ch..].to_vec())
            }
            None => (
                p.get(&format!("{name}.scale"))
                    .iter()
                    .map(|s| s - 1.0)
                    .collect(),
                p.get(&format!("{name}.bias")).to_vec(),
            ),
        };
        let n = x.len() / ch;
        let cg = ch / groups;
        let mut y = vec![0.0; x.len()];
        for g in 0..groups {
            let vals: Vec<f64> = (0..n)
                .flat_map(|px| (0..cg).map(move |j| (px, g * cg + j)))
                .map(|(px, k)| x[px * ch + k])
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for px in 0..n {
                for k in g * cg..(g + 1) * cg {
                    let z = (x[px * ch + k] - mean) / (var + 1e-6).sqrt();
                    y[px * ch + k] = z * (1.0 + scale[k]) + shift[k];
                }
            }
        }
        y
    }

    pub fn res_block(
        x: &[f64],
        (h, w, cin, cout, groups): (usize, usize, usize, usize, usize),
        c: Option<&[f64]>,
        p: &P,
        name: &str,
    ) -> Vec<f64> {
        let a: Vec<f64> = cond_gn(x, cin, groups, c, p, &format!("{name}.norm1"))
            .into_iter()
            .map(swish)
            .collect();
        let a = conv(
            &a,
            p.get(&format!("{name}.conv1.w")),
            p.get(&format!("{name}.conv1.b")),
            (h, w, cin, cout),
        );
        let a: Vec<f64> = cond_gn(&a, cout, groups, c, p, &format!("{name}.norm2"))
            .into_iter()
            .map(swish)
            .collect();
        let a = conv(
            &a,
            p.get(&format!("{name}.conv2.w")),
            p.get(&format!("{name}.conv2.b")),
            (h, w, cout, cout),
        );
        let skip = if cin != cout {
            dense(
                x,
                p.get(&format!("{name}.skip.w")),
                Some(p.get(&format!("{name}.skip.b"))),
                cin,
                cout,
            )
        } else {
            x.to_vec()
        };
        skip.iter().zip(&a).map(|(s, a)| s + a).collect()
    }

    /// RMSNorm with a scale (ε = 1e-5, the fused kernel's).
    pub fn rms(x: &[f64], d: usize, scale: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (row, out) in x.chunks(d).zip(y.chunks_mut(d)) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            for k in 0..d {
                out[k] = row[k] / (ms + 1e-5).sqrt() * scale[k];
            }
        }
        y
    }

    /// LayerNorm without affine parameters (ε = 1e-5, the fused kernel's), then modulation.
    pub fn ln_mod(x: &[f64], d: usize, shift: &[f64], scale: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (row, out) in x.chunks(d).zip(y.chunks_mut(d)) {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for k in 0..d {
                out[k] = (row[k] - mean) / (var + 1e-5).sqrt() * (1.0 + scale[k]) + shift[k];
            }
        }
        y
    }

    /// The DiT middle on one image (h, w, ch) → (h, w, ch): adaLN-Zero blocks with c,
    /// pre-RMSNorm blocks without gates otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn dit(
        x: &[f64],
        (h, w, ch): (usize, usize, usize),
        (pt, layers, heads, d): (usize, usize, usize, usize),
        c: Option<&[f64]>,
        p: &P,
    ) -> Vec<f64> {
        let (gh, gw) = (h / pt, w / pt);
        let n = gh * gw;
        let c_act: Option<Vec<f64>> = c.map(|c| c.iter().map(|&v| swish(v)).collect());
        // patchify: token (gy, gx) holds [py][px][ch]
        let mut patches = Vec::with_capacity(n * pt * pt * ch);
        for gy in 0..gh {
            for gx in 0..gw {
                for py in 0..pt {
                    for px in 0..pt {
                        let pix = (gy * pt + py) * w + gx * pt + px;
                        patches.extend_from_slice(&x[pix * ch..(pix + 1) * ch]);
                    }
                }
            }
        }
        let mut t = dense(
            &patches,
            p.get("dit.patch.w"),
            Some(p.get("dit.patch.b")),
            pt * pt * ch,
            d,
        );
        for (v, pos) in t.iter_mut().zip(p.get("dit.pos")) {
            *v += pos;
        }
        let hd = d / heads;
        for l in 0..layers {
            let q = |s: &str| format!("dit.blocks.{l}.{s}");
            // [sh_a, sc_a, g_a, sh_m, sc_m, g_m]; unconditioned: RMSNorm and unit gates
            let m = c_act.as_ref().map(|ca| {
                dense(
                    ca,
                    p.get(&q("ada.w")),
                    Some(p.get(&q("ada.b"))),
                    ca.len(),
                    6 * d,
                )
            });
            let ones = vec![1.0; d];
            let ch6: Vec<&[f64]> = match &m {
                Some(m) => m.chunks(d).collect(),
                None => vec![&ones; 6].into_iter().map(|v| &v[..]).collect(),
            };
            let pre = |x: &[f64], i: usize, norm: &str| match &m {
                Some(_) => ln_mod(x, d, ch6[i], ch6[i + 1]),
                None => rms(x, d, p.get(&q(norm))),
            };
            let a = pre(&t, 0, "norm_attn");
            let qs = dense(&a, p.get(&q("q.w")), Some(p.get(&q("q.b"))), d, d);
            let ks = dense(&a, p.get(&q("k.w")), Some(p.get(&q("k.b"))), d, d);
            let vs = dense(&a, p.get(&q("v.w")), Some(p.get(&q("v.b"))), d, d);
            let mut o = vec![0.0; n * d];
            for hh in 0..heads {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..hd)
                                .map(|k| qs[i * d + hh * hd + k] * ks[j * d + hh * hd + k])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    for j in 0..n {
                        let pj = (s[j] - mx).exp() / z;
                        for k in 0..hd {
                            o[i * d + hh * hd + k] += pj * vs[j * d + hh * hd + k];
                        }
                    }
                }
            }
            let o = dense(&o, p.get(&q("o.w")), None, d, d);
            for (i, v) in t.iter_mut().enumerate() {
                *v += ch6[2][i % d] * o[i];
            }
            let f = pre(&t, 3, "norm_mlp");
            let f: Vec<f64> = dense(&f, p.get(&q("fc1.w")), Some(p.get(&q("fc1.b"))), d, 4 * d)
                .into_iter()
                .map(gelu_tanh)
                .collect();
            let f = dense(&f, p.get(&q("fc2.w")), Some(p.get(&q("fc2.b"))), 4 * d, d);
            for (i, v) in t.iter_mut().enumerate() {
                *v += ch6[5][i % d] * f[i];
            }
        }
        let y = match &c_act {
            Some(ca) => {
                let m = dense(
                    ca,
                    p.get("dit.final.ada.w"),
                    Some(p.get("dit.final.ada.b")),
                    ca.len(),
                    2 * d,
                );
                ln_mod(&t, d, &m[..d], &m[d..])
            }
            None => rms(&t, d, p.get("dit.final.norm")),
        };
        let y = dense(
            &y,
            p.get("dit.final.out.w"),
            Some(p.get("dit.final.out.b")),
            d,
            pt * pt * ch,
        );
        // unpatchify
        let mut out = vec![0.0; h * w * ch];
        for gy in 0..gh {
            for gx in 0..gw {
                for py in 0..pt {
                    for px in 0..pt {
                        let pix = (gy * pt + py) * w + gx * pt + px;
                        let src = (gy * gw + gx) * pt * pt * ch + (py * pt + px) * ch;
                        out[pix * ch..(pix + 1) * ch].copy_from_slice(&y[src..src + ch]);
                    }
                }
            }
        }
        out
    }
}

/// The network's logits equal the direct f64 reference of spec §7.4 on a randomised model
/// (every path live): two images, time and label conditioning (and none), a non-square image,
/// two DiT blocks of two heads.
#[test]
fn uvit_forward_matches_a_direct_reference() {
    forward_matches_reference(true);
    forward_matches_reference(false);
}

fn forward_matches_reference(conditioned: bool) {
    use reference::*;
    let dev = Cpu::default();
    let (h, w, cimg, v, k) = (4usize, 6usize, 2usize, 5usize, 3usize);
    let mut cfg = uvit("uvit-tiny", v, (h, w, cimg));
    cfg.dim = 4;
    cfg.cond_dim = 6;
    cfg.embed_dim = Some(3);
    cfg.num_classes = if conditioned { k } else { 0 };
    cfg.time_conditioning = conditioned;
    set_arch(&mut cfg, |g, p, hh, d| (*g, *p, *hh, *d) = (2, 2, 2, 8));
    if let Arch::Uvit { dit_layers, .. } = &mut cfg.arch {
        *dit_layers = 2;
    }
    cfg.n_layers = 2;
    let (ch, dc, e, groups, layers) = (4, 6, 3, 2, 2);
    let mut m = Network::<f64, Cpu>::new(cfg, &dev, 3).unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    randomize(&mut m, &mut rng, |r| 0.5 * (r.gen::<f64>() * 2.0 - 1.0));
    let p = P(m
        .params()
        .iter()
        .map(|q| (q.name.clone(), q.value.as_vec()))
        .collect());
    let (b, n) = (2, h * w * cimg);
    let ids = random_ids(&mut rng, b * n, v);
    let (t, labels) = ([0.25, 0.9], [2u32, 0]);
    let batch = DenoiseBatch {
        ids: &ids,
        batch: b,
        len: n,
        t: &t,
        labels: conditioned.then_some(&labels[..]),
    };
    let got = m.forward(&batch, NoneTape, None).unwrap().as_vec();
    for img in 0..b {
        // conditioning: Dense(swish(Dense([emb(t), emb(label)]))), spec §7.1
        let c = conditioned.then(|| {
            let temb = maskdiff_network::time_embedding(&t[img..img + 1], dc);
            let lemb = &p.get("cond.label_embed")[labels[img] as usize * dc..][..dc];
            let h1: Vec<f64> = dense(
                &temb,
                p.get("cond.w1_t"),
                Some(p.get("cond.b1")),
                dc,
                4 * dc,
            )
            .iter()
            .zip(dense(lemb, p.get("cond.w1_label"), None, dc, 4 * dc))
            .map(|(a, b)| swish(a + b))
            .collect();
            dense(&h1, p.get("cond.w2"), Some(p.get("cond.b2")), 4 * dc, dc)
        });
        let c = c.as_deref();
        let x: Vec<f64> = ids[img * n..(img + 1) * n]
            .iter()
            .flat_map(|&id| p.get("embed")[id as usize * e..(id as usize + 1) * e].to_vec())
            .collect();
        let mut hs = conv(
            &x,
            p.get("conv_in.w"),
            p.get("conv_in.b"),
            (h, w, cimg * e, ch),
        );
        let mut skips = vec![hs.clone()];
        for i in 0..layers {
            hs = res_block(&hs, (h, w, ch, ch, groups), c, &p, &format!("down.{i}"));
            skips.push(hs.clone());
        }
        hs = dit(&hs, (h, w, ch), (2, 2, 2, 8), c, &p);
        for i in 0..=layers {
            let s = skips.pop().unwrap();
            let cat: Vec<f64> = (0..h * w)
                .flat_map(|px| {
                    hs[px * ch..(px + 1) * ch]
                        .iter()
                        .chain(&s[px * ch..(px + 1) * ch])
                        .copied()
                        .collect::<Vec<_>>()
                })
                .collect();
            hs = res_block(&cat, (h, w, 2 * ch, ch, groups), c, &p, &format!("up.{i}"));
        }
        let y: Vec<f64> = cond_gn(&hs, ch, groups, c, &p, "out.norm")
            .into_iter()
            .map(swish)
            .collect();
        let want = conv(
            &y,
            p.get("out.conv.w"),
            p.get("out.conv.b"),
            (h, w, ch, cimg * v),
        );
        let got = &got[img * n * v..(img + 1) * n * v];
        for (a, e) in got.iter().zip(&want) {
            assert!((a - e).abs() <= 1e-10 * (1.0 + e.abs()), "{a} vs {e}");
        }
        assert!(
            want.iter().map(|x| x.abs()).sum::<f64>() > 1.0,
            "a live output"
        );
    }
}
