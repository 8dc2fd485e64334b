//! How a data-parallel job was launched (issue 17): this process's rank, the number of ranks and
//! its rank on its node (which GPU it drives), read from the variables that torchrun
//! (`RANK`/`WORLD_SIZE`/`LOCAL_RANK`), OpenMPI's mpirun (`OMPI_COMM_WORLD_RANK`/`_SIZE`/
//! `_LOCAL_RANK`) or Slurm's srun (`SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`) set; and the
//! file rendezvous by which rank 0 hands the NCCL unique id to the other ranks
//! (`<out_dir>/nccl-id`, written atomically, tagged with the job's id so that a file left by an
//! earlier job is never taken for this one's).
//!
//! Nothing here needs a GPU or an MPI library: the NCCL collective (`nccl` feature) and the CLI
//! build on it.

use crate::TrainError;
use std::path::Path;
use std::time::{Duration, Instant};

/// Which launcher's variables described the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    None,
    /// torchrun / torch.distributed.run (also any launcher that sets `RANK` and `WORLD_SIZE`).
    Torchrun,
    /// OpenMPI's mpirun/mpiexec.
    OpenMpi,
    /// Slurm's srun.
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    /// `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank on this node: the CUDA device ordinal this rank uses.
    pub local_rank: usize,
    /// The job's identity as far as the launcher tells it (empty where it does not): tags the
    /// rendezvous file.
    pub job: String,
}

/// (rank, world, local rank) variable names and the variables naming the job, per launcher,
/// in the order they are tried: torchrun's generic names first (they are what a user sets by
/// hand), then OpenMPI's, then Slurm's (an srun-started mpirun sets both of the latter; its
/// OMPI numbers are the job's).
const LAUNCHERS: [(Launcher, [&str; 3], &[&str]); 3] = [
    (
        Launcher::Torchrun,
        ["RANK", "WORLD_SIZE", "LOCAL_RANK"],
        &["TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"],
    ),
    (
        Launcher::OpenMpi,
        [
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ],
        &[
            "OMPI_MCA_ess_base_jobid",
            "OMPI_MCA_orte_ess_jobid",
            "PMIX_NAMESPACE",
        ],
    ),
    (
        Launcher::Slurm,
        ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
        &["SLURM_JOB_ID", "SLURM_STEP_ID"],
    ),
];

fn parse(var: &str, value: &str) -> Result<usize, TrainError> {
    value.trim().parse().map_err(|_| {
        TrainError::Input(format!(
            "launcher variable {var}={value:?} is not a non-negative integer"
        ))
    })
}

impl Launch {
    /// One process, no launcher.
    pub fn single() -> Self {
        Launch {
            launcher: Launcher::None,
            rank: 0,
            world: 1,
            local_rank: 0,
            job: String::new(),
        }
    }

