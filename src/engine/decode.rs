//! Decode launches: the decode kernel over a plan's work list, then `merge_states` for split
//! requests.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::{cuda, load_entry, DeviceParams, Engine, PlanBuffers, PlanShape};
use crate::abi::{param_layout, ParamField};
use crate::jit::{CompiledKernel, DecodeTile, KernelConfig, Op};
use crate::kv::{Batch, Element};
use crate::plan::{plan_decode, wants_wide_tile, DecodePlan, PlanMode, PlanTarget};
use crate::spec::params::ParamValues;
use crate::spec::Variant;
use crate::{Error, Result};

/// A loaded decode kernel (and its merge kernel) for one variant and config: the configured tile
/// and, for tensor-core configs whose ring fits the GPU, the wide tile (twice the warps) that a
/// launch of at most one CTA per SM runs on (see [`DecodeKernel::tile_for`]).
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
    /// Time to load the module(s) into the context (zero when already loaded).
    pub load_time: std::time::Duration,
    pub wide: Option<WideDecode>,
    sm_count: usize,
}

/// The wide decode tile of a [`DecodeKernel`].
pub struct WideDecode {
    func: CudaFunction,
    pub tile: DecodeTile,
    pub smem_bytes: usize,
    pub compiled: CompiledKernel,
}

impl DecodeKernel {
    /// The tile `plan` runs on: the wide one when the kernel has it and [`wants_wide_tile`]
    /// says so (never for deterministic plans, whose output must not depend on the batch),
    /// else the configured one.
    pub fn tile_for(&self, plan: &DecodePlan, kv_heads: usize) -> DecodeTile {
        self.wide_for(plan, kv_heads).map_or(self.tile, |w| w.tile)
    }

    /// The wide tile, when `plan` runs on it (see [`DecodeKernel::tile_for`]).
    pub fn wide_for(&self, plan: &DecodePlan, kv_heads: usize) -> Option<&WideDecode> {
        self.wide.as_ref().filter(|w| wants_wide_tile(plan, kv_heads, self.sm_count, w.tile.kv_tile()))
    }
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

impl Engine {
    /// Compiles (or finds) and loads the decode kernel for `variant` and `cfg`.
    pub fn decode_kernel(&self, variant: &Variant, cfg: &KernelConfig) -> Result<DecodeKernel> {
        if cfg.op != Op::Decode {
            return Err(Error::UnsupportedConfig(format!("{} config given to decode_kernel", cfg.op.name())));
        }
        let compiled = self.jit.get(variant, cfg, &self.arch)?;
        for w in &compiled.warnings {
            crate::diagnostics::warn(w);
        }
        let t0 = std::time::Instant::now();
        let module = self.module(&compiled)?;
        let tile = cfg.decode_tile();
        let smem = cfg.smem_bytes();
        let threads = tile.threads(cfg.group);
        let (decode, ctas_per_sm) = load_entry(&module, "attnforge_decode", "attnforge_decode", threads, smem)?;
        let merge = module.load_function("attnforge_merge").map_err(cuda("load attnforge_merge"))?;
        let mut load_time = t0.elapsed();
        if ctas_per_sm == 0 {
            return Err(Error::UnsupportedConfig(format!("{} needs {smem} bytes of shared memory and {threads} threads: it cannot run on this GPU", compiled.name)));
        }
        let wide = match cfg.wide_decode() {
            Some(wc) if wc.smem_bytes() <= self.max_smem_per_block()? => {
                let compiled = self.jit.get(variant, &wc, &self.arch)?;
                let t1 = std::time::Instant::now();
                let (tile, smem) = (wc.decode_tile(), wc.smem_bytes());
                let (func, resident) = load_entry(&self.module(&compiled)?, "attnforge_decode", "attnforge_decode (wide tile)", tile.threads(cfg.group), smem)?;
                load_time += t1.elapsed();
                // A wide tile that cannot be resident (registers) is left out, not launched.
                (resident > 0).then_some(WideDecode { func, tile, smem_bytes: smem, compiled })
            }
            _ => None,
        };
        Ok(DecodeKernel {
            decode,
            merge,
            variant: variant.clone(),
            cfg: cfg.clone(),
            tile,
            smem_bytes: smem,
            ctas_per_sm,
            layout: param_layout(&variant.params).map_err(Error::UnsupportedConfig)?,
            compiled,
            load_time,
            wide,
            sm_count: self.sm_count,
        })
    }

    /// The planner's view of this kernel on this GPU.
    /// Decode reads memory: one chunk per SM already streams at the card's bandwidth, so a batch
    /// splits only until every SM has a chunk, not every resident CTA slot (the kernel's
    /// occupancy is for batches with more items than SMs, where resident CTAs hide each other's
    /// prologues). Measured on the H100 against SMs × 2: B1 L16384 32.8 → 31.9 µs, B16 L4096
    /// 102.9 → 98.2 µs (no split, no merge); SMs × 4 and × 16 were slower still.
    pub fn plan_target(&self, k: &DecodeKernel) -> PlanTarget {
        PlanTarget { ctas: self.sm_count, kv_tile: k.tile.kv_tile(), resident: self.sm_count * k.ctas_per_sm, always_balance: false }
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
        let fixed_grid = matches!(plan.mode, PlanMode::FixedGrid { .. });
        let shape = PlanShape {
            batch_size: plan.batch_size,
            qo_heads: plan.qo_heads,
            packed_len: plan.packed_len(),
            fixed_grid,
            workspace_bytes: plan.workspace_bytes,
            // A fixed-grid workspace holds a slot per CTA, whatever this step splits.
            partial_slots: if fixed_grid { plan.grid } else { plan.num_partials },
        };
        let args = self.checked_args(cfg, &k.variant.params, shape, bufs, params, batch, dev, &out, sm_scale)?;
        if plan.grid == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let (func, t, smem) = match k.wide_for(plan, kv.kv_heads) {
            Some(w) => (&w.func, w.tile, w.smem_bytes),
            None => (&k.decode, k.tile, k.smem_bytes),
        };
        let cfg_launch = LaunchConfig {
            // The kernel numbers these CTAs KV head first (decode.cu.tera).
            grid_dim: (plan.grid as u32, kv.kv_heads as u32, 1),
            block_dim: t.block(cfg.group),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: every pointer comes from a live CudaSlice whose length was checked above
        // against the batch; the plan's indices were validated on the host against the same
        // batch; the argument structs' layouts are static_asserted in the compiled source. Both
        // tiles take any plan: the ring covers each item's span whatever the tile's key count.
        unsafe { s.launch_builder(func).arg(&args).arg(&params.blob).launch(cfg_launch) }.map_err(cuda("launch decode"))?;
        // The packed plan holds the merge list after the decode work list.
        self.launch_merge(&k.merge, &args, plan.merge_offset() as u64, plan.merge_grid, cfg.group, batch.qo_heads, kv.head_dim_vo, params)
    }
}
