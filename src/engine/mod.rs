//! The engine: a CUDA context and stream, loaded kernels, and launches.
//!
//! [`Engine`] owns a context, a non-default stream (CUDA graphs cannot capture the legacy
//! stream) and a [`Jit`]. Kernels are fetched through the JIT and loaded once per process, one
//! loader for every kernel family (`family.rs`); every launch goes through one launcher
//! (`launch.rs`), which checks the caller's buffers against the validated batch first.
//!
//! Two ways to drive it:
//! - the two-call wrappers ([`DecodeWrapper`], [`PrefillWrapper`]): `plan` uploads the page table
//!   and the plan together in one pinned copy, `run` launches — the wrapper owns the kernel,
//!   parameters, buffers and workspace;
//! - the low-level calls, for callers who manage their own buffers: [`Engine::upload_table`],
//!   `plan_*`, [`Engine::upload_plan`], [`Engine::upload_params`], [`Engine::launch`].
//!
//! **Invariant:** this is the only module that launches kernels; every `unsafe` launch lives in
//! `launch.rs`.

mod buffers;
mod family;
mod launch;
mod merge;
mod wrapper;

use std::sync::Arc;

use attnforge_cache::CacheKey;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum, CUstreamCaptureStatus};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use dashmap::DashMap;

pub use self::buffers::{Capacity, DeviceBatch, DeviceOutput, DeviceParams, DeviceTable, KvCache, PlanBuffers};
pub use self::merge::{StateShape, States, StatesMut, MAX_MERGE_HEAD_DIM};
pub use self::family::{Decode, DecodeKernel, Family, Kernel, LoadedTile, Prefill, PrefillKernel};
pub use self::wrapper::{DecodeWrapper, GraphCapacity, PrefillWrapper, Wrapper, WrapperOptions};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::{Error, Result};

/// Whether the CUDA driver library can be loaded at all (cudarc panics on use if it cannot).
pub fn driver_present() -> bool {
    // SAFETY: probing only dlopens and dlcloses candidate library names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn cuda(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda { call: what.to_string(), detail: e.to_string() }
}

/// Function `entry` of `module`, opted in to `smem` bytes of dynamic shared memory, and how many
/// of its CTAs of `threads` threads fit on one SM (0: none can be resident). `what` names it in
/// errors.
fn load_entry(module: &Arc<CudaModule>, entry: &str, what: &str, threads: usize, smem: usize) -> Result<(CudaFunction, usize)> {
    let func = module.load_function(entry).map_err(|e| Error::Cuda { call: format!("load {what}"), detail: e.to_string() })?;
    func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(|e| Error::Cuda { call: format!("set shared memory size of {what}"), detail: e.to_string() })?;
    let resident = func
        .occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None)
        .map_err(|e| Error::Cuda { call: format!("occupancy of {what}"), detail: e.to_string() })?;
    Ok((func, resident as usize))
}

fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::NoGpu { reason: "no CUDA driver (libcuda.so) on this machine".into() });
    }
    CudaContext::new(ordinal).map_err(|e| Error::NoGpu { reason: format!("GPU {ordinal} is not usable: {e}") })
}

/// The compile target for GPU `ordinal`, or a clear error when there is no driver or no GPU.
pub fn device_arch(ordinal: usize) -> Result<Arch> {
    let ctx = context(ordinal)?;
    let (major, minor) = ctx.compute_capability().map_err(cuda("compute capability"))?;
    Ok(Arch::for_device(major as u32, minor as u32))
}

/// A GPU, a stream on it, and the kernels loaded there.
pub struct Engine {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    name: String,
    sm_count: usize,
    jit: Jit,
    modules: DashMap<CacheKey, Arc<CudaModule>>,
    /// The public state merge's kernel per output dtype, once loaded.
    merge_fns: DashMap<crate::kv::DType, CudaFunction>,
    /// Whether merge launches overlap the tail of the launch before them (programmatic
    /// dependent launch, sm_90+).
    programmatic_merge: bool,
    /// How the sm90 prefill loop's producer moves K/V.
    sm90_kv_copy: Sm90KvCopy,
    /// The most keys one tensor copy of the sm90 loop moves (8, 16, 32 or 64; the run is the
    /// largest of these dividing the page size). 16 unless `ATTNFORGE_SM90_TMA_RUN` (a developer
    /// knob for measurements) says otherwise.
    sm90_tma_run: usize,
}

