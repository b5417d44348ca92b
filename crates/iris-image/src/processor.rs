//! HF's CLIP / LLaVA image processor (`image_processing_pil_clip.py`,
//! `image_processing_pil_llava.py`, PIL backend): optional pad-to-square, resize
//! (shortest edge or fixed size), center-crop, rescale in f64 then cast to f32,
//! normalise in f32 — channel-first `pixel_values`.

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

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    do_pad: bool,
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
        let (blip, siglip) = match v.get("image_processor_type").and_then(|t| t.as_str()) {
            None => (false, false),
            Some(t) => match t.trim_end_matches("Fast").trim_end_matches("Pil") {
                "CLIPImageProcessor" | "LlavaImageProcessor" => (false, false),
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
        let p = ImageProcessor {
            do_pad: flag("do_pad", false),
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

    /// The `(height, width)` of the pixel values this processor produces for an image
    /// of `w×h`.
    pub fn output_size(&self, w: usize, h: usize) -> (usize, usize) {
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

    /// `pixel_values` `[3, H, W]` (f32, channel-first) of one RGB image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let (mut w, mut h) = (img.width, img.height);
        if w == 0 || h == 0 || img.data.len() != w * h * 3 {
            return Err(Error::Empty);
        }
        let mut px = img.data.clone();
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
    fn crop_pads_small_images_with_zeros() {
        let px = vec![9u8; 2 * 2 * 3];
        let (out, w, h) = center_crop(&px, 2, 2, 4, 4);
        assert_eq!((w, h), (4, 4));
        assert_eq!(out[(4 + 1) * 3], 9);
        assert_eq!(out[0], 0);
    }
}
