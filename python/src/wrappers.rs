//! The cores of the Python wrappers: one engine wrapper per (variant, kernel config), planned
//! from host arrays on the caller's stream, run on DLPack tensors on that stream.
//!
//! FlashInfer's `plan` does not see the cache, so a plan assumes the cache format (interleaved
//! or a separate K and V) of the wrapper's last `run` (separate at first) and the fewest pages
//! the page table indexes; a `run` on a cache of another format re-plans the same step once,
//! outside a graph capture (inside one it is an error), and a cache with fewer pages than the
//! table indexes is an error.

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use attnforge::cascade::Policy;
use attnforge::engine::{DeviceOutput, Engine, Family, GraphCapacity, KvCache, Prefill, Wrapper, WrapperOptions};
use attnforge::jit::KernelConfig;
use attnforge::kv::{Batch, DType, Element, KvLayout, KvShape, PageTable};
use attnforge::plan::PlanMode;
use attnforge::spec::params::{Dims, ParamValues};
use attnforge::spec::Variant;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use half::{bf16, f16};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dlpack::{host_ints, Dt, Tensor};
use crate::errors::{argument_error, guard, tensor_error, to_py, OrRaise};
use crate::{kvcache, PyVariant};

/// One engine per CUDA device, for the life of the process (the wrappers borrow it).
pub(crate) fn engine(py: Python<'_>, device: usize) -> PyResult<&'static Engine> {
    static ENGINES: OnceLock<Mutex<Vec<(usize, &'static Engine)>>> = OnceLock::new();
    let mut engines = ENGINES.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, e)) = engines.iter().find(|(d, _)| *d == device) {
        return Ok(e);
    }
    let e: &'static Engine = Box::leak(Box::new(Engine::new(device).or_raise(py)?));
    engines.push((device, e));
    Ok(e)
}

/// Whether a CUDA driver and a GPU are there (and NVRTC, which the engine needs).
#[pyfunction]
#[pyo3(signature = (device = 0))]
pub fn gpu_available(py: Python<'_>, device: usize) -> bool {
    attnforge::engine::driver_present() && engine(py, device).is_ok()
}

/// Query heads per KV head, checked.
pub fn group(py: Python<'_>, qo: usize, kv: usize) -> PyResult<usize> {
    if qo == 0 || kv == 0 || qo % kv != 0 {
        return Err(argument_error(py, &format!("num_qo_heads ({qo}) must be a positive multiple of num_kv_heads ({kv})")));
    }
    Ok(qo / kv)
}

/// A caller's device pointer as a `CudaSlice` the engine can take, never freed by us.
struct Borrowed<T>(ManuallyDrop<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` holds `len` elements of `T` on the stream's device, alive while this is used.
    unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        Borrowed(ManuallyDrop::new(stream.upgrade_device_ptr::<T>(ptr, len)))
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` gives the pointer back without freeing it.
        let s = unsafe { ManuallyDrop::take(&mut self.0) };
        let _ = s.leak();
    }
}

/// What the last plan was made from (host arrays), to re-plan it for another cache format.
struct Step {
    variant: Arc<Variant>,
    qo_indptr: Vec<i32>,
    pages: PageTable,
    qo_heads: usize,
    kv_heads: usize,
    head_dim_qk: usize,
    head_dim_vo: usize,
    page_size: usize,
    /// Pages the table indexes (the highest index + 1).
    pages_needed: usize,
    dtype: DType,
    params: ParamValues,
    sm_scale: Option<f32>,
    /// The cache format planned for.
    interleaved: bool,
    total_q: usize,
}

impl Step {
    fn shape(&self, layout: KvLayout) -> KvShape {
        KvShape {
            layout,
            interleaved: self.interleaved,
            num_pages: self.pages_needed.max(1),
            page_size: self.page_size,
            kv_heads: self.kv_heads,
            head_dim_qk: self.head_dim_qk,
            head_dim_vo: self.head_dim_vo,
        }
    }
}

/// The kernel a wrapper runs: its variant (by identity, held so that its address is never
/// reused while this key lives), config and softmax scale.
struct Key {
    variant: Arc<Variant>,
    cfg: KernelConfig,
    sm_scale: Option<u32>,
}

