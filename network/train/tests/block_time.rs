//! Block diffusion with one t per block (BD3-LM's estimator, `BlockTime::Block`) and the
//! finite-step (T-step) block NELBO. Per-block times: with one block (B = N) the loss is MD4's on
//! the same x_t and t; with several blocks every position is weighted with its own block's
//! −α'_t/(1 − α_t) (checked against a hand-written sum over positions); the antithetic grid puts
//! exactly one draw in each of the batch × blocks strata of [0, 1) and each draw is marginally
//! uniform; the per-block NELBO (training path and `eval`'s estimator) is unbiased against the
//! exact value by enumeration; a time-conditioned network and GenMD4 inside are refused with
//! their errors. T-step: B = N is MD4's T-step estimate; the estimate is unbiased against the
//! exact L_T by enumeration (per-sequence and per-block steps); for a toy block denoiser whose
//! predictions only improve with more context, the exact L_T is ≥ the continuous NELBO, falls
//! as T doubles and reaches it.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig, NetworkDenoiser};
use maskdiff_objective::tensor::{block_grid, block_times, MaskedBatch};
use maskdiff_objective::{
    block_estimate, block_input, estimate, Block, BlockTime, CleanBatch, EvalOptions, GenMd4,
    GenMd4Options, InnerSpec, Md4, Objective, ObjectiveError, ObjectiveSpec, Share,
};
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_schedule::{AnySchedule, Linear, MaskingSchedule, ScheduleSpec, TimeSampling};
use maskdiff_train::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod block_common;
use block_common::{assert_eval_nelbo_unbiased, masked, nll, pattern_log_mu, simpson, with_block};

fn schedule() -> maskdiff_schedule::Shifted<AnySchedule> {
    ScheduleSpec::official(AnySchedule::Linear(Linear))
        .build()
        .unwrap()
}

fn net(v: usize, block: Option<usize>, time: bool, seed: u64) -> Md4Transformer<f32, Cpu> {
    block_common::net(v, block, time, seed, 0.5)
}

fn per_block(v: usize, block: usize) -> Block {
    Block::new(schedule(), TimeSampling::Antithetic, v, block)
        .unwrap()
        .with_time(BlockTime::Block)
}

fn loss(o: &Block, m: &Md4Transformer<f32, Cpu>, mb: &MaskedBatch) -> Result<f64, TrainError> {
    let share = Share {
        lo: 0,
        hi: mb.batch(),
        total: mb.batch(),
    };
    let l = o.loss(&ModelNet(m), mb, None, share, &mut StdRng::seed_from_u64(0))?;
    Ok(l.scalar.array() as f64)
}

fn opts(k: usize, steps: Option<usize>, seed: u64) -> EvalOptions {
    EvalOptions {
        mc_samples: k,
        discrete_steps: steps,
        batch_rows: 512,
        seed,
    }
}

