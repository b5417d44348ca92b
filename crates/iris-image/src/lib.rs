//! Images in: decode PNG / JPEG / WebP within byte and pixel limits (dimensions are
//! read from the header before any pixel is decoded, so a decompression bomb is refused
//! unread), convert to RGB as HF does (alpha composited over white), and preprocess
//! exactly as the model's HF image processor (PIL backend): resize with PIL's
//! fixed-point two-pass resampling, center-crop, rescale, normalise.
#![forbid(unsafe_code)]

mod decode;
mod processor;
mod resample;

pub use decode::{decode, dimensions, ImageLimits, RgbImage};
pub use processor::{
    grid_pinpoints, select_best_resolution, ImageProcessor, Resample, DEFAULT_PINPOINTS,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image is {got} bytes, over the limit of {limit}")]
    TooManyBytes { got: usize, limit: usize },
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit}")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("image is empty (0 pixels)")]
    Empty,
    #[error("unrecognised or unsupported image format (supported: PNG, JPEG, WebP)")]
    UnknownFormat,
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("invalid image processor config: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, Error>;
