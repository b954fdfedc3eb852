//! GPU benchmarks behind `attnforge bench`: decode at the shapes of FlashInfer's published
//! numbers (`../shared/docs/ANCHORS.md`), timed as CUDA-graph replays and as eager host calls.
//!
//! Inputs rotate over enough copies of the KV cache (each with its own page table) that one
//! graph of 20 calls touches more than twice the 50 MB L2, so small shapes are not timed out of
//! cache. Data is random (never zeros), tiled from a 1M-element block to keep set-up fast.

use std::collections::HashMap;
use std::time::Instant;

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::engine::{DeviceBatch, DeviceOutput, DeviceTable, Engine, KvCache, PlanBuffers};
use crate::jit::KernelConfig;
use crate::kv::{Batch, DType, KvLayout, KvShape, PageTable, ValidBatch};
use crate::plan::PlanMode;
use crate::spec::params::{Dims, ParamInput};
use crate::spec::shipped;
use crate::{Error, Result};

/// Device-to-device copy bandwidth of the H100 measured in ANCHORS.md (bytes read + written).
pub const COPY_CEILING_GBPS: f64 = 2950.0;

/// The card ANCHORS.md's FlashInfer numbers were measured on. On any other card they are printed
/// for reference only: `benches/flashinfer_decode.py` measures FlashInfer on the card at hand.
pub const ANCHOR_CARD: &str = "NVIDIA H100 80GB HBM3";

/// Device-to-device copy bandwidth of the engine's GPU in GB/s (bytes read + written): 1 GiB
/// copies, median of 20 after 3 warm-ups, as ANCHORS.md measured its ceiling.
pub fn measure_copy_gbps(e: &Engine) -> Result<f64> {
    let n = 1usize << 30;
    let src = e.alloc::<u8>(n)?;
    let mut dst = e.alloc::<u8>(n)?;
    let cu = |x: cudarc::driver::DriverError| Error::Cuda { call: "bench".into(), detail: x.to_string() };
    let start = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    let end = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    for _ in 0..3 {
        e.stream().memcpy_dtod(&src, &mut dst).map_err(cu)?;
    }
    let mut samples = Vec::new();
    for _ in 0..20 {
        start.record(e.stream()).map_err(cu)?;
        e.stream().memcpy_dtod(&src, &mut dst).map_err(cu)?;
        end.record(e.stream()).map_err(cu)?;
        end.synchronize().map_err(cu)?;
        let ms = f64::from(start.elapsed_ms(&end).map_err(cu)?);
        samples.push(2.0 * n as f64 / (ms * 1e-3) / 1e9);
    }
    Ok(median(samples))
}

