//! Probes of the Hopper primitives the sm90 prefill main loop is built from (issue 14,
//! `templates/common/wgmma.cuh`), each checked on the device against the CPU before a kernel
//! relies on it. Not a pipeline path: nothing here is chosen by the engine.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::jit::KernelSource;
use crate::kv::DType;

/// A CUDA error of probe `what`.
fn cu(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error + Copy {
    move |x| Error::Cuda { call: what.into(), detail: x.to_string() }
}

/// The probes' instructions exist on sm_90a only.
fn require_sm90(e: &Engine, what: &str) -> Result<()> {
    if e.arch().name() != "sm_90a" {
        return Err(Error::UnsupportedConfig(format!("the {what} needs sm_90a, this GPU is {}", e.arch().name())));
    }
    Ok(())
}

/// The entry-name suffix of a probe's operand type (f16 or bf16).
fn operand_type(what: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::Bf16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => Err(Error::UnsupportedConfig(format!("the {what} takes f16 or bf16, not {}", other.name()))),
    }
}

/// Compiles `src` for `e`'s arch and loads it.
fn load(e: &Engine, what: &'static str, src: &KernelSource) -> Result<std::sync::Arc<cudarc::driver::CudaModule>> {
    let nvrtc = e.jit().nvrtc();
    let cubin = nvrtc.compile(src, &nvrtc.options(e.arch()), None)?;
    e.context().load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(cu(what))
}

/// The header under test.
pub const WGMMA_CUH: &str = include_str!("../../templates/common/wgmma.cuh");

