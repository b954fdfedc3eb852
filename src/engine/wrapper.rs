//! The two-call API, FlashInfer's shape: a wrapper owns a kernel, the bound parameters, the
//! plan and page-table buffers and the workspace; `plan` (host arrays, once per step) validates
//! the batch once, plans it and uploads the plan and the page table together in one pinned
//! copy; `run` (device tensors, once per layer) launches.
//!
//! Because the wrapper uploaded the index arrays itself from the batch it validated, a launch
//! knows their contents, not only their lengths. In CUDA-graph mode ([`GraphCapacity`]) every
//! buffer is allocated once at its capacity and `plan` only rewrites it, so a graph captured
//! around `run` replays the latest plan.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use super::buffers::{plan_id, table_parts, Capacity, DeviceBatch, DeviceOutput, DeviceParams, KvCache, Staged};
use super::family::{Decode, Family, Kernel, Prefill};
use super::launch::Step;
use super::{cuda, Engine};
use crate::error::PlanError;
use crate::jit::KernelConfig;
use crate::kv::{Batch, Element, KvSizes, OwnedBatch, ValidBatch};
use crate::plan::{Plan, PlanMode};
use crate::spec::params::ParamValues;
use crate::spec::Variant;
use crate::{Error, Result};

/// Most launch events a wrapper keeps for the next upload to wait for (beyond, the host waits).
const MAX_PENDING: usize = 64;

/// Whether `stream` is being captured into a CUDA graph.
fn capturing(stream: &CudaStream) -> Result<bool> {
    Ok(stream.capture_status().map_err(cuda("capture status"))? != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Words rounded up to a multiple of 64 (256 bytes).
fn aligned(words: usize) -> usize {
    words.div_ceil(64) * 64
}

/// Fixed capacities for CUDA-graph mode: buffers are allocated once at these sizes and never
/// move, plans are fixed-grid plans of `max_ctas` CTAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphCapacity {
    /// Most requests a step may have.
    pub max_batch: usize,
    /// Most query tokens a step may have: `run`'s query and output buffers hold this many.
    pub max_tokens: usize,
    /// Most pages a step's page table may hold.
    pub max_pages: usize,
    /// CTAs of the fixed grid (per KV head).
    pub max_ctas: usize,
}

/// How a wrapper plans.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrapperOptions {
    /// The plan mode outside graph mode: [`PlanMode::Default`] or [`PlanMode::Deterministic`].
    pub mode: PlanMode,
    /// CUDA-graph mode, with its capacities; `None` for eager use.
    pub graph: Option<GraphCapacity>,
    /// The softmax scale (`None`: `1/sqrt(head_dim_qk)`).
    pub sm_scale: Option<f32>,
    /// When a wrapper plans a batch whose requests share leading pages as a cascade
    /// ([`crate::cascade::detect`]): a prefill wrapper outside graph mode, a decode wrapper made
    /// with [`DecodeWrapper::with_cascade`] (graph mode included); other decode wrappers ignore it.
    pub cascade: crate::cascade::Policy,
}

impl Default for WrapperOptions {
    fn default() -> Self {
        WrapperOptions { mode: PlanMode::Default, graph: None, sm_scale: None, cascade: crate::cascade::Policy::default() }
    }
}

/// What the last `plan` call made: the plan, the batch it was made for, where both are.
struct Planned<P> {
    plan: P,
    batch: OwnedBatch,
    sizes: KvSizes,
    q_elems: usize,
    o_elems: usize,
    fingerprint: u64,
    /// Offsets (i32 words) of the plan and the four index arrays in the buffer.
    offsets: [usize; 5],
}

/// A two-call wrapper of one kernel family; see the module docs. [`DecodeWrapper`] and
/// [`PrefillWrapper`] are its two instances.
pub struct Wrapper<'e, F: Family> {
    engine: &'e Engine,
    kernel: Arc<Kernel<F>>,
    /// A decode wrapper's prefill kernel of the same variant, for decode cascades
    /// ([`DecodeWrapper::with_cascade`]).
    companion: Option<Arc<Kernel<Prefill>>>,
    options: WrapperOptions,
    params: Option<DeviceParams>,
    /// The plan and the index arrays, one buffer, one copy per `plan`.
    mem: Option<Staged>,
    workspace: Option<CudaSlice<f32>>,
    planned: Option<Planned<F::Plan>>,
    /// The stream the last plan was made on by [`Wrapper::plan_on`] (it already waits for the
    /// upload, so launches on it need no join).
    planned_on: Option<usize>,
    /// Events recorded after launches on streams other than the one the step was planned on:
    /// the next upload waits for them (those launches may still read the buffers it rewrites).
    /// One event per stream handle (the last launch on it), except the per-thread default
    /// stream (handle 2, another stream in every thread), of which at most `MAX_PENDING` wait.
    pending: std::sync::Mutex<Vec<(usize, cudarc::driver::CudaEvent)>>,
}