impl PartialEq for Key {
    fn eq(&self, o: &Key) -> bool {
        Arc::ptr_eq(&self.variant, &o.variant) && self.cfg == o.cfg && self.sm_scale == o.sm_scale
    }
}

/// The shared core of the decode and prefill wrappers.
pub struct Core<F: Family> {
    device: usize,
    layout: KvLayout,
    graph: Option<GraphCapacity>,
    mode: PlanMode,
    interleaved: bool,
    current: Option<(Key, Wrapper<'static, F>)>,
    /// When a plan goes through a cascade (shared prefixes read once).
    policy: Policy,
    /// Whether a decode wrapper has tried to load its cascade kernel (the prefill kernel of the
    /// same variant, on which a decode cascade's shared prefixes run): in graph mode when the
    /// wrapper is made, in eager mode at the first step that shares a prefix.
    cascade_tried: bool,
    step: Option<Step>,
    /// In graph mode, the fewest pages of the caches `run` has seen: a captured graph replays on
    /// them without a `run`, so `plan` checks the page table against this.
    cache_pages: Option<usize>,
    /// The prefill main loop FlashInfer's `backend` asked for: `None` ("auto") the engine's
    /// choice, `Some(true)` ("fa3") the Hopper loop, `Some(false)` ("fa2") the portable one.
    prefill_loop: Option<bool>,
}

/// Host-side inputs of one plan call.
pub struct PlanArgs<'a, 'py> {
    variant: &'a PyVariant,
    qo_indptr: Vec<i32>,
    pages: PageTable,
    qo_heads: usize,
    kv_heads: usize,
    head_dim_qk: usize,
    head_dim_vo: usize,
    page_size: usize,
    dtype: DType,
    params: Option<&'a Bound<'py, PyDict>>,
    sm_scale: Option<f32>,
}

pub(crate) fn stream_of(e: &Engine, stream: u64) -> Arc<CudaStream> {
    // SAFETY: the caller gives its current stream of this device's primary context (the one
    // torch and CuPy use), alive for the call; work on it is ordered by the stream itself.
    unsafe { e.context().wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream) }
}

impl<F: Family> Core<F> {
    fn new(py: Python<'_>, device: usize, kv_layout: &str, graph: Option<GraphCapacity>, deterministic: bool, cascade: bool) -> PyResult<Self> {
        let layout = crate::parse_layout(py, kv_layout)?;
        let mode = if deterministic { PlanMode::Deterministic { chunk: 1024 } } else { PlanMode::Default };
        if deterministic && graph.is_some() {
            return Err(argument_error(py, "deterministic and use_cuda_graph: a graph's fixed-grid plan is its own schedule; choose one"));
        }
        let policy = Policy { enabled: cascade, ..Policy::default() };
        Ok(Core { device, layout, graph, mode, interleaved: false, current: None, policy, cascade_tried: false, step: None, cache_pages: None, prefill_loop: None })
    }

    /// The planned step's (total query tokens, query heads, value head dim).
    fn planned(&self) -> Option<(usize, usize, usize)> {
        self.step.as_ref().map(|s| (s.total_q, s.qo_heads, s.head_dim_vo))
    }

