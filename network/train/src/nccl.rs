//! Data-parallel training across CUDA devices over NCCL (issue 17), through cudarc's NCCL
//! bindings (the cudarc dfdx already uses): a [`Collective`] whose gradient all-reduce runs on
//! the device ([`Collective::all_reduce_device`]), and whose byte broadcast (initial parameters,
//! resume state), all-gather and barrier are NCCL calls on small device buffers. One process
//! per GPU; the process of local rank `l` drives device `l`, or the only device it sees (see
//! [`crate::launch`]).
//!
//! Rank 0 makes the NCCL unique id and hands it to the others either through a file in the
//! run's output directory ([`Nccl::init_file`], any launcher) or over another collective
//! ([`Nccl::init_over`], e.g. MPI under mpirun). NCCL's ring all-reduce sums every element over
//! the ranks and leaves the same bits on every rank; with one rank it is the identity, so a
//! one-rank NCCL run is bit for bit the single-GPU run.
//!
//! dfdx 0.13 does not expose a tensor's device memory; a gradient's device buffer is reached
//! through dfdx's public `Gradients` instead: `d/dz Σ z·g = g` puts `g` (exactly: `g·1`) into
//! the gradient slot of a fresh `z`, NCCL sums that slot, and `Gradients::get` makes it a
//! tensor again — all on the device.

use crate::collective::{Collective, CommStats};
use crate::launch::{file_rendezvous, Launch, RENDEZVOUS_FILE};
use crate::TrainError;
use cudarc::driver::CudaDevice;
use cudarc::nccl::{Comm, Id, ReduceOp};
use maskdiff_network::dfdx::prelude::*;
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Length of NCCL's unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// The flat gradient tensors the trainer hands to [`Collective::all_reduce_device`].
type CudaFlat = Tensor<(usize,), f32, Cuda>;

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> TrainError + '_ {
    move |e| TrainError::Collective(format!("NCCL {what}: {e:?}"))
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> TrainError + '_ {
    move |e| TrainError::Collective(format!("CUDA {what}: {e:?}"))
}

/// One rank of an NCCL communicator over all ranks of the job.
pub struct Nccl {
    comm: Comm,
    dev: Arc<CudaDevice>,
    stats: Cell<CommStats>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Nccl {{ rank {} of {}, device {} }}",
            self.comm.rank(),
            self.comm.world_size(),
            self.dev.ordinal()
        )
    }
}

