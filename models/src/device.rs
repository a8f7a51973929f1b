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

/// Lets float32 matrix products on CUDA use TF32 tensor cores (PyTorch's
/// `torch.backends.cuda.matmul.allow_tf32`; convolutions already may, cuDNN's default) and returns
/// the setting libtorch reports afterwards. tch has no binding for it, so the switch is libtorch's
/// own `at::Context::setAllowTF32CuBLAS`, found by its symbol in the loaded library.
pub fn allow_tf32(allow: bool) -> Result<bool> {
    let missing = || ModelError::Config {
        what: "tf32".into(),
        message: "libtorch does not export at::Context's TF32 switch (a different libtorch than torch 2.11?)"
            .into(),
    };
    // SAFETY: the symbols are libtorch's `at::globalContext()` (returns the process-wide context),
    // `at::Context::setAllowTF32CuBLAS(bool)` and `at::Context::allowTF32CuBLAS() const`, called with
    // the Itanium C++ ABI's member-function convention (the object as first argument).
    unsafe {
        let symbol = |name: &std::ffi::CStr| libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        let global = symbol(c"_ZN2at13globalContextEv");
        let set = symbol(c"_ZN2at7Context18setAllowTF32CuBLASEb");
        let get = symbol(c"_ZNK2at7Context15allowTF32CuBLASEv");
        if global.is_null() || set.is_null() || get.is_null() {
            return Err(missing());
        }
        type Global = unsafe extern "C" fn() -> *mut libc::c_void;
        type Set = unsafe extern "C" fn(*mut libc::c_void, bool);
        type Get = unsafe extern "C" fn(*const libc::c_void) -> bool;
        let context = std::mem::transmute::<*mut libc::c_void, Global>(global)();
        std::mem::transmute::<*mut libc::c_void, Set>(set)(context, allow);
        Ok(std::mem::transmute::<*mut libc::c_void, Get>(get)(context))
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

    #[test]
    fn the_tf32_switch_is_libtorchs_and_reads_back() {
        assert!(allow_tf32(true).unwrap());
        assert!(!allow_tf32(false).unwrap());
    }
}