    fn plan(&mut self, py: Python<'_>, a: PlanArgs<'_, '_>, stream: u64) -> PyResult<()> {
        let group = group(py, a.qo_heads, a.kv_heads)?;
        let pages_needed = a.pages.indices.iter().copied().max().map_or(0, |m| m.max(0) as usize + 1);
        let total_q = a.qo_indptr.last().copied().unwrap_or(0).max(0) as usize;
        let step = Step {
            variant: a.variant.inner.clone(),
            qo_indptr: a.qo_indptr,
            pages: a.pages,
            qo_heads: a.qo_heads,
            kv_heads: a.kv_heads,
            head_dim_qk: a.head_dim_qk,
            head_dim_vo: a.head_dim_vo,
            page_size: a.page_size,
            pages_needed,
            dtype: a.dtype,
            params: ParamValues::default(),
            sm_scale: a.sm_scale,
            interleaved: self.interleaved,
            total_q,
        };
        if let (Some(_), Some(have)) = (self.graph, self.cache_pages) {
            if pages_needed > have {
                return Err(tensor_error(py, &format!("the page table indexes page {}, but the cache the graph was captured on holds {have} pages", pages_needed - 1)));
            }
        }
        // Host checks first: a bad page table is a BatchError on any machine.
        let shape = step.shape(self.layout);
        let batch = Batch { qo_indptr: &step.qo_indptr, pages: &step.pages, kv: shape, qo_heads: step.qo_heads };
        batch.validated().or_raise(py)?;
        let dims = Dims { qo_heads: step.qo_heads, kv_heads: step.kv_heads, batch: batch.batch_size() };
        let params = crate::bind(py, &step.variant, a.params, dims)?;
        let cfg = match F::OP {
            attnforge::jit::Op::Decode => KernelConfig::decode(step.head_dim_qk, step.head_dim_vo, step.dtype, group),
            _ => KernelConfig::prefill(step.head_dim_qk, step.head_dim_vo, step.dtype, group),
        }
        .or_raise(py)?;
        let cfg = match self.prefill_loop {
            Some(true) => cfg.sm90_prefill().ok_or_else(|| {
                to_py(py, attnforge::Error::UnsupportedConfig(format!("backend='fa3' (the Hopper main loop) takes head dims that are multiples of 64, not {}/{}", step.head_dim_qk, step.head_dim_vo)))
            })?,
            Some(false) => KernelConfig { prefill_override: Some(cfg.prefill_tile()), ..cfg },
            None => cfg,
        };
        let step = Step { params, ..step };
        self.plan_step(py, step, cfg, stream)
    }

    fn plan_step(&mut self, py: Python<'_>, step: Step, cfg: KernelConfig, stream: u64) -> PyResult<()> {
        let e = engine(py, self.device)?;
        let key = Key { variant: step.variant.clone(), cfg: cfg.clone(), sm_scale: step.sm_scale.map(f32::to_bits) };
        if self.current.as_ref().is_none_or(|(k, _)| *k != key) {
            if self.graph.is_some() && self.current.is_some() {
                return Err(to_py(
                    py,
                    attnforge::Error::Plan(attnforge::error::PlanError::Invalid(
                        "in CUDA-graph mode a wrapper keeps its kernel (variant, head dims, heads, dtype, sm_scale): a captured graph holds its buffers; make another wrapper".into(),
                    )),
                ));
            }
            let kernel = Arc::new(e.load::<F>(&step.variant, &cfg).or_raise(py)?);
            let graph = self.graph.map(|g| GraphCapacity { max_ctas: if g.max_ctas == 0 { fixed_grid_bound::<F>(e, &kernel, &g, &step) } else { g.max_ctas }, ..g });
            let options = WrapperOptions { mode: self.mode, graph, sm_scale: step.sm_scale, cascade: self.policy };
            // A graph's buffers are fixed now: a decode wrapper that may run cascades takes its
            // cascade kernel at once (every step then carries the cascade's prefix section).
            self.cascade_tried = false;
            let w = if self.graph.is_some() && self.wants_cascade() {
                self.cascade_tried = true;
                self.with_cascade(py, e, &step, &cfg, kernel, options)?
            } else {
                Wrapper::<F>::with_kernel(e, kernel, options).or_raise(py)?
            };
            self.current = Some((key, w));
        }
        let shape = step.shape(self.layout);
        let batch = Batch { qo_indptr: &step.qo_indptr, pages: &step.pages, kv: shape, qo_heads: step.qo_heads };
        let s = stream_of(e, stream);
        self.step = None;
        // In eager mode a decode wrapper takes its cascade kernel at the first step whose
        // requests share leading pages (most batches never do, and the kernel costs a compile).
        if self.graph.is_none() && !self.cascade_tried && self.wants_cascade() {
            let valid = batch.validated().or_raise(py)?;
            if attnforge::cascade::detect(&valid, &self.policy).is_some() {
                self.cascade_tried = true;
                let (key, w) = self.current.take().ok_or_else(|| argument_error(py, "no kernel"))?;
                let options = WrapperOptions { mode: self.mode, graph: None, sm_scale: step.sm_scale, cascade: self.policy };
                let kernel = w.kernel().clone();
                drop(w);
                let w = self.with_cascade(py, e, &step, &cfg, kernel, options)?;
                self.current = Some((key, w));
            }
        }
        let (_, w) = self.current.as_mut().ok_or_else(|| argument_error(py, "no kernel"))?;
        w.plan_on(&s, &batch, &step.params).or_raise(py)?;
        self.step = Some(step);
        Ok(())
    }

