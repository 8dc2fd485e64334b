//! Block diffusion (BD3-LM) through the generic trainer's pieces: the [`Block`] objective with a
//! block network (`NetworkConfig::block_size`). Exactness: B = N is MD4 on the same x_t and t;
//! B = 1 is w(t) · the autoregressive cross-entropy of the masked positions (each worked out by
//! separate network calls on truncated inputs), so (α_0 − α_1) · AR cross-entropy in
//! expectation; the Monte-Carlo block NELBO (training loss path and the `Denoiser` estimator) is
//! unbiased against the exact value by enumeration of mask patterns on a toy vocabulary; and the
//! trainer takes steps with it unchanged.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig, NetworkDenoiser};
use maskdiff_objective::tensor::MaskedBatch;
use maskdiff_objective::{
    block_input, Block, BlockTime, CleanBatch, EvalOptions, InnerSpec, Md4, Objective,
    ObjectiveSpec, Share,
};
use maskdiff_process::DenoiseBatch;
use maskdiff_schedule::{AnySchedule, Linear, MaskingSchedule, ScheduleSpec, TimeSampling};
use maskdiff_train::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod block_common;
use block_common::{assert_eval_nelbo_unbiased, mean_se, nll, pattern_log_mu, simpson, with_block};

/// A tiny network with every parameter uniform in ±0.51.
fn net(v: usize, block: Option<usize>, time: bool, seed: u64) -> Md4Transformer<f32, Cpu> {
    block_common::net(v, block, time, seed, 0.51)
}

fn schedule() -> maskdiff_schedule::Shifted<AnySchedule> {
    ScheduleSpec::official(AnySchedule::Linear(Linear))
        .build()
        .unwrap()
}

fn share(b: usize) -> Share {
    Share {
        lo: 0,
        hi: b,
        total: b,
    }
}

fn scalar(
    o: &impl Objective<Cpu, Noised = MaskedBatch>,
    m: &Md4Transformer<f32, Cpu>,
    mb: &MaskedBatch,
) -> f64 {
    let l = o
        .loss(
            &ModelNet(m),
            mb,
            None,
            share(mb.batch()),
            &mut StdRng::seed_from_u64(0),
        )
        .unwrap();
    l.scalar.array() as f64
}

#[test]
fn block_size_n_is_md4_on_the_same_noise() {
    let (v, n, b) = (7, 12, 5);
    for time in [true, false] {
        let plain = net(v, None, time, 3);
        let block = with_block(&plain, Some(n));
        let md4 = Md4::new(schedule(), TimeSampling::Antithetic, v);
        let blk = Block::new(schedule(), TimeSampling::Antithetic, v, n).unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
        let clean = CleanBatch::new(&x0, b, n, v, None).unwrap();
        let mb = <Md4 as Objective<Cpu>>::noise(&md4, &clean, &mut rng).unwrap();
        let (a, c) = (scalar(&md4, &plain, &mb), scalar(&blk, &block, &mb));
        assert!(a > 1.0, "a non-trivial loss {a}");
        assert!((a - c).abs() < 1e-5 * a, "MD4 {a} vs block B = N {c}");
        // a smaller block changes the loss (the clean prefix is used)
        let blk2 = Block::new(schedule(), TimeSampling::Antithetic, v, 4).unwrap();
        let d = scalar(&blk2, &with_block(&plain, Some(4)), &mb);
        assert!(
            (a - d).abs() > 1e-3,
            "B = 4 should differ from MD4: {a} vs {d}"
        );
    }
}

/// Autoregressive cross-entropy of each position: the B = 1 network on the prefix x_0[..=n]
/// alone (noised half all masks), read at position n — one call per position, no loss code.
fn ar_cross_entropy(m: &Md4Transformer<f32, Cpu>, x0: &[u32], t: f64, v: usize) -> Vec<f64> {
    (0..x0.len())
        .map(|n| {
            let xt = vec![v as u32; n + 1];
            let ids = block_input(&xt, &x0[..=n], 1, n + 1);
            let batch = DenoiseBatch {
                ids: &ids,
                batch: 1,
                len: 2 * (n + 1),
                t: &[t],
                labels: None,
            };
            let logits = m.forward(&batch, NoneTape, None).unwrap().as_vec();
            nll(&logits[n * v..(n + 1) * v], x0[n] as usize)
        })
        .collect()
}

