
// attnforge: gemma2.decode.d128.bf16.g4
// prelude.cuh — types, conversions, cp.async, and the integer helpers the spec emitter calls.
// Plain CUDA, no template syntax: included verbatim by every op.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define AF_LOG2E 1.4426950408889634f
#define AF_INF __int_as_float(0x7f800000)

// Integer arithmetic of the spec language: wrapping + - *, division and remainder by zero give 0,
// INT_MIN / -1 wraps. Must match src/spec/eval.rs exactly.
__device__ __forceinline__ int af_iadd(int a, int b) { return (int)((unsigned)a + (unsigned)b); }
__device__ __forceinline__ int af_isub(int a, int b) { return (int)((unsigned)a - (unsigned)b); }
__device__ __forceinline__ int af_imul(int a, int b) { return (int)((unsigned)a * (unsigned)b); }
__device__ __forceinline__ int af_ineg(int a) { return (int)(0u - (unsigned)a); }
__device__ __forceinline__ int af_iabs(int a) { return a < 0 ? af_ineg(a) : a; }
__device__ __forceinline__ int af_idiv(int a, int b) { return b == 0 ? 0 : (b == -1 ? af_ineg(a) : a / b); }
__device__ __forceinline__ int af_irem(int a, int b) { return (b == 0 || b == -1) ? 0 : a % b; }
__device__ __forceinline__ float af_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float af_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float af_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float af_to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T af_from_float(float x);
template <> __device__ __forceinline__ __half af_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 af_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float af_from_float<float>(float x) { return x; }

