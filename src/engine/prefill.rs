//! Prefill / append launches: the tensor-core prefill kernel over a plan's row blocks.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::{cuda, DeviceBatch, DeviceOutput, DeviceParams, Engine, PlanBuffers, PlanShape};
use crate::abi::{param_layout, ParamField};
use crate::jit::{CompiledKernel, KernelConfig, Op, PrefillTile};
use crate::kv::{Batch, Element, LayoutError};
use crate::plan::{plan_prefill, PlanMode, PrefillPlan};
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
        mismatch("plan rows per block (kernel)", k.tile.rows(), plan.rows)?;
        let shape = PlanShape { batch_size: plan.batch_size, qo_heads: plan.qo_heads, packed_len: plan.packed_len(), fixed_grid: matches!(plan.mode, PlanMode::FixedGrid { .. }) };
        let args = self.checked_args(&k.cfg, &k.variant.params, shape, bufs, params, batch, dev, &out, sm_scale)?;
        if plan.grid == 0 {
            return Ok(());
        }
        let s = &self.stream;
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
