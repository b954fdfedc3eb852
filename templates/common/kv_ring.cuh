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
