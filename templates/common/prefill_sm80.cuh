// prefill_sm80.cuh — batch prefill / append on sm80 tensor cores (mma.sync) over the paged KV
// cache: the portable prefill main loop (sm_80 and newer).
//
// One CTA per work item (request, block of ROWS = 16 * MTILES * NUM_WARPS query rows) and KV
// head. A query row is a (token, head) pair: row r of the request's q_len * GROUP rows is token
// r / GROUP and query head kv_head * GROUP + r % GROUP, so the query heads of one KV head share
// every K/V tile (GQA fusion), and a short append (a few tokens) still fills the MMA rows.
//
// Each warp owns MTILES blocks of 16 rows and keeps their online-softmax state and output in
// registers; every K or V fragment read from shared memory feeds MTILES MMAs, which halves the
// shared-memory traffic per MMA at MTILES = 2. Q is staged in shared memory once per CTA and read
// back per k-step with ldmatrix, which frees the registers the second row block needs. All warps
// walk the same K/V tiles through the located cp.async ring (kv_ring.cuh), over the union of the
// CTA's rows' kv_range only: tiles no row can see are never loaded. A tile inside every row of a
// warp runs without range tests; only boundary tiles compare positions. `mask` is evaluated per
// element only when it does not follow from kv_range (HAS_MASK, see src/spec/implied.rs).
//   S[16 x KV_TILE] = Q[16 x D] · K^T;  softmax on the fragments;  O[16 x DVO] += P · V
// A work item of a split block (partial >= 0) covers one KV chunk and writes f32 partial states
// that merge_states combines.
//
// A cascade group item (stride < 0, src/cascade.rs) takes its rows from -stride entries of the
// plan's group table (at header word 3), from entry row_start: (request, token, partial slot),
// GROUP rows an entry, the tokens of several requests that share the keys [kv_begin, kv_end) —
// logical positions, read through the first member's (item.req's) page table, whose pages there
// are every member's. Each row sees the hooks with its own request, position and lengths, and
// always writes its partial state to its entry's slot; merge_states adds the sink once.
//
// Online softmax with a lazily raised max (softmax.cuh); the sink joins at the end, once.
//
// Needs: traits (PrefillSm80Traits, Q and KV of one type), the parts, mma.cuh, and the
// variant's hooks.

// Pairwise reductions: a balanced tree instead of a serial chain of dependent instructions.
template <int N>
__device__ __forceinline__ float af_tree_max(float (&t)[N]) {
#pragma unroll
  for (int w = 1; w < N; w *= 2)
#pragma unroll
    for (int i = 0; i + w < N; i += 2 * w) t[i] = fmaxf(t[i], t[i + w]);
  return t[0];
}
template <int N>
__device__ __forceinline__ float af_tree_sum(float (&t)[N]) {
#pragma unroll
  for (int w = 1; w < N; w *= 2)
#pragma unroll
    for (int i = 0; i + w < N; i += 2 * w) t[i] += t[i + w];
  return t[0];
}

template <class Tr>
struct PrefillSm80 {
  using Args = typename Tr::Args;
  using DTypeQ = typename Tr::DTypeQ;
  using DTypeKV = typename Tr::DTypeKV;
  using DTypeO = typename Tr::DTypeO;
  enum : int { HEAD_DIM_QK = Tr::HEAD_DIM_QK, HEAD_DIM_VO = Tr::HEAD_DIM_VO, GROUP = Tr::GROUP };
  enum : int { NUM_WARPS = Tr::NUM_WARPS, MTILES = Tr::MTILES, ROWS = Tr::ROWS, KV_TILE = Tr::KV_TILE, STAGES = Tr::STAGES, NUM_THREADS = Tr::NUM_THREADS };
  enum : int { ROW_QK = Tr::ROW_QK, ROW_VO = Tr::ROW_VO, VEC = Tr::KV_VEC };
  static_assert(af_same<DTypeQ, DTypeKV>::value, "the MMA main loop multiplies Q and K of one type");

