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
