//! Prefill / append launches: the tensor-core prefill kernel over a plan's row blocks.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{cuda, DeviceBatch, DeviceOutput, DeviceParams, Engine, PlanBuffers};
use crate::abi::{param_layout, DecodeArgs, ParamField};
use crate::jit::{CompiledKernel, KernelConfig, Op, PrefillTile};
use crate::kv::{Batch, Element, LayoutError};
use crate::plan::{plan_prefill, PlanMode, PrefillPlan};
use crate::reference::default_sm_scale;
use crate::spec::params::ParamValues;
use crate::spec::Variant;
use crate::{Error, Result};

/// A loaded prefill kernel for one variant and config.
pub struct PrefillKernel {
    prefill: CudaFunction,
    pub variant: Variant,
    pub cfg: KernelConfig,
    pub tile: PrefillTile,
    pub smem_bytes: usize,
    pub ctas_per_sm: usize,
    pub layout: Vec<ParamField>,
    pub compiled: CompiledKernel,
}

fn mismatch(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Layout(LayoutError::Mismatch { what, expected, got }))
    }
}

impl Engine {
    /// Compiles (or finds) and loads the prefill kernel for `variant` and `cfg`.
    pub fn prefill_kernel(&self, variant: &Variant, cfg: &KernelConfig) -> Result<PrefillKernel> {
        if cfg.op != Op::Prefill {
            return Err(Error::Unsupported(format!("{} config given to prefill_kernel", cfg.op.name())));
        }
        let compiled = self.jit.get(variant, cfg, &self.arch)?;
        for w in &compiled.warnings {
            eprintln!("attnforge: warning: {w}");
        }
        let module = self.module(&compiled)?;
        let prefill = module.load_function("attnforge_prefill").map_err(cuda("load attnforge_prefill"))?;
        let tile = cfg.prefill_tile();
        let smem = cfg.smem_bytes();
        prefill
            .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(cuda("set shared memory size"))?;
        let ctas_per_sm = prefill.occupancy_max_active_blocks_per_multiprocessor((32 * tile.warps) as u32, smem, None).map_err(cuda("occupancy"))? as usize;
        if ctas_per_sm == 0 {
            return Err(Error::Unsupported(format!("{} needs {smem} bytes of shared memory: it cannot run on this GPU", compiled.name)));
        }
        Ok(PrefillKernel { prefill, variant: variant.clone(), cfg: cfg.clone(), tile, smem_bytes: smem, ctas_per_sm, layout: param_layout(&variant.params).map_err(Error::Unsupported)?, compiled })
    }

    /// Plans a prefill batch for `k`.
    pub fn plan_prefill(&self, k: &PrefillKernel, params: &ParamValues, batch: &Batch<'_>, mode: PlanMode) -> Result<PrefillPlan> {
        if batch.group() != k.cfg.group {
            return Err(Error::Layout(LayoutError::Mismatch { what: "GQA group (kernel vs qo_heads / kv_heads)", expected: k.cfg.group, got: batch.group() }));
        }
        plan_prefill(&k.variant, params, batch, k.tile.rows(), mode)
    }

    /// Launches prefill on the engine's stream after checking every shape against `batch`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_prefill<T: Element + cudarc::driver::DeviceRepr>(
        &self,
        k: &PrefillKernel,
        plan: &PrefillPlan,
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
        mismatch("plan rows per block (kernel)", k.tile.rows(), plan.rows)?;
        params.check_bits(&k.variant.params, batch)?;
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
        let (k_slot, k_head) = kv.strides(kv.head_dim_qk);
        let (v_slot, v_head) = kv.strides(kv.head_dim_vo);
        let elem = std::mem::size_of::<T>() as u64;
        let args = DecodeArgs {
            q: dev.q.device_ptr(s).0,
            k: dev.k.device_ptr(s).0,
            v: dev.v.device_ptr(s).0 + kv.v_base() as u64 * elem,
            o: out.o.device_ptr(s).0,
            lse: out.lse.device_ptr(s).0,
            part_o: 0,
            part_lse: 0,
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
            sm_scale: sm_scale.unwrap_or_else(|| default_sm_scale(kv.head_dim_qk)),
            page_shift: if kv.page_size.is_power_of_two() { kv.page_size.trailing_zeros() as i32 } else { -1 },
        };
        let launch = LaunchConfig {
            grid_dim: (plan.grid as u32, kv.kv_heads as u32, 1),
            block_dim: ((32 * k.tile.warps) as u32, 1, 1),
            shared_mem_bytes: k.smem_bytes as u32,
        };
        // SAFETY: every pointer comes from a live CudaSlice whose length was checked above
        // against the batch; the plan's rows and requests were built from the same validated
        // batch; the argument layout is static_asserted in the compiled source.
        unsafe { s.launch_builder(&k.prefill).arg(&args).arg(&params.blob).launch(launch) }.map_err(cuda("launch prefill"))?;
        Ok(())
    }
}