/// One-warpgroup kernels per operand type. `attnforge_wgmma_probe_bf16` / `…_f16`: copies
/// A and B (64 × 64 each, row-major, K contiguous) into 128-byte-swizzled shared tiles, runs
/// four `m64n64k16` steps (K = 64) from shared-memory descriptors, and writes C = A · Bᵀ
/// (64 × 64 f32, row-major) from the accumulator fragment. `attnforge_wgmma_pv_probe_bf16` /
/// `…_f16`: C = A · V with A in registers and V MN-major in shared memory (the P · V form).
/// Compiles for sm_90a only.
pub fn wgmma_probe_source() -> KernelSource {
    let kernel = r#"
// C (64 × N) = A (64 × 64) · Bᵀ, B N × 64 (N 64 or 128: the m64n64 and m64n128 forms, the
// latter a 128-key S).
template <bool IS_BF16, int N>
__device__ __forceinline__ void af_wgmma_probe(const uint4* __restrict__ a, const uint4* __restrict__ b, float* __restrict__ c) {
  __shared__ __align__(1024) unsigned char sa[64 * 128];
  __shared__ __align__(1024) unsigned char sb[N * 128];
  for (unsigned i = threadIdx.x; i < N * 8; i += 128) {
    if (i < 64 * 8) *reinterpret_cast<uint4*>(sa + af_sw128_offset(i / 8, i % 8)) = a[i];
    *reinterpret_cast<uint4*>(sb + af_sw128_offset(i / 8, i % 8)) = b[i];
  }
  af_fence_proxy_async();
  __syncthreads();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  af_wgmma_fence();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (N == 64) af_wgmma_m64n64k16_ss<IS_BF16>(d, af_desc_sw128(sa + 32 * k), af_desc_sw128(sb + 32 * k), k > 0);
    else af_wgmma_m64n128k16_ss<IS_BF16>(d, af_desc_sw128(sa + 32 * k), af_desc_sw128(sb + 32 * k), k > 0);
  }
  af_wgmma_commit();
  af_wgmma_wait<0>();
  af_wgmma_store_f32<N>(d, c, N);
}
extern "C" __global__ void __launch_bounds__(128) attnforge_wgmma_probe_n128_bf16(const uint4* a, const uint4* b, float* c) { af_wgmma_probe<true, 128>(a, b, c); }
extern "C" __global__ void __launch_bounds__(128) attnforge_wgmma_probe_n128_f16(const uint4* a, const uint4* b, float* c) { af_wgmma_probe<false, 128>(a, b, c); }
// C = A · V: A (64 × 64, row-major) from registers in the A fragment, V (64 keys × 64,
// row-major: N contiguous) in an MN-major swizzled tile, its descriptor's offsets `lbo`, `sbo`.
template <bool IS_BF16>
__device__ __forceinline__ void af_wgmma_pv_probe(const unsigned* __restrict__ a, const uint4* __restrict__ v, float* __restrict__ c, unsigned lbo, unsigned sbo) {
  __shared__ __align__(1024) unsigned char sv[64 * 128];
  for (unsigned i = threadIdx.x; i < 64 * 8; i += 128) *reinterpret_cast<uint4*>(sv + af_sw128_offset(i / 8, i % 8)) = v[i];
  af_fence_proxy_async();
  __syncthreads();
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned r0 = 16 * warp + lane / 4;
  unsigned frag[4][4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const unsigned k = (16 * s + 2 * (lane % 4)) / 2;
    frag[s][0] = a[r0 * 32 + k];
    frag[s][1] = a[(r0 + 8) * 32 + k];
    frag[s][2] = a[r0 * 32 + k + 4];
    frag[s][3] = a[(r0 + 8) * 32 + k + 4];
  }
  float d[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  af_wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) af_wgmma_m64n64k16_rs<IS_BF16>(d, frag[s], af_desc_sw128_mn(sv + 2048 * s, lbo, sbo), s > 0);
  af_wgmma_commit();
  af_wgmma_wait<0>();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const unsigned col = 8 * j + 2 * (lane % 4);
    c[r0 * 64 + col] = d[4 * j];
    c[r0 * 64 + col + 1] = d[4 * j + 1];
    c[(r0 + 8) * 64 + col] = d[4 * j + 2];
    c[(r0 + 8) * 64 + col + 1] = d[4 * j + 3];
  }
}
extern "C" __global__ void __launch_bounds__(128) attnforge_wgmma_pv_probe_bf16(const unsigned* a, const uint4* v, float* c, unsigned lbo, unsigned sbo) { af_wgmma_pv_probe<true>(a, v, c, lbo, sbo); }
extern "C" __global__ void __launch_bounds__(128) attnforge_wgmma_pv_probe_f16(const unsigned* a, const uint4* v, float* c, unsigned lbo, unsigned sbo) { af_wgmma_pv_probe<false>(a, v, c, lbo, sbo); }
extern "C" __global__ void __launch_bounds__(128) attnforge_wgmma_probe_bf16(const uint4* a, const uint4* b, float* c) { af_wgmma_probe<true, 64>(a, b, c); }
extern "C" __global__ void __launch_bounds__(128) attnforge_wgmma_probe_f16(const uint4* a, const uint4* b, float* c) { af_wgmma_probe<false, 64>(a, b, c); }
"#;
    KernelSource { name: "wgmma_probe".into(), code: format!("{WGMMA_CUH}\n{kernel}"), hook_lines: Vec::new() }
}

