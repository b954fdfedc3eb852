// prefill_sm90.cuh — batch prefill / append on Hopper (sm_90a): warpgroup MMAs (wgmma.cuh) fed
// by a producer warpgroup through an mbarrier ring (pipeline.cuh), over the paged KV cache.
//
// The same work items as prefill_sm80.cuh — one CTA per (request, block of ROWS = 128 query
// rows) and KV head, split KV chunks writing partial states, cascade group items — and the same
// rows, hooks, softmax and epilogue (prefill_rows.cuh); what differs is how the tiles get to the
// tensor cores. The CTA is three warpgroups:
//   - warpgroup 0, the producer (setmaxnreg.dec): walks the K/V tiles of the CTA's span [lo,
//     hi] through the page table (pages in any order) into a STAGES-deep ring of
//     128-byte-swizzled 64-column panels (keys past hi zero-filled), K and V on their own
//     barriers, in one of two ways the host picks per launch (AfKvMaps, launch.rs):
//       * tensor copies (mode 1; pages of a multiple of 8 slots): the tile's runs of RUN keys
//         (8 to 64 slots of one page, the host's maps.run) dealt over the four producer warps,
//         each run one TMA box per panel (RUN x 128 bytes, the copy swizzles it as the panels
//         are); the tiles then start on a multiple of RUN. A run reaching outside the span is
//         gathered instead, by warp 0. The four warps' lanes arrive on `full` (128 arrivals)
//         after adding their boxes' bytes to its transactions.
//       * gathers (mode 0; any page size): every thread copies 16-byte chunks of its keys' rows
//         with cp.async; each thread's copies arrive on `full` (cp.async.mbarrier.arrive.noinc,
//         128 arrivals).
//     A slot is refilled once both consumers have released it on `empty` (256 arrivals).
//   - warpgroups 1 and 2, the consumers (setmaxnreg.inc): 64 query rows each (Q staged once in
//     swizzled panels). Per tile: wait `full`, fence the async proxy (gathers write through
//     the generic one), S[64 x KV_TILE] = Q · Kᵀ on wgmma from shared descriptors, the hooks
//     and the lazy softmax on the S fragment (warp by warp it is mma.sync's C layout, so
//     prefill_rows.cuh's code applies as is), P packed in registers as the A operand of
//     O[64 x DVO] += P · V (V MN-major from the same panels), then release `empty`. A tile no
//     row of a warpgroup can see is skipped by the whole warpgroup (wgmma is collective); a tile
//     inside every row of a warp runs without range tests. Within a consumer, tile t's S is
//     issued before tile t - 1's P · V, and only S is waited for before tile t's softmax: the
//     P · V runs under the softmax, and O is rescaled (when a max moved) once it lands.
// When both have tiles to compute, the two consumers take turns issuing their MMAs (AfPingPong,
// pipeline.cuh: FlashAttention 3's warp scheduler barrier), so one's softmax overlaps the
// other's MMAs on the tensor cores.
// AF_PINGPONG=0 and AF_ORDER_WAIT=0 (developers' NVRTC flags, for measurements) turn the turns
// and the ordering of the softmax before the P · V wait (below) off.
//
// Shared memory (dynamic, aligned up to 1024 bytes here): Q [2][QK panels][64 rows][128 B],
// then the ring's K slots [STAGES][QK panels][KV_TILE][128 B] and V slots [STAGES][VO
// panels][KV_TILE][128 B]; 16-byte chunk c of row r of a panel at r * 128 + (c ^ r % 8) * 16.
//
// Needs: traits (PrefillSm90Traits), wgmma.cuh, pipeline.cuh, kv_ring.cuh (the page walk),
// mma.cuh (af_pack2), prefill_rows.cuh, and the variant's hooks. Compiles only for sm_90a.

#if defined(__CUDA_ARCH__) && !AF_HAS_WGMMA
#error "the sm90 prefill main loop needs sm_90a (wgmma, mbarrier transactions, setmaxnreg)"
#endif

