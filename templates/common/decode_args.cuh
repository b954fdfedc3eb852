// decode_args.cuh — what the decode and prefill main loops share: the work item and argument
// structs (the host-device ABI, mirrored in src/abi.rs) and the located cp.async K/V ring.
//
// Needs: DTypeKV, HEAD_DIM_QK, HEAD_DIM_VO, GROUP, Params and the variant's hooks.

#define VEC 8
// The ring's shared-memory rows. The 8 rows that an ldmatrix (or 8 tz groups) reads must hit 8
// different bank groups, and every 32-byte sector a cp.async copies must land in one aligned
// 32-byte unit of shared memory: a sector that straddles two is fetched from L2 twice (decode,
// H200: 1.5x the L2 sectors and requests of the bytes read, 48% L2 "hits").
// - AF_KV_SWIZZLE 1 (decode, head dims multiples of 64): unpadded rows; 16-byte chunk c of row r
//   is stored at chunk c ^ (r & 7), which keeps each sector in its own aligned pair of chunks.
// - AF_KV_SWIZZLE 0 (prefill, other head dims): rows padded by one 16-byte vector, so consecutive
//   rows start 4 banks apart (odd rows straddle sectors).
#ifndef AF_KV_SWIZZLE
#define AF_KV_SWIZZLE 0
#endif
#if AF_KV_SWIZZLE
static_assert(HEAD_DIM_QK % 64 == 0 && HEAD_DIM_VO % 64 == 0, "the swizzled ring needs rows of whole 128-byte lines");
#define ROW_QK HEAD_DIM_QK
#define ROW_VO HEAD_DIM_VO
#else
#define ROW_QK (HEAD_DIM_QK + VEC)
#define ROW_VO (HEAD_DIM_VO + VEC)
#endif
// Element offset, inside its row, of 16-byte chunk `ch` of ring row `row` (the row's index in its
// ring slot).
__device__ __forceinline__ int kv_chunk(int row, int ch) {
#if AF_KV_SWIZZLE
  return (ch ^ (row & 7)) * VEC;
#else
  return ch * VEC;
#endif
}

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

// What a decode CTA knows about its request: where its query token and pages are, the token's
// position, and the KV span it reads (the work item's chunk narrowed by kv_range).
struct DecodeRequest {
  int req, token, q_len, page_begin, kv_len, q_pos, lo, hi;
};

__device__ __forceinline__ DecodeRequest decode_request(const DecodeArgs& a, const Params& p, const DecodeWork& item, int kv_head) {
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
  return r;
}

// Where one key of a tile lives: its K and V rows in global memory, or k = nullptr for a key
// past the span (its copies zero-fill).
struct __align__(16) KeyRows {
  const DTypeKV* k;
  const DTypeKV* v;
};

// The page holding KV position `pos` (-1 past `hi`): the one global load of the page walk, so
// that a caller can issue it early and consume it a whole tile later.
__device__ __forceinline__ int kv_page(const DecodeArgs& a, int pos, int hi, int page_begin) {
  if (pos > hi) return -1;
  const int pi = a.page_shift >= 0 ? pos >> a.page_shift : pos / a.page_size;
  return a.kv_indices[page_begin + pi];
}

// The K and V rows of position `pos` on `page` (nullptr when page < 0).
__device__ __forceinline__ KeyRows kv_rows(const DecodeArgs& a, int pos, int page, int kv_head) {
  KeyRows r = {nullptr, nullptr};
  if (page >= 0) {
    const int slot = a.page_shift >= 0 ? pos & (a.page_size - 1) : pos % a.page_size;
    r.k = a.k + (long long)kv_head * a.k_head_stride + page * a.k_page_stride + (long long)slot * a.k_slot_stride;
    r.v = a.v + (long long)kv_head * a.v_head_stride + page * a.v_page_stride + (long long)slot * a.v_slot_stride;
  }
  return r;
}