/// One 64-query × 64-key attention tile, head dim 64 or 128, on one warpgroup
/// (`attnforge_attn_tile_probe_{bf16,f16}_d{64,128}`; d 128 takes Q and K in two swizzled
/// panels and P · V as m64n128): S = Q · Kᵀ from swizzled shared tiles, the
/// row softmax on the accumulator fragment (scale `scale`; quad shuffles for the row max and
/// sum), P packed from the S accumulators straight into the A fragments of P · V (no shared
/// memory), O = P · V / sum, and the row's natural-log LSE. The composition the sm90 main
/// loop's inner step is made of.
pub fn attention_tile_probe_source() -> KernelSource {
    let kernel = r#"
__device__ __forceinline__ unsigned af_pack2(float lo, float hi, bool bf16) {
  unsigned r;
  if (bf16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// D 64 or 128: Q, K and V 64 × D row-major; each operand in D / 64 swizzled panels of 64
// columns (8 KB each: 64 rows × 128 bytes).
template <bool IS_BF16, int D>
__device__ __forceinline__ void af_attn_tile_probe(const uint4* __restrict__ q, const uint4* __restrict__ k, const uint4* __restrict__ v, float* __restrict__ o, float* __restrict__ lse, float scale) {
  enum : unsigned { PANELS = D / 64, PANEL = 64 * 128, CHUNKS = D / 8 };
  __shared__ __align__(1024) unsigned char sq[PANELS * PANEL];
  __shared__ __align__(1024) unsigned char sk[PANELS * PANEL];
  __shared__ __align__(1024) unsigned char sv[PANELS * PANEL];
  for (unsigned i = threadIdx.x; i < 64 * CHUNKS; i += 128) {
    const unsigned row = i / CHUNKS, c = i % CHUNKS;
    const unsigned off = (c / 8) * PANEL + af_sw128_offset(row, c % 8);
    *reinterpret_cast<uint4*>(sq + off) = q[i];
    *reinterpret_cast<uint4*>(sk + off) = k[i];
    *reinterpret_cast<uint4*>(sv + off) = v[i];
  }
  af_fence_proxy_async();
  __syncthreads();
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  af_wgmma_fence();
#pragma unroll
  for (int t = 0; t < D / 16; ++t) {
    const unsigned at = (t / 4) * PANEL + 32 * (t % 4);
    af_wgmma_m64n64k16_ss<IS_BF16>(s, af_desc_sw128(sq + at), af_desc_sw128(sk + at), t > 0);
  }
  af_wgmma_commit();
  af_wgmma_wait<0>();
  // Rows r0 (s[4j], s[4j + 1]) and r0 + 8 (s[4j + 2], s[4j + 3]); a row's 64 columns are spread
  // over the four lanes of a quad.
  const float l2e = scale * 1.4426950408889634f;
  float m[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)}, sum[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    m[0] = fmaxf(m[0], fmaxf(s[4 * j], s[4 * j + 1]));
    m[1] = fmaxf(m[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
    m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 2));
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[4 * j + e] = exp2f(s[4 * j + e] * l2e - m[e / 2] * l2e);
      sum[e / 2] += s[4 * j + e];
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
    sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
  }
  // P's A fragment for keys 16t..16t+15: blocks j = 2t (k 0..7) and 2t + 1 (k 8..15).
  unsigned p[4][4];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    p[t][0] = af_pack2(s[8 * t], s[8 * t + 1], IS_BF16);
    p[t][1] = af_pack2(s[8 * t + 2], s[8 * t + 3], IS_BF16);
    p[t][2] = af_pack2(s[8 * t + 4], s[8 * t + 5], IS_BF16);
    p[t][3] = af_pack2(s[8 * t + 6], s[8 * t + 7], IS_BF16);
  }
  // V's 16-key step t starts 2 KB into every panel; the panels (N) are PANEL bytes apart.
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  af_wgmma_fence();
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const unsigned long long dv = af_desc_sw128_mn(sv + 2048 * t, PANEL, 1024);
    if constexpr (D == 64) af_wgmma_m64n64k16_rs<IS_BF16>(acc, p[t], dv, t > 0);
    else af_wgmma_m64n128k16_rs<IS_BF16>(acc, p[t], dv, t > 0);
  }
  af_wgmma_commit();
  af_wgmma_wait<0>();
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = 16 * warp + lane / 4;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const unsigned col = 8 * j + 2 * (lane % 4);
    o[r0 * D + col] = acc[4 * j] / sum[0];
    o[r0 * D + col + 1] = acc[4 * j + 1] / sum[0];
    o[(r0 + 8) * D + col] = acc[4 * j + 2] / sum[1];
    o[(r0 + 8) * D + col + 1] = acc[4 * j + 3] / sum[1];
  }
  if (lane % 4 == 0) {
    lse[r0] = m[0] * scale + logf(sum[0]);
    lse[r0 + 8] = m[1] * scale + logf(sum[1]);
  }
}
#define AF_TILE_ENTRY(name, bf, d) \
  extern "C" __global__ void __launch_bounds__(128) name(const uint4* q, const uint4* k, const uint4* v, float* o, float* lse, float scale) { af_attn_tile_probe<bf, d>(q, k, v, o, lse, scale); }
