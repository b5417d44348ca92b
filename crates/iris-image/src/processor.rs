//! HF's CLIP / LLaVA image processor (`image_processing_pil_clip.py`,
//! `image_processing_pil_llava.py`, PIL backend): optional pad-to-square, resize
//! (shortest edge or fixed size), center-crop, rescale in f64 then cast to f32,
//! normalise in f32 — channel-first `pixel_values`. LLaVA-NeXT's
//! (`image_processing_pil_llava_next.py`) first tiles the image: resized into the best of
//! `image_grid_pinpoints` keeping its aspect, zero-padded to it, cut into crop-sized
//! tiles, after the whole image resized to the base size; each tile then goes the way
//! above: `[tiles, 3, H, W]`.

use std::path::Path;

use serde_json::Value;

use crate::decode::RgbImage;
use crate::resample::resize;
use crate::{Error, Result};

pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// PIL resampling filters (the `resample` integer of HF configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Lanczos,
    Bilinear,
    Bicubic,
}

#[derive(Debug, Clone, PartialEq)]
enum Size {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

/// LLaVA-NeXT's tiling ("anyres").
#[derive(Debug, Clone, PartialEq)]
struct AnyRes {
    /// `(height, width)` resolutions an image may be tiled to.
    pinpoints: Vec<[usize; 2]>,
    /// The side of a tile.
    tile: usize,
    /// `(height, width)` the whole image is resized to, the first tile.
    base: (usize, usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Pad to a square first (LLaVA's `do_pad`; LLaVA-NeXT's pads tile counts instead).
    do_pad: bool,
    anyres: Option<AnyRes>,
    resize: Option<(Size, Resample)>,
    crop: Option<(usize, usize)>,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
}

/// A `size` / `crop_size` entry; a bare number is a shortest edge, or a square side
/// where `square` (BLIP).
fn size_of(v: &Value, key: &str, square: bool) -> Result<Size> {
    match v {
        Value::Number(n) => {
            let n = n.as_u64().unwrap_or(0) as usize;
            Ok(if square {
                Size::Exact {
                    height: n,
                    width: n,
                }
            } else {
                Size::ShortestEdge(n)
            })
        }
        Value::Object(o) => {
            let get = |k: &str| o.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
            if let Some(s) = get("shortest_edge") {
                Ok(Size::ShortestEdge(s))
            } else if let (Some(height), Some(width)) = (get("height"), get("width")) {
                Ok(Size::Exact { height, width })
            } else {
                Err(Error::Config(format!(
                    "`{key}` needs shortest_edge or height and width"
                )))
            }
        }
        _ => Err(Error::Config(format!(
            "`{key}` must be a number or an object"
        ))),
    }
}

fn triple(v: Option<&Value>, default: [f32; 3], key: &str) -> Result<[f32; 3]> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| Error::Config(format!("`{key}` must hold numbers")))?
                    as f32;
            }
            Ok(out)
        }
        _ => Err(Error::Config(format!(
            "`{key}` must be a number or 3 numbers"
        ))),
    }
}

