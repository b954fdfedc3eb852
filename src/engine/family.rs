//! Kernel families: decode and prefill, each one unit the engine loads, plans and launches the
//! same way.
//!
//! A [`Family`] says which tiles a config compiles to on an arch (the config's own tile first,
//! then companions a plan may pick: decode's wide tile, prefill's append tile), the entry point
//! and block shape of a tile, which tile a plan runs on, and what the planner must know. One
//! loader ([`Engine::load`]) and one launcher (`launch.rs`) serve every family; a new main loop
//! is a branch in [`Family::tiles`] (and its template), a new op a new `Family`.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::CudaFunction;

use super::{cuda, load_entry, Engine};
use crate::abi::{param_layout, ParamField};
use crate::jit::{Arch, CompiledKernel, DecodeTile, KernelConfig, Op, PrefillTile};
use crate::kv::ValidBatch;
use crate::plan::{plan_decode, plan_prefill, wants_wide_tile, DecodePlan, Plan, PlanMode, PlanTarget, PrefillPlan};
use crate::spec::params::ParamValues;
use crate::spec::Variant;
use crate::{Error, Result};

/// One kernel family (decode, prefill): the choices the engine makes per family.
pub trait Family: Sized + Send + Sync + 'static {
    /// The op of the configs it takes.
    const OP: Op;
    /// The kernel's entry point in the rendered module.
    const ENTRY: &'static str;
    /// The plan its launches run.
    type Plan: Plan;
    /// The configs compiled for `cfg` on `arch`: the main tile first (`cfg` itself, or the
    /// arch's own main loop for it: prefill on sm_90a above d 128), then companion tiles.
    fn tiles(cfg: &KernelConfig, arch: &Arch) -> Vec<KernelConfig>;
    /// Threads per CTA of a tile.
    fn threads(cfg: &KernelConfig) -> usize;
    /// The launch's block shape for a tile.
    fn block(cfg: &KernelConfig) -> (u32, u32, u32);
    /// The tile (index into [`Kernel::tiles`]) that `plan` runs on.
    fn tile_for(k: &Kernel<Self>, plan: &Self::Plan) -> Result<usize>;
    /// Plans a batch for `k` on `e`'s GPU.
    fn plan(e: &Engine, k: &Kernel<Self>, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode) -> Result<Self::Plan>;
    /// [`Family::plan`], through a cascade when the family runs them and `policy` finds one
    /// that pays. `companion`: the prefill kernel a decode cascade's shared levels run on
    /// (decode runs cascades only with one).
    fn plan_detecting(e: &Engine, k: &Kernel<Self>, companion: Option<&Kernel<Prefill>>, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode, policy: &crate::cascade::Policy) -> Result<Self::Plan> {
        let _ = (policy, companion);
        Self::plan(e, k, params, batch, mode)
    }
}

/// The decode family: one query token per request.
pub struct Decode;
/// The prefill / append family: ragged query blocks.
pub struct Prefill;

impl Family for Decode {
    const OP: Op = Op::Decode;
    const ENTRY: &'static str = "attnforge_decode";
    type Plan = DecodePlan;

    fn tiles(cfg: &KernelConfig, _arch: &Arch) -> Vec<KernelConfig> {
        std::iter::once(cfg.clone()).chain(cfg.wide_decode()).collect()
    }

    fn threads(cfg: &KernelConfig) -> usize {
        cfg.decode_tile().threads(cfg.group)
    }

    fn block(cfg: &KernelConfig) -> (u32, u32, u32) {
        cfg.decode_tile().block(cfg.group)
    }

    /// The wide tile when the kernel has it and [`wants_wide_tile`] says so (never for
    /// deterministic plans, whose output must not depend on the batch), else the configured one.
    fn tile_for(k: &Kernel<Decode>, plan: &DecodePlan) -> Result<usize> {
        Ok(match k.tiles.get(1) {
            Some(w) if wants_wide_tile(plan, plan.kv_heads, k.sm_count, w.cfg.decode_tile().kv_tile()) => 1,
            _ => 0,
        })
    }

