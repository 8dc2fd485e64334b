//! U-Net (spec §7.3) properties: the official CIFAR-10 parameter count from the layer formula,
//! zero-initialised output (uniform prediction), input errors, gradients against central finite
//! differences (f64, every parameter tensor), save → load identity and dropout's effect.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Arch, Network, NetworkConfig, NetworkError};
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod image_common;

use image_common::{bad_inputs_are_errors, image_config as unet, random_ids, randomize};

/// The parameter count of the U-Net layer by layer (spec §7.3, official `unet.py`): `ch`
/// channels, `l` blocks per side, per-channel embedding `e`, `c` image channels, V levels,
/// conditioning width `dc` (time only).
fn unet_params(ch: usize, l: usize, e: usize, c: usize, v: usize, dc: usize) -> usize {
    let gn = |k: usize| 2 * k;
    let conv = |i: usize, o: usize| 9 * i * o + o;
    let res = |i: usize, o: usize| {
        gn(i) + conv(i, o) + dc * o + gn(o) + conv(o, o) + if i != o { i * o + o } else { 0 }
    };
    let cond = dc * 4 * dc + 4 * dc + 4 * dc * dc + dc;
    let attn = gn(ch) + 4 * (ch * ch + ch);
    (v + 1) * e
        + cond
        + conv(c * e, ch)
        + l * res(ch, ch)
        + 2 * res(ch, ch)
        + attn
        + (l + 1) * res(2 * ch, ch)
        + gn(ch)
        + conv(ch, c * v)
}

#[test]
fn cifar10_preset_has_the_official_parameter_count() {
    let dev = Cpu::default();
    let cfg = NetworkConfig::preset("unet-cifar10", 256).unwrap();
    assert_eq!(cfg.image(), Some((32, 32, 3)));
    assert_eq!(cfg.max_len, 32 * 32 * 3);
    assert_eq!(
        (cfg.dim, cfg.n_layers, cfg.cond_dim, cfg.embed_dim),
        (128, 32, 128, Some(128))
    );
    let m = Network::<f32, Cpu>::new(cfg, &dev, 0).unwrap();
    let n = m.num_params();
    assert_eq!(n, unet_params(128, 32, 128, 3, 256, 128));
    // ≈ 28 M (spec §7.3); the exact count of the official md4/cifar10 network:
    assert_eq!(n, 28_427_520);
}

#[test]
fn fresh_unet_predicts_uniform_exactly() {
    for (time, classes) in [(true, 0), (false, 0), (true, 3), (false, 2)] {
        let mut cfg = unet("unet-tiny", 7, (4, 3, 2));
        cfg.time_conditioning = time;
        cfg.num_classes = classes;
        image_common::fresh_predicts_uniform_exactly(cfg, 4 * 3 * 2, (time, classes));
    }
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let mut cfg = unet("unet-tiny", 5, (2, 2, 1));
    bad_inputs_are_errors(cfg.clone());
    // groups must divide the channels; the transformer has no image shape
    if let Arch::Unet { groups, .. } = &mut cfg.arch {
        *groups = 3;
    }
    assert!(matches!(cfg.validate(), Err(NetworkError::Config(_))));
    let mut t = NetworkConfig::preset("tiny", 5).unwrap();
    assert!(t.set_image(2, 2, 1).is_err());
    assert!(matches!(
        NetworkConfig::preset("unet-huge", 5),
        Err(NetworkError::UnknownPreset(_))
    ));
}

/// d/dθ Σ R ⊙ logits by the tape vs central differences in f64, for every parameter tensor (a
/// few random coordinates each), with every path live (randomised weights, dropout off), for a
/// time-and-label-conditioned and an unconditioned U-Net whose up blocks use GroupNorm over
/// several groups.
#[test]
fn unet_gradients_match_central_differences() {
    for (time, classes) in [(true, 2), (false, 0)] {
        let mut cfg = unet("unet-tiny", 4, (3, 2, 2));
        cfg.dim = 8;
        cfg.cond_dim = 8;
        cfg.embed_dim = Some(3);
        cfg.time_conditioning = time;
        cfg.num_classes = classes;
        if let Arch::Unet { groups, .. } = &mut cfg.arch {
            *groups = 2;
        }
        let checked = image_common::gradients_match_central_differences(cfg, 3 * 2 * 2, classes);
        assert!(checked >= 2 * 40, "{checked}");
    }
}

#[test]
fn unet_save_load_roundtrip_and_dropout() {
    let dev = Cpu::default();
    let mut cfg = unet("unet-tiny", 6, (3, 3, 1));
    cfg.dropout = 0.5;
    let mut m = Network::<f32, Cpu>::new(cfg.clone(), &dev, 1).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    randomize(&mut m, &mut rng, |r| r.gen::<f32>() * 0.4 - 0.2);
    let dir = std::env::temp_dir().join(format!("maskdiff-unet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    m.save_safetensors(&path).unwrap();
    let mut m2 = Network::<f32, Cpu>::new(cfg, &dev, 99).unwrap();
    m2.load_safetensors(&path).unwrap();
    let ids = random_ids(&mut rng, 2 * 9, 6);
    let batch = DenoiseBatch {
        ids: &ids,
        batch: 2,
        len: 9,
        t: &[0.2, 0.7],
        labels: None,
    };
    let a = m.forward(&batch, NoneTape, None).unwrap().as_vec();
    assert_eq!(a, m2.forward(&batch, NoneTape, None).unwrap().as_vec());
    // dropout changes the output only in training
    let mut drng = StdRng::seed_from_u64(4);
    let d = m
        .forward(&batch, NoneTape, Some(&mut drng as &mut dyn rand::RngCore))
        .unwrap()
        .as_vec();
    assert_ne!(a, d);
    std::fs::remove_dir_all(&dir).unwrap();
}
