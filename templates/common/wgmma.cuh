// wgmma.cuh — Hopper (sm_90a) warpgroup MMA primitives for the sm90 prefill main loop (issue 14).
//
// A warpgroup is four consecutive warps (128 threads) that issue one `wgmma.mma_async` together:
// D[64 x N] (f32, in registers) += A[64 x 16] · B[N x 16]^T per instruction, both operands read
// from shared memory through 64-bit matrix descriptors, asynchronously: `af_wgmma_fence` before
// the first MMA that touches accumulators other instructions wrote, `af_wgmma_commit` after a
// batch, `af_wgmma_wait<N>` until at most N batches are in flight. Shared memory written by
// ordinary stores must be made visible to the async proxy first (`af_fence_proxy_async`, then a
// barrier).
//
// Operand layout: K-major (a row's 16-element K slice contiguous), 128-byte swizzle. A tile of
// R rows × 64 elements of a 2-byte type is R × 128 bytes, 1024-byte aligned; the 16-byte chunk c
// of row r lives at r * 128 + ((c ^ (r % 8)) * 16) (`af_sw128_offset`). Its descriptor has the
// stride between 8-row groups (1024 bytes) as the stride-dimension offset; the leading-dimension
// offset is unused for swizzled K-major operands. The k-th 16-element K step of the tile starts
// 32·k bytes in (the hardware applies the swizzle to the address it computes).
//
// Accumulator fragment of m64nNk16 (PTX ISA, "wgmma register fragments"): warp w of the
// warpgroup holds rows 16w..16w+15; within it, as mma.sync's m16n8 C fragment per 8-column block
// j: d[4j + 0..1] = row 16w + lane / 4, columns 8j + 2 (lane % 4) + {0, 1}; d[4j + 2..3] = the
// same columns, row + 8.
//
// Only sm_90a has these instructions: everything here compiles to nothing elsewhere
// (AF_HAS_WGMMA is 0), and a kernel that needs it must not be chosen there.

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AF_HAS_WGMMA 1
#else
#define AF_HAS_WGMMA 0
#endif

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a 128-byte-swizzled K-major tile.
__device__ __forceinline__ unsigned af_sw128_offset(unsigned row, unsigned chunk) {
  return row * 128u + (((chunk ^ (row & 7u)) & 7u) << 4);
}