impl ImageProcessor {
    /// Reads `preprocessor_config.json`, or the `image_processor` block of
    /// `processor_config.json` (transformers 5), from a model folder.
    pub fn from_model_dir(dir: &Path) -> Result<ImageProcessor> {
        let read = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))
        };
        if let Some(v) = read("preprocessor_config.json")? {
            return Self::from_value(&v);
        }
        match read("processor_config.json")? {
            Some(v) => Self::from_value(v.get("image_processor").unwrap_or(&v)),
            None => Err(Error::Config(format!(
                "{}: no preprocessor_config.json or processor_config.json",
                dir.display()
            ))),
        }
    }

    pub fn from_value(v: &Value) -> Result<ImageProcessor> {
        let flag = |k: &str, d: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(d);
        // BLIP's and SigLIP's processors resize to a fixed size and never crop; CLIP's
        // and LLaVA's resize the shortest edge and center-crop. SigLIP's defaults: 224 ×
        // 224, mean and std 0.5.
        let mut tiled = false;
        let (blip, siglip) = match v.get("image_processor_type").and_then(|t| t.as_str()) {
            None => (false, false),
            Some(t) => match t.trim_end_matches("Fast").trim_end_matches("Pil") {
                "CLIPImageProcessor" | "LlavaImageProcessor" => (false, false),
                "LlavaNextImageProcessor" => {
                    tiled = true;
                    (false, false)
                }
                "BlipImageProcessor" | "IdeficsImageProcessor" => (true, false),
                "SiglipImageProcessor" => (true, true),
                _ => return Err(Error::Config(format!("unsupported image processor `{t}`"))),
            },
        };
        let resample = match v.get("resample").and_then(|r| r.as_u64()).unwrap_or(3) {
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            other => {
                return Err(Error::Config(format!(
                    "unsupported resample filter {other}"
                )))
            }
        };
        let resize = if flag("do_resize", true) {
            let default = if siglip {
                Size::Exact {
                    height: 224,
                    width: 224,
                }
            } else if blip {
                Size::Exact {
                    height: 384,
                    width: 384,
                }
            } else {
                Size::ShortestEdge(224)
            };
            let s = v
                .get("size")
                .map_or(Ok(default), |s| size_of(s, "size", blip))?;
            Some((s, resample))
        } else {
            None
        };
        let crop = if flag("do_center_crop", !blip) {
            match v.get("crop_size").map_or(
                Ok(Size::Exact {
                    height: 224,
                    width: 224,
                }),
                |s| size_of(s, "crop_size", true),
            )? {
                Size::Exact { height, width } => Some((height, width)),
                Size::ShortestEdge(s) => Some((s, s)),
            }
        } else {
            None
        };
        let rescale = flag("do_rescale", true).then(|| {
            v.get("rescale_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0 / 255.0)
        });
        let (mean, std) = if siglip {
            ([0.5; 3], [0.5; 3])
        } else {
            (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        };
        let normalize = if flag("do_normalize", true) {
            Some((
                triple(v.get("image_mean"), mean, "image_mean")?,
                triple(v.get("image_std"), std, "image_std")?,
            ))
        } else {
            None
        };
        let anyres = if tiled {
            Some(AnyRes::from_value(v, resize.as_ref().map(|r| &r.0), crop)?)
        } else {
            None
        };
        let p = ImageProcessor {
            do_pad: !tiled && flag("do_pad", false),
            anyres,
            resize,
            crop,
            rescale,
            normalize,
        };
        if matches!(
            p.resize,
            Some((Size::ShortestEdge(0), _))
                | Some((
                    Size::Exact { height: 0, .. } | Size::Exact { width: 0, .. },
                    _
                ))
        ) || matches!(p.crop, Some((0, _)) | Some((_, 0)))
        {
            return Err(Error::Config("sizes must be positive".into()));
        }
        Ok(p)
    }

    /// The shape of the pixel values this processor produces for an image of `w×h`:
    /// `[3, H, W]`, or `[tiles, 3, H, W]` where it tiles.
    pub fn output_shape(&self, w: usize, h: usize) -> Vec<usize> {
        match &self.anyres {
            Some(a) => {
                let (th, tw) = self.output_size(a.tile, a.tile);
                vec![a.tiles(h, w), 3, th, tw]
            }
            None => {
                let (oh, ow) = self.output_size(w, h);
                vec![3, oh, ow]
            }
        }
    }

    /// The `(height, width)` of the pixel values this processor produces for an image
    /// (or a tile) of `w×h`.
    fn output_size(&self, w: usize, h: usize) -> (usize, usize) {
        let (mut w, mut h) = (w, h);
        if self.do_pad {
            let m = w.max(h);
            (w, h) = (m, m);
        }
        if let Some((s, _)) = &self.resize {
            (h, w) = resized(s, w, h);
        }
        self.crop.unwrap_or((h, w))
    }

    /// `pixel_values` (f32, channel-first) of one RGB image, of
    /// [`ImageProcessor::output_shape`].
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let (w, h) = (img.width, img.height);
        if w == 0 || h == 0 || img.data.len() != w * h * 3 {
            return Err(Error::Empty);
        }
        let Some(a) = &self.anyres else {
            return self.process(img.data.clone(), w, h);
        };
        let mut out = Vec::new();
        for (px, tw, th) in a.tiles_of(&img.data, w, h, self.filter())? {
            out.extend(self.process(px, tw, th)?);
        }
        Ok(out)
    }

    fn filter(&self) -> Resample {
        self.resize.as_ref().map_or(Resample::Bicubic, |r| r.1)
    }

    /// One image (or tile) of `w×h` RGB bytes: pad, resize, crop, rescale, normalise.
    fn process(&self, mut px: Vec<u8>, mut w: usize, mut h: usize) -> Result<Vec<f32>> {
        if self.do_pad && w != h {
            let (mean, _) = self
                .normalize
                .unwrap_or((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD));
            let bg: Vec<u8> = mean.iter().map(|m| (*m as f64 * 255.0) as u8).collect();
            let m = w.max(h);
            let mut out: Vec<u8> = (0..m * m).flat_map(|_| bg.iter().copied()).collect();
            let (oy, ox) = ((m - h) / 2, (m - w) / 2);
            for y in 0..h {
                let dst = ((y + oy) * m + ox) * 3;
                out[dst..dst + w * 3].copy_from_slice(&px[y * w * 3..(y + 1) * w * 3]);
            }
            (px, w, h) = (out, m, m);
        }
        if let Some((s, filter)) = &self.resize {
            let (nh, nw) = resized(s, w, h);
            if nh == 0 || nw == 0 {
                return Err(Error::Corrupt(format!(
                    "a {w}x{h} image resizes to nothing"
                )));
            }
            px = resize(&px, w, h, nw, nh, *filter);
            (w, h) = (nw, nh);
        }
        if let Some((ch, cw)) = self.crop {
            (px, w, h) = center_crop(&px, w, h, ch, cw);
        }
        let mut out = vec![0f32; 3 * h * w];
        for (i, rgb) in px.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x = match self.rescale {
                    Some(f) => (rgb[c] as f64 * f) as f32,
                    None => rgb[c] as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * h * w + i] = x;
            }
        }
        Ok(out)
    }
}