#[test]
fn per_block_time_with_one_block_is_md4_and_weights_each_block() {
    let (v, n, b) = (7, 12, 5);
    let s = schedule();
    let plain = net(v, None, false, 3);
    let mut rng = StdRng::seed_from_u64(9);
    let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
    let clean = CleanBatch::new(&x0, b, n, v, None).unwrap();

    // B = N: one block, one t per sequence; MD4's loss on the same x_t and t
    let blk = per_block(v, n);
    let mb = Objective::<Cpu>::noise(&blk, &clean, &mut rng).unwrap();
    assert_eq!(mb.t().len(), b);
    let same = MaskedBatch::new(
        x0.clone(),
        mb.xt().to_vec(),
        b,
        n,
        v,
        mb.t().to_vec(),
        mb.t().iter().map(|&t| -s.weight(t)).collect(),
    )
    .unwrap();
    let md4 = Md4::new(s, TimeSampling::Antithetic, v);
    let share = Share {
        lo: 0,
        hi: b,
        total: b,
    };
    let a = Objective::<Cpu>::loss(
        &md4,
        &ModelNet(&plain),
        &same,
        None,
        share,
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap()
    .scalar
    .array() as f64;
    let c = loss(&blk, &with_block(&plain, Some(n)), &mb).unwrap();
    assert!(a > 1.0, "a non-trivial loss {a}");
    assert!((a - c).abs() < 1e-5 * a, "MD4 {a} vs per-block B = N {c}");

    // B = 4 (blocks 4, 4, 4): each block has its own t, mask rate and weight; the loss is
    // (1/b) Σ_rows Σ_{masked n} w_{block(n)} · (−log μ_n[x_0^n]) of the block network's logits.
    let bs = 4;
    let blk = per_block(v, bs);
    let m4 = with_block(&plain, Some(bs));
    let mb = Objective::<Cpu>::noise(&blk, &clean, &mut rng).unwrap();
    assert_eq!(mb.t().len(), b * 3);
    assert!(mb.t().windows(2).any(|w| w[0] != w[1]));
    let ids = block_input(mb.xt(), &x0, b, n);
    let logits = m4
        .forward(
            &DenoiseBatch {
                ids: &ids,
                batch: b,
                len: 2 * n,
                t: &vec![0.5; b],
                labels: None,
            },
            NoneTape,
            None,
        )
        .unwrap()
        .as_vec();
    let mut want = 0.0;
    for r in 0..b {
        for p in 0..n {
            let i = r * n + p;
            if mb.xt()[i] == v as u32 {
                let t = mb.t()[r * 3 + p / bs];
                want += -s.weight(t) * nll(&logits[i * v..(i + 1) * v], x0[i] as usize);
            }
        }
    }
    want /= b as f64;
    let got = loss(&blk, &m4, &mb).unwrap();
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    // slicing a per-block batch keeps each row's times
    let half = maskdiff_objective::Noised::slice(&mb, 2, 4).unwrap();
    assert_eq!(half.t(), &mb.t()[6..12]);
    assert_eq!(half.weight(), &mb.weight()[6..12]);
}

#[test]
fn antithetic_block_times_cover_the_unit_interval_once_per_stratum() {
    for (batch, blocks) in [(1, 1), (1, 5), (3, 4), (8, 64)] {
        let m = batch * blocks;
        for u in [0.0, 0.37, 0.999] {
            let g = block_grid(u, batch, blocks);
            assert_eq!(g.len(), m);
            // row r, block j holds (u + (j·batch + r)/M) mod 1
            for r in 0..batch {
                for j in 0..blocks {
                    let want = (u + (j * batch + r) as f64 / m as f64).fract();
                    assert!((g[r * blocks + j] - want).abs() < 1e-12);
                }
            }
            // exactly one draw in each [k/M, (k+1)/M)
            let mut hits = vec![0usize; m];
            for &t in &g {
                assert!((0.0..1.0).contains(&t));
                hits[((t * m as f64) as usize).min(m - 1)] += 1;
            }
            assert!(hits.iter().all(|&h| h == 1), "{batch}×{blocks}, u = {u}");
        }
    }
    // each draw is marginally U[0, 1): 4 bins, 4000 draws of a 3 × 4 grid
    let mut rng = StdRng::seed_from_u64(1);
    let mut bins = vec![[0usize; 4]; 12];
    for _ in 0..4000 {
        for (k, t) in block_times(TimeSampling::Antithetic, 3, 4, &mut rng)
            .into_iter()
            .enumerate()
        {
            bins[k][(t * 4.0) as usize] += 1;
        }
    }
    let sd = (4000.0f64 * 0.25 * 0.75).sqrt();
    for b in &bins {
        assert!(
            b.iter().all(|&c| (c as f64 - 1000.0).abs() < 5.0 * sd),
            "{b:?}"
        );
    }
    // the training batch uses the grid: the per-block times of a batch hit every stratum once
    let x0 = vec![1u32; 6 * 10];
    let mb = MaskedBatch::sample_in_blocks(
        &x0,
        6,
        10,
        3,
        4, // blocks 4, 4, 2
        &schedule(),
        TimeSampling::Antithetic,
        None,
        &mut rng,
    )
    .unwrap();
    let mut hits = [0usize; 18];
    for &t in mb.t() {
        hits[(t * 18.0) as usize] += 1;
    }
    assert!(hits.iter().all(|&h| h == 1), "{:?}", mb.t());
}

/// The exact continuous-time block NELBO (diffusion part) of a time-free block network, block by
/// block: Σ_b Σ_{S_b} C_b(S_b) ∫_{α_1}^{α_0} (1 − a)^{|S_b|−1} a^{|b|−|S_b|} da, with C_b(S_b) the
/// cross-entropy of block b's masked positions when only S_b is masked.
fn exact_per_block(
    log_mu: &[Vec<Vec<f64>>],
    x0: &[u32],
    bs: usize,
    coef: impl Fn(i32, i32) -> f64,
) -> f64 {
    let n = x0.len();
    let mut total = 0.0;
    for start in (0..n).step_by(bs) {
        let end = (start + bs).min(n);
        let size = (end - start) as i32;
        for sub in 1usize..(1 << (end - start)) {
            let pattern = sub << start;
            let c: f64 = (start..end)
                .filter(|&i| pattern >> i & 1 == 1)
                .map(|i| -log_mu[pattern][i][x0[i] as usize])
                .sum();
            total += c * coef(sub.count_ones() as i32, size);
        }
    }
    total
}

fn continuous_coef(s: &impl MaskingSchedule<f64>) -> impl Fn(i32, i32) -> f64 + '_ {
    move |k, size| {
        simpson(
            |a| (1.0 - a).powi(k - 1) * a.powi(size - k),
            s.alpha(1.0),
            s.alpha(0.0),
            400,
        )
    }
}