// Eight 2-byte elements (16 bytes) to float.
template <typename T>
__device__ __forceinline__ void af_load8(const T* p, float (&out)[8]) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = af_to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ void af_store8(T* p, const float (&in)[8]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = af_from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// DANGER_ASYNC: 16-byte global→shared copy; when !pred, writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void af_cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void af_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void af_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

typedef __nv_bfloat16 DTypeQ;
typedef __nv_bfloat16 DTypeKV;
typedef __nv_bfloat16 DTypeO;
#define HEAD_DIM_QK 128
#define HEAD_DIM_VO 128
#define GROUP 4
#define BDX 4
#define BDZ 8
#define TILE_PER_Z 4
#define STAGES 2
#define NV 4
#define MIN_CTAS 1

// ---- variant `gemma2` (shipped:gemma2)
struct Params {
  float u_soft_cap;
  int u_window;
};
// The kernel argument: Params padded to the fixed-size blob Rust passes (src/jit/render.rs).
union ParamsArg {
  Params p;
  unsigned long long raw[16];
};
static_assert(sizeof(ParamsArg) == 128, "params blob size differs from Rust");
static_assert(sizeof(Params) == 8, "Params layout differs from Rust (src/abi.rs)");

#define HAS_MASK 1
#define HAS_KV_LO 1
#define HAS_KV_HI 1
#define HAS_SINK 0
#define NORMALIZE_SOFTMAX 1
#define AF_HOOK_ARGS float score, float sm_scale, int q_pos, int kv_pos, int qo_head, int kv_head, int req, int q_len, int kv_len, const Params& p

__device__ __forceinline__ float af_logits(AF_HOOK_ARGS) {
  // @hook logits
  return (p.u_soft_cap * tanhf(((score * sm_scale) / p.u_soft_cap)));
}
__device__ __forceinline__ bool af_mask(AF_HOOK_ARGS) {
  // @hook mask
  return ((kv_pos <= q_pos) && (af_isub(q_pos, kv_pos) < p.u_window));
}
__device__ __forceinline__ int af_kv_lo(AF_HOOK_ARGS) {
  // @hook kv_range.lo
  return af_iadd(af_isub(q_pos, p.u_window), 1);
}
__device__ __forceinline__ int af_kv_hi(AF_HOOK_ARGS) {
  // @hook kv_range.hi
  return q_pos;
}

// decode.cuh — batch decode over the paged KV cache: the kernel body.
//
// One CTA per work item (request, KV chunk) and KV head (blockIdx.y). Threads are (tx, ty, tz):
// tx splits the head dim (each thread owns NV 16-byte vectors, strided by BDX so that the BDX
// lanes of a row read consecutive bytes), ty is the query head within the GQA group (all query
// heads of a KV head share every K/V load), tz splits each KV tile across thread groups.
// Shared-memory rows are padded by 16 bytes so that rows read by different tz hit other banks.
// K/V tiles stream through a STAGES-deep cp.async ring in shared memory. Each (ty, tz) keeps an
// online-softmax state; the tz states merge at the end. A split item writes an f32 partial
// (o normalised, lse) for merge_states; an unsplit one writes the output and applies the sink.
//
// Needs, from the op template: DTypeQ, DTypeKV, DTypeO, Params, HEAD_DIM_QK, HEAD_DIM_VO, GROUP,
// BDX, BDZ, TILE_PER_Z, STAGES, NV, HAS_MASK, HAS_KV_LO, HAS_KV_HI, HAS_SINK, NORMALIZE_SOFTMAX, and
// the hooks af_logits / af_mask / af_kv_lo / af_kv_hi / af_sink.

#define VEC 8
#define KV_TILE (BDZ * TILE_PER_Z)
#define NUM_THREADS (BDX * GROUP * BDZ)
#define ROW_QK (HEAD_DIM_QK + VEC)
#define ROW_VO (HEAD_DIM_VO + VEC)

// Mirrors src/engine/decode.rs `DecodeWork`.
struct DecodeWork {
  int req;
  int kv_begin;  // first KV position of the chunk
  int kv_end;    // one past the last
  int partial;   // partial slot, or -1 to write the final output
};

// Mirrors src/engine/decode.rs `DecodeArgs`; the size is checked below against Rust's.
struct DecodeArgs {
  const DTypeQ* q;
  const DTypeKV* k;
  const DTypeKV* v;
  DTypeO* o;
  float* lse;
  float* part_o;
  float* part_lse;
  const int* qo_indptr;
  const int* kv_indptr;
  const int* kv_indices;
  const int* last_page_len;
  const DecodeWork* work;
  const int* num_work;
  long long k_page_stride;
  long long v_page_stride;
  int k_slot_stride;
  int k_head_stride;
  int v_slot_stride;
  int v_head_stride;
  int page_size;
  int num_qo_heads;
  float sm_scale;
  int page_shift;  // log2(page_size) when it is a power of two, else -1
};

__device__ __forceinline__ void decode_body(const DecodeArgs& a, const Params& p) {
  const int w = blockIdx.x;
  if (w >= *a.num_work) return;  // fixed-grid mode: spare CTAs exit
  const DecodeWork item = a.work[w];
  const int kv_head = blockIdx.y;
  const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const int tid = (tz * GROUP + ty) * BDX + tx;
  const int req = item.req;
  const int qo_head = kv_head * GROUP + ty;
  const int token = a.qo_indptr[req];
  const int q_len = a.qo_indptr[req + 1] - token;
  const int page_begin = a.kv_indptr[req];
  const int n_pages = a.kv_indptr[req + 1] - page_begin;
  const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
  const int q_pos = kv_len - q_len;  // the request's one query token, i = q_len - 1 = 0
  const float sm_scale = a.sm_scale;

  int lo = item.kv_begin, hi = item.kv_end - 1;
#if HAS_KV_LO
  lo = max(lo, af_kv_lo(0.f, sm_scale, q_pos, 0, kv_head * GROUP, kv_head, req, q_len, kv_len, p));
#endif
#if HAS_KV_HI
  hi = min(hi, af_kv_hi(0.f, sm_scale, q_pos, 0, kv_head * GROUP, kv_head, req, q_len, kv_len, p));
#endif

  extern __shared__ __align__(16) unsigned char smem_raw[];
  DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
  DTypeKV* v_smem = k_smem + STAGES * KV_TILE * ROW_QK;

  // Vector v of this thread covers dims [(v * BDX + tx) * VEC, … + VEC).
  float qf[NV][VEC];
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const int d0 = (v * BDX + tx) * VEC;
    if (d0 < HEAD_DIM_QK) {
      af_load8(a.q + ((long long)token * a.num_qo_heads + qo_head) * HEAD_DIM_QK + d0, qf[v]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[v][e] = 0.f;
    }
  }
  const bool has_vo = tx * VEC < HEAD_DIM_VO;

  // Issues the cp.async copies of tile `t` into ring slot `stage`. Keys past `hi` are zero-filled
  // so that a masked key never multiplies a NaN from stale memory.
  auto load_tile = [&](int stage, int tile_start) {
    constexpr int KCH = HEAD_DIM_QK / VEC, VCH = HEAD_DIM_VO / VEC;
    constexpr int CH = KCH > VCH ? KCH : VCH;
    for (int c = tid; c < KV_TILE * CH; c += NUM_THREADS) {
      const int j = c / CH, ch = c % CH;
      const int pos = tile_start + j;
      const bool ok = pos <= hi;
      long long page = 0;
      int slot = 0;
      if (ok) {
        // Power-of-two pages (the common case) avoid an integer division per copy.
        const int pi = a.page_shift >= 0 ? pos >> a.page_shift : pos / a.page_size;
        slot = a.page_shift >= 0 ? pos & (a.page_size - 1) : pos % a.page_size;
        page = a.kv_indices[page_begin + pi];
      }
      if (ch < KCH) {
        const DTypeKV* src = ok ? a.k + page * a.k_page_stride + (long long)slot * a.k_slot_stride +
                                      (long long)kv_head * a.k_head_stride + ch * VEC
                                : a.k;
        af_cp_async16(k_smem + (stage * KV_TILE + j) * ROW_QK + ch * VEC, src, ok);
      }
      if (ch < VCH) {
        const DTypeKV* src = ok ? a.v + page * a.v_page_stride + (long long)slot * a.v_slot_stride +
                                      (long long)kv_head * a.v_head_stride + ch * VEC
                                : a.v;
        af_cp_async16(v_smem + (stage * KV_TILE + j) * ROW_VO + ch * VEC, src, ok);
      }
    }
  };

  float m = -AF_INF, d = 0.f;
  bool any = false;
  float o[NV][VEC];
#pragma unroll
  for (int v = 0; v < NV; ++v)
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[v][e] = 0.f;

  const int num_tiles = hi >= lo ? (hi - lo + KV_TILE) / KV_TILE : 0;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_tiles) load_tile(s, lo + s * KV_TILE);
    af_cp_async_commit();
  }
  for (int t = 0; t < num_tiles; ++t) {
    {
      const int nt = t + STAGES - 1;
      if (nt < num_tiles) load_tile(nt % STAGES, lo + nt * KV_TILE);
      af_cp_async_commit();
    }
    af_cp_async_wait<STAGES - 1>();
    __syncthreads();
    const int stage = t % STAGES;
    const int tile_start = lo + t * KV_TILE;
    float l[TILE_PER_Z];
    float m_tile = -AF_INF;
#pragma unroll
    for (int jj = 0; jj < TILE_PER_Z; ++jj) {
      const int j = tz * TILE_PER_Z + jj;
      const int pos = tile_start + j;
      float s = 0.f;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int d0 = (v * BDX + tx) * VEC;
        if (d0 < HEAD_DIM_QK) {
          float kf[VEC];
          af_load8(k_smem + (stage * KV_TILE + j) * ROW_QK + d0, kf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) s = fmaf(qf[v][e], kf[e], s);
        }
      }
#pragma unroll
      for (int off = BDX / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      bool vis = pos <= hi;
#if HAS_MASK
      vis = vis && af_mask(0.f, sm_scale, q_pos, pos, qo_head, kv_head, req, q_len, kv_len, p);
#endif
#if NORMALIZE_SOFTMAX
      l[jj] = vis ? af_logits(s, sm_scale, q_pos, pos, qo_head, kv_head, req, q_len, kv_len, p) : -AF_INF;
      m_tile = fmaxf(m_tile, l[jj]);
#else
      l[jj] = vis ? af_logits(s, sm_scale, q_pos, pos, qo_head, kv_head, req, q_len, kv_len, p) : 0.f;
      any = any || vis;
#endif
    }
#if NORMALIZE_SOFTMAX
    const float m_new = fmaxf(m, m_tile);
    if (m_new != -AF_INF) {
      const float scale = exp2f((m - m_new) * AF_LOG2E);
      d *= scale;
#pragma unroll
      for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[v][e] *= scale;
#pragma unroll
      for (int jj = 0; jj < TILE_PER_Z; ++jj) {
        const float pj = exp2f((l[jj] - m_new) * AF_LOG2E);
        d += pj;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int d0 = (v * BDX + tx) * VEC;
          if (d0 < HEAD_DIM_VO) {
            float vf[VEC];
            af_load8(v_smem + (stage * KV_TILE + tz * TILE_PER_Z + jj) * ROW_VO + d0, vf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[v][e] = fmaf(pj, vf[e], o[v][e]);
          }
        }
      }
      m = m_new;
    }
#else
#pragma unroll
    for (int jj = 0; jj < TILE_PER_Z; ++jj) {
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int d0 = (v * BDX + tx) * VEC;
        if (d0 < HEAD_DIM_VO) {
          float vf[VEC];
          af_load8(v_smem + (stage * KV_TILE + tz * TILE_PER_Z + jj) * ROW_VO + d0, vf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[v][e] = fmaf(l[jj], vf[e], o[v][e]);
        }
      }
    }
#endif
    __syncthreads();  // the slot is refilled by the next iteration's load
  }
  af_cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the reduction below

  // Merge the BDZ states of each query head: red = [BDZ][GROUP] m, d, then o.
  float* red = reinterpret_cast<float*>(smem_raw);
  float* red_m = red;
  float* red_d = red_m + BDZ * GROUP;
  float* red_o = red_d + BDZ * GROUP;
  const int zg = tz * GROUP + ty;
  if (tx == 0) {
    red_m[zg] = m;
    red_d[zg] = NORMALIZE_SOFTMAX ? d : (any ? 1.f : 0.f);
  }
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const int d0 = (v * BDX + tx) * VEC;
    if (d0 < HEAD_DIM_VO) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) red_o[zg * HEAD_DIM_VO + d0 + e] = o[v][e];
    }
  }
  __syncthreads();
  if (tz != 0 || !has_vo) return;

  float M = -AF_INF, D = 0.f, O[NV][VEC];