/// Batch decode through `plan` / `run`.
pub type DecodeWrapper<'e> = Wrapper<'e, Decode>;
/// Batch prefill / append through `plan` / `run`.
pub type PrefillWrapper<'e> = Wrapper<'e, Prefill>;

impl<'e, F: Family> Wrapper<'e, F> {
    /// A wrapper of the kernel for `variant` and `cfg` (compiled or found in the cache, and
    /// loaded). In graph mode its buffers are allocated now, at their capacities.
    pub fn new(engine: &'e Engine, variant: &Variant, cfg: &KernelConfig, options: WrapperOptions) -> Result<Self> {
        let kernel = Arc::new(engine.load::<F>(variant, cfg)?);
        Self::with_kernel(engine, kernel, options)
    }

    /// A wrapper of an already loaded kernel (several wrappers may share one).
    pub fn with_kernel(engine: &'e Engine, kernel: Arc<Kernel<F>>, options: WrapperOptions) -> Result<Self> {
        Self::with_kernels(engine, kernel, None, options)
    }

    fn with_kernels(engine: &'e Engine, kernel: Arc<Kernel<F>>, companion: Option<Arc<Kernel<Prefill>>>, options: WrapperOptions) -> Result<Self> {
        if options.graph.is_none() && matches!(options.mode, PlanMode::FixedGrid { .. }) {
            return Err(PlanError::Invalid("FixedGrid is the graph mode's plan: give WrapperOptions::graph instead".into()).into());
        }
        let prefix_words = companion.as_deref().map_or(0, |pk| engine.decode_prefix_words(pk));
        let mut w = Wrapper { engine, kernel, companion, options, params: None, mem: None, workspace: None, planned: None, planned_on: None, pending: Default::default() };
        if let Some(g) = options.graph {
            // The four index arrays at their capacities, then the plan: header, a fixed grid's
            // work list (at most 6 words an item) and merge list (at most one item per CTA or
            // request), and a decode cascade's prefix section.
            let plan_words = 4 + 6 * g.max_ctas + 4 * g.max_ctas.max(g.max_batch) + prefix_words;
            let table_words = aligned(2 * (g.max_batch + 1) + g.max_batch + g.max_pages.max(1));
            w.mem = Some(Staged::new(engine, table_words + plan_words, true)?);
        }
        Ok(w)
    }

    /// [`DecodeWrapper::with_cascade`], for code generic over the family: a prefill wrapper
    /// refuses it (it plans cascades on its own kernel).
    pub fn with_cascade_kernel(engine: &'e Engine, kernel: Arc<Kernel<F>>, prefill: Arc<Kernel<Prefill>>, options: WrapperOptions) -> Result<Self> {
        if F::OP != crate::jit::Op::Decode {
            return Err(Error::UnsupportedConfig("only a decode wrapper takes a cascade kernel: a prefill wrapper runs its cascades on its own kernel".into()));
        }
        super::launch::check_companion(&kernel, &prefill, true)?;
        Self::with_kernels(engine, kernel, Some(prefill), options)
    }

    /// The kernel.
    pub fn kernel(&self) -> &Arc<Kernel<F>> {
        &self.kernel
    }

    /// The plan of the last `plan` call.
    pub fn current_plan(&self) -> Option<&F::Plan> {
        self.planned.as_ref().map(|p| &p.plan)
    }

    /// Whether the last `plan` runs its batch through a cascade (shared prefixes read once).
    pub fn plans_cascade(&self) -> bool {
        self.planned.as_ref().is_some_and(|p| p.plan.is_cascade())
    }

    /// Plans one step: validates `batch` (host arrays) once, binds `params`, plans, and uploads
    /// the plan and the page table in one pinned copy (the parameters' arrays when they
    /// changed). In graph mode the batch must fit the capacities and the parameters must stay
    /// those of the first step (a captured graph holds their pointers).
    pub fn plan(&mut self, batch: &Batch<'_>, params: &ParamValues) -> Result<&F::Plan> {
        if self.planned_on.is_some() {
            // Launches on that stream may still read the buffers this upload rewrites, and only
            // `plan_on` orders the upload after them.
            return Err(PlanError::Invalid("the last step was planned with plan_on: plan this one with plan_on as well (plan cannot order its upload after that stream's launches)".into()).into());
        }
        self.plan_after_launches(batch, params)
    }

