//! The NCCL collective on a GPU (only with `--features nccl`; skipped with a printed reason
//! where no CUDA device or NCCL library is usable, and failed instead where
//! `MASKDIFF_REQUIRE_GPU=1`, as `bench/gpu.sh run` sets): with one rank, a trainer stepping
//! over NCCL — gradients all-reduced on the device — ends bit for bit where the single-GPU
//! trainer ends (cpu-small model, MD4, 2 micro-batches); and the byte collectives give back
//! what one rank put in.

#[cfg(feature = "nccl")]
mod gpu {
    use maskdiff_network::dfdx::prelude::*;
    use maskdiff_network::dfdx::tensor::Cuda;
    use maskdiff_network::NetworkConfig;
    use maskdiff_objective::Md4;
    use maskdiff_train::{
        AdamWConfig, Collective, Launch, LrSchedule, Nccl, SingleProcess, TrainBatch, TrainConfig,
        Trainer,
    };
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::time::Duration;

    fn skip(what: &str, why: String) -> Option<(Cuda, Nccl)> {
        if std::env::var("MASKDIFF_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("MASKDIFF_REQUIRE_GPU=1 but {what}: {why}");
        }
        eprintln!("SKIPPED: {what}: {why}");
        None
    }

    /// A CUDA device and a one-rank NCCL communicator (id through a file rendezvous).
    fn setup(test: &str) -> Option<(Cuda, Nccl)> {
        let dev = match Cuda::try_build(0, 0) {
            Ok(d) => d,
            Err(e) => return skip("no usable CUDA device", format!("{e:?}")),
        };
        let dir = std::env::temp_dir().join(format!("maskdiff-nccl-{test}-{}", std::process::id()));
        let nccl = match Nccl::init_file(&Launch::single(), &dir, Duration::from_secs(30)) {
            Ok(n) => n,
            Err(e) => return skip("NCCL unusable", e.to_string()),
        };
        // Rank 0 removes the rendezvous file once every rank has joined.
        assert!(!dir.join(maskdiff_train::launch::RENDEZVOUS_FILE).exists());
        let _ = std::fs::remove_dir_all(&dir);
        Some((dev, nccl))
    }

    #[test]
    fn one_rank_nccl_step_is_the_single_gpu_step() {
        let Some((dev, nccl)) = setup("step") else {
            return;
        };
        assert_eq!((nccl.rank(), nccl.size(), nccl.ordinal()), (0, 1, 0));
        let (v, b, n) = (27usize, 4usize, 64usize);
        let net = NetworkConfig::preset("cpu-small", v).unwrap();
        let tc = TrainConfig {
            lr: LrSchedule::cosine(1e-3, 1, 10),
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            micro_batches: 2,
            ..Default::default()
        };
        let mut single = Trainer::<_, Md4>::new(net.clone(), tc.clone(), 7, &dev).unwrap();
        let mut over = Trainer::<_, Md4>::new(net, tc, 7, &dev).unwrap();
        over.broadcast_state(&nccl).unwrap();
        let params: usize = over.model().params().iter().map(|p| p.numel()).sum();
        let mut rng = StdRng::seed_from_u64(3);
        let steps = 3u64;
        for _ in 0..steps {
            let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
            let batch = TrainBatch {
                x0: &x0,
                batch: b,
                len: n,
                labels: None,
            };
            let x = single.step_on(&batch, &SingleProcess).unwrap();
            let y = over.step_on(&batch, &nccl).unwrap();
            assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "{x:?} vs {y:?}");
            assert_eq!(
                x.grad_norm.to_bits(),
                y.grad_norm.to_bits(),
                "{x:?} vs {y:?}"
            );
        }
        assert_eq!(
            single.state_fingerprint().unwrap(),
            over.state_fingerprint().unwrap()
        );
        over.check_in_sync(&nccl).unwrap();
        // The gradients went through the device all-reduce: one per step, every network
        // parameter (and the objective's, none for MD4) once.
        let s = nccl.comm_stats();
        assert_eq!(s.all_reduces, steps);
        assert_eq!(s.all_reduce_bytes, steps * params as u64 * 4);
    }

    #[test]
    fn one_rank_collectives_give_back_the_input() {
        let Some((dev, nccl)) = setup("bytes") else {
            return;
        };
        let mut b: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let want = b.clone();
        nccl.broadcast(&mut b).unwrap();
        assert_eq!(b, want);
        assert_eq!(
            nccl.all_gather(&want[..7]).unwrap(),
            vec![want[..7].to_vec()]
        );
        nccl.barrier().unwrap();
        let mut f = vec![1.5f32, -0.0, 3e-38, f32::MAX];
        let fw = f.clone();
        nccl.all_reduce_sum(&mut f).unwrap();
        assert_eq!(f, fw);
        let mut g: Vec<Tensor<(usize,), f32, Cuda>> = vec![
            dev.tensor_from_vec(vec![0.25f32, -7.0, 1e-30], (3,)),
            dev.tensor_from_vec(vec![2.0f32; 5], (5,)),
        ];
        let gw: Vec<Vec<f32>> = g.iter().map(|t| t.as_vec()).collect();
        nccl.all_reduce_device(&mut g).unwrap().unwrap();
        assert_eq!(g.iter().map(|t| t.as_vec()).collect::<Vec<_>>(), gw);
        // Not this engine's device type: the trainer's host path.
        let mut cpu: Vec<Tensor<(usize,), f32, Cpu>> = Vec::new();
        assert!(nccl.all_reduce_device(&mut cpu).is_none());
    }
}