/// T-step: Σ_{i=1}^T (α_{s_i} − α_{t_i}) (1 − α_{t_i})^{k−1} α_{t_i}^{size−k}, t_i = i/T, s_i = t_i − 1/T
/// (the coefficient (α_s − α_t)/(1 − α_t) times P(S | t) = (1 − α_t)^k α_t^{size−k}).
fn discrete_coef(s: &impl MaskingSchedule<f64>, steps: usize) -> impl Fn(i32, i32) -> f64 + '_ {
    move |k, size| {
        (1..=steps)
            .map(|i| {
                let (t, r) = (i as f64 / steps as f64, (i - 1) as f64 / steps as f64);
                let (at, ar) = (s.alpha(t), s.alpha(r));
                (ar - at) * (1.0 - at).powi(k - 1) * at.powi(size - k)
            })
            .sum()
    }
}

#[test]
fn per_block_nelbo_is_unbiased_against_enumeration() {
    let (v, n, bs) = (3usize, 4usize, 2usize);
    let s = schedule();
    let m = net(v, Some(bs), false, 21);
    let x0: Vec<u32> = vec![2, 0, 1, 1];
    let log_mu = pattern_log_mu(&m, &x0, v);
    let exact = exact_per_block(&log_mu, &x0, bs, continuous_coef(&s));
    // the same value over whole-sequence patterns (each block's prediction sees only its x_t)
    let shared: f64 = (1usize..1 << n)
        .map(|p| {
            let c: f64 = (0..n)
                .filter(|&i| p >> i & 1 == 1)
                .map(|i| -log_mu[p][i][x0[i] as usize])
                .sum();
            c * continuous_coef(&s)(p.count_ones() as i32, n as i32)
        })
        .sum();
    assert!((exact - shared).abs() < 1e-6 * exact, "{exact} vs {shared}");
    let blk = per_block(v, bs);
    let recon = blk.recon(n);
    // (a) the training/validation path: per-block antithetic times over the copies
    assert_eval_nelbo_unbiased(&blk, &m, &x0, v, recon, exact);
    // (b) `eval`'s estimator with per-block times
    let seqs = vec![x0.clone(); 3000];
    let mut den = NetworkDenoiser::new(m.clone());
    let r = Objective::<Cpu>::estimate(&blk, &mut den, &seqs, None, opts(2, None, 3), &mut |_| {})
        .unwrap();
    assert!(
        (r.diffusion_nats - exact).abs() < 4.0 * r.stderr_nats,
        "{r:?} vs exact {exact}"
    );
}

#[test]
fn per_block_times_refuse_time_conditioned_networks_and_genmd4() {
    let v = 6;
    let spec = |inner| ObjectiveSpec::Block {
        block_size: 4,
        inner,
        time: BlockTime::Block,
    };
    let cfg = |time: bool| {
        let mut c = NetworkConfig::preset("tiny", v).unwrap();
        c.block_size = Some(4);
        c.time_conditioning = time;
        c
    };
    let train = |inner| TrainConfig {
        objective: spec(inner),
        lr: LrSchedule::constant(3e-3, 0),
        ema_decay: 0.0,
        ..Default::default()
    };
    let dev = Cpu::default();
    let r = Trainer::<Cpu, Block>::new(cfg(true), train(InnerSpec::Md4), 1, &dev);
    assert!(matches!(
        r,
        Err(TrainError::Objective(
            ObjectiveError::PerBlockTimeNeedsTimeFree
        ))
    ));
    let r = Trainer::<Cpu, Block<GenMd4<Cpu>>>::new(
        cfg(false),
        train(InnerSpec::GenMd4 { one_sample: false }),
        1,
        &dev,
    );
    assert!(matches!(
        r,
        Err(TrainError::Objective(ObjectiveError::Unsupported(_)))
    ));
    // the loss and the estimator refuse a time-conditioned network too
    let blk = per_block(v, 4);
    let x0: Vec<u32> = (0..16).map(|i| (i % v) as u32).collect();
    let clean = CleanBatch::new(&x0, 2, 8, v, None).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let mb = Objective::<Cpu>::noise(&blk, &clean, &mut rng).unwrap();
    let timed = net(v, Some(4), true, 5);
    assert!(matches!(
        loss(&blk, &timed, &mb),
        Err(TrainError::Objective(
            ObjectiveError::PerBlockTimeNeedsTimeFree
        ))
    ));
    let seqs = vec![x0[..8].to_vec(); 4];
    let mut den = NetworkDenoiser::new(timed);
    assert_eq!(
        Objective::<Cpu>::estimate(&blk, &mut den, &seqs, None, opts(1, None, 1), &mut |_| {}),
        Err(ObjectiveError::PerBlockTimeNeedsTimeFree)
    );
    // GenMD4 inside with per-block times: a clear error from the library too
    let g = GenMd4::new(v, GenMd4Options::default(), false, &dev).unwrap();
    let gb = Block::with_inner(g, 4).unwrap().with_time(BlockTime::Block);
    assert!(matches!(
        gb.noise(&clean, &mut rng),
        Err(ObjectiveError::Unsupported(_))
    ));

    // with a time-free network the trainer learns with per-block times
    let mut tr = Trainer::<Cpu, Block>::new(cfg(false), train(InnerSpec::Md4), 1, &dev).unwrap();
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
    assert!(
        last.loss.is_finite() && last.loss < 0.5 * first.loss,
        "{} -> {}",
        first.loss,
        last.loss
    );
}

