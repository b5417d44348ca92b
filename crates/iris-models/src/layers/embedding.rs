//! The vocab-parallel token embedding and the head tied to it (Megatron's): each rank
//! holds its rows of the vocabulary — padded up to a multiple of the ranks and split
//! evenly, as vLLM pads, the padding rows held by nobody — so an embedding is a local
//! gather summed over the ranks and the logits are each rank's columns gathered. A
//! table stored block-quantized (a GGUF's) stays in its blocks on the CPU: a lookup
//! dequantizes its rows, and a tied head multiplies the same blocks.

use std::ops::Range;
use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::{DType, Device, Tensor, Weight};

use crate::layers::Linear;
use crate::weights::Vb;
use crate::{Error, Result};

/// The vocabulary rows rank `rank` of `world` holds (the last rank may hold fewer).
pub fn vocab_range(vocab: usize, rank: usize, world: usize) -> Range<usize> {
    let per = vocab.div_ceil(world.max(1));
    (rank * per).min(vocab)..((rank + 1) * per).min(vocab)
}

#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    /// This rank's rows of the table.
    table: Table,
    rows: Range<usize>,
    vocab: usize,
    dim: usize,
    comm: Arc<dyn Communicator>,
}

#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor),
    /// In the file's blocks; rows are dequantized into `dtype` as they are looked up
    /// (the values a dense load gives, at a quarter to a half of the memory).
    Blocks(Weight, DType),
}

impl VocabParallelEmbedding {
    /// This rank's rows of `name` (`[vocab, dim]`) under `vb`.
    pub fn load(
        vb: &Vb,
        name: &str,
        vocab: usize,
        dim: usize,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let rows = vocab_range(vocab, comm.rank(), comm.world_size());
        if rows.is_empty() {
            return Err(Error::Config(format!(
                "{}: a vocabulary of {vocab} is too small for {} ranks",
                vb.path_of(name),
                comm.world_size()
            )));
        }
        let table = if vb.is_quantized(name) && vb.device() == Device::Cpu {
            Table::Blocks(
                vb.weight_rows(name, &[vocab, dim], rows.clone())?,
                vb.dtype(),
            )
        } else {
            Table::Dense(vb.get_rows(name, &[vocab, dim], rows.clone())?)
        };
        Ok(VocabParallelEmbedding {
            table,
            rows,
            vocab,
            dim,
            comm,
        })
    }

    /// This rank's rows as a tensor (for a head tied to the embedding); `None` when
    /// they are kept in blocks (see [`VocabParallelEmbedding::blocks`]).
    pub fn table(&self) -> Option<&Tensor> {
        match &self.table {
            Table::Dense(t) => Some(t),
            Table::Blocks(..) => None,
        }
    }

    /// This rank's rows in their blocks, when kept so: a tied head multiplies them.
    pub fn blocks(&self) -> Option<&Weight> {
        match &self.table {
            Table::Blocks(w, _) => Some(w),
            Table::Dense(_) => None,
        }
    }

    /// The vocabulary rows this rank holds.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// Rows `local` (of this rank's part) of the table.
    fn lookup(&self, local: &[u32]) -> Result<Tensor> {
        match &self.table {
            Table::Dense(t) => Ok(t.index_rows(local)?),
            Table::Blocks(w, dtype) => {
                let values = w
                    .dequantize_rows(local)
                    .ok_or_else(|| Error::Config("an embedding's blocks".into()))?;
                Ok(Tensor::from_f32(values, &[local.len(), self.dim])?.to_dtype(*dtype)?)
            }
        }
    }

    fn device(&self) -> Device {
        match &self.table {
            Table::Dense(t) => t.device(),
            Table::Blocks(w, _) => w.device(),
        }
    }

    /// Embeddings `[ids, dim]`; the caller has checked the ids against the vocabulary.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        if self.comm.world_size() == 1 {
            return self.lookup(ids);
        }
        // This rank's rows of the ids in its part, zeros elsewhere, summed over ranks.
        let (at, local): (Vec<usize>, Vec<u32>) = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| self.rows.contains(&(id as usize)))
            .map(|(i, &id)| (i, id - self.rows.start as u32))
            .unzip();
        let mut x = Tensor::zeros_on(&[ids.len(), self.dim], self.device())?;
        if !at.is_empty() {
            x = x.scatter_rows(&at, &self.lookup(&local)?)?;
        }
        Ok(self.comm.all_reduce_sum(x)?)
    }

    /// Every rank's logits columns (`local`: `[rows, this rank's vocabulary]`) side by
    /// side: `[rows, vocab]`.
    pub fn gather_logits(&self, local: Tensor) -> Result<Tensor> {
        if self.comm.world_size() == 1 {
            return Ok(local);
        }
        Ok(self.comm.all_gather(&local)?)
    }
}

/// The head tied to `embed`, the table `name` (`shape`) under `vb`: the embedding's
/// own blocks when it keeps them (one copy for both), the table's rows in blocks when
/// stored so elsewhere, else its rows as a dense weight.
pub fn tied_head(
    vb: &Vb,
    embed: &VocabParallelEmbedding,
    name: &str,
    shape: &[usize],
) -> Result<Linear> {
    Ok(match &embed.table {
        Table::Blocks(w, dtype) => Linear::from_weight(w.clone(), None, *dtype),
        Table::Dense(_) if vb.is_quantized(name) => {
            Linear::from_weight(vb.weight_rows(name, shape, embed.rows())?, None, vb.dtype())
        }
        Table::Dense(t) => Linear::new(t.clone(), None, vb.dtype())?,
    })
}