#pragma unroll
  for (int v = 0; v < NV; ++v)
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[v][e] = 0.f;
#if NORMALIZE_SOFTMAX
  for (int z = 0; z < BDZ; ++z) M = fmaxf(M, red_m[z * GROUP + ty]);
  if (M != -AF_INF) {
    for (int z = 0; z < BDZ; ++z) {
      const float f = exp2f((red_m[z * GROUP + ty] - M) * AF_LOG2E);
      D += red_d[z * GROUP + ty] * f;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int d0 = (v * BDX + tx) * VEC;
        if (d0 < HEAD_DIM_VO) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) O[v][e] += red_o[(z * GROUP + ty) * HEAD_DIM_VO + d0 + e] * f;
        }
      }
    }
  }
  const bool visible = M != -AF_INF;
#else
  for (int z = 0; z < BDZ; ++z) {
    D += red_d[z * GROUP + ty];
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int d0 = (v * BDX + tx) * VEC;
      if (d0 < HEAD_DIM_VO) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) O[v][e] += red_o[(z * GROUP + ty) * HEAD_DIM_VO + d0 + e];
      }
    }
  }
  const bool visible = D > 0.f;
#endif

  float lse_out;
  if (item.partial >= 0) {
    // Partial state for merge_states: o normalised, lse = log of the denominator, no sink.
#if NORMALIZE_SOFTMAX
    const float inv = visible ? 1.f / D : 0.f;
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
      for (int e = 0; e < VEC; ++e) O[v][e] *= inv;
    lse_out = visible ? M + logf(D) : -AF_INF;
#else
    lse_out = visible ? 0.f : -AF_INF;
#endif
    const long long row = (long long)item.partial * a.num_qo_heads + qo_head;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int d0 = (v * BDX + tx) * VEC;
      if (d0 < HEAD_DIM_VO) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a.part_o[row * HEAD_DIM_VO + d0 + e] = O[v][e];
      }
    }
    if (tx == 0) a.part_lse[row] = lse_out;
    return;
  }
