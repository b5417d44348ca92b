//! Decoding with limits, and HF's RGB conversion.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader};

use crate::{Error, Result};

/// Bounds on what a request may make Iris decode.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // 20 MB of file; 40 MP (PIL warns at 89 MP, but nothing Iris serves needs more).
        ImageLimits {
            max_bytes: 20 << 20,
            max_pixels: 40_000_000,
        }
    }
}

/// 8-bit RGB pixels, row-major, interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes `bytes` into RGB within `limits`.
pub fn decode(bytes: &[u8], limits: ImageLimits) -> Result<RgbImage> {
    let (format, width, height) = header(bytes, limits)?;
    let pixels = width as u64 * height as u64;
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, width as usize, height as usize);
    }
    let mut r = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(width);
    l.max_image_height = Some(height);
    // Room for the decoded frame at up to 16 bits × 4 channels, plus decoder scratch.
    l.max_alloc = Some(pixels * 8 + (64 << 20));
    r.limits(l);
    let img = r.decode().map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(to_rgb(img))
}

/// An image's width and height from its header alone, checked against the limits
/// (size, format, pixels): what a gateway checks before any image is decoded.
pub fn dimensions(bytes: &[u8], limits: ImageLimits) -> Result<(u32, u32)> {
    header(bytes, limits).map(|(_, w, h)| (w, h))
}

fn header(bytes: &[u8], limits: ImageLimits) -> Result<(ImageFormat, u32, u32)> {
    if bytes.len() > limits.max_bytes {
        return Err(Error::TooManyBytes {
            got: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| Error::UnknownFormat)?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(Error::UnknownFormat);
    }
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(Error::Empty);
    }
    if pixels > limits.max_pixels {
        return Err(Error::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok((format, width, height))
}

/// JPEG through libjpeg-turbo's decoder (accurate integer IDCT, fancy upsampling), the
/// one PIL uses: other decoders differ from it by a few uint8 steps on many pixels.
fn decode_jpeg(bytes: &[u8], width: usize, height: usize) -> Result<RgbImage> {
    // libjpeg only warns on a truncated file and fills the rest with grey, where PIL
    // raises "image file is truncated". Entropy-coded data never holds 0xFF followed by
    // SOS (DA) or EOI (D9), so a complete file has an EOI after its last SOS.
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let complete = last_sos.is_some_and(|i| bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]));
    if !complete {
        return Err(Error::Corrupt(
            "JPEG data is truncated (no end-of-image marker)".into(),
        ));
    }
    // mozjpeg reports libjpeg's fatal errors by unwinding; catch them at this boundary.
    let out = std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        use mozjpeg::ColorSpace;
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK) {
            // libjpeg does not convert CMYK to RGB; PIL reads the CMYK (inverted when
            // an Adobe marker says so) and `convert("RGB")`s it.
            let mut started = d.to_colorspace(ColorSpace::JCS_CMYK)?;
            let cmyk = started.read_scanlines::<u8>()?;
            started.finish()?;
            return Ok(cmyk_to_rgb(&cmyk, adobe_marker(bytes)));
        }
        let mut started = d.rgb()?;
        let data = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(data)
    });
    match out {
        Ok(Ok(data)) if data.len() == width * height * 3 => Ok(RgbImage {
            width,
            height,
            data,
        }),
        Ok(Ok(data)) => Err(Error::Corrupt(format!(
            "JPEG decoded to {} bytes, expected {width}x{height}x3",
            data.len()
        ))),
        Ok(Err(e)) => Err(Error::Corrupt(e.to_string())),
        Err(_) => Err(Error::Corrupt(
            "libjpeg could not decode the JPEG data".into(),
        )),
    }
}

/// Whether the JPEG has an Adobe APP14 segment (before its first scan): its CMYK
/// channels are stored inverted, as Photoshop writes them (PIL's rawmode "CMYK;I").
fn adobe_marker(bytes: &[u8]) -> bool {
    let head = match bytes.windows(2).position(|w| w == [0xFF, 0xDA]) {
        Some(sos) => &bytes[..sos],
        None => bytes,
    };
    head.windows(9)
        .any(|w| w[..2] == [0xFF, 0xEE] && &w[4..9] == b"Adobe")
}