    /// Whether this is a decode wrapper whose batches may run as decode cascades (default and
    /// graph plans: a deterministic plan's bits must not depend on the rest of the batch, which
    /// decides the levels).
    fn wants_cascade(&self) -> bool {
        F::OP == attnforge::jit::Op::Decode && self.policy.enabled && !matches!(self.mode, PlanMode::Deterministic { .. })
    }

    /// A decode wrapper of `kernel` with the prefill kernel of the same variant for its
    /// cascades; without it (and a warning saying why) where that kernel has no config.
    fn with_cascade(&self, py: Python<'_>, e: &'static Engine, step: &Step, cfg: &KernelConfig, kernel: Arc<attnforge::engine::Kernel<F>>, options: WrapperOptions) -> PyResult<Wrapper<'static, F>> {
        let prefill = KernelConfig::prefill(step.head_dim_qk, step.head_dim_vo, step.dtype, cfg.group).and_then(|pcfg| e.load::<Prefill>(&step.variant, &pcfg));
        match prefill {
            Ok(pk) => Wrapper::<F>::with_cascade_kernel(e, kernel, Arc::new(pk), options).or_raise(py),
            Err(attnforge::Error::UnsupportedConfig(why)) => {
                let msg = std::ffi::CString::new(format!("attnforge: decode batches that share a prefix are planned without a cascade: {why}").replace('\0', " ")).unwrap_or_default();
                PyErr::warn(py, &py.get_type::<pyo3::exceptions::PyRuntimeWarning>(), &msg, 1)?;
                Wrapper::<F>::with_kernel(e, kernel, options).or_raise(py)
            }
            Err(err) => Err(to_py(py, err)),
        }
    }

    /// Whether the last plan runs as a cascade (shared prefixes read once).
    fn cascaded(&self) -> bool {
        self.step.is_some() && self.current.as_ref().is_some_and(|(_, w)| w.plans_cascade())
    }

    #[allow(clippy::too_many_arguments)]
    fn run(&mut self, py: Python<'_>, q: &Bound<'_, PyAny>, kv: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, lse: &Bound<'_, PyAny>, stream: u64, ragged: bool) -> PyResult<()> {
        let step = self.step.as_ref().ok_or_else(|| to_py(py, attnforge::Error::Plan(attnforge::error::PlanError::Invalid("run before plan: plan the step first".into()))))?;
        let want = Dt::of_engine(step.dtype);
        let qt = Tensor::from_obj("q", q, Some(stream))?;
        qt.on_cuda(py, self.device)?;
        qt.dtype_in(py, &[want]).map_err(|_| tensor_error(py, &format!("q: dtype {}, but the plan was made for q_data_type {}", qt.dtype.name(), want.name())))?;
        qt.shape_is(py, &[None, Some(step.qo_heads), Some(step.head_dim_qk)], "(tokens, num_qo_heads, head_dim_qk)")?;
        qt.contiguous(py)?;
        let rows = qt.shape[0];
        match self.graph {
            None if rows != step.total_q => return Err(tensor_error(py, &format!("q: {rows} tokens, but the plan has {}", step.total_q))),
            Some(g) if rows < g.max_tokens => return Err(tensor_error(py, &format!("q: {rows} tokens; in CUDA-graph mode q, out and lse hold the capacity, {} tokens", g.max_tokens))),
            _ => {}
        }
        let cache = kvcache::parse(py, kv, self.layout, Some(stream), ragged)?;
        cache.on_cuda(py, self.device)?;
        if cache.dtype != want {
            return Err(tensor_error(py, &format!("paged_kv_cache: dtype {}, but the plan was made for {}", cache.dtype.name(), want.name())));
        }
        let geometry = (cache.shape.page_size, cache.shape.kv_heads, cache.shape.head_dim_qk, cache.shape.head_dim_vo);
        let planned = (step.page_size, step.kv_heads, step.head_dim_qk, step.head_dim_vo);
        if geometry != planned {
            return Err(tensor_error(py, &format!("paged_kv_cache: (page_size, num_kv_heads, head_dim_qk, head_dim_vo) = {geometry:?}, but the plan was made for {planned:?}")));
        }
        if self.graph.is_some() {
            self.cache_pages = Some(self.cache_pages.map_or(cache.shape.num_pages, |c| c.min(cache.shape.num_pages)));
        }
        if cache.shape.num_pages < step.pages_needed {
            return Err(tensor_error(py, &format!("paged_kv_cache: {} pages, but the page table indexes page {}", cache.shape.num_pages, step.pages_needed - 1)));
        }
        let ot = Tensor::from_obj("out", out, Some(stream))?;
        ot.on_cuda(py, self.device)?;
        ot.dtype_in(py, &[want])?;
        ot.shape_is(py, &[Some(rows), Some(step.qo_heads), Some(step.head_dim_vo)], "(tokens, num_qo_heads, head_dim_vo), as q")?;
        ot.contiguous(py)?;
        let lt = Tensor::from_obj("lse", lse, Some(stream))?;
        lt.on_cuda(py, self.device)?;
        lt.dtype_in(py, &[Dt::F32])?;
        lt.shape_is(py, &[Some(rows), Some(step.qo_heads)], "(tokens, num_qo_heads), as q")?;
        lt.contiguous(py)?;
        // The kernels move q, K, V and out in 16-byte vectors, the LSE in f32s.
        for (t, align) in [(&qt, 16u64), (&ot, 16), (&lt, 4)].into_iter().chain(cache.tensors.iter().map(|t| (t, 16))) {
            if t.data % align != 0 {
                return Err(tensor_error(py, &format!("{}: at address {:#x}, not a multiple of {align} bytes, which the kernels need (a view at an odd offset?)", t.arg, t.data)));
            }
        }
        if cache.shape.interleaved != step.interleaved {
            // The plan assumed the other cache format: plan the same step for this one.
            let (cfg, step) = (self.current.as_ref().map(|(k, _)| k.cfg.clone()).ok_or_else(|| argument_error(py, "no kernel"))?, self.step.take().ok_or_else(|| argument_error(py, "no plan"))?);
            self.plan_step(py, Step { interleaved: cache.shape.interleaved, ..step }, cfg, stream)?;
            self.interleaved = cache.shape.interleaved;
        }
        let step = self.step.as_ref().ok_or_else(|| argument_error(py, "no plan"))?;
        let (_, w) = self.current.as_ref().ok_or_else(|| argument_error(py, "no kernel"))?;
        let e = engine(py, self.device)?;
        let s = stream_of(e, stream);
        let shape = step.shape(self.layout);
        let lens = Lens { q: rows * step.qo_heads * step.head_dim_qk, o: rows * step.qo_heads * step.head_dim_vo, lse: rows * step.qo_heads, k: shape.k_len(), v: shape.v_len() };
        let ptrs = Ptrs { q: qt.data, k: cache.k_ptr, v: cache.v_ptr, o: ot.data, lse: lt.data };
        // SAFETY: every pointer is a live CUDA tensor's on this device, checked above for dtype,
        // shape and contiguity; the K/V lengths are the planned cache's (at most as many pages as
        // the caller's cache holds), so the launch reads and writes inside the caller's tensors,
        // which stay alive (`qt`, `cache`, `ot`, `lt`) until the launch is queued.
        unsafe {
            match want {
                Dt::F16 => launch::<F, f16>(w, &s, step.interleaved, ptrs, lens),
                _ => launch::<F, bf16>(w, &s, step.interleaved, ptrs, lens),
            }
        }
        .or_raise(py)?;
        drop((qt, cache, ot, lt));
        Ok(())
    }
}