    static __device__ __forceinline__ void body(const Args& a, const Params& p) {
    const int w = blockIdx.x;
    if (w >= *a.num_work) return;  // fixed-grid mode: spare CTAs exit
    const PrefillWork item = a.work[w];
    const int kv_head = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4, mi = lane / 8;
    const int req = item.req;
    const int tok0 = a.qo_indptr[req];
    const int q_len = a.qo_indptr[req + 1] - tok0;
    const int page_begin = a.kv_indptr[req];
    const int n_pages = a.kv_indptr[req + 1] - page_begin;
    const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
    const bool grouped = item.stride < 0;
    const int n_rows = grouped ? -item.stride * GROUP : q_len * GROUP;
    const int rbase = grouped ? 0 : item.row_start;  // the item's first row in its request's rows
    const float sm_scale = a.sm_scale;
  #if LOGITS_SCALED_SCORE
    const float exp_scale = sm_scale * AF_LOG2E;  // sm_scale > 0, checked on the host
    const float m_unit = sm_scale;                // the logit of a raw score s is s * m_unit
  #else
    const float exp_scale = AF_LOG2E;
    const float m_unit = 1.f;
  #endif
    (void)exp_scale;
    (void)m_unit;
    const int warp_row0 = warp * 16 * MTILES;

    // Row r of the block: its token (clamped to 0 past the request's rows, so hooks never index
    // outside it), query head and position.
    auto row_token = [&](int r) { return rbase + r < n_rows ? (rbase + r) / GROUP : 0; };
    auto row_head = [&](int r) { return kv_head * GROUP + (rbase + r) % GROUP; };
    // A group item's entries, staged once: each row's token, request, position, lengths and slot
    // (rows past the item's take entry 0's, so hooks never index outside a request).
    constexpr int GMAX = ROWS / GROUP > 0 ? ROWS / GROUP : 1;
    __shared__ int g_tok[GMAX], g_req[GMAX], g_qpos[GMAX], g_qlen[GMAX], g_kvlen[GMAX], g_slot[GMAX];
    if (grouped) {
      const int4* table = reinterpret_cast<const int4*>(a.num_work + a.num_work[3]);
      for (int e = tid; e < -item.stride; e += NUM_THREADS) {
        const int4 en = table[item.row_start + e];
        const int rq = en.x, t0 = a.qo_indptr[rq];
        const int ql = a.qo_indptr[rq + 1] - t0, np = a.kv_indptr[rq + 1] - a.kv_indptr[rq];
        const int kl = np == 0 ? 0 : (np - 1) * a.page_size + a.last_page_len[rq];
        g_tok[e] = en.y;
        g_req[e] = rq;
        g_qlen[e] = ql;
        g_kvlen[e] = kl;
        g_qpos[e] = kl - ql + (en.y - t0);
        g_slot[e] = en.z;
      }
      __syncthreads();
    }
    // A row's hook context: the item's request, or in a group item its entry's.
    auto row_entry = [&](int r) { return r < n_rows ? r / GROUP : 0; };
    auto row_qpos = [&](int r) { return grouped ? g_qpos[row_entry(r)] : kv_len - q_len + row_token(r); };
    auto row_req = [&](int r) { return grouped ? g_req[row_entry(r)] : req; };
    auto row_qlen = [&](int r) { return grouped ? g_qlen[row_entry(r)] : q_len; };
    auto row_kvlen = [&](int r) { return grouped ? g_kvlen[row_entry(r)] : kv_len; };
    (void)row_req;
    (void)row_qlen;
    // Each row's visible range [lo, hi] in shared memory (empty for rows past the request): read
    // only by boundary tiles. The warp keeps four bounds: the union of its rows' ranges (tiles
    // outside it are skipped) and their intersection (tiles inside it skip the range tests).
    __shared__ int row_lo[ROWS], row_hi[ROWS];
    __shared__ int span_lo, span_hi;
    if (tid == 0) {
      span_lo = 0x7fffffff;
      span_hi = -1;
    }
    int see_lo = 0x7fffffff, see_hi = -1, in_lo = -1, in_hi = 0x7fffffff;
  #pragma unroll
    for (int mt = 0; mt < MTILES; ++mt) {
  #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_row0 + mt * 16 + g + 8 * h;
        const int qpos = row_qpos(r);
        int rlo = max(item.kv_begin, 0);
        int rhi = min(item.kv_end, row_kvlen(r)) - 1;
  #if HAS_KV_LO
        rlo = max(rlo, af_kv_lo(0.f, sm_scale, qpos, 0, row_head(r), kv_head, row_req(r), row_qlen(r), row_kvlen(r), p));
  #endif
  #if HAS_KV_HI
        rhi = min(rhi, af_kv_hi(0.f, sm_scale, qpos, 0, row_head(r), kv_head, row_req(r), row_qlen(r), row_kvlen(r), p));
  #endif
        (void)qpos;
        if (rbase + r < n_rows) {
          in_lo = max(in_lo, rlo);
          in_hi = min(in_hi, rhi);
        } else {
          rlo = 0x7fffffff;
          rhi = -1;
        }
        see_lo = min(see_lo, rlo);
        see_hi = max(see_hi, rhi);
        if (t4 == 0) {
          row_lo[r] = rlo;
          row_hi[r] = rhi;
        }
      }
    }
    see_lo = __reduce_min_sync(0xffffffffu, see_lo);
    see_hi = __reduce_max_sync(0xffffffffu, see_hi);
    in_lo = __reduce_max_sync(0xffffffffu, in_lo);
    in_hi = __reduce_min_sync(0xffffffffu, in_hi);
    __syncthreads();
    if (lane == 0) {
      atomicMin(&span_lo, see_lo);
      atomicMax(&span_hi, see_hi);
    }
    __syncthreads();
    const int lo = span_lo, hi = span_hi;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
    DTypeKV* v_smem = k_smem + STAGES * KV_TILE * ROW_QK;
    DTypeQ* q_smem = reinterpret_cast<DTypeQ*>(v_smem + STAGES * KV_TILE * ROW_VO);
    __shared__ KeyRows<DTypeKV> key_rows[STAGES][KV_TILE];

