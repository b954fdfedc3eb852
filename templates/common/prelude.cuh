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
