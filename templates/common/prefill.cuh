// prefill.cuh — batch prefill / append on tensor cores over the paged KV cache.
//
// One CTA per work item (request, block of ROWS = 16 * NUM_WARPS query rows) and KV head. A query
// row is a (token, head) pair: row r of the request's q_len * GROUP rows is token r / GROUP and
// query head kv_head * GROUP + r % GROUP, so the query heads of one KV head share every K/V tile
// (GQA fusion), and a short append (a few tokens) still fills the MMA rows. Each warp owns 16 rows
// and keeps their online-softmax state in registers; all warps walk the same K/V tiles through a
// cp.async ring, over the union of the CTA's rows' kv_range only: tiles no row can see are never
// loaded. Inside that span every element is checked against its row's range and the mask.
//   S[16 x KV_TILE] = Q[16 x D] · K^T;  softmax on the fragments;  O[16 x DVO] += P · V
//
// Needs: decode_args.cuh (ABI structs, tile loader), mma.cuh, DTypeQ == DTypeKV, DTypeO, Params,
// HEAD_DIM_QK, HEAD_DIM_VO, GROUP, NUM_WARPS, KV_TILE, STAGES, and the variant's hooks.

#define NUM_THREADS (32 * NUM_WARPS)
#define ROWS (16 * NUM_WARPS)

// Mirrors src/abi.rs `PrefillWork`; uploaded where decode puts DecodeWork (both four ints).
struct PrefillWork {
  int req;
  int row_start;  // first query row (token * GROUP + head) of the block
  int kv_begin;
  int kv_end;
};

__device__ __forceinline__ void prefill_body(const DecodeArgs& a, const Params& p) {
  static_assert(KV_TILE % 16 == 0, "KV_TILE must be a multiple of 16");
  const int w = blockIdx.x;
  if (w >= *a.num_work) return;  // fixed-grid mode: spare CTAs exit
  const PrefillWork item = reinterpret_cast<const PrefillWork*>(a.work)[w];
  const int kv_head = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4, mi = lane / 8;
  const int req = item.req;
  const int tok0 = a.qo_indptr[req];
  const int q_len = a.qo_indptr[req + 1] - tok0;
  const int page_begin = a.kv_indptr[req];
  const int n_pages = a.kv_indptr[req + 1] - page_begin;
  const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
  const int n_rows = q_len * GROUP;
  const float sm_scale = a.sm_scale;

  // This lane's two rows: g and g + 8 of its warp's 16.
  bool valid[2];
  int tq[2], head[2], qpos[2], rlo[2], rhi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = item.row_start + warp * 16 + g + 8 * h;
    valid[h] = row < n_rows;
    tq[h] = valid[h] ? row / GROUP : 0;
    head[h] = kv_head * GROUP + (valid[h] ? row % GROUP : 0);
    qpos[h] = kv_len - q_len + tq[h];
    rlo[h] = max(item.kv_begin, 0);
    rhi[h] = min(item.kv_end, kv_len) - 1;
#if HAS_KV_LO
    rlo[h] = max(rlo[h], af_kv_lo(0.f, sm_scale, qpos[h], 0, head[h], kv_head, req, q_len, kv_len, p));
#endif
#if HAS_KV_HI
    rhi[h] = min(rhi[h], af_kv_hi(0.f, sm_scale, qpos[h], 0, head[h], kv_head, req, q_len, kv_len, p));
#endif
    if (!valid[h]) {
      rlo[h] = 0x7fffffff;
      rhi[h] = -1;
    }
  }
  __shared__ int span_lo, span_hi;
  if (tid == 0) {
    span_lo = 0x7fffffff;
    span_hi = -1;
  }
  __syncthreads();
  atomicMin(&span_lo, min(rlo[0], rlo[1]));
  atomicMax(&span_hi, max(rhi[0], rhi[1]));
  __syncthreads();
  const int lo = span_lo, hi = span_hi;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
  DTypeKV* v_smem = k_smem + STAGES * KV_TILE * ROW_QK;
  __shared__ int2 key_loc[STAGES][KV_TILE];

  constexpr int KSTEPS = HEAD_DIM_QK / 16;
  unsigned qa[KSTEPS][4];
  {
    const DTypeQ* q0 = a.q + ((long long)(tok0 + tq[0]) * a.num_qo_heads + head[0]) * HEAD_DIM_QK;
    const DTypeQ* q1 = a.q + ((long long)(tok0 + tq[1]) * a.num_qo_heads + head[1]) * HEAD_DIM_QK;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      const int c = kk * 16 + 2 * t4;
      qa[kk][0] = valid[0] ? *reinterpret_cast<const unsigned*>(q0 + c) : 0u;
      qa[kk][1] = valid[1] ? *reinterpret_cast<const unsigned*>(q1 + c) : 0u;
      qa[kk][2] = valid[0] ? *reinterpret_cast<const unsigned*>(q0 + c + 8) : 0u;
      qa[kk][3] = valid[1] ? *reinterpret_cast<const unsigned*>(q1 + c + 8) : 0u;
    }
  }

  constexpr int DN = HEAD_DIM_VO / 8;
  constexpr int NT = KV_TILE / 8;
  float oacc[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn)
