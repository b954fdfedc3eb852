//! Launches: the one place kernels are started. Every launch goes through [`Engine::launch`]:
//! the checks, the argument struct, the main kernel on the chosen tile, then `merge_states`
//! when the plan split.
//!
//! **Invariant:** nothing is launched before [`checked_args`] has checked the buffers against
//! the validated batch, the kernel's config against the batch, the plan against the batch (its
//! fingerprint) and against what was uploaded, the workspace, the softmax scale and every `bits`
//! matrix; the index arrays come from a [`DeviceTable`] (or a wrapper's equivalent), whose
//! contents the engine validated and uploaded itself.

use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::buffers::{check_len, plan_id, DeviceBatch, DeviceOutput, DeviceParams, DeviceTable, PlanBuffers};
use super::family::{Family, Kernel};
use super::{cuda, Engine};
use crate::abi::{AttnArgs, MergeArgs, ParamBlob};
use crate::error::PlanError;
use crate::kv::{Element, LayoutError, ValidBatch};
use crate::plan::{Plan, PLAN_HEADER_INTS};
use crate::{Error, Result};

/// The sm90 prefill loop's K/V tensor maps (pipeline.cuh's `AfKvMaps`, the kernel's third
/// parameter): with them its producer loads each run of 8 to 64 keys of a page with one tensor
/// copy per 64-column panel instead of 16-byte gathers. They are made when the engine's
/// [`super::Sm90KvCopy`] asks for them (by default always) and the cache's pages hold a multiple
/// of 8 slots, with 16-byte aligned buffers and strides; otherwise (page size 1, say) `mode` is
/// 0 and the producer gathers, as ARCHITECTURE.md says.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
pub(crate) struct KvMaps {
    k: cudarc::driver::sys::CUtensorMap,
    v: cudarc::driver::sys::CUtensorMap,
    mode: i32,
    slot_first: i32,
    /// Keys per tensor copy: 8, 16, 32 or 64, dividing the page size.
    run: i32,
}

const _: () = assert!(std::mem::size_of::<KvMaps>() == 384 && std::mem::align_of::<KvMaps>() == 128, "KvMaps is pipeline.cuh's AfKvMaps");

// SAFETY: plain bytes, passed by value as a kernel parameter of the same layout (128-aligned,
// two 128-byte maps then two ints; pipeline.cuh).
unsafe impl DeviceRepr for KvMaps {}

impl KvMaps {
    /// Tensor maps over `args`' K and V buffers, when `mode` asks for them at these head dims
    /// ([`super::Sm90KvCopy`]) and the cache takes them.
    /// A tensor copy moves a run of the largest of 8, 16, 32 and 64 keys that divides the page
    /// size and is at most `max_run`.
    pub(crate) fn new<T: Element>(args: &AttnArgs, batch: &ValidBatch<'_>, mode: super::Sm90KvCopy, max_run: usize) -> KvMaps {
        let kv = batch.kv;
        let zero = cudarc::driver::sys::CUtensorMap { opaque: [0; 16] };
        let gather = KvMaps { k: zero, v: zero, mode: 0, slot_first: 0, run: 8 };
        let wanted = match mode {
            super::Sm90KvCopy::Tma => true,
            super::Sm90KvCopy::Gather => false,
            super::Sm90KvCopy::Auto => true,
        };
        if !wanted {
            return gather;
        }
        let (k_slot, k_head) = (args.k_slot_stride as u64, args.k_head_stride as u64);
        let (v_slot, v_head) = (args.v_slot_stride as u64, args.v_head_stride as u64);
        let slot_first = k_slot < k_head;
        let run = tma_run(kv.page_size, max_run);
        let k = encode_kv_map::<T>(args.k, kv.head_dim_qk, kv.page_size, kv.kv_heads, kv.num_pages, k_slot, k_head, args.k_page_stride as u64, slot_first, run);
        let v = encode_kv_map::<T>(args.v, kv.head_dim_vo, kv.page_size, kv.kv_heads, kv.num_pages, v_slot, v_head, args.v_page_stride as u64, slot_first, run);
        match (k, v) {
            (Some(k), Some(v)) if (v_slot < v_head) == slot_first => KvMaps { k, v, mode: 1, slot_first: slot_first as i32, run: run as i32 },
            _ => gather,
        }
    }
}