impl Nccl {
    /// Join the communicator of `launch` on CUDA device `launch.local_rank`; `exchange` hands
    /// rank 0's id bytes (its argument on rank 0) to every rank.
    pub fn init(
        launch: &Launch,
        exchange: impl FnOnce(&[u8]) -> Result<Vec<u8>, TrainError>,
    ) -> Result<Self, TrainError> {
        let count = CudaDevice::count()
            .map_err(cuda_err("counting devices"))?
            .max(0) as usize;
        // Local rank l drives GPU l; a rank that sees a single GPU (a launcher that sets
        // CUDA_VISIBLE_DEVICES per rank, as srun --gpus-per-task=1 does) drives that one.
        let ordinal = match (launch.local_rank < count, count) {
            (true, _) => launch.local_rank,
            (false, 1) => 0,
            (false, _) => {
                return Err(TrainError::Collective(format!(
                    "rank {} has local rank {} but sees {count} CUDA device(s): start at most \
                     one rank per GPU on each node",
                    launch.rank, launch.local_rank
                )))
            }
        };
        let mine: Vec<u8> = if launch.rank == 0 {
            let id = Id::new().map_err(nccl_err("making the unique id"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let got = exchange(&mine)?;
        let internal: [std::ffi::c_char; NCCL_ID_BYTES] =
            std::array::from_fn(|i| *got.get(i).unwrap_or(&0) as std::ffi::c_char);
        if got.len() != NCCL_ID_BYTES {
            return Err(TrainError::Collective(format!(
                "rank {} received an NCCL id of {} bytes, not {NCCL_ID_BYTES}",
                launch.rank,
                got.len()
            )));
        }
        let dev = CudaDevice::new(ordinal).map_err(cuda_err("opening the device"))?;
        // Blocks until every rank has joined.
        let comm = Comm::from_rank(dev.clone(), launch.rank, launch.world, Id::uninit(internal))
            .map_err(nccl_err("joining the communicator"))?;
        Ok(Nccl {
            comm,
            dev,
            stats: Cell::new(CommStats::default()),
        })
    }

    /// [`Nccl::init`] with the id passed through `<out_dir>/nccl-id` (see
    /// [`crate::launch::file_rendezvous`]); rank 0 removes the file once every rank has joined,
    /// so that it never outlives the job that made it.
    pub fn init_file(
        launch: &Launch,
        out_dir: &Path,
        timeout: Duration,
    ) -> Result<Self, TrainError> {
        let path = out_dir.join(RENDEZVOUS_FILE);
        let nccl = Self::init(launch, |id| file_rendezvous(&path, launch, id, timeout))?;
        if launch.rank == 0 {
            let _ = std::fs::remove_file(&path);
        }
        Ok(nccl)
    }

    /// [`Nccl::init`] with the id broadcast over `via` (an MPI communicator of the same ranks).
    pub fn init_over(launch: &Launch, via: &dyn Collective) -> Result<Self, TrainError> {
        if (via.rank(), via.size()) != (launch.rank, launch.world) {
            return Err(TrainError::Collective(format!(
                "the launcher says rank {} of {}, the other collective rank {} of {}",
                launch.rank,
                launch.world,
                via.rank(),
                via.size()
            )));
        }
        Self::init(launch, |id| {
            let mut bytes = id.to_vec();
            via.broadcast(&mut bytes)?;
            Ok(bytes)
        })
    }

    /// The CUDA device ordinal this rank drives.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal()
    }

    fn sync(&self) -> Result<(), TrainError> {
        self.dev.synchronize().map_err(cuda_err("synchronize"))
    }

    fn record(&self, t: Instant, bytes: usize) {
        let mut s = self.stats.get();
        s.all_reduces += 1;
        s.all_reduce_seconds += t.elapsed().as_secs_f64();
        s.all_reduce_bytes += bytes as u64;
        self.stats.set(s);
    }

    /// Sum `g` over the ranks in its own device buffer (see the module doc).
    fn reduce_tensor(&self, g: &mut CudaFlat) -> Result<(), TrainError> {
        let len = g.shape().0;
        let dfdx_dev = g.device().clone();
        let z: CudaFlat = dfdx_dev
            .try_zeros_like(&(len,))
            .map_err(TrainError::device)?;
        let mut slots = (z.leaky_trace() * g.clone())
            .try_sum::<Rank0, _>()
            .map_err(TrainError::device)?
            .try_backward()
            .map_err(TrainError::device)?;
        {
            let slot = slots.get_or_alloc_mut(&z).map_err(TrainError::device)?;
            let slice: &mut cudarc::driver::CudaSlice<f32> = slot;
            // SAFETY: every element of `out` is written by the all-reduce before it is read.
            let mut out = unsafe { self.dev.alloc::<f32>(len) }.map_err(cuda_err("alloc"))?;
            self.comm
                .all_reduce(slice, &mut out, &ReduceOp::Sum)
                .map_err(nccl_err("all-reduce"))?;
            // Back into dfdx's own buffer (a device copy), which dfdx then owns and caches.
            self.dev.dtod_copy(&out, slice).map_err(cuda_err("copy"))?;
        }
        *g = slots.get(&z);
        Ok(())
    }

    /// Sum of the `u64`s every rank passes, on every rank.
    fn all_reduce_u64(&self, xs: &[u64]) -> Result<Vec<u64>, TrainError> {
        let send = self.dev.htod_sync_copy(xs).map_err(cuda_err("copy"))?;
        let mut recv = self
            .dev
            .alloc_zeros::<u64>(xs.len())
            .map_err(cuda_err("alloc"))?;
        self.comm
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        self.dev.dtoh_sync_copy(&recv).map_err(cuda_err("copy"))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), TrainError> {
        let t = Instant::now();
        let send = self.dev.htod_sync_copy(buf).map_err(cuda_err("copy"))?;
        let mut recv = self
            .dev
            .alloc_zeros::<f32>(buf.len())
            .map_err(cuda_err("alloc"))?;
        self.comm
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        self.dev
            .dtoh_sync_copy_into(&recv, buf)
            .map_err(cuda_err("copy"))?;
        self.record(t, std::mem::size_of_val(buf));
        Ok(())
    }
    fn all_reduce_device(&self, grads: &mut dyn std::any::Any) -> Option<Result<(), TrainError>> {
        let grads = grads.downcast_mut::<Vec<CudaFlat>>()?;
        let t = Instant::now();
        let r = grads
            .iter_mut()
            .try_for_each(|g| self.reduce_tensor(g))
            .and_then(|()| self.sync());
        let bytes = grads.iter().map(|g| g.shape().0 * 4).sum();
        self.record(t, bytes);
        Some(r)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<(), TrainError> {
        let root = self.rank() == 0;
        let n = self.all_reduce_u64(&[if root { bytes.len() as u64 } else { 0 }])?[0];
        let n = usize::try_from(n)
            .map_err(|_| TrainError::Collective(format!("broadcast of {n} bytes")))?;
        if n == 0 {
            bytes.clear();
            return Ok(());
        }
        let send = if root {
            Some(
                self.dev
                    .htod_sync_copy(&bytes[..])
                    .map_err(cuda_err("copy"))?,
            )
        } else {
            None
        };
        let mut recv = self.dev.alloc_zeros::<u8>(n).map_err(cuda_err("alloc"))?;
        self.comm
            .broadcast(&send, &mut recv, 0)
            .map_err(nccl_err("broadcast"))?;
        *bytes = self.dev.dtoh_sync_copy(&recv).map_err(cuda_err("copy"))?;
        Ok(())
    }
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TrainError> {
        let w = self.size();
        // Lengths by a sum of one-hot vectors, then equal-length (padded) gathers.
        let mut lens = vec![0u64; w];
        lens[self.rank()] = bytes.len() as u64;
        let lens = self.all_reduce_u64(&lens)?;
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        if max == 0 {
            return Ok(vec![Vec::new(); w]);
        }
        let mut padded = bytes.to_vec();
        padded.resize(max, 0);
        let send = self.dev.htod_sync_copy(&padded).map_err(cuda_err("copy"))?;
        let mut recv = self
            .dev
            .alloc_zeros::<u8>(max * w)
            .map_err(cuda_err("alloc"))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(nccl_err("all-gather"))?;
        let all = self.dev.dtoh_sync_copy(&recv).map_err(cuda_err("copy"))?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(q, &l)| all[q * max..q * max + l as usize].to_vec())
            .collect())
    }
    fn barrier(&self) -> Result<(), TrainError> {
        // A one-element all-reduce completes on a rank only once every rank has entered it.
        self.all_reduce_u64(&[1])?;
        Ok(())
    }
    fn comm_stats(&self) -> CommStats {
        self.stats.get()
    }
}
