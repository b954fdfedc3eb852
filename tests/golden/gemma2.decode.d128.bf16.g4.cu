
// attnforge: decode.d128.bf16.g4
// prelude.cuh — types, conversions, cp.async, and the integer helpers the spec emitter calls.
// Plain CUDA, no template syntax: included verbatim by every op.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define AF_LOG2E 1.4426950408889634f
#define AF_INF __int_as_float(0x7f800000)
// The max of the decode softmax and the merges: NaN if either operand is (PTX max.NaN, one FMNMX
// like fmaxf). fmaxf skips a NaN, so a row whose logits were all NaN kept m = -inf and came out
// "fully masked"; the reference makes any row with a visible NaN logit NaN, and so do these.
__device__ __forceinline__ float af_fmax(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Whether two types are the same (NVRTC has no <type_traits>).
template <class A, class B>
struct af_same {
  enum : bool { value = false };
};
template <class A>
struct af_same<A, A> {
  enum : bool { value = true };
};

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
// bit(m): bit (row, kv_pos) of request req's row-major q_len x kv_len matrix, little-endian bits.
// The host checked every request's matrix lies inside the data (ParamValues::check_bits).
__device__ __forceinline__ bool af_bit(const unsigned char* data, const long long* off, int req, int row, int kv_pos, int kv_len) {
  if (row < 0 || kv_pos < 0 || kv_pos >= kv_len) return false;
  const long long k = off[req] + (long long)row * kv_len + kv_pos;
  return (data[k >> 3] >> (k & 7)) & 1;
}

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

// The L2 prefetch size the K/V copies ask for: AF_L2_PREFETCH 0 (none), 64, 128 or 256 bytes.
// 128 (a whole line per miss, as the rows are read whole): on the H200, decode B64/B128/B256
// 2.0-2.2% faster than none; 256 gained nothing (BENCHMARKS.md).
#ifndef AF_L2_PREFETCH
#define AF_L2_PREFETCH 128
#endif
#if AF_L2_PREFETCH == 256
#define AF_L2_HINT ".L2::256B"
#elif AF_L2_PREFETCH == 128
#define AF_L2_HINT ".L2::128B"
#elif AF_L2_PREFETCH == 64
#define AF_L2_HINT ".L2::64B"
#else
#define AF_L2_HINT ""
#endif

// DANGER_ASYNC: 16-byte global→shared copy to a 32-bit shared address; when !pred, writes 16
// zero bytes and reads nothing.
__device__ __forceinline__ void af_cp_async16_s(unsigned smem, const void* gmem, bool pred) {
  int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global" AF_L2_HINT " [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_size));
}
// The same to a generic pointer into shared memory.
__device__ __forceinline__ void af_cp_async16(void* smem, const void* gmem, bool pred) {
  af_cp_async16_s((unsigned)__cvta_generic_to_shared(smem), gmem, pred);
}
// The same for a copy known to be in range: no source-size operand, no predicate to compute.
__device__ __forceinline__ void af_cp_async16_s(unsigned smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global" AF_L2_HINT " [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}
// Programmatic dependent launch (sm_90+; no-ops elsewhere and when the launch did not ask for
// it). A kernel lets the next launch on its stream start early; that launch waits for this
// grid's completion and memory before it reads what this grid wrote.
__device__ __forceinline__ void af_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
__device__ __forceinline__ void af_wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void af_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void af_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }


