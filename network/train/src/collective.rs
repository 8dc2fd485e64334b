//! Collective communication for data-parallel training: the small interface the trainer needs
//! ([`Collective`]: rank, size, all-reduce-sum of `f32` buffers in place, broadcast of bytes
//! from rank 0, all-gather of bytes, barrier) with a no-op [`SingleProcess`] and, behind the
//! `mpi` feature, `Mpi` over the system's MPI library (the `mpi` crate; OpenMPI from Debian
//! in CI), and behind `nccl`, `crate::nccl::Nccl` (gradients reduced on the GPU). No protocol
//! of our own: every operation is one call of the engine.
//!
//! How the trainer uses it (see `Trainer::step_on`): with W ranks and M = `micro_batches`
//! micro-batches per global step (W must divide M), every rank builds the same global batch and
//! the same noise, runs the network on its own micro-batches `r·M/W .. (r+1)·M/W`, sums their
//! gradients locally, and the ranks' sums are all-reduced; the micro-batches' numbers are
//! all-gathered so every rank reports exactly what one process would. For W = M = 2 the result
//! is bit for bit the single-process 2-micro-batch step (IEEE addition is commutative).

use crate::{TrainError, Trainer};
use maskdiff_data::fnv1a64;
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::Kernels;
use maskdiff_objective::{Flat, Objective};
#[cfg(feature = "mpi")]
use std::cell::Cell;

/// The collective operations data-parallel training needs. All ranks must call the same
/// operations in the same order (as MPI requires).
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place, the same bits on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), TrainError>;
    /// Rank 0's `bytes` on every rank (the others' contents and lengths are replaced).
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<(), TrainError>;
    /// Every rank's `bytes`, in rank order.
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TrainError>;
    /// Wait until every rank arrives.
    fn barrier(&self) -> Result<(), TrainError>;
    /// Sum gradient tensors over all ranks in place on their device, where this engine can:
    /// `grads` is the trainer's `Vec<Tensor<(usize,), f32, D>>`. `None` where it cannot (every
    /// CPU collective, or a device type it does not drive): the trainer then reduces one host
    /// buffer with [`Collective::all_reduce_sum`].
    fn all_reduce_device(&self, _grads: &mut dyn std::any::Any) -> Option<Result<(), TrainError>> {
        None
    }
    /// Time in and volume of [`Collective::all_reduce_sum`] so far (zero where not measured).
    fn comm_stats(&self) -> CommStats {
        CommStats::default()
    }
}

/// One process: rank 0 of 1; every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), TrainError> {
        Ok(())
    }
    fn broadcast(&self, _bytes: &mut Vec<u8>) -> Result<(), TrainError> {
        Ok(())
    }
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TrainError> {
        Ok(vec![bytes.to_vec()])
    }
    fn barrier(&self) -> Result<(), TrainError> {
        Ok(())
    }
}

/// True when this process was started by an MPI launcher (`mpirun`/`mpiexec` of OpenMPI or
/// MPICH, or srun with PMI/PMIx), judged from the environment the launcher sets.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Time spent in and bytes moved by gradient all-reduces (for the scaling report).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    pub all_reduces: u64,
    pub all_reduce_seconds: f64,
    /// Bytes of the buffers reduced (each rank's contribution).
    pub all_reduce_bytes: u64,
}

/// MPI_COMM_WORLD of the system's MPI library. Owns the MPI environment: dropping it finalizes
/// MPI (every rank must get there); [`Mpi::abort`] ends the whole job instead.
#[cfg(feature = "mpi")]
pub struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    stats: Cell<CommStats>,
    // Declared last: dropped (MPI_Finalize) after the communicator handle.
    _universe: mpi::environment::Universe,
}

#[cfg(feature = "mpi")]
impl Mpi {
    /// Initialise MPI (once per process). An error if it was initialised before.
    pub fn init() -> Result<Self, TrainError> {
        let universe = mpi::initialize().ok_or_else(|| {
            TrainError::Collective("MPI was already initialised in this process".into())
        })?;
        Ok(Mpi {
            world: universe.world(),
            stats: Cell::new(CommStats::default()),
            _universe: universe,
        })
    }

