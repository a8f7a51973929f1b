//! Device selection: `auto` (CUDA when libtorch sees a GPU, else CPU), `cpu`, `cuda`, `cuda:N`.

use tch::Device;

use crate::error::{ModelError, Result};

/// Parses a device name from config.
pub fn parse_device(name: &str) -> Result<Device> {
    let bad = |message: String| ModelError::Config { what: "device".into(), message };
    match name.trim() {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0).ok_or_else(|| bad("CUDA requested but libtorch sees no GPU".into())),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i)
                .ok_or_else(|| bad(format!("`{other}`: libtorch sees {} GPU(s)", tch::Cuda::device_count()))),
            _ => Err(bad(format!("`{other}` is not one of auto, cpu, cuda, cuda:N"))),
        },
    }
}

fn cuda(index: usize) -> Option<Device> {
    (tch::Cuda::is_available() && (index as i64) < tch::Cuda::device_count()).then_some(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_garbage() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let auto = parse_device("auto").unwrap();
        assert_eq!(auto == Device::Cpu, !tch::Cuda::is_available());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`"), "{err}");
        if !tch::Cuda::is_available() {
            assert!(parse_device("cuda:0").is_err());
        }
    }
}