    // Stage the block's Q rows (zeros past the request's rows); the copies land with the ring's
    // first group.
    {
      constexpr int KCH = HEAD_DIM_QK / VEC;
  #pragma unroll 4
      for (int c = tid; c < ROWS * KCH; c += NUM_THREADS) {
        const int r = c / KCH, ch = c % KCH;
        const int row = rbase + r;
        const bool ok = row < n_rows;
        const int tok = grouped ? g_tok[row_entry(r)] : tok0 + row / GROUP;
        const DTypeQ* src = ok ? a.q + ((long long)tok * a.num_qo_heads + kv_head * GROUP + row % GROUP) * HEAD_DIM_QK + ch * VEC : a.q;
        af_cp_async16(q_smem + r * ROW_QK + ch * VEC, src, ok);
      }
    }
    // Each lane's ldmatrix row addresses (shared-memory bytes) in stage 0; a tile adds its stage's
    // offset once and every ldmatrix a constant, which the compiler folds into the instruction.
    constexpr int EB = (int)sizeof(DTypeKV);
    const unsigned q_lds = (unsigned)__cvta_generic_to_shared(q_smem) + ((warp_row0 + (lane & 15)) * ROW_QK + (lane >> 4) * 8) * EB;
    const unsigned k_lds = (unsigned)__cvta_generic_to_shared(k_smem) + (((mi >> 1) * 8 + (lane & 7)) * ROW_QK + (mi & 1) * 8) * EB;
    const unsigned v_lds = (unsigned)__cvta_generic_to_shared(v_smem) + (((mi & 1) * 8 + (lane & 7)) * ROW_VO + (mi >> 1) * 8) * EB;