/// The read-only streams the decode suite measures the card's read ceiling with: every thread
/// loads 16-byte vectors in a grid-stride loop (`attnforge_read_probe`: one per iteration, the
/// loop unrolled by 4; `attnforge_read_probe4`: four independent vectors per iteration, a
/// quarter of the buffer apart) and folds them into a register, written only when it equals a
/// value no input holds (so the loads cannot be dropped).
pub fn read_probe_source() -> crate::jit::KernelSource {
    let code = r#"
extern "C" __global__ void __launch_bounds__(512) attnforge_read_probe(const uint4* __restrict__ src, unsigned long long n, unsigned int* out) {
  unsigned int acc = 0;
#pragma unroll 4
  for (unsigned long long i = blockIdx.x * 512ull + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * 512ull) {
    uint4 v = __ldcs(src + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
extern "C" __global__ void __launch_bounds__(512) attnforge_read_probe4(const uint4* __restrict__ src, unsigned long long n, unsigned int* out) {
  unsigned int acc = 0;
  const unsigned long long q = n / 4;
  for (unsigned long long i = blockIdx.x * 512ull + threadIdx.x; i < q; i += (unsigned long long)gridDim.x * 512ull) {
    const uint4 a = __ldcs(src + i), b = __ldcs(src + q + i), c = __ldcs(src + 2 * q + i), d = __ldcs(src + 3 * q + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
"#;
    crate::jit::KernelSource { name: "read_probe".into(), code: code.into(), hook_lines: Vec::new() }
}

/// The card's read ceiling in GB/s: the best of [`read_probe_source`]'s two streams at 4, 8 and
/// 16 CTAs of 512 threads per SM over 1 GiB (more than L2 holds, the buffer zeroed so no value
/// matches), each the median of 20 after warm-up. Decode reads its cache once, so this, not the
/// copy rate, is its limit. (One stream at 8 CTAs per SM, the first probe, read 4316 GB/s on an
/// H200 where decode itself streamed 4415.)
pub fn measure_read_gbps(e: &Engine) -> Result<f64> {
    let n = 1usize << 30;
    let src = e.alloc::<u8>(n)?;
    let mut out = e.alloc::<u32>(1)?;
    let nvrtc = e.jit().nvrtc();
    let cubin = nvrtc.compile(&read_probe_source(), &nvrtc.options(e.arch()), None)?;
    let cu = |x: cudarc::driver::DriverError| Error::Cuda { call: "read probe".into(), detail: x.to_string() };
    let module = e.context().load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(cu)?;
    let vectors = (n / 16) as u64;
    let start = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    let end = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    let mut best = 0.0f64;
    for name in ["attnforge_read_probe", "attnforge_read_probe4"] {
        let f = module.load_function(name).map_err(cu)?;
        for per_sm in [4u32, 8, 16] {
            let cfg = cudarc::driver::LaunchConfig { grid_dim: (per_sm * e.sm_count() as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
            let launch = |out: &mut cudarc::driver::CudaSlice<u32>| {
                use cudarc::driver::PushKernelArg;
                // SAFETY: either probe reads `vectors` 16-byte vectors of `src` (1 GiB) and writes
                // at most `out[0]`; both buffers are live and that large.
                unsafe { e.stream().launch_builder(&f).arg(&src).arg(&vectors).arg(out).launch(cfg) }.map(|_| ()).map_err(cu)
            };
            for _ in 0..3 {
                launch(&mut out)?;
            }
            let mut samples = Vec::new();
            for _ in 0..20 {
                start.record(e.stream()).map_err(cu)?;
                launch(&mut out)?;
                end.record(e.stream()).map_err(cu)?;
                end.synchronize().map_err(cu)?;
                let ms = f64::from(start.elapsed_ms(&end).map_err(cu)?);
                samples.push(n as f64 / (ms * 1e-3) / 1e9);
            }
            best = best.max(median(samples));
        }
    }
    Ok(best)
}

/// Tuning overrides for `bench_decode` (the defaults are what the engine plans).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeTuning {
    /// The kernel's tile instead of the configuration's default.
    pub tile: Option<crate::jit::DecodeTile>,
    /// CTAs a batch too small to fill the GPU is split over, instead of the SM count.
    pub split_ctas: Option<usize>,
    /// Balance every batch bigger than one wave over one wave of CTAs, skewed or not.
    pub balance: bool,
}

/// One decode benchmark shape.
#[derive(Debug, Clone)]
pub struct DecodeShape {
    /// The shipped variant.
    pub variant: &'static str,
    /// Its parameters.
    pub params: Vec<(&'static str, f64)>,
    /// Requests.
    pub batch: usize,
    /// KV tokens per request.
    pub kv_len: usize,
    /// A skewed batch: the first request has this many positions instead of `kv_len`.
    pub first_len: Option<usize>,
    /// Plan one item per CTA (no balancing), to show what balancing gives.
    pub unbalanced: bool,
    /// FlashInfer's graph and eager µs on the same card, where published.
    pub anchor_graph_us: Option<f64>,
    /// FlashInfer's eager µs on the anchor card, from ANCHORS.md.
    pub anchor_eager_us: Option<f64>,
    /// Query heads (32 unless said).
    pub qo_heads: usize,
    /// KV heads (8 unless said).
    pub kv_heads: usize,
    /// The graph µs a target (issue 17) asks for, where one does.
    pub target_us: Option<f64>,
}

/// The ANCHORS.md decode shapes: bf16, 32/8 heads, d128, page 16, NHD, permuted pages.
pub fn anchor_decode_shapes() -> Vec<DecodeShape> {
    let s = |batch, kv_len, g, e| DecodeShape { anchor_graph_us: Some(g), anchor_eager_us: Some(e), ..DecodeShape::plain(batch, kv_len) };
    vec![
        s(1, 1024, 9.3, 59.6),
        s(1, 16384, 33.3, 67.7),
        s(16, 4096, 102.8, 150.8),
        s(64, 4096, 383.7, 457.7),
        s(128, 2048, 375.4, 434.4),
        s(256, 4096, 1546.9, 1601.0),
        DecodeShape { variant: "gemma2", params: vec![("soft_cap", 30.0), ("window", 1024.0)], anchor_eager_us: Some(493.6), ..DecodeShape::plain(64, 4096) },
        // Skewed (no FlashInfer number): one 32K request among 127 of 1K. Without balancing, the
        // long request's CTAs would run alone long after the rest.
        DecodeShape { first_len: Some(32768), ..DecodeShape::plain(128, 1024) },
        DecodeShape { first_len: Some(32768), unbalanced: true, ..DecodeShape::plain(128, 1024) },
    ]
}

/// Issue 17's latency-bound decode shapes, with its graph-µs targets: few requests and long
/// caches, for 32/8 heads (8B-class) and 64/8 heads (70B-class), and a sliding window of 4096
/// over 131072 tokens. The 64/8 targets scale the 32/8 ones by the read time where reads
/// dominate (the issue gives the 32/8 table; its 64/8 table is asked for without numbers).
pub fn latency_decode_shapes() -> Vec<DecodeShape> {
    let mut v = Vec::new();
    for qo_heads in [32, 64] {
        let s = |batch, kv_len, target: f64| DecodeShape { qo_heads, target_us: Some(target), ..DecodeShape::plain(batch, kv_len) };
        v.extend([s(1, 1024, 6.0), s(1, 16384, 18.0), s(16, 4096, 59.0), s(1, 131072, 118.0), s(4, 32768, 118.0), s(64, 4096, 232.0), s(256, 4096, 925.0)]);
        v.push(DecodeShape { variant: "sliding_window", params: vec![("window", 4096.0)], qo_heads, ..DecodeShape::plain(1, 131072) });
    }
    v
}

impl DecodeShape {
    /// The default variant, 32/8 heads, `batch` requests of `kv_len` tokens, no anchors.
    pub fn plain(batch: usize, kv_len: usize) -> Self {
        DecodeShape {
            variant: "default",
            params: vec![],
            batch,
            kv_len,
            first_len: None,
            unbalanced: false,
            anchor_graph_us: None,
            anchor_eager_us: None,
            qo_heads: QO_HEADS,
            kv_heads: KV_HEADS,
            target_us: None,
        }
    }

    /// Each request's KV length.
    pub fn lens(&self) -> Vec<usize> {
        (0..self.batch).map(|b| if b == 0 { self.first_len.unwrap_or(self.kv_len) } else { self.kv_len }).collect()
    }

    /// "B128 L1024" or, skewed, "B128 L1024+32768" (with " 1/CTA" when not balanced), with
    /// " H64/8" when the heads are not 32/8.
    pub fn label(&self) -> String {
        let one = if self.unbalanced { " 1/CTA" } else { "" };
        let heads = if (self.qo_heads, self.kv_heads) == (QO_HEADS, KV_HEADS) { String::new() } else { format!(" H{}/{}", self.qo_heads, self.kv_heads) };
        match self.first_len {
            Some(f) => format!("B{} L{}+{f}{one}{heads}", self.batch, self.kv_len),
            None => format!("B{} L{}{one}{heads}", self.batch, self.kv_len),
        }
    }
}

/// What one shape measured.
#[derive(Debug, Clone)]
pub struct DecodeResult {
    /// The shape timed.
    pub shape: DecodeShape,
    /// µs per call inside a CUDA graph.
    pub graph_us: f64,
    /// µs per eager call (plan + upload + launch).
    pub eager_us: f64,
    /// Visible K and V bytes read once, plus q and o.
    pub bytes: f64,
    /// Work items of the default plan.
    pub work_items: usize,
    /// Split requests of the default plan.
    pub splits: usize,
    /// Copies of the cache rotated through (to defeat L2).
    pub copies: usize,
    /// The tile the graph's launches ran on ("mma 4w 3s").
    pub tile: String,
}

impl DecodeResult {
    /// GB/s of the bytes read and written, at the graph time.
    pub fn gbps(&self) -> f64 {
        self.bytes / (self.graph_us * 1e-6) / 1e9
    }
}

const QO_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const PAGE: usize = 16;
const GRAPH_CALLS: usize = 20;

/// A device buffer of `n` random (never zero) bf16 values, tiled from a 1M-element block so that
/// filling gigabytes stays fast.
fn random_device(e: &Engine, rng: &mut StdRng, n: usize) -> Result<cudarc::driver::CudaSlice<bf16>> {
    let block: Vec<bf16> = (0..(1usize << 20).min(n.max(1))).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))).collect();
    let mut buf = e.alloc::<bf16>(n)?;
    for start in (0..n).step_by(block.len()) {
        let m = block.len().min(n - start);
        let mut view = buf.slice_mut(start..start + m);
        e.stream().memcpy_htod(&block[..m], &mut view).map_err(|x| Error::Cuda { call: "copy to device".into(), detail: x.to_string() })?;
    }
    Ok(buf)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times one decode shape on `engine`.
pub fn bench_decode(e: &Engine, shape: &DecodeShape, tuning: DecodeTuning) -> Result<DecodeResult> {
    let (qo_heads, kv_heads) = (shape.qo_heads, shape.kv_heads);
    let v = shipped::resolve(shape.variant)?;
    let mut cfg = KernelConfig::decode(HEAD_DIM, HEAD_DIM, DType::Bf16, qo_heads / kv_heads)?;
    cfg.tile_override = tuning.tile;
    cfg.validate()?;
    let k = e.decode_kernel(&v, &cfg)?;
    let given: HashMap<String, ParamInput> = shape.params.iter().map(|(n, x)| (n.to_string(), ParamInput::Scalar(*x))).collect();
    let params = v.bind(&given, Dims { qo_heads, kv_heads, batch: shape.batch })?;
    let dp = e.upload_params(&k.layout, &params)?;

    let mut target = e.plan_target(&k);
    if let Some(n) = tuning.split_ctas {
        target.ctas = n;
    }
    target.always_balance = tuning.balance;
    if shape.unbalanced {
        target.resident = 0;
    }
    let plan = |batch: &ValidBatch<'_>, mode: PlanMode| crate::plan::plan_decode(&k.variant, &params, batch, target, mode);
    let lens = shape.lens();
    let pages_per_copy: usize = lens.iter().map(|l| l.div_ceil(PAGE)).sum();
    let kv_bytes_per_copy = (pages_per_copy * PAGE * kv_heads * HEAD_DIM * 2 * 2) as f64;
    let copies = ((128e6 / kv_bytes_per_copy).ceil() as usize).clamp(2, GRAPH_CALLS);
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: pages_per_copy * copies, page_size: PAGE, kv_heads, head_dim_qk: HEAD_DIM, head_dim_vo: HEAD_DIM };
    let mut rng = StdRng::seed_from_u64(1);
    let cache = random_device(e, &mut rng, kv.k_len())?;
    let q = random_device(e, &mut rng, shape.batch * qo_heads * HEAD_DIM)?;
    let mut o = e.alloc::<bf16>(shape.batch * qo_heads * HEAD_DIM)?;
    let mut lse = e.alloc::<f32>(shape.batch * qo_heads)?;
    let qo_indptr: Vec<i32> = (0..=shape.batch as i32).collect();

    // One page table per copy, each scattered over its own slice of the cache, uploaded (and
    // validated) once, as a serving engine's step would.
    struct Copy {
        table: DeviceTable,
        bufs: Option<PlanBuffers>,
    }
    let mut tables = Vec::with_capacity(copies);
    for c in 0..copies {
        let mut order: Vec<usize> = (c * pages_per_copy..(c + 1) * pages_per_copy).collect();
        order.shuffle(&mut rng);
        let pages = PageTable::from_lens(&lens, PAGE, &mut order.into_iter())?;
        let mut table = None;
        e.upload_table(&Batch { qo_indptr: &qo_indptr, pages: &pages, kv, qo_heads }.validated()?, &mut table)?;
        tables.push(Copy { table: table.ok_or(crate::error::PlanError::NotUploaded)?, bufs: None });
    }
    let default_plan = plan(&tables[0].table.batch(), PlanMode::Default)?;
    let fixed = PlanMode::FixedGrid { max_ctas: default_plan.work.len().max(1) };

    let launch = |c: &Copy, plan: &crate::plan::DecodePlan, o: &mut cudarc::driver::CudaSlice<bf16>, lse: &mut cudarc::driver::CudaSlice<f32>| {
        let dev = DeviceBatch { q: &q, kv: KvCache::Interleaved(&cache) };
        let bufs = c.bufs.as_ref().ok_or(crate::error::PlanError::NotUploaded)?;
        e.run_decode(&k, plan, bufs, &dp, &c.table, &dev, DeviceOutput { o, lse }, None)
    };

    // Graph: GRAPH_CALLS calls rotating over the copies, each with its own uploaded plan.
    let mut fixed_plans = Vec::new();
    for c in tables.iter_mut() {
        let plan = plan(&c.table.batch(), fixed)?;
        e.upload_plan(&plan, &mut c.bufs)?;
        fixed_plans.push(plan);
    }
    let mut i = 0;
    let graph_us = graph_median_us(e, GRAPH_CALLS, &mut || {
        let c = i % copies;
        i += 1;
        launch(&tables[c], &fixed_plans[c], &mut o, &mut lse)
    })?;

    // Eager: plan + upload + launch from the host for every call (default plans).
    for c in tables.iter_mut() {
        c.bufs = None;
    }
    let mut eager = Vec::new();
    for round in 0..6 {
        e.synchronize()?;
        let t0 = Instant::now();
        let n = 2 * GRAPH_CALLS;
        for i in 0..n {
            let c = &mut tables[i % copies];
            let plan = plan(&c.table.batch(), PlanMode::Default)?;
            e.upload_plan(&plan, &mut c.bufs)?;
            launch(c, &plan, &mut o, &mut lse)?;
        }
        e.synchronize()?;
        if round > 0 {
            eager.push(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
    }
    let visible: usize = (0..shape.batch)
        .map(|b| {
            let (lo, hi) = crate::plan::visible_span(&v, &params, b, 1, lens[b], 0);
            hi - lo
        })
        .sum();
    let bytes = (visible * kv_heads * HEAD_DIM * 2 * 2 + 2 * shape.batch * qo_heads * HEAD_DIM * 2) as f64;
    let tile = k.decode_tile_for(&fixed_plans[0]).label();
    Ok(DecodeResult { shape: shape.clone(), graph_us, eager_us: median(eager), bytes, work_items: default_plan.work.len(), splits: default_plan.merge.len(), copies, tile })
}

/// One prefill benchmark: attention of requests `(q_len, kv_len)` over a paged cache, causal
/// unless the variant says otherwise.
#[derive(Debug, Clone)]
pub struct PrefillShape {
    /// The workload's name.
    pub name: &'static str,
    /// The shipped variant: `causal`, `default` (no mask) or `soft_cap` (causal, cap 30).
    pub variant: &'static str,
    /// Head dim (QK and VO).
    pub head_dim: usize,
    /// `(q_len, kv_len)` per request.
    pub lens: Vec<(usize, usize)>,
    /// Query heads.
    pub qo_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// FlashInfer's TFLOP/s, or its µs for appends, from ANCHORS.md.
    pub anchor_tflops: Option<f64>,
    /// FlashInfer's µs, for appends.
    pub anchor_us: Option<f64>,
}

/// The ANCHORS.md prefill workloads, bf16, page 16: causal d128, plus the short append,
/// non-causal and soft-capped 16K, and d 64 / d 256 at 16K (issue 14's list; the same names as
/// `benches/flashinfer_prefill.py`, which times FlashInfer's fa3 on them).
pub fn anchor_prefill_shapes() -> Vec<PrefillShape> {
    let s = |name, lens, qo_heads, kv_heads, tf, us| PrefillShape { name, variant: "causal", head_dim: HEAD_DIM, lens, qo_heads, kv_heads, anchor_tflops: tf, anchor_us: us };
    let mut skewed = vec![(16384, 16384)];
    skewed.extend(vec![(512, 512); 32]);
    vec![
        s("single 4096, MHA 32", vec![(4096, 4096)], 32, 32, Some(429.0), None),
        s("single 16384, MHA 32", vec![(16384, 16384)], 32, 32, Some(625.0), None),
        s("batch 16 x 2048, 32/8", vec![(2048, 2048); 16], 32, 8, Some(439.0), None),
        s("skewed 16384 + 32 x 512, 32/8", skewed, 32, 8, Some(536.0), None),
        s("append q8 kv4096 B64, 32/8", vec![(8, 4096); 64], 32, 8, None, Some(1289.8)),
        PrefillShape { variant: "default", ..s("non-causal 16384, MHA 32", vec![(16384, 16384)], 32, 32, Some(637.0), None) },
        PrefillShape { variant: "soft_cap", ..s("soft cap 30, causal 16384", vec![(16384, 16384)], 32, 32, Some(530.0), None) },
        PrefillShape { head_dim: 64, ..s("single 16384 d64, 32/8", vec![(16384, 16384)], 32, 8, None, None) },
        PrefillShape { head_dim: 256, ..s("single 16384 d256, 32/8", vec![(16384, 16384)], 32, 8, None, None) },
    ]
}

/// What a prefill shape measured.
#[derive(Debug, Clone)]
pub struct PrefillResult {
    /// The workload timed.
    pub shape: PrefillShape,
    /// µs per launch (median).
    pub us: f64,
    /// FLOPs of the visible pairs: Σ 4 · q · kv_visible · heads · d (causal, q = kv: len² / 2).
    pub flops: f64,
    /// K and V bytes of the visible positions, read once.
    pub kv_bytes: f64,
    /// Work items of the plan.
    pub blocks: usize,
    /// The kernel that ran: its tile, registers per thread, spill bytes and CTAs per SM.
    pub tile: crate::jit::PrefillTile,
    /// Registers per thread of the tile that ran.
    pub regs: usize,
    /// Spilled bytes per thread.
    pub local_bytes: usize,
    /// Resident CTAs per SM.
    pub ctas_per_sm: usize,
}

impl PrefillResult {
    /// TFLOP/s on the causal triangle.
    pub fn tflops(&self) -> f64 {
        self.flops / (self.us * 1e-6) / 1e12
    }
}

/// Times one prefill shape with CUDA events (median of 7 timings of 3 launches).
pub fn bench_prefill(e: &Engine, shape: &PrefillShape, tile: Option<crate::jit::PrefillTile>) -> Result<PrefillResult> {
    let v = shipped::resolve(shape.variant)?;
    let group = shape.qo_heads / shape.kv_heads;
    let d = shape.head_dim;
    let mut cfg = KernelConfig::prefill(d, d, DType::Bf16, group)?;
    cfg.prefill_override = tile;
    cfg.validate()?;
    let k = e.prefill_kernel(&v, &cfg)?;
    let params = v.bind(&HashMap::new(), Dims { qo_heads: shape.qo_heads, kv_heads: shape.kv_heads, batch: shape.lens.len() })?;
    let dp = e.upload_params(&k.layout, &params)?;
    let kv_lens: Vec<usize> = shape.lens.iter().map(|l| l.1).collect();
    let pages_needed: usize = kv_lens.iter().map(|l| l.div_ceil(PAGE)).sum();
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: pages_needed, page_size: PAGE, kv_heads: shape.kv_heads, head_dim_qk: d, head_dim_vo: d };
    let mut rng = StdRng::seed_from_u64(2);
    let mut order: Vec<usize> = (0..pages_needed).collect();
    order.shuffle(&mut rng);
    let table = PageTable::from_lens(&kv_lens, PAGE, &mut order.into_iter())?;
    let mut qo_indptr = vec![0i32];
    for &(q, _) in &shape.lens {
        qo_indptr.push(qo_indptr.last().copied().unwrap_or(0) + q as i32);
    }
    let batch = Batch { qo_indptr: &qo_indptr, pages: &table, kv, qo_heads: shape.qo_heads }.validated()?;
    let cache = random_device(e, &mut rng, kv.k_len())?;
    let q = random_device(e, &mut rng, batch.q_elems())?;
    let mut o = e.alloc::<bf16>(batch.o_elems())?;
    let mut lse = e.alloc::<f32>(batch.total_q() * shape.qo_heads)?;
    let mut dev_table = None;
    e.upload_table(&batch, &mut dev_table)?;
    let dev_table = dev_table.ok_or(crate::error::PlanError::NotUploaded)?;
    let plan = e.plan_prefill(&k, &params, &batch, PlanMode::Default)?;
    let mut bufs = None;
    e.upload_plan(&plan, &mut bufs)?;
    let bufs = bufs.ok_or(crate::error::PlanError::NotUploaded)?;
    let dev = DeviceBatch { q: &q, kv: KvCache::Interleaved(&cache) };
    let us = event_median_us(e, 3, &mut || e.run_prefill(&k, &plan, &bufs, &dp, &dev_table, &dev, DeviceOutput { o: &mut o, lse: &mut lse }, None))?;
    // Causal: query i of a request sees kv_len - q_len + i + 1 keys; without a mask, all.
    let causal = shape.variant != "default";
    let visible: f64 = shape.lens.iter().map(|&(q, kv)| if causal { (0..q).map(|i| (kv - q + i + 1) as f64).sum::<f64>() } else { (q * kv) as f64 }).sum();
    let flops = 4.0 * visible * shape.qo_heads as f64 * d as f64;
    let kv_bytes = kv_lens.iter().sum::<usize>() as f64 * (shape.kv_heads * d * 2 * 2) as f64;
    let f = k.tile_for(&plan)?;
    Ok(PrefillResult {
        shape: shape.clone(),
        us,
        flops,
        kv_bytes,
        blocks: plan.work.len(),
        tile: f.cfg.prefill_tile(),
        regs: f.regs,
        local_bytes: f.local_bytes,
        ctas_per_sm: f.ctas_per_sm,
    })
}

/// Device µs per call of `run` (CUDA events): two warm-up calls, then the median of 7 samples
/// of `per_sample` back-to-back calls.
fn event_median_us(e: &Engine, per_sample: usize, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let cu = |x: cudarc::driver::DriverError| Error::Cuda { call: "bench".into(), detail: x.to_string() };
    let start = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    let end = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    run()?;
    run()?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        start.record(e.stream()).map_err(cu)?;
        for _ in 0..per_sample {
            run()?;
        }
        end.record(e.stream()).map_err(cu)?;
        end.synchronize().map_err(cu)?;
        samples.push(f64::from(start.elapsed_ms(&end).map_err(cu)?) * 1e3 / per_sample as f64);
    }
    Ok(median(samples))
}

/// Device µs per call of `run` captured `calls` times into one CUDA graph: three warm-up
/// replays, then the median of 7 samples of 5 replays.
fn graph_median_us(e: &Engine, calls: usize, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let cu = |x: cudarc::driver::DriverError| Error::Cuda { call: "bench".into(), detail: x.to_string() };
    e.synchronize()?;
    e.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cu)?;
    let mut captured = Ok(());
    for _ in 0..calls {
        captured = captured.and_then(|_| run());
    }
    let graph = e.stream().end_capture(CUgraphInstantiate_flags(0)).map_err(cu)?;
    captured?;
    let graph = graph.ok_or_else(|| Error::Cuda { call: "end capture".into(), detail: "an empty graph".into() })?;
    for _ in 0..3 {
        graph.launch().map_err(cu)?;
    }
    let start = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    let end = e.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cu)?;
    let mut samples = Vec::new();
    for _ in 0..7 {
        start.record(e.stream()).map_err(cu)?;
        for _ in 0..5 {
            graph.launch().map_err(cu)?;
        }
        end.record(e.stream()).map_err(cu)?;
        end.synchronize().map_err(cu)?;
        samples.push(f64::from(start.elapsed_ms(&end).map_err(cu)?) * 1e3 / (5 * calls) as f64);
    }
    Ok(median(samples))
}

/// A cascade benchmark: decode requests that share one prompt (`prefix` tokens, the same pages)
/// and then have `suffix[b]` tokens of their own.
#[derive(Debug, Clone)]
pub struct CascadeShape {
    /// A label for the table.
    pub name: String,
    /// Tokens of the shared prompt.
    pub prefix: usize,
    /// Each request's own tokens after it.
    pub suffix: Vec<usize>,
}

/// The shapes of issue 15: the ANCHORS.md case (128 requests sharing 32768 tokens, 256 of their
/// own) and parallel generation (one prompt of 4096 tokens, n = 4, 8, 16, 32 samples of 0–512
/// generated tokens, seeded).
pub fn cascade_shapes() -> Vec<CascadeShape> {
    let mut v = vec![CascadeShape { name: "B128 prefix 32768 + 256".into(), prefix: 32768, suffix: vec![256; 128] }];
    let mut rng = StdRng::seed_from_u64(15);
    for n in [4usize, 8, 16, 32] {
        v.push(CascadeShape { name: format!("n{n} prompt 4096 + 0..512"), prefix: 4096, suffix: (0..n).map(|_| rng.random_range(0..=512)).collect() });
    }
    v
}

/// Device time of one decode step of a [`CascadeShape`], plain (the decode kernel) and through
/// the detected cascade (the prefill kernel's group items and one merge), causal, bf16, 32/8
/// heads, d 128, page 16; median of 7 runs of 10 back-to-back launches.
#[derive(Debug, Clone)]
pub struct CascadeResult {
    /// The shape.
    pub shape: CascadeShape,
    /// Plain decode, µs.
    pub plain_us: f64,
    /// Through the cascade on the prefill kernel alone (suffixes as one-token tiles), µs.
    pub cascade_us: f64,
    /// Through the decode cascade: shared levels on the prefill kernel, suffixes on the decode
    /// kernel, one merge ([`Engine::plan_decode_cascade`]), µs.
    pub decode_cascade_us: f64,
    /// Host time of the decode cascade's plan (detection not included), µs.
    pub decode_plan_us: f64,
    /// Plain decode in fixed-grid mode, as CUDA-graph replays, µs.
    pub graph_plain_us: f64,
    /// The decode cascade in fixed-grid mode (its prefix on one fixed wave of prefill CTAs), as
    /// CUDA-graph replays, µs.
    pub graph_decode_cascade_us: f64,
    /// Levels of the cascade.
    pub levels: usize,
    /// Group items of the cascade plan.
    pub items: usize,
    /// Host time of detection plus the cascade plan, µs.
    pub plan_us: f64,
}

/// Runs one [`CascadeShape`].
pub fn bench_cascade(e: &Engine, shape: &CascadeShape) -> Result<CascadeResult> {
    let v = shipped::resolve("causal")?;
    let group = QO_HEADS / KV_HEADS;
    let dk = e.decode_kernel(&v, &KernelConfig::decode(HEAD_DIM, HEAD_DIM, DType::Bf16, group)?)?;
    let pk = e.prefill_kernel(&v, &KernelConfig::prefill(HEAD_DIM, HEAD_DIM, DType::Bf16, group)?)?;
    let n = shape.suffix.len();
    let params = v.bind(&HashMap::new(), Dims { qo_heads: QO_HEADS, kv_heads: KV_HEADS, batch: n })?;
    let shared = shape.prefix / PAGE;
    let mut rng = StdRng::seed_from_u64(3);
    let mut next = shared as i32;
    let (mut indptr, mut indices, mut last) = (vec![0i32], Vec::new(), Vec::new());
    for &s in &shape.suffix {
        let len = shared * PAGE + s;
        let own = len.div_ceil(PAGE) - shared;
        indices.extend(0..shared as i32);
        let mut mine: Vec<i32> = (next..next + own as i32).collect();
        mine.shuffle(&mut rng);
        indices.extend(mine);
        next += own as i32;
        indptr.push(indices.len() as i32);
        last.push((len - (len.div_ceil(PAGE) - 1) * PAGE) as i32);
    }
    let pages = PageTable { indptr, indices, last_page_len: last };
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: next.max(1) as usize, page_size: PAGE, kv_heads: KV_HEADS, head_dim_qk: HEAD_DIM, head_dim_vo: HEAD_DIM };
    let qo_indptr: Vec<i32> = (0..=n as i32).collect();
    let batch = Batch { qo_indptr: &qo_indptr, pages: &pages, kv, qo_heads: QO_HEADS }.validated()?;
    let cache = random_device(e, &mut rng, kv.k_len())?;
    let q = random_device(e, &mut rng, n * QO_HEADS * HEAD_DIM)?;
    let mut o = e.alloc::<bf16>(n * QO_HEADS * HEAD_DIM)?;
    let mut lse = e.alloc::<f32>(n * QO_HEADS)?;
    let mut table = None;
    e.upload_table(&batch, &mut table)?;
    let table = table.ok_or(crate::error::PlanError::NotUploaded)?;
    let dev = DeviceBatch { q: &q, kv: KvCache::Interleaved(&cache) };
    let dpd = e.upload_params(&dk.layout, &params)?;
    let dpp = e.upload_params(&pk.layout, &params)?;
    let time = |run: &mut dyn FnMut() -> Result<()>| event_median_us(e, 10, run);
    let plain = e.plan_decode(&dk, &params, &batch, PlanMode::Default)?;
    let mut pbufs = None;
    e.upload_plan(&plain, &mut pbufs)?;
    let pbufs = pbufs.ok_or(crate::error::PlanError::NotUploaded)?;
    let plain_us = time(&mut || e.run_decode(&dk, &plain, &pbufs, &dpd, &table, &dev, DeviceOutput { o: &mut o, lse: &mut lse }, None))?;
    let t0 = Instant::now();
    let policy = crate::cascade::Policy::default();
    let (c, plan) = match crate::cascade::detect(&batch, &policy) {
        Some(c) => {
            let p = e.plan_cascade(&pk, &params, &batch, &c, PlanMode::Default)?;
            (c, p)
        }
        None => return Err(Error::UnsupportedConfig(format!("{}: the default policy found no cascade that pays", shape.name))),
    };
    let plan_us = t0.elapsed().as_secs_f64() * 1e6;
    let mut cbufs = None;
    e.upload_plan(&plan, &mut cbufs)?;
    let cbufs = cbufs.ok_or(crate::error::PlanError::NotUploaded)?;
    let mut o2 = e.alloc::<bf16>(n * QO_HEADS * HEAD_DIM)?;
    let mut lse2 = e.alloc::<f32>(n * QO_HEADS)?;
    let cascade_us = time(&mut || e.run_prefill(&pk, &plan, &cbufs, &dpp, &table, &dev, DeviceOutput { o: &mut o2, lse: &mut lse2 }, None))?;
    let t1 = Instant::now();
    let dplan = e.plan_decode_cascade(&dk, &pk, &params, &batch, &c, PlanMode::Default)?;
    let decode_plan_us = t1.elapsed().as_secs_f64() * 1e6;
    let mut dbufs = None;
    e.upload_plan(&dplan, &mut dbufs)?;
    let dbufs = dbufs.ok_or(crate::error::PlanError::NotUploaded)?;
    let mut o3 = e.alloc::<bf16>(n * QO_HEADS * HEAD_DIM)?;
    let mut lse3 = e.alloc::<f32>(n * QO_HEADS)?;
    let decode_cascade_us = time(&mut || e.run_decode_cascade(&dk, &pk, &dplan, &dbufs, &dpd, &table, &dev, DeviceOutput { o: &mut o3, lse: &mut lse3 }, None))?;
    // CUDA graphs of fixed-grid plans, at a graph wrapper's capacity for this batch.
    let fixed = PlanMode::FixedGrid { max_ctas: crate::plan::decode_fixed_grid_bound(&v, e.plan_target(&dk), KV_HEADS, n) };
    let gplain = e.plan_decode(&dk, &params, &batch, fixed)?;
    let mut gpbufs = None;
    e.upload_plan(&gplain, &mut gpbufs)?;
    let gpbufs = gpbufs.ok_or(crate::error::PlanError::NotUploaded)?;
    let graph_plain_us = graph_median_us(e, 10, &mut || e.run_decode(&dk, &gplain, &gpbufs, &dpd, &table, &dev, DeviceOutput { o: &mut o, lse: &mut lse }, None))?;
    let gplan = e.plan_decode_cascade(&dk, &pk, &params, &batch, &c, fixed)?;
    let mut gbufs = None;
    e.upload_plan(&gplan, &mut gbufs)?;
    let gbufs = gbufs.ok_or(crate::error::PlanError::NotUploaded)?;
    let mut o4 = e.alloc::<bf16>(n * QO_HEADS * HEAD_DIM)?;
    let mut lse4 = e.alloc::<f32>(n * QO_HEADS)?;
    let graph_decode_cascade_us = graph_median_us(e, 10, &mut || e.run_decode_cascade(&dk, &pk, &gplan, &gbufs, &dpd, &table, &dev, DeviceOutput { o: &mut o4, lse: &mut lse4 }, None))?;
    // The paths must agree (floating-point reassociation only).
    let a = e.download(&o)?;
    for (what, other) in [("cascade", &o2), ("decode cascade", &o3), ("graph decode cascade", &o4)] {
        let b = e.download(other)?;
        let worst = a.iter().zip(&b).map(|(x, y)| (x.to_f32() - y.to_f32()).abs()).fold(0.0f32, f32::max);
        if worst.is_nan() || worst >= 2e-2 {
            return Err(Error::UnsupportedConfig(format!("{}: the {what}'s output differs from plain decode by {worst}", shape.name)));
        }
    }
    Ok(CascadeResult { shape: shape.clone(), plain_us, cascade_us, decode_cascade_us, decode_plan_us, graph_plain_us, graph_decode_cascade_us, levels: c.levels.len(), items: plan.work.len(), plan_us })
}
