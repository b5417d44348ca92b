//! Where tensors live. The CPU backend is always there; the CUDA backend sits behind
//! the `cuda` feature, and without it `Device::cuda` returns a clear error so callers
//! need no `#[cfg]`.

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The `ordinal`-th GPU. Errors when CUDA support is not compiled in or the driver
    /// is absent.
    /// Opening a device compiles its kernels (once per process).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::gpu(ordinal).map(|_| Device::Cuda(ordinal))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::NotCompiledWithCuda)
        }
    }

    /// Waits until the device has finished the work queued on it (timing; a no-op on
    /// the CPU, whose operations finish before they return).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => crate::cuda::synchronize(*n),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::NotCompiledWithCuda),
        }
    }

    /// Whether this build has the CUDA backend.
    pub fn cuda_compiled() -> bool {
        cfg!(feature = "cuda")
    }

    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::cuda(n),
                None => Err(Error::Cuda(format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert!(Device::parse("tpu").is_err());
        if std::env::var_os("IRIS_TEST_DEVICE").is_some() {
            return; // a GPU machine: the backend suite opens it
        }
        // Without the feature, or without a driver or GPU: an error naming CUDA.
        let err = Device::parse("cuda:0").unwrap_err().to_string();
        assert!(err.contains("CUDA"), "{err}");
    }
}
