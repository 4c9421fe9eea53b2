//! Where a model's weights, cache and activations live: the CPU, or an NVIDIA GPU when the
//! worker is built with the `cuda` feature (`deploy/cuda/build.sh`).

use crate::error::{Error, Result};
use candle_core::Device;

/// Parses `--device`: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Unsupported(format!(
                    "device {other:?} (use cpu, cuda or cuda:N)"
                )));
            }
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Unsupported(format!(
        "device cuda:{ordinal}: this worker was built without the `cuda` feature \
         (deploy/cuda/build.sh builds one with it)"
    )))
}

/// A short name for logs and metrics: `cpu` or `cuda:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_bad_names_say_what_is_accepted() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(name(&Device::Cpu), "cpu");
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(e.contains("use cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        for s in ["cuda", "cuda:1"] {
            let e = parse_device(s).unwrap_err().to_string();
            assert!(e.contains("without the `cuda` feature"), "{s}: {e}");
            assert!(e.contains("deploy/cuda/build.sh"), "{s}: {e}");
        }
    }
}