#[test]
fn t_step_block_nelbo_with_one_block_is_md4s() {
    let (v, n) = (6, 10);
    let mut rng = StdRng::seed_from_u64(4);
    let seqs: Vec<Vec<u32>> = (0..40)
        .map(|_| (0..n).map(|_| rng.gen_range(0..v as u32)).collect())
        .collect();
    let s = schedule();
    for (time, block_time) in [
        (true, BlockTime::Sequence),
        (false, BlockTime::Sequence),
        (false, BlockTime::Block),
    ] {
        let plain = net(v, None, time, 7);
        for steps in [Some(1), Some(8), None] {
            let o = opts(3, steps, 11);
            let mut a = NetworkDenoiser::new(plain.clone());
            let md4 = estimate::md4(&mut a, &s, &seqs, None, o, &mut |_| {}).unwrap();
            let mut b = NetworkDenoiser::new(with_block(&plain, Some(n)));
            let blk =
                block_estimate(&mut b, &s, &seqs, None, o, n, block_time, &mut |_| {}).unwrap();
            assert!(md4.diffusion_nats > 1.0);
            assert!(
                (md4.diffusion_nats - blk.diffusion_nats).abs() < 1e-5 * md4.diffusion_nats,
                "{steps:?} {block_time:?}: MD4 {md4:?} vs block {blk:?}"
            );
            assert!((md4.stderr_nats - blk.stderr_nats).abs() < 1e-4 * md4.stderr_nats);
            assert_eq!(blk.discrete_steps, steps);
        }
    }
}

#[test]
fn t_step_block_nelbo_is_unbiased_against_enumeration() {
    let (v, n, bs) = (3usize, 4usize, 2usize);
    let s = schedule();
    let x0: Vec<u32> = vec![2, 0, 1, 1];
    for (time, block_time) in [(true, BlockTime::Sequence), (false, BlockTime::Block)] {
        // a time-conditioned network is read at t_i: enumerate per step for it
        let m = net(v, Some(bs), time, 21);
        let steps = 3;
        let exact = if time {
            (1..=steps)
                .map(|i| {
                    let (t, r) = (i as f64 / steps as f64, (i - 1) as f64 / steps as f64);
                    let (at, ar) = (s.alpha(t), s.alpha(r));
                    (1usize..1 << n)
                        .map(|p| {
                            let xt = masked(&x0, p, v);
                            let ids = block_input(&xt, &x0, 1, n);
                            let logits = m
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
                            let k = p.count_ones() as i32;
                            let c: f64 = (0..n)
                                .filter(|&j| p >> j & 1 == 1)
                                .map(|j| nll(&logits[j * v..(j + 1) * v], x0[j] as usize))
                                .sum();
                            (ar - at) * (1.0 - at).powi(k - 1) * at.powi(n as i32 - k) * c
                        })
                        .sum::<f64>()
                })
                .sum::<f64>()
        } else {
            exact_per_block(
                &pattern_log_mu(&m, &x0, v),
                &x0,
                bs,
                discrete_coef(&s, steps),
            )
        };
        let seqs = vec![x0.clone(); 4000];
        let mut den = NetworkDenoiser::new(m);
        let r = block_estimate(
            &mut den,
            &s,
            &seqs,
            None,
            opts(2, Some(steps), 5),
            bs,
            block_time,
            &mut |_| {},
        )
        .unwrap();
        assert!(
            r.stderr_nats > 0.0 && (r.diffusion_nats - exact).abs() < 4.0 * r.stderr_nats,
            "{block_time:?}: {r:?} vs exact {exact}"
        );
    }
}

