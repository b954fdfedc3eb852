// prefill_rows.cuh — what every prefill main loop (prefill_sm80.cuh, prefill_sm90.cuh) does
// with the query rows of one work item, apart from its MMAs and its K/V pipeline: who a row is
// (token, head, position, request, lengths — a cascade group item's rows come from its group
// table), which keys it sees (kv_range, per row and as a warp's union and intersection), its
// scores to logits with the variant's hooks, the lazily raised online softmax, and the epilogue
// (output and LSE with the sink once, or the f32 partial state of a split or grouped item).
//
// Fragment layout: both loops keep, per 16-row block mt of a warp, S as s[mt][n][4] and O as
// o[mt][dn][4] in mma.sync's m16n8 C layout (lane 4g + t4: [0..1] row g, columns 8n + 2 t4 +
// {0, 1}; [2..3] row g + 8) — which is also the accumulator layout of Hopper's wgmma m64nN, warp
// by warp. A lane's rows are row0 + 16 mt + g + 8 h.
//
// Semantics (src/reference/mod.rs): see softmax.cuh.

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

// The shared tables of a work item of ROWS rows: a group item's entries (each row's token,
// request, position, lengths and partial slot; rows past the item's take entry 0's, so hooks
// never index outside a request), each row's visible range [lo, hi] (read only by boundary
// tiles; empty for rows past the request), and the CTA's union of them.
template <int ROWS, int GROUP>
struct PrefillTables {
  enum : int { GMAX = ROWS / GROUP > 0 ? ROWS / GROUP : 1 };
  int g_tok[GMAX], g_req[GMAX], g_qpos[GMAX], g_qlen[GMAX], g_kvlen[GMAX], g_slot[GMAX];
  int row_lo[ROWS], row_hi[ROWS];
  int span_lo, span_hi;
};

// One work item's rows. A query row is a (token, head) pair: row r of the request's q_len *
// GROUP rows is token r / GROUP and query head kv_head * GROUP + r % GROUP. A cascade group item
// (stride < 0, src/cascade.rs) takes its rows from -stride entries of the plan's group table (at
// header word 3), from entry row_start: (request, token, partial slot), GROUP rows an entry.
template <class Tr>
struct PrefillRows {
  using Args = typename Tr::Args;
  using Tables = PrefillTables<Tr::ROWS, Tr::GROUP>;
  enum : int { GROUP = Tr::GROUP };
  const Args& a;
  const Params& p;
  Tables& tb;
  PrefillWork item;
  int kv_head, req, tok0, q_len, page_begin, kv_len, n_rows, rbase;
  bool grouped;
  float sm_scale, exp_scale, m_unit;
  // A fixed row max (bounded logits, below): whether this launch uses one, and its value.
  bool fixed_max;
  float m_fixed;