    fn plan(e: &Engine, k: &Kernel<Decode>, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode) -> Result<DecodePlan> {
        e.plan_decode(k, params, batch, mode)
    }

    /// With a companion prefill kernel: a decode cascade when `policy` finds shared prefixes
    /// that pay (default and fixed-grid plans; a deterministic plan's bits must not depend on
    /// the rest of the batch, which decides the levels), and in fixed-grid mode every plan with
    /// the cascade's prefix section ([`crate::plan::with_cascade_capacity`]), so one captured
    /// graph replays steps with and without sharing.
    fn plan_detecting(e: &Engine, k: &Kernel<Decode>, companion: Option<&Kernel<Prefill>>, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode, policy: &crate::cascade::Policy) -> Result<DecodePlan> {
        let Some(pk) = companion else { return e.plan_decode(k, params, batch, mode) };
        if !matches!(mode, PlanMode::Deterministic { .. }) {
            if let Some(c) = crate::cascade::detect(batch, policy) {
                // detect builds the levels from this batch's own pages: no second check.
                match e.plan_decode_cascade_of(k, pk, params, batch, &c, mode, false) {
                    Err(Error::UnsupportedConfig(why)) => crate::diagnostics::warn(&format!("the batch shares a prefix, but it is planned without a cascade: {why}")),
                    // A fixed grid's cascade may need more spans than a plain plan (a demoted
                    // outer level splits each member's own keys in two): plan it plainly.
                    Err(err @ Error::Plan(crate::error::PlanError::FixedGridTooSmall { .. })) => {
                        crate::diagnostics::warn(&format!("the batch shares a prefix, but its decode cascade does not fit the fixed grid ({err}): planned without a cascade"))
                    }
                    r => return r,
                }
            }
        }
        let plan = e.plan_decode(k, params, batch, mode)?;
        let (rows, target) = e.decode_prefix_tile(pk);
        Ok(crate::plan::with_cascade_capacity(plan, batch, rows, target))
    }
}

impl Family for Prefill {
    const OP: Op = Op::Prefill;
    const ENTRY: &'static str = "attnforge_prefill";
    type Plan = PrefillPlan;

    /// On sm_90a the prompt tile is the Hopper main loop's ([`KernelConfig::sm90_prefill`])
    /// where it was measured faster than the portable one ([`KernelConfig::prefers_sm90_prefill`]);
    /// elsewhere, and for a config with an explicit tile, the config's own. Short appends keep
    /// the portable append tile on every arch.
    fn tiles(cfg: &KernelConfig, arch: &Arch) -> Vec<KernelConfig> {
        let prompt = if arch.has_wgmma() && cfg.prefers_sm90_prefill() { cfg.sm90_prefill() } else { None };
        std::iter::once(prompt.unwrap_or_else(|| cfg.clone())).chain(cfg.append_prefill()).collect()
    }

    fn threads(cfg: &KernelConfig) -> usize {
        32 * cfg.prefill_tile().warps
    }

    fn block(cfg: &KernelConfig) -> (u32, u32, u32) {
        (Self::threads(cfg) as u32, 1, 1)
    }

    /// The tile the plan was made for (its rows per block), the prompt tile first.
    fn tile_for(k: &Kernel<Prefill>, plan: &PrefillPlan) -> Result<usize> {
        k.tiles.iter().position(|t| t.cfg.prefill_tile().rows() == plan.rows).ok_or_else(|| {
            Error::InvalidBatch(crate::kv::LayoutError::Mismatch { what: "plan rows per block (no tile of the kernel)", expected: k.tiles[0].cfg.prefill_tile().rows(), got: plan.rows })
        })
    }

    fn plan(e: &Engine, k: &Kernel<Prefill>, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode) -> Result<PrefillPlan> {
        e.plan_prefill(k, params, batch, mode)
    }

