//! Where tensors live. The CPU backend is always there; the CUDA backend sits behind
//! the `cuda` feature, and without it `Device::cuda` returns a clear error so callers
//! need no `#[cfg]`.

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The `ordinal`-th GPU. Errors when CUDA support is not compiled in or the driver
    /// is absent.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        if cfg!(feature = "cuda") {
            Err(Error::Cuda(format!(
                "device {ordinal}: the CUDA kernels are not implemented yet; use the CPU"
            )))
        } else {
            Err(Error::NotCompiledWithCuda)
        }
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
    fn cuda_without_feature_is_a_clear_error() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        let err = Device::parse("cuda:0").unwrap_err().to_string();
        assert!(err.contains("CUDA"), "{err}");
        assert!(Device::parse("tpu").is_err());
    }
}