AF_TILE_ENTRY(attnforge_attn_tile_probe_bf16_d64, true, 64)
AF_TILE_ENTRY(attnforge_attn_tile_probe_f16_d64, false, 64)
AF_TILE_ENTRY(attnforge_attn_tile_probe_bf16_d128, true, 128)
AF_TILE_ENTRY(attnforge_attn_tile_probe_f16_d128, false, 128)
"#;
    KernelSource { name: "attn_tile_probe".into(), code: format!("{WGMMA_CUH}\n{kernel}"), hook_lines: Vec::new() }
}

/// Runs [`attention_tile_probe_source`] on `e` (sm_90a): `q`, `k`, `v` 64 × 64 row-major raw
/// 16-bit patterns of `dtype`, 64 × `head_dim` (64 or 128) each (64 keys); returns (O
/// 64 × head_dim f32 row-major, LSE per query row).
pub fn run_attention_tile_probe(e: &Engine, dtype: DType, head_dim: usize, q: &[u16], k: &[u16], v: &[u16], scale: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    const WHAT: &str = "attention tile probe";
    require_sm90(e, WHAT)?;
    let ty = operand_type(WHAT, dtype)?;
    if head_dim != 64 && head_dim != 128 {
        return Err(Error::UnsupportedConfig(format!("the attention tile probe has head dims 64 and 128, not {head_dim}")));
    }
    if [q.len(), k.len(), v.len()].iter().any(|&n| n != 64 * head_dim) {
        return Err(Error::UnsupportedConfig(format!("the attention tile probe takes three 64 x {head_dim} matrices")));
    }
    let cu = cu(WHAT);
    let module = load(e, WHAT, &attention_tile_probe_source())?;
    let f = module.load_function(&format!("attnforge_attn_tile_probe_{ty}_d{head_dim}")).map_err(cu)?;
    let (dq, dk, dv) = (e.stream().clone_htod(q).map_err(cu)?, e.stream().clone_htod(k).map_err(cu)?, e.stream().clone_htod(v).map_err(cu)?);
    let mut o = e.alloc::<f32>(64 * head_dim)?;
    let mut lse = e.alloc::<f32>(64)?;
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    {
        use cudarc::driver::PushKernelArg;
        // SAFETY: the kernel reads 64 × head_dim 16-bit elements of `dq`, `dk`, `dv` (16-byte
        // vectors; 256-byte aligned allocations) and writes 64 × head_dim f32 of `o` and 64 of
        // `lse`; all live and that large until the stream is synchronised below.
        unsafe { e.stream().launch_builder(&f).arg(&dq).arg(&dk).arg(&dv).arg(&mut o).arg(&mut lse).arg(&scale).launch(cfg) }.map_err(cu)?;
    }
    Ok((e.stream().clone_dtoh(&o).map_err(cu)?, e.stream().clone_dtoh(&lse).map_err(cu)?))
}

/// The pipeline header under test.
pub const PIPELINE_CUH: &str = include_str!("../../templates/common/pipeline.cuh");

/// Bytes of one stage of [`pipeline_probe_source`]'s ring.
pub const PIPE_CHUNK: usize = 4096;