// Writes the KeyRows of the KV_TILE_ keys from `tile_start` into `rows` (one ring slot): the page
// walk is done once per key instead of once per 16-byte copy. Keys past `hi` get nullptr.
template <int KV_TILE_, int NTHREADS_>
__device__ __forceinline__ void kv_locate(const DecodeArgs& a, KeyRows* rows, int tile_start, int hi, int page_begin, int kv_head, int tid) {
  for (int j = tid; j < KV_TILE_; j += NTHREADS_) {
    const int pos = tile_start + j;
    rows[j] = kv_rows(a, pos, kv_page(a, pos, hi, page_begin), kv_head);
  }
}

// The general copy loop of kv_issue for one of K (`v` false) or V: NCH 16-byte chunks per key,
// shared-memory rows of ROW elements; `fallback` is a valid address for zero-filled copies.
template <int KV_TILE_, int NTHREADS_, int NCH, int ROW>
__device__ __forceinline__ void kv_issue_rows(DTypeKV* dst, const KeyRows* rows, bool v, const DTypeKV* fallback, int tid) {
#pragma unroll 4
  for (int c = tid; c < KV_TILE_ * NCH; c += NTHREADS_) {
    const int j = c / NCH, ch = c % NCH;
    const KeyRows r = rows[j];
    const bool ok = r.k != nullptr;
    af_cp_async16(dst + j * ROW + kv_chunk(j, ch), ok ? (v ? r.v : r.k) + ch * VEC : fallback, ok);
  }
}

