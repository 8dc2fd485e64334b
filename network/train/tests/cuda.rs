//! CPU vs CUDA agreement (only with `--features cuda`; skipped with a printed reason when no GPU
//! or driver is available): the same seeded model gives the same logits and the same first
//! training-step loss on both devices.

#[cfg(feature = "cuda")]
mod gpu {
    use maskdiff_network::dfdx::prelude::*;
    use maskdiff_network::dfdx::tensor::Cuda;
    use maskdiff_network::NetworkConfig;
    use maskdiff_process::DenoiseBatch;
    use maskdiff_train::{LrSchedule, TrainBatch, TrainConfig, Trainer};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn gpu() -> Option<Cuda> {
        match Cuda::try_build(0, 0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("SKIPPED: no usable CUDA device ({e:?})");
                None
            }
        }
    }

    #[test]
    fn cpu_and_cuda_agree() {
        let Some(cuda) = gpu() else { return };
        let cpu = Cpu::default();
        let mut cfg = NetworkConfig::preset("tiny", 7).unwrap();
        cfg.num_classes = 3;
        let mut m = cfg.init::<f32, Cpu>(&cpu, 5).unwrap();
        // make the zero-initialised layers non-zero so the comparison is not trivially 0 = 0
        let mut rng = StdRng::seed_from_u64(1);
        for p in m.params_mut() {
            let v: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.3..0.3)).collect();
            p.value = cpu.tensor_from_vec(v, (p.numel(),));
        }
        let g = m.to_device(&cuda).unwrap();
        let ids: Vec<u32> = (0..3 * 20).map(|_| rng.gen_range(0..=7)).collect();
        let b = DenoiseBatch {
            ids: &ids,
            batch: 3,
            len: 20,
            t: &[0.1, 0.5, 0.9],
            labels: Some(&[0, 2, 1]),
        };
        let a = m.forward(&b, NoneTape, None).unwrap().as_vec();
        let c = g.forward(&b, NoneTape, None).unwrap().as_vec();
        let max = a
            .iter()
            .zip(&c)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        // f32 with different reduction orders: logits are O(1)
        assert!(max < 1e-4, "max |cpu - cuda| = {max}");

        let tc = TrainConfig {
            lr: LrSchedule::cosine(1e-3, 0, 10),
            ..Default::default()
        };
        let x0: Vec<u32> = (0..4 * 16).map(|_| rng.gen_range(0..7)).collect();
        let labels = [0u32, 1, 2, 0];
        let tb = TrainBatch {
            x0: &x0,
            batch: 4,
            len: 16,
            labels: Some(&labels),
        };
        let mut tcpu =
            Trainer::<_, maskdiff_objective::Md4>::new(cfg.clone(), tc.clone(), 9, &cpu).unwrap();
        let mut tgpu = Trainer::<_, maskdiff_objective::Md4>::new(cfg, tc, 9, &cuda).unwrap();
        for _ in 0..3 {
            let (x, y) = (tcpu.step(&tb).unwrap(), tgpu.step(&tb).unwrap());
            assert!(
                (x.loss - y.loss).abs() < 1e-3 * x.loss.abs().max(1.0),
                "{x:?} vs {y:?}"
            );
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_agreement_needs_the_cuda_feature() {
    eprintln!("SKIPPED: built without --features cuda; CPU/CUDA agreement not checked");
}