    fn plan_after_launches(&mut self, batch: &Batch<'_>, params: &ParamValues) -> Result<&F::Plan> {
        let valid = batch.validated()?;
        let mut failed = None;
        for (_, ev) in self.pending.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            if let Err(e) = self.engine.stream.wait(&ev) {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(cuda("order the upload after launches on other streams")(e));
        }
        let mode = match self.options.graph {
            Some(g) => PlanMode::FixedGrid { max_ctas: g.max_ctas },
            None => self.options.mode,
        };
        let plan = F::plan_detecting(self.engine, &self.kernel, self.companion.as_deref(), params, &valid, mode, &self.options.cascade)?;
        let capacity = self.options.graph.map(|g| Capacity { max_batch: g.max_batch, max_tokens: g.max_tokens, max_pages: g.max_pages });
        let table = table_parts(batch, capacity)?;
        // The index arrays first, padded so the plan after them starts on a 256-byte boundary
        // and (in graph mode, where the arrays are at their capacities) at a fixed address.
        let table_words: usize = table.iter().map(Vec::len).sum();
        let pad = vec![0i32; aligned(table_words) - table_words];
        let packed = plan.packed();
        let mem = match &mut self.mem {
            Some(m) => m,
            None => self.mem.insert(Staged::new(self.engine, aligned(table_words) + packed.len(), false)?),
        };
        // The buffer is rewritten now: a failure after this must not leave the last plan runnable.
        self.planned = None;
        let o = mem.write(self.engine, &[&table[0], &table[1], &table[2], &table[3], &pad, &packed])?;
        let ws_floats = plan.workspace_bytes() / 4;
        if self.workspace.as_ref().is_none_or(|w| w.len() < ws_floats) {
            if self.options.graph.is_some() && self.workspace.is_some() {
                return Err(PlanError::CapturedBuffersTooSmall.into());
            }
            self.workspace = Some(self.engine.alloc::<f32>(ws_floats)?);
        }
        match &self.params {
            Some(p) if p.values() == params => {}
            Some(_) if self.options.graph.is_some() => {
                return Err(Error::Param("in graph mode the parameters are those of the first step (a captured graph holds their device pointers)".into()));
            }
            _ => self.params = Some(self.engine.upload_params(&self.kernel.layout, params)?),
        }
        self.planned = Some(Planned {
            batch: OwnedBatch::from_batch(batch),
            sizes: *valid.sizes(),
            q_elems: valid.q_elems(),
            o_elems: valid.o_elems(),
            fingerprint: valid.fingerprint(),
            offsets: [o[5], o[0], o[1], o[2], o[3]],
            plan,
        });
        Ok(&self.planned.as_ref().ok_or(PlanError::NotUploaded)?.plan)
    }

    /// [`Wrapper::plan`] for launches on a caller's stream of the engine's context (a serving
    /// engine's current stream): the upload waits for the work already queued on `stream` (a
    /// previous step's launches may still read the buffers it rewrites), and `stream` waits for
    /// the upload (the next launches, or a graph replay, read it). Refused while `stream` is
    /// being captured: plan between replays, capture only `run`.
    pub fn plan_on(&mut self, stream: &Arc<CudaStream>, batch: &Batch<'_>, params: &ParamValues) -> Result<&F::Plan> {
        self.check_stream(stream)?;
        if capturing(stream)? {
            return Err(PlanError::Invalid("plan while the stream is being captured: plan between replays and capture only run".into()).into());
        }
        self.engine.stream.join(stream).map_err(cuda("order the upload after the stream's work"))?;
        self.planned_on = None;
        self.plan_after_launches(batch, params)?;
        stream.join(&self.engine.stream).map_err(cuda("order the stream after the upload"))?;
        self.planned_on = Some(stream.cu_stream() as usize);
        Ok(&self.planned.as_ref().ok_or(PlanError::NotUploaded)?.plan)
    }

    fn check_stream(&self, stream: &Arc<CudaStream>) -> Result<()> {
        if stream.context().cu_ctx() != self.engine.context().cu_ctx() {
            return Err(Error::UnsupportedConfig("the stream belongs to another CUDA context than the engine's".into()));
        }
        Ok(())
    }

