//! Collectives between the ranks of a tensor-parallel group (Megatron-LM style: one
//! all-reduce after attention and one after the MLP). At world size 1 every collective
//! is a no-op, so the single-device path is the tensor-parallel path with N = 1
//! (as in mistral.rs). The CPU communicator ([`cpu::CpuComm`]) joins ranks in separate
//! processes over shared memory ([`shm::Shm`], one host) or TCP ([`cpu::Tcp`]).
#![deny(unsafe_code)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod shm;

use std::sync::Arc;

use iris_tensor::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rank {rank} is out of range for world size {world_size}")]
    BadRank { rank: usize, world_size: usize },
    #[error("collective failed: {0}")]
    Collective(String),
    #[error(transparent)]
    Tensor(#[from] iris_tensor::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A member of a tensor-parallel group.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `t` across all ranks; every rank gets the sum.
    fn all_reduce_sum(&self, t: Tensor) -> Result<Tensor>;
    /// Every rank's `[rows, dᵣ]` side by side along the last dimension, in rank order
    /// (a vocab-parallel head's logits), f32.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// `root`'s `data` on every rank (the others' `data` is ignored).
    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Whether every other rank is still there, asked between collectives without
    /// involving them (a dead rank's process, a closed connection); an error names
    /// the one that is gone. Transports that cannot tell say yes.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// The group of one: every collective returns its input.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: Tensor) -> Result<Tensor> {
        Ok(t)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(iris_tensor::DType::F32)?)
    }
    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        if root != 0 {
            return Err(Error::BadRank {
                rank: root,
                world_size: 1,
            });
        }
        Ok(data.to_vec())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The communicator of a process that runs a model alone.
pub fn single() -> Arc<dyn Communicator> {
    Arc::new(SingleRank)
}

/// The `[start, end)` slice of `len` that `rank` owns when split evenly over
/// `world_size` ranks; `len` must divide evenly, as Megatron requires.
pub fn shard_range(len: usize, rank: usize, world_size: usize) -> Result<std::ops::Range<usize>> {
    if rank >= world_size {
        return Err(Error::BadRank { rank, world_size });
    }
    if !len.is_multiple_of(world_size) {
        return Err(Error::Collective(format!(
            "dimension {len} does not split evenly over {world_size} ranks"
        )));
    }
    let per = len / world_size;
    Ok(rank * per..(rank + 1) * per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_is_identity_and_shards_cover() {
        let c = single();
        let t = Tensor::from_f32(vec![1.0, 2.0], &[2]).unwrap();
        assert_eq!(c.all_reduce_sum(t).unwrap().to_f32_vec(), vec![1.0, 2.0]);
        assert_eq!(shard_range(8, 1, 4).unwrap(), 2..4);
        assert!(shard_range(7, 0, 2).is_err());
        assert!(shard_range(8, 4, 4).is_err());
    }
}