/// `ATTNFORGE_SM90_TMA_RUN`'s value (8, 16, 32 or 64; unset 16, anything else a warning and
/// 16). At page 16, runs of 16 keys ran causal 16K d 128 at 642 TFLOP/s against 546–561 with
/// runs of 8 (H200, BENCHMARKS.md eleventh session); longer runs, which pages of 32 or 64 slots
/// could take, are tested (tier 2) but not yet timed, so the default stays at the measured 16.
fn sm90_tma_run_from_env() -> usize {
    match std::env::var("ATTNFORGE_SM90_TMA_RUN").as_deref() {
        Err(_) => 16,
        Ok(v) => match v.parse::<usize>() {
            Ok(n @ (8 | 16 | 32 | 64)) => n,
            _ => {
                eprintln!("attnforge: warning: ATTNFORGE_SM90_TMA_RUN={v:?} is not 8, 16, 32 or 64; using 16");
                16
            }
        },
    }
}

/// How the Hopper prefill loop's producer warpgroup moves K/V into shared memory
/// ([`Engine::set_sm90_kv_copy`]; `ATTNFORGE_SM90_KV_COPY=auto|tma|gather` sets it for a new
/// engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sm90KvCopy {
    /// Tensor copies wherever the cache takes them, gathers elsewhere (as `Tma`): measured
    /// faster at every head dim once the copies were spread over the producer warps (H200,
    /// causal 16K, BENCHMARKS.md eleventh session: d 64 389 against 191 TFLOP/s, d 128 642
    /// against 331, d 256 584 against 485-492, one call).
    #[default]
    Auto,
    /// TMA tensor copies of 8- to 64-key runs of a page wherever the cache takes them (pages of
    /// a multiple of 8 slots, 16-byte aligned buffers and strides); gathers elsewhere.
    Tma,
    /// 16-byte `cp.async` gathers always.
    Gather,
}

impl Sm90KvCopy {
    /// `ATTNFORGE_SM90_KV_COPY`'s value; unset is `Auto`, anything else a warning and `Auto`.
    fn from_env() -> Sm90KvCopy {
        match std::env::var("ATTNFORGE_SM90_KV_COPY").as_deref() {
            Err(_) | Ok("auto") => Sm90KvCopy::Auto,
            Ok("tma") => Sm90KvCopy::Tma,
            Ok("gather") => Sm90KvCopy::Gather,
            Ok(other) => {
                eprintln!("attnforge: warning: ATTNFORGE_SM90_KV_COPY={other:?} is not auto, tma or gather; using auto");
                Sm90KvCopy::Auto
            }
        }
    }
}