    constexpr int KSTEPS = HEAD_DIM_QK / 16;
    constexpr int DN = HEAD_DIM_VO / 8;
    constexpr int NT = KV_TILE / 8;
    float oacc[MTILES][DN][4];
    af_zero_frags(oacc);
    float m[MTILES][2], d[MTILES][2];
  #if !NORMALIZE_SOFTMAX
    bool any[MTILES][2];  // whether each row saw a visible key (its LSE is -inf otherwise)
  #endif
  #pragma unroll
    for (int mt = 0; mt < MTILES; ++mt)
  #pragma unroll
      for (int h = 0; h < 2; ++h) {
        m[mt][h] = -AF_INF;
        d[mt][h] = 0.f;
  #if !NORMALIZE_SOFTMAX
        any[mt][h] = false;
  #endif
      }

    kv_stream<Tr>(a, k_smem, v_smem, key_rows, lo, hi, page_begin, kv_head, tid, [&](int stage, int t) {
      const int t0 = lo + t * KV_TILE;
      // Skip the math for a tile none of this warp's rows can see (the loads are shared).
      if (t0 > see_hi || t0 + KV_TILE - 1 < see_lo) return;
      // A tile inside every row's range (the bulk of a long causal prompt) needs no range test.
      const bool warp_inside = t0 >= in_lo && t0 + KV_TILE - 1 <= in_hi;

      float s[MTILES][NT][4];
      af_zero_frags(s);
      const unsigned ks = k_lds + stage * (KV_TILE * ROW_QK * EB);
  #pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        unsigned qa[MTILES][4];
  #pragma unroll
        for (int mt = 0; mt < MTILES; ++mt) af_ldmatrix_x4_s(qa[mt], q_lds + (mt * 16 * ROW_QK + kk * 16) * EB);
  #pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          unsigned b[4];
          af_ldmatrix_x4_s(b, ks + (np * 16 * ROW_QK + kk * 16) * EB);
  #pragma unroll
          for (int mt = 0; mt < MTILES; ++mt) {
            af_mma16816<DTypeKV>(s[mt][2 * np], qa[mt], b[0], b[1]);
            af_mma16816<DTypeKV>(s[mt][2 * np + 1], qa[mt], b[2], b[3]);
          }
        }
      }