/// The keys of one tensor copy for pages of `page_size` slots: the largest of 8, 16, 32 and 64
/// that divides it and is at most `max_run` (at least 8; a page size not a multiple of 8 takes
/// no tensor copies, [`kv_map_shape`]).
fn tma_run(page_size: usize, max_run: usize) -> usize {
    [64, 32, 16].into_iter().find(|&r| r <= max_run && page_size % r == 0).unwrap_or(8)
}

/// One side's map, as (dims, byte strides of dims 1..3, box): dims (innermost first) head dim,
/// then slot and head in stride order, then page; a box of 64 columns of `run` slots of one
/// head of one page. `None` when the cache does not take it (pages not of a multiple of `run`
/// (and 8) slots, head dims not of whole 64-column panels, unaligned buffer or strides, extents
/// past the maps').
#[allow(clippy::too_many_arguments)]
fn kv_map_shape(elem: u64, ptr: u64, head_dim: usize, page_size: usize, heads: usize, pages: usize, slot_stride: u64, head_stride: u64, page_stride: u64, slot_first: bool, run: usize) -> Option<([u64; 4], [u64; 3], [u32; 4])> {
    let strides_ok = [slot_stride, head_stride, page_stride].iter().all(|&s| s.checked_mul(elem).is_some_and(|b| b % 16 == 0 && b < (1 << 40)));
    if !matches!(run, 8 | 16 | 32 | 64) || page_size == 0 || page_size % run != 0 || page_size % 8 != 0 || head_dim == 0 || head_dim % 64 != 0 || ptr % 16 != 0 || !strides_ok || pages == 0 || [page_size, heads, pages].iter().any(|&d| d as u64 > u32::MAX as u64) {
        return None;
    }
    let (d1, s1, d2, s2) = if slot_first { (page_size, slot_stride, heads, head_stride) } else { (heads, head_stride, page_size, slot_stride) };
    Some((
        [head_dim as u64, d1 as u64, d2 as u64, pages as u64],
        [s1 * elem, s2 * elem, page_stride * elem],
        [64, if slot_first { run as u32 } else { 1 }, if slot_first { 1 } else { run as u32 }, 1],
    ))
}

/// One side's map ([`kv_map_shape`]), 128-byte swizzled (the sm90 loop's panels). `None` when
/// the cache does not take it or the driver refuses it.
#[allow(clippy::too_many_arguments)]
fn encode_kv_map<T: Element>(ptr: u64, head_dim: usize, page_size: usize, heads: usize, pages: usize, slot_stride: u64, head_stride: u64, page_stride: u64, slot_first: bool, run: usize) -> Option<cudarc::driver::sys::CUtensorMap> {
    use cudarc::driver::sys;
    let elem = std::mem::size_of::<T>() as u64;
    let dtype = match T::DTYPE {
        crate::kv::DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        crate::kv::DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        crate::kv::DType::F32 => return None,
    };
    let (dims, strides, boxd) = kv_map_shape(elem, ptr, head_dim, page_size, heads, pages, slot_stride, head_stride, page_stride, slot_first, run)?;
    let estr: [u32; 4] = [1; 4];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length (strides one less), `map` is writable, and the
    // pointer is the device address of the validated buffer (the driver only records it).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(map)
}

/// Where one launch's plan, workspace and index arrays are on the device.
pub(crate) struct Step<'a> {
    pub batch: ValidBatch<'a>,
    /// The packed plan (header first).
    pub plan: u64,
    /// The plan's identity when it was uploaded ([`plan_id`]).
    pub uploaded: Option<u64>,
    pub workspace: u64,
    pub workspace_bytes: usize,
    /// qo_indptr, kv_indptr, kv_indices, last_page_len.
    pub table: [u64; 4],
    /// Query tokens the query and output buffers hold when the launch may be captured and
    /// replayed on other batches (a fixed table, a wrapper in graph mode); `None`: exactly the
    /// batch's.
    pub token_capacity: Option<usize>,
    /// The prefill kernel a decode cascade plan's prefix level runs on ([`crate::plan::Plan::prefix`]).
    pub companion: Option<&'a super::PrefillKernel>,
}

