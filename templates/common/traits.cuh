// traits.cuh — what a kernel instance is, at compile time: one traits struct per instance, built
// by its .cu.tera from the config (src/jit: KernelConfig and the family's tile), instead of
// per-file macros. Every part (kv_ring.cuh, softmax.cuh, scheduler.cuh, the main loops, merge.cuh)
// takes its traits as a template parameter, so one translation unit can hold several main loops.
//
// The variant's hooks and switches (HAS_MASK, NORMALIZE_SOFTMAX, …, from variant.cuh.tera) are
// the variant's, not the instance's, and stay macros.

// Element types, head dims and the GQA group: what every part needs. Constants are enumerators,
// not static data members, so that NVRTC emits no global variable for them.
template <typename Q, typename KV, typename O, int DQK, int DVO, int G>
struct AttnShape {
  using DTypeQ = Q;
  using DTypeKV = KV;
  using DTypeO = O;
  enum : int { HEAD_DIM_QK = DQK, HEAD_DIM_VO = DVO, GROUP = G };
  // K/V elements per 16-byte chunk: the unit of the ring's copies and of its swizzle. The main
  // loops read 2-byte elements; an 8-bit KV is a load policy of its own (a new ring part).
  enum : int { KV_VEC = 16 / (int)sizeof(KV) };
  // Elements converted per vector load or store of Q and O (af_load8 / af_store8).
  enum : int { VEC = 8 };
  static_assert(sizeof(Q) == 2 && sizeof(KV) == 2 && sizeof(O) == 2, "the main loops take 2-byte Q, K/V and O elements");
};

// The K/V ring: its depth, keys per tile, the CTA's threads, and its shared-memory rows. The 8
// rows that an ldmatrix (or 8 tz groups) reads must hit 8 different bank groups, and every
// 32-byte sector a cp.async copies must land in one aligned 32-byte unit of shared memory: a
// sector that straddles two is fetched from L2 twice (decode, H200: 1.5x the L2 sectors and
// requests of the bytes read, 48% L2 "hits").
// - SWIZZLE (decode, head dims multiples of 64): unpadded rows; 16-byte chunk c of row r is
//   stored at chunk c ^ (r & 7), which keeps each sector in its own aligned pair of chunks.
// - otherwise (prefill, other head dims): rows padded by one 16-byte chunk, so consecutive rows
//   start 4 banks apart (odd rows straddle sectors).
template <class S, int STAGES_, int KV_TILE_, int NUM_THREADS_, bool SWIZZLE_>
struct RingTraits : S {
  enum : int {
    STAGES = STAGES_,
    KV_TILE = KV_TILE_,
    NUM_THREADS = NUM_THREADS_,
    KV_SWIZZLE = SWIZZLE_ ? 1 : 0,
    ROW_QK = SWIZZLE_ ? S::HEAD_DIM_QK : S::HEAD_DIM_QK + S::KV_VEC,
    ROW_VO = SWIZZLE_ ? S::HEAD_DIM_VO : S::HEAD_DIM_VO + S::KV_VEC,
  };
  static_assert(STAGES_ >= 2, "the ring needs two slots");
  static_assert(!SWIZZLE_ || (S::HEAD_DIM_QK % 64 == 0 && S::HEAD_DIM_VO % 64 == 0), "the swizzled ring needs rows of whole 128-byte lines");
  static_assert(NUM_THREADS_ % 32 == 0 && NUM_THREADS_ <= 1024, "a CTA is whole warps, at most 1024 threads");
};

// Decode on CUDA cores (decode_simt.cuh): threads (tx, ty, tz) = (BDX along the head dim, the
// GROUP query heads, BDZ groups splitting each tile of BDZ * TILE_PER_Z keys).
template <class S, int BDX_, int BDZ_, int TILE_PER_Z_, int STAGES_, int NV_, int MIN_CTAS_, bool SWIZZLE_>
struct DecodeSimtTraits : RingTraits<S, STAGES_, BDZ_ * TILE_PER_Z_, BDX_ * S::GROUP * BDZ_, SWIZZLE_> {
  using Work = DecodeWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, DecodeWork>;
  enum : int { BDX = BDX_, BDZ = BDZ_, TILE_PER_Z = TILE_PER_Z_, NV = NV_, MIN_CTAS = MIN_CTAS_ };
};

// Decode on tensor cores (decode_mma.cuh): NUM_WARPS warps, 16 keys each per tile.
template <class S, int WARPS_, int STAGES_, int MIN_CTAS_, bool SWIZZLE_>
struct DecodeMmaTraits : RingTraits<S, STAGES_, 16 * WARPS_, 32 * WARPS_, SWIZZLE_> {
  using Work = DecodeWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, DecodeWork>;
  enum : int { NUM_WARPS = WARPS_, MIN_CTAS = MIN_CTAS_ };
};

// Prefill on sm80 tensor cores (prefill_sm80.cuh): NUM_WARPS warps of MTILES 16-row blocks.
template <class S, int WARPS_, int MTILES_, int KV_TILE_, int STAGES_, int MIN_CTAS_>
struct PrefillSm80Traits : RingTraits<S, STAGES_, KV_TILE_, 32 * WARPS_, false> {
  using Work = PrefillWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, PrefillWork>;
  enum : int { NUM_WARPS = WARPS_, MTILES = MTILES_, ROWS = 16 * MTILES_ * WARPS_, MIN_CTAS = MIN_CTAS_ };
  static_assert(KV_TILE_ % 16 == 0, "KV_TILE must be a multiple of 16");
};

// Prefill on Hopper (prefill_sm90.cuh): a producer warpgroup and two consumer warpgroups of 64
// query rows, KV_TILE keys per tile (a wgmma N: 64 or 128), a STAGES-deep mbarrier ring.
template <class S, int KV_TILE_, int STAGES_>
struct PrefillSm90Traits : S {
  using Work = PrefillWork;
  using Args = AttnArgs<typename S::DTypeQ, typename S::DTypeKV, typename S::DTypeO, PrefillWork>;
  enum : int { KV_TILE = KV_TILE_, STAGES = STAGES_, NUM_THREADS = 384, ROWS = 128, MIN_CTAS = 1 };
  static_assert(STAGES_ >= 2, "the ring needs two slots");
};