#pragma unroll
    for (int j = 0; j < 4; ++j) oacc[dn][j] = 0.f;
  float m[2] = {-AF_INF, -AF_INF}, d[2] = {0.f, 0.f};
  bool any[2] = {false, false};

  auto load_tile = [&](int stage, int tile_start) {
    decode_load_tile<KV_TILE, NUM_THREADS>(a, k_smem, v_smem, &key_loc[0][0], stage, tile_start, hi, page_begin, kv_head, tid);
  };
  const int num_tiles = hi >= lo ? (hi - lo + KV_TILE) / KV_TILE : 0;
  af_ring<STAGES>(num_tiles, [&](int stage, int t) { load_tile(stage, lo + t * KV_TILE); }, [&](int stage, int t) {
    const int t0 = lo + t * KV_TILE;
    // Skip the math for a tile none of this warp's rows can see (the loads are shared).
    const bool warp_sees = __any_sync(0xffffffffu, (valid[0] && t0 <= rhi[0] && t0 + KV_TILE - 1 >= rlo[0]) ||
                                                       (valid[1] && t0 <= rhi[1] && t0 + KV_TILE - 1 >= rlo[1]));
    if (warp_sees) {
      float s[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
      const DTypeKV* ks = k_smem + stage * KV_TILE * ROW_QK;
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          unsigned b[4];
          af_ldmatrix_x4(b, ks + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * ROW_QK + kk * 16 + (mi & 1) * 8);
          af_mma16816<DTypeKV>(s[2 * np], qa[kk], b[0], b[1]);
          af_mma16816<DTypeKV>(s[2 * np + 1], qa[kk], b[2], b[3]);
        }
      }
      // A tile inside both rows' ranges (the bulk of a long causal prompt) needs no range test.
      const bool inside = valid[0] && valid[1] && t0 >= max(rlo[0], rlo[1]) && t0 + KV_TILE - 1 <= min(rhi[0], rhi[1]);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int h = j >> 1;
          const int pos = t0 + n * 8 + 2 * t4 + (j & 1);
          bool vis = inside || (valid[h] && pos >= rlo[h] && pos <= rhi[h]);
#if HAS_MASK
          vis = vis && af_mask(0.f, sm_scale, qpos[h], pos, head[h], kv_head, req, q_len, kv_len, p);
#endif
#if NORMALIZE_SOFTMAX
          s[n][j] = vis ? af_logits(s[n][j], sm_scale, qpos[h], pos, head[h], kv_head, req, q_len, kv_len, p) : -AF_INF;
#else
          s[n][j] = vis ? af_logits(s[n][j], sm_scale, qpos[h], pos, head[h], kv_head, req, q_len, kv_len, p) : 0.f;
          any[h] = any[h] || vis;
#endif
        }
      }