    /// End every rank of the job with `code` (MPI_Abort): for errors that leave the ranks out
    /// of step, where finalizing would wait forever.
    pub fn abort(&self, code: i32) -> ! {
        use mpi::topology::Communicator;
        self.world.abort(code)
    }
}

#[cfg(feature = "mpi")]
impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mpi {{ rank {} of {} }}", self.rank(), self.size())
    }
}

#[cfg(feature = "mpi")]
fn count(n: usize) -> Result<mpi::Count, TrainError> {
    mpi::Count::try_from(n)
        .map_err(|_| TrainError::Collective(format!("{n} elements exceed MPI's count type")))
}

#[cfg(feature = "mpi")]
impl Collective for Mpi {
    fn rank(&self) -> usize {
        use mpi::topology::Communicator;
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        use mpi::topology::Communicator;
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), TrainError> {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        count(buf.len())?;
        let t = std::time::Instant::now();
        // rsmpi has no MPI_IN_PLACE: reduce a copy into `buf`.
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        let mut s = self.stats.get();
        s.all_reduces += 1;
        s.all_reduce_seconds += t.elapsed().as_secs_f64();
        s.all_reduce_bytes += std::mem::size_of_val(buf) as u64;
        self.stats.set(s);
        Ok(())
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<(), TrainError> {
        use mpi::collective::Root;
        use mpi::topology::Communicator;
        let root = self.world.process_at_rank(0);
        let mut len = [bytes.len() as u64];
        root.broadcast_into(&mut len[..]);
        let n = usize::try_from(len[0])
            .map_err(|_| TrainError::Collective(format!("broadcast of {} bytes", len[0])))?;
        count(n)?;
        if self.rank() != 0 {
            bytes.clear();
            bytes.resize(n, 0);
        }
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TrainError> {
        use mpi::collective::CommunicatorCollectives;
        use mpi::datatype::PartitionMut;
        let w = self.size();
        let mut lens = vec![0u64; w];
        self.world
            .all_gather_into(&[bytes.len() as u64][..], &mut lens[..]);
        let counts = lens
            .iter()
            .map(|&l| count(l as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        count(total)?;
        let displs: Vec<mpi::Count> = counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(bytes, &mut part);
        }
        let mut out = Vec::with_capacity(w);
        let mut at = 0;
        for &l in &lens {
            out.push(all[at..at + l as usize].to_vec());
            at += l as usize;
        }
        Ok(out)
    }
    fn barrier(&self) -> Result<(), TrainError> {
        use mpi::collective::CommunicatorCollectives;
        self.world.barrier();
        Ok(())
    }
    fn comm_stats(&self) -> CommStats {
        self.stats.get()
    }
}

/// A trainer's whole state as one message: what rank 0 broadcasts and what the ranks compare.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    step: u64,
    seed: u64,
    counts: [u64; 2],
    extra: String,
    /// Every state tensor in [`Trainer::state_tensors`] order.
    values: Vec<f32>,
}

impl<D: Kernels<f32>, O: Objective<D>> Trainer<D, O> {
    /// Model, EMA, AdamW moments, the objective's parameters, their EMA and moments.
    fn state_tensors(&self) -> Vec<&Flat<D>> {
        let mut v: Vec<&Flat<D>> = self.model.params().into_iter().map(|p| &p.value).collect();
        v.extend(self.ema.params().into_iter().map(|p| &p.value));
        v.extend(self.opt.m.iter().chain(self.opt.v.iter()));
        v.extend(self.objective.params().into_iter().map(|(_, t)| t));
        v.extend(self.ema_objective.params().into_iter().map(|(_, t)| t));
        v.extend(
            self.objective_opt
                .m
                .iter()
                .chain(self.objective_opt.v.iter()),
        );
        v
    }

    fn state_tensors_mut(&mut self) -> Vec<&mut Flat<D>> {
        let mut v: Vec<&mut Flat<D>> = self
            .model
            .params_mut()
            .into_iter()
            .map(|p| &mut p.value)
            .collect();
        v.extend(self.ema.params_mut().into_iter().map(|p| &mut p.value));
        v.extend(self.opt.m.iter_mut().chain(self.opt.v.iter_mut()));
        v.extend(self.objective.params_mut());
        v.extend(self.ema_objective.params_mut());
        v.extend(
            self.objective_opt
                .m
                .iter_mut()
                .chain(self.objective_opt.v.iter_mut()),
        );
        v
    }

    fn snapshot_bytes(&self, with_extra: bool) -> Result<Vec<u8>, TrainError> {
        let tensors = self.state_tensors();
        let mut values = Vec::with_capacity(tensors.iter().map(|t| t.shape().0).sum());
        for t in tensors {
            values.extend(t.as_vec());
        }
        let s = Snapshot {
            step: self.step,
            seed: self.seed,
            counts: [self.opt.count, self.objective_opt.count],
            extra: if with_extra {
                self.extra.to_string()
            } else {
                String::new()
            },
            values,
        };
        postcard::to_allocvec(&s)
            .map_err(|e| TrainError::Collective(format!("encoding the training state: {e}")))
    }

    /// Make every rank's state rank 0's (the initial parameters of a new run, or the state
    /// rank 0 resumed): step, seed, all tensors and the caller's `extra`. The ranks must have
    /// been built from the same configurations (an error otherwise).
    pub fn broadcast_state(&mut self, comm: &dyn Collective) -> Result<(), TrainError> {
        if comm.size() == 1 {
            return Ok(());
        }
        let mut bytes = if comm.rank() == 0 {
            self.snapshot_bytes(true)?
        } else {
            Vec::new()
        };
        comm.broadcast(&mut bytes)?;
        if comm.rank() == 0 {
            return Ok(());
        }
        let s: Snapshot = postcard::from_bytes(&bytes).map_err(|e| {
            TrainError::Collective(format!("unreadable training state from rank 0: {e}"))
        })?;
        let extra: serde_json::Value = serde_json::from_str(&s.extra).map_err(|e| {
            TrainError::Collective(format!("unreadable caller state from rank 0: {e}"))
        })?;
        let mut tensors = self.state_tensors_mut();
        let need: usize = tensors.iter().map(|t| t.shape().0).sum();
        if need != s.values.len() {
            return Err(TrainError::Collective(format!(
                "rank 0's training state has {} values, rank {}'s model and optimizer {need}: \
                 the ranks were started with different configurations",
                s.values.len(),
                comm.rank()
            )));
        }
        let mut at = 0;
        for t in tensors.iter_mut() {
            let len = t.shape().0;
            **t = t
                .device()
                .try_tensor_from_vec(s.values[at..at + len].to_vec(), (len,))
                .map_err(TrainError::device)?;
            at += len;
        }
        self.step = s.step;
        self.seed = s.seed;
        self.opt.count = s.counts[0];
        self.objective_opt.count = s.counts[1];
        self.extra = extra;
        Ok(())
    }

    /// A 64-bit FNV-1a hash of the training state: step, seed, update counts and every tensor
    /// (not the caller's `extra`, which may hold per-process numbers such as timings).
    pub fn state_fingerprint(&self) -> Result<u64, TrainError> {
        Ok(fnv1a64(&self.snapshot_bytes(false)?))
    }

    /// An error unless every rank's state is bit for bit rank 0's (e.g. before rank 0 saves a
    /// checkpoint: a data-parallel run whose ranks drifted apart is no longer one run).
    pub fn check_in_sync(&self, comm: &dyn Collective) -> Result<(), TrainError> {
        if comm.size() == 1 {
            return Ok(());
        }
        let mine = self.state_fingerprint()?.to_le_bytes();
        let all = comm.all_gather(&mine)?;
        for (q, f) in all.iter().enumerate() {
            if f[..] != all[0][..] {
                return Err(TrainError::Collective(format!(
                    "rank {q}'s training state differs from rank 0's at step {}",
                    self.step
                )));
            }
        }
        Ok(())
    }
}
