//! NCCL for ranks whose tensors live on GPUs (feature `cuda`; cudarc loads libnccl at
//! run time, so this builds with no CUDA or NCCL). Rank 0 makes the group's unique id
//! ([`unique_id`]) and hands its 128 bytes to the others (through etcd or flags); each
//! rank then joins with its own GPU. Collectives run on the backend's stream of that
//! GPU, so they are ordered with the tensor operations around them.

use std::sync::Mutex;

use iris_tensor::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use iris_tensor::{DType, Device, Tensor};

use crate::{Communicator, Error, Result};

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective(format!("nccl {what}: {e:?}"))
}

/// Whether libnccl can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: probes for the library by name only.
    #[allow(unsafe_code)]
    unsafe {
        iris_tensor::cuda::cudarc::nccl::sys::is_culib_present()
    }
}

/// A new group id (rank 0's): 128 bytes to hand to every rank.
pub fn unique_id() -> Result<Vec<u8>> {
    if !nccl_present() {
        return Err(Error::Collective("NCCL (libnccl) is not installed".into()));
    }
    let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator. Calls are serialized (one collective at a time per rank, as
/// the step protocol issues them).
pub struct Nccl {
    comm: Mutex<SendComm>,
    rank: usize,
    world: usize,
    ordinal: usize,
}

/// `Comm` holds a raw NCCL handle; NCCL allows using a communicator from any thread as
/// long as calls on it do not overlap, which the mutex guarantees.
struct SendComm(Comm);
#[allow(unsafe_code)]
// SAFETY: see above; the handle is only touched under `Nccl::comm`'s lock.
unsafe impl Send for SendComm {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Nccl(rank {} of {}, cuda:{})",
            self.rank, self.world, self.ordinal
        )
    }
}

impl Nccl {
    /// Joins the group `id` (from rank 0's [`unique_id`]) as `rank` of `world` on
    /// `device` (a GPU).
    pub fn join(device: Device, rank: usize, world: usize, id: &[u8]) -> Result<Nccl> {
        if rank >= world {
            return Err(Error::BadRank {
                rank,
                world_size: world,
            });
        }
        let Device::Cuda(ordinal) = device else {
            return Err(Error::Collective("NCCL ranks run on GPUs".into()));
        };
        if !nccl_present() {
            return Err(Error::Collective("NCCL (libnccl) is not installed".into()));
        }
        let raw: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::Collective(format!("an NCCL id is 128 bytes, got {}", id.len())))?;
        let stream = iris_tensor::cuda::stream_of(ordinal)?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(raw))
            .map_err(|e| nccl_err("join", e))?;
        Ok(Nccl {
            comm: Mutex::new(SendComm(comm)),
            rank,
            world,
            ordinal,
        })
    }

    fn comm(&self) -> Result<std::sync::MutexGuard<'_, SendComm>> {
        self.comm
            .lock()
            .map_err(|_| Error::Collective("nccl: poisoned".into()))
    }

    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: Tensor) -> Result<Tensor> {
        let shape = t.shape().to_vec();
        let mut buf = iris_tensor::cuda::f32_copy(&t.to_device(self.device())?)?;
        self.comm()?
            .0
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all-reduce", e))?;
        Ok(iris_tensor::cuda::from_f32(buf, &shape, self.ordinal)?.to_device(t.device())?)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let (rows, d) = (t.rows(), t.last_dim());
        let src = iris_tensor::cuda::f32_copy(&t.to_device(self.device())?)?;
        let stream = iris_tensor::cuda::stream_of(self.ordinal)?;
        let mut dst = stream
            .alloc_zeros::<f32>(self.world * rows * d)
            .map_err(|e| nccl_err("allocating", e))?;
        self.comm()?
            .0
            .all_gather(&src, &mut dst)
            .map_err(|e| nccl_err("all-gather", e))?;
        // Rank-major blocks of [rows, d], side by side.
        let all = iris_tensor::cuda::from_f32(dst, &[self.world * rows, d], self.ordinal)?;
        let parts = (0..self.world)
            .map(|r| all.narrow_rows(r * rows, rows))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        Ok(Tensor::cat_cols(&refs)?
            .to_dtype(DType::F32)?
            .to_device(t.device())?)
    }

    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        if root >= self.world {
            return Err(Error::BadRank {
                rank: root,
                world_size: self.world,
            });
        }
        let stream = iris_tensor::cuda::stream_of(self.ordinal)?;
        let err = |e| nccl_err("broadcast", e);
        // The length first, then the bytes.
        let len = if self.rank == root {
            data.len() as u64
        } else {
            0
        };
        let mut len_buf = stream.clone_htod(&[len]).map_err(|e| nccl_err("copy", e))?;
        let comm = self.comm()?;
        comm.0
            .broadcast_in_place(&mut len_buf, root as i32)
            .map_err(err)?;
        let len = stream
            .clone_dtoh(&len_buf)
            .map_err(|e| nccl_err("copy", e))?[0] as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = if self.rank == root {
            stream.clone_htod(data).map_err(|e| nccl_err("copy", e))?
        } else {
            stream
                .alloc_zeros::<u8>(len)
                .map_err(|e| nccl_err("allocating", e))?
        };
        comm.0
            .broadcast_in_place(&mut buf, root as i32)
            .map_err(err)?;
        stream.clone_dtoh(&buf).map_err(|e| nccl_err("copy", e))
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::zeros_on(&[1], self.device())?;
        self.all_reduce_sum(one)?;
        iris_tensor::cuda::stream_of(self.ordinal)?
            .synchronize()
            .map_err(|e| nccl_err("synchronize", e))
    }
}