/// A warp-specialised ring (`attnforge_pipe_probe`, 384 threads): warpgroup 0 gives registers
/// back (`setmaxnreg.dec` 40) and one of its threads streams `chunks` chunks of
/// [`PIPE_CHUNK`] bytes from `src` into a 4-stage shared ring with bulk copies on `full`
/// barriers; warpgroups 1 and 2 take registers (`setmaxnreg.inc` 232), take alternate chunks,
/// wait on their stage's `full` barrier, copy it to `dst` and release it on `empty`. `dst ==
/// src` only if every phase, parity and byte count is right; a wait that never completes traps
/// (a launch error) instead of hanging.
pub fn pipeline_probe_source() -> KernelSource {
    let kernel = r#"
extern "C" __global__ void __launch_bounds__(384, 1) attnforge_pipe_probe(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned chunks) {
  enum : unsigned { STAGES = 4, CHUNK = 4096, VECS = CHUNK / 16 };
  __shared__ __align__(128) uint4 ring[STAGES][VECS];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
  af_ring_init(full, empty, 1, 128);
  __syncthreads();
  const unsigned wg = threadIdx.x / 128, t = threadIdx.x % 128;
  if (wg == 0) {
    af_setmaxnreg_dec<40>();
    if (t == 0) {
      for (unsigned c = 0; c < chunks; ++c) {
        const unsigned s = c % STAGES, round = c / STAGES;
        if (round > 0) af_mbar_wait(&empty[s], (round - 1) & 1);
        af_mbar_arrive_expect_tx(&full[s], CHUNK);
        af_bulk_copy_g2s(ring[s], src + (size_t)c * VECS, CHUNK, &full[s]);
      }
    }
  } else {
    af_setmaxnreg_inc<232>();
    for (unsigned c = wg - 1; c < chunks; c += 2) {
      const unsigned s = c % STAGES, round = c / STAGES;
      af_mbar_wait(&full[s], round & 1);
      for (unsigned v = t; v < VECS; v += 128) dst[(size_t)c * VECS + v] = ring[s][v];
      af_mbar_arrive(&empty[s]);
    }
  }
}
"#;
    KernelSource { name: "pipe_probe".into(), code: format!("#define AF_MBAR_SPIN_LIMIT (1ull << 24)\n{PIPELINE_CUH}\n{kernel}"), hook_lines: Vec::new() }
}

/// Runs [`pipeline_probe_source`] on `e` (sm_90a) over `src` (a whole number of
/// [`PIPE_CHUNK`]s) and returns what the consumers wrote.
pub fn run_pipeline_probe(e: &Engine, src: &[u8]) -> Result<Vec<u8>> {
    const WHAT: &str = "pipeline probe";
    require_sm90(e, WHAT)?;
    if src.is_empty() || src.len() % PIPE_CHUNK != 0 || src.len() / PIPE_CHUNK > u32::MAX as usize {
        return Err(Error::UnsupportedConfig(format!("the pipeline probe streams whole {PIPE_CHUNK}-byte chunks, got {} bytes", src.len())));
    }
    let cu = cu(WHAT);
    let module = load(e, WHAT, &pipeline_probe_source())?;
    let f = module.load_function("attnforge_pipe_probe").map_err(cu)?;
    let d_src = e.stream().clone_htod(src).map_err(cu)?;
    let mut d_dst = e.alloc::<u8>(src.len())?;
    let chunks = (src.len() / PIPE_CHUNK) as u32;
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (384, 1, 1), shared_mem_bytes: 0 };
    {
        use cudarc::driver::PushKernelArg;
        // SAFETY: the kernel reads and writes `chunks` × PIPE_CHUNK bytes of `d_src` / `d_dst`
        // (16-byte vectors; cudarc's allocations are 256-byte aligned), both that large and
        // live until the stream is synchronised below.
        unsafe { e.stream().launch_builder(&f).arg(&d_src).arg(&mut d_dst).arg(&chunks).launch(cfg) }.map_err(cu)?;
    }
    e.stream().clone_dtoh(&d_dst).map_err(cu)
}

/// Which product a probe computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// C = A · Bᵀ, both operands K-major in shared memory (S = Q · Kᵀ).
    QkT,
    /// C = A · Bᵀ with B 128 × 64 (C 64 × 128): the m64n128 form.
    QkT128,
    /// C = A · V, A from registers and V MN-major in shared memory with the descriptor offsets
    /// (`lbo`, `sbo`, bytes) given (O = P · V).
    Pv {
        /// Bytes between 64-element N panels.
        lbo: u32,
        /// Bytes between 8-row K groups.
        sbo: u32,
    },
}

