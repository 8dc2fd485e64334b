//! Data-parallel training over MPI: `mpirun -np 2` ranks (single-threaded) train a tiny model
//! and end bit for bit where one process with 2 micro-batches of gradient accumulation ends
//! (MD4, and GenMD4 with dropout: learned objective parameters and per-micro-batch dropout
//! streams). Rank 1 starts from another seed, so the equality also shows that rank 0's initial
//! state was broadcast.
//!
//! The test binary launches itself: the parent (no MPI environment) runs `mpirun -np 2` and,
//! as the reference, one plain process, on this same test; each writes the final state's
//! fingerprint and every step's numbers to a file, and the parent compares them.
//! Needs the `mpi` feature and `mpirun` on the PATH; otherwise it prints why it is skipped,
//! and fails instead where `MASKDIFF_REQUIRE_MPI=1` (CI).

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::NetworkConfig;
use maskdiff_objective::{GenMd4, Md4, Objective, ObjectiveSpec};
use maskdiff_train::{
    AdamWConfig, Collective, LrSchedule, SingleProcess, TrainBatch, TrainConfig, Trainer,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a child writes its result (set by the parent).
const OUT_VAR: &str = "MASKDIFF_MPI_TEST_OUT";
const STEPS: u64 = 4;

fn train_cfg(objective: ObjectiveSpec) -> TrainConfig {
    TrainConfig {
        objective,
        lr: LrSchedule::cosine(1e-2, 1, STEPS),
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        micro_batches: 2,
        ema_decay: 0.9,
        ..Default::default()
    }
}

fn net_cfg(vocab: usize) -> NetworkConfig {
    let mut c = NetworkConfig::preset("tiny", vocab).unwrap();
    c.dropout = 0.1;
    c
}

/// STEPS steps on fixed random batches over `comm`; one line per step (the reported numbers'
/// bits) and the final state's fingerprint.
fn train<O: Objective<Cpu>>(spec: ObjectiveSpec, comm: &dyn Collective) -> String {
    let dev = Cpu::default();
    let (v, b, n) = (6usize, 4usize, 16usize);
    // Rank 1 starts elsewhere: broadcast_state must make it rank 0's.
    let seed = 11 + comm.rank() as u64;
    let mut t = Trainer::<_, O>::new(net_cfg(v), train_cfg(spec), seed, &dev).unwrap();
    t.broadcast_state(comm).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut out = String::new();
    for _ in 0..STEPS {
        let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
        let s = t
            .step_on(
                &TrainBatch {
                    x0: &x0,
                    batch: b,
                    len: n,
                    labels: None,
                },
                comm,
            )
            .unwrap();
        out += &format!(
            "step {} loss {:016x} grad_norm {:016x} masked {:016x}\n",
            s.step,
            s.loss.to_bits(),
            s.grad_norm.to_bits(),
            s.masked_fraction.to_bits()
        );
    }
    t.check_in_sync(comm).unwrap();
    out += &format!("state {:016x}\n", t.state_fingerprint().unwrap());
    out
}

fn both_objectives(comm: &dyn Collective) -> String {
    train::<Md4>(ObjectiveSpec::Md4, comm)
        + &train::<GenMd4<Cpu>>(ObjectiveSpec::GenMd4 { one_sample: false }, comm)
}

/// `Some(reason)` when the MPI test cannot run here.
fn skip_reason() -> Option<String> {
    if !cfg!(feature = "mpi") {
        return Some("built without the `mpi` feature (cargo test --features mpi)".into());
    }
    match Command::new("mpirun").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(
            "no working `mpirun` on the PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)"
                .into(),
        ),
    }
}

fn skip_or_fail(reason: &str) {
    if std::env::var("MASKDIFF_REQUIRE_MPI").as_deref() == Ok("1") {
        panic!("MASKDIFF_REQUIRE_MPI=1 but the MPI test cannot run: {reason}");
    }
    eprintln!("SKIPPED two_ranks_match_two_micro_batches: {reason}");
}

fn child(exe: &Path, out: &Path, mpi_ranks: Option<usize>) -> String {
    let test = [
        "two_ranks_match_two_micro_batches",
        "--exact",
        "--nocapture",
    ];
    let mut cmd = match mpi_ranks {
        Some(np) => {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
                .arg(np.to_string())
                .args(["-x", OUT_VAR, "-x", "RAYON_NUM_THREADS"])
                .arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args(test)
        .env(OUT_VAR, out)
        .env("RAYON_NUM_THREADS", "1");
    let o = cmd.output().expect("the test binary runs");
    assert!(
        o.status.success(),
        "{:?} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        mpi_ranks,
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(out).expect("rank 0 wrote its result")
}

#[test]
fn two_ranks_match_two_micro_batches() {
    if let Some(out) = std::env::var_os(OUT_VAR) {
        // A child: one rank of `mpirun -np 2`, or the single-process reference.
        let out = PathBuf::from(out);
        #[cfg(feature = "mpi")]
        if maskdiff_train::launched_by_mpi() {
            let comm = maskdiff_train::Mpi::init().unwrap();
            assert_eq!(comm.size(), 2, "launch with mpirun -np 2");
            let r = both_objectives(&comm);
            if comm.rank() == 0 {
                std::fs::write(&out, r).unwrap();
            }
            return;
        }
        std::fs::write(&out, both_objectives(&SingleProcess)).unwrap();
        return;
    }
    if let Some(reason) = skip_reason() {
        skip_or_fail(&reason);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir().join(format!("maskdiff-mpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let single = child(&exe, &dir.join("single.txt"), None);
    let ranks = child(&exe, &dir.join("ranks.txt"), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(single.lines().count() as u64, 2 * (STEPS + 1), "{single}");
    // Bit for bit: every step's loss, gradient norm and masked fraction, and the whole final
    // state (parameters, EMA, AdamW moments, GenMD4's exponents).
    assert_eq!(ranks, single, "2 ranks vs 1 process with 2 micro-batches");
}