struct Ptrs {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
}

struct Lens {
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    lse: usize,
}

/// # Safety
/// See the call in [`Core::run`].
unsafe fn launch<F: Family, T: Element + DeviceRepr>(w: &Wrapper<'static, F>, s: &Arc<CudaStream>, interleaved: bool, p: Ptrs, n: Lens) -> attnforge::Result<()> {
    let q = Borrowed::<T>::new(s, p.q, n.q);
    let k = Borrowed::<T>::new(s, p.k, n.k);
    let v = Borrowed::<T>::new(s, p.v, n.v);
    let mut o = Borrowed::<T>::new(s, p.o, n.o);
    let mut lse = Borrowed::<f32>::new(s, p.lse, n.lse);
    let kv = if interleaved { KvCache::Interleaved(&k.0) } else { KvCache::Separate { k: &k.0, v: &v.0 } };
    w.run_on(s, &q.0, kv, DeviceOutput { o: &mut o.0, lse: &mut lse.0 })
}

impl Dt {
    fn of_engine(d: DType) -> Dt {
        match d {
            DType::F16 => Dt::F16,
            DType::Bf16 => Dt::Bf16,
            DType::F32 => Dt::F32,
        }
    }
}

fn capacity(
    py: Python<'_>,
    use_cuda_graph: bool,
    max_batch_size: Option<usize>,
    max_tokens: Option<usize>,
    max_pages: Option<usize>,
    max_ctas: Option<usize>,
    decode: bool,
) -> PyResult<Option<GraphCapacity>> {
    if !use_cuda_graph {
        if max_batch_size.is_some() || max_tokens.is_some() || max_pages.is_some() {
            return Err(argument_error(py, "max_batch_size / max_tokens / max_pages are CUDA-graph capacities: pass use_cuda_graph=True"));
        }
        return Ok(None);
    }
    let b = max_batch_size.ok_or_else(|| argument_error(py, "use_cuda_graph=True needs max_batch_size (or FlashInfer's paged_kv_indptr_buffer)"))?;
    let p = max_pages.ok_or_else(|| argument_error(py, "use_cuda_graph=True needs max_pages (or FlashInfer's paged_kv_indices_buffer)"))?;
    let t = if decode { max_tokens.unwrap_or(b) } else { max_tokens.ok_or_else(|| argument_error(py, "a prefill wrapper with use_cuda_graph=True needs max_tokens"))? };
    if b == 0 || t == 0 {
        return Err(argument_error(py, "CUDA-graph capacities must be at least 1"));
    }
    Ok(Some(GraphCapacity { max_batch: b, max_tokens: t, max_pages: p, max_ctas: max_ctas.unwrap_or(0) }))
}