#ifndef AF_PINGPONG
#define AF_PINGPONG 1
#endif
// AF_DIAG_NOCOPY=1 (a developer's NVRTC flag; timing only, the results are wrong): the gather
// producer issues no copies, which bounds what a faster K/V supply could give (BENCHMARKS.md).
#ifndef AF_DIAG_NOCOPY
#define AF_DIAG_NOCOPY 0
#endif
// The tensor-copy producer's shape (developers' NVRTC flags, for A/B runs; the defaults are the
// measured best, H200 2026-12-03, eleventh session, BENCHMARKS.md: with runs of 16 keys, causal
// 16K d 128 642 TFLOP/s against 480 with none of the three): AF_TMA_WARPS=4 spreads the runs of
// a tile over the four producer warps (a tensor copy takes warp-uniform operands, so ptxas
// issues a warp's per-lane copies one lane after another: one warp issuing all of them was the
// bottleneck), AF_TMA_LOOKAHEAD=1 looks each run's page up before the slot waits (its latency
// off the copies' path), AF_K_AHEAD=1 issues K one tile ahead of V (K(t + 1) before V(t), in
// the order the consumers need them; also for gathers, where it measured level).
// AF_WAIT_BEFORE_TURN=1 makes a consumer wait for its K tile before taking its ping-pong turn
// (FlashAttention 3's order; measured no faster, off).
#ifndef AF_TMA_WARPS
#define AF_TMA_WARPS 4
#endif
#ifndef AF_TMA_LOOKAHEAD
#define AF_TMA_LOOKAHEAD 1
#endif
#ifndef AF_K_AHEAD
#define AF_K_AHEAD 1
#endif
#ifndef AF_WAIT_BEFORE_TURN
#define AF_WAIT_BEFORE_TURN 0
#endif
#ifndef AF_ORDER_WAIT
#define AF_ORDER_WAIT 1
#endif