#if NORMALIZE_SOFTMAX
  if (visible) {
    float mf = M, df = D;
#if HAS_SINK
    const float sk = af_sink(0.f, sm_scale, q_pos, 0, qo_head, kv_head, req, q_len, kv_len, p);
    mf = fmaxf(M, sk);
    df = D * exp2f((M - mf) * AF_LOG2E) + exp2f((sk - mf) * AF_LOG2E);
#endif
    const float f = exp2f((M - mf) * AF_LOG2E) / df;
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
      for (int e = 0; e < VEC; ++e) O[v][e] *= f;
    lse_out = mf + logf(df);
  } else {
#pragma unroll
    for (int v = 0; v < NV; ++v)
#pragma unroll
      for (int e = 0; e < VEC; ++e) O[v][e] = 0.f;
    lse_out = -AF_INF;
  }
#else
  lse_out = visible ? 0.f : -AF_INF;
#endif
  const long long row = (long long)token * a.num_qo_heads + qo_head;
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const int d0 = (v * BDX + tx) * VEC;
    if (d0 < HEAD_DIM_VO) af_store8(a.o + row * HEAD_DIM_VO + d0, O[v]);
  }
  if (tx == 0) a.lse[row] = lse_out;
}

// merge.cuh — merge_states: combine the f32 partials (o, lse) of split requests into the output.
// The merge is associative and commutative; the sink joins the denominator here, once.
//
// Needs: DTypeO, Params, HEAD_DIM_VO, HAS_SINK, NORMALIZE_SOFTMAX, af_sink.

