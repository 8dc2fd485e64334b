//! The image networks' trainer tests (spec §7.3, §7.4), shared by `tests/unet.rs` and
//! `tests/uvit.rs`: a fresh network's MD4 loss is exactly weight(t)·#masked·ln V per image, with
//! Monte Carlo mean (α̃_0 − α̃_1)·ln V per dimension — (1 − 2ε)·8 bits/dim for 256 levels; a few
//! training steps on the same batch lower the loss; a checkpoint round trip restores the network.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::NetworkConfig;
use maskdiff_objective::tensor::MaskedBatch;
use maskdiff_objective::Md4;
use maskdiff_process::DenoiseBatch;
use maskdiff_train::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The `preset` network (v levels) on h × w one-channel images.
fn tiny(preset: &str, v: usize, h: usize, w: usize) -> NetworkConfig {
    let mut c = NetworkConfig::preset(preset, v).unwrap();
    c.set_image(h, w, 1).unwrap();
    c
}

fn train_cfg(lr: f64) -> TrainConfig {
    TrainConfig {
        lr: LrSchedule::constant(lr, 0),
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        ema_decay: 0.9,
        ..Default::default()
    }
}

/// A fresh `preset` network's MD4 loss is exactly weight(t)·#masked·ln V per image, with Monte
/// Carlo mean (1 − 2ε)·8 bits/dim for 256 levels.
pub fn fresh_loss_is_eight_bits_per_dim(preset: &str) {
    let dev = Cpu::default();
    let (v, b, h, w) = (256usize, 16usize, 6usize, 6usize);
    let n = h * w;
    let t = Trainer::<_, Md4>::new(tiny(preset, v, h, w), train_cfg(1e-3), 0, &dev).unwrap();
    let sched = *t.schedule();
    let mut rng = StdRng::seed_from_u64(3);
    let ln_v = (v as f64).ln();
    let mut per_dim_bits = Vec::new();
    for _ in 0..60 {
        let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
        let mb = MaskedBatch::sample(&x0, b, n, v, &sched, Default::default(), &mut rng).unwrap();
        let input = DenoiseBatch {
            ids: mb.xt(),
            batch: b,
            len: n,
            t: mb.t(),
            labels: None,
        };
        let logits = t.model().forward(&input, NoneTape, None).unwrap();
        let loss = maskdiff_objective::md4_diffusion_loss(logits, &mb)
            .unwrap()
            .as_vec();
        for (i, (&l, &c)) in loss.iter().zip(&mb.masked_counts()).enumerate() {
            let expect = mb.weight()[i] * c as f64 * ln_v;
            assert!(
                (l as f64 - expect).abs() <= 1e-5 * (1.0 + expect),
                "{l} vs {expect}"
            );
            per_dim_bits.push(l as f64 / n as f64 / std::f64::consts::LN_2);
        }
    }
    let m = per_dim_bits.len() as f64;
    let mean = per_dim_bits.iter().sum::<f64>() / m;
    let var = per_dim_bits.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0);
    let se = (var / m).sqrt();
    let target = (1.0 - 2.0 * 1e-4) * 8.0;
    assert!(
        (mean - target).abs() < 4.0 * se,
        "mean {mean} target {target} se {se}"
    );
    assert!(se < 0.05 * target, "test too weak: se {se}");
}

/// A few training steps of the `preset` network on one batch lower the loss; a checkpoint round
/// trip (under a temporary folder named after `tag`) restores the network.
pub fn trains_and_checkpoints(preset: &str, tag: &str) {
    let dev = Cpu::default();
    let (v, b, h, w) = (4usize, 8usize, 4usize, 4usize);
    let n = h * w;
    let mut t = Trainer::<_, Md4>::new(tiny(preset, v, h, w), train_cfg(3e-3), 1, &dev).unwrap();
    // one fixed image pattern (a gradient), so the data is learnable
    let x0: Vec<u32> = (0..b * n).map(|i| ((i % n) * v / n) as u32).collect();
    let batch = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };
    let mut rng = StdRng::seed_from_u64(5);
    let eval = |t: &Trainer<Cpu, Md4>, rng: &mut StdRng| -> f64 {
        (0..20)
            .flat_map(|_| t.eval_loss(&batch, rng, false).unwrap())
            .sum::<f64>()
    };
    let before = eval(&t, &mut rng);
    for _ in 0..60 {
        t.step(&batch).unwrap();
    }
    let after = eval(&t, &mut rng);
    assert!(after < 0.8 * before, "before {before} after {after}");
    let dir = std::env::temp_dir().join(format!("maskdiff-{tag}-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    t.save(&dir).unwrap();
    let loaded = load_model::<Cpu, Md4>(&dir, Weights::Live, &dev).unwrap();
    assert_eq!(loaded.model.config(), t.model().config());
    for (p, q) in loaded.model.params().iter().zip(t.model().params()) {
        assert_eq!(p.value.as_vec(), q.value.as_vec(), "{}", p.name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
