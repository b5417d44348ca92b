//! The vocab-parallel token embedding and the head tied to it (Megatron's): each rank
//! holds its rows of the vocabulary — padded up to a multiple of the ranks and split
//! evenly, as vLLM pads, the padding rows held by nobody — so an embedding is a local
//! gather summed over the ranks and the logits are each rank's columns gathered.

use std::ops::Range;
use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::Tensor;

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
    table: Tensor,
    rows: Range<usize>,
    vocab: usize,
    comm: Arc<dyn Communicator>,
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
        Ok(VocabParallelEmbedding {
            table: vb.get_rows(name, &[vocab, dim], rows.clone())?,
            rows,
            vocab,
            comm,
        })
    }

    /// This rank's rows (for a head tied to the embedding).
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The vocabulary rows this rank holds.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
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
            return Ok(self.table.index_rows(ids)?);
        }
        // This rank's rows of the ids in its part, zeros elsewhere, summed over ranks.
        let (at, local): (Vec<usize>, Vec<u32>) = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| self.rows.contains(&(id as usize)))
            .map(|(i, &id)| (i, id - self.rows.start as u32))
            .unzip();
        let mut x = Tensor::zeros_on(&[ids.len(), self.table.last_dim()], self.table.device())?;
        if !at.is_empty() {
            x = x.scatter_rows(&at, &self.table.index_rows(&local)?)?;
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
