//! Model-level properties: zero-initialised output (uniform prediction), shapes and input
//! errors, gradients against central finite differences (f64), save → load identity.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig, NetworkDenoiser, NetworkError};
use maskdiff_process::{DenoiseBatch, Denoiser};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn tiny(v: usize) -> NetworkConfig {
    NetworkConfig::preset("tiny", v).unwrap()
}

fn random_ids(rng: &mut StdRng, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(0..=v as u32)).collect()
}

/// Overwrite every parameter (including the zero-initialised ones) with N(0, σ²)-ish noise so
/// that every path of the network carries signal.
fn randomise<E: maskdiff_network::Elem, D: maskdiff_network::Kernels<E>>(
    m: &mut Md4Transformer<E, D>,
    seed: u64,
    sigma: f64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    for p in m.params_mut() {
        let dev = p.value.device().clone();
        let vals: Vec<E> = (0..p.numel())
            .map(|_| E::c(sigma * (rng.gen::<f64>() * 2.0 - 1.0) * 1.7))
            .collect();
        p.value = dev.tensor_from_vec(vals, (p.numel(),));
    }
}

#[test]
fn fresh_model_predicts_uniform_exactly() {
    let dev = Cpu::default();
    for (time, classes) in [(true, 0), (false, 0), (true, 3), (false, 2)] {
        let mut cfg = tiny(5);
        cfg.time_conditioning = time;
        cfg.num_classes = classes;
        let m = cfg.init::<f32, Cpu>(&dev, 7).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let ids = random_ids(&mut rng, 3 * 10, 5);
        let labels = [0u32, 1, 1];
        let batch = DenoiseBatch {
            ids: &ids,
            batch: 3,
            len: 10,
            t: &[0.1, 0.5, 0.99],
            labels: (classes > 0).then_some(&labels[..]),
        };
        let logits = m.forward(&batch, NoneTape, None).unwrap();
        assert_eq!(*logits.shape(), (3, 10, 5));
        assert!(logits.as_vec().iter().all(|&x| x == 0.0));
        let mut den = NetworkDenoiser::new(m);
        let lp = den.log_probs(&batch).unwrap();
        let expect = -(5f32).ln();
        assert!(
            lp.data.iter().all(|&x| (x - expect).abs() < 1e-6),
            "log(1/5) everywhere"
        );
        assert_eq!(den.is_time_conditioned(), time);
        assert_eq!(den.num_classes(), classes);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Cpu::default();
    let m = tiny(5).init::<f32, Cpu>(&dev, 0).unwrap();
    let ids = vec![6u32; 4]; // > mask id 5
    let b = DenoiseBatch {
        ids: &ids,
        batch: 1,
        len: 4,
        t: &[0.5],
        labels: None,
    };
    assert!(matches!(
        m.forward(&b, NoneTape, None),
        Err(NetworkError::Process(_))
    ));
    let ids = vec![0u32; 65];
    let b = DenoiseBatch {
        ids: &ids,
        batch: 1,
        len: 65,
        t: &[0.5],
        labels: None,
    };
    assert!(matches!(
        m.forward(&b, NoneTape, None),
        Err(NetworkError::Input(_))
    ));
    let ids = vec![0u32; 4];
    let b = DenoiseBatch {
        ids: &ids,
        batch: 1,
        len: 4,
        t: &[1.5],
        labels: None,
    };
    assert!(matches!(
        m.forward(&b, NoneTape, None),
        Err(NetworkError::Input(_))
    ));
    let b = DenoiseBatch {
        ids: &ids,
        batch: 1,
        len: 4,
        t: &[0.5],
        labels: Some(&[0]),
    };
    assert!(matches!(
        m.forward(&b, NoneTape, None),
        Err(NetworkError::Input(_))
    ));
}

/// d/dθ Σ R ⊙ logits by the tape vs central differences, in f64, for every parameter tensor
/// (a few random coordinates each), with all paths live (randomised weights, dropout off).
#[test]
fn gradients_match_central_differences() {
    let dev = Cpu::default();
    for (time, classes, embed_dim) in [(true, 2, Some(8)), (false, 0, None)] {
        let mut cfg = tiny(4);
        cfg.dim = 16;
        cfg.n_heads = 2;
        cfg.cond_dim = 8;
        cfg.time_conditioning = time;
        cfg.num_classes = classes;
        cfg.embed_dim = embed_dim;
        cfg.ffn_hidden = Some(24);
        let mut m = cfg.init::<f64, Cpu>(&dev, 3).unwrap();
        randomise(&mut m, 11, 0.4);
        let (b, n, v) = (2, 5, 4);
        let mut rng = StdRng::seed_from_u64(5);
        let ids = random_ids(&mut rng, b * n, v);
        let r: Vec<f64> = (0..b * n * v).map(|_| rng.gen::<f64>() - 0.5).collect();
        let labels = [1u32, 0];
        let batch = DenoiseBatch {
            ids: &ids,
            batch: b,
            len: n,
            t: &[0.3, 0.8],
            labels: (classes > 0).then_some(&labels[..]),
        };
        let rt = dev.tensor_from_vec(r.clone(), (b, n, v));
        let f = |m: &Md4Transformer<f64, Cpu>| -> f64 {
            let l = m.forward(&batch, NoneTape, None).unwrap().as_vec();
            l.iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        let logits = m.forward(&batch, m.tape(), None).unwrap();
        let grads = (logits * rt).sum::<Rank0, _>().backward();
        let h = 1e-5;
        let mut checked = 0;
        for pi in 0..m.params().len() {
            let g = grads.get(&m.params()[pi].value).as_vec();
            let base = m.params()[pi].value.as_vec();
            for _ in 0..3 {
                let j = rng.gen_range(0..base.len());
                let eval = |delta: f64| {
                    let mut mm = m.clone();
                    let mut vals = base.clone();
                    vals[j] += delta;
                    mm.params_mut()[pi].value = dev.tensor_from_vec(vals, (base.len(),));
                    f(&mm)
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                let err = (fd - g[j]).abs();
                // central differences in f64: truncation O(h²) ≈ 1e-10, round-off ≈ 1e-16/h
                assert!(
                    err <= 1e-6 * (1.0 + fd.abs()),
                    "{} [{j}]: tape {} vs fd {fd}",
                    m.params()[pi].name,
                    g[j]
                );
                checked += 1;
            }
        }
        assert!(checked >= 3 * 20);
    }
}

#[test]
fn save_load_roundtrip_gives_identical_outputs() {
    let dev = Cpu::default();
    let mut m = tiny(6).init::<f32, Cpu>(&dev, 1).unwrap();
    randomise(&mut m, 2, 0.2);
    let dir = std::env::temp_dir().join(format!("maskdiff-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    m.save_safetensors(&path).unwrap();
    let mut m2 = tiny(6).init::<f32, Cpu>(&dev, 99).unwrap();
    m2.load_safetensors(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let ids = random_ids(&mut rng, 2 * 12, 6);
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 2,
        len: 12,
        t: &[0.2, 0.7],
        labels: None,
    };
    let a = m.forward(&batch, NoneTape, None).unwrap().as_vec();
    let b = m2.forward(&batch, NoneTape, None).unwrap().as_vec();
    assert_eq!(a, b, "bit-identical after reload");
    // a different vocabulary is a clear error, not a panic
    let mut other = tiny(7).init::<f32, Cpu>(&dev, 1).unwrap();
    let err = other.load_safetensors(&path).unwrap_err();
    assert!(
        matches!(err, NetworkError::CheckpointMismatch { .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The checkpoint name table of `maskdiff_network::modules` (names, shapes, order), written out
/// by hand for two configurations: conditioned (time + labels, outside embedding) and plain.
#[test]
fn checkpoint_names_are_the_documented_table() {
    let dev = Cpu::default();
    let (v, d, dc, e, h, k) = (5usize, 32usize, 16usize, 8usize, 24usize, 3usize);
    let mut cfg = tiny(v);
    cfg.n_layers = 2;
    cfg.dim = d;
    cfg.n_heads = 2;
    cfg.cond_dim = dc;
    cfg.ffn_hidden = Some(h);
    cfg.embed_dim = Some(e);
    cfg.num_classes = k;
    cfg.time_conditioning = true;
    let block = |l: usize, norm: Vec<(String, Vec<usize>)>| {
        let mut rows = norm;
        for w in ["wq", "wk", "wv", "wo"] {
            rows.push((format!("blocks.{l}.attn.{w}"), vec![d, d]));
        }
        rows.push((format!("blocks.{l}.ffn.w1"), vec![d, h]));
        rows.push((format!("blocks.{l}.ffn.w3"), vec![d, h]));
        rows.push((format!("blocks.{l}.ffn.w2"), vec![h, d]));
        rows
    };
    let s = |n: &str, shape: &[usize]| (n.to_string(), shape.to_vec());
    let mut want = vec![
        s("embed", &[v + 1, e]),
        s("embed_proj.w", &[e, d]),
        s("embed_proj.b", &[d]),
        s("cond.w1_t", &[dc, 4 * dc]),
        s("cond.label_embed", &[k, dc]),
        s("cond.w1_label", &[dc, 4 * dc]),
        s("cond.b1", &[4 * dc]),
        s("cond.w2", &[4 * dc, dc]),
        s("cond.b2", &[dc]),
    ];
    for l in 0..2 {
        let ada = vec![
            (format!("blocks.{l}.ada.w"), vec![dc, 6 * d]),
            (format!("blocks.{l}.ada.b"), vec![6 * d]),
        ];
        want.extend(block(l, ada));
    }
    want.extend([
        s("head.ada.w", &[dc, 2 * d]),
        s("head.ada.b", &[2 * d]),
        s("head.out", &[d, v]),
    ]);
    let names = |m: &Md4Transformer<f32, Cpu>| -> Vec<(String, Vec<usize>)> {
        m.params()
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    };
    let m = cfg.init::<f32, Cpu>(&dev, 0).unwrap();
    assert_eq!(names(&m), want);
    assert_eq!(
        m.num_params(),
        want.iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    );

    cfg.embed_dim = None;
    cfg.num_classes = 0;
    cfg.time_conditioning = false;
    let mut want = vec![s("embed", &[v + 1, d])];
    for l in 0..2 {
        let rms = vec![
            (format!("blocks.{l}.norm_attn"), vec![d]),
            (format!("blocks.{l}.norm_mlp"), vec![d]),
        ];
        want.extend(block(l, rms));
    }
    want.extend([s("head.norm", &[d]), s("head.out", &[d, v])]);
    assert_eq!(names(&cfg.init::<f32, Cpu>(&dev, 0).unwrap()), want);
}

/// `to_device` rebuilds the typed structure from the source's tensors: same names, values and
/// outputs (here Cpu → Cpu, f64).
#[test]
fn to_device_copies_every_tensor() {
    let dev = Cpu::default();
    let mut m = tiny(6).init::<f64, Cpu>(&dev, 4).unwrap();
    randomise(&mut m, 5, 0.3);
    let c = m.to_device(&Cpu::default()).unwrap();
    for (p, q) in m.params().iter().zip(c.params()) {
        assert_eq!((&p.name, &p.shape), (&q.name, &q.shape));
        assert_eq!(p.value.as_vec(), q.value.as_vec());
    }
    let ids = [0u32, 6, 2, 6, 1, 5];
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 1,
        len: 6,
        t: &[0.4],
        labels: None,
    };
    let a = m.forward(&batch, NoneTape, None).unwrap().as_vec();
    let b = c.forward(&batch, NoneTape, None).unwrap().as_vec();
    assert_eq!(a, b);
}

/// `log_probs` (host-side fused log-softmax) equals dfdx's log-softmax of the logits, in f64
/// to 1e-12 and in f32 to 1e-5, on a model with random weights (non-uniform outputs).
#[test]
fn log_probs_match_dfdx_log_softmax() {
    let dev = Cpu::default();
    let mut rng = StdRng::seed_from_u64(4);
    let ids = random_ids(&mut rng, 3 * 12, 7);
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 3,
        len: 12,
        t: &[0.2, 0.6, 0.9],
        labels: None,
    };
    let mut m64 = tiny(7).init::<f64, Cpu>(&dev, 1).unwrap();
    randomise(&mut m64, 3, 0.5);
    let want: Vec<f64> = m64
        .forward(&batch, NoneTape, None)
        .unwrap()
        .log_softmax::<Axis<2>>()
        .as_vec();
    let got = m64.log_probs(&batch).unwrap();
    assert_eq!((got.batch, got.len, got.vocab), (3, 12, 7));
    let spread = want.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
    assert!(spread > 0.5, "outputs not spread: {spread}");
    for (g, w) in got.data.iter().zip(&want) {
        // f64 → f32 narrowing of the same value
        assert!(
            (f64::from(*g) - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "{g} vs {w}"
        );
    }
    // the same weights in f32
    let m32: Md4Transformer<f32, Cpu> = {
        let mut m = tiny(7).init::<f32, Cpu>(&dev, 1).unwrap();
        for (d, s) in m.params_mut().into_iter().zip(m64.params()) {
            let vals: Vec<f32> = s.value.as_vec().iter().map(|&x| x as f32).collect();
            d.value = dev.tensor_from_vec(vals, (d.numel(),));
        }
        m
    };
    let want32: Vec<f32> = m32
        .forward(&batch, NoneTape, None)
        .unwrap()
        .log_softmax::<Axis<2>>()
        .as_vec();
    let got32 = m32.log_probs(&batch).unwrap();
    for (g, w) in got32.data.iter().zip(&want32) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    // and the f32 model is the f64 one rounded
    assert!(want32
        .iter()
        .zip(&want)
        .all(|(a, b)| (f64::from(*a) - b).abs() < 1e-3));
}