    /// Runs the planned step on the engine's stream: `q` `[total_q, qo_heads, head_dim_qk]`, the
    /// cache, and the outputs, all checked against the planned batch first.
    pub fn run<T: Element + DeviceRepr>(&self, q: &CudaSlice<T>, kv: KvCache<'_, T>, out: DeviceOutput<'_, T>) -> Result<()> {
        self.launch(&self.engine.stream, q, kv, out)
    }

    /// [`Wrapper::run`] on a caller's stream of the engine's context (a serving engine's
    /// current stream). Outside a graph capture the stream first waits for this step's upload,
    /// unless the step was planned on it by [`Wrapper::plan_on`], which made it wait already;
    /// on any other stream the next `plan`'s upload waits for this launch.
    pub fn run_on<T: Element + DeviceRepr>(&self, stream: &Arc<CudaStream>, q: &CudaSlice<T>, kv: KvCache<'_, T>, out: DeviceOutput<'_, T>) -> Result<()> {
        self.check_stream(stream)?;
        // The per-thread default stream (handle 2) is another stream in every thread.
        let handle = stream.cu_stream() as usize;
        let planned_here = self.planned_on == Some(handle) && handle != 2;
        let other = !planned_here && !capturing(stream)?;
        if other {
            stream.join(&self.engine.stream).map_err(cuda("order the stream after the upload"))?;
        }
        self.launch(stream, q, kv, out)?;
        if other {
            let ev = stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(cuda("record the launch"))?;
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // Launches on one stream are ordered: its last event stands for all of them.
            pending.retain(|(h, _)| *h != handle || handle == 2);
            if pending.len() >= MAX_PENDING {
                let (_, oldest) = pending.remove(0);
                oldest.synchronize().map_err(cuda("wait for an earlier launch"))?;
            }
            pending.push((handle, ev));
        }
        Ok(())
    }

    fn launch<T: Element + DeviceRepr>(&self, stream: &CudaStream, q: &CudaSlice<T>, kv: KvCache<'_, T>, out: DeviceOutput<'_, T>) -> Result<()> {
        let p = self.planned.as_ref().ok_or(PlanError::Invalid("run before plan: plan the step first".into()))?;
        let (mem, params) = (self.mem.as_ref().ok_or(PlanError::NotUploaded)?, self.params.as_ref().ok_or(PlanError::NotUploaded)?);
        let workspace = self.workspace.as_ref().ok_or(PlanError::NotUploaded)?;
        let base = mem.ptr(self.engine);
        let at = |i: usize| base + 4 * p.offsets[i] as u64;
        let step = Step {
            batch: ValidBatch::trusted(p.batch.batch(), p.sizes, p.q_elems, p.o_elems, p.fingerprint),
            plan: at(0),
            uploaded: Some(plan_id(&p.plan)),
            workspace: workspace.device_ptr(stream).0,
            workspace_bytes: workspace.len() * 4,
            table: [at(1), at(2), at(3), at(4)],
            token_capacity: self.options.graph.map(|g| g.max_tokens),
            companion: self.companion.as_deref(),
        };
        let dev = DeviceBatch { q, kv };
        self.engine.launch_step(stream, &self.kernel, &p.plan, &step, params, &dev, out, self.options.sm_scale)
    }
}

impl<'e> DecodeWrapper<'e> {
    /// A decode wrapper that runs batches sharing a prefix as decode cascades
    /// ([`Engine::plan_decode_cascade`]; found by [`crate::cascade::detect`] under
    /// [`WrapperOptions::cascade`]): the shared levels on `prefill`, the prefill kernel of the
    /// same variant, the rest on `kernel`, one merge. In graph mode every plan carries the
    /// cascade's prefix section (empty when the step shares nothing), so a captured graph
    /// replays steps with and without sharing; that costs one prefill launch of idle CTAs per
    /// step.
    pub fn with_cascade(engine: &'e Engine, kernel: Arc<Kernel<Decode>>, prefill: Arc<Kernel<Prefill>>, options: WrapperOptions) -> Result<Self> {
        Self::with_cascade_kernel(engine, kernel, prefill, options)
    }

    /// The prefill kernel of its decode cascades, if it runs them.
    pub fn cascade_kernel(&self) -> Option<&Arc<Kernel<Prefill>>> {
        self.companion.as_ref()
    }
}

impl<F: Family> Drop for Wrapper<'_, F> {
    /// Waits for the launches on other streams than the plan's (they read this wrapper's
    /// buffers). Launches on the stream of `plan_on` are the caller's to finish first, as for
    /// any buffer a launch reads.
    fn drop(&mut self) {
        for (_, ev) in self.pending.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = ev.synchronize();
        }
    }
}