      // Scores to logits; invisible positions become -inf (0 without softmax normalisation).
      // Called with a literal, so each call inlines to its own loop.
      auto score = [&](const bool check) {
  #pragma unroll
        for (int mt = 0; mt < MTILES; ++mt)
  #pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = warp_row0 + mt * 16 + g + 8 * h;
            const int qpos = row_qpos(r), head = row_head(r);
            const int rreq = row_req(r), rql = row_qlen(r), rkl = row_kvlen(r);
            (void)rreq;
            (void)rql;
            (void)rkl;
            const int rlo = check ? row_lo[r] : 0, rhi = check ? row_hi[r] : 0;
            (void)qpos;
            (void)head;
  #pragma unroll
            for (int n = 0; n < NT; ++n)
  #pragma unroll
              for (int j = 2 * h; j < 2 * h + 2; ++j) {
                const int pos = t0 + n * 8 + 2 * t4 + (j & 1);
                bool vis = !check || (pos >= rlo && pos <= rhi);
  #if HAS_MASK
                vis = vis && af_mask(0.f, sm_scale, qpos, pos, head, kv_head, rreq, rql, rkl, p);
  #endif
  #if NORMALIZE_SOFTMAX && LOGITS_SCALED_SCORE
                s[mt][n][j] = vis ? s[mt][n][j] : -AF_INF;  // raw: the scale is folded into exp2
  #elif NORMALIZE_SOFTMAX
                s[mt][n][j] = vis ? af_logits(s[mt][n][j], sm_scale, qpos, pos, head, kv_head, rreq, rql, rkl, p) : -AF_INF;
  #else
                s[mt][n][j] = vis ? af_logits(s[mt][n][j], sm_scale, qpos, pos, head, kv_head, rreq, rql, rkl, p) : 0.f;
                any[mt][h] = any[mt][h] || vis;
  #endif
              }
          }
      };
      if (warp_inside) {
        score(false);
      } else {
        score(true);
      }

  #if NORMALIZE_SOFTMAX
      // Online softmax with a lazily raised max. A row's running max m only moves when one of the
      // tile's scores exceeds it by more than AF_MAX_SLACK (log2 units), so p = exp2((s - m) *
      // exp_scale) stays below 2^AF_MAX_SLACK (exact in f32 and in the bf16/f16 P operand); the LSE
      // uses the same m, so the result is unchanged. Each lane tests its own scores, and the warp
      // decides with one vote: the common case needs no shuffle and no rescale, and the branch is
      // uniform. When it is taken, every row moves to the max of its quad's scores and its O and d
      // are rescaled. A row with nothing visible yet keeps m = -inf and exponentiates against 0,
      // giving p = 0 and d = 0. m is in the units of s: raw scores when the scale is folded
      // (exp_scale = sm_scale log2 e).
      float mx[MTILES][2];
      bool raise = false;
  #pragma unroll
      for (int mt = 0; mt < MTILES; ++mt)
  #pragma unroll
        for (int h = 0; h < 2; ++h) {
          float t[NT];
  #pragma unroll
          for (int n = 0; n < NT; ++n) t[n] = fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]);
          mx[mt][h] = af_tree_max<NT>(t);
          raise = raise || (mx[mt][h] - m[mt][h]) * exp_scale > AF_MAX_SLACK;  // NaN (both -inf): false
        }
      float sc[MTILES][2];
  #pragma unroll
      for (int mt = 0; mt < MTILES; ++mt)
  #pragma unroll
        for (int h = 0; h < 2; ++h) sc[mt][h] = 1.f;
      if (__any_sync(0xffffffffu, raise)) {
  #pragma unroll
        for (int x = 1; x <= 2; x *= 2)
  #pragma unroll
          for (int mt = 0; mt < MTILES; ++mt)
  #pragma unroll
            for (int h = 0; h < 2; ++h) mx[mt][h] = fmaxf(mx[mt][h], __shfl_xor_sync(0xffffffffu, mx[mt][h], x));
  #pragma unroll
        for (int mt = 0; mt < MTILES; ++mt)
  #pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float mn = fmaxf(m[mt][h], mx[mt][h]);
            sc[mt][h] = exp2f(fmaf(m[mt][h], exp_scale, -af_lazy_base(mn, exp_scale)));
            m[mt][h] = mn;
  #pragma unroll
            for (int dn = 0; dn < DN; ++dn) {
              oacc[mt][dn][2 * h] *= sc[mt][h];
              oacc[mt][dn][2 * h + 1] *= sc[mt][h];
            }
          }
      }
  #pragma unroll
      for (int mt = 0; mt < MTILES; ++mt) {
  #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float base = af_lazy_base(m[mt][h], exp_scale);
          float t[NT];
  #pragma unroll
          for (int n = 0; n < NT; ++n) {
            s[mt][n][2 * h] = exp2f(fmaf(s[mt][n][2 * h], exp_scale, -base));
            s[mt][n][2 * h + 1] = exp2f(fmaf(s[mt][n][2 * h + 1], exp_scale, -base));
            t[n] = s[mt][n][2 * h] + s[mt][n][2 * h + 1];
          }
          d[mt][h] = fmaf(d[mt][h], sc[mt][h], af_tree_sum<NT>(t));
        }
      }
  #endif
      const unsigned vs = v_lds + stage * (KV_TILE * ROW_VO * EB);
  #pragma unroll
      for (int k2 = 0; k2 < KV_TILE / 16; ++k2) {
        unsigned pa[MTILES][4];
  #pragma unroll
        for (int mt = 0; mt < MTILES; ++mt) {
          pa[mt][0] = af_pack2<DTypeKV>(s[mt][2 * k2][0], s[mt][2 * k2][1]);
          pa[mt][1] = af_pack2<DTypeKV>(s[mt][2 * k2][2], s[mt][2 * k2][3]);
          pa[mt][2] = af_pack2<DTypeKV>(s[mt][2 * k2 + 1][0], s[mt][2 * k2 + 1][1]);
          pa[mt][3] = af_pack2<DTypeKV>(s[mt][2 * k2 + 1][2], s[mt][2 * k2 + 1][3]);
        }
  #pragma unroll
        for (int dn2 = 0; dn2 < DN / 2; ++dn2) {
          unsigned b[4];
          af_ldmatrix_x4_trans_s(b, vs + (k2 * 16 * ROW_VO + dn2 * 16) * EB);
  #pragma unroll
          for (int mt = 0; mt < MTILES; ++mt) {
            af_mma16816<DTypeKV>(oacc[mt][2 * dn2], pa[mt], b[0], b[1]);
            af_mma16816<DTypeKV>(oacc[mt][2 * dn2 + 1], pa[mt], b[2], b[3]);
          }
        }
      }
    });

    // Epilogue: each lane holds, for row (mt, h), dims dn * 8 + 2t and + 1 in oacc[mt][dn][2h], [2h + 1].
  #pragma unroll
    for (int mt = 0; mt < MTILES; ++mt) {
  #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_row0 + mt * 16 + g + 8 * h;
        const int tq = row_token(r), head = row_head(r);
        const int qpos = kv_len - q_len + tq;
        (void)qpos;
  #if NORMALIZE_SOFTMAX
        float dd = d[mt][h];
        dd += __shfl_xor_sync(0xffffffffu, dd, 1);
        dd += __shfl_xor_sync(0xffffffffu, dd, 2);
        // A row whose visible logits were all NaN keeps m = -inf (the lazy max never raises on a
        // NaN) but its d is NaN: it is visible, and its output and LSE come out NaN, as in the
        // reference.
        const bool visible = m[mt][h] != -AF_INF || dd != dd;
  #else
        const bool seen = (__shfl_xor_sync(0xffffffffu, (int)any[mt][h], 1) | __shfl_xor_sync(0xffffffffu, (int)any[mt][h], 2) | (int)any[mt][h]) != 0;
  #endif
        if (item.partial >= 0 || grouped) {
          // One KV chunk of a split block, or a group item's rows: the f32 partial (o
          // normalised, lse without the sink) that merge_states combines.
          if (rbase + r >= n_rows) continue;
  #if NORMALIZE_SOFTMAX
          const SoftmaxPartial part = af_softmax_partial(visible, m[mt][h], m_unit, dd);
          const float inv = part.inv, part_lse = part.lse;
  #else
          const float inv = 1.f;
          const float part_lse = seen ? 0.f : -AF_INF;
  #endif
          const long long slot = grouped ? (long long)g_slot[row_entry(r)] : item.partial + (long long)(tq - item.row_start / GROUP) * item.stride;
          const long long prow = slot * a.num_qo_heads + head;
          float* po = a.part_o + prow * HEAD_DIM_VO + 2 * t4;
  #pragma unroll
          for (int dn = 0; dn < DN; ++dn) *reinterpret_cast<float2*>(po + dn * 8) = make_float2(oacc[mt][dn][2 * h] * inv, oacc[mt][dn][2 * h + 1] * inv);
          if (t4 == 0) a.part_lse[prow] = part_lse;
          continue;
        }
  #if NORMALIZE_SOFTMAX
        float scale = 0.f, lse_out = -AF_INF;
        if (visible) {
          // The row max as a logit, and the sink once (softmax.cuh).
          const SoftmaxFinal f = af_softmax_final(m[mt][h] * m_unit, dd, sm_scale, qpos, head, kv_head, req, q_len, kv_len, p);
          scale = f.scale;
          lse_out = f.lse;
        }
  #else
        const float scale = 1.f, lse_out = seen ? 0.f : -AF_INF;
  #endif
        if (rbase + r >= n_rows) continue;
        const long long row = (long long)(tok0 + tq) * a.num_qo_heads + head;
        DTypeO* out = a.o + row * HEAD_DIM_VO + 2 * t4;
  #pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
          *reinterpret_cast<unsigned*>(out + dn * 8) = af_pack2<DTypeO>(oacc[mt][dn][2 * h] * scale, oacc[mt][dn][2 * h + 1] * scale);
        }
        if (t4 == 0) a.lse[row] = lse_out;
      }
    }
  }
};