  // Reads the item's request and, for a group item, stages its entries (every thread of the CTA
  // calls it: it ends on a CTA barrier then). Thread 0 resets the span.
  __device__ __forceinline__ PrefillRows(const Args& a_, const Params& p_, Tables& tb_, const PrefillWork& it, int kv_head_, int tid, int nthreads) : a(a_), p(p_), tb(tb_), item(it), kv_head(kv_head_) {
    req = item.req;
    tok0 = a.qo_indptr[req];
    q_len = a.qo_indptr[req + 1] - tok0;
    page_begin = a.kv_indptr[req];
    const int n_pages = a.kv_indptr[req + 1] - page_begin;
    kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
    grouped = item.stride < 0;
    n_rows = grouped ? -item.stride * GROUP : q_len * GROUP;
    rbase = grouped ? 0 : item.row_start;  // the item's first row in its request's rows
    sm_scale = a.sm_scale;
#if LOGITS_FACTORED
    m_unit = af_logits_unit(sm_scale, p);  // > 0, proven (src/spec/factor.rs): a logit is raw * m_unit
    exp_scale = m_unit * AF_LOG2E;
#else
    exp_scale = AF_LOG2E;
    m_unit = 1.f;
#endif
    fixed_max = false;
    m_fixed = 0.f;
#if NORMALIZE_SOFTMAX && LOGITS_FACTORED && LOGITS_RAW_BOUNDED && AF_FIXED_MAX
    {
      // raw is proven within [LO, HI] (src/spec/factor.rs, widened for f32): against a row max
      // fixed at HI - AF_MAX_SLACK / exp_scale every weight is within [2^(slack - span),
      // 2^slack], span the bounds' width in log2 units, so no row needs a running max where the
      // span leaves the weights normal numbers of the P operand's type with room to spare (bf16:
      // down to 2^-92 of 2^-126; f16: to 2^-8, its subnormals below 2^-14 kept out; with the
      // default slack of 8, spans up to 100 and 16). The result does not depend on the max,
      // only its rounding does.
      const float span = (LOGITS_RAW_HI - LOGITS_RAW_LO) * exp_scale;
      constexpr bool bf16 = af_same<typename Tr::DTypeKV, __nv_bfloat16>::value;
      fixed_max = span <= AF_MAX_SLACK + (bf16 ? 92.f : 8.f);
      m_fixed = LOGITS_RAW_HI - AF_MAX_SLACK / exp_scale;
    }
#endif
    if (tid == 0) {
      tb.span_lo = 0x7fffffff;
      tb.span_hi = -1;
    }
    if (grouped) {
      const int4* table = reinterpret_cast<const int4*>(a.num_work + a.num_work[3]);
      for (int e = tid; e < -item.stride; e += nthreads) {
        const int4 en = table[item.row_start + e];
        const int rq = en.x, t0 = a.qo_indptr[rq];
        const int ql = a.qo_indptr[rq + 1] - t0, np = a.kv_indptr[rq + 1] - a.kv_indptr[rq];
        const int kl = np == 0 ? 0 : (np - 1) * a.page_size + a.last_page_len[rq];
        tb.g_tok[e] = en.y;
        tb.g_req[e] = rq;
        tb.g_qlen[e] = ql;
        tb.g_kvlen[e] = kl;
        tb.g_qpos[e] = kl - ql + (en.y - t0);
        tb.g_slot[e] = en.z;
      }
      __syncthreads();
    }
  }

  // Row r of the block: its token (clamped to 0 past the item's rows, so hooks never index
  // outside it), query head, entry, and hook context (the item's request, or its entry's).
  __device__ __forceinline__ bool valid(int r) const { return rbase + r < n_rows; }
  __device__ __forceinline__ int token(int r) const { return rbase + r < n_rows ? (rbase + r) / GROUP : 0; }
  __device__ __forceinline__ int head(int r) const { return kv_head * GROUP + (rbase + r) % GROUP; }
  __device__ __forceinline__ int entry(int r) const { return r < n_rows ? r / GROUP : 0; }
  __device__ __forceinline__ int qpos(int r) const { return grouped ? tb.g_qpos[entry(r)] : kv_len - q_len + token(r); }
  __device__ __forceinline__ int req_of(int r) const { return grouped ? tb.g_req[entry(r)] : req; }
  __device__ __forceinline__ int qlen_of(int r) const { return grouped ? tb.g_qlen[entry(r)] : q_len; }
  __device__ __forceinline__ int kvlen_of(int r) const { return grouped ? tb.g_kvlen[entry(r)] : kv_len; }
  // The global token of row r (for Q loads): its entry's in a group item.
  __device__ __forceinline__ int global_token(int r) const { return grouped ? tb.g_tok[entry(r)] : tok0 + (rbase + r) / GROUP; }