// The host–device ABI (src/abi.rs): work items and kernel arguments. Every member's size is
// asserted and so is each struct's; as the sizes add up to the struct's, there is no padding the
// compiler added, and every offset is Rust's (src/abi.rs, StructLayout).
struct DecodeWork {
  int req;  // offset 0
  static_assert(sizeof(int) == 4, "DecodeWork::req has another size in src/abi.rs");
  int kv_begin;  // offset 4
  static_assert(sizeof(int) == 4, "DecodeWork::kv_begin has another size in src/abi.rs");
  int kv_end;  // offset 8
  static_assert(sizeof(int) == 4, "DecodeWork::kv_end has another size in src/abi.rs");
  int partial;  // offset 12
  static_assert(sizeof(int) == 4, "DecodeWork::partial has another size in src/abi.rs");
};
struct PrefillWork {
  int req;  // offset 0
  static_assert(sizeof(int) == 4, "PrefillWork::req has another size in src/abi.rs");
  int row_start;  // offset 4
  static_assert(sizeof(int) == 4, "PrefillWork::row_start has another size in src/abi.rs");
  int kv_begin;  // offset 8
  static_assert(sizeof(int) == 4, "PrefillWork::kv_begin has another size in src/abi.rs");
  int kv_end;  // offset 12
  static_assert(sizeof(int) == 4, "PrefillWork::kv_end has another size in src/abi.rs");
  int partial;  // offset 16
  static_assert(sizeof(int) == 4, "PrefillWork::partial has another size in src/abi.rs");
  int stride;  // offset 20
  static_assert(sizeof(int) == 4, "PrefillWork::stride has another size in src/abi.rs");
};
struct MergeWork {
  int req;  // offset 0
  static_assert(sizeof(int) == 4, "MergeWork::req has another size in src/abi.rs");
  int first;  // offset 4
  static_assert(sizeof(int) == 4, "MergeWork::first has another size in src/abi.rs");
  int count;  // offset 8
  static_assert(sizeof(int) == 4, "MergeWork::count has another size in src/abi.rs");
  int token;  // offset 12
  static_assert(sizeof(int) == 4, "MergeWork::token has another size in src/abi.rs");
};
template <typename Q, typename KV, typename O, typename Work>
struct AttnArgs {
  const Q* q;  // offset 0
  static_assert(sizeof(const Q*) == 8, "AttnArgs::q has another size in src/abi.rs");
  const KV* k;  // offset 8
  static_assert(sizeof(const KV*) == 8, "AttnArgs::k has another size in src/abi.rs");
  const KV* v;  // offset 16
  static_assert(sizeof(const KV*) == 8, "AttnArgs::v has another size in src/abi.rs");
  O* o;  // offset 24
  static_assert(sizeof(O*) == 8, "AttnArgs::o has another size in src/abi.rs");
  float* lse;  // offset 32
  static_assert(sizeof(float*) == 8, "AttnArgs::lse has another size in src/abi.rs");
  float* part_o;  // offset 40
  static_assert(sizeof(float*) == 8, "AttnArgs::part_o has another size in src/abi.rs");
  float* part_lse;  // offset 48
  static_assert(sizeof(float*) == 8, "AttnArgs::part_lse has another size in src/abi.rs");
  const int* qo_indptr;  // offset 56
  static_assert(sizeof(const int*) == 8, "AttnArgs::qo_indptr has another size in src/abi.rs");
  const int* kv_indptr;  // offset 64
  static_assert(sizeof(const int*) == 8, "AttnArgs::kv_indptr has another size in src/abi.rs");
  const int* kv_indices;  // offset 72
  static_assert(sizeof(const int*) == 8, "AttnArgs::kv_indices has another size in src/abi.rs");
  const int* last_page_len;  // offset 80
  static_assert(sizeof(const int*) == 8, "AttnArgs::last_page_len has another size in src/abi.rs");
  const Work* work;  // offset 88
  static_assert(sizeof(const Work*) == 8, "AttnArgs::work has another size in src/abi.rs");
  const int* num_work;  // offset 96
  static_assert(sizeof(const int*) == 8, "AttnArgs::num_work has another size in src/abi.rs");
  long long k_page_stride;  // offset 104
  static_assert(sizeof(long long) == 8, "AttnArgs::k_page_stride has another size in src/abi.rs");
  long long v_page_stride;  // offset 112
  static_assert(sizeof(long long) == 8, "AttnArgs::v_page_stride has another size in src/abi.rs");
  int k_slot_stride;  // offset 120
  static_assert(sizeof(int) == 4, "AttnArgs::k_slot_stride has another size in src/abi.rs");
  int k_head_stride;  // offset 124
  static_assert(sizeof(int) == 4, "AttnArgs::k_head_stride has another size in src/abi.rs");
  int v_slot_stride;  // offset 128
  static_assert(sizeof(int) == 4, "AttnArgs::v_slot_stride has another size in src/abi.rs");
  int v_head_stride;  // offset 132
  static_assert(sizeof(int) == 4, "AttnArgs::v_head_stride has another size in src/abi.rs");
  int page_size;  // offset 136
  static_assert(sizeof(int) == 4, "AttnArgs::page_size has another size in src/abi.rs");
  int num_qo_heads;  // offset 140
  static_assert(sizeof(int) == 4, "AttnArgs::num_qo_heads has another size in src/abi.rs");
  float sm_scale;  // offset 144
  static_assert(sizeof(float) == 4, "AttnArgs::sm_scale has another size in src/abi.rs");
  int page_shift;  // offset 148
  static_assert(sizeof(int) == 4, "AttnArgs::page_shift has another size in src/abi.rs");
};
template <typename O>
struct MergeArgs {
  O* o;  // offset 0
  static_assert(sizeof(O*) == 8, "MergeArgs::o has another size in src/abi.rs");
  float* lse;  // offset 8
  static_assert(sizeof(float*) == 8, "MergeArgs::lse has another size in src/abi.rs");
  const float* part_o;  // offset 16
  static_assert(sizeof(const float*) == 8, "MergeArgs::part_o has another size in src/abi.rs");
  const float* part_lse;  // offset 24
  static_assert(sizeof(const float*) == 8, "MergeArgs::part_lse has another size in src/abi.rs");
  const MergeWork* work;  // offset 32
  static_assert(sizeof(const MergeWork*) == 8, "MergeArgs::work has another size in src/abi.rs");
  const int* num_work;  // offset 40
  static_assert(sizeof(const int*) == 8, "MergeArgs::num_work has another size in src/abi.rs");
  const int* qo_indptr;  // offset 48
  static_assert(sizeof(const int*) == 8, "MergeArgs::qo_indptr has another size in src/abi.rs");
  const int* kv_indptr;  // offset 56
  static_assert(sizeof(const int*) == 8, "MergeArgs::kv_indptr has another size in src/abi.rs");
  const int* last_page_len;  // offset 64
  static_assert(sizeof(const int*) == 8, "MergeArgs::last_page_len has another size in src/abi.rs");
  int num_qo_heads;  // offset 72
  static_assert(sizeof(int) == 4, "MergeArgs::num_qo_heads has another size in src/abi.rs");
  int group;  // offset 76
  static_assert(sizeof(int) == 4, "MergeArgs::group has another size in src/abi.rs");
  int page_size;  // offset 80
  static_assert(sizeof(int) == 4, "MergeArgs::page_size has another size in src/abi.rs");
  float sm_scale;  // offset 84
  static_assert(sizeof(float) == 4, "MergeArgs::sm_scale has another size in src/abi.rs");
};
struct StateMergeArgs {
  unsigned long long v0;  // offset 0
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::v0 has another size in src/abi.rs");
  unsigned long long s0;  // offset 8
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::s0 has another size in src/abi.rs");
  unsigned long long v1;  // offset 16
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::v1 has another size in src/abi.rs");
  unsigned long long s1;  // offset 24
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::s1 has another size in src/abi.rs");
  unsigned long long vo;  // offset 32
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::vo has another size in src/abi.rs");
  unsigned long long so;  // offset 40
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::so has another size in src/abi.rs");
  unsigned long long mask;  // offset 48
  static_assert(sizeof(unsigned long long) == 8, "StateMergeArgs::mask has another size in src/abi.rs");
  long long v0_tok;  // offset 56
  static_assert(sizeof(long long) == 8, "StateMergeArgs::v0_tok has another size in src/abi.rs");
  long long v0_state;  // offset 64
  static_assert(sizeof(long long) == 8, "StateMergeArgs::v0_state has another size in src/abi.rs");
  long long v0_head;  // offset 72
  static_assert(sizeof(long long) == 8, "StateMergeArgs::v0_head has another size in src/abi.rs");
  long long s0_tok;  // offset 80
  static_assert(sizeof(long long) == 8, "StateMergeArgs::s0_tok has another size in src/abi.rs");
  long long s0_state;  // offset 88
  static_assert(sizeof(long long) == 8, "StateMergeArgs::s0_state has another size in src/abi.rs");
  long long s0_head;  // offset 96
  static_assert(sizeof(long long) == 8, "StateMergeArgs::s0_head has another size in src/abi.rs");
  long long v1_tok;  // offset 104
  static_assert(sizeof(long long) == 8, "StateMergeArgs::v1_tok has another size in src/abi.rs");
  long long v1_head;  // offset 112
  static_assert(sizeof(long long) == 8, "StateMergeArgs::v1_head has another size in src/abi.rs");
  long long s1_tok;  // offset 120
  static_assert(sizeof(long long) == 8, "StateMergeArgs::s1_tok has another size in src/abi.rs");
  long long s1_head;  // offset 128
  static_assert(sizeof(long long) == 8, "StateMergeArgs::s1_head has another size in src/abi.rs");
  long long vo_tok;  // offset 136
  static_assert(sizeof(long long) == 8, "StateMergeArgs::vo_tok has another size in src/abi.rs");
  long long vo_head;  // offset 144
  static_assert(sizeof(long long) == 8, "StateMergeArgs::vo_head has another size in src/abi.rs");
  long long so_tok;  // offset 152
  static_assert(sizeof(long long) == 8, "StateMergeArgs::so_tok has another size in src/abi.rs");
  long long so_head;  // offset 160
  static_assert(sizeof(long long) == 8, "StateMergeArgs::so_head has another size in src/abi.rs");
  long long tokens;  // offset 168
  static_assert(sizeof(long long) == 8, "StateMergeArgs::tokens has another size in src/abi.rs");
  long long heads;  // offset 176
  static_assert(sizeof(long long) == 8, "StateMergeArgs::heads has another size in src/abi.rs");
  int states;  // offset 184
  static_assert(sizeof(int) == 4, "StateMergeArgs::states has another size in src/abi.rs");
  int head_dim;  // offset 188
  static_assert(sizeof(int) == 4, "StateMergeArgs::head_dim has another size in src/abi.rs");
};

// traits.cuh — what a kernel instance is, at compile time: one traits struct per instance, built
// by its .cu.tera from the config (src/jit: KernelConfig and the family's tile), instead of
// per-file macros. Every part (kv_ring.cuh, softmax.cuh, scheduler.cuh, the main loops, merge.cuh)
// takes its traits as a template parameter, so one translation unit can hold several main loops.
//
// The variant's hooks and switches (HAS_MASK, NORMALIZE_SOFTMAX, …, from variant.cuh.tera) are
// the variant's, not the instance's, and stay macros.

// Element types, head dims and the GQA group: what every part needs. Constants are enumerators,
// not static data members, so that NVRTC emits no global variable for them.
template <typename Q, typename KV, typename O, int DQK, int DVO, int G>
struct AttnShape {
  using DTypeQ = Q;
  using DTypeKV = KV;
  using DTypeO = O;
  enum : int { HEAD_DIM_QK = DQK, HEAD_DIM_VO = DVO, GROUP = G };
  // K/V elements per 16-byte chunk: the unit of the ring's copies and of its swizzle. The main
  // loops read 2-byte elements; an 8-bit KV is a load policy of its own (a new ring part).
  enum : int { KV_VEC = 16 / (int)sizeof(KV) };
  // Elements converted per vector load or store of Q and O (af_load8 / af_store8).
  enum : int { VEC = 8 };
  static_assert(sizeof(Q) == 2 && sizeof(KV) == 2 && sizeof(O) == 2, "the main loops take 2-byte Q, K/V and O elements");
};

// The K/V ring: its depth, keys per tile, the CTA's threads, and its shared-memory rows. The 8
// rows that an ldmatrix (or 8 tz groups) reads must hit 8 different bank groups, and every
// 32-byte sector a cp.async copies must land in one aligned 32-byte unit of shared memory: a
// sector that straddles two is fetched from L2 twice (decode, H200: 1.5x the L2 sectors and
// requests of the bytes read, 48% L2 "hits").
// - SWIZZLE (decode, head dims multiples of 64): unpadded rows; 16-byte chunk c of row r is
//   stored at chunk c ^ (r & 7), which keeps each sector in its own aligned pair of chunks.
// - otherwise (prefill, other head dims): rows padded by one 16-byte chunk, so consecutive rows
//   start 4 banks apart (odd rows straddle sectors).
template <class S, int STAGES_, int KV_TILE_, int NUM_THREADS_, bool SWIZZLE_>
struct RingTraits : S {
  enum : int {
    STAGES = STAGES_,
    KV_TILE = KV_TILE_,
    NUM_THREADS = NUM_THREADS_,
    KV_SWIZZLE = SWIZZLE_ ? 1 : 0,
    ROW_QK = SWIZZLE_ ? S::HEAD_DIM_QK : S::HEAD_DIM_QK + S::KV_VEC,
    ROW_VO = SWIZZLE_ ? S::HEAD_DIM_VO : S::HEAD_DIM_VO + S::KV_VEC,
  };
  static_assert(STAGES_ >= 2, "the ring needs two slots");
  static_assert(!SWIZZLE_ || (S::HEAD_DIM_QK % 64 == 0 && S::HEAD_DIM_VO % 64 == 0), "the swizzled ring needs rows of whole 128-byte lines");
  static_assert(NUM_THREADS_ % 32 == 0 && NUM_THREADS_ <= 1024, "a CTA is whole warps, at most 1024 threads");
};

