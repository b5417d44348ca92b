//! Iris' tensor runtime: contiguous row-major tensors in f32, bf16 or f16 on a
//! [`Device`], and every operation the models compose — linear layers, norms, RoPE,
//! attention over given keys or over the paged KV cache, gathers, gating, sampling —
//! as a method of one backend trait (`storage::BackendStorage`) that the CPU backend
//! (`cpu/`) implements and the CUDA backend plugs into. Model code composes tensor
//! operations; host memory is reached only in this crate and through the explicit
//! copies loaders, the wire and tests use.
//!
//! Activations are kept in f32; weights keep their storage dtype and are widened inside
//! the matrix kernels, so decode reads 2 bytes per bf16 weight. To follow a bf16
//! reference (PyTorch rounds every op's output to bf16), model code calls
//! [`Tensor::round_to`] where PyTorch would have produced a bf16 tensor.

mod activation;
pub mod attention;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod kv;
mod rope;
pub mod sample;
mod storage;
mod tensor;
mod weight;

pub use activation::Activation;
pub use cpu::ops::{round_scalar, softmax_in_place, softmax_scaled_in_place};
pub use cpu::{kernels, packed, quant};
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use rope::RopeTable;
pub use tensor::Tensor;
pub use weight::{linear, Weight};
/// Runs `f` on a thread of the rayon pool (inline when already on one): a model's
/// parallel loops then fork from a worker, work stealing, instead of each handing its
/// work to the pool and sleeping on a latch until it is done — a round trip through the
/// kernel's scheduler per loop, and a decode step has ~150 of them.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Keeps freed memory in the process. A forward pass allocates and frees tensors of
/// megabytes every layer; glibc by default hands those back to the kernel (`mmap` /
/// `munmap`, heap trimming), so the next layer page-faults fresh zeroed pages in again:
/// 8-9% of a 608-token prefill, half of its system time. Call once, first thing in
/// `main` (a no-op off glibc).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads run.
    unsafe {
        // The largest threshold glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