#if NORMALIZE_SOFTMAX
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -AF_INF;
#pragma unroll
        for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[h], mx);
        if (mn == -AF_INF) {
          // Nothing visible in this row yet: it keeps its zero state.
#pragma unroll
          for (int n = 0; n < NT; ++n) s[n][2 * h] = s[n][2 * h + 1] = 0.f;
          continue;
        }
        const float sc = exp2f((m[h] - mn) * AF_LOG2E);
        const float mn_log2 = mn * AF_LOG2E;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int j = 2 * h; j < 2 * h + 2; ++j) {
            s[n][j] = exp2f(fmaf(s[n][j], AF_LOG2E, -mn_log2));
            sum += s[n][j];
          }
        }
        d[h] = d[h] * sc + sum;
        if (sc != 1.f) {
#pragma unroll
          for (int dn = 0; dn < DN; ++dn) {
            oacc[dn][2 * h] *= sc;
            oacc[dn][2 * h + 1] *= sc;
          }
        }
        m[h] = mn;
      }
#endif
      const DTypeKV* vs = v_smem + stage * KV_TILE * ROW_VO;
#pragma unroll
      for (int k2 = 0; k2 < KV_TILE / 16; ++k2) {
        unsigned pa[4] = {af_pack2<DTypeKV>(s[2 * k2][0], s[2 * k2][1]), af_pack2<DTypeKV>(s[2 * k2][2], s[2 * k2][3]),
                          af_pack2<DTypeKV>(s[2 * k2 + 1][0], s[2 * k2 + 1][1]), af_pack2<DTypeKV>(s[2 * k2 + 1][2], s[2 * k2 + 1][3])};
#pragma unroll
        for (int dn2 = 0; dn2 < DN / 2; ++dn2) {
          unsigned b[4];
          af_ldmatrix_x4_trans(b, vs + (k2 * 16 + (mi & 1) * 8 + (lane & 7)) * ROW_VO + dn2 * 16 + (mi >> 1) * 8);
          af_mma16816<DTypeKV>(oacc[2 * dn2], pa, b[0], b[1]);
          af_mma16816<DTypeKV>(oacc[2 * dn2 + 1], pa, b[2], b[3]);
        }
      }
    }
  });

  // Epilogue: each lane holds, for row h, dims dn * 8 + 2t and + 1 in oacc[dn][2h], [2h + 1].
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#if NORMALIZE_SOFTMAX
    float dd = d[h];
    dd += __shfl_xor_sync(0xffffffffu, dd, 1);
    dd += __shfl_xor_sync(0xffffffffu, dd, 2);
    const bool visible = m[h] != -AF_INF;
    float scale = 0.f, lse_out = -AF_INF;
    if (visible) {
      float mf = m[h], df = dd;
#if HAS_SINK
      const float sk = af_sink(0.f, sm_scale, qpos[h], 0, head[h], kv_head, req, q_len, kv_len, p);
      mf = fmaxf(m[h], sk);
      df = dd * exp2f((m[h] - mf) * AF_LOG2E) + exp2f((sk - mf) * AF_LOG2E);
#endif
      scale = exp2f((m[h] - mf) * AF_LOG2E) / df;
      lse_out = mf + logf(df);
    }
#else
    const bool seen = (__shfl_xor_sync(0xffffffffu, (int)any[h], 1) | __shfl_xor_sync(0xffffffffu, (int)any[h], 2) | (int)any[h]) != 0;
    const float scale = 1.f, lse_out = seen ? 0.f : -AF_INF;
#endif
    if (!valid[h]) continue;
    const long long row = (long long)(tok0 + tq[h]) * a.num_qo_heads + head[h];
    DTypeO* out = a.o + row * HEAD_DIM_VO + 2 * t4;
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
      *reinterpret_cast<unsigned*>(out + dn * 8) = af_pack2<DTypeO>(oacc[dn][2 * h] * scale, oacc[dn][2 * h + 1] * scale);
    }
    if (t4 == 0) a.lse[row] = lse_out;
  }
}