// Decode on CUDA cores (decode_simt.cuh): threads (tx, ty, tz) = (BDX along the head dim, the
// GROUP query heads, BDZ groups splitting each tile of BDZ * TILE_PER_Z keys).
template <class S, int BDX_, int BDZ_, int TILE_PER_Z_, int STAGES_, int NV_, int MIN_CTAS_, bool SWIZZLE_>
struct DecodeSimtTraits : RingTraits<S, STAGES_, BDZ_ * TILE_PER_Z_, BDX_ * S::GROUP * BDZ_, SWIZZLE_> {
  using Work = DecodeWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, DecodeWork>;
  enum : int { BDX = BDX_, BDZ = BDZ_, TILE_PER_Z = TILE_PER_Z_, NV = NV_, MIN_CTAS = MIN_CTAS_ };
};

// Decode on tensor cores (decode_mma.cuh): NUM_WARPS warps, 16 keys each per tile.
template <class S, int WARPS_, int STAGES_, int MIN_CTAS_, bool SWIZZLE_>
struct DecodeMmaTraits : RingTraits<S, STAGES_, 16 * WARPS_, 32 * WARPS_, SWIZZLE_> {
  using Work = DecodeWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, DecodeWork>;
  enum : int { NUM_WARPS = WARPS_, MIN_CTAS = MIN_CTAS_ };
};

// Prefill on sm80 tensor cores (prefill_sm80.cuh): NUM_WARPS warps of MTILES 16-row blocks.
template <class S, int WARPS_, int MTILES_, int KV_TILE_, int STAGES_, int MIN_CTAS_>
struct PrefillSm80Traits : RingTraits<S, STAGES_, KV_TILE_, 32 * WARPS_, false> {
  using Work = PrefillWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, PrefillWork>;
  enum : int { NUM_WARPS = WARPS_, MTILES = MTILES_, ROWS = 16 * MTILES_ * WARPS_, MIN_CTAS = MIN_CTAS_ };
  static_assert(KV_TILE_ % 16 == 0, "KV_TILE must be a multiple of 16");
};

// Prefill on Hopper (prefill_sm90.cuh): a producer warpgroup and two consumer warpgroups of 64
// query rows, KV_TILE keys per tile (a wgmma N: 64 or 128), a STAGES-deep mbarrier ring.
template <class S, int KV_TILE_, int STAGES_>
struct PrefillSm90Traits : S {
  using Work = PrefillWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, PrefillWork>;
  enum : int { KV_TILE = KV_TILE_, STAGES = STAGES_, NUM_THREADS = 384, ROWS = 128, MIN_CTAS = 1 };
  static_assert(STAGES_ >= 2, "the ring needs two slots");
};


// ---- the variant: params struct and hooks, emitted from its typed tree
// Declared from Rust's layout (src/spec/params.rs `param_layout`): fields, types and order are
// one definition. Every member's size is asserted and so is the struct's, with explicit padding,
// so the compiler adds none and every offset is Rust's (src/abi.rs, StructLayout).
struct Params {
  float u_soft_cap;  // offset 0
  static_assert(sizeof(float) == 4, "Params::u_soft_cap has another size in src/spec/params.rs");
  int u_window;  // offset 4
  static_assert(sizeof(int) == 4, "Params::u_window has another size in src/spec/params.rs");
};
// The kernel argument: Params padded to the fixed-size blob Rust passes (src/jit/render.rs).
union ParamsArg {
  Params p;
  unsigned long long raw[16];
};
static_assert(sizeof(ParamsArg) == 128, "params blob size differs from Rust");
static_assert(sizeof(Params) == 8, "Params layout differs from Rust (src/spec/params.rs)");


// HAS_MASK: kernels evaluate `mask` per element. 0 when there is none, or when it provably
// follows from kv_range (as here): every kernel already clamps each row to its range.
#define HAS_MASK 0
#define HAS_KV_LO 1
#define HAS_KV_HI 1
#define HAS_SINK 0
// The logits hook factored as unit * raw (src/spec/factor.rs: the unit is the same for every
// score of a launch and proven positive and finite): the prefill loops keep raw scores and fold
// the unit into exp2. 0 when it has no such factor (or without softmax normalisation).
// (ATTNFORGE_NVRTC_FLAGS=-DAF_UNFACTORED: the hook whole, for measurements.)
#ifdef AF_UNFACTORED
#define LOGITS_FACTORED 0
#else
#define LOGITS_FACTORED 0
#endif
// The factored hook's raw values proven within [LO, HI] for every score (src/spec/factor.rs
// `raw_bounds`, widened for f32): the prefill loops may then fix the row max (prefill_rows.cuh).
#define LOGITS_RAW_BOUNDED 0
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

// softmax.cuh — the softmax state every main loop keeps per query row: the running max m (in
// the loop's units), the denominator d and the weighted sum o; how a row's state moves when a
// tile raises its max; how partial states (of thread groups, warps or KV chunks) combine; and
// how a finished row becomes an output — with the sink added exactly once, wherever the row
// finishes (an unsplit work item, or merge_states for a split one).
//
// Semantics (src/reference/mod.rs): a row with nothing visible keeps m = -inf and gives o = 0,
// lse = -inf; a NaN logit makes its row NaN (af_fmax propagates it into m).

// e^(a - b) in the exp2 form the loops use.
__device__ __forceinline__ float af_exp_diff(float a, float b) { return exp2f((a - b) * AF_LOG2E); }

// The eager online update of decode: when a tile moves a row's max from m_old to m_new, its o
// and d scale by af_rescale, and a logit l weighs af_weight(l, m_new). A row with nothing
// visible yet (m_new = -inf) keeps its zero state: scale 1, weights 0.
__device__ __forceinline__ float af_rescale(float m_old, float m_new) { return m_new == -AF_INF ? 1.f : af_exp_diff(m_old, m_new); }
__device__ __forceinline__ float af_weight(float l, float m) { return m == -AF_INF ? 0.f : af_exp_diff(l, m); }

// The lazy update of prefill: a row's running max moves only when a score exceeds it by more
// than AF_MAX_SLACK (log2 units), so p = exp2((s - m) * exp_scale) stays below 2^AF_MAX_SLACK
// (exact in f32 and in the bf16/f16 P operand); the LSE uses the same m, so the result is
// unchanged. A tunable (ATTNFORGE_NVRTC_FLAGS=-DAF_MAX_SLACK=…).
#ifndef AF_MAX_SLACK
#define AF_MAX_SLACK 8.f
#endif
// AF_FIXED_MAX=0 (a developer's NVRTC flag, for A/B runs): no fixed max for bounded logits
// (prefill_rows.cuh); every row keeps the lazy running max.
#ifndef AF_FIXED_MAX
#define AF_FIXED_MAX 1
#endif
// The exponent base of a row whose max (in the loop's units) is m: 0 while nothing is visible.
__device__ __forceinline__ float af_lazy_base(float m, float exp_scale) { return m == -AF_INF ? 0.f : m * exp_scale; }