/// HF's `select_best_resolution`: of the `(height, width)` resolutions, the one that
/// keeps the most of an `h×w` image's pixels once it is scaled to fit, then wastes
/// the fewest; the first of equals.
pub fn select_best_resolution(h: usize, w: usize, pinpoints: &[[usize; 2]]) -> [usize; 2] {
    let mut best = pinpoints[0];
    let (mut most, mut least_waste) = (0usize, usize::MAX);
    for &[ph, pw] in pinpoints {
        let scale = (pw as f64 / w as f64).min(ph as f64 / h as f64);
        let (dw, dh) = ((w as f64 * scale) as usize, (h as f64 * scale) as usize);
        let effective = (dw * dh).min(w * h);
        let waste = (pw * ph).saturating_sub(effective);
        if effective > most || (effective == most && waste < least_waste) {
            (most, least_waste, best) = (effective, waste, [ph, pw]);
        }
    }
    best
}

/// HF's default `image_grid_pinpoints` (LLaVA-1.6 at 336 pixels).
pub const DEFAULT_PINPOINTS: [[usize; 2]; 5] =
    [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

/// An `image_grid_pinpoints` value: `(height, width)` pairs, positive; absent is HF's
/// default list.
pub fn grid_pinpoints(v: Option<&Value>) -> Result<Vec<[usize; 2]>> {
    let bad = || Error::Config("`image_grid_pinpoints` must be [height, width] pairs".into());
    match v {
        None | Some(Value::Null) => Ok(DEFAULT_PINPOINTS.to_vec()),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|p| match p.as_array().map(|p| p.as_slice()) {
                Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                    (Some(h), Some(w)) if h > 0 && w > 0 => Ok([h as usize, w as usize]),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

impl AnyRes {
    fn from_value(v: &Value, size: Option<&Size>, crop: Option<(usize, usize)>) -> Result<AnyRes> {
        let pinpoints = grid_pinpoints(v.get("image_grid_pinpoints"))?;
        // The tile side and the base size, as `_preprocess` picks them.
        let base = match size {
            Some(Size::Exact { height, width }) => (*height, *width),
            Some(Size::ShortestEdge(s)) => (*s, *s),
            None => (224, 224),
        };
        let tile = match (crop, size) {
            (Some((ch, _)), _) => ch,
            (None, Some(Size::Exact { height, .. })) => *height,
            _ => base.0,
        };
        if tile == 0 || base.0 == 0 || base.1 == 0 {
            return Err(Error::Config("sizes must be positive".into()));
        }
        Ok(AnyRes {
            pinpoints,
            tile,
            base,
        })
    }

    /// Tiles an `h×w` image becomes: the base, then its grid's (HF's
    /// `image_size_to_num_patches`).
    fn tiles(&self, h: usize, w: usize) -> usize {
        let [bh, bw] = select_best_resolution(h, w, &self.pinpoints);
        1 + bh.div_ceil(self.tile) * bw.div_ceil(self.tile)
    }

    /// The base image, then the grid's tiles row by row, as RGB bytes with their sizes.
    fn tiles_of(
        &self,
        px: &[u8],
        w: usize,
        h: usize,
        filter: Resample,
    ) -> Result<Vec<(Vec<u8>, usize, usize)>> {
        let [bh, bw] = select_best_resolution(h, w, &self.pinpoints);
        // `get_patch_output_size`: fit inside the best resolution, aspect kept.
        let (sw, sh) = (bw as f64 / w as f64, bh as f64 / h as f64);
        let (nh, nw) = if sw < sh {
            (((h as f64 * sw).ceil() as usize).min(bh), bw)
        } else {
            (bh, ((w as f64 * sh).ceil() as usize).min(bw))
        };
        if nh == 0 || nw == 0 {
            return Err(Error::Corrupt(format!(
                "a {w}x{h} image resizes to nothing"
            )));
        }
        let resized = resize(px, w, h, nw, nh, filter);
        // Zero padding around it, the odd pixel after (`_get_padding_size`).
        let (top, left) = ((bh - nh) / 2, (bw - nw) / 2);
        let mut padded = vec![0u8; bh * bw * 3];
        for y in 0..nh {
            let d = ((top + y) * bw + left) * 3;
            padded[d..d + nw * 3].copy_from_slice(&resized[y * nw * 3..(y + 1) * nw * 3]);
        }
        let (bth, btw) = self.base;
        let mut tiles = vec![(resize(px, w, h, btw, bth, filter), btw, bth)];
        // `divide_to_patches`: row-major, the last row and column cut short.
        for y0 in (0..bh).step_by(self.tile) {
            for x0 in (0..bw).step_by(self.tile) {
                let (th, tw) = (self.tile.min(bh - y0), self.tile.min(bw - x0));
                let mut t = Vec::with_capacity(th * tw * 3);
                for y in y0..y0 + th {
                    t.extend_from_slice(&padded[(y * bw + x0) * 3..(y * bw + x0 + tw) * 3]);
                }
                tiles.push((t, tw, th));
            }
        }
        Ok(tiles)
    }
}

/// `(height, width)` after resizing, as HF's `get_resize_output_image_size`.
fn resized(s: &Size, w: usize, h: usize) -> (usize, usize) {
    match *s {
        Size::Exact { height, width } => (height, width),
        Size::ShortestEdge(size) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (size as f64 * long as f64 / short as f64) as usize;
            if w <= h {
                (new_long, size)
            } else {
                (size, new_long)
            }
        }
    }
}

/// HF's `center_crop`: top-left at `(orig − crop) // 2`, zero padding when the image is
/// smaller than the crop.
fn center_crop(px: &[u8], w: usize, h: usize, ch: usize, cw: usize) -> (Vec<u8>, usize, usize) {
    let (nh, nw) = (ch.max(h), cw.max(w));
    let (top_pad, left_pad) = ((nh - h).div_ceil(2), (nw - w).div_ceil(2));
    let top = (h as i64 - ch as i64).div_euclid(2) + top_pad as i64;
    let left = (w as i64 - cw as i64).div_euclid(2) + left_pad as i64;
    let mut out = vec![0u8; ch * cw * 3];
    for y in 0..ch {
        let sy = top + y as i64 - top_pad as i64;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..cw {
            let sx = left + x as i64 - left_pad as i64;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            let (s, d) = ((sy as usize * w + sx as usize) * 3, (y * cw + x) * 3);
            out[d..d + 3].copy_from_slice(&px[s..s + 3]);
        }
    }
    (out, cw, ch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shortest_edge_and_crop_sizes_follow_hf() {
        let p = ImageProcessor::from_value(
            &json!({"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}),
        )
        .unwrap();
        assert_eq!(resized(&Size::ShortestEdge(30), 57, 43), (30, 39));
        assert_eq!(resized(&Size::ShortestEdge(336), 640, 480), (336, 448));
        assert_eq!(p.output_size(57, 43), (30, 30));
        assert!(ImageProcessor::from_value(&json!({"resample": 0})).is_err());
        let blip =
            ImageProcessor::from_value(&json!({"image_processor_type": "BlipImageProcessor"}))
                .unwrap();
        assert_eq!(blip.output_size(57, 43), (384, 384));
        let siglip =
            ImageProcessor::from_value(&json!({"image_processor_type": "SiglipImageProcessor"}))
                .unwrap();
        assert_eq!(siglip.output_size(57, 43), (224, 224));
        assert!(ImageProcessor::from_value(
            &json!({"image_processor_type": "Qwen2VLImageProcessor"})
        )
        .is_err());
    }

    #[test]
    fn llava_next_tiles_to_the_best_resolution() {
        let pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];
        // Values computed with HF's `select_best_resolution`.
        assert_eq!(select_best_resolution(480, 640, &pins), [672, 672]);
        assert_eq!(select_best_resolution(300, 1200, &pins), [336, 1008]);
        assert_eq!(select_best_resolution(1000, 400, &pins), [1008, 336]);
        assert_eq!(select_best_resolution(336, 672, &pins), [336, 672]);
        let p = ImageProcessor::from_value(&json!({
            "image_processor_type": "LlavaNextImageProcessor",
            "size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30},
            "do_pad": true,
            "image_grid_pinpoints": [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]],
        }))
        .unwrap();
        assert_eq!(p.output_shape(57, 43), vec![5, 3, 30, 30]);
        assert_eq!(p.output_shape(100, 40), vec![4, 3, 30, 30]);
        let img = RgbImage {
            width: 100,
            height: 40,
            data: vec![128; 100 * 40 * 3],
        };
        assert_eq!(p.preprocess(&img).unwrap().len(), 4 * 3 * 30 * 30);
        for bad in [json!([]), json!([[0, 30]]), json!([30, 60]), json!("x")] {
            let v = json!({"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": bad});
            assert!(ImageProcessor::from_value(&v).is_err(), "{v}");
        }
    }

    #[test]
    fn crop_pads_small_images_with_zeros() {
        let px = vec![9u8; 2 * 2 * 3];
        let (out, w, h) = center_crop(&px, 2, 2, 4, 4);
        assert_eq!((w, h), (4, 4));
        assert_eq!(out[(4 + 1) * 3], 9);
        assert_eq!(out[0], 0);
    }
}
