//! The engine: a CUDA context and stream, loaded kernels, and launches.
//!
//! [`Engine`] owns a context, a non-default stream (CUDA graphs cannot capture the legacy
//! stream) and a [`Jit`]. Kernels are fetched through the JIT and loaded once per process.
//! Caller-owned device buffers are checked against the CPU-side description of the batch before
//! anything is launched.
//!
//! **Invariant:** this is the only module that launches kernels; every `unsafe` launch lives here.

mod decode;
mod prefill;

use std::sync::Arc;

use attnforge_cache::CacheKey;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum, CUstreamCaptureStatus};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use dashmap::DashMap;

pub use self::decode::{DecodeKernel, DeviceBatch, DeviceOutput};
pub use self::prefill::{PrefillFn, PrefillKernel};
use crate::abi::{ParamBlob, ParamField};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::plan::Upload;
use crate::spec::params::{ParamValue, ParamValues};
use crate::error::PlanError;
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
    /// Whether merge launches overlap the tail of the launch before them (programmatic
    /// dependent launch, sm_90+).
    programmatic_merge: bool,
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
        Ok(Engine { ctx, stream, arch: Arch::for_device(major as u32, minor as u32), name, sm_count, jit: Jit::new()?, modules: DashMap::new(), programmatic_merge: major >= 9 })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn arch(&self) -> &Arch {
        &self.arch
    }

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

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda("synchronize"))
    }

    /// Whether the engine's stream is being captured into a CUDA graph.
    pub fn capturing(&self) -> Result<bool> {
        let s = self.stream.capture_status().map_err(cuda("capture status"))?;
        Ok(s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Uploads a variant's parameter values (arrays go to device memory).
    pub fn upload_params(&self, layout: &[ParamField], values: &ParamValues) -> Result<DeviceParams> {
        let mut arrays: Vec<CudaSlice<u8>> = Vec::new();
        for v in values.values() {
            match v {
                ParamValue::I32s(xs) => arrays.push(self.upload(&xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?),
                ParamValue::F32s(xs) => arrays.push(self.upload(&xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?),
                ParamValue::Bits { data, offsets } => {
                    arrays.push(self.upload(data)?);
                    arrays.push(self.upload(&offsets.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?);
                }
                _ => {}
            }
        }
        let ptrs: Vec<u64> = arrays.iter().map(|a| a.device_ptr(&self.stream).0).collect();
        Ok(DeviceParams { blob: ParamBlob::pack(layout, values.values(), &ptrs), values: values.clone(), _arrays: arrays })
    }

    /// Uploads a plan into `bufs` with one host→device copy from pinned memory, allocating or
    /// growing the buffers as needed. A fixed-grid plan never reallocates buffers that a graph
    /// may have captured: it must fit them.
    pub fn upload_plan(&self, plan: &impl Upload, bufs: &mut Option<PlanBuffers>) -> Result<()> {
        let packed = plan.packed();
        let ws_floats = plan.workspace_bytes() / 4;
        let fits = bufs.as_ref().is_some_and(|b| b.plan.len() >= packed.len() && b.workspace.len() >= ws_floats);
        if !fits {
            if bufs.as_ref().is_some_and(|b| b.fixed) {
                return Err(PlanError::CapturedBuffersTooSmall.into());
            }
            // SAFETY: pinned host memory of `len` i32s, written before any copy reads it.
            let pinned = unsafe { self.ctx.alloc_pinned::<i32>(packed.len()) }.map_err(cuda("pinned alloc"))?;
            *bufs = Some(PlanBuffers {
                plan: self.alloc::<i32>(pinned.len())?,
                pinned,
                workspace: self.alloc::<f32>(ws_floats)?,
                fixed: plan.fixed(),
            });
        }
        let b = bufs.as_mut().ok_or(PlanError::NotUploaded)?;
        b.pinned.as_mut_slice().map_err(cuda("pinned access"))?[..packed.len()].copy_from_slice(&packed);
        // One copy of the whole pinned buffer; a tail left from a longer plan is never read
        // (the kernels read the counts first, and the launch passes this plan's offsets).
        self.stream.memcpy_htod(&b.pinned, &mut b.plan).map_err(cuda("upload plan"))?;
        Ok(())
    }
}

/// What a launch's shared checks need to know about the plan.
pub(crate) struct PlanShape {
    pub batch_size: usize,
    pub qo_heads: usize,
    pub packed_len: usize,
    pub fixed_grid: bool,
    pub workspace_bytes: usize,
    /// Partial-state slots the workspace is laid out for (o for every slot and head, then lse).
    pub partial_slots: usize,
}

impl Engine {
    /// The checks every launch makes before anything reaches the GPU — buffers against the
    /// CPU-side batch, the kernel's compile-time config, the plan, `bits` parameters, graph
    /// capture, workspace — and the kernel argument struct they vouch for, its partial-state
    /// pointers laid out in the workspace.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn checked_args<T: crate::kv::Element + DeviceRepr>(
        &self,
        cfg: &crate::jit::KernelConfig,
        decls: &[crate::spec::params::ParamDecl],
        plan: PlanShape,
        bufs: &PlanBuffers,
        params: &DeviceParams,
        batch: &crate::kv::Batch<'_>,
        dev: &DeviceBatch<'_, T>,
        out: &DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<crate::abi::DecodeArgs> {
        use crate::kv::LayoutError;
        let mismatch = |what: &'static str, expected: usize, got: usize| {
            if expected == got {
                Ok(())
            } else {
                Err(Error::InvalidBatch(LayoutError::Mismatch { what, expected, got }))
            }
        };
        let kv = batch.kv;
        batch.validate(dev.q.len(), dev.k.len(), if kv.interleaved { dev.k.len() } else { dev.v.len() })?;
        if T::DTYPE != cfg.dtype_q || T::DTYPE != cfg.dtype_kv || T::DTYPE != cfg.dtype_o {
            return Err(Error::UnsupportedConfig(format!("buffers are {} but the kernel was compiled for {}", T::DTYPE.name(), cfg.dtype_q.name())));
        }
        mismatch("head_dim_qk (kernel vs batch)", cfg.head_dim_qk, kv.head_dim_qk)?;
        mismatch("head_dim_vo (kernel vs batch)", cfg.head_dim_vo, kv.head_dim_vo)?;
        mismatch("GQA group (kernel vs qo_heads / kv_heads)", cfg.group, batch.group())?;
        mismatch("output length [total_q, qo_heads, head_dim_vo]", batch.o_elems(), out.o.len())?;
        mismatch("lse length [total_q, qo_heads]", batch.total_q() * batch.qo_heads, out.lse.len())?;
        let b = batch.batch_size();
        mismatch("device qo_indptr length", b + 1, dev.qo_indptr.len())?;
        mismatch("device kv_indptr length", b + 1, dev.kv_indptr.len())?;
        mismatch("device last_page_len length", b, dev.last_page_len.len())?;
        mismatch("device kv_indices length", batch.pages.indices.len().max(1), dev.kv_indices.len().max(1))?;
        mismatch("plan batch size", b, plan.batch_size)?;
        mismatch("plan qo_heads", batch.qo_heads, plan.qo_heads)?;
        let s = &self.stream;
        if kv.interleaved && dev.v.device_ptr(s).0 != dev.k.device_ptr(s).0 {
            return Err(Error::InvalidBatch(LayoutError::Mismatch { what: "interleaved cache: v must be the same buffer as k", expected: 0, got: 1 }));
        }
        params.check_bits(decls, batch)?;
        let sm_scale = crate::spec::params::resolve_sm_scale(sm_scale, kv.head_dim_qk).map_err(Error::Param)?;
        if bufs.plan.len() < plan.packed_len {
            return Err(PlanError::NotUploaded.into());
        }
        if bufs.workspace_bytes() < plan.workspace_bytes {
            return Err(PlanError::WorkspaceTooSmall { needed: plan.workspace_bytes, given: bufs.workspace_bytes() }.into());
        }
        if self.capturing()? && !plan.fixed_grid {
            return Err(PlanError::GraphNeedsFixedGrid.into());
        }
        let ptr = |x: &CudaSlice<i32>| x.device_ptr(s).0;
        let plan_ptr = bufs.plan.device_ptr(s).0;
        let ws = bufs.workspace.device_ptr(s).0;
        // `validate` checked every size against the kernels' index types (`KvShape::sizes`), so
        // these conversions cannot fail; they are checked rather than cast all the same.
        let sizes = kv.sizes()?;
        let (k_slot, k_head) = sizes.k_strides;
        let (v_slot, v_head) = sizes.v_strides;
        let i32_of = |x: usize, what: &'static str| i32::try_from(x).map_err(|_| Error::InvalidBatch(LayoutError::TooLarge { what, value: x as u128, limit: "2^31 - 1" }));
        let i64_of = |x: usize, what: &'static str| i64::try_from(x).map_err(|_| Error::InvalidBatch(LayoutError::TooLarge { what, value: x as u128, limit: "2^63 - 1" }));
        let elem = std::mem::size_of::<T>() as u64;
        Ok(crate::abi::DecodeArgs {
            q: dev.q.device_ptr(s).0,
            k: dev.k.device_ptr(s).0,
            v: dev.v.device_ptr(s).0 + kv.v_base() as u64 * elem,
            o: out.o.device_ptr(s).0,
            lse: out.lse.device_ptr(s).0,
            part_o: ws,
            part_lse: ws + (plan.partial_slots * batch.qo_heads * kv.head_dim_vo * 4) as u64,
            qo_indptr: ptr(dev.qo_indptr),
            kv_indptr: ptr(dev.kv_indptr),
            kv_indices: ptr(dev.kv_indices),
            last_page_len: ptr(dev.last_page_len),
            work: plan_ptr + 4 * crate::plan::PLAN_HEADER_INTS as u64,
            num_work: plan_ptr,
            k_page_stride: i64_of(sizes.k_page_stride, "K page stride")?,
            v_page_stride: i64_of(sizes.v_page_stride, "V page stride")?,
            k_slot_stride: i32_of(k_slot, "K slot stride")?,
            k_head_stride: i32_of(k_head, "K head stride")?,
            v_slot_stride: i32_of(v_slot, "V slot stride")?,
            v_head_stride: i32_of(v_head, "V head stride")?,
            page_size: i32_of(kv.page_size, "page_size")?,
            num_qo_heads: i32_of(batch.qo_heads, "qo_heads")?,
            sm_scale,
            page_shift: if kv.page_size.is_power_of_two() { kv.page_size.trailing_zeros() as i32 } else { -1 },
        })
    }
}

impl Engine {
    /// Launches `merge_states` over a plan's merge list, which starts `merge_offset` bytes into
    /// the packed plan (after the work list); nothing when the list is empty.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_merge(
        &self,
        func: &cudarc::driver::CudaFunction,
        args: &crate::abi::DecodeArgs,
        merge_offset: u64,
        merge_grid: usize,
        group: usize,
        qo_heads: usize,
        head_dim_vo: usize,
        params: &DeviceParams,
    ) -> Result<()> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        if merge_grid == 0 {
            return Ok(());
        }
        let margs = crate::abi::MergeArgs {
            o: args.o,
            lse: args.lse,
            part_o: args.part_o,
            part_lse: args.part_lse,
            work: args.num_work + merge_offset,
            num_work: args.num_work + 4, // header word 1: num_merge
            qo_indptr: args.qo_indptr,
            kv_indptr: args.kv_indptr,
            last_page_len: args.last_page_len,
            num_qo_heads: args.num_qo_heads,
            group: group as i32,
            page_size: args.page_size,
            sm_scale: args.sm_scale,
        };
        // Whole warps (merge_states reduces with shuffles), at most 4.
        let block = head_dim_vo.min(128).div_ceil(32) as u32 * 32;
        if !self.programmatic_merge {
            let cfg = LaunchConfig { grid_dim: (merge_grid as u32, qo_heads as u32, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the pointers are those of a launch checked by `checked_args`; the merge list
            // and the partial slots it reads were written by the plan upload and the preceding
            // launch.
            unsafe { self.stream.launch_builder(func).arg(&margs).arg(&params.blob).launch(cfg) }.map_err(cuda("launch merge"))?;
            return Ok(());
        }
        use cudarc::driver::sys;
        // SAFETY: zero is a valid bit pattern for the attribute union.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: merge_grid as u32,
            gridDimY: qo_heads as u32,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut kernel_params = [&margs as *const crate::abi::MergeArgs as *mut std::ffi::c_void, &params.blob as *const ParamBlob as *mut std::ffi::c_void];
        self.ctx.bind_to_thread().map_err(cuda("bind context"))?;
        // SAFETY: as above; in addition `kernel_params` points at the two kernel arguments, which
        // outlive the call (the driver copies them at launch), and merge_states reads the
        // partials only after `griddepcontrol.wait`, which waits for the preceding grid to
        // complete and its writes to be visible.
        let r = unsafe { sys::cuLaunchKernelEx(&cfg, func.cu_function(), kernel_params.as_mut_ptr(), std::ptr::null_mut()) };
        r.result().map_err(cuda("launch merge"))?;
        Ok(())
    }
}

/// A variant's parameters on the device: the blob passed by value, and the arrays it points to.
pub struct DeviceParams {
    pub blob: ParamBlob,
    /// The host values, to check `bits` matrices against each batch before a launch.
    values: ParamValues,
    _arrays: Vec<CudaSlice<u8>>,
}

impl DeviceParams {
    /// Errors unless every `bits` matrix covers every request of `batch` (the kernels read them
    /// without bounds checks).
    pub fn check_bits(&self, decls: &[crate::spec::params::ParamDecl], batch: &crate::kv::Batch<'_>) -> Result<()> {
        self.values.check_bits(decls, |b| (batch.q_len(b), batch.kv_len(b))).map_err(Error::Param)
    }
}

/// Device buffers of a plan: the packed work list and the f32 workspace for partial states.
pub struct PlanBuffers {
    pub plan: CudaSlice<i32>,
    pinned: cudarc::driver::PinnedHostSlice<i32>,
    pub workspace: CudaSlice<f32>,
    fixed: bool,
}

impl PlanBuffers {
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len() * 4
    }
}