// 2^x on the FMA pipe instead of the MUFU (x < 2^7; x < -127 and -inf give 0, NaN stays NaN):
// floor(x) by a round-down add of 1.5 * 2^23 (it lands in the sum's low mantissa bits), 2^frac by
// a degree-3 polynomial (relative error 8.6e-5, our own weighted least-squares fit, far below the
// bf16/f16 rounding of P), and 2^floor(x) built as float bits: ten FMA/ALU instructions against
// one MUFU.EX2 (tier 2 `hopper::the_fma_exp2_…` holds it to f64 and to exp2f).
__device__ __forceinline__ float af_exp2_fma(float x) {
  const float t = __fadd_rd(x, 12582912.f);
  const float f = x - (t - 12582912.f);
  const float q = fmaf(fmaf(fmaf(0.0770652145f, f, 0.227646992f), f, 0.695116341f), f, 1.f);
  const float r = q * __int_as_float((__float_as_int(t) << 23) + 0x3f800000);
  return x < -127.f ? 0.f : r;
}
// Of every 4 column tiles of 8 keys, how many a lazy softmax update exponentiates with
// af_exp2_fma (a developer flag, ATTNFORGE_NVRTC_FLAGS=-DAF_EXP2_POLY=n; 0, the default: none).
// Measured on the H200 (sm90 loop, 16K d 128, one call, TFLOP/s for n = 0 / 1 / 2 / 3 / 4): soft
// cap 482 / 469 / 431 / 419 / 387, causal 623 / 578 / — / 460 / 433, non-causal 580 / 544 / — /
// 445 / 424 (BENCHMARKS.md, twelfth session). The soft cap's 23% is not the
// MUFU's 16 ops per clock (one tanh and one exp2 per score): the extra FMA-pipe instructions
// slowed every variant, so the loop is bound by instruction issue, not by the MUFU.
#ifndef AF_EXP2_POLY
#define AF_EXP2_POLY 0
#endif
// The lazy update's exponential of column tile n.
__device__ __forceinline__ float af_exp2_col(float x, int n) { return AF_EXP2_POLY > 0 && (n & 3) < AF_EXP2_POLY ? af_exp2_fma(x) : exp2f(x); }

// What a split work item stores (no sink: merge_states adds it once): its o normalised (times
// `inv`) and its LSE, M · unit + log D (M in the loop's units, `unit` its logit per unit); a
// chunk that saw nothing stores o = 0 and lse = -inf.
struct SoftmaxPartial {
  float inv;
  float lse;
};
__device__ __forceinline__ SoftmaxPartial af_softmax_partial(bool visible, float M, float unit, float D) {
  return {visible ? 1.f / D : 0.f, visible ? M * unit + logf(D) : -AF_INF};
}

// A finished softmax row: the factor its accumulated o is multiplied by, and its LSE. M is the
// row max as a logit, D the denominator at that max; the sink (one logit per row, the variant's
// `sink` hook) joins the denominator here, once.
struct SoftmaxFinal {
  float scale;
  float lse;
};
__device__ __forceinline__ SoftmaxFinal af_softmax_final(float M, float D, float sm_scale, int q_pos, int qo_head, int kv_head, int req, int q_len, int kv_len,
                                                         const Params& p) {
  float mf = M, df = D;
#if HAS_SINK
  const float sk = af_sink(0.f, sm_scale, q_pos, 0, qo_head, kv_head, req, q_len, kv_len, p);
  mf = fmaxf(M, sk);
  df = D * af_exp_diff(M, mf) + af_exp_diff(sk, mf);
#else
  (void)sm_scale, (void)q_pos, (void)qo_head, (void)kv_head, (void)req, (void)q_len, (void)kv_len, (void)p;
#endif
  return {af_exp_diff(M, mf) / df, mf + logf(df)};
}

// Combines the N partial states (m, d, o) of query row `row` that a CTA's thread groups or warps
// left in shared memory ([N][GROUP] m and d, then [N][GROUP][HEAD_DIM_VO] o) for output dims
// [c0, c0 + VEC): the combined max M, denominator D (without normalisation: the count of parts
// that saw a key) and output O. Returns whether any part saw a visible key.
template <class Tr, int N>
__device__ __forceinline__ bool softmax_combine8(const float* red_m, const float* red_d, const float* red_o, int row, int c0, float& M, float& D, float (&O)[Tr::VEC]) {
  constexpr int GROUP = Tr::GROUP, HEAD_DIM_VO = Tr::HEAD_DIM_VO, VEC = Tr::VEC;
  M = -AF_INF;
  D = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) O[e] = 0.f;
#if NORMALIZE_SOFTMAX
  for (int z = 0; z < N; ++z) M = af_fmax(M, red_m[z * GROUP + row]);
  if (M == -AF_INF) return false;
  for (int z = 0; z < N; ++z) {
    const float f = af_exp_diff(red_m[z * GROUP + row], M);
    D += red_d[z * GROUP + row] * f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] += red_o[(z * GROUP + row) * HEAD_DIM_VO + c0 + e] * f;
  }
  return true;
#else
  for (int z = 0; z < N; ++z) {
    D += red_d[z * GROUP + row];
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] += red_o[(z * GROUP + row) * HEAD_DIM_VO + c0 + e];
  }
  return D > 0.f;
#endif
}

// kv_ring.cuh — the K/V ring every main loop streams its keys through: the page walk (a key's
// K and V rows in global memory), the 16-byte cp.async copies into shared memory, and the
// STAGES-deep located ring with one barrier per tile. The load policy of a KV element type
// lives here (2-byte elements today; an 8-bit KV is a new copy and conversion policy, not a
// new main loop).

// Element offset, inside its row, of 16-byte chunk `ch` of ring row `row` (the row's index in
// its ring slot): swizzled or padded rows (traits.cuh).
template <class Tr>
__device__ __forceinline__ int kv_chunk(int row, int ch) {
  if constexpr (Tr::KV_SWIZZLE) {
    return (ch ^ (row & 7)) * Tr::KV_VEC;
  } else {
    return ch * Tr::KV_VEC;
  }
}

// Where one key of a tile lives: its K and V rows in global memory, or k = nullptr for a key
// past the span (its copies zero-fill).
template <typename KV>
struct __align__(16) KeyRows {
  const KV* k;
  const KV* v;
};

// The page holding KV position `pos` (-1 past `hi`): the one global load of the page walk, so
// that a caller can issue it early and consume it a whole tile later.
template <class A>
__device__ __forceinline__ int kv_page(const A& a, int pos, int hi, int page_begin) {
  if (pos > hi) return -1;
  const int pi = a.page_shift >= 0 ? pos >> a.page_shift : pos / a.page_size;
  return a.kv_indices[page_begin + pi];
}

// The slot of KV position `pos` in its page.
template <class A>
__device__ __forceinline__ int kv_slot(const A& a, int pos) {
  return a.page_shift >= 0 ? pos & (a.page_size - 1) : pos % a.page_size;
}

// The K and V rows of position `pos` on `page` (nullptr when page < 0).
template <typename KV, class A>
__device__ __forceinline__ KeyRows<KV> kv_rows(const A& a, int pos, int page, int kv_head) {
  KeyRows<KV> r = {nullptr, nullptr};
  if (page >= 0) {
    const int slot = kv_slot(a, pos);
    r.k = a.k + (long long)kv_head * a.k_head_stride + page * a.k_page_stride + (long long)slot * a.k_slot_stride;
    r.v = a.v + (long long)kv_head * a.v_head_stride + page * a.v_page_stride + (long long)slot * a.v_slot_stride;
  }
  return r;
}

// Writes the KeyRows of the KV_TILE keys from `tile_start` into `rows` (one ring slot): the page
// walk is done once per key instead of once per 16-byte copy. Keys past `hi` get nullptr.
template <class Tr, class A>
__device__ __forceinline__ void kv_locate(const A& a, KeyRows<typename Tr::DTypeKV>* rows, int tile_start, int hi, int page_begin, int kv_head, int tid) {
  for (int j = tid; j < Tr::KV_TILE; j += Tr::NUM_THREADS) {
    const int pos = tile_start + j;
    rows[j] = kv_rows<typename Tr::DTypeKV>(a, pos, kv_page(a, pos, hi, page_begin), kv_head);
  }
}

// The general copy loop of kv_issue for one of K (`v` false) or V: NCH 16-byte chunks per key,
// shared-memory rows of ROW elements; `fallback` is a valid address for zero-filled copies.
template <class Tr, int NCH, int ROW>
__device__ __forceinline__ void kv_issue_rows(typename Tr::DTypeKV* dst, const KeyRows<typename Tr::DTypeKV>* rows, bool v, const typename Tr::DTypeKV* fallback, int tid) {
#pragma unroll 4
  for (int c = tid; c < Tr::KV_TILE * NCH; c += Tr::NUM_THREADS) {
    const int j = c / NCH, ch = c % NCH;
    const KeyRows<typename Tr::DTypeKV> r = rows[j];
    const bool ok = r.k != nullptr;
    af_cp_async16(dst + j * ROW + kv_chunk<Tr>(j, ch), ok ? (v ? r.v : r.k) + ch * Tr::KV_VEC : fallback, ok);
  }
}