    fn plan_detecting(e: &Engine, k: &Kernel<Prefill>, _companion: Option<&Kernel<Prefill>>, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode, policy: &crate::cascade::Policy) -> Result<PrefillPlan> {
        // Only default plans: a fixed grid has no room for a cascade, and a deterministic plan's
        // bits must not depend on the rest of the batch, which decides the levels.
        if matches!(mode, PlanMode::Default) {
            if let Some(c) = crate::cascade::detect(batch, policy) {
                // detect builds the levels from this batch's own pages: no second check (at
                // B = 256 sharing 32K, validation costs more than detection; criterion).
                match e.plan_cascade_of(k, params, batch, &c, mode, false) {
                    Err(Error::UnsupportedConfig(why)) => crate::diagnostics::warn(&format!("the batch shares a prefix, but it is planned without a cascade: {why}")),
                    // A fixed grid's cascade may need more spans than a plain plan (a demoted
                    // outer level splits each member's own keys in two): plan it plainly.
                    Err(err @ Error::Plan(crate::error::PlanError::FixedGridTooSmall { .. })) => {
                        crate::diagnostics::warn(&format!("the batch shares a prefix, but its decode cascade does not fit the fixed grid ({err}): planned without a cascade"))
                    }
                    r => return r,
                }
            }
        }
        e.plan_prefill(k, params, batch, mode)
    }
}

/// One compiled and loaded tile of a kernel.
pub struct LoadedTile {
    pub(crate) func: CudaFunction,
    /// Its config (with the tile a companion forces).
    pub cfg: KernelConfig,
    /// Dynamic shared memory per CTA, in bytes.
    pub smem_bytes: usize,
    /// Resident CTAs per SM, from the occupancy calculator.
    pub ctas_per_sm: usize,
    /// Registers per thread the compiler chose.
    pub regs: usize,
    /// Bytes of local memory per thread (register spills).
    pub local_bytes: usize,
    /// The compiled module it came from.
    pub compiled: CompiledKernel,
    /// Time to load its module into the context (zero when already loaded).
    pub load_time: Duration,
}

/// A loaded kernel of family `F` for one variant and config: its tiles (the config's own
/// first) and the merge kernel for split plans.
pub struct Kernel<F: Family> {
    /// The variant it was rendered from.
    pub variant: Variant,
    /// The config it was asked for.
    pub cfg: KernelConfig,
    /// The params struct's layout.
    pub layout: Vec<ParamField>,
    /// The loaded tiles: `tiles[0]` is the main tile (the config's own, or the arch's main loop
    /// for it: [`Family::tiles`]); companions follow where they fit the GPU.
    pub tiles: Vec<LoadedTile>,
    pub(crate) merge: CudaFunction,
    pub(crate) sm_count: usize,
    _family: PhantomData<F>,
}

/// A loaded decode kernel: the configured tile and, for tensor-core configs whose ring fits the
/// GPU, the wide tile (twice the warps) that a launch of at most one CTA per SM runs on.
pub type DecodeKernel = Kernel<Decode>;
/// A loaded prefill kernel: the prompt tile (128 rows up to d128) and, unless a tile was
/// forced, the 32-row append tile that the plan picks when every request fits in it.
pub type PrefillKernel = Kernel<Prefill>;

impl<F: Family> Kernel<F> {
    /// The config's own tile.
    pub fn main(&self) -> &LoadedTile {
        &self.tiles[0]
    }

    /// The compiled module of the config's own tile.
    pub fn compiled(&self) -> &CompiledKernel {
        &self.tiles[0].compiled
    }

    /// The tile `plan` runs on.
    pub fn tile_for(&self, plan: &F::Plan) -> Result<&LoadedTile> {
        Ok(&self.tiles[F::tile_for(self, plan)?])
    }
}

impl DecodeKernel {
    /// The configured decode tile.
    pub fn tile(&self) -> DecodeTile {
        self.tiles[0].cfg.decode_tile()
    }

    /// The wide tile, if the kernel has it.
    pub fn wide(&self) -> Option<&LoadedTile> {
        self.tiles.get(1)
    }

    /// The decode tile `plan` runs on.
    pub fn decode_tile_for(&self, plan: &DecodePlan) -> DecodeTile {
        self.tile_for(plan).map_or(self.tile(), |t| t.cfg.decode_tile())
    }

    /// Whether `plan` runs on the wide tile.
    pub fn runs_wide(&self, plan: &DecodePlan) -> bool {
        Decode::tile_for(self, plan).is_ok_and(|i| i == 1)
    }
}