/// Runs a probe on `e` (an sm_90a GPU): `a` (64 × 64) and `b` (64 × 64; 128 × 64 for
/// [`Probe::QkT128`]) are row-major matrices as the raw 16-bit patterns of `dtype` (f16 or
/// bf16); returns C (f32, row-major): A · Bᵀ for the Q · Kᵀ forms, A · B for [`Probe::Pv`].
pub fn run_wgmma_probe(e: &Engine, probe: Probe, dtype: DType, a: &[u16], b: &[u16]) -> Result<Vec<f32>> {
    const WHAT: &str = "wgmma probe";
    require_sm90(e, WHAT)?;
    let ty = operand_type(WHAT, dtype)?;
    let b_rows = if probe == Probe::QkT128 { 128 } else { 64 };
    if a.len() != 64 * 64 || b.len() != b_rows * 64 {
        return Err(Error::UnsupportedConfig(format!("the wgmma probe takes a 64 x 64 and a {b_rows} x 64 matrix, got {} and {} elements", a.len(), b.len())));
    }
    let cu = cu(WHAT);
    let module = load(e, WHAT, &wgmma_probe_source())?;
    let entry = match probe {
        Probe::QkT => format!("attnforge_wgmma_probe_{ty}"),
        Probe::QkT128 => format!("attnforge_wgmma_probe_n128_{ty}"),
        Probe::Pv { .. } => format!("attnforge_wgmma_pv_probe_{ty}"),
    };
    let f = module.load_function(&entry).map_err(cu)?;
    let da = e.stream().clone_htod(a).map_err(cu)?;
    let db = e.stream().clone_htod(b).map_err(cu)?;
    let mut dc = e.alloc::<f32>(64 * b_rows)?;
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    {
        use cudarc::driver::PushKernelArg;
        let mut launch = e.stream().launch_builder(&f);
        launch.arg(&da).arg(&db).arg(&mut dc);
        let offsets = match probe {
            Probe::Pv { lbo, sbo } => Some((lbo, sbo)),
            Probe::QkT | Probe::QkT128 => None,
        };
        if let Some((lbo, sbo)) = &offsets {
            launch.arg(lbo).arg(sbo);
        }
        // SAFETY: either kernel reads 64 × 64 16-bit elements of each of `da` and `db` (as
        // 16-byte vectors or 32-bit pairs; cudarc's allocations are 256-byte aligned) and
        // writes 64 × 64 f32 of `dc`; all three are that large and live until the stream is
        // synchronised below; the P · V kernel takes the two offsets, the other nothing more.
        unsafe { launch.launch(cfg) }.map_err(cu)?;
    }
    e.stream().clone_dtoh(&dc).map_err(cu)
}

/// Keys per tile of [`gather_probe_source`]'s ring.
pub const GATHER_TILE: usize = 64;