// Issues the cp.async copies of one located tile into ring slot `stage` (K rows of ROW_QK
// elements, V rows of ROW_VO). `full`: every key of the tile is in the span, so no copy
// zero-fills.
template <class Tr, class A>
__device__ __forceinline__ void kv_issue(const A& a, typename Tr::DTypeKV* k_smem, typename Tr::DTypeKV* v_smem, const KeyRows<typename Tr::DTypeKV>* rows, int stage, int tid, bool full) {
  using DTypeKV = typename Tr::DTypeKV;
  constexpr int KV_TILE = Tr::KV_TILE, NUM_THREADS = Tr::NUM_THREADS, ROW_QK = Tr::ROW_QK, ROW_VO = Tr::ROW_VO, VEC = Tr::KV_VEC;
  DTypeKV* ks = k_smem + stage * KV_TILE * ROW_QK;
  DTypeKV* vs = v_smem + stage * KV_TILE * ROW_VO;
  constexpr int KCH = Tr::HEAD_DIM_QK / VEC, VCH = Tr::HEAD_DIM_VO / VEC;
  constexpr int RSTEP = NUM_THREADS / KCH;  // keys per pass of the block
  if (KCH == VCH && NUM_THREADS % KCH == 0 && KV_TILE % RSTEP == 0) {
    // A thread copies column `ch` of keys j0, j0 + RSTEP, ...: a fixed trip count, immediate
    // shared-memory offsets (RSTEP a multiple of 8 keeps the swizzle's row term), and one key
    // location for both copies.
    const int ch = tid % KCH, j0 = tid / KCH;
    const unsigned k_base = (unsigned)__cvta_generic_to_shared(ks);
    const unsigned v_base = (unsigned)__cvta_generic_to_shared(vs);
    constexpr int EB = (int)sizeof(DTypeKV);
    if (full) {
      // Every tile but a span's last: no null test, select or source size per copy.
#pragma unroll
      for (int i = 0; i < KV_TILE / RSTEP; ++i) {
        const int j = j0 + i * RSTEP;
        const KeyRows<DTypeKV> r = rows[j];
        af_cp_async16_s(k_base + (j * ROW_QK + kv_chunk<Tr>(j, ch)) * EB, r.k + ch * VEC);
        af_cp_async16_s(v_base + (j * ROW_VO + kv_chunk<Tr>(j, ch)) * EB, r.v + ch * VEC);
      }
    } else {
#pragma unroll
      for (int i = 0; i < KV_TILE / RSTEP; ++i) {
        const int j = j0 + i * RSTEP;
        const KeyRows<DTypeKV> r = rows[j];
        const bool ok = r.k != nullptr;
        af_cp_async16_s(k_base + (j * ROW_QK + kv_chunk<Tr>(j, ch)) * EB, ok ? r.k + ch * VEC : a.k, ok);
        af_cp_async16_s(v_base + (j * ROW_VO + kv_chunk<Tr>(j, ch)) * EB, ok ? r.v + ch * VEC : a.v, ok);
      }
    }
  } else {
    kv_issue_rows<Tr, KCH, ROW_QK>(ks, rows, false, a.k, tid);
    kv_issue_rows<Tr, VCH, ROW_VO>(vs, rows, true, a.v, tid);
  }
}

// A STAGES_-deep cp.async ring with one barrier per tile. Tiles are located (shared key rows
// written by `locate(slot, t, pre)`) a full ring ahead of their copies (`issue(slot, t)`);
// `prefetch(t)` starts tile t's page-index loads before a compute and returns what `locate`
// needs, so their latency hides behind it. Slot t % STAGES_ holds tile t's data and rows.
//
// Iteration t: wait for tile t's copies; barrier; issue tile t + STAGES_ - 1 into the slot tile
// t - 1 used; compute tile t; locate tile t + STAGES_ into slot t % STAGES_. The barrier is the
// only one: it publishes tile t's data and the rows located at the end of iteration t - 1, and
// it orders every warp's compute of tile t - 1 before the copies that overwrite its slot. Rows
// of slot t % STAGES_ are rewritten while other warps may still compute tile t, which reads data,
// not rows; they are next read by issue(t + STAGES_), after the following barrier. Every thread
// of the block must call it.
template <int STAGES_, typename Prefetch, typename Locate, typename Issue, typename Compute>
__device__ __forceinline__ void af_ring_located(int num_tiles, Prefetch&& prefetch, Locate&& locate, Issue&& issue, Compute&& compute) {
  static_assert(STAGES_ >= 2, "the ring needs two slots");
#pragma unroll
  for (int s = 0; s < STAGES_; ++s)
    if (s < num_tiles) locate(s, s, prefetch(s));
  __syncthreads();
#pragma unroll
  for (int s = 0; s < STAGES_ - 1; ++s) {
    if (s < num_tiles) issue(s, s);
    af_cp_async_commit();
  }
  for (int t = 0; t < num_tiles; ++t) {
    af_cp_async_wait<STAGES_ - 2>();
    __syncthreads();
    const int next = t + STAGES_ - 1;
    if (next < num_tiles) issue(next % STAGES_, next);
    af_cp_async_commit();
    const bool relocate = t + STAGES_ < num_tiles;
    const auto pre = prefetch(relocate ? t + STAGES_ : t);
    compute(t % STAGES_, t);
    if (relocate) locate(t % STAGES_, t + STAGES_, pre);
  }
  af_cp_async_wait<0>();
  __syncthreads();  // callers reuse the ring's shared memory
}

// Streams the K/V tiles of positions [lo, hi] of one KV head through the traits' located ring
// and calls `compute(stage, t)` on each once it has landed (tile t starts at lo + t * KV_TILE;
// keys past hi are zero-filled). `rows` is the ring's shared KeyRows. A thread locates key
// `tid` of a tile when the tile fits the block (its page index prefetched a tile ahead),
// otherwise the block walks the keys in turn. Every thread of the block must call it.
template <class Tr, class A, typename Compute>
__device__ __forceinline__ void kv_stream(const A& a, typename Tr::DTypeKV* k_smem, typename Tr::DTypeKV* v_smem, KeyRows<typename Tr::DTypeKV> (*rows)[Tr::KV_TILE], int lo,
                                          int hi, int page_begin, int kv_head, int tid, Compute&& compute) {
  constexpr int KV_TILE = Tr::KV_TILE;
  constexpr bool ONE_KEY = KV_TILE <= Tr::NUM_THREADS;
  auto prefetch = [&](int t) { return ONE_KEY ? kv_page(a, lo + t * KV_TILE + tid, tid < KV_TILE ? hi : -1, page_begin) : 0; };
  auto locate = [&](int slot, int t, int page) {
    if (ONE_KEY) {
      if (tid < KV_TILE) rows[slot][tid] = kv_rows<typename Tr::DTypeKV>(a, lo + t * KV_TILE + tid, page, kv_head);
    } else {
      kv_locate<Tr>(a, rows[slot], lo + t * KV_TILE, hi, page_begin, kv_head, tid);
    }
  };
  auto issue = [&](int slot, int t) { kv_issue<Tr>(a, k_smem, v_smem, rows[slot], slot, tid, lo + (t + 1) * KV_TILE - 1 <= hi); };
  const int num_tiles = hi >= lo ? (hi - lo + KV_TILE) / KV_TILE : 0;
  af_ring_located<Tr::STAGES>(num_tiles, prefetch, locate, issue, compute);
}

// scheduler.cuh — from a CTA to its work: which items a CTA runs (the persistent stride loop of
// decode, one item per CTA for prefill), and a decode item's request and KV span.

// Runs `body(w, kv_head)` for every decode work item of this CTA. The plan's header is
// [num_work, num_merge, stride, 0]: CTA c < stride runs items c, c + stride, … (one item per CTA,
// or several in a balanced plan); a fixed grid's spare CTAs exit. CTAs are numbered KV head first
// (the grid is [grid, kv_heads]), so the heads of one item start side by side: on the H200,
// B64-B256 0.7-0.9% faster and a skewed batch 12% faster than numbering items first.
template <class A, typename Body>
__device__ __forceinline__ void af_decode_schedule(const A& a, Body&& body) {
  const int stride = a.num_work[2];
  const int linear = blockIdx.x + blockIdx.y * gridDim.x;
  const int cta = linear / gridDim.y, kv_head = linear % gridDim.y;
  if (cta >= stride) return;
  for (int w = cta; w < a.num_work[0]; w += stride) {
    body(w, kv_head);
    __syncthreads();  // the next item reuses the shared memory
  }
}