impl PrefillKernel {
    /// The prompt tile (the config's own, or on sm_90a above d 128 the Hopper loop's).
    pub fn prompt(&self) -> &LoadedTile {
        &self.tiles[0]
    }

    /// The append tile for short appends, if the kernel has it.
    pub fn append(&self) -> Option<&LoadedTile> {
        self.tiles.get(1)
    }

    /// The prefill tile of a loaded tile.
    pub fn prefill_tile(t: &LoadedTile) -> PrefillTile {
        t.cfg.prefill_tile()
    }
}

impl Engine {
    /// Compiles (or finds) and loads the kernel of family `F` for `variant` and `cfg`: every
    /// tile of [`Family::tiles`] whose shared memory fits this GPU and that can be resident (a
    /// companion that cannot is left out; the config's own tile must fit).
    pub fn load<F: Family>(&self, variant: &Variant, cfg: &KernelConfig) -> Result<Kernel<F>> {
        if cfg.op != F::OP {
            return Err(Error::UnsupportedConfig(format!("a {} config given to a {} kernel", cfg.op.name(), F::OP.name())));
        }
        let max_smem = self.max_smem_per_block()?;
        let mut tiles = Vec::new();
        let mut merge = None;
        // The tiles compile side by side (NVRTC compiles are independent; a first use waits for
        // the slowest tile, not the sum), then load in order.
        let wanted: Vec<(usize, KernelConfig)> = F::tiles(cfg, &self.arch).into_iter().enumerate().filter(|(i, c)| *i == 0 || c.smem_bytes() <= max_smem).collect();
        let (jit, arch) = (&self.jit, &self.arch);
        let compiled_all: Vec<Result<CompiledKernel>> = std::thread::scope(|s| {
            let handles: Vec<_> = wanted.iter().map(|(_, c)| s.spawn(move || jit.get(variant, c, arch))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::UnsupportedConfig(format!("compiling a tile of {} panicked", cfg.entry_name(&variant.name)))))).collect()
        });
        for ((i, c), compiled) in wanted.into_iter().zip(compiled_all) {
            let smem = c.smem_bytes();
            let compiled = compiled?;
            for w in &compiled.warnings {
                crate::diagnostics::warn(w);
            }
            let t0 = Instant::now();
            let module = self.module(&compiled)?;
            let threads = F::threads(&c);
            let (func, ctas_per_sm) = load_entry(&module, F::ENTRY, &compiled.name, threads, smem)?;
            if ctas_per_sm == 0 {
                if i == 0 {
                    return Err(Error::UnsupportedConfig(format!("{} needs {smem} bytes of shared memory and {threads} threads: it cannot run on this GPU", compiled.name)));
                }
                continue;
            }
            if merge.is_none() {
                merge = Some(module.load_function("attnforge_merge").map_err(cuda("load attnforge_merge"))?);
            }
            let attr = |a| func.get_attribute(a).map(|v| v.max(0) as usize).map_err(cuda("read kernel attribute"));
            let regs = attr(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_NUM_REGS)?;
            let local_bytes = attr(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?;
            tiles.push(LoadedTile { func, cfg: c, smem_bytes: smem, ctas_per_sm, regs, local_bytes, compiled, load_time: t0.elapsed() });
        }
        let merge = merge.ok_or_else(|| Error::UnsupportedConfig(format!("no tile of {} runs on this GPU", cfg.entry_name(&variant.name))))?;
        let layout = param_layout(&variant.params).map_err(Error::UnsupportedConfig)?;
        Ok(Kernel { variant: variant.clone(), cfg: cfg.clone(), layout, tiles, merge, sm_count: self.sm_count, _family: PhantomData })
    }

    /// Compiles (or finds) and loads the decode kernel for `variant` and `cfg`.
    pub fn decode_kernel(&self, variant: &Variant, cfg: &KernelConfig) -> Result<DecodeKernel> {
        self.load(variant, cfg)
    }

    /// Compiles (or finds) and loads the prefill kernel for `variant` and `cfg` (two tiles, see
    /// [`PrefillKernel`]).
    pub fn prefill_kernel(&self, variant: &Variant, cfg: &KernelConfig) -> Result<PrefillKernel> {
        self.load(variant, cfg)
    }

    /// The decode planner's view of `k` on this GPU.
    /// Decode reads memory: one chunk per SM already streams at the card's bandwidth, so a batch
    /// splits only until every SM has a chunk, not every resident CTA slot (the kernel's
    /// occupancy is for batches with more items than SMs, where resident CTAs hide each other's
    /// prologues). Measured on the H100 against SMs × 2: B1 L16384 32.8 → 31.9 µs, B16 L4096
    /// 102.9 → 98.2 µs (no split, no merge); SMs × 4 and × 16 were slower still.
    pub fn plan_target(&self, k: &DecodeKernel) -> PlanTarget {
        PlanTarget { ctas: self.sm_count, kv_tile: k.tile().kv_tile(), resident: self.sm_count * k.main().ctas_per_sm, always_balance: false }
    }

    /// Plans a decode batch for `k` on this GPU.
    pub fn plan_decode(&self, k: &DecodeKernel, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode) -> Result<DecodePlan> {
        plan_decode(&k.variant, params, batch, self.plan_target(k), mode)
    }

    /// Plans a prefill batch for `k`. Short appends (every request within the append tile's
    /// rows) take the append tile, so a few tokens × GQA heads do not leave most of a 128-row
    /// block idle. A fixed-grid plan always takes the prompt tile: a captured graph holds one
    /// kernel for every step.
    pub fn plan_prefill(&self, k: &PrefillKernel, params: &ParamValues, batch: &ValidBatch<'_>, mode: PlanMode) -> Result<PrefillPlan> {
        if batch.group() != k.cfg.group {
            return Err(Error::InvalidBatch(crate::kv::LayoutError::Mismatch { what: "GQA group (kernel vs qo_heads / kv_heads)", expected: k.cfg.group, got: batch.group() }));
        }
        let f = match k.append() {
            Some(a) if !matches!(mode, PlanMode::FixedGrid { .. }) && (0..batch.batch_size()).all(|b| batch.q_len(b) * batch.group() <= a.cfg.prefill_tile().rows()) => a,
            _ => k.prompt(),
        };
        let t = f.cfg.prefill_tile();
        let target = PlanTarget { ctas: self.sm_count * f.ctas_per_sm, kv_tile: t.kv_tile, resident: 0, always_balance: false };
        plan_prefill(&k.variant, params, batch, t.rows(), target, mode)
    }

    /// Plans `batch` through `cascade` (checked against it first; [`crate::plan::plan_cascade`]):
    /// on the append tile when every group's rows fit it, else on the prompt tile.
    pub fn plan_cascade(&self, k: &PrefillKernel, params: &ParamValues, batch: &ValidBatch<'_>, cascade: &crate::cascade::Cascade, mode: PlanMode) -> Result<PrefillPlan> {
        self.plan_cascade_of(k, params, batch, cascade, mode, true)
    }

    /// [`Engine::plan_cascade`]; `check: false` only for a cascade [`crate::cascade::detect`]
    /// built from `batch` itself (the kernels read a group's keys through its first member's
    /// page table, which only a checked decomposition makes everyone's).
    pub(crate) fn plan_cascade_of(&self, k: &PrefillKernel, params: &ParamValues, batch: &ValidBatch<'_>, cascade: &crate::cascade::Cascade, mode: PlanMode, check: bool) -> Result<PrefillPlan> {
        if batch.group() != k.cfg.group {
            return Err(Error::InvalidBatch(crate::kv::LayoutError::Mismatch { what: "GQA group (kernel vs qo_heads / kv_heads)", expected: k.cfg.group, got: batch.group() }));
        }
        if check {
            cascade.validate(batch.batch())?;
        }
        let (rows, target) = self.cascade_tile(k, batch, cascade, 1, false);
        crate::plan::plan_cascade(&k.variant, params, batch, cascade, rows, target, mode)
    }

    /// The tile a cascade's group items run on — the append tile when the rows of every group
    /// of at least `min_members` requests fit it, else (and always when `fixed`: a captured
    /// graph holds one kernel) the prompt tile — as its rows per block and the planner's target.
    fn cascade_tile(&self, k: &PrefillKernel, batch: &ValidBatch<'_>, cascade: &crate::cascade::Cascade, min_members: usize, fixed: bool) -> (usize, PlanTarget) {
        let rows_of = |g: &crate::cascade::Group| g.requests.iter().map(|&r| batch.q_len(r)).sum::<usize>() * batch.group();
        let most = cascade.levels.iter().flat_map(|l| &l.groups).filter(|g| g.requests.len() >= min_members).map(rows_of).max().unwrap_or(0);
        let f = match k.append() {
            Some(a) if !fixed && most <= a.cfg.prefill_tile().rows() => a,
            _ => k.prompt(),
        };
        Self::tile_target(self.sm_count, f)
    }

    fn tile_target(sm_count: usize, f: &super::family::LoadedTile) -> (usize, PlanTarget) {
        let t = f.cfg.prefill_tile();
        (t.rows(), PlanTarget { ctas: sm_count * f.ctas_per_sm, kv_tile: t.kv_tile, resident: 0, always_balance: false })
    }

    /// The tile a fixed-grid decode cascade's prefix runs on (the prompt tile of `pk`), as its
    /// rows per block and the planner's target: with the KV heads, it fixes the prefix section
    /// ([`crate::plan::with_cascade_capacity`]).
    pub fn decode_prefix_tile(&self, pk: &PrefillKernel) -> (usize, PlanTarget) {
        Self::tile_target(self.sm_count, pk.prompt())
    }

    /// i32 words the packed plan of a fixed-grid decode cascade of `pk` may take beyond a plain
    /// fixed-grid decode plan's, for any number of KV heads (a graph wrapper sizes its buffer
    /// before it sees a batch).
    pub(crate) fn decode_prefix_words(&self, pk: &PrefillKernel) -> usize {
        let (rows, target) = self.decode_prefix_tile(pk);
        let ctas = crate::plan::decode_cascade_prefix_ctas(target, 1);
        let per_item = (rows / pk.cfg.group.max(1)).max(1);
        // Alignment, the prefix's header, work list, and its group table.
        4 + 4 + 6 * ctas + 4 + 4 * ctas * per_item
    }

    /// Plans a decode batch through `cascade` (checked against it first;
    /// [`crate::plan::plan_decode_cascade`]): its shared levels as group items on `pk`, the prefill
    /// kernel of `k`'s variant (on its append tile when every shared group's rows fit it), its
    /// suffixes as decode items on `k`. Run it with [`Engine::run_decode_cascade`].
    pub fn plan_decode_cascade(&self, k: &DecodeKernel, pk: &PrefillKernel, params: &ParamValues, batch: &ValidBatch<'_>, cascade: &crate::cascade::Cascade, mode: PlanMode) -> Result<DecodePlan> {
        super::launch::check_companion(k, pk, true)?;
        self.plan_decode_cascade_of(k, pk, params, batch, cascade, mode, true)
    }

    /// [`Engine::plan_decode_cascade`] without the companion check (the caller made it);
    /// `check: false` only for a cascade [`crate::cascade::detect`] built from `batch` itself.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan_decode_cascade_of(&self, k: &DecodeKernel, pk: &PrefillKernel, params: &ParamValues, batch: &ValidBatch<'_>, cascade: &crate::cascade::Cascade, mode: PlanMode, check: bool) -> Result<DecodePlan> {
        if batch.group() != k.cfg.group {
            return Err(Error::InvalidBatch(crate::kv::LayoutError::Mismatch { what: "GQA group (kernel vs qo_heads / kv_heads)", expected: k.cfg.group, got: batch.group() }));
        }
        if check {
            cascade.validate(batch.batch())?;
        }
        // Only the shared groups (two or more requests) run on the prefill kernel.
        let (rows, ptarget) = self.cascade_tile(pk, batch, cascade, 2, matches!(mode, PlanMode::FixedGrid { .. }));
        crate::plan::plan_decode_cascade(&k.variant, params, batch, cascade, rows, ptarget, self.plan_target(k), mode)
    }
}