impl Engine {
    /// Opens GPU `ordinal`. Errors clearly when there is no driver, no GPU or no NVRTC.
    pub fn new(ordinal: usize) -> Result<Engine> {
        let ctx = context(ordinal)?;
        // SAFETY: attnforge issues all work on the engine's one stream (or a caller's stream it
        // is told about), so cudarc's cross-stream event tracking is not needed; it would also
        // record events inside graph captures.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda("create stream"))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda("compute capability"))?;
        let sm_count = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(cuda("SM count"))? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Engine { ctx, stream, arch: Arch::for_device(major as u32, minor as u32), name, sm_count, jit: Jit::new()?, modules: DashMap::new(), merge_fns: DashMap::new(), programmatic_merge: major >= 9, sm90_kv_copy: Sm90KvCopy::from_env(), sm90_tma_run: sm90_tma_run_from_env() })
    }

    /// The CUDA context (the primary context of its device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The engine's stream: uploads and launches go on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The arch kernels are compiled for.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// SMs of the GPU.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Shared memory one CTA may opt in to, in bytes (227 KB on Hopper).
    pub fn max_smem_per_block(&self) -> Result<usize> {
        let a = self.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map_err(cuda("shared memory per block"))?;
        Ok(a.max(0) as usize)
    }

    /// The GPU's name as the driver reports it ("NVIDIA H200").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90a, 132 SMs)".
    pub fn describe(&self) -> String {
        format!("{} ({}, {} SMs)", self.name, self.arch.name(), self.sm_count)
    }

    /// Whether a merge launch starts while the kernel writing its partials drains (programmatic
    /// dependent launch; on by default on sm_90 and newer, where the kernels support it).
    pub fn programmatic_merge(&self) -> bool {
        self.programmatic_merge
    }

    /// Turns the overlapped merge launch off (plain stream order) or back on; on GPUs older than
    /// sm_90 it stays off.
    pub fn set_programmatic_merge(&mut self, on: bool) {
        self.programmatic_merge = on && self.arch.major >= 9;
    }

    /// How the Hopper prefill loop moves K/V ([`Sm90KvCopy`]).
    pub fn sm90_kv_copy(&self) -> Sm90KvCopy {
        self.sm90_kv_copy
    }

    /// Picks how the Hopper prefill loop moves K/V (tuning and tests; the results are the same).
    pub fn set_sm90_kv_copy(&mut self, mode: Sm90KvCopy) {
        self.sm90_kv_copy = mode;
    }

    /// The most keys one tensor copy of the Hopper prefill loop moves ([`Engine::set_sm90_tma_run`]).
    pub fn sm90_tma_run(&self) -> usize {
        self.sm90_tma_run
    }

    /// Sets the most keys one tensor copy of the Hopper prefill loop moves: 8, 16, 32 or 64 (a
    /// launch takes the largest of these at most `max_run` that divides its page size; tuning
    /// and tests, the results are the same). `ATTNFORGE_SM90_TMA_RUN` sets it for a new engine.
    pub fn set_sm90_tma_run(&mut self, max_run: usize) -> Result<()> {
        if !matches!(max_run, 8 | 16 | 32 | 64) {
            return Err(Error::UnsupportedConfig(format!("sm90 tensor-copy run of {max_run} keys: 8, 16, 32 or 64")));
        }
        self.sm90_tma_run = max_run;
        Ok(())
    }

    /// The JIT (compiler and cache).
    pub fn jit(&self) -> &Jit {
        &self.jit
    }

    /// Loads a compiled kernel's module once per process.
    fn module(&self, k: &CompiledKernel) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.get(&k.key) {
            return Ok(m.clone());
        }
        let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(k.cubin.to_vec())).map_err(cuda("load module"))?;
        self.modules.insert(k.key, m.clone());
        Ok(m)
    }

    /// The public state merge's kernel for outputs of `dtype`, compiled (or found in the cache)
    /// and loaded on first use.
    fn merge_function(&self, dtype: crate::kv::DType) -> Result<CudaFunction> {
        if let Some(f) = self.merge_fns.get(&dtype) {
            return Ok(f.clone());
        }
        let k = self.jit.get_merge_states(dtype, &self.arch)?;
        let f = self.module(&k)?.load_function("attnforge_merge_states").map_err(cuda("load merge_states"))?;
        self.merge_fns.insert(dtype, f.clone());
        Ok(f)
    }

    /// Allocates a zeroed device buffer.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(cuda("allocate"))
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // SAFETY: a one-element buffer that nothing reads; a zero-length allocation fails.
            return unsafe { self.stream.alloc::<T>(1) }.map_err(cuda("allocate"));
        }
        self.stream.clone_htod(data).map_err(cuda("copy to device"))
    }

    /// Copies host data into an existing device buffer (lengths must match).
    pub fn copy_into<T: DeviceRepr>(&self, data: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if data.len() > dst.len() {
            return Err(Error::InvalidBatch(crate::kv::LayoutError::Mismatch { what: "device buffer capacity", expected: data.len(), got: dst.len() }));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(..data.len());
        self.stream.memcpy_htod(data, &mut view).map_err(cuda("copy to device"))
    }

    /// Copies a device buffer back to the host (synchronises the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(src).map_err(cuda("copy to host"))
    }

    /// Waits for the engine's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda("synchronize"))
    }

    /// Whether the engine's stream is being captured into a CUDA graph.
    pub fn capturing(&self) -> Result<bool> {
        let s = self.stream.capture_status().map_err(cuda("capture status"))?;
        Ok(s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }
}