/// The CTAs of a fixed grid that any batch within the capacities can be planned on, for a
/// graph wrapper whose `max_ctas` was not given (known once the kernel and the head counts are).
/// Decode: [`attnforge::plan::decode_fixed_grid_bound`] (tier 0 checks it on random batches).
/// Prefill in a fixed grid never splits KV: one item per block of the prompt tile's query rows,
/// `max_tokens × group` rows in at most `max_batch` requests.
fn fixed_grid_bound<F: Family>(e: &Engine, k: &attnforge::engine::Kernel<F>, g: &GraphCapacity, s: &Step) -> usize {
    let sms = e.sm_count();
    match F::OP {
        attnforge::jit::Op::Decode => {
            let per_sm = k.tiles.iter().map(|t| t.ctas_per_sm).max().unwrap_or(1);
            let target = attnforge::plan::PlanTarget { ctas: sms, kv_tile: 1, resident: sms * per_sm, always_balance: false };
            attnforge::plan::decode_fixed_grid_bound(&s.variant, target, s.kv_heads, g.max_batch)
        }
        _ => {
            let rows = k.tiles.first().map_or(1, |t| t.cfg.prefill_tile().rows()).max(1);
            (g.max_tokens * (s.qo_heads / s.kv_heads.max(1)).max(1)).div_ceil(rows) + g.max_batch
        }
    }
}

