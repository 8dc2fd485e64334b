//! BD3-LM's clipped noise schedules (Arriola et al., ICLR 2025, §5; `MaskRate`): without a clip
//! (or with the full interval) a training step is bit-identical to the NELBO's; clipped draws
//! have mask rates in the interval, one per antithetic stratum (per sequence and per block); the
//! clipped training loss is unbiased for (1/(ω − β))∫_β^ω (1/m)·E[CE | m] dm computed by
//! enumeration of the mask patterns and quadrature over m, for the cosine schedule, for MD4 and
//! for per-block times; validation stays the unclipped NELBO; GenMD4 refuses a clip; the search
//! statistic matches its closed form for a uniform predictor and its full-range row is the NELBO
//! estimate draw for draw.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig, NetworkDenoiser};
use maskdiff_objective::tensor::MaskedBatch;
use maskdiff_objective::{
    estimate, md4_diffusion_loss, Block, BlockNet, BlockTime, CleanBatch, EvalOptions, InnerSpec,
    LogitsNet, Md4, Objective, ObjectiveError, ObjectiveSpec,
};
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_schedule::{
    AnySchedule, Cosine, Linear, MaskRate, MaskingSchedule, ScheduleSpec, Shifted, TimeSampling,
};
use maskdiff_train::*;
use rand::{rngs::StdRng, SeedableRng};

mod block_common;
use block_common::{log_softmax, masked, mean_se, pattern_log_mu, simpson};

fn sched(base: AnySchedule) -> Shifted<AnySchedule> {
    ScheduleSpec::official(base).build().unwrap()
}

fn clip(lo: f64, hi: f64) -> MaskRate {
    MaskRate::new(lo, hi).unwrap()
}

/// The mask rate of time t on the schedule's range, r = (m − m_0)/(m_1 − m_0).
fn rate(s: &impl MaskingSchedule<f64>, t: f64) -> f64 {
    let (m0, m1) = (s.one_minus_alpha(0.0), s.one_minus_alpha(1.0));
    (s.one_minus_alpha(t) - m0) / (m1 - m0)
}

fn batch(b: usize, n: usize, v: usize) -> Vec<u32> {
    (0..b * n).map(|i| ((i * 7 + i / n) % v) as u32).collect()
}