template <class Tr>
struct PrefillSm90 {
  using Args = typename Tr::Args;
  using DTypeQ = typename Tr::DTypeQ;
  using DTypeKV = typename Tr::DTypeKV;
  enum : int { HEAD_DIM_QK = Tr::HEAD_DIM_QK, HEAD_DIM_VO = Tr::HEAD_DIM_VO, GROUP = Tr::GROUP };
  enum : int { ROWS = Tr::ROWS, KV_TILE = Tr::KV_TILE, STAGES = Tr::STAGES, NUM_THREADS = Tr::NUM_THREADS };
  enum : int { QK_PANELS = HEAD_DIM_QK / 64, VO_PANELS = HEAD_DIM_VO / 64 };
  enum : int { Q_PANEL = 64 * 128, Q_WG = QK_PANELS * Q_PANEL, KV_PANEL = KV_TILE * 128, K_SLOT = QK_PANELS * KV_PANEL, V_SLOT = VO_PANELS * KV_PANEL };
  // P · V in N chunks of 128 output dims where they divide the head dim, else of 64.
  enum : int { O_CHUNK = HEAD_DIM_VO % 128 == 0 ? 128 : 64, O_CHUNKS = HEAD_DIM_VO / O_CHUNK };
  enum : int { KSTEPS = HEAD_DIM_QK / 16, NT = KV_TILE / 8, DN = HEAD_DIM_VO / 8 };
  // Registers per thread after the split: the producer's few, the consumers' S, O and P.
  enum : int { PRODUCER_REGS = 56, CONSUMER_REGS = 224 };
  static constexpr bool IS_BF16 = af_same<DTypeKV, __nv_bfloat16>::value;
  static_assert(af_same<DTypeQ, DTypeKV>::value, "the MMA main loop multiplies Q and K of one type");
  static_assert(HEAD_DIM_QK % 64 == 0 && HEAD_DIM_VO % 64 == 0, "the sm90 loop takes head dims of whole 64-column panels");
  static_assert(KV_TILE == 64 || KV_TILE == 128, "KV_TILE is a wgmma N: 64 or 128");
  static_assert(NUM_THREADS == 384 && ROWS == 128, "one producer and two consumer warpgroups of 64 rows");
  static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 256 <= 65536, "the register split must fit the register file");

  static __device__ __forceinline__ void body(const Args& a, const Params& p, const AfKvMaps& maps) {
    const int w = blockIdx.x;
    if (w >= *a.num_work) return;  // fixed-grid mode: spare CTAs exit
    const int kv_head = blockIdx.y;
    // The warpgroup index as a warp-uniform value (a shuffle from lane 0): ptxas serialises
    // every wgmma of a kernel whose role branch it cannot prove warpgroup-uniform (C7520).
    const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0), warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    __shared__ PrefillTables<ROWS, GROUP> tables;
    __shared__ int wg_lo[2], wg_hi[2];
    // K and V slots fill and drain apart: a K slot is free once S is computed, a V slot once the
    // P · V after it has run.
    __shared__ __align__(8) unsigned long long k_full[STAGES], k_empty[STAGES], v_full[STAGES], v_empty[STAGES];
    const PrefillRows<Tr> rows(a, p, tables, a.work[w], kv_head, tid, NUM_THREADS);
    const bool consumer = wg > 0;
    const int row0 = consumer ? (wg - 1) * 64 + 16 * (warp % 4) : 0;
    if (tid < 2) {
      wg_lo[tid] = 0x7fffffff;
      wg_hi[tid] = -1;
    }
    int see_lo = 0x7fffffff, see_hi = -1, in_lo = -1, in_hi = 0x7fffffff;
    if (consumer) rows.template bounds<1>(row0, g, t4, see_lo, see_hi, in_lo, in_hi);
    int lo, hi;
    rows.span(see_lo, see_hi, lane, lo, hi, consumer ? &wg_lo[wg - 1] : nullptr, consumer ? &wg_hi[wg - 1] : nullptr);
    // Tensor copies move runs of maps.run keys of one page (the host picks them only for pages
    // of a multiple of 8 slots, and a run that divides the page): the tiles start on a multiple
    // of the run. The keys before the span in the first run are zero-filled, never read
    // (span_lo), so only keys of the span reach the MMAs, as with gathers.
    const bool tma = maps.mode != 0;
    const int span_lo = lo;
    if (tma) lo &= ~(maps.run - 1);

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const unsigned base = (af_smem_addr(smem_raw) + 1023u) & ~1023u;
    unsigned char* const base_ptr = smem_raw + (base - af_smem_addr(smem_raw));
    const unsigned q_base = base, k_base = base + 2 * Q_WG, v_base = k_base + STAGES * K_SLOT;

    // Q, once: the block's rows into each consumer's swizzled panels (zeros past the item's rows).
    {
      constexpr int QCH = HEAD_DIM_QK / 8;
      for (int c = tid; c < ROWS * QCH; c += NUM_THREADS) {
        const int r = c / QCH, ch = c % QCH;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (rows.valid(r)) v = *reinterpret_cast<const uint4*>(a.q + ((long long)rows.global_token(r) * a.num_qo_heads + rows.head(r)) * HEAD_DIM_QK + ch * 8);
        *reinterpret_cast<uint4*>(base_ptr + (r / 64) * Q_WG + (ch / 8) * Q_PANEL + af_sw128_offset(r % 64, ch % 8)) = v;
      }
    }
    // A slot is full once each producer thread's copies have landed (128 arrivals; with tensor
    // copies, 32 per issuing warp) and its tensor copies' bytes with them.
    af_ring_init(k_full, k_empty, tma ? 32 * AF_TMA_WARPS : 128, 256);
    af_ring_init(v_full, v_empty, tma ? 32 * AF_TMA_WARPS : 128, 256);
    af_fence_proxy_async();  // Q was written by ordinary stores; wgmma reads it through the async proxy
    __syncthreads();
    const int num_tiles = hi >= lo ? (hi - lo + KV_TILE) / KV_TILE : 0;

    if (!consumer && tma) {
      af_setmaxnreg_dec<PRODUCER_REGS>();
      if (warp >= AF_TMA_WARPS) return;
      // Run c (lane c of the first warp; with AF_TMA_WARPS warps, lane c % RPW of warp c / RPW)
      // loads keys RUN c .. RUN c + RUN - 1 of each tile, RUN = maps.run (8, 16, 32 or 64; it
      // divides the page size, so a run is slots of one page): one box of RUN slots x 64
      // columns per panel (swizzled by the copy as the panels are), landing in the tile's rows
      // RUN c .. RUN (c + 1) - 1. (A tensor copy takes warp-uniform operands: ptxas issues a
      // warp's copies one lane after the other, so fewer, larger boxes issue faster.)
      // A run reaching outside [span_lo, hi] (the span's first or last) is gathered instead, by
      // the whole of warp 0, its keys outside zero-filled, so no garbage past a request's last
      // key (nor a key before the span) reaches the MMAs.
      const int run_len = maps.run, runs_per_tile = KV_TILE / run_len;
      const int rpw = (runs_per_tile + AF_TMA_WARPS - 1) / AF_TMA_WARPS;
      const int run = warp * rpw + lane;
      const bool runs = lane < rpw && run < runs_per_tile;
      const unsigned run_bytes = run_len * 128u;
      // `looked`: the run's page when it was looked up ahead (AF_TMA_LOOKAHEAD), else -2.
      auto load = [&](unsigned slot, const AfTensorMap* map, int panels, unsigned long long* bar, int t0, bool is_k, int looked) {
        // The tile's keys [0, head) and [tail, KV_TILE) are in runs not wholly inside the span.
        const int head = t0 < span_lo ? run_len : 0;
        const int tail = max(head, min(KV_TILE, (hi - t0 + 1) / run_len * run_len));
        if (runs) {
          const int k0 = t0 + run_len * run;
          if (run_len * run >= head && run_len * run < tail) {
            const int page = looked == -2 ? kv_page(a, k0, hi, rows.page_begin) : looked;
            const int in_page = kv_slot(a, k0);
            af_mbar_expect_tx(bar, panels * run_bytes);
#pragma unroll
            for (int pp = 0; pp < panels; ++pp) {
              const unsigned dst = slot + pp * KV_PANEL + run * run_bytes;
              if (maps.slot_first) af_tma_load_4d(dst, map, pp * 64, in_page, kv_head, page, bar);
              else af_tma_load_4d(dst, map, pp * 64, kv_head, in_page, page, bar);
            }
          }
        }
        if (warp == 0 && (head > 0 || tail < KV_TILE)) {
          // 16-byte chunks (key, panel, chunk) of the edge keys, spread over the warp's lanes.
          const int n_head = head * panels * 8, n = n_head + (KV_TILE - tail) * panels * 8;
          for (int i = lane; i < n; i += 32) {
            const int e = i < n_head ? i : i - n_head, j = (i < n_head ? 0 : tail) + e / (panels * 8);
            const int pp = e / 8 % panels, ch = e % 8;
            const int pg = t0 + j < span_lo ? -1 : kv_page(a, t0 + j, hi, rows.page_begin);
            const KeyRows<DTypeKV> kr = kv_rows<DTypeKV>(a, t0 + j, pg, kv_head);
            const DTypeKV* src = is_k ? kr.k : kr.v;
            af_cp_async16_to(slot + pp * KV_PANEL + af_sw128_offset(j, ch), pg >= 0 ? src + pp * 64 + ch * 8 : a.k, pg >= 0);
          }
        }
        af_cp_async_mbar_arrive(bar);
      };
      // The page of this lane's run of tile t when the run is a whole one of the span (-1 else).
      auto run_page = [&](int t) {
        const int k0 = lo + t * KV_TILE + run_len * run;
        return runs && t < num_tiles && k0 >= span_lo && k0 + run_len - 1 <= hi ? kv_page(a, k0, hi, rows.page_begin) : -1;
      };
      (void)run_page;  // unused without AF_TMA_LOOKAHEAD
      auto load_k = [&](int t, int looked) {
        const int s = t % STAGES, round = t / STAGES;
        if (round > 0) af_mbar_wait(&k_empty[s], (round - 1) & 1);
        load(k_base + s * K_SLOT, &maps.k, QK_PANELS, &k_full[s], lo + t * KV_TILE, true, looked);
      };
      auto load_v = [&](int t, int looked) {
        const int s = t % STAGES, round = t / STAGES;
        if (round > 0) af_mbar_wait(&v_empty[s], (round - 1) & 1);
        load(v_base + s * V_SLOT, &maps.v, VO_PANELS, &v_full[s], lo + t * KV_TILE, false, looked);
      };
      // With AF_TMA_LOOKAHEAD, the pages of the next tiles' runs are looked up before the waits,
      // so their latency is off the copies' path; -2 = look up at the copy.
#if AF_K_AHEAD
      // K one tile ahead of V: K(t + 1) is issued before V(t), as the consumers need them.
      int page_v = AF_TMA_LOOKAHEAD ? run_page(0) : -2, page_k = AF_TMA_LOOKAHEAD ? run_page(1) : -2;
      if (num_tiles > 0) load_k(0, page_v);
      for (int t = 0; t < num_tiles; ++t) {
        const int page_next = AF_TMA_LOOKAHEAD ? run_page(t + 2) : -2;
        if (t + 1 < num_tiles) load_k(t + 1, page_k);
        load_v(t, page_v);
        page_v = page_k;
        page_k = page_next;
      }
#else
      int page_next = AF_TMA_LOOKAHEAD ? run_page(0) : -2;
      for (int t = 0; t < num_tiles; ++t) {
        const int looked = page_next;
        page_next = AF_TMA_LOOKAHEAD ? run_page(t + 1) : -2;
        load_k(t, looked);
        load_v(t, looked);
      }
#endif
      return;
    }
    if (!consumer) {
      af_setmaxnreg_dec<PRODUCER_REGS>();
      // Thread t copies 16-byte chunk t % 8 of every 64-column panel of keys t / 8 + 16 i: eight
      // threads fill one 128-byte line, and one page lookup serves a key's K and V panels.
      const int chunk = tid % 8, key0 = tid / 8;
      constexpr int NK = KV_TILE / 16;
      // The page of each of this thread's keys of tile t (-1 past hi): a tile's lookups are
      // issued a tile ahead, before the waits, so their latency is off the copies' path.
      auto lookup = [&](int t, int (&pg)[NK]) {
#pragma unroll
        for (int i = 0; i < NK; ++i) pg[i] = kv_page(a, lo + t * KV_TILE + key0 + 16 * i, t < num_tiles ? hi : -1, rows.page_begin);
      };
      // This thread's chunks of the K (or V) rows of the tile's keys into a slot of `panels`
      // 64-column panels (zeros for keys past hi).
      auto gather = [&](unsigned slot, int panels, int t0, const int(&pg)[NK], bool is_k) {
#pragma unroll
        for (int i = 0; i < NK; ++i) {
          const int j = key0 + 16 * i;
          const KeyRows<DTypeKV> kr = kv_rows<DTypeKV>(a, t0 + j, pg[i], kv_head);
          const DTypeKV* src = is_k ? kr.k : kr.v;
          const unsigned off = af_sw128_offset(j, chunk);
#pragma unroll
          for (int pp = 0; pp < panels; ++pp)
            if (!AF_DIAG_NOCOPY) af_cp_async16_to(slot + pp * KV_PANEL + off, pg[i] >= 0 ? src + pp * 64 + chunk * 8 : a.k, pg[i] >= 0);
        }
      };
      auto gather_k = [&](int t, const int(&pages)[NK]) {
        const int s = t % STAGES, round = t / STAGES;
        if (round > 0) af_mbar_wait(&k_empty[s], (round - 1) & 1);
        gather(k_base + s * K_SLOT, QK_PANELS, lo + t * KV_TILE, pages, true);
        af_cp_async_mbar_arrive(&k_full[s]);
      };
      auto gather_v = [&](int t, const int(&pages)[NK]) {
        const int s = t % STAGES, round = t / STAGES;
        if (round > 0) af_mbar_wait(&v_empty[s], (round - 1) & 1);
        gather(v_base + s * V_SLOT, VO_PANELS, lo + t * KV_TILE, pages, false);
        af_cp_async_mbar_arrive(&v_full[s]);
      };
      int pg[NK], next[NK];
      lookup(0, pg);
#if AF_K_AHEAD
      // K one tile ahead of V (as the consumers need them): K(t + 1) before V(t).
      lookup(1, next);
      if (num_tiles > 0) gather_k(0, pg);
      for (int t = 0; t < num_tiles; ++t) {
        if (t + 1 < num_tiles) gather_k(t + 1, next);
        gather_v(t, pg);
#pragma unroll
        for (int i = 0; i < NK; ++i) pg[i] = next[i];
        lookup(t + 2, next);
      }
#else
      for (int t = 0; t < num_tiles; ++t) {
        lookup(t + 1, next);
        gather_k(t, pg);
        gather_v(t, pg);
#pragma unroll
        for (int i = 0; i < NK; ++i) pg[i] = next[i];
      }
#endif
      return;
    }

    af_setmaxnreg_inc<CONSUMER_REGS>();
    const int grp_lo = wg_lo[wg - 1], grp_hi = wg_hi[wg - 1];
    const unsigned qb = q_base + (wg - 1) * Q_WG;
    const float exp_scale = rows.exp_scale;
    (void)exp_scale;
    float o[1][DN][4];
    af_zero_frags(o);
    PrefillSoftmax<1> sm;
    sm.init(rows);
    // The warpgroup's visible tiles are one run [first, last] (the union of its rows' ranges);
    // the tiles before and after it are waited for and released only. Inside the run, P · V
    // of tile t - 1 is issued after tile t's S = Q · Kᵀ and runs while tile t's softmax does:
    // only S is waited for before the softmax, and O (still accumulating) is rescaled after.
    // The run's loop is branch-free around the MMAs (ptxas serialises wgmma under conditional
    // waits, C7515): the first tile is peeled, the last P · V drained after it.
    const int first = grp_hi < grp_lo ? num_tiles : max(0, (grp_lo - lo) / KV_TILE);
    const int last = grp_hi < grp_lo ? num_tiles - 1 : min(num_tiles - 1, (grp_hi - lo) / KV_TILE);
    // When both consumers have tiles to compute, their MMA issues take turns (pipeline.cuh's
    // AfPingPong) over steps 0..num_tiles: step t issues tile t's S and tile t - 1's P · V,
    // step last + 1 the run's last P · V; a tile a warpgroup skips still takes its step (after
    // its run: step t + 1), so both take steps 0..num_tiles.
    const AfPingPong turn{AF_PINGPONG && wg_hi[0] >= wg_lo[0] && wg_hi[1] >= wg_lo[1], wg, num_tiles};
    auto pass = [&](int t) {  // a tile no row of this warpgroup sees: its V copies must land before
                              // the slot is released, so a later round's copies cannot race them
      const int slot = t % STAGES, parity = (t / STAGES) & 1;
      af_mbar_wait(&k_full[slot], parity);
      af_mbar_wait(&v_full[slot], parity);
      af_mbar_arrive(&k_empty[slot]);
      af_mbar_arrive(&v_empty[slot]);
    };
    for (int t = 0; t < first && t < num_tiles; ++t) {
      turn.begin(t);
      turn.end(t);
      pass(t);
    }
    unsigned pa[KV_TILE / 16][4];
    float sacc[1][NT][4];
    float(&sflat)[KV_TILE / 2] = *reinterpret_cast<float(*)[KV_TILE / 2]>(&sacc[0][0][0]);
    auto issue_s = [&](int t) {
      const int slot = t % STAGES;
      af_mbar_wait(&k_full[slot], (t / STAGES) & 1);
      af_fence_proxy_async();
      const unsigned kb = k_base + slot * K_SLOT;
      af_wgmma_fence_all<DN * 4>(&o[0][0][0]);
      af_wgmma_fence();
#pragma unroll
      for (int k = 0; k < KSTEPS; ++k) {
        const unsigned at = (k / 4) * Q_PANEL + 32 * (k % 4), bt = (k / 4) * KV_PANEL + 32 * (k % 4);
        af_wgmma_ss<IS_BF16, KV_TILE>(sflat, af_desc_sw128_at(qb + at), af_desc_sw128_at(kb + bt), k > 0);
      }
      af_wgmma_commit();
    };
    auto issue_pv = [&](int t) {
      const int slot = t % STAGES;
      af_mbar_wait(&v_full[slot], (t / STAGES) & 1);
      af_fence_proxy_async();
      const unsigned vb = v_base + slot * V_SLOT;
#pragma unroll
      for (int k2 = 0; k2 < KV_TILE / 16; ++k2)
#pragma unroll
        for (int c = 0; c < O_CHUNKS; ++c) {
          float(&oc)[O_CHUNK / 2] = *reinterpret_cast<float(*)[O_CHUNK / 2]>(&o[0][c * (O_CHUNK / 8)][0]);
          // V's 16-key step k2 starts 2 KB into each panel; a chunk's panels are KV_PANEL apart.
          af_wgmma_rs<IS_BF16, O_CHUNK>(oc, pa[k2], af_desc_sw128_mn_at(vb + c * (O_CHUNK / 64) * KV_PANEL + 2048 * k2, KV_PANEL, 1024), 1);
        }
      af_wgmma_commit();
    };
    // Scores, weights and the P operand of tile t, once its S has landed; returns whether O
    // must be rescaled (after the pending P · V).
    float sc[1][2];
    auto softmax = [&](int t) {
      af_wgmma_fence_all<KV_TILE / 2>(sflat);
      const int t0 = lo + t * KV_TILE;
      // A tile inside every row's range of this warp (the bulk of a long causal prompt) needs
      // no range test.
      if (t0 >= in_lo && t0 + KV_TILE - 1 <= in_hi) {
        rows.score(sacc, t0, false, row0, g, t4, sm.any);
      } else {
        rows.score(sacc, t0, true, row0, g, t4, sm.any);
      }
      return sm.weigh(sacc, sc, exp_scale);
    };
    auto pack = [&]() {
      // P's A fragment for keys 16 k2 .. 16 k2 + 15: S blocks 2 k2 (k 0..7) and 2 k2 + 1 (k 8..15).
#pragma unroll
      for (int k2 = 0; k2 < KV_TILE / 16; ++k2) {
        pa[k2][0] = af_pack2<DTypeKV>(sacc[0][2 * k2][0], sacc[0][2 * k2][1]);
        pa[k2][1] = af_pack2<DTypeKV>(sacc[0][2 * k2][2], sacc[0][2 * k2][3]);
        pa[k2][2] = af_pack2<DTypeKV>(sacc[0][2 * k2 + 1][0], sacc[0][2 * k2 + 1][1]);
        pa[k2][3] = af_pack2<DTypeKV>(sacc[0][2 * k2 + 1][2], sacc[0][2 * k2 + 1][3]);
      }
    };
    if (first <= last) {
      if (AF_WAIT_BEFORE_TURN) af_mbar_wait(&k_full[first % STAGES], (first / STAGES) & 1);
      turn.begin(first);
      issue_s(first);
      turn.end(first);
      af_wgmma_wait<0>();
      af_mbar_arrive(&k_empty[first % STAGES]);
      if (softmax(first)) sm.rescale(o, sc);  // O is still zero; kept for the same arithmetic
      pack();
      for (int t = first + 1; t <= last; ++t) {
        // (A second wait on the same phase returns at once: the slot cannot be refilled before
        // this warpgroup releases it.)
        if (AF_WAIT_BEFORE_TURN) af_mbar_wait(&k_full[t % STAGES], (t / STAGES) & 1);
        turn.begin(t);
        issue_s(t);
        issue_pv(t - 1);
        turn.end(t);
        af_wgmma_wait<1>();  // S is done; the P · V behind it may still run
        af_mbar_arrive(&k_empty[t % STAGES]);
        const bool moved = softmax(t);
        // A use of the weights' sums that ptxas keeps in order with the wait below (a
        // predicated no-op, taken only for a NaN sum): without it ptxas hoists the wait for the
        // pending P · V above the exponentials, and the softmax no longer runs under it.
        if (AF_ORDER_WAIT && !(sm.d[0][0] + sm.d[0][1] >= 0.f)) asm volatile("nanosleep.u32 0;");
        af_wgmma_wait<0>();
        af_wgmma_fence_all<DN * 4>(&o[0][0][0]);
        af_mbar_arrive(&v_empty[(t - 1) % STAGES]);
        if (moved) sm.rescale(o, sc);
        pack();
      }
      af_wgmma_fence_all<DN * 4>(&o[0][0][0]);
      af_wgmma_fence();
      turn.begin(last + 1);
      issue_pv(last);
      turn.end(last + 1);
      af_wgmma_wait<0>();
      af_wgmma_fence_all<DN * 4>(&o[0][0][0]);
      af_mbar_arrive(&v_empty[last % STAGES]);
    }
    for (int t = max(last + 1, first); t < num_tiles; ++t) {
      turn.begin(t + 1);
      turn.end(t + 1);
      pass(t);
    }
    sm.template write<Tr>(rows, o, row0, g, t4);
  }
};
