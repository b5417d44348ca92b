//! BLIP-2 image-text retrieval (HF `Blip2ForImageTextRetrieval`):
//! - ITC: each query output of the image through `vision_projection`, the text's
//!   `[CLS]` output (Q-Former on text alone) through `text_projection`, both
//!   L2-normalised; similarity is the best query's dot product;
//! - ITM: queries and text through the Q-Former together (queries cross-attend to the
//!   image), `itm_head` on the query outputs, averaged over queries; P(match) is the
//!   softmax of its second logit.

use std::path::Path;

use iris_tensor::{DType, Tensor};

use crate::blip2::Blip2Parts;
use crate::layers::Linear;
use crate::registry::{Checkpoint, Family};
use crate::vlm::ImageTextRetrieval;
use crate::{Error, Result};

pub const ARCHITECTURE: &str = "Blip2ForImageTextRetrieval";

#[derive(Debug)]
pub struct Blip2Retrieval {
    parts: Blip2Parts,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    vision_projection: Linear,
    text_projection: Linear,
    itm_head: Linear,
}

impl Blip2Retrieval {
    pub fn load(dir: &Path, dtype: Option<DType>) -> Result<Blip2Retrieval> {
        Blip2Retrieval::from_checkpoint(&Checkpoint::open(dir, dtype)?)
    }

    /// The whole model (the gateway serves retrieval itself, all parts in one place).
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Blip2Retrieval> {
        ck.expect(Family::Blip2Retrieval)?;
        let p = Blip2Parts::load(ck, true)?;
        let q = &p.cfg.qformer;
        let (h, e) = (q.hidden_size, p.cfg.image_text_hidden_size);
        let emb = p.w.find_prefix(
            &["embeddings", "model.embeddings"],
            "word_embeddings.weight",
        )?;
        let emb = p.w.pp(emb).with_dtype(DType::F32);
        let head = |name: &str, out: usize| -> Result<Linear> {
            let nested = format!("model.{name}");
            let prefix = p.w.find_prefix(&[name, &nested], "weight")?;
            Linear::load(&p.w.pp(prefix).with_dtype(DType::F32), h, out, true)
        };
        Ok(Blip2Retrieval {
            word_embeddings: emb.get("word_embeddings.weight", &[q.vocab_size, h])?,
            position_embeddings: emb.get(
                "position_embeddings.weight",
                &[q.max_position_embeddings, h],
            )?,
            vision_projection: head("vision_projection", e)?,
            text_projection: head("text_projection", e)?,
            itm_head: head("itm_head", 2)?,
            parts: p,
        })
    }

    pub fn num_query_tokens(&self) -> usize {
        self.parts.cfg.num_query_tokens
    }

    pub fn image_token_id(&self) -> u32 {
        self.parts.cfg.image_token_id
    }

    /// Word + position embeddings of text ids (`[CLS] … [SEP]`).
    fn text_embeddings(&self, ids: &[u32]) -> Result<Tensor> {
        let q = &self.parts.cfg.qformer;
        if ids.len() > q.max_position_embeddings {
            return Err(Error::Input(format!(
                "{} text tokens exceed the Q-Former's {} positions",
                ids.len(),
                q.max_position_embeddings
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= q.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                q.vocab_size
            )));
        }
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        Ok(self
            .word_embeddings
            .index_rows(ids)?
            .add_elem(&self.position_embeddings.index_rows(&positions)?)?)
    }
}

impl ImageTextRetrieval for Blip2Retrieval {
    /// The image's features (the ViT's last hidden state).
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.parts.vision_model.forward(pixel_values)
    }

    /// Normalised ITC embeddings of an image, one per query: `[queries, dim]`.
    fn image_embeds(&self, image_features: &Tensor) -> Result<Tensor> {
        let q = self.parts.queries.query_output(image_features)?;
        Ok(self.vision_projection.forward(&q)?.l2_normalize()?)
    }

    /// The normalised ITC embedding of a text: `[dim]`.
    fn text_embeds(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::Input("empty text".into()));
        }
        let out = self
            .parts
            .queries
            .qformer
            .forward(&self.text_embeddings(ids)?, 0, None)?;
        let cls = out.narrow_rows(0, 1)?;
        let e = self.text_projection.forward(&cls)?.l2_normalize()?;
        Ok(e.reshape(&[e.elem_count()])?)
    }

    /// ITM logits of an image (its features) with a text.
    fn itm_logits(&self, image_features: &Tensor, ids: &[u32]) -> Result<[f32; 2]> {
        let n = self.num_query_tokens();
        let joint = Tensor::cat_rows(&[
            &self.parts.queries.query_tokens,
            &self.text_embeddings(ids)?,
        ])?;
        let out = self
            .parts
            .queries
            .qformer
            .forward(&joint, n, Some(image_features))?;
        let logits = self.itm_head.forward(&out.narrow_rows(0, n)?)?;
        let l = logits.host_f32()?;
        let mean = |c: usize| l.chunks_exact(2).map(|r| r[c]).sum::<f32>() / n as f32;
        Ok([mean(0), mean(1)])
    }
}
