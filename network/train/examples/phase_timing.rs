//! Phase timing of one cpu-small training step (forward with tape, loss, backward, gradient
//! extraction, norm, AdamW, EMA, inference forward), a development aid for performance work:
//! `cargo run --release -p maskdiff-train --example phase_timing`.
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::NetworkConfig;
use maskdiff_objective::tensor::MaskedBatch;
use maskdiff_process::DenoiseBatch;
use maskdiff_schedule::{AnySchedule, Linear, Shifted};
use maskdiff_train::{ema_update, global_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

/// Big blocks on cache lines (AMX tile loads of the bf16 products; see the type).
#[global_allocator]
static ALLOC: maskdiff_network::CacheLineAlloc = maskdiff_network::CacheLineAlloc;

fn main() {
    // glibc allocator tuning for the training step's large buffers (opt-in)
    maskdiff_network::tune_allocator();
    maskdiff_network::tune_threads();
    let (v, n, b) = (27usize, 256usize, 16usize);
    let cfg = NetworkConfig::preset("cpu-small", v).unwrap();
    let dev = Cpu::default();
    let mut model = maskdiff_network::Network::from(cfg.init::<f32, Cpu>(&dev, 0).unwrap());
    let mut ema = model.clone();
    let mut opt = AdamW::new(
        AdamWConfig::default(),
        model.params().iter().map(|p| &p.value),
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
    let sched = Shifted::official(AnySchedule::Linear(Linear));
    for it in 0..4 {
        let mut tm = Vec::new();
        let mut s = Instant::now();
        let mut lap = |name: &'static str, s: &mut Instant| {
            tm.push((name, s.elapsed().as_secs_f64()));
            *s = Instant::now();
        };
        let mb = MaskedBatch::sample(&x0, b, n, v, &sched, Default::default(), &mut rng).unwrap();
        lap("mask", &mut s);
        let input = DenoiseBatch {
            ids: mb.xt(),
            batch: b,
            len: n,
            t: mb.t(),
            labels: None,
        };
        let logits = model.forward(&input, model.tape(), None).unwrap();
        lap("forward(tape)", &mut s);
        let loss = maskdiff_objective::tensor::md4_diffusion_loss(logits, &mb).unwrap();
        let l = loss.sum::<Rank0, _>() * (1.0 / b as f32);
        lap("loss", &mut s);
        let grads = l.backward();
        lap("backward", &mut s);
        let g: Vec<_> = model.params().iter().map(|p| grads.get(&p.value)).collect();
        drop(grads);
        lap("grads.get", &mut s);
        let _ = global_norm(&g).unwrap();
        lap("norm", &mut s);
        opt.update(
            model.params_mut().iter_mut().map(|p| &mut p.value),
            &g,
            1e-4,
            None,
        )
        .unwrap();
        lap("adamw", &mut s);
        ema_update(&mut ema, &model, 0.9999).unwrap();
        lap("ema", &mut s);
        let logits = model.forward(&input, NoneTape, None).unwrap();
        let _ = logits.as_vec();
        lap("forward(none)", &mut s);
        if it > 0 {
            println!(
                "{}",
                tm.iter()
                    .map(|(n, t)| format!("{n} {t:.3}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
}
