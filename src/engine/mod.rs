//! The engine: a CUDA context and stream, loaded kernels, and launches.
//!
//! **Invariant:** this is the only module that launches kernels; every `unsafe` launch lives here.

use crate::jit::Arch;
use crate::{Error, Result};

/// Whether the CUDA driver library can be loaded at all (cudarc panics on use if it cannot).
pub fn driver_present() -> bool {
    // SAFETY: probing only dlopens and dlcloses candidate library names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The compile target for GPU `ordinal`, or a clear error when there is no driver or no GPU.
pub fn device_arch(ordinal: usize) -> Result<Arch> {
    if !driver_present() {
        return Err(Error::Cuda("no CUDA driver (libcuda.so) on this machine, so no GPU".into()));
    }
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| Error::Cuda(format!("no usable GPU {ordinal}: {e}")))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| Error::Cuda(format!("compute capability: {e}")))?;
    Ok(Arch::for_device(major as u32, minor as u32))
}
