//! Per-sequence self-attention keys and values, `[tokens, kv_heads·head_dim]` per layer,
//! for incremental decoding.

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    /// Per layer, the keys and values of what cross-attention reads (the image), computed
    /// once per sequence (BLIP's text decoder; Flamingo's gated layers).
    cross: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    /// Which image each prompt position's cross-attention reads (IDEFICS: the latest
    /// image before it); positions past the prompt read what its last token read.
    image_of: Vec<Option<usize>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> KvCache {
        KvCache {
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
            len: 0,
            cross: vec![None; n_layers],
            image_of: Vec::new(),
        }
    }

    pub fn set_image_of(&mut self, image_of: Vec<Option<usize>>) {
        self.image_of = image_of;
    }

    /// The image position `pos` reads through cross-attention, if any.
    pub fn image_at(&self, pos: usize) -> Option<usize> {
        self.image_of
            .get(pos)
            .or(self.image_of.last())
            .copied()
            .flatten()
    }

    pub fn set_cross(&mut self, layer: usize, k: Vec<f32>, v: Vec<f32>) {
        self.cross[layer] = Some((k, v));
    }

    pub fn cross(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        self.cross
            .get(layer)
            .and_then(|c| c.as_ref())
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a step's keys and values to `layer`; returns all of the layer's K and V.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> (&[f32], &[f32]) {
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
        (&self.k[layer], &self.v[layer])
    }

    pub fn n_layers(&self) -> usize {
        self.k.len()
    }

    /// Layer `layer`'s keys and values of positions `range` (a prefix-cache block).
    pub fn rows(&self, layer: usize, range: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let w = self.k[layer].len().checked_div(self.len).unwrap_or(0);
        let r = range.start * w..range.end * w;
        (self.k[layer][r.clone()].to_vec(), self.v[layer][r].to_vec())
    }

    /// Appends a cached block's K/V to every layer and counts its `t` positions.
    pub fn extend_block(&mut self, per_layer: &[(Vec<f32>, Vec<f32>)], t: usize) {
        for (layer, (k, v)) in per_layer.iter().enumerate() {
            self.k[layer].extend_from_slice(k);
            self.v[layer].extend_from_slice(v);
        }
        self.len += t;
    }

    /// Marks `t` more tokens as cached, once every layer has appended them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Drops whatever layers appended beyond `len` (a step that failed half-way).
    pub fn rollback(&mut self, width: usize) {
        let keep = self.len * width;
        self.k
            .iter_mut()
            .chain(self.v.iter_mut())
            .for_each(|c| c.truncate(keep));
    }
}
