//! Prefill / append launches: the tensor-core prefill kernel over a plan's row blocks.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::{cuda, load_entry, DeviceBatch, DeviceOutput, DeviceParams, Engine, PlanBuffers, PlanShape};
use crate::abi::{param_layout, ParamField};
use crate::jit::{CompiledKernel, KernelConfig, Op, PrefillTile};
use crate::kv::{Batch, Element, LayoutError};
use crate::plan::{plan_prefill, PlanMode, PlanTarget, PrefillPlan};
use crate::spec::params::ParamValues;
use crate::spec::Variant;
use crate::{Error, Result};

/// One compiled prefill tile: the function and its launch shape.
pub struct PrefillFn {
    func: CudaFunction,
    merge: CudaFunction,
    pub tile: PrefillTile,
    pub smem_bytes: usize,
    pub ctas_per_sm: usize,
    /// Registers per thread and bytes of local memory (register spills) the compiler chose.
    pub regs: usize,
    pub local_bytes: usize,
    pub compiled: CompiledKernel,
}

/// A loaded prefill kernel for one variant and config: the configured tile (`wide`, for prompts)
/// and, unless a tile was forced, a 32-row tile for short appends that the plan picks when every
/// request fits in it.
pub struct PrefillKernel {
    pub wide: PrefillFn,
    pub narrow: Option<PrefillFn>,
    pub variant: Variant,
    pub cfg: KernelConfig,
    pub layout: Vec<ParamField>,
}

impl PrefillKernel {
    /// The tile a plan was made for (the narrow one when the plan's rows match it).
    pub fn tile_for(&self, plan: &PrefillPlan) -> &PrefillFn {
        match &self.narrow {
            Some(n) if n.tile.rows() == plan.rows && self.wide.tile.rows() != plan.rows => n,
            _ => &self.wide,
        }
    }
}

fn mismatch(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::InvalidBatch(LayoutError::Mismatch { what, expected, got }))
    }
}

impl Engine {
    /// Compiles (or finds) and loads the prefill kernel for `variant` and `cfg` (two tiles, see
    /// [`PrefillKernel`]).
    pub fn prefill_kernel(&self, variant: &Variant, cfg: &KernelConfig) -> Result<PrefillKernel> {
        if cfg.op != Op::Prefill {
            return Err(Error::UnsupportedConfig(format!("{} config given to prefill_kernel", cfg.op.name())));
        }
        let wide = self.load_prefill(variant, cfg)?;
        let narrow = cfg.narrow_prefill().map(|c| self.load_prefill(variant, &c)).transpose()?;
        Ok(PrefillKernel { wide, narrow, variant: variant.clone(), cfg: cfg.clone(), layout: param_layout(&variant.params).map_err(Error::UnsupportedConfig)? })
    }

    fn load_prefill(&self, variant: &Variant, cfg: &KernelConfig) -> Result<PrefillFn> {
        let compiled = self.jit.get(variant, cfg, &self.arch)?;
        for w in &compiled.warnings {
            crate::diagnostics::warn(w);
        }
        let module = self.module(&compiled)?;
        let tile = cfg.prefill_tile();
        let smem = cfg.smem_bytes();
        let (func, ctas_per_sm) = load_entry(&module, "attnforge_prefill", "attnforge_prefill", 32 * tile.warps, smem)?;
        let merge = module.load_function("attnforge_merge").map_err(cuda("load attnforge_merge"))?;
        if ctas_per_sm == 0 {
            return Err(Error::UnsupportedConfig(format!("{} needs {smem} bytes of shared memory: it cannot run on this GPU", compiled.name)));
        }
        let attr = |a| func.get_attribute(a).map(|v| v.max(0) as usize).map_err(cuda("read kernel attribute"));
        let regs = attr(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_NUM_REGS)?;
        let local_bytes = attr(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?;
        Ok(PrefillFn { func, merge, tile, smem_bytes: smem, ctas_per_sm, regs, local_bytes, compiled })
    }

    /// Plans a prefill batch for `k`.
    pub fn plan_prefill(&self, k: &PrefillKernel, params: &ParamValues, batch: &Batch<'_>, mode: PlanMode) -> Result<PrefillPlan> {
        if batch.group() != k.cfg.group {
            return Err(Error::InvalidBatch(LayoutError::Mismatch { what: "GQA group (kernel vs qo_heads / kv_heads)", expected: k.cfg.group, got: batch.group() }));
        }
        // Short appends (every request within the narrow tile's rows) take the narrow tile, so a
        // few tokens × GQA heads do not leave most of a 128-row block idle. A fixed-grid plan
        // always takes the wide one: a captured graph holds one kernel for every step.
        let f = match &k.narrow {
            Some(n) if !matches!(mode, PlanMode::FixedGrid { .. }) && (0..batch.batch_size()).all(|b| batch.q_len(b) * batch.group() <= n.tile.rows()) => n,
            _ => &k.wide,
        };
        let target = PlanTarget { ctas: self.sm_count * f.ctas_per_sm, kv_tile: f.tile.kv_tile, resident: 0, always_balance: false };
        plan_prefill(&k.variant, params, batch, f.tile.rows(), target, mode)
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
        let f = k.tile_for(plan);
        mismatch("plan rows per block (kernel)", f.tile.rows(), plan.rows)?;
        let shape = PlanShape {
            batch_size: plan.batch_size,
            qo_heads: plan.qo_heads,
            packed_len: plan.packed_len(),
            fixed_grid: matches!(plan.mode, PlanMode::FixedGrid { .. }),
            workspace_bytes: plan.workspace_bytes,
            partial_slots: plan.num_partials,
        };
        let args = self.checked_args(&k.cfg, &k.variant.params, shape, bufs, params, batch, dev, &out, sm_scale)?;
        if plan.grid == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let launch = LaunchConfig {
            grid_dim: (plan.grid as u32, kv.kv_heads as u32, 1),
            block_dim: ((32 * f.tile.warps) as u32, 1, 1),
            shared_mem_bytes: f.smem_bytes as u32,
        };
        // SAFETY: every pointer comes from a live CudaSlice whose length was checked above
        // against the batch; the plan's rows and requests were built from the same validated
        // batch; the argument layout is static_asserted in the compiled source.
        unsafe { s.launch_builder(&f.func).arg(&args).arg(&params.blob).launch(launch) }.map_err(cuda("launch prefill"))?;
        // The packed plan holds the merge list after the work list.
        self.launch_merge(&f.merge, &args, plan.merge_offset() as u64, plan.merge_grid, k.cfg.group, batch.qo_heads, kv.head_dim_vo, params)
    }
}