// The descriptor of a 128-byte-swizzled K-major tile starting at shared address `addr` (1024-byte
// aligned for k = 0; `addr + 32 k` for the k-th 16-element step of a 2-byte type): start address
// in 16-byte units, the leading-dimension offset (unused for swizzled K-major operands: 1), the
// stride between 8-row groups (8 rows x 128 bytes), 128-byte swizzle. A loop passes its ring
// slot's address plus constant offsets, which fold into the address field; the probes pass
// pointers.
__device__ __forceinline__ unsigned long long af_desc_sw128_at(unsigned addr) {
  return static_cast<unsigned long long>((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (static_cast<unsigned long long>(1024u >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ unsigned long long af_desc_sw128(const void* smem) { return af_desc_sw128_at(static_cast<unsigned>(__cvta_generic_to_shared(smem))); }

// The descriptor of an MN-major (N contiguous) 128-byte-swizzled tile of a 2-byte type, the B
// operand of P · V (V stored keys × head dim, head dim contiguous): atoms of 64 N-elements × 8
// K-rows (1024 bytes); `sbo` the byte stride between 8-row K groups, `lbo` between 64-element
// N panels (unused when N is 64). A K step of 16 keys starts two atoms (2 sbo) further.
__device__ __forceinline__ unsigned long long af_desc_sw128_mn_at(unsigned addr, unsigned lbo, unsigned sbo) {
  return static_cast<unsigned long long>((addr & 0x3FFFFu) >> 4) | (static_cast<unsigned long long>((lbo >> 4) & 0x3FFFu) << 16) |
         (static_cast<unsigned long long>((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
__device__ __forceinline__ unsigned long long af_desc_sw128_mn(const void* smem, unsigned lbo, unsigned sbo) {
  return af_desc_sw128_mn_at(static_cast<unsigned>(__cvta_generic_to_shared(smem)), lbo, sbo);
}

__device__ __forceinline__ void af_fence_proxy_async() {
#if AF_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void af_wgmma_fence() {
#if AF_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void af_wgmma_commit() {
#if AF_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void af_wgmma_wait() {
#if AF_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accumulator reads or writes across an asynchronous MMA.
__device__ __forceinline__ void af_wgmma_fence_operand(float& r) {
#if AF_HAS_WGMMA
  asm volatile("" : "+f"(r)::"memory");
#endif
}

// Writes the m64nNk16 accumulator fragment `d` (N / 2 floats per thread) of this warpgroup as a
// row-major 64 x N f32 matrix at `c` with row stride `ld` (the fragment layout above).
template <int N>
__device__ __forceinline__ void af_wgmma_store_f32(const float (&d)[N / 2], float* c, unsigned ld) {
  const unsigned warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, row = 16 * warp + lane / 4;
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    const unsigned col = 8 * j + 2 * (lane % 4);
    c[row * ld + col] = d[4 * j];
    c[row * ld + col + 1] = d[4 * j + 1];
    c[(row + 8) * ld + col] = d[4 * j + 2];
    c[(row + 8) * ld + col + 1] = d[4 * j + 3];
  }
}

#define AF_WGMMA_D32                                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define AF_WGMMA_OUT32(d)                                                                                           \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// D[64 x 64] (+)= A[64 x 16] · B[64 x 16]^T, both K-major in shared memory; `accumulate` 0
// overwrites D. IS_BF16: bf16 operands, else f16.
template <bool IS_BF16>
__device__ __forceinline__ void af_wgmma_m64n64k16_ss(float (&d)[32], unsigned long long desc_a, unsigned long long desc_b, int accumulate) {
#if AF_HAS_WGMMA
  if (IS_BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " AF_WGMMA_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : AF_WGMMA_OUT32(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " AF_WGMMA_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : AF_WGMMA_OUT32(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  }
#endif
}

// D[64 x 64] (+)= A[64 x 16] · B[16 x 64], A from registers (each warp its 16 rows, as
// mma.sync's m16n8k16 A fragment: a[0] rows lane/4, k 2 (lane % 4) + {0, 1}; a[1] rows + 8;
// a[2] k + 8; a[3] both), B MN-major in shared memory (transposed: TNSP_B 1). For P · V, where
// P is the softmax of the S accumulator already in registers.
template <bool IS_BF16>
__device__ __forceinline__ void af_wgmma_m64n64k16_rs(float (&d)[32], const unsigned (&a)[4], unsigned long long desc_b, int accumulate) {
#if AF_HAS_WGMMA
  if (IS_BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " AF_WGMMA_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : AF_WGMMA_OUT32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " AF_WGMMA_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : AF_WGMMA_OUT32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  }
#endif
}

#define AF_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define AF_WGMMA_OUT64(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// D[64 x 128] (+)= A[64 x 16] · B[128 x 16]^T (both K-major in shared memory): S for a 128-key
// tile. The accumulator fragment is the m64n64 one over 16 column blocks (d[4j + …], j < 16).
template <bool IS_BF16>
__device__ __forceinline__ void af_wgmma_m64n128k16_ss(float (&d)[64], unsigned long long desc_a, unsigned long long desc_b, int accumulate) {
#if AF_HAS_WGMMA
  if (IS_BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " AF_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : AF_WGMMA_OUT64(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " AF_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : AF_WGMMA_OUT64(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  }
#endif
}

// D[64 x 128] (+)= A[64 x 16] (registers, the A fragment) · B[16 x 128] (MN-major in shared
// memory, two 64-element N panels `lbo` bytes apart): O += P · V for head dim 128.
template <bool IS_BF16>
__device__ __forceinline__ void af_wgmma_m64n128k16_rs(float (&d)[64], const unsigned (&a)[4], unsigned long long desc_b, int accumulate) {
#if AF_HAS_WGMMA
  if (IS_BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " AF_WGMMA_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : AF_WGMMA_OUT64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " AF_WGMMA_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : AF_WGMMA_OUT64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  }
#endif
}

// The MMAs above by N (64 or 128), for loops whose tile width is a template parameter.
template <bool IS_BF16, int N>
__device__ __forceinline__ void af_wgmma_ss(float (&d)[N / 2], unsigned long long desc_a, unsigned long long desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "wgmma N: 64 or 128");
  if constexpr (N == 64) af_wgmma_m64n64k16_ss<IS_BF16>(d, desc_a, desc_b, accumulate);
  else af_wgmma_m64n128k16_ss<IS_BF16>(d, desc_a, desc_b, accumulate);
}
template <bool IS_BF16, int N>
__device__ __forceinline__ void af_wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "wgmma N: 64 or 128");
  if constexpr (N == 64) af_wgmma_m64n64k16_rs<IS_BF16>(d, a, desc_b, accumulate);
  else af_wgmma_m64n128k16_rs<IS_BF16>(d, a, desc_b, accumulate);
}

// af_wgmma_fence_operand over every float of an accumulator array.
template <int N>
__device__ __forceinline__ void af_wgmma_fence_all(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) af_wgmma_fence_operand(r[i]);
}