/// CMYK pixels to RGB as PIL's `cmyk2rgb`: r = (255 − c)(255 − k) / 255, rounded as its
/// `MULDIV255`; `inverted` channels are stored as 255 − value.
fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let v = |i: usize| match inverted {
            true => 255 - px[i] as u32,
            false => px[i] as u32,
        };
        let k = 255 - v(3);
        for c in 0..3 {
            out.push(muldiv255(255 - v(c), k) as u8);
        }
    }
    out
}

/// HF's `convert_to_rgb`: images with alpha are composited over opaque white with
/// PIL's integer `alpha_composite` arithmetic; others are converted directly.
fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for px in rgba.pixels() {
            let a = px[3] as u32;
            for &c in &px.0[..3] {
                // PIL AlphaComposite.c with an opaque destination of 255 (PRECISION_BITS 7).
                let tmp = (c as u32 * a + 255 * (255 - a)) * 128 + (0x80 << 7);
                out.push(((((tmp >> 8) + tmp) >> 8) >> 7) as u8);
            }
        }
        out
    } else if let DynamicImage::ImageLuma16(gray) = &img {
        // PIL opens a 16-bit grayscale PNG as "I;16", and its `convert("RGB")` clips
        // at 255 rather than scaling to 8 bits.
        gray.pixels()
            .flat_map(|p| [p[0].min(255) as u8; 3])
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    RgbImage {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        buf
    }

    #[test]
    fn decodes_and_enforces_limits() {
        let ok = decode(&png(5, 3), ImageLimits::default()).unwrap();
        assert_eq!((ok.width, ok.height, ok.data.len()), (5, 3, 45));
        assert_eq!(&ok.data[3..6], &[1, 0, 7]);
        let small = ImageLimits {
            max_bytes: 10,
            ..Default::default()
        };
        assert!(matches!(
            decode(&png(5, 3), small),
            Err(Error::TooManyBytes { .. })
        ));
        let few = ImageLimits {
            max_pixels: 14,
            ..Default::default()
        };
        assert!(matches!(
            decode(&png(5, 3), few),
            Err(Error::TooManyPixels { .. })
        ));
        assert!(matches!(
            decode(b"hello world", ImageLimits::default()),
            Err(Error::UnknownFormat)
        ));
        let mut truncated = png(50, 50);
        truncated.truncate(60);
        assert!(matches!(
            decode(&truncated, ImageLimits::default()),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn bomb_header_is_refused_before_decoding() {
        // A PNG header claiming 100000 x 100000 pixels, with no pixel data behind it.
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        // Keep the IHDR chunk valid: its CRC covers type + data (bytes 12..29).
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode(&bomb, ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooManyPixels {
                    pixels: 10_000_000_000,
                    ..
                }
            ),
            "{e}"
        );
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let img = image::RgbaImage::from_fn(2, 1, |x, _| {
            image::Rgba([0, 100, 200, if x == 0 { 0 } else { 128 }])
        });
        let rgb = to_rgb(DynamicImage::ImageRgba8(img));
        assert_eq!(&rgb.data[..3], &[255, 255, 255]);
        // PIL gives 127, 177, 227 for (0, 100, 200) at alpha 128 over white.
        assert_eq!(&rgb.data[3..], &[127, 177, 227]);
    }

    /// Color modes PIL converts on load, against what PIL made of them
    /// (`tools/gen_color_goldens.py`): a CMYK JPEG with an Adobe marker, a 16-bit
    /// grayscale PNG.
    #[test]
    fn cmyk_jpeg_and_16_bit_gray_png_decode_as_pil_converts_them() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images");
        let goldens: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/color_goldens.json")).unwrap(),
        )
        .unwrap();
        for name in ["cmyk.jpg", "gray16.png"] {
            let g = &goldens[name];
            let bytes = std::fs::read(format!("{dir}/{name}")).unwrap();
            let img = decode(&bytes, ImageLimits::default()).unwrap();
            assert_eq!(
                (img.width as u64, img.height as u64),
                (g["width"].as_u64().unwrap(), g["height"].as_u64().unwrap())
            );
            let want: Vec<u8> = g["rgb"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(img.data, want, "{name}");
        }
    }
}