  // The visible ranges of a lane's rows (MTILES blocks from row0; rows row0 + 16 mt + g + 8 h),
  // written to the tables, and the warp's four bounds: the union of its rows' ranges (tiles
  // outside it are skipped) and their intersection (tiles inside it skip the range tests).
  // Every lane of the warp calls it.
  template <int MTILES>
  __device__ __forceinline__ void bounds(int row0, int g, int t4, int& see_lo, int& see_hi, int& in_lo, int& in_hi) const {
    see_lo = 0x7fffffff, see_hi = -1, in_lo = -1, in_hi = 0x7fffffff;
#pragma unroll
    for (int mt = 0; mt < MTILES; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + mt * 16 + g + 8 * h;
        const int qp = qpos(r);
        int rlo = max(item.kv_begin, 0);
        int rhi = min(item.kv_end, kvlen_of(r)) - 1;
#if HAS_KV_LO
        rlo = max(rlo, af_kv_lo(0.f, sm_scale, qp, 0, head(r), kv_head, req_of(r), qlen_of(r), kvlen_of(r), p));
#endif
#if HAS_KV_HI
        rhi = min(rhi, af_kv_hi(0.f, sm_scale, qp, 0, head(r), kv_head, req_of(r), qlen_of(r), kvlen_of(r), p));
#endif
        (void)qp;
        if (valid(r)) {
          in_lo = max(in_lo, rlo);
          in_hi = min(in_hi, rhi);
        } else {
          rlo = 0x7fffffff;
          rhi = -1;
        }
        see_lo = min(see_lo, rlo);
        see_hi = max(see_hi, rhi);
        if (t4 == 0) {
          tb.row_lo[r] = rlo;
          tb.row_hi[r] = rhi;
        }
      }
    }
    see_lo = __reduce_min_sync(0xffffffffu, see_lo);
    see_hi = __reduce_max_sync(0xffffffffu, see_hi);
    in_lo = __reduce_max_sync(0xffffffffu, in_lo);
    in_hi = __reduce_min_sync(0xffffffffu, in_hi);
    // A warp with no valid row has an empty intersection too, so every tile it computes (a
    // loop whose warps share their tiles) is range-tested rather than taken as inside.
    if (see_hi < see_lo) {
      in_lo = 0x7fffffff;
      in_hi = -1;
    }
  }

  // The CTA's span: the union of every warp's (see_lo, see_hi). Every thread calls it; lane 0
  // of each warp contributes, also to its part's union (grp_lo, grp_hi: shared, reset before
  // this call) when it has one.
  __device__ __forceinline__ void span(int see_lo, int see_hi, int lane, int& lo, int& hi, int* grp_lo = nullptr, int* grp_hi = nullptr) const {
    __syncthreads();
    if (lane == 0) {
      atomicMin(&tb.span_lo, see_lo);
      atomicMax(&tb.span_hi, see_hi);
      if (grp_lo != nullptr) {
        atomicMin(grp_lo, see_lo);
        atomicMax(grp_hi, see_hi);
      }
    }
    __syncthreads();
    lo = tb.span_lo;
    hi = tb.span_hi;
  }

  // Scores to logits for a tile starting at key t0; invisible positions become -inf (0 without
  // softmax normalisation). `check`: test each position against its row's range (a boundary
  // tile); `mask` is evaluated per element only when it does not follow from kv_range
  // (HAS_MASK, see src/spec/implied.rs). Called with a literal, so each call inlines to its
  // own loop.
  template <int MTILES, int NT>
  __device__ __forceinline__ void score(float (&s)[MTILES][NT][4], int t0, const bool check, int row0, int g, int t4, bool (&any)[MTILES][2]) const {
    (void)any;
#pragma unroll
    for (int mt = 0; mt < MTILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + mt * 16 + g + 8 * h;
        const int qp = qpos(r), hd = head(r);
        const int rreq = req_of(r), rql = qlen_of(r), rkl = kvlen_of(r);
        (void)rreq;
        (void)rql;
        (void)rkl;
        const int rlo = check ? tb.row_lo[r] : 0, rhi = check ? tb.row_hi[r] : 0;
        (void)qp;
        (void)hd;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int j = 2 * h; j < 2 * h + 2; ++j) {
            const int pos = t0 + n * 8 + 2 * t4 + (j & 1);
            bool vis = !check || (pos >= rlo && pos <= rhi);
#if HAS_MASK
            vis = vis && af_mask(0.f, sm_scale, qp, pos, hd, kv_head, rreq, rql, rkl, p);
#endif
#if NORMALIZE_SOFTMAX && LOGITS_FACTORED
            // raw: the unit is folded into exp2
            s[mt][n][j] = vis ? af_logits_raw(s[mt][n][j], sm_scale, qp, pos, hd, kv_head, rreq, rql, rkl, p) : -AF_INF;
#elif NORMALIZE_SOFTMAX
            s[mt][n][j] = vis ? af_logits(s[mt][n][j], sm_scale, qp, pos, hd, kv_head, rreq, rql, rkl, p) : -AF_INF;
#else
            s[mt][n][j] = vis ? af_logits(s[mt][n][j], sm_scale, qp, pos, hd, kv_head, rreq, rql, rkl, p) : 0.f;
            any[mt][h] = any[mt][h] || vis;
#endif
          }
      }
  }
};