/// A time-free block denoiser on data where x_{n+1} = x_n + 1 mod V: a masked position is
/// predicted from its left neighbour if that is visible (its block's x_t, or the clean prefix),
/// else from its right neighbour in the block, else uniformly — so a prediction only improves
/// when more is visible, which makes the T-step bound a Riemann sum from above of the
/// continuous one.
struct NextToken(usize);

impl Denoiser for NextToken {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.0).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        false
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        let (v, n) = (self.0, b.len / 2);
        let bs = 2; // the block size it was "trained" with
        let mut data = Vec::with_capacity(b.batch * n * v);
        for row in b.ids.chunks(b.len) {
            let (xt, x0) = row.split_at(n);
            for p in 0..n {
                let start = p / bs * bs;
                let end = (start + bs).min(n);
                // what position q holds as seen from p's block: clean before it, x_t inside
                let seen = |q: usize| -> Option<u32> {
                    if q < start {
                        Some(x0[q])
                    } else if q < end && xt[q] != v as u32 {
                        Some(xt[q])
                    } else {
                        None
                    }
                };
                let guess = match (p.checked_sub(1).and_then(seen), seen(p + 1)) {
                    (Some(l), _) => Some((l as usize + 1) % v),
                    (None, Some(r)) => Some((r as usize + v - 1) % v),
                    _ => None,
                };
                for k in 0..v {
                    let prob = match guess {
                        Some(g) if g == k => 0.9,
                        Some(_) => 0.1 / (v - 1) as f64,
                        None => 1.0 / v as f64,
                    };
                    data.push(prob.ln() as f32);
                }
            }
        }
        Ok(LogProbs {
            data,
            batch: b.batch,
            len: n,
            vocab: v,
        })
    }
}

#[test]
fn t_step_bound_is_above_the_continuous_one_and_converges_to_it() {
    let (v, n, bs) = (3usize, 6usize, 2usize);
    let s = schedule();
    let x0: Vec<u32> = (0..n).map(|i| (i % v) as u32).collect();
    // log μ of every pattern from the toy denoiser, one call each
    let mut den = NextToken(v);
    let log_mu: Vec<Vec<Vec<f64>>> = (0..1usize << n)
        .map(|p| {
            let ids = block_input(&masked(&x0, p, v), &x0, 1, n);
            let lp = den
                .log_probs(&DenoiseBatch {
                    ids: &ids,
                    batch: 1,
                    len: 2 * n,
                    t: &[0.5],
                    labels: None,
                })
                .unwrap();
            (0..n)
                .map(|i| lp.row(0, i).iter().map(|&x| x as f64).collect())
                .collect()
        })
        .collect();
    let continuous = exact_per_block(&log_mu, &x0, bs, continuous_coef(&s));
    let mut prev = f64::INFINITY;
    let mut bounds = Vec::new();
    for steps in [1usize, 2, 4, 8, 16, 64, 256, 1024] {
        let lt = exact_per_block(&log_mu, &x0, bs, discrete_coef(&s, steps));
        assert!(lt >= continuous - 1e-9, "T = {steps}: {lt} < {continuous}");
        assert!(lt <= prev + 1e-12, "T = {steps}: {lt} > {prev}");
        prev = lt;
        bounds.push(lt);
    }
    let gap1 = bounds[0] - continuous;
    let gap = bounds.last().unwrap() - continuous;
    assert!(gap1 > 0.05, "a visible gap at T = 1: {gap1}");
    assert!(gap < 2e-3 * gap1, "T = 1024 gap {gap} vs T = 1 gap {gap1}");
    // the Monte-Carlo estimates agree with the exact values (T = 4 and continuous), with
    // per-sequence and per-block times
    let seqs = vec![x0.clone(); 3000];
    for block_time in [BlockTime::Sequence, BlockTime::Block] {
        for (steps, exact) in [(Some(4), bounds[2]), (None, continuous)] {
            let r = block_estimate(
                &mut den,
                &s,
                &seqs,
                None,
                opts(2, steps, 9),
                bs,
                block_time,
                &mut |_| {},
            )
            .unwrap();
            assert!(
                (r.diffusion_nats - exact).abs() < 4.0 * r.stderr_nats,
                "{block_time:?} {steps:?}: {r:?} vs exact {exact}"
            );
        }
    }
}