    /// Read the launch from the process environment.
    pub fn from_env() -> Result<Self, TrainError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Read the launch from `get` (a variable's value, `None` where unset). An error where a
    /// launcher's variables are present but incomplete, not numbers, or inconsistent.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, TrainError> {
        for (launcher, [rk, wk, lk], job_keys) in LAUNCHERS {
            let (r, w) = (get(rk), get(wk));
            let (r, w) = match (r, w) {
                (None, None) => continue,
                (Some(r), Some(w)) => (r, w),
                (r, _) => {
                    let (have, miss) = if r.is_some() { (rk, wk) } else { (wk, rk) };
                    return Err(TrainError::Input(format!(
                        "launcher variable {have} is set but {miss} is not: \
                         cannot tell this process's place in the job"
                    )));
                }
            };
            let rank = parse(rk, &r)?;
            let world = parse(wk, &w)?;
            if world == 0 || rank >= world {
                return Err(TrainError::Input(format!(
                    "launcher says rank {rank} of {world} ({rk}, {wk})"
                )));
            }
            // torchrun always sets LOCAL_RANK; a hand-set RANK/WORLD_SIZE on one node may not.
            let local_rank = match get(lk) {
                Some(l) => parse(lk, &l)?,
                None if world == 1 => 0,
                None => {
                    return Err(TrainError::Input(format!(
                        "launcher variable {lk} is not set: which GPU rank {rank} of {world} \
                         should use is unknown"
                    )))
                }
            };
            let job = job_keys
                .iter()
                .filter_map(|k| get(k).map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(",");
            return Ok(Launch {
                launcher,
                rank,
                world,
                local_rank,
                job,
            });
        }
        Ok(Self::single())
    }
}

/// The rendezvous file's name in the run's output directory.
pub const RENDEZVOUS_FILE: &str = "nccl-id";

/// Hand `payload` (rank 0's; ignored elsewhere) from rank 0 to every rank through the file
/// `path`, which all ranks must see (a shared output directory). Rank 0 writes `job` and the
/// payload to a temporary file and renames it onto `path` (atomic: the others never read a
/// half-written file); the others poll until a file of this `job` appears, or fail after
/// `timeout` with an error that says what to check. Returns the payload on every rank.
pub fn file_rendezvous(
    path: &Path,
    launch: &Launch,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, TrainError> {
    let header = format!("maskdiff-rendezvous {}\n", launch.job);
    if launch.rank == 0 {
        let mut bytes = header.into_bytes();
        bytes.extend_from_slice(payload);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            TrainError::Collective(format!(
                "rank 0 cannot write the rendezvous file {}: {e}",
                path.display()
            ))
        })?;
        return Ok(payload.to_vec());
    }
    let start = Instant::now();
    let mut wait = Duration::from_millis(5);
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if let Some(rest) = bytes.strip_prefix(header.as_bytes()) {
                return Ok(rest.to_vec());
            }
        }
        if start.elapsed() >= timeout {
            return Err(TrainError::Collective(format!(
                "rank {} of {}: no rendezvous file of this job ({}) at {} after {:.0} s; rank 0 \
                 writes it when it starts. Check that every rank was given the same out_dir on a \
                 file system all nodes share and that rank 0 is running, or launch with mpirun \
                 and a build with `--features nccl,mpi`, which passes the id over MPI",
                launch.rank,
                launch.world,
                if launch.job.is_empty() {
                    "no job id from the launcher"
                } else {
                    &launch.job
                },
                path.display(),
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(wait.min(timeout.saturating_sub(start.elapsed())));
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), Launch::single());
    }

    #[test]
    fn reads_each_launcher() {
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            Launcher,
            (usize, usize, usize),
            &'a str,
        );
        let cases: [Case; 3] = [
            (
                &[
                    ("RANK", "3"),
                    ("WORLD_SIZE", "8"),
                    ("LOCAL_RANK", "1"),
                    ("TORCHELASTIC_RUN_ID", "abc"),
                ],
                Launcher::Torchrun,
                (3, 8, 1),
                "TORCHELASTIC_RUN_ID=abc",
            ),
            (
                &[
                    ("OMPI_COMM_WORLD_RANK", "1"),
                    ("OMPI_COMM_WORLD_SIZE", "2"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                ],
                Launcher::OpenMpi,
                (1, 2, 0),
                "",
            ),
            (
                &[
                    ("SLURM_PROCID", "5"),
                    ("SLURM_NTASKS", "16"),
                    ("SLURM_LOCALID", "5"),
                    ("SLURM_JOB_ID", "77"),
                    ("SLURM_STEP_ID", "0"),
                ],
                Launcher::Slurm,
                (5, 16, 5),
                "SLURM_JOB_ID=77,SLURM_STEP_ID=0",
            ),
        ];
        for (kv, launcher, (rank, world, local_rank), job) in cases {
            let l = Launch::from_vars(vars(kv)).unwrap();
            assert_eq!(
                (l.launcher, l.rank, l.world, l.local_rank, l.job.as_str()),
                (launcher, rank, world, local_rank, job)
            );
        }
    }

    #[test]
    fn mpirun_inside_slurm_uses_the_mpi_numbers() {
        let l = Launch::from_vars(vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_LOCALID", "0"),
        ]))
        .unwrap();
        assert_eq!((l.launcher, l.rank, l.world), (Launcher::OpenMpi, 1, 2));
    }

    #[test]
    fn refuses_inconsistent_variables() {
        for bad in [
            vec![("RANK", "0")],
            vec![("WORLD_SIZE", "2")],
            vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
            vec![("RANK", "0"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "0")],
            vec![("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
            vec![("RANK", "-1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
            vec![("RANK", "1"), ("WORLD_SIZE", "2")],
            vec![
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "a"),
            ],
        ] {
            let e = Launch::from_vars(vars(&bad)).unwrap_err();
            assert!(matches!(e, TrainError::Input(_)), "{bad:?}: {e}");
        }
        // One rank without LOCAL_RANK is fine: it can only be GPU 0.
        let l = Launch::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (0, 1, 0));
    }

    fn launch(rank: usize, world: usize, job: &str) -> Launch {
        Launch {
            launcher: Launcher::Torchrun,
            rank,
            world,
            local_rank: rank,
            job: job.into(),
        }
    }

    #[test]
    fn rendezvous_hands_rank_0s_payload_to_the_others() {
        let dir = std::env::temp_dir().join(format!("maskdiff-rdv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join(RENDEZVOUS_FILE);
        // A stale file from an earlier job must not be taken.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"maskdiff-rendezvous MASTER_PORT=1\nstale").unwrap();
        let id: Vec<u8> = (0..128u8).collect();
        let others: Vec<_> = (1..4)
            .map(|r| {
                let path = path.clone();
                std::thread::spawn(move || {
                    file_rendezvous(
                        &path,
                        &launch(r, 4, "MASTER_PORT=2"),
                        b"not mine",
                        Duration::from_secs(10),
                    )
                })
            })
            .collect();
        // The others are polling (and ignoring the stale file) before rank 0 writes.
        std::thread::sleep(Duration::from_millis(100));
        let got0 = file_rendezvous(
            &path,
            &launch(0, 4, "MASTER_PORT=2"),
            &id,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(got0, id);
        for h in others {
            assert_eq!(h.join().unwrap().unwrap(), id);
        }
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(RENDEZVOUS_FILE)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rendezvous_without_rank_0_times_out_with_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("maskdiff-rdv-none-{}", std::process::id()));
        let path = dir.join(RENDEZVOUS_FILE);
        let t = Instant::now();
        let e = file_rendezvous(
            &path,
            &launch(1, 2, "SLURM_JOB_ID=9"),
            b"",
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(300));
        let msg = e.to_string();
        assert!(matches!(e, TrainError::Collective(_)), "{msg}");
        assert!(
            msg.contains("rank 1 of 2") && msg.contains("SLURM_JOB_ID=9"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}
