//! Decode launches: the decode kernel over a plan's work list, then `merge_states` for split
//! requests.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{cuda, DeviceParams, Engine, PlanBuffers};
use crate::abi::{param_layout, DecodeArgs, MergeArgs, ParamField};
use crate::jit::{CompiledKernel, DecodeTile, KernelConfig, Op};
use crate::kv::{Batch, Element, LayoutError};
use crate::plan::{plan_decode, DecodePlan, PlanMode, PlanTarget};
use crate::reference::default_sm_scale;
use crate::spec::params::ParamValues;
use crate::spec::Variant;
use crate::{Error, Result};

/// A loaded decode kernel (and its merge kernel) for one variant and config.
pub struct DecodeKernel {
    decode: CudaFunction,
    merge: CudaFunction,
    pub variant: Variant,
    pub cfg: KernelConfig,
    pub tile: DecodeTile,
    pub smem_bytes: usize,
    /// Resident CTAs per SM, from the occupancy calculator.
    pub ctas_per_sm: usize,
    pub layout: Vec<ParamField>,
    pub compiled: CompiledKernel,
    /// Time to load the module into the context (zero when already loaded).
    pub load_time: std::time::Duration,
}

/// Caller-owned device inputs, described on the host by a [`Batch`].
pub struct DeviceBatch<'a, T> {
    pub q: &'a CudaSlice<T>,
    pub k: &'a CudaSlice<T>,
    /// The same buffer as `k` when the cache is interleaved.
    pub v: &'a CudaSlice<T>,
    pub qo_indptr: &'a CudaSlice<i32>,
    pub kv_indptr: &'a CudaSlice<i32>,
    pub kv_indices: &'a CudaSlice<i32>,
    pub last_page_len: &'a CudaSlice<i32>,
}

/// Caller-owned device outputs.
pub struct DeviceOutput<'a, T> {
    pub o: &'a mut CudaSlice<T>,
    pub lse: &'a mut CudaSlice<f32>,
}

fn mismatch(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Layout(LayoutError::Mismatch { what, expected, got }))
    }
}