/// Checks everything a launch relies on (see the module docs) and builds the argument struct.
#[allow(clippy::too_many_arguments)]
pub(crate) fn checked_args<F: Family, T: Element + DeviceRepr>(
    e: &Engine,
    stream: &CudaStream,
    k: &Kernel<F>,
    plan: &F::Plan,
    step: &Step<'_>,
    params: &DeviceParams,
    dev: &DeviceBatch<'_, T>,
    out: &DeviceOutput<'_, T>,
    sm_scale: Option<f32>,
) -> Result<AttnArgs> {
    let cfg = &k.cfg;
    let batch = &step.batch;
    let kv = batch.kv;
    let (kb, vb) = dev.kv.buffers();
    // Query and output rows: exactly the batch's, or at least the capacity a graph replays in.
    let rows = step.token_capacity.unwrap_or(batch.total_q()) * batch.qo_heads;
    let fit = |what: &'static str, need: usize, got: usize| match step.token_capacity {
        None => check_len(what, need, got),
        Some(_) if got >= need => Ok(()),
        Some(_) => Err(Error::InvalidBatch(LayoutError::Mismatch { what, expected: need, got })),
    };
    fit("query buffer length [tokens, qo_heads, head_dim_qk]", rows * kv.head_dim_qk, dev.q.len())?;
    batch.check_buffers(batch.q_elems(), kb.len(), vb.len())?;
    if T::DTYPE != cfg.dtype_q || T::DTYPE != cfg.dtype_kv || T::DTYPE != cfg.dtype_o {
        return Err(Error::UnsupportedConfig(format!("buffers are {} but the kernel was compiled for {}", T::DTYPE.name(), cfg.dtype_q.name())));
    }
    check_len("head_dim_qk (kernel vs batch)", cfg.head_dim_qk, kv.head_dim_qk)?;
    check_len("head_dim_vo (kernel vs batch)", cfg.head_dim_vo, kv.head_dim_vo)?;
    check_len("GQA group (kernel vs qo_heads / kv_heads)", cfg.group, batch.group())?;
    fit("output length [tokens, qo_heads, head_dim_vo]", rows * kv.head_dim_vo, out.o.len())?;
    fit("lse length [tokens, qo_heads]", rows, out.lse.len())?;
    if kv.interleaved && vb.device_ptr(stream).0 != kb.device_ptr(stream).0 {
        return Err(Error::InvalidBatch(LayoutError::Mismatch { what: "interleaved cache: v must be the same buffer as k", expected: 0, got: 1 }));
    }
    // The kernels move q, K, V and o in 16-byte vectors and the LSE in f32s.
    let v_ptr = vb.device_ptr(stream).0 + kv.v_base() as u64 * std::mem::size_of::<T>() as u64;
    for (what, ptr, align) in [("q", dev.q.device_ptr(stream).0, 16), ("k", kb.device_ptr(stream).0, 16), ("v", v_ptr, 16), ("o", out.o.device_ptr(stream).0, 16), ("lse", out.lse.device_ptr(stream).0, 4)] {
        if ptr % align != 0 {
            return Err(Error::InvalidBatch(LayoutError::Misaligned { what, address: ptr, align }));
        }
    }
    if plan.batch_fingerprint() != batch.fingerprint() || plan.batch_size() != batch.batch_size() || plan.qo_heads() != batch.qo_heads {
        return Err(PlanError::Invalid("the plan was made for another batch (plan the batch you run)".into()).into());
    }
    if step.uploaded != Some(plan_id(plan)) {
        return Err(PlanError::NotUploaded.into());
    }
    if step.workspace_bytes < plan.workspace_bytes() {
        return Err(PlanError::WorkspaceTooSmall { needed: plan.workspace_bytes(), given: step.workspace_bytes }.into());
    }
    params.check_bits(&k.variant.params, batch)?;
    let sm_scale = crate::spec::params::resolve_sm_scale(sm_scale, kv.head_dim_qk).map_err(Error::Param)?;
    let status = stream.capture_status().map_err(cuda("capture status"))?;
    if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE && !plan.fixed() {
        return Err(PlanError::GraphNeedsFixedGrid.into());
    }
    // `validated` checked every size against the kernels' index types, so these conversions
    // cannot fail; they are checked rather than cast all the same.
    let sizes = batch.sizes();
    let (k_slot, k_head) = sizes.k_strides;
    let (v_slot, v_head) = sizes.v_strides;
    let i32_of = |x: usize, what: &'static str| i32::try_from(x).map_err(|_| Error::InvalidBatch(LayoutError::TooLarge { what, value: x as u128, limit: "2^31 - 1" }));
    let i64_of = |x: usize, what: &'static str| i64::try_from(x).map_err(|_| Error::InvalidBatch(LayoutError::TooLarge { what, value: x as u128, limit: "2^63 - 1" }));
    let elem = std::mem::size_of::<T>() as u64;
    let ws = step.workspace;
    let _ = e;
    Ok(AttnArgs {
        q: dev.q.device_ptr(stream).0,
        k: kb.device_ptr(stream).0,
        v: vb.device_ptr(stream).0 + kv.v_base() as u64 * elem,
        o: out.o.device_ptr(stream).0,
        lse: out.lse.device_ptr(stream).0,
        part_o: ws,
        part_lse: ws + (plan.partial_slots() * batch.qo_heads * kv.head_dim_vo * 4) as u64,
        qo_indptr: step.table[0],
        kv_indptr: step.table[1],
        kv_indices: step.table[2],
        last_page_len: step.table[3],
        work: step.plan + 4 * PLAN_HEADER_INTS as u64,
        num_work: step.plan,
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

impl Engine {
    /// Launches `plan` with kernel `k` on the engine's stream: the checks of the module docs,
    /// the main kernel on the tile the plan runs on, then `merge_states` when the plan split.
    /// The index arrays are `table`'s, which must hold the batch the plan was made for.
    #[allow(clippy::too_many_arguments)]
    pub fn launch<F: Family, T: Element + DeviceRepr>(
        &self,
        k: &Kernel<F>,
        plan: &F::Plan,
        bufs: &PlanBuffers,
        params: &DeviceParams,
        table: &DeviceTable,
        dev: &DeviceBatch<'_, T>,
        out: DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        self.launch_step(&self.stream, k, plan, &self.step_of(bufs, table, None), params, dev, out, sm_scale)
    }

    /// Runs a decode cascade plan ([`Engine::plan_decode_cascade`]): the prefix level's group
    /// items on `pk` (the prefill kernel of the same variant), then the suffixes on `k`, then
    /// one merge, all on the engine's stream over `bufs`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_decode_cascade<T: Element + DeviceRepr>(
        &self,
        k: &super::DecodeKernel,
        pk: &super::PrefillKernel,
        plan: &crate::plan::DecodePlan,
        bufs: &PlanBuffers,
        params: &DeviceParams,
        table: &DeviceTable,
        dev: &DeviceBatch<'_, T>,
        out: DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        check_companion(k, pk, false)?;
        self.launch_step(&self.stream, k, plan, &self.step_of(bufs, table, Some(pk)), params, dev, out, sm_scale)
    }

    /// The step of a launch over caller-held plan buffers and an uploaded table.
    fn step_of<'a>(&self, bufs: &PlanBuffers, table: &'a DeviceTable, companion: Option<&'a super::PrefillKernel>) -> Step<'a> {
        Step {
            batch: table.batch(),
            plan: bufs.plan.ptr(self),
            uploaded: bufs.uploaded,
            workspace: bufs.workspace.device_ptr(&self.stream).0,
            workspace_bytes: bufs.workspace_bytes(),
            table: table.pointers(self),
            token_capacity: table.capacity().map(|c| c.max_tokens),
            companion,
        }
    }

    /// [`Engine::launch`] for decode.
    #[allow(clippy::too_many_arguments)]
    pub fn run_decode<T: Element + DeviceRepr>(
        &self,
        k: &super::DecodeKernel,
        plan: &crate::plan::DecodePlan,
        bufs: &PlanBuffers,
        params: &DeviceParams,
        table: &DeviceTable,
        dev: &DeviceBatch<'_, T>,
        out: DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        self.launch(k, plan, bufs, params, table, dev, out, sm_scale)
    }

    /// [`Engine::launch`] for prefill.
    #[allow(clippy::too_many_arguments)]
    pub fn run_prefill<T: Element + DeviceRepr>(
        &self,
        k: &super::PrefillKernel,
        plan: &crate::plan::PrefillPlan,
        bufs: &PlanBuffers,
        params: &DeviceParams,
        table: &DeviceTable,
        dev: &DeviceBatch<'_, T>,
        out: DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        self.launch(k, plan, bufs, params, table, dev, out, sm_scale)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_step<F: Family, T: Element + DeviceRepr>(
        &self,
        stream: &CudaStream,
        k: &Kernel<F>,
        plan: &F::Plan,
        step: &Step<'_>,
        params: &DeviceParams,
        dev: &DeviceBatch<'_, T>,
        out: DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        let args = checked_args(self, stream, k, plan, step, params, dev, &out, sm_scale)?;
        let kv = step.batch.kv;
        if let Some((pre, offset)) = plan.prefix() {
            // A decode cascade: its shared levels first, on the companion prefill kernel, into
            // the same workspace (slots disjoint from the suffixes'); the merge below reads both.
            let pk = step.companion.ok_or_else(|| Error::UnsupportedConfig("a decode cascade plan needs the prefill kernel of its variant: run it with Engine::run_decode_cascade".into()))?;
            // The plan checked above was uploaded whole, the prefix level with it.
            let pstep = Step { plan: step.plan + 4 * offset as u64, uploaded: Some(plan_id(pre)), companion: None, ..*step };
            self.launch_step(stream, pk, pre, &pstep, params, dev, DeviceOutput { o: &mut *out.o, lse: &mut *out.lse }, sm_scale)?;
        }
        // A plan without work items has nothing to compute, but a cascade's merge still writes
        // every token's (0, -inf).
        if plan.grid() > 0 {
            let tile = k.tile_for(plan)?;
            let launch = LaunchConfig {
                // Decode numbers these CTAs KV head first (decode.cu.tera).
                grid_dim: (plan.grid() as u32, kv.kv_heads as u32, 1),
                block_dim: F::block(&tile.cfg),
                shared_mem_bytes: tile.smem_bytes as u32,
            };
            let maps;
            let mut builder = stream.launch_builder(&tile.func);
            builder.arg(&args).arg(&params.blob);
            if tile.cfg.op == crate::jit::Op::Prefill && tile.cfg.prefill_tile().sm90 {
                // The Hopper prefill loop also takes the K/V tensor maps (by value), describing
                // the same K/V buffers as `args` (their extents are the validated cache's); the
                // kernel takes them as its third parameter (prefill.cu.tera, sm90).
                maps = KvMaps::new::<T>(&args, &step.batch, self.sm90_kv_copy, self.sm90_tma_run);
                builder.arg(&maps);
            }
            // SAFETY: every pointer comes from a live CudaSlice whose length `checked_args`
            // checked against the validated batch; the index arrays are the engine's own upload
            // of that batch (a DeviceTable or a wrapper's buffer), and the plan was made for it
            // (its fingerprint) and uploaded as it is (its id), so every work item indexes inside
            // them; the argument structs' layouts are static_asserted in the compiled source.
            // Every tile takes any plan of its family: the ring covers each item's span whatever
            // its key count. The tensor maps (sm90) outlive the launch, as `args` does.
            unsafe { builder.launch(launch) }.map_err(cuda("launch"))?;
        }
        // The packed plan holds the merge list after the work list.
        self.launch_merge(stream, &k.merge, &args, plan.merge_offset() as u64, plan.merge_grid(), k.cfg.group, step.batch.qo_heads, kv.head_dim_vo, &params.blob)
    }

    /// Launches `merge_states` over a plan's merge list, which starts `merge_offset` bytes into
    /// the packed plan; nothing when the list is empty.
    #[allow(clippy::too_many_arguments)]
    fn launch_merge(
        &self,
        stream: &CudaStream,
        func: &CudaFunction,
        args: &AttnArgs,
        merge_offset: u64,
        merge_grid: usize,
        group: usize,
        qo_heads: usize,
        head_dim_vo: usize,
        blob: &ParamBlob,
    ) -> Result<()> {
        if merge_grid == 0 {
            return Ok(());
        }
        let margs = MergeArgs {
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
            unsafe { stream.launch_builder(func).arg(&margs).arg(blob).launch(cfg) }.map_err(cuda("launch merge"))?;
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
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut kernel_params = [&margs as *const MergeArgs as *mut std::ffi::c_void, blob as *const ParamBlob as *mut std::ffi::c_void];
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

/// Checks that `pk` can run the prefix level of `k`'s decode cascades: the same variant (its
/// name; with `hooks`, every hook and parameter too), dtypes, head dims and GQA group.
pub(crate) fn check_companion<F: Family>(k: &Kernel<F>, pk: &super::PrefillKernel, hooks: bool) -> Result<()> {
    let (a, b) = (&k.cfg, &pk.cfg);
    let meaning = |v: &crate::spec::Variant| format!("{:?}", (&v.params, &v.logits, &v.mask, &v.kv_range, &v.sink, &v.normalize));
    if k.variant.name != pk.variant.name || (hooks && meaning(&k.variant) != meaning(&pk.variant)) || a.dtype_q != b.dtype_q || a.dtype_kv != b.dtype_kv || a.dtype_o != b.dtype_o || a.head_dim_qk != b.head_dim_qk || a.head_dim_vo != b.head_dim_vo || a.group != b.group {
        return Err(Error::UnsupportedConfig(format!(
            "the cascade's prefill kernel ({}) is not of the decode kernel's variant, dtypes, head dims and GQA group ({})",
            pk.cfg.entry_name(&pk.variant.name),
            k.cfg.entry_name(&k.variant.name)
        )));
    }
    Ok(())
}

impl Engine {
    /// Launches the public state merge (`merge.rs`): `ctas` CTAs of four warps, one row each.
    ///
    /// # Safety
    /// `args` satisfies [`Engine::merge_states_raw`]'s contract and `ctas` covers its rows.
    pub(crate) unsafe fn launch_state_merge(&self, stream: &CudaStream, func: &CudaFunction, args: &crate::abi::StateMergeArgs, ctas: u32) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (32, 4, 1), shared_mem_bytes: 0 };
        // SAFETY: the caller's contract; the kernel takes one StateMergeArgs by value, whose
        // layout the rendered source asserts.
        unsafe { stream.launch_builder(func).arg(args).launch(cfg) }.map_err(cuda("launch merge_states"))?;
        Ok(())
    }

    /// Checks the host–device ABI on this GPU: compiles the probe of
    /// [`crate::jit::render::abi_probe_source`], runs it, and compares every ABI struct's size
    /// and field offsets as the device compiler laid them out with Rust's (`offset_of!`). A
    /// mismatch is an error naming the struct and field.
    pub fn check_abi(&self) -> Result<()> {
        let src = crate::jit::render::abi_probe_source()?;
        let cubin = self.jit.nvrtc().compile(&src, &self.jit.nvrtc().options(&self.arch), None)?;
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(cuda("load the ABI probe"))?;
        let func = module.load_function("attnforge_abi_probe").map_err(cuda("load the ABI probe"))?;
        let layouts = crate::abi::layouts();
        let n: usize = layouts.iter().map(|l| 1 + l.fields.len()).sum();
        let mut out = self.alloc::<u64>(n)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the probe writes exactly `n` u64s (one per size and field of `layouts`, the
        // table it was rendered from) into `out`, which holds `n`.
        unsafe { self.stream.launch_builder(&func).arg(&mut out).launch(cfg) }.map_err(cuda("launch the ABI probe"))?;
        let got = self.download(&out)?;
        let mut at = 0;
        for l in &layouts {
            let expect = std::iter::once(("size", l.size)).chain(l.fields.iter().map(|f| (f.name, f.offset)));
            for (what, want) in expect {
                if got[at] != want as u64 {
                    return Err(Error::Render(format!("ABI mismatch: {}::{what} is {} on the device, {want} in src/abi.rs", l.name, got[at])));
                }
                at += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{kv_map_shape, tma_run};

    #[test]
    fn kv_maps_take_whole_runs_of_8_slots_in_either_layout() {
        // NHD [pages][16 slots][8 heads][128]: heads before slots (stride order), a box of 8 slots.
        let (d, h, p) = (128u64, 8u64, 16u64);
        let nhd = kv_map_shape(2, 0x1000, 128, 16, 8, 100, h * d, d, p * h * d, false, 8).unwrap();
        assert_eq!(nhd, ([128, 8, 16, 100], [d * 2, h * d * 2, p * h * d * 2], [64, 1, 8, 1]));
        // HND [pages][8 heads][16 slots][128]: slots first.
        let hnd = kv_map_shape(2, 0x1000, 128, 16, 8, 100, d, p * d, p * h * d, true, 8).unwrap();
        assert_eq!(hnd, ([128, 16, 8, 100], [d * 2, p * d * 2, p * h * d * 2], [64, 8, 1, 1]));
        // K and V interleaved in one buffer: twice the page stride.
        let kv = kv_map_shape(2, 0x1000, 192, 64, 4, 7, 4 * 192, 192, 2 * 64 * 4 * 192, false, 8).unwrap();
        assert_eq!(kv.0, [192, 4, 64, 7]);
        assert_eq!(kv.1[2], 2 * 64 * 4 * 192 * 2);
    }

    #[test]
    fn kv_maps_refuse_what_tensor_copies_cannot_move() {
        let ok = |page: usize, dim: usize, ptr: u64, slot: u64| kv_map_shape(2, ptr, dim, page, 8, 10, slot, dim as u64, page as u64 * slot, false, 8).is_some();
        assert!(ok(16, 128, 0, 8 * 128));
        for page in [1, 2, 4, 12, 0] {
            assert!(!ok(page, 128, 0, 8 * 128), "page size {page}");
        }
        assert!(!ok(16, 96, 0, 8 * 96), "head dim 96 is not whole panels");
        assert!(!ok(16, 128, 8, 8 * 128), "a buffer 8 bytes off 16");
        assert!(!ok(16, 128, 0, 8 * 128 + 4), "a slot stride of 8 bytes past 16");
        assert!(kv_map_shape(2, 0, 128, 16, 8, 0, 1024, 128, 16 * 1024, false, 8).is_none(), "no pages");
        assert!(kv_map_shape(2, 0, 128, 16, 8, 10, 1024, 128, u64::MAX / 2, false, 8).is_none(), "a stride past 2^40 bytes");
    }

    #[test]
    fn kv_maps_take_longer_runs_that_divide_the_page() {
        assert_eq!([tma_run(16, 8), tma_run(16, 16), tma_run(16, 64), tma_run(64, 64), tma_run(48, 64), tma_run(24, 64), tma_run(128, 32)], [8, 16, 16, 64, 16, 8, 32]);
        let (d, h) = (128u64, 8u64);
        // NHD pages of 64 slots, runs of 32: the box spans 32 slots of one head.
        let nhd = kv_map_shape(2, 0x1000, 128, 64, 8, 100, h * d, d, 64 * h * d, false, 32).unwrap();
        assert_eq!(nhd.2, [64, 1, 32, 1]);
        let hnd = kv_map_shape(2, 0x1000, 128, 16, 8, 100, d, 16 * d, 16 * h * d, true, 16).unwrap();
        assert_eq!(hnd.2, [64, 16, 1, 1]);
        assert!(kv_map_shape(2, 0x1000, 128, 16, 8, 100, h * d, d, 16 * h * d, false, 32).is_none(), "a run longer than the page");
        assert!(kv_map_shape(2, 0x1000, 128, 48, 8, 100, h * d, d, 48 * h * d, false, 32).is_none(), "a run not dividing the page");
        assert!(kv_map_shape(2, 0x1000, 128, 16, 8, 100, h * d, d, 16 * h * d, false, 12).is_none(), "not a run the kernel takes");
    }
}