#[test]
fn block_size_one_is_weighted_autoregressive_cross_entropy() {
    let (v, n) = (5, 9);
    let s = schedule();
    let blk = Block::new(s, TimeSampling::Antithetic, v, 1).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    for time in [true, false] {
        let m = net(v, Some(1), time, 11);
        for _ in 0..4 {
            let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            let t: f64 = rng.gen_range(0.05..0.95);
            let xt: Vec<u32> = x0
                .iter()
                .map(|&x| if rng.gen::<f64>() < 0.5 { v as u32 } else { x })
                .collect();
            let w = -s.weight(t);
            let mb = MaskedBatch::new(x0.clone(), xt.clone(), 1, n, v, vec![t], vec![w]).unwrap();
            let got = scalar(&blk, &m, &mb);
            let ce = ar_cross_entropy(&m, &x0, t, v);
            let want: f64 = w
                * (0..n)
                    .filter(|&i| xt[i] == v as u32)
                    .map(|i| ce[i])
                    .sum::<f64>();
            assert!((got - want).abs() < 2e-5 * want.max(1.0), "{got} vs {want}");
        }
    }
    // In expectation over t and x_t (time-free network, so CE does not depend on t):
    // E[w(t) · 1{masked}] = ∫ −α'(t) dt = α_0 − α_1, so the diffusion term is (α_0 − α_1)·Σ CE.
    let m = net(v, Some(1), false, 11);
    let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
    let ar: f64 = ar_cross_entropy(&m, &x0, 0.5, v).iter().sum();
    let want = (s.alpha(0.0) - s.alpha(1.0)) * ar;
    let copies = 4000;
    let xs: Vec<u32> = (0..copies).flat_map(|_| x0.iter().copied()).collect();
    let clean = CleanBatch::new(&xs, copies, n, v, None).unwrap();
    let per = blk
        .eval_nelbo(&ModelNet(&m), &clean, &mut StdRng::seed_from_u64(5))
        .unwrap();
    let recon = blk.recon(n);
    let d: Vec<f64> = per.iter().map(|x| x - recon).collect();
    let (mean, se) = mean_se(&d);
    assert!(
        se > 0.0 && (mean - want).abs() < 4.0 * se,
        "{mean} ± {se} vs {want}"
    );
}

#[test]
fn block_nelbo_is_unbiased_against_enumeration() {
    // N = 4, V = 3, B = 2, a time-free network: C(S) = Σ_{n∈S} −log μ_n[x_0^n] with exactly
    // S masked is a fixed number per pattern, and the diffusion term is
    // Σ_S C(S) ∫ −α'(t)(1 − α_t)^{|S|−1} α_t^{N−|S|} dt = Σ_S C(S) ∫_{α_1}^{α_0} (1−a)^{|S|−1} a^{N−|S|} da.
    let (v, n, bs) = (3usize, 4usize, 2usize);
    let s = schedule();
    let m = net(v, Some(bs), false, 21);
    let x0: Vec<u32> = vec![2, 0, 1, 1];
    let log_mu = pattern_log_mu(&m, &x0, v);
    let mut exact = 0.0;
    for (pattern, lm) in log_mu.iter().enumerate().skip(1) {
        let c: f64 = (0..n)
            .filter(|&i| pattern >> i & 1 == 1)
            .map(|i| -lm[i][x0[i] as usize])
            .sum();
        let k = pattern.count_ones() as i32;
        let integral = simpson(
            |a| (1.0 - a).powi(k - 1) * a.powi(n as i32 - k),
            s.alpha(1.0),
            s.alpha(0.0),
            200,
        );
        exact += c * integral;
    }
    let blk = Block::new(s, TimeSampling::Antithetic, v, bs).unwrap();
    let recon = blk.recon(n);
    // (a) the training/validation path: one (t, x_t) per copy, antithetic t
    assert_eval_nelbo_unbiased(&blk, &m, &x0, v, recon, exact);
    // (b) the Denoiser estimator (`maskdiff eval`)
    let seqs = vec![x0.clone(); 3000];
    let mut den = NetworkDenoiser::new(m.clone());
    let opts = EvalOptions {
        mc_samples: 2,
        discrete_steps: None,
        batch_rows: 512,
        seed: 3,
    };
    let r = <Block as Objective<Cpu>>::estimate(&blk, &mut den, &seqs, None, opts, &mut |_| {})
        .unwrap();
    assert!(
        (r.diffusion_nats - exact).abs() < 4.0 * r.stderr_nats,
        "{r:?} vs exact {exact}"
    );
    assert!((r.recon_nats - recon).abs() < 1e-12);
}

#[test]
fn trainer_steps_with_the_block_objective() {
    let v = 6;
    let mut net_cfg = NetworkConfig::preset("tiny", v).unwrap();
    net_cfg.block_size = Some(4);
    let train_cfg = TrainConfig {
        objective: ObjectiveSpec::Block {
            block_size: 4,
            inner: InnerSpec::Md4,
            time: BlockTime::Sequence,
        },
        lr: LrSchedule::constant(3e-3, 0),
        ema_decay: 0.0,
        ..Default::default()
    };
    let mut tr = Trainer::<Cpu, Block>::new(net_cfg, train_cfg, 1, &Cpu::default()).unwrap();
    // a deterministic pattern: token n+1 = token n + 1 mod V, so the clean prefix predicts it
    let (b, n) = (8, 16);
    let x0: Vec<u32> = (0..b)
        .flat_map(|s| (0..n).map(move |i| ((s + i) % v) as u32))
        .collect();
    let batch = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };
    let first = tr.step(&batch).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = tr.step(&batch).unwrap();
    }
    assert!(first.loss.is_finite() && last.loss.is_finite());
    assert!(
        last.loss < 0.5 * first.loss,
        "{} -> {}",
        first.loss,
        last.loss
    );
    // the wrong objective for the config is refused
    let mut bad = NetworkConfig::preset("tiny", v).unwrap();
    bad.block_size = Some(4);
    assert!(Trainer::<Cpu, Md4>::new(
        bad,
        TrainConfig {
            objective: ObjectiveSpec::Block {
                block_size: 4,
                inner: InnerSpec::Md4,
                time: BlockTime::Sequence,
            },
            ..Default::default()
        },
        1,
        &Cpu::default()
    )
    .is_err());
}