/// The producer side of the sm90 main loop over a paged cache (`attnforge_gather_probe_{bf16,f16}`,
/// 384 threads): warpgroup 0 (`setmaxnreg.dec` 40) gathers the K rows (head dim 64) of 64-key
/// tiles from pages of any size, through a page table, with 16-byte `cp.async` copies into a
/// 2-stage ring of 128-byte-swizzled tiles (keys past `kv_len` zero-filled), each thread
/// announcing its copies on the stage's `full` barrier (`cp.async.mbarrier.arrive.noinc`);
/// warpgroups 1 and 2 take alternate tiles, wait, fence the async proxy and compute S = Q · Kᵀ
/// (Q 64 × 64, staged once) on the warpgroup MMA, write it (64 × 64 f32 per tile) and release
/// the stage on `empty`. A wait that never completes traps.
pub fn gather_probe_source() -> KernelSource {
    let kernel = r#"
template <bool IS_BF16>
__device__ __forceinline__ void af_gather_probe(const uint4* __restrict__ q, const unsigned short* __restrict__ k_cache, const int* __restrict__ pages, int page_size, int kv_len, float* __restrict__ s_out) {
  enum : unsigned { STAGES = 2, TILE = 64, PANEL = TILE * 128 };
  __shared__ __align__(1024) unsigned char sq[PANEL];
  __shared__ __align__(1024) unsigned char ring[STAGES][PANEL];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
  const int tiles = (kv_len + TILE - 1) / TILE;
  for (unsigned i = threadIdx.x; i < 64 * 8; i += blockDim.x) *reinterpret_cast<uint4*>(sq + af_sw128_offset(i / 8, i % 8)) = q[i];
  af_ring_init(full, empty, 128, 128);
  af_fence_proxy_async();
  __syncthreads();
  const unsigned wg = threadIdx.x / 128, t = threadIdx.x % 128;
  if (wg == 0) {
    af_setmaxnreg_dec<40>();
    // Thread t copies chunk t % 8 of keys t / 8, t / 8 + 16, ...: one page lookup per key.
    const unsigned chunk = t % 8;
    for (int c = 0; c < tiles; ++c) {
      const unsigned s = c % STAGES, round = c / STAGES;
      if (round > 0) af_mbar_wait(&empty[s], (round - 1) & 1);
      const unsigned base = af_smem_addr(ring[s]);
#pragma unroll
      for (unsigned j = t / 8; j < TILE; j += 16) {
        const int pos = c * TILE + (int)j;
        const bool ok = pos < kv_len;
        const unsigned short* src = ok ? k_cache + ((long long)pages[pos / page_size] * page_size + pos % page_size) * 64 + chunk * 8 : k_cache;
        af_cp_async16_to(base + af_sw128_offset(j, chunk), src, ok);
      }
      af_cp_async_mbar_arrive(&full[s]);
    }
  } else {
    af_setmaxnreg_inc<232>();
    for (int c = wg - 1; c < tiles; c += 2) {
      const unsigned s = c % STAGES, round = c / STAGES;
      af_mbar_wait(&full[s], round & 1);
      af_fence_proxy_async();
      float d[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) d[i] = 0.f;
      af_wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) af_wgmma_m64n64k16_ss<IS_BF16>(d, af_desc_sw128(sq + 32 * k), af_desc_sw128(ring[s] + 32 * k), k > 0);
      af_wgmma_commit();
      af_wgmma_wait<0>();
      af_mbar_arrive(&empty[s]);
      af_wgmma_store_f32<64>(d, s_out + (size_t)c * 64 * 64, 64);
    }
  }
}
extern "C" __global__ void __launch_bounds__(384, 1) attnforge_gather_probe_bf16(const uint4* q, const unsigned short* k, const int* pages, int page_size, int kv_len, float* s) { af_gather_probe<true>(q, k, pages, page_size, kv_len, s); }
extern "C" __global__ void __launch_bounds__(384, 1) attnforge_gather_probe_f16(const uint4* q, const unsigned short* k, const int* pages, int page_size, int kv_len, float* s) { af_gather_probe<false>(q, k, pages, page_size, kv_len, s); }
"#;
    KernelSource { name: "gather_probe".into(), code: format!("#define AF_MBAR_SPIN_LIMIT (1ull << 24)\n{PIPELINE_CUH}\n{WGMMA_CUH}\n{kernel}"), hook_lines: Vec::new() }
}

/// Runs [`gather_probe_source`] on `e` (sm_90a): `q` 64 × 64 and `k_cache` (pages × `page_size`
/// keys × 64, one KV head) raw 16-bit patterns of `dtype`; `pages` the request's page table
/// (its `kv_len` keys on pages `pages[pos / page_size]`). Returns S, one 64 × 64 f32 block per
/// 64-key tile (row-major: query, key in the tile), zero past `kv_len`.
pub fn run_gather_probe(e: &Engine, dtype: DType, q: &[u16], k_cache: &[u16], page_size: usize, pages: &[i32], kv_len: usize) -> Result<Vec<f32>> {
    const WHAT: &str = "gather probe";
    require_sm90(e, WHAT)?;
    let ty = operand_type(WHAT, dtype)?;
    let bad = |why: String| Err(Error::UnsupportedConfig(format!("the gather probe: {why}")));
    if page_size == 0 || page_size > i32::MAX as usize {
        return bad(format!("page size {page_size}"));
    }
    let num_pages = k_cache.len() / (64 * page_size);
    if q.len() != 64 * 64 || k_cache.len() != num_pages * page_size * 64 || num_pages > i32::MAX as usize {
        return bad(format!("takes a 64 x 64 Q and whole pages of 64-element keys, got {} and {} elements (page size {page_size})", q.len(), k_cache.len()));
    }
    if kv_len == 0 || kv_len > i32::MAX as usize || pages.len() < kv_len.div_ceil(page_size) || pages.iter().any(|&p| p < 0 || p as usize >= num_pages) {
        return bad(format!("{kv_len} keys need {} pages, each below {num_pages}", kv_len.div_ceil(page_size)));
    }
    let tiles = kv_len.div_ceil(GATHER_TILE);
    let cu = cu(WHAT);
    let module = load(e, WHAT, &gather_probe_source())?;
    let f = module.load_function(&format!("attnforge_gather_probe_{ty}")).map_err(cu)?;
    let (dq, dk, dp) = (e.stream().clone_htod(q).map_err(cu)?, e.stream().clone_htod(k_cache).map_err(cu)?, e.stream().clone_htod(pages).map_err(cu)?);
    let mut ds = e.alloc::<f32>(tiles * 64 * 64)?;
    let (ps, kl) = (page_size as i32, kv_len as i32);
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (384, 1, 1), shared_mem_bytes: 0 };
    {
        use cudarc::driver::PushKernelArg;
        // SAFETY: the kernel reads 64 × 64 elements of `dq` (16-byte vectors; cudarc's
        // allocations are 256-byte aligned), the keys of the pages in the first ⌈kv_len /
        // page_size⌉ entries of `dp` (each checked above to be below `num_pages`, so inside
        // `dk`), and writes `tiles` × 64 × 64 f32 of `ds`; all live until the stream syncs below.
        unsafe { e.stream().launch_builder(&f).arg(&dq).arg(&dk).arg(&dp).arg(&ps).arg(&kl).arg(&mut ds).launch(cfg) }.map_err(cu)?;
    }
    e.stream().clone_dtoh(&ds).map_err(cu)
}