// Mirrors src/engine/decode.rs `MergeWork`.
struct MergeWork {
  int req;
  int first;  // first partial slot
  int count;  // number of partial slots
  int token;  // output row (token index)
};

struct MergeArgs {
  DTypeO* o;
  float* lse;
  const float* part_o;
  const float* part_lse;
  const MergeWork* work;
  const int* num_work;
  const int* qo_indptr;
  const int* kv_indptr;
  const int* last_page_len;
  int num_qo_heads;
  int group;
  int page_size;
  float sm_scale;
};

// One CTA per (merge item, qo head); each thread owns head dims tx, tx + blockDim.x, ….
__device__ __forceinline__ void merge_body(const MergeArgs& a, const Params& p) {
  const int w = blockIdx.x;
  if (w >= *a.num_work) return;
  const MergeWork item = a.work[w];
  const int qo_head = blockIdx.y;
  float M = -AF_INF;
  for (int s = 0; s < item.count; ++s) M = fmaxf(M, a.part_lse[(long long)(item.first + s) * a.num_qo_heads + qo_head]);
  const long long out_row = (long long)item.token * a.num_qo_heads + qo_head;
#if NORMALIZE_SOFTMAX
  float W = 0.f;
  if (M != -AF_INF) {
    for (int s = 0; s < item.count; ++s) W += exp2f((a.part_lse[(long long)(item.first + s) * a.num_qo_heads + qo_head] - M) * AF_LOG2E);
  }
  float lse_total = M != -AF_INF ? M + logf(W) : -AF_INF;
  float final_scale = M != -AF_INF ? 1.f / W : 0.f;
#if HAS_SINK
  if (M != -AF_INF) {
    const int req = item.req;
    const int n_pages = a.kv_indptr[req + 1] - a.kv_indptr[req];
    const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
    const int q_len = a.qo_indptr[req + 1] - a.qo_indptr[req];
    const int q_pos = kv_len - q_len + (item.token - a.qo_indptr[req]);
    const float sk = af_sink(0.f, a.sm_scale, q_pos, 0, qo_head, qo_head / a.group, req, q_len, kv_len, p);
    const float mf = fmaxf(lse_total, sk);
    const float df = exp2f((lse_total - mf) * AF_LOG2E) + exp2f((sk - mf) * AF_LOG2E);
    final_scale *= exp2f((lse_total - mf) * AF_LOG2E) / df;
    lse_total = mf + logf(df);
  }
#endif
#else
  float lse_total = M != -AF_INF ? 0.f : -AF_INF;
  float final_scale = 1.f;
#endif
  for (int dd = threadIdx.x; dd < HEAD_DIM_VO; dd += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < item.count; ++s) {
      const long long row = (long long)(item.first + s) * a.num_qo_heads + qo_head;
#if NORMALIZE_SOFTMAX
      const float ls = a.part_lse[row];
      const float wgt = M != -AF_INF ? exp2f((ls - M) * AF_LOG2E) : 0.f;
      acc += wgt * a.part_o[row * HEAD_DIM_VO + dd];
#else
      acc += a.part_o[row * HEAD_DIM_VO + dd];
#endif
    }
    a.o[out_row * HEAD_DIM_VO + dd] = af_from_float<DTypeO>(acc * final_scale);
  }
  if (threadIdx.x == 0) a.lse[out_row] = lse_total;
}

static_assert(sizeof(DecodeArgs) == 152, "DecodeArgs layout differs from Rust");
static_assert(sizeof(MergeArgs) == 88, "MergeArgs layout differs from Rust");
static_assert(NUM_THREADS % 32 == 0 && NUM_THREADS <= 1024, "block must be whole warps");

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_CTAS) attnforge_decode(const DecodeArgs a, const ParamsArg pa) {
  decode_body(a, pa.p);
}

extern "C" __global__ void attnforge_merge(const MergeArgs a, const ParamsArg pa) {
  merge_body(a, pa.p);
}