// The softmax state of a lane's rows: running max m (in the units of s), denominator d, and
// (without normalisation) whether each row saw a visible key (its LSE is -inf otherwise).
template <int MTILES>
struct PrefillSoftmax {
  float m[MTILES][2], d[MTILES][2];
  bool any[MTILES][2];
  bool fixed;  // the max is fixed (init): no running max, no rescale
  // The empty state of the item's rows. With a fixed max (`rows.fixed_max`: the logits are
  // bounded) every row's m is `rows.m_fixed` from the start and weigh never moves it (a uniform
  // branch skips the max, the vote and the rescale); a row is then visible when its denominator
  // is not 0 (or is NaN).
  template <class Rows>
  __device__ __forceinline__ void init(const Rows& rows) {
    fixed = rows.fixed_max;
#pragma unroll
    for (int mt = 0; mt < MTILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m[mt][h] = fixed ? rows.m_fixed : -AF_INF;
        d[mt][h] = 0.f;
        any[mt][h] = false;
      }
  }

  // Online softmax with a lazily raised max over one tile's logits s, turning them into the
  // weights P and rescaling o when a max moves. A row's running max m only moves when one of
  // the tile's scores exceeds it by more than AF_MAX_SLACK (log2 units), so p = exp2((s - m) *
  // exp_scale) stays below 2^AF_MAX_SLACK (exact in f32 and in the bf16/f16 P operand); the LSE
  // uses the same m, so the result is unchanged. Each lane tests its own scores, and the warp
  // decides with one vote: the common case needs no shuffle and no rescale, and the branch is
  // uniform. When it is taken, every row moves to the max of its quad's scores and its O and d
  // are rescaled. A row with nothing visible yet keeps m = -inf and exponentiates against 0,
  // giving p = 0 and d = 0. m is in the units of s: raw scores when the scale is folded
  // (exp_scale = sm_scale log2 e). With a fixed max (init) there is no max, vote or rescale: the
  // weights exponentiate against it. Without normalisation, s already holds the weights.
  template <int NT, int DN>
  __device__ __forceinline__ void update(float (&s)[MTILES][NT][4], float (&o)[MTILES][DN][4], float exp_scale) {
    float sc[MTILES][2];
    if (weigh(s, sc, exp_scale)) rescale(o, sc);
  }

  // update's first half, for a loop whose O is still being accumulated (an asynchronous P · V):
  // turns s into weights, moves m and d, and returns whether O must be rescaled by `sc` (the
  // warp's vote; then call rescale once O is final). Without normalisation: no rescale.
  template <int NT>
  __device__ __forceinline__ bool weigh(float (&s)[MTILES][NT][4], float (&sc)[MTILES][2], float exp_scale) {
#pragma unroll
    for (int mt = 0; mt < MTILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) sc[mt][h] = 1.f;
#if NORMALIZE_SOFTMAX
    float mx[MTILES][2];
    bool moved = false;
    if (!fixed) {
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
      moved = __any_sync(0xffffffffu, raise);
    }
    if (moved) {
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
          s[mt][n][2 * h] = af_exp2_col(fmaf(s[mt][n][2 * h], exp_scale, -base), n);
          s[mt][n][2 * h + 1] = af_exp2_col(fmaf(s[mt][n][2 * h + 1], exp_scale, -base), n);
          t[n] = s[mt][n][2 * h] + s[mt][n][2 * h + 1];
        }
        d[mt][h] = fmaf(d[mt][h], sc[mt][h], af_tree_sum<NT>(t));
      }
    }
    return moved;
#else
    (void)s, (void)exp_scale;
    return false;