/// A fresh trainer's (seed 3) network gradients on `tb`, then the statistics of one step.
fn grads_and_step<O: Objective<Cpu>>(
    net_cfg: &NetworkConfig,
    cfg: TrainConfig,
    tb: &TrainBatch<'_>,
) -> (Vec<Vec<f32>>, StepStats) {
    let dev = Cpu::default();
    let mut tr = Trainer::<Cpu, O>::new(net_cfg.clone(), cfg, 3, &dev).unwrap();
    let g = tr
        .gradients(tb)
        .unwrap()
        .network
        .iter()
        .map(|t| t.as_vec())
        .collect();
    (g, tr.step(tb).unwrap())
}
#[test]
fn no_clip_and_the_full_interval_are_bit_identical_to_the_nelbo_step() {
    let v = 6;
    let (b, n) = (4, 16);
    let x0 = batch(b, n, v);
    let tb = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };
    let mut time_free = NetworkConfig::preset("tiny", v).unwrap();
    time_free.time_conditioning = false;
    time_free.block_size = Some(4);
    let cases: Vec<(ObjectiveSpec, NetworkConfig)> = vec![
        (
            ObjectiveSpec::Md4,
            NetworkConfig::preset("tiny", v).unwrap(),
        ),
        (
            ObjectiveSpec::Block {
                block_size: 4,
                inner: InnerSpec::Md4,
                time: BlockTime::Block,
            },
            time_free,
        ),
    ];
    for (objective, net_cfg) in cases {
        let cfg = |mask_rate| TrainConfig {
            objective,
            mask_rate,
            schedule: ScheduleSpec::official(AnySchedule::Cosine(Cosine)),
            ..Default::default()
        };
        let grads = |mask_rate: Option<MaskRate>| -> (Vec<Vec<f32>>, StepStats) {
            if matches!(objective, ObjectiveSpec::Md4) {
                grads_and_step::<Md4>(&net_cfg, cfg(mask_rate), &tb)
            } else {
                grads_and_step::<Block>(&net_cfg, cfg(mask_rate), &tb)
            }
        };
        let (g_none, s_none) = grads(None);
        let (g_full, s_full) = grads(Some(MaskRate::FULL));
        let (g_clip, s_clip) = grads(Some(clip(0.3, 0.8)));
        assert_eq!(g_none, g_full, "{objective:?}");
        assert_eq!(s_none, s_full);
        // the clip changes the step (a check that the comparison above can fail)
        assert_ne!(g_none, g_clip);
        assert_ne!(s_none.loss, s_clip.loss);
    }
    // without a clip (or with [0, 1]) the objective's noising is the NELBO sampler itself, draw
    // for draw: `MaskedBatch::sample` per sequence, `sample_in_blocks` per block
    let s = sched(AnySchedule::Cosine(Cosine));
    let clean = CleanBatch::new(&x0, b, n, v, None).unwrap();
    for clip in [None, Some(MaskRate::FULL)] {
        let md4 = Md4::new(s, TimeSampling::Antithetic, v).with_mask_rate(clip);
        let got = Objective::<Cpu>::noise(&md4, &clean, &mut StdRng::seed_from_u64(7)).unwrap();
        let want = MaskedBatch::sample(
            &x0,
            b,
            n,
            v,
            &s,
            TimeSampling::Antithetic,
            &mut StdRng::seed_from_u64(7),
        )
        .unwrap();
        assert_eq!(got, want);
        let blk = Block::with_inner(md4, 4)
            .unwrap()
            .with_time(BlockTime::Block);
        let got = Objective::<Cpu>::noise(&blk, &clean, &mut StdRng::seed_from_u64(8)).unwrap();
        let want = MaskedBatch::sample_in_blocks(
            &x0,
            b,
            n,
            v,
            4,
            &s,
            TimeSampling::Antithetic,
            None,
            &mut StdRng::seed_from_u64(8),
        )
        .unwrap();
        assert_eq!(got, want);
    }
    // the manifest of an unclipped run does not mention the clip (older manifests unchanged)
    let j = serde_json::to_value(TrainConfig::default()).unwrap();
    assert!(j.get("mask_rate").is_none());
    let j = serde_json::to_value(TrainConfig {
        mask_rate: Some(clip(0.3, 0.8)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(j["mask_rate"], serde_json::json!([0.3, 0.8]));
    let back: TrainConfig = serde_json::from_value(j).unwrap();
    assert_eq!(back.mask_rate, Some(clip(0.3, 0.8)));
}

/// Antithetic clipped draws: every mask rate in [β, ω], exactly one in each of the M strata
/// [β + k(ω − β)/M, β + (k + 1)(ω − β)/M) (M = batch, or batch × blocks), weights (m_1 − m_0)/m.
#[test]
fn clipped_draws_are_in_the_interval_one_per_stratum() {
    let v = 5;
    let s = sched(AnySchedule::Cosine(Cosine));
    let c = clip(0.3, 0.8);
    let (b, n) = (6, 12);
    let x0 = batch(b, n, v);
    let clean = CleanBatch::new(&x0, b, n, v, None).unwrap();
    let md4 = Md4::new(s, TimeSampling::Antithetic, v).with_mask_rate(Some(c));
    let per_seq = Objective::<Cpu>::noise(&md4, &clean, &mut StdRng::seed_from_u64(1)).unwrap();
    let per_block = Block::with_inner(md4.clone(), 4)
        .unwrap()
        .with_time(BlockTime::Block);
    let blocks =
        Objective::<Cpu>::noise(&per_block, &clean, &mut StdRng::seed_from_u64(2)).unwrap();
    assert_eq!(per_seq.t().len(), b);
    assert_eq!(blocks.t().len(), b * 3);
    let (m0, m1) = (s.one_minus_alpha(0.0), s.one_minus_alpha(1.0));
    for mb in [&per_seq, &blocks] {
        let m = mb.t().len();
        let mut seen = vec![0usize; m];
        for (&t, &w) in mb.t().iter().zip(mb.weight()) {
            let r = rate(&s, t);
            assert!((0.3 - 1e-12..=0.8 + 1e-12).contains(&r), "rate {r}");
            let k = (((r - 0.3) / 0.5) * m as f64 - 1e-9).floor().max(0.0) as usize;
            seen[k.min(m - 1)] += 1;
            assert!((w - (m1 - m0) / s.one_minus_alpha(t)).abs() < 1e-9 * w);
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
    }
    // per-block: each block of a row is masked with its own rate (a fully masked block where
    // rates are high and the others are not all masked cannot tell; check the weights differ)
    let w = blocks.weight();
    assert!(w[0] != w[1] && w[1] != w[2]);
}

/// Enumeration: Σ over the mask patterns of each block of its cross-entropy times
/// (1/(hi − lo))∫_{m(lo)}^{m(hi)} m^{k−1}(1 − m)^{size−k} dm (Simpson), m(r) = m_0 + (m_1 − m_0)r.
fn exact_clipped(
    log_mu: &[Vec<Vec<f64>>],
    x0: &[u32],
    bs: usize,
    s: &impl MaskingSchedule<f64>,
    c: MaskRate,
) -> f64 {
    let (m0, m1) = (s.one_minus_alpha(0.0), s.one_minus_alpha(1.0));
    let (a, b) = (m0 + (m1 - m0) * c.lo(), m0 + (m1 - m0) * c.hi());
    let n = x0.len();
    let mut total = 0.0;
    for start in (0..n).step_by(bs) {
        let end = (start + bs).min(n);
        let size = (end - start) as i32;
        for sub in 1usize..(1 << (end - start)) {
            let pattern = sub << start;
            let ce: f64 = (start..end)
                .filter(|&i| pattern >> i & 1 == 1)
                .map(|i| -log_mu[pattern][i][x0[i] as usize])
                .sum();
            let k = sub.count_ones() as i32;
            let coef = simpson(|m| m.powi(k - 1) * (1.0 - m).powi(size - k), a, b, 400)
                / (c.hi() - c.lo());
            total += ce * coef;
        }
    }
    total
}

/// log μ of a plain time-free network for every mask pattern of `x0`.
fn plain_log_mu(m: &Md4Transformer<f32, Cpu>, x0: &[u32], v: usize) -> Vec<Vec<Vec<f64>>> {
    let n = x0.len();
    (0..1usize << n)
        .map(|p| {
            let xt = masked(x0, p, v);
            let batch = DenoiseBatch {
                ids: &xt,
                batch: 1,
                len: n,
                t: &[0.5],
                labels: None,
            };
            let l = m.forward(&batch, NoneTape, None).unwrap().as_vec();
            (0..n)
                .map(|i| log_softmax(&l[i * v..(i + 1) * v]))
                .collect()
        })
        .collect()
}

/// The clipped training loss (the objective's own noising and loss path, i.i.d. times) over
/// many copies of x_0 is unbiased for the enumerated clipped objective, for the cosine schedule,
/// MD4 (one time per sequence) and blocks of 2 with per-block times.
#[test]
fn clipped_training_loss_is_unbiased_against_enumeration() {
    let (v, n) = (3usize, 4usize);
    let s = sched(AnySchedule::Cosine(Cosine));
    let x0: Vec<u32> = vec![2, 0, 1, 1];
    let copies = 6000;
    let xs: Vec<u32> = (0..copies).flat_map(|_| x0.iter().copied()).collect();
    let clean = CleanBatch::new(&xs, copies, n, v, None).unwrap();
    let per_seq = |mb: &MaskedBatch, net: &dyn Fn(&DenoiseBatch) -> Vec<f32>| -> Vec<f64> {
        let t = mb.row_times();
        let input = DenoiseBatch {
            ids: mb.xt(),
            batch: mb.batch(),
            len: n,
            t: &t,
            labels: None,
        };
        let logits = Cpu::default().tensor_from_vec(net(&input), (mb.batch(), n, v));
        md4_diffusion_loss(logits, mb)
            .unwrap()
            .as_vec()
            .into_iter()
            .map(|x| x as f64)
            .collect()
    };
    for c in [clip(0.2, 0.7), clip(0.0, 0.4)] {
        // MD4 with a plain time-free network
        let m = block_common::net(v, None, false, 31, 0.5);
        let exact = exact_clipped(&plain_log_mu(&m, &x0, v), &x0, n, &s, c);
        let md4 = Md4::new(s, TimeSampling::Iid, v).with_mask_rate(Some(c));
        let mb = Objective::<Cpu>::noise(&md4, &clean, &mut StdRng::seed_from_u64(4)).unwrap();
        let l = per_seq(&mb, &|i| m.forward(i, NoneTape, None).unwrap().as_vec());
        let (mean, se) = mean_se(&l);
        assert!(
            se > 0.0 && (mean - exact).abs() < 4.0 * se,
            "md4 {c}: {mean} ± {se} vs exact {exact}"
        );
        // blocks of 2, one time per block, on a time-free block network
        let bm = block_common::net(v, Some(2), false, 32, 0.5);
        let exact = exact_clipped(&pattern_log_mu(&bm, &x0, v), &x0, 2, &s, c);
        let blk = Block::with_inner(md4.clone(), 2)
            .unwrap()
            .with_time(BlockTime::Block);
        let mb = Objective::<Cpu>::noise(&blk, &clean, &mut StdRng::seed_from_u64(5)).unwrap();
        let net = ModelNet(&bm);
        let bn = BlockNet::new(&net, mb.x0());
        let l = per_seq(&mb, &|i| bn.logits(i, NoneTape, None).unwrap().as_vec());
        let (mean, se) = mean_se(&l);
        assert!(
            se > 0.0 && (mean - exact).abs() < 4.0 * se,
            "blocks {c}: {mean} ± {se} vs exact {exact}"
        );
        // and it differs from the NELBO here (the clip changes the objective)
        let full = exact_clipped(&pattern_log_mu(&bm, &x0, v), &x0, 2, &s, MaskRate::FULL);
        assert!((full - exact).abs() > 1e-2, "{full} vs {exact}");
    }
}

/// Validation (`eval_nelbo`) of a clipped objective is the unclipped NELBO, draw for draw.
#[test]
fn validation_of_a_clipped_objective_is_the_nelbo() {
    let v = 5;
    let (b, n) = (8, 8);
    let x0 = batch(b, n, v);
    let clean = CleanBatch::new(&x0, b, n, v, None).unwrap();
    let s = sched(AnySchedule::Linear(Linear));
    let m = block_common::net(v, Some(4), false, 9, 0.5);
    let net = ModelNet(&m);
    let plain = Md4::new(s, TimeSampling::Antithetic, v);
    let clipped = plain.clone().with_mask_rate(Some(clip(0.3, 0.8)));
    for time in [BlockTime::Sequence, BlockTime::Block] {
        let a = Block::with_inner(plain.clone(), 4).unwrap().with_time(time);
        let c = Block::with_inner(clipped.clone(), 4)
            .unwrap()
            .with_time(time);
        let ea = a
            .eval_nelbo(&net, &clean, &mut StdRng::seed_from_u64(6))
            .unwrap();
        let ec = c
            .eval_nelbo(&net, &clean, &mut StdRng::seed_from_u64(6))
            .unwrap();
        assert_eq!(ea, ec, "{time:?}");
        assert_eq!(Objective::<Cpu>::mask_rate(&c), Some(clip(0.3, 0.8)));
        // while the training noise differs
        let na = Objective::<Cpu>::noise(&a, &clean, &mut StdRng::seed_from_u64(6)).unwrap();
        let nc = Objective::<Cpu>::noise(&c, &clean, &mut StdRng::seed_from_u64(6)).unwrap();
        assert_ne!(na.t(), nc.t());
    }
}

#[test]
fn genmd4_refuses_a_clip_and_the_full_interval_is_no_clip() {
    let v = 5;
    let net_cfg = NetworkConfig::preset("tiny", v).unwrap();
    for objective in [
        ObjectiveSpec::GenMd4 { one_sample: false },
        ObjectiveSpec::Block {
            block_size: 4,
            inner: InnerSpec::GenMd4 { one_sample: false },
            time: BlockTime::Sequence,
        },
    ] {
        let cfg = TrainConfig {
            objective,
            mask_rate: Some(clip(0.3, 0.8)),
            ..Default::default()
        };
        let mut nc = net_cfg.clone();
        if matches!(objective, ObjectiveSpec::Block { .. }) {
            nc.block_size = Some(4);
        }
        let dev = Cpu::default();
        let err = if matches!(objective, ObjectiveSpec::GenMd4 { .. }) {
            Trainer::<Cpu, maskdiff_objective::GenMd4<Cpu>>::new(nc.clone(), cfg.clone(), 1, &dev)
                .err()
        } else {
            Trainer::<Cpu, Block<maskdiff_objective::GenMd4<Cpu>>>::new(
                nc.clone(),
                cfg.clone(),
                1,
                &dev,
            )
            .err()
        };
        let msg = err.expect("refused").to_string();
        assert!(msg.contains("GenMD4"), "{msg}");
        // [0, 1] is no clip, so GenMD4 accepts it
        let full = TrainConfig {
            mask_rate: Some(MaskRate::FULL),
            ..cfg
        };
        if matches!(objective, ObjectiveSpec::GenMd4 { .. }) {
            assert!(
                Trainer::<Cpu, maskdiff_objective::GenMd4<Cpu>>::new(nc, full, 1, &dev).is_ok()
            );
        }
    }
    // the search refuses GenMD4 too
    let g = maskdiff_objective::GenMd4::<Cpu>::new(
        v,
        maskdiff_objective::GenMd4Options::default(),
        false,
        &Cpu::default(),
    )
    .unwrap();
    let mut den = Uniform(v);
    let r = g.clip_variance(&mut den, &[vec![0; 4]], None, opts(1), clip(0.3, 0.8));
    assert!(matches!(r, Err(ObjectiveError::Unsupported(_))));
}

/// Predicts the uniform distribution everywhere, whatever the input.
struct Uniform(usize);

impl Denoiser for Uniform {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.0).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        false
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        let lp = -(self.0 as f32).ln();
        Ok(LogProbs {
            data: vec![lp; b.batch * b.len * self.0],
            batch: b.batch,
            len: b.len,
            vocab: self.0,
        })
    }
}

fn opts(k: usize) -> EvalOptions {
    EvalOptions {
        mc_samples: k,
        discrete_steps: None,
        batch_rows: 256,
        seed: 3,
    }
}

/// A uniform predictor: a block of B tokens at mask rate m has value (span/m)·K·ln V / B with
/// K ~ Binomial(B, m), so its mean is span·ln V for every interval and its variance
/// span²·ln²V/B · E_m[(1 − m)/m] = span·ln²V/(B(hi − lo)) · (ln(m_hi/m_lo) − (m_hi − m_lo)).
#[test]
fn search_statistic_matches_its_closed_form_for_a_uniform_predictor() {
    let (v, n) = (5usize, 8usize);
    let s = sched(AnySchedule::Linear(Linear));
    let (m0, m1) = (s.one_minus_alpha(0.0), s.one_minus_alpha(1.0));
    let span = m1 - m0;
    let seqs: Vec<Vec<u32>> = (0..10000)
        .map(|i| {
            batch(1, n, v)
                .iter()
                .map(|&x| (x + i as u32) % v as u32)
                .collect()
        })
        .collect();
    let md4 = Md4::new(s, TimeSampling::Antithetic, v);
    let lnv = (v as f64).ln();
    for c in [clip(0.3, 0.8), clip(0.1, 0.5)] {
        let r = Objective::<Cpu>::clip_variance(&md4, &mut Uniform(v), &seqs, None, opts(4), c)
            .unwrap();
        assert_eq!(r.values, 40000);
        let (lo, hi) = (m0 + span * c.lo(), m0 + span * c.hi());
        let var = span * lnv * lnv / (n as f64 * (c.hi() - c.lo())) * ((hi / lo).ln() - (hi - lo));
        let mean = span * lnv;
        // standard error of the mean from the variance; the sample variance within 6 %
        assert!(
            (r.mean_nats - mean).abs() < 4.0 * (var / 40000.0).sqrt(),
            "{r:?} vs {mean}"
        );
        assert!((r.variance / var - 1.0).abs() < 0.06, "{r:?} vs {var}");
    }
    // a narrower interval away from m = 0 has lower variance than the full range
    let full = Objective::<Cpu>::clip_variance(
        &md4,
        &mut Uniform(v),
        &seqs,
        None,
        opts(2),
        MaskRate::FULL,
    )
    .unwrap();
    let narrow = Objective::<Cpu>::clip_variance(
        &md4,
        &mut Uniform(v),
        &seqs,
        None,
        opts(2),
        clip(0.5, 1.0),
    )
    .unwrap();
    assert!(narrow.variance < full.variance);
}

/// The search's full-range row is the NELBO estimate with the same seeds, draw for draw: its
/// per-token mean times N is the estimate's diffusion term (blocks with per-block times, and MD4).
#[test]
fn full_range_search_row_is_the_nelbo_estimate() {
    let (v, n) = (4usize, 8usize);
    let s = sched(AnySchedule::Linear(Linear));
    let seqs: Vec<Vec<u32>> = (0..40)
        .map(|i| {
            batch(1, n, v)
                .iter()
                .map(|&x| (x + i as u32) % v as u32)
                .collect()
        })
        .collect();
    let md4 = Md4::new(s, TimeSampling::Antithetic, v);
    let m = block_common::net(v, None, false, 12, 0.5);
    let mut den = NetworkDenoiser::new(m);
    let r = Objective::<Cpu>::clip_variance(&md4, &mut den, &seqs, None, opts(3), MaskRate::FULL)
        .unwrap();
    let e = estimate::md4(&mut den, &s, &seqs, None, opts(3), &mut |_| {}).unwrap();
    assert!(
        (r.mean_nats * n as f64 - e.diffusion_nats).abs() < 1e-9 * e.diffusion_nats,
        "{r:?} {e:?}"
    );
    let bm = block_common::net(v, Some(2), false, 13, 0.5);
    let blk = Block::with_inner(md4, 2)
        .unwrap()
        .with_time(BlockTime::Block);
    let mut den = NetworkDenoiser::new(bm);
    let r = Objective::<Cpu>::clip_variance(&blk, &mut den, &seqs, None, opts(3), MaskRate::FULL)
        .unwrap();
    let e = Objective::<Cpu>::estimate(&blk, &mut den, &seqs, None, opts(3), &mut |_| {}).unwrap();
    assert_eq!(r.values, 40 * 3 * 4);
    assert!(
        (r.mean_nats * n as f64 - e.diffusion_nats).abs() < 1e-9 * e.diffusion_nats,
        "{r:?} {e:?}"
    );
}
