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