/// The core of `BatchDecodeWithPagedKVCacheWrapper`.
#[pyclass(module = "attnforge._attnforge")]
pub struct DecodeCore(Mutex<Core<attnforge::engine::Decode>>);

/// The core of `BatchPrefillWithPagedKVCacheWrapper` and the ragged one.
#[pyclass(module = "attnforge._attnforge")]
pub struct PrefillCore(Mutex<Core<attnforge::engine::Prefill>>);

/// The core, or an error when another thread is inside this wrapper: a wrapper serves one
/// thread at a time (as FlashInfer's), and waiting here while holding the GIL could deadlock
/// with a thread that holds the lock and waits for the GIL inside `__dlpack__`.
fn lock<'a, T>(py: Python<'_>, m: &'a Mutex<T>) -> PyResult<std::sync::MutexGuard<'a, T>> {
    match m.try_lock() {
        Ok(g) => Ok(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => Err(argument_error(py, "this wrapper is in use by another thread: give each thread its own wrapper")),
    }
}

#[pymethods]
impl DecodeCore {
    #[new]
    #[pyo3(signature = (device, kv_layout, use_cuda_graph, max_batch_size, max_pages, max_ctas, deterministic, cascade = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        device: usize,
        kv_layout: &str,
        use_cuda_graph: bool,
        max_batch_size: Option<usize>,
        max_pages: Option<usize>,
        max_ctas: Option<usize>,
        deterministic: bool,
        cascade: bool,
    ) -> PyResult<Self> {
        guard(py, || {
            let g = capacity(py, use_cuda_graph, max_batch_size, None, max_pages, max_ctas, true)?;
            Ok(DecodeCore(Mutex::new(Core::new(py, device, kv_layout, g, deterministic, cascade)?)))
        })
    }

    #[pyo3(signature = (indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, head_dim_vo, q_data_type, variant, params, sm_scale, stream))]
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        py: Python<'_>,
        indptr: &Bound<'_, PyAny>,
        indices: &Bound<'_, PyAny>,
        last_page_len: &Bound<'_, PyAny>,
        num_qo_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        head_dim_vo: Option<usize>,
        q_data_type: &Bound<'_, PyAny>,
        variant: &PyVariant,
        params: Option<&Bound<'_, PyDict>>,
        sm_scale: Option<f32>,
        stream: u64,
    ) -> PyResult<()> {
        guard(py, || {
            let pages = PageTable { indptr: host_ints("indptr", indptr)?, indices: host_ints("indices", indices)?, last_page_len: host_ints("last_page_len", last_page_len)? };
            let b = pages.indptr.len().saturating_sub(1) as i32;
            let args = PlanArgs {
                variant,
                qo_indptr: (0..=b).collect(),
                pages,
                qo_heads: num_qo_heads,
                kv_heads: num_kv_heads,
                head_dim_qk: head_dim,
                head_dim_vo: head_dim_vo.unwrap_or(head_dim),
                page_size,
                dtype: crate::dlpack::parse_dtype("q_data_type", q_data_type)?,
                params,
                sm_scale,
            };
            lock(py, &self.0)?.plan(py, args, stream)
        })
    }

    #[pyo3(signature = (q, paged_kv_cache, out, lse, stream))]
    fn run(&self, py: Python<'_>, q: &Bound<'_, PyAny>, paged_kv_cache: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, lse: &Bound<'_, PyAny>, stream: u64) -> PyResult<()> {
        guard(py, || lock(py, &self.0)?.run(py, q, paged_kv_cache, out, lse, stream, false))
    }

    /// The planned step's (total query tokens, query heads, value head dim), or None.
    fn planned(&self, py: Python<'_>) -> Option<(usize, usize, usize)> {
        lock(py, &self.0).ok()?.planned()
    }

    /// Whether the planned step runs as a cascade (shared prefixes read once).
    fn cascaded(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(lock(py, &self.0)?.cascaded())
    }
}