// What a decode CTA knows about its request: where its query token and pages are, the token's
// position, and the KV span it reads (the work item's chunk narrowed by kv_range).
struct DecodeRequest {
  int req, token, q_len, page_begin, kv_len, q_pos, lo, hi;
};

template <class Tr>
__device__ __forceinline__ DecodeRequest decode_request(const typename Tr::Args& a, const Params& p, const DecodeWork& item, int kv_head) {
  constexpr int GROUP = Tr::GROUP;
  DecodeRequest r;
  r.req = item.req;
  r.token = a.qo_indptr[r.req];
  r.q_len = a.qo_indptr[r.req + 1] - r.token;
  r.page_begin = a.kv_indptr[r.req];
  const int n_pages = a.kv_indptr[r.req + 1] - r.page_begin;
  r.kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[r.req];
  r.q_pos = r.kv_len - r.q_len;  // the request's one query token (index q_len - 1 = 0)
  r.lo = item.kv_begin;
  r.hi = item.kv_end - 1;
#if HAS_KV_LO
  r.lo = max(r.lo, af_kv_lo(0.f, a.sm_scale, r.q_pos, 0, kv_head * GROUP, kv_head, r.req, r.q_len, r.kv_len, p));
#endif
#if HAS_KV_HI
  r.hi = min(r.hi, af_kv_hi(0.f, a.sm_scale, r.q_pos, 0, kv_head * GROUP, kv_head, r.req, r.q_len, r.kv_len, p));
#endif
  (void)GROUP, (void)p, (void)kv_head;
  return r;
}

// epilogue.cuh — writing a finished decode row: the f32 partial of a split work item (for
// merge_states), or the output and LSE of an unsplit one, with the sink added there (once).

// Writes VEC output dims [c0, c0 + VEC) of one query head from its combined state (M, D, O).
// The thread with c0 == 0 writes the LSE.
template <class Tr>
__device__ __forceinline__ void decode_write8(const typename Tr::Args& a, const Params& p, const DecodeWork& item, int token, int qo_head, int kv_head, int req, int q_pos,
                                              int q_len, int kv_len, bool visible, float M, float D, float (&O)[Tr::VEC], int c0) {
  constexpr int HEAD_DIM_VO = Tr::HEAD_DIM_VO, VEC = Tr::VEC;
  float lse_out;
  if (item.partial >= 0) {
#if NORMALIZE_SOFTMAX
    // af_softmax_partial's rule, spelled out: the normalised o, then the LSE. (Through the
    // helper, NVVM schedules the LSE first and the CUDA-core kernels' code moves by 3%, from
    // the code measured in BENCHMARKS.md.)
    const float inv = visible ? 1.f / D : 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] *= inv;
    lse_out = visible ? M + logf(D) : -AF_INF;
#else
    lse_out = visible ? 0.f : -AF_INF;
#endif
    const long long row = (long long)item.partial * a.num_qo_heads + qo_head;
#pragma unroll
    for (int e = 0; e < VEC; ++e) a.part_o[row * HEAD_DIM_VO + c0 + e] = O[e];
    if (c0 == 0) a.part_lse[row] = lse_out;
    return;
  }
#if NORMALIZE_SOFTMAX
  if (visible) {
    const SoftmaxFinal f = af_softmax_final(M, D, a.sm_scale, q_pos, qo_head, kv_head, req, q_len, kv_len, p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] *= f.scale;
    lse_out = f.lse;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] = 0.f;
    lse_out = -AF_INF;
  }
#else
  (void)p, (void)kv_head, (void)req, (void)q_pos, (void)q_len, (void)kv_len;
  lse_out = visible ? 0.f : -AF_INF;
#endif
  const long long row = (long long)token * a.num_qo_heads + qo_head;
  af_store8(a.o + row * HEAD_DIM_VO + c0, O);
  if (c0 == 0) a.lse[row] = lse_out;
}

// mma.cuh — tensor-core building blocks for sm_80+: ldmatrix, mma.sync m16n8k16 with f32
// accumulation, and packing two floats into one register of the KV type.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4g + t): A a0a1 (row g, cols 2t, 2t+1), a2a3
// (row g+8), a4a5 (row g, cols +8), a6a7 (row g+8, cols +8); B b0b1 (k 2t, 2t+1; col g), b2b3
// (k +8); C c0c1 (row g, cols 2t, 2t+1), c2c3 (row g+8). ldmatrix.x4: lane l gives the address of
// row l % 8 of matrix l / 8; register j receives matrix j's (row g, cols 2t, 2t+1).

// From a 32-bit shared-memory address: callers that form `base + constant` get the constant
// folded into the instruction instead of an address computed per call.
__device__ __forceinline__ void af_ldmatrix_x4_s(unsigned (&r)[4], unsigned s) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void af_ldmatrix_x4_trans_s(unsigned (&r)[4], unsigned s) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void af_ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  af_ldmatrix_x4_s(r, (unsigned)__cvta_generic_to_shared(smem));
}

__device__ __forceinline__ void af_ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
  af_ldmatrix_x4_trans_s(r, (unsigned)__cvta_generic_to_shared(smem));
}

template <typename T>
__device__ __forceinline__ void af_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void af_mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void af_mma16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats to one register of two 16-bit values, `lo` in the low half.
template <typename T>
__device__ __forceinline__ unsigned af_pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned af_pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <>
__device__ __forceinline__ unsigned af_pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// Zeroes a [A][B][4] array of MMA accumulator fragments.
template <int A, int B>
__device__ __forceinline__ void af_zero_frags(float (&x)[A][B][4]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) x[i][j][k] = 0.f;
}

// decode_mma.cuh — batch decode on tensor cores, for GQA groups of 2 to 16.
//
// The query heads of one KV head are the rows of an m16n8k16 MMA, so each K/V element is read
// from shared memory once per warp by ldmatrix and fed to the tensor cores as stored; the CUDA
// cores only run the hooks and the softmax. (The CUDA-core loop in decode_simt.cuh converts every
// element to f32 once per query head: at GQA 4 it was issue-bound at ~77% of the copy ceiling.)
//
// NUM_WARPS warps; each takes 16 keys of every KV_TILE = 16 * NUM_WARPS key tile:
//   S[16 x 16]   = Q[16 x D] · K^T            (D/16 k-steps x 2 n-tiles)
//   online softmax on the S fragments          (row max across the 4 lanes of a quad)
//   O[16 x DVO] += P[16 x 16] · V[16 x DVO]    (1 k-step x DVO/8 n-tiles, P rounded to the KV type)
// then the warps' states combine through shared memory (softmax.cuh) and the epilogue
// (epilogue.cuh) writes the output or a partial state, as decode_simt.cuh does.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4g + t): A a0a1 (row g, cols 2t, 2t+1), a2a3
// (row g+8), a4a5 (row g, cols +8), a6a7 (row g+8, cols +8); B b0b1 (k 2t, 2t+1; col g), b2b3
// (k +8); C c0c1 (row g, cols 2t, 2t+1), c2c3 (row g+8).
//
// Needs: traits (DecodeMmaTraits, Q and KV of one type), the parts, mma.cuh, and the variant's
// hooks.

template <class Tr>
struct DecodeMma {
  using Args = typename Tr::Args;
  using DTypeQ = typename Tr::DTypeQ;
  using DTypeKV = typename Tr::DTypeKV;
  enum : int { HEAD_DIM_QK = Tr::HEAD_DIM_QK, HEAD_DIM_VO = Tr::HEAD_DIM_VO, GROUP = Tr::GROUP };
  enum : int { NUM_WARPS = Tr::NUM_WARPS, STAGES = Tr::STAGES, KV_TILE = Tr::KV_TILE, NUM_THREADS = Tr::NUM_THREADS };
  enum : int { ROW_QK = Tr::ROW_QK, ROW_VO = Tr::ROW_VO, VEC = Tr::VEC };
  static_assert(af_same<DTypeQ, DTypeKV>::value, "the MMA main loop multiplies Q and K of one type");