/// The softmax header, whose `af_exp2_fma` the exp2 probe runs.
pub const SOFTMAX_CUH: &str = include_str!("../../templates/common/softmax.cuh");

/// `attnforge_exp2_probe`: `y[i] = af_exp2_fma(x[i])` and `z[i] = exp2f(x[i])` (the MUFU form the
/// loops use otherwise), compiled with the kernels' options. The function is cut out of
/// `softmax.cuh` (the rest needs a variant); any arch.
pub fn exp2_probe_source() -> Result<KernelSource> {
    const START: &str = "__device__ __forceinline__ float af_exp2_fma(float x) {";
    let missing = || Error::Render("templates/common/softmax.cuh no longer defines af_exp2_fma as the exp2 probe expects".into());
    let at = SOFTMAX_CUH.find(START).ok_or_else(missing)?;
    let len = SOFTMAX_CUH[at..].find("\n}\n").ok_or_else(missing)? + 3;
    let kernel = r#"
extern "C" __global__ void attnforge_exp2_probe(const float* __restrict__ x, float* __restrict__ y, float* __restrict__ z, unsigned n) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    y[i] = af_exp2_fma(x[i]);
    z[i] = exp2f(x[i]);
  }
}
"#;
    Ok(KernelSource { name: "exp2_probe".into(), code: format!("{}\n{kernel}", &SOFTMAX_CUH[at..at + len]), hook_lines: Vec::new() })
}

/// Runs [`exp2_probe_source`] on `e` over `x`: (`af_exp2_fma(x)`, `exp2f(x)`).
pub fn run_exp2_probe(e: &Engine, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    const WHAT: &str = "exp2 probe";
    let n = u32::try_from(x.len()).map_err(|_| Error::UnsupportedConfig(format!("the exp2 probe takes at most {} values", u32::MAX)))?;
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let cu = cu(WHAT);
    let module = load(e, WHAT, &exp2_probe_source()?)?;
    let f = module.load_function("attnforge_exp2_probe").map_err(cu)?;
    let d_x = e.stream().clone_htod(x).map_err(cu)?;
    let (mut d_y, mut d_z) = (e.alloc::<f32>(x.len())?, e.alloc::<f32>(x.len())?);
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (n.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    {
        use cudarc::driver::PushKernelArg;
        // SAFETY: thread i < n reads x[i] and writes y[i], z[i]; all three buffers hold n f32s
        // and live until the stream is synchronised below.
        unsafe { e.stream().launch_builder(&f).arg(&d_x).arg(&mut d_y).arg(&mut d_z).arg(&n).launch(cfg) }.map_err(cu)?;
    }
    Ok((e.stream().clone_dtoh(&d_y).map_err(cu)?, e.stream().clone_dtoh(&d_z).map_err(cu)?))
}