#[pymethods]
impl PrefillCore {
    #[new]
    #[pyo3(signature = (device, kv_layout, use_cuda_graph, max_batch_size, max_tokens, max_pages, max_ctas, deterministic, cascade = true, backend = "auto"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        device: usize,
        kv_layout: &str,
        use_cuda_graph: bool,
        max_batch_size: Option<usize>,
        max_tokens: Option<usize>,
        max_pages: Option<usize>,
        max_ctas: Option<usize>,
        deterministic: bool,
        cascade: bool,
        backend: &str,
    ) -> PyResult<Self> {
        guard(py, || {
            let g = capacity(py, use_cuda_graph, max_batch_size, max_tokens, max_pages, max_ctas, false)?;
            let mut core = Core::new(py, device, kv_layout, g, deterministic, cascade)?;
            core.prefill_loop = match backend {
                "auto" => None,
                "fa3" => Some(true),
                "fa2" => Some(false),
                other => return Err(argument_error(py, &format!("backend {other:?}: expected 'auto' (the engine's choice), 'fa3' (the Hopper main loop, sm_90a) or 'fa2' (the portable one)"))),
            };
            Ok(PrefillCore(Mutex::new(core)))
        })
    }

    /// `kv_indices` and `last_page_len` are None for the ragged wrapper: its K/V rows are pages
    /// of one token, `kv_indptr` indexes them directly.
    #[pyo3(signature = (qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, q_data_type, variant, params, sm_scale, stream))]
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        py: Python<'_>,
        qo_indptr: &Bound<'_, PyAny>,
        kv_indptr: &Bound<'_, PyAny>,
        kv_indices: Option<&Bound<'_, PyAny>>,
        last_page_len: Option<&Bound<'_, PyAny>>,
        num_qo_heads: usize,
        num_kv_heads: usize,
        head_dim_qk: usize,
        page_size: usize,
        head_dim_vo: Option<usize>,
        q_data_type: &Bound<'_, PyAny>,
        variant: &PyVariant,
        params: Option<&Bound<'_, PyDict>>,
        sm_scale: Option<f32>,
        stream: u64,
    ) -> PyResult<()> {
        guard(py, || {
            let pages = match (kv_indices, last_page_len) {
                (Some(i), Some(l)) => {
                    PageTable { indptr: host_ints("paged_kv_indptr", kv_indptr)?, indices: host_ints("paged_kv_indices", i)?, last_page_len: host_ints("paged_kv_last_page_len", l)? }
                }
                (None, None) => {
                    let indptr = host_ints("kv_indptr", kv_indptr)?;
                    let total = indptr.last().copied().unwrap_or(0).max(0);
                    let last_page_len = indptr.windows(2).map(|w| i32::from(w[1] > w[0])).collect();
                    PageTable { indptr, indices: (0..total).collect(), last_page_len }
                }
                _ => return Err(argument_error(py, "kv_indices and last_page_len are given together (paged) or not at all (ragged)")),
            };
            let args = PlanArgs {
                variant,
                qo_indptr: host_ints("qo_indptr", qo_indptr)?,
                pages,
                qo_heads: num_qo_heads,
                kv_heads: num_kv_heads,
                head_dim_qk,
                head_dim_vo: head_dim_vo.unwrap_or(head_dim_qk),
                page_size,
                dtype: crate::dlpack::parse_dtype("q_data_type", q_data_type)?,
                params,
                sm_scale,
            };
            lock(py, &self.0)?.plan(py, args, stream)
        })
    }

    #[pyo3(signature = (q, kv, out, lse, stream, ragged))]
    #[allow(clippy::too_many_arguments)]
    fn run(&self, py: Python<'_>, q: &Bound<'_, PyAny>, kv: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>, lse: &Bound<'_, PyAny>, stream: u64, ragged: bool) -> PyResult<()> {
        guard(py, || lock(py, &self.0)?.run(py, q, kv, out, lse, stream, ragged))
    }

    /// The planned step's (total query tokens, query heads, value head dim), or None.
    fn planned(&self, py: Python<'_>) -> Option<(usize, usize, usize)> {
        lock(py, &self.0).ok()?.planned()
    }

    /// Whether the planned step runs as a cascade (shared prefixes read once).
    fn cascaded(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(lock(py, &self.0)?.cascaded())
    }
}