  // Work item w of the list (the caller loops a CTA over its items); `req < 0` pads a balanced
  // plan's list and does nothing.
    static __device__ __forceinline__ void body(const Args& a, const Params& p, int w, int kv_head) {
    static_assert(GROUP >= 1 && GROUP <= 16, "the MMA path holds at most 16 query heads per KV head");
    static_assert(HEAD_DIM_QK % 16 == 0 && HEAD_DIM_VO % 16 == 0, "head dims must be multiples of 16");
    const DecodeWork item = a.work[w];
    if (item.req < 0) return;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4, mi = lane / 8;
    const DecodeRequest r = decode_request<Tr>(a, p, item, kv_head);
    const int req = r.req, token = r.token, q_len = r.q_len, page_begin = r.page_begin, kv_len = r.kv_len, q_pos = r.q_pos;
    const int lo = r.lo, hi = r.hi;
    const float sm_scale = a.sm_scale;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
    DTypeKV* v_smem = k_smem + STAGES * KV_TILE * ROW_QK;
    __shared__ KeyRows<DTypeKV> key_rows[STAGES][KV_TILE];

    // Rows g and g + 8 of the MMA are query heads kv_head * GROUP + row; rows >= GROUP are padding.
    const int row0 = g, row1 = g + 8;
    const bool valid0 = row0 < GROUP, valid1 = row1 < GROUP;
    const int head0 = kv_head * GROUP + (valid0 ? row0 : 0);
    const int head1 = kv_head * GROUP + (valid1 ? row1 : 0);

    constexpr int KSTEPS = HEAD_DIM_QK / 16;
    unsigned qa[KSTEPS][4];
    {
      const DTypeQ* q0 = a.q + ((long long)token * a.num_qo_heads + head0) * HEAD_DIM_QK;
      const DTypeQ* q1 = a.q + ((long long)token * a.num_qo_heads + head1) * HEAD_DIM_QK;
  #pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        const int c = kk * 16 + 2 * t4;
        qa[kk][0] = valid0 ? *reinterpret_cast<const unsigned*>(q0 + c) : 0u;
        qa[kk][1] = valid1 ? *reinterpret_cast<const unsigned*>(q1 + c) : 0u;
        qa[kk][2] = valid0 ? *reinterpret_cast<const unsigned*>(q0 + c + 8) : 0u;
        qa[kk][3] = valid1 ? *reinterpret_cast<const unsigned*>(q1 + c + 8) : 0u;
      }
    }

    constexpr int DN = HEAD_DIM_VO / 8;
    float oacc[DN][4];
  #pragma unroll
    for (int dn = 0; dn < DN; ++dn)
  #pragma unroll
      for (int j = 0; j < 4; ++j) oacc[dn][j] = 0.f;
    float m0 = -AF_INF, m1 = -AF_INF, d0 = 0.f, d1 = 0.f;
    bool any0 = false, any1 = false;
    (void)any0, (void)any1;  // read only without softmax normalisation

    kv_stream<Tr>(a, k_smem, v_smem, key_rows, lo, hi, page_begin, kv_head, tid, [&](int stage, int t) {
      const int key0 = lo + t * KV_TILE + warp * 16;

      // S = Q K^T for this warp's 16 keys: two n-tiles of 8 keys.
      float s[2][4];
  #pragma unroll
      for (int nt = 0; nt < 2; ++nt)
  #pragma unroll
        for (int j = 0; j < 4; ++j) s[nt][j] = 0.f;
      const DTypeKV* ks = k_smem + (stage * KV_TILE + warp * 16) * ROW_QK;
  #pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        unsigned b[4];
        af_ldmatrix_x4(b, ks + ((mi >> 1) * 8 + (lane & 7)) * ROW_QK + kv_chunk<Tr>(lane, kk * 2 + (mi & 1)));
        af_mma16816<DTypeKV>(s[0], qa[kk], b[0], b[1]);
        af_mma16816<DTypeKV>(s[1], qa[kk], b[2], b[3]);
      }

      // Hooks: logits for visible (row, key) pairs; -inf (softmax) or 0 (none) elsewhere.
  #pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
  #pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool upper = j >= 2;
          const int pos = key0 + nt * 8 + 2 * t4 + (j & 1);
          const int head = upper ? head1 : head0;
          bool vis = (upper ? valid1 : valid0) && pos <= hi;
  #if HAS_MASK
          vis = vis && af_mask(0.f, sm_scale, q_pos, pos, head, kv_head, req, q_len, kv_len, p);
  #endif
  #if NORMALIZE_SOFTMAX
          s[nt][j] = vis ? af_logits(s[nt][j], sm_scale, q_pos, pos, head, kv_head, req, q_len, kv_len, p) : -AF_INF;
  #else
          s[nt][j] = vis ? af_logits(s[nt][j], sm_scale, q_pos, pos, head, kv_head, req, q_len, kv_len, p) : 0.f;
          if (upper) any1 = any1 || vis; else any0 = any0 || vis;
  #endif
        }
      }

  #if NORMALIZE_SOFTMAX
      float mx0 = af_fmax(af_fmax(s[0][0], s[0][1]), af_fmax(s[1][0], s[1][1]));
      float mx1 = af_fmax(af_fmax(s[0][2], s[0][3]), af_fmax(s[1][2], s[1][3]));
      mx0 = af_fmax(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = af_fmax(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = af_fmax(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = af_fmax(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = af_fmax(m0, mx0), mn1 = af_fmax(m1, mx1);
      // A row with nothing visible yet keeps its zero state (softmax.cuh).
      const float sc0 = af_rescale(m0, mn0), sc1 = af_rescale(m1, mn1);
  #pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = af_weight(s[nt][0], mn0);
        s[nt][1] = af_weight(s[nt][1], mn0);
        s[nt][2] = af_weight(s[nt][2], mn1);
        s[nt][3] = af_weight(s[nt][3], mn1);
      }
      d0 = d0 * sc0 + (s[0][0] + s[0][1] + s[1][0] + s[1][1]);
      d1 = d1 * sc1 + (s[0][2] + s[0][3] + s[1][2] + s[1][3]);
  #pragma unroll
      for (int dn = 0; dn < DN; ++dn) {
        oacc[dn][0] *= sc0;
        oacc[dn][1] *= sc0;
        oacc[dn][2] *= sc1;
        oacc[dn][3] *= sc1;
      }
      m0 = mn0;
      m1 = mn1;
  #endif

      // O += P V: P's C fragments are exactly the A fragment of one k-step of 16 keys.
      unsigned pa[4] = {af_pack2<DTypeKV>(s[0][0], s[0][1]), af_pack2<DTypeKV>(s[0][2], s[0][3]),
                        af_pack2<DTypeKV>(s[1][0], s[1][1]), af_pack2<DTypeKV>(s[1][2], s[1][3])};
      const DTypeKV* vs = v_smem + (stage * KV_TILE + warp * 16) * ROW_VO;
  #pragma unroll
      for (int dn2 = 0; dn2 < DN / 2; ++dn2) {
        unsigned b[4];
        af_ldmatrix_x4_trans(b, vs + ((mi & 1) * 8 + (lane & 7)) * ROW_VO + kv_chunk<Tr>(lane, dn2 * 2 + (mi >> 1)));
        af_mma16816<DTypeKV>(oacc[2 * dn2], pa, b[0], b[1]);
        af_mma16816<DTypeKV>(oacc[2 * dn2 + 1], pa, b[2], b[3]);
      }
    });
    __syncthreads();  // the ring is reused for the reduction below

    // Per-warp states of the GROUP real rows → shared memory: [warp][row] m, d, then o.
    float* red_m = reinterpret_cast<float*>(smem_raw);
    float* red_d = red_m + NUM_WARPS * GROUP;
    float* red_o = red_d + NUM_WARPS * GROUP;
  #if NORMALIZE_SOFTMAX
    d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
    d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
    d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
    d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
  #else
    // Reduce the quad's flags: each lane saw different keys of the same rows.
    any0 = (__shfl_xor_sync(0xffffffffu, (int)any0, 1) | __shfl_xor_sync(0xffffffffu, (int)any0, 2) | (int)any0) != 0;
    any1 = (__shfl_xor_sync(0xffffffffu, (int)any1, 1) | __shfl_xor_sync(0xffffffffu, (int)any1, 2) | (int)any1) != 0;
    d0 = any0 ? 1.f : 0.f;
    d1 = any1 ? 1.f : 0.f;
  #endif
    if (valid0) {
      if (t4 == 0) {
        red_m[warp * GROUP + row0] = m0;
        red_d[warp * GROUP + row0] = d0;
      }
  #pragma unroll
      for (int dn = 0; dn < DN; ++dn) {
        red_o[(warp * GROUP + row0) * HEAD_DIM_VO + dn * 8 + 2 * t4] = oacc[dn][0];
        red_o[(warp * GROUP + row0) * HEAD_DIM_VO + dn * 8 + 2 * t4 + 1] = oacc[dn][1];
      }
    }
    if (valid1) {
      if (t4 == 0) {
        red_m[warp * GROUP + row1] = m1;
        red_d[warp * GROUP + row1] = d1;
      }
  #pragma unroll
      for (int dn = 0; dn < DN; ++dn) {
        red_o[(warp * GROUP + row1) * HEAD_DIM_VO + dn * 8 + 2 * t4] = oacc[dn][2];
        red_o[(warp * GROUP + row1) * HEAD_DIM_VO + dn * 8 + 2 * t4 + 1] = oacc[dn][3];
      }
    }
    __syncthreads();

    // Combine the warps: one thread per (row, 8 output dims).
    constexpr int VECS = HEAD_DIM_VO / VEC;
    for (int it = tid; it < GROUP * VECS; it += NUM_THREADS) {
      const int row = it / VECS, c0 = (it % VECS) * VEC;
      float M, D, O[VEC];
      const bool visible = softmax_combine8<Tr, NUM_WARPS>(red_m, red_d, red_o, row, c0, M, D, O);
      decode_write8<Tr>(a, p, item, token, kv_head * GROUP + row, kv_head, req, q_pos, q_len, kv_len, visible, M, D, O, c0);
    }
  }
};