// Issues the cp.async copies of one located tile into ring slot `stage` (K rows padded to ROW_QK,
// V rows to ROW_VO). `full`: every key of the tile is in the span, so no copy zero-fills.
template <int KV_TILE_, int NTHREADS_>
__device__ __forceinline__ void kv_issue(const DecodeArgs& a, DTypeKV* k_smem, DTypeKV* v_smem, const KeyRows* rows, int stage, int tid, bool full) {
  DTypeKV* ks = k_smem + stage * KV_TILE_ * ROW_QK;
  DTypeKV* vs = v_smem + stage * KV_TILE_ * ROW_VO;
  constexpr int KCH = HEAD_DIM_QK / VEC, VCH = HEAD_DIM_VO / VEC;
  constexpr int RSTEP = NTHREADS_ / KCH;  // keys per pass of the block
  if (KCH == VCH && NTHREADS_ % KCH == 0 && KV_TILE_ % RSTEP == 0) {
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
      for (int i = 0; i < KV_TILE_ / RSTEP; ++i) {
        const int j = j0 + i * RSTEP;
        const KeyRows r = rows[j];
        af_cp_async16_s(k_base + (j * ROW_QK + kv_chunk(j, ch)) * EB, r.k + ch * VEC);
        af_cp_async16_s(v_base + (j * ROW_VO + kv_chunk(j, ch)) * EB, r.v + ch * VEC);
      }
    } else {
#pragma unroll
      for (int i = 0; i < KV_TILE_ / RSTEP; ++i) {
        const int j = j0 + i * RSTEP;
        const KeyRows r = rows[j];
        const bool ok = r.k != nullptr;
        af_cp_async16_s(k_base + (j * ROW_QK + kv_chunk(j, ch)) * EB, ok ? r.k + ch * VEC : a.k, ok);
        af_cp_async16_s(v_base + (j * ROW_VO + kv_chunk(j, ch)) * EB, ok ? r.v + ch * VEC : a.v, ok);
      }
    }
  } else {
    kv_issue_rows<KV_TILE_, NTHREADS_, KCH, ROW_QK>(ks, rows, false, a.k, tid);
    kv_issue_rows<KV_TILE_, NTHREADS_, VCH, ROW_VO>(vs, rows, true, a.v, tid);
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

// Streams the K/V tiles of positions [lo, hi] of one KV head through a STAGES_-deep located
// ring and calls `compute(stage, t)` on each once it has landed (tile t starts at lo + t *
// KV_TILE_; keys past hi are zero-filled). `rows` is the ring's shared KeyRows. A thread locates
// key `tid` of a tile when the tile fits the block (its page index prefetched a tile ahead),
// otherwise the block walks the keys in turn. Every thread of the block must call it.
template <int STAGES_, int KV_TILE_, int NTHREADS_, typename Compute>
__device__ __forceinline__ void kv_stream(const DecodeArgs& a, DTypeKV* k_smem, DTypeKV* v_smem, KeyRows (*rows)[KV_TILE_], int lo, int hi,
                                          int page_begin, int kv_head, int tid, Compute&& compute) {
  constexpr bool ONE_KEY = KV_TILE_ <= NTHREADS_;
  auto prefetch = [&](int t) { return ONE_KEY ? kv_page(a, lo + t * KV_TILE_ + tid, tid < KV_TILE_ ? hi : -1, page_begin) : 0; };
  auto locate = [&](int slot, int t, int page) {
    if (ONE_KEY) {
      if (tid < KV_TILE_) rows[slot][tid] = kv_rows(a, lo + t * KV_TILE_ + tid, page, kv_head);
    } else {
      kv_locate<KV_TILE_, NTHREADS_>(a, rows[slot], lo + t * KV_TILE_, hi, page_begin, kv_head, tid);
    }
  };
  auto issue = [&](int slot, int t) { kv_issue<KV_TILE_, NTHREADS_>(a, k_smem, v_smem, rows[slot], slot, tid, lo + (t + 1) * KV_TILE_ - 1 <= hi); };
  const int num_tiles = hi >= lo ? (hi - lo + KV_TILE_) / KV_TILE_ : 0;
  af_ring_located<STAGES_>(num_tiles, prefetch, locate, issue, compute);
}

// Combines the N partial states (m, d, o) of query row `row` that a CTA's thread groups left in
// shared memory ([N][GROUP] m and d, then [N][GROUP][HEAD_DIM_VO] o) for output dims [c0, c0 +
// 8): the combined max M, denominator D (without normalisation: the count of parts that saw a
// key) and output O. Returns whether any part saw a visible key.
template <int N>
__device__ __forceinline__ bool decode_combine8(const float* red_m, const float* red_d, const float* red_o, int row, int c0, float& M, float& D, float (&O)[VEC]) {
  M = -AF_INF;
  D = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) O[e] = 0.f;
#if NORMALIZE_SOFTMAX
  for (int z = 0; z < N; ++z) M = af_fmax(M, red_m[z * GROUP + row]);
  if (M == -AF_INF) return false;
  for (int z = 0; z < N; ++z) {
    const float f = exp2f((red_m[z * GROUP + row] - M) * AF_LOG2E);
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

// Writes 8 output dims [c0, c0 + 8) of one query head from its combined state (M, D, O):
// a split item writes the f32 partial (o normalised, lse without the sink), an unsplit one the
// final output with the sink in the denominator. The thread with c0 == 0 writes the LSE.
__device__ __forceinline__ void decode_write8(const DecodeArgs& a, const Params& p, const DecodeWork& item, int token,
                                              int qo_head, int kv_head, int req, int q_pos, int q_len, int kv_len,
                                              bool visible, float M, float D, float (&O)[VEC], int c0) {
  float lse_out;
  if (item.partial >= 0) {
#if NORMALIZE_SOFTMAX
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
    float mf = M, df = D;
#if HAS_SINK
    const float sk = af_sink(0.f, a.sm_scale, q_pos, 0, qo_head, kv_head, req, q_len, kv_len, p);
    mf = fmaxf(M, sk);
    df = D * exp2f((M - mf) * AF_LOG2E) + exp2f((sk - mf) * AF_LOG2E);
#endif
    const float f = exp2f((M - mf) * AF_LOG2E) / df;
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] *= f;
    lse_out = mf + logf(df);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] = 0.f;
    lse_out = -AF_INF;
  }
#else
  lse_out = visible ? 0.f : -AF_INF;
#endif
  const long long row = (long long)token * a.num_qo_heads + qo_head;
  af_store8(a.o + row * HEAD_DIM_VO + c0, O);
  if (c0 == 0) a.lse[row] = lse_out;
}