impl Engine {
    /// Compiles (or finds) and loads the decode kernel for `variant` and `cfg`.
    pub fn decode_kernel(&self, variant: &Variant, cfg: &KernelConfig) -> Result<DecodeKernel> {
        if cfg.op != Op::Decode {
            return Err(Error::Unsupported(format!("{} config given to decode_kernel", cfg.op.name())));
        }
        let compiled = self.jit.get(variant, cfg, &self.arch)?;
        for w in &compiled.warnings {
            eprintln!("attnforge: warning: {w}");
        }
        let t0 = std::time::Instant::now();
        let module = self.module(&compiled)?;
        let decode = module.load_function("attnforge_decode").map_err(cuda("load attnforge_decode"))?;
        let merge = module.load_function("attnforge_merge").map_err(cuda("load attnforge_merge"))?;
        let load_time = t0.elapsed();
        let tile = cfg.decode_tile();
        let smem = cfg.smem_bytes();
        decode
            .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(cuda("set shared memory size"))?;
        let threads = tile.threads(cfg.group) as u32;
        let ctas_per_sm = decode.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None).map_err(cuda("occupancy"))? as usize;
        if ctas_per_sm == 0 {
            return Err(Error::Unsupported(format!("{} needs {smem} bytes of shared memory and {threads} threads: it cannot run on this GPU", compiled.name)));
        }
        Ok(DecodeKernel {
            decode,
            merge,
            variant: variant.clone(),
            cfg: cfg.clone(),
            tile,
            smem_bytes: smem,
            ctas_per_sm,
            layout: param_layout(&variant.params).map_err(Error::Unsupported)?,
            compiled,
            load_time,
        })
    }

    /// The planner's view of this kernel on this GPU.
    pub fn plan_target(&self, k: &DecodeKernel) -> PlanTarget {
        PlanTarget { ctas: self.sm_count * k.ctas_per_sm, kv_tile: k.tile.kv_tile() }
    }

    /// Plans a decode batch for `k` on this GPU.
    pub fn plan_decode(&self, k: &DecodeKernel, params: &ParamValues, batch: &Batch<'_>, mode: PlanMode) -> Result<DecodePlan> {
        plan_decode(&k.variant, params, batch, self.plan_target(k), mode)
    }

    /// Launches decode (and merge, when the plan splits) on the engine's stream. Every shape,
    /// dtype and buffer length is checked against `batch`, the plan and the kernel first.
    #[allow(clippy::too_many_arguments)]
    pub fn run_decode<T: Element + cudarc::driver::DeviceRepr>(
        &self,
        k: &DecodeKernel,
        plan: &DecodePlan,
        bufs: &PlanBuffers,
        params: &DeviceParams,
        batch: &Batch<'_>,
        dev: &DeviceBatch<'_, T>,
        out: DeviceOutput<'_, T>,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        let kv = batch.kv;
        let cfg = &k.cfg;
        batch.validate(dev.q.len(), dev.k.len(), if kv.interleaved { dev.k.len() } else { dev.v.len() })?;
        if T::DTYPE != cfg.dtype_q || T::DTYPE != cfg.dtype_kv || T::DTYPE != cfg.dtype_o {
            return Err(Error::Unsupported(format!("buffers are {} but the kernel was compiled for {}", T::DTYPE.name(), cfg.dtype_q.name())));
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
        if kv.interleaved && dev.v.device_ptr(&self.stream).0 != dev.k.device_ptr(&self.stream).0 {
            return Err(Error::Layout(LayoutError::Mismatch { what: "interleaved cache: v must be the same buffer as k", expected: 0, got: 1 }));
        }
        params.check_bits(&k.variant.params, batch)?;
        if bufs.workspace_bytes() < plan.workspace_bytes {
            return Err(Error::Plan(format!("the plan needs {} bytes of workspace, {} were given", plan.workspace_bytes, bufs.workspace_bytes())));
        }
        if bufs.plan.len() < plan.packed_len() {
            return Err(Error::Plan("the plan was not uploaded to these buffers (upload_plan)".into()));
        }
        if self.capturing()? && !matches!(plan.mode, PlanMode::FixedGrid { .. }) {
            return Err(Error::Plan("capturing a CUDA graph needs a FixedGrid plan (its grid and buffers stay fixed across steps)".into()));
        }
        if plan.grid == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let ptr = |x: &CudaSlice<i32>| x.device_ptr(s).0;
        let plan_ptr = bufs.plan.device_ptr(s).0;
        let ws = bufs.workspace.device_ptr(s).0;
        let part_lse = ws + (plan.num_partials.max(if matches!(plan.mode, PlanMode::FixedGrid { .. }) { plan.grid } else { 0 }) * batch.qo_heads * kv.head_dim_vo * 4) as u64;
        let (k_slot, k_head) = kv.strides(kv.head_dim_qk);
        let (v_slot, v_head) = kv.strides(kv.head_dim_vo);
        let elem = std::mem::size_of::<T>() as u64;
        let o_ptr = out.o.device_ptr(s).0;
        let lse_ptr = out.lse.device_ptr(s).0;
        let sm_scale = sm_scale.unwrap_or_else(|| default_sm_scale(kv.head_dim_qk));
        let args = DecodeArgs {
            q: dev.q.device_ptr(s).0,
            k: dev.k.device_ptr(s).0,
            v: dev.v.device_ptr(s).0 + kv.v_base() as u64 * elem,
            o: o_ptr,
            lse: lse_ptr,
            part_o: ws,
            part_lse,
            qo_indptr: ptr(dev.qo_indptr),
            kv_indptr: ptr(dev.kv_indptr),
            kv_indices: ptr(dev.kv_indices),
            last_page_len: ptr(dev.last_page_len),
            work: plan_ptr + 8,
            num_work: plan_ptr,
            k_page_stride: kv.page_stride(kv.head_dim_qk) as i64,
            v_page_stride: kv.page_stride(kv.head_dim_vo) as i64,
            k_slot_stride: k_slot as i32,
            k_head_stride: k_head as i32,
            v_slot_stride: v_slot as i32,
            v_head_stride: v_head as i32,
            page_size: kv.page_size as i32,
            num_qo_heads: batch.qo_heads as i32,
            sm_scale,
            page_shift: if kv.page_size.is_power_of_two() { kv.page_size.trailing_zeros() as i32 } else { -1 },
        };
        let t = &k.tile;
        let cfg_launch = LaunchConfig {
            grid_dim: (plan.grid as u32, kv.kv_heads as u32, 1),
            block_dim: t.block(cfg.group),
            shared_mem_bytes: k.smem_bytes as u32,
        };
        // SAFETY: every pointer comes from a live CudaSlice whose length was checked above
        // against the batch; the plan's indices were validated on the host against the same
        // batch; the argument structs' layouts are static_asserted in the compiled source.
        unsafe { s.launch_builder(&k.decode).arg(&args).arg(&params.blob).launch(cfg_launch) }.map_err(cuda("launch decode"))?;
        if plan.merge_grid > 0 {
            let margs = MergeArgs {
                o: o_ptr,
                lse: lse_ptr,
                part_o: ws,
                part_lse,
                work: plan_ptr + 8 + 16 * plan.grid as u64,
                num_work: plan_ptr + 4,
                qo_indptr: ptr(dev.qo_indptr),
                kv_indptr: ptr(dev.kv_indptr),
                last_page_len: ptr(dev.last_page_len),
                num_qo_heads: batch.qo_heads as i32,
                group: cfg.group as i32,
                page_size: kv.page_size as i32,
                sm_scale,
            };
            let mcfg = LaunchConfig {
                grid_dim: (plan.merge_grid as u32, batch.qo_heads as u32, 1),
                block_dim: (kv.head_dim_vo.min(128) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above; the merge reads the partial slots the decode launch wrote.
            unsafe { s.launch_builder(&k.merge).arg(&margs).arg(&params.blob).launch(mcfg) }.map_err(cuda("launch merge"))?;
        }
        Ok(())
    }
}