#endif
  }

  // update's second half: O's rows times their factors.
  template <int DN>
  __device__ __forceinline__ void rescale(float (&o)[MTILES][DN][4], const float (&sc)[MTILES][2]) {
#pragma unroll
    for (int mt = 0; mt < MTILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
          o[mt][dn][2 * h] *= sc[mt][h];
          o[mt][dn][2 * h + 1] *= sc[mt][h];
        }
  }

  // Writes a lane's rows (MTILES blocks from row0): each lane holds, for row (mt, h), dims dn * 8
  // + 2 t4 and + 1 in o[mt][dn][2h], [2h + 1]. One KV chunk of a split block, or a group item's
  // rows, write the f32 partial (o normalised, lse without the sink) that merge_states combines;
  // an unsplit item writes the output and LSE with the sink added once (softmax.cuh).
  template <class Tr, int DN>
  __device__ __forceinline__ void write(const PrefillRows<Tr>& rows, float (&o)[MTILES][DN][4], int row0, int g, int t4) {
    using DTypeO = typename Tr::DTypeO;
    constexpr int HEAD_DIM_VO = Tr::HEAD_DIM_VO;
    const auto& a = rows.a;
    const PrefillWork& item = rows.item;
#pragma unroll
    for (int mt = 0; mt < MTILES; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + mt * 16 + g + 8 * h;
        const int tq = rows.token(r), head = rows.head(r);
        const int qpos = rows.kv_len - rows.q_len + tq;
        (void)qpos;
#if NORMALIZE_SOFTMAX
        float dd = d[mt][h];
        dd += __shfl_xor_sync(0xffffffffu, dd, 1);
        dd += __shfl_xor_sync(0xffffffffu, dd, 2);
        // A row whose visible logits were all NaN keeps m = -inf (the lazy max never raises on a
        // NaN) but its d is NaN: it is visible, and its output and LSE come out NaN, as in the
        // reference.
        const bool visible = fixed ? dd != 0.f : m[mt][h] != -AF_INF || dd != dd;
#else
        const bool seen = (__shfl_xor_sync(0xffffffffu, (int)any[mt][h], 1) | __shfl_xor_sync(0xffffffffu, (int)any[mt][h], 2) | (int)any[mt][h]) != 0;
#endif
        if (item.partial >= 0 || rows.grouped) {
          if (!rows.valid(r)) continue;
#if NORMALIZE_SOFTMAX
          const SoftmaxPartial part = af_softmax_partial(visible, m[mt][h], rows.m_unit, dd);
          const float inv = part.inv, part_lse = part.lse;
#else
          const float inv = 1.f;
          const float part_lse = seen ? 0.f : -AF_INF;
#endif
          const long long slot = rows.grouped ? (long long)rows.tb.g_slot[rows.entry(r)] : item.partial + (long long)(tq - item.row_start / Tr::GROUP) * item.stride;
          const long long prow = slot * a.num_qo_heads + head;
          float* po = a.part_o + prow * HEAD_DIM_VO + 2 * t4;
#pragma unroll
          for (int dn = 0; dn < DN; ++dn) *reinterpret_cast<float2*>(po + dn * 8) = make_float2(o[mt][dn][2 * h] * inv, o[mt][dn][2 * h + 1] * inv);
          if (t4 == 0) a.part_lse[prow] = part_lse;
          continue;
        }
#if NORMALIZE_SOFTMAX
        float scale = 0.f, lse_out = -AF_INF;
        if (visible) {
          // The row max as a logit, and the sink once (softmax.cuh).
          const SoftmaxFinal f = af_softmax_final(m[mt][h] * rows.m_unit, dd, rows.sm_scale, qpos, head, rows.kv_head, rows.req, rows.q_len, rows.kv_len, rows.p);
          scale = f.scale;
          lse_out = f.lse;
        }
#else
        const float scale = 1.f, lse_out = seen ? 0.f : -AF_INF;
#endif
        if (!rows.valid(r)) continue;
        const long long row = (long long)(rows.tok0 + tq) * a.num_qo_heads + head;
        DTypeO* out = a.o + row * HEAD_DIM_VO + 2 * t4;
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
          *reinterpret_cast<unsigned*>(out + dn * 8) = af_pack2<DTypeO>(o[mt][dn][2 * h] * scale, o[mt][dn][2 * h + 1] * scale);
        }
        if (t4 == 0) a.lse[row] = lse_out;
      }
    }
  }
};