/// f64 model with random parameters (block network).
fn net64(v: usize, block: usize, time: bool) -> Md4Transformer<f64, Cpu> {
    let mut cfg = NetworkConfig::preset("tiny", v).unwrap();
    cfg.time_conditioning = time;
    cfg.block_size = Some(block);
    let mut m = cfg.init::<f64, Cpu>(&Cpu::default(), 0).unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    for p in m.params_mut() {
        let vals: Vec<f64> = (0..p.numel())
            .map(|_| 0.5 * (rng.gen::<f64>() * 2.0 - 1.0))
            .collect();
        p.value = Cpu::default().tensor_from_vec(vals, (p.numel(),));
    }
    m
}

#[test]
fn cached_block_forward_equals_the_training_forward() {
    // The cache path (prefix encoded once at t = 0, the block's queries over [prefix ; block])
    // gives the logits the one-pass training forward gives each noised block, in f64.
    let (v, bs, n) = (6, 3, 8); // blocks {0,1,2} {3,4,5} {6,7}
    let mut rng = StdRng::seed_from_u64(3);
    for time in [true, false] {
        let m = net64(v, bs, time);
        let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
        let xt: Vec<u32> = x0
            .iter()
            .map(|&x| if rng.gen_bool(0.5) { v as u32 } else { x })
            .collect();
        let t = 0.37;
        let ids = block_input(&xt, &x0, 1, n);
        let full = m
            .forward(
                &DenoiseBatch {
                    ids: &ids,
                    batch: 1,
                    len: 2 * n,
                    t: &[t],
                    labels: None,
                },
                NoneTape,
                None,
            )
            .unwrap()
            .as_vec();
        let mut cache = maskdiff_network::KvCache::new(m.config().n_layers);
        for start in (0..n).step_by(bs) {
            let end = (start + bs).min(n);
            let got = m
                .forward_cached(&xt[start..end], t, None, &mut cache, false)
                .unwrap()
                .as_vec();
            let want = &full[start * v..end * v];
            let err = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-10, "block at {start}: max |Δ| = {err}");
            m.forward_cached(&x0[start..end], 0.0, None, &mut cache, true)
                .unwrap();
            assert_eq!(cache.len(), end);
        }
    }
}

#[test]
fn cached_block_samples_are_bit_identical_to_recomputing_the_prefix() {
    use maskdiff_network::{BlockDenoiser, CacheMode};
    use maskdiff_sampler::{sample_blocks, SamplerConfig, SamplerKind};
    let v = 7;
    let s = schedule();
    for (kind, time) in [
        (SamplerKind::Ancestral, true),
        (SamplerKind::Remdm, true),
        (SamplerKind::Threshold, true),
        (SamplerKind::Cached, false),
    ] {
        let m = net(v, Some(4), time, 31);
        let cfg = SamplerConfig {
            kind,
            steps: 6,
            num_samples: 3,
            length: 14, // blocks of 4, 4, 4, 2
            seed: 5,
            ..SamplerConfig::default()
        };
        let mut cached = BlockDenoiser::new(m.clone(), CacheMode::Cached).unwrap();
        let mut recompute = BlockDenoiser::new(m.clone(), CacheMode::Recompute).unwrap();
        let a = sample_blocks(&mut cached, &s, &cfg, None, None).unwrap();
        let b = sample_blocks(&mut recompute, &s, &cfg, None, None).unwrap();
        assert_eq!(a, b, "{kind:?}");
        assert!(a
            .sequences
            .iter()
            .all(|q| q.len() == 14 && q.iter().all(|&x| x < v as u32)));
        assert!(a.blocks.iter().all(|&k| k == 4));
        // the samples differ from each other (the streams are distinct)
        assert!(a.sequences[0] != a.sequences[1] || a.sequences[1] != a.sequences[2]);
        // end-of-text: each sample is cut right after its first eot, found in its last block
        let eot = 2u32;
        let c = sample_blocks(&mut cached, &s, &cfg, Some(eot), None).unwrap();
        for (i, q) in c.sequences.iter().enumerate() {
            let full = &a.sequences[i];
            match full.iter().position(|&x| x == eot) {
                Some(at) => {
                    assert_eq!(q[..], full[..=at]);
                    assert!(c.stopped_at_eot[i]);
                    assert_eq!(c.blocks[i], at / 4 + 1);
                }
                None => assert!(q == full && !c.stopped_at_eot[i]),
            }
        }
    }
    // a plain (non-block) network is refused
    assert!(BlockDenoiser::new(net(v, None, true, 1), CacheMode::Cached).is_err());
}
