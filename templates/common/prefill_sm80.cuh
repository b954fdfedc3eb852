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
// A cascade group item (stride < 0, src/cascade.rs) reads the keys [kv_begin, kv_end) — logical
// positions — through the first member's (item.req's) page table, whose pages there are every
// member's. Each row sees the hooks with its own request, position and lengths, and always
// writes its partial state to its entry's slot; merge_states adds the sink once.
//
// Who the rows are, their ranges, the hooks, the lazily raised online softmax and the epilogue
// are prefill_rows.cuh's, shared with the sm90 loop; this file is the mma.sync MMAs and the
// cp.async ring.
//
// Needs: traits (PrefillSm80Traits, Q and KV of one type), the parts, mma.cuh, prefill_rows.cuh,
// and the variant's hooks.

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
    const int kv_head = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4, mi = lane / 8;
    __shared__ PrefillTables<ROWS, GROUP> tables;
    const PrefillRows<Tr> rows(a, p, tables, a.work[w], kv_head, tid, NUM_THREADS);
    const PrefillWork& item = rows.item;
    const int page_begin = rows.page_begin;
    const float exp_scale = rows.exp_scale;
    (void)exp_scale;
    const int warp_row0 = warp * 16 * MTILES;
    int see_lo, see_hi, in_lo, in_hi;
    rows.template bounds<MTILES>(warp_row0, g, t4, see_lo, see_hi, in_lo, in_hi);
    int lo, hi;
    rows.span(see_lo, see_hi, lane, lo, hi);

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
        const bool ok = rows.valid(r);
        const DTypeQ* src = ok ? a.q + ((long long)rows.global_token(r) * a.num_qo_heads + rows.head(r)) * HEAD_DIM_QK + ch * VEC : a.q;
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
    PrefillSoftmax<MTILES> sm;
    sm.init(rows);

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

      if (warp_inside) {
        rows.score(s, t0, false, warp_row0, g, t4, sm.any);
      } else {
        rows.score(s, t0, true, warp_row0, g, t4, sm.any);
      }
      sm.update(s, oacc, exp_scale);
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

    sm.template write<Tr>(rows, oacc, warp_row0, g, t4);
  }
};