// merge.cuh — merge_states: combine the f32 partials (o, lse) of split requests into the output.
// The merge is associative and commutative; the sink joins the denominator here, once
// (af_softmax_final, softmax.cuh).
//
// Needs: traits (DTypeO, HEAD_DIM_VO), the ABI structs (abi.cu.tera), softmax.cuh, and the variant's hooks.

// Partial weights kept in shared memory per merge item; a longer item recomputes the rest.
#define MERGE_STAGE 256

// Block-wide max (MAX) or sum over whole warps; `red` holds one value per warp.
template <bool MAX>
__device__ __forceinline__ float merge_reduce(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = MAX ? af_fmax(x, y) : x + y;
  }
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < (int)blockDim.x / 32; ++i) r = MAX ? af_fmax(r, red[i]) : r + red[i];
  __syncthreads();  // red is reused by the next reduction
  return r;
}

// One CTA of whole warps (at most 4) per (merge item, qo head) at a time: CTA x merges items
// x, x + gridDim.x, … (a fixed grid is smaller than its list's capacity; otherwise the grid is
// the list). The item's partial LSEs are read in parallel, one per thread, and their weights
// staged in shared memory; each thread then owns head dims tx, tx + blockDim.x, … and sums the
// partials' outputs with 8 loads in flight. Launched right behind the kernel that writes the
// partials (programmatic dependent launch on sm_90+): everything before af_wait_prior_grid
// reads only what the plan upload wrote.
template <class Tr>
__device__ __forceinline__ void merge_item(const MergeArgs<typename Tr::DTypeO>& a, const Params& p, const MergeWork item, float* wgt, float* red) {
  using DTypeO = typename Tr::DTypeO;
  constexpr int HEAD_DIM_VO = Tr::HEAD_DIM_VO;
  const int qo_head = blockIdx.y;
  const int tid = threadIdx.x, nt = blockDim.x;
  const long long H = a.num_qo_heads;
  const float* lse = a.part_lse + (long long)item.first * H + qo_head;

  float M = -AF_INF;
  for (int s = tid; s < item.count; s += nt) M = af_fmax(M, lse[s * H]);  // a NaN partial makes the row NaN
  M = merge_reduce<true>(M, red);
  const long long out_row = (long long)item.token * H + qo_head;
#if NORMALIZE_SOFTMAX
  float W = 0.f;
  for (int s = tid; s < item.count; s += nt) {
    const float e = M != -AF_INF ? exp2f((lse[s * H] - M) * AF_LOG2E) : 0.f;
    if (s < MERGE_STAGE) wgt[s] = e;
    W += e;
  }
  W = merge_reduce<false>(W, red);  // its barrier also publishes wgt
  float lse_total = M != -AF_INF ? M + logf(W) : -AF_INF;
  float final_scale = M != -AF_INF ? 1.f / W : 0.f;
#if HAS_SINK
  if (M != -AF_INF) {
    const int req = item.req;
    const int n_pages = a.kv_indptr[req + 1] - a.kv_indptr[req];
    const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
    const int q_len = a.qo_indptr[req + 1] - a.qo_indptr[req];
    const int q_pos = kv_len - q_len + (item.token - a.qo_indptr[req]);
    // The partials combined are one row at max lse_total and denominator 1.
    const SoftmaxFinal f = af_softmax_final(lse_total, 1.f, a.sm_scale, q_pos, qo_head, qo_head / a.group, req, q_len, kv_len, p);
    final_scale *= f.scale;
    lse_total = f.lse;
  }
#endif
#else
  // Without normalisation the partials add up as they are.
  for (int s = tid; s < item.count && s < MERGE_STAGE; s += nt) wgt[s] = 1.f;
  __syncthreads();
  float lse_total = M != -AF_INF ? 0.f : -AF_INF;
  float final_scale = 1.f;
#endif
  const int staged = min(item.count, MERGE_STAGE);
  const long long step = H * HEAD_DIM_VO;
  const float* po = a.part_o + ((long long)item.first * H + qo_head) * HEAD_DIM_VO;
  for (int dd = tid; dd < HEAD_DIM_VO; dd += nt) {
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < staged; ++s) acc = fmaf(wgt[s], po[s * step + dd], acc);
    for (int s = staged; s < item.count; ++s) {
#if NORMALIZE_SOFTMAX
      const float e = M != -AF_INF ? exp2f((lse[s * H] - M) * AF_LOG2E) : 0.f;
#else
      const float e = 1.f;
#endif
      acc = fmaf(e, po[s * step + dd], acc);
    }
    a.o[out_row * HEAD_DIM_VO + dd] = af_from_float<DTypeO>(acc * final_scale);
  }
  if (tid == 0) a.lse[out_row] = lse_total;
}

template <class Tr>
__device__ __forceinline__ void merge_body(const MergeArgs<typename Tr::DTypeO>& a, const Params& p) {
  const int n = *a.num_work;
  if ((int)blockIdx.x >= n) return;
  __shared__ float wgt[MERGE_STAGE];
  __shared__ float red[4];
  af_wait_prior_grid();
  for (int w = blockIdx.x; w < n; w += gridDim.x) {
    merge_item<Tr>(a, p, a.work[w], wgt, red);
    __syncthreads();  // the next item rewrites wgt and red
  }
}

using Shape = AttnShape<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, 128, 128, 4>;
using Tr = DecodeMmaTraits<Shape, 4, 3, 1, true>;
using MainLoop = DecodeMma<Tr>;

static_assert(sizeof(DecodeWork) == 16, "DecodeWork size differs from Rust (src/abi.rs)");
static_assert(sizeof(PrefillWork) == 24, "PrefillWork size differs from Rust (src/abi.rs)");
static_assert(sizeof(MergeWork) == 16, "MergeWork size differs from Rust (src/abi.rs)");
static_assert(sizeof(Tr::Args) == 152, "AttnArgs size differs from Rust (src/abi.rs)");
static_assert(sizeof(MergeArgs<Shape::DTypeO>) == 88, "MergeArgs size differs from Rust (src/abi.rs)");
static_assert(sizeof(StateMergeArgs) == 192, "StateMergeArgs size differs from Rust (src/abi.rs)");


extern "C" __global__ void __launch_bounds__(Tr::NUM_THREADS, Tr::MIN_CTAS) attnforge_decode(const Tr::Args a, const ParamsArg pa) {
  af_launch_dependents();  // the merge launch may start; it waits for this grid before reading
  af_decode_schedule(a, [&](int w, int kv_head) { MainLoop::body(a, pa.p, w, kv_head); });
}

extern "C" __global__ void attnforge_merge(const MergeArgs<Shape::DTypeO> a, const ParamsArg pa) {
  merge_body<Shape>(a, pa.p);
}
