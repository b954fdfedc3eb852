// pipeline.cuh — Hopper (sm_90a) producer/consumer pipeline primitives for the sm90 prefill main
// loop (issue 14): shared-memory mbarriers with transaction counts, bulk copies from global
// memory that complete on them, and the register reallocation of warp specialisation.
//
// A ring of stages has two barriers per stage: `full` (the producer's arrivals plus the bytes of
// its bulk or tensor copies: `af_mbar_arrive_expect_tx` or `af_mbar_expect_tx`, then
// `af_bulk_copy_g2s` / `af_tma_load_4d` signalling the same barrier) and `empty` (one arrival
// per consumer thread when it is done with the stage). Round r of stage s waits on `full[s]`
// with parity r & 1; the producer, before refilling in round r >= 1, waits on `empty[s]` with
// parity (r - 1) & 1. A stage filled by gathers (a paged KV cache) takes one arrival per
// producer thread through af_cp_async_mbar_arrive (after its copies land), tensor copies too.
//
// `af_setmaxnreg_dec<N>` / `af_setmaxnreg_inc<N>`: a producer warpgroup gives registers back,
// consumer warpgroups take them (N a multiple of 8 in 24..256; every warp of the warpgroup
// executes it). Only sm_90a: all of it is empty elsewhere (AF_HAS_SM90_PIPE 0).

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define AF_HAS_SM90_PIPE 1
#else
#define AF_HAS_SM90_PIPE 0
#endif

__device__ __forceinline__ unsigned af_smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// One thread initialises a barrier expecting `count` arrivals per phase; then
// `af_mbar_init_fence` and a CTA barrier before anyone uses it.
__device__ __forceinline__ void af_mbar_init(unsigned long long* bar, unsigned count) {
#if AF_HAS_SM90_PIPE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(af_smem_addr(bar)), "r"(count) : "memory");
#endif
}

__device__ __forceinline__ void af_mbar_init_fence() {
#if AF_HAS_SM90_PIPE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// A ring's barriers: thread 0 initialises STAGES `full` barriers expecting `full_count`
// arrivals and STAGES `empty` ones expecting `empty_count`, and fences them; the caller's next
// CTA barrier publishes them.
template <int STAGES>
__device__ __forceinline__ void af_ring_init(unsigned long long (&full)[STAGES], unsigned long long (&empty)[STAGES], unsigned full_count, unsigned empty_count) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      af_mbar_init(&full[s], full_count);
      af_mbar_init(&empty[s], empty_count);
    }
    af_mbar_init_fence();
  }
}

// An arrival that also announces `bytes` of transactions the phase waits for.
__device__ __forceinline__ void af_mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
#if AF_HAS_SM90_PIPE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(af_smem_addr(bar)), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void af_mbar_arrive(unsigned long long* bar) {
#if AF_HAS_SM90_PIPE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(af_smem_addr(bar)) : "memory");
#endif
}

// Waits until the phase of parity `parity` has completed. With AF_MBAR_SPIN_LIMIT defined (the
// probes), a wait that polls that many times traps instead of hanging the GPU.
__device__ __forceinline__ void af_mbar_wait(unsigned long long* bar, unsigned parity) {
#if AF_HAS_SM90_PIPE
  const unsigned addr = af_smem_addr(bar);
  unsigned done = 0;
#ifdef AF_MBAR_SPIN_LIMIT
  unsigned long long polls = 0;
#endif
  while (!done) {
#ifdef AF_MBAR_SPIN_LIMIT
    if (++polls > (AF_MBAR_SPIN_LIMIT)) __trap();
#endif
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
#endif
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared
// memory asynchronously; completion counts `bytes` of transactions on `bar`.
__device__ __forceinline__ void af_bulk_copy_g2s(void* smem_dst, const void* gmem_src, unsigned bytes, unsigned long long* bar) {
#if AF_HAS_SM90_PIPE
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(af_smem_addr(smem_dst)), "l"(gmem_src), "r"(bytes),
               "r"(af_smem_addr(bar))
               : "memory");
#endif
}

// A 16-byte cp.async from global to the shared address `smem_dst`; `ok` false zero-fills it
// (nothing is read from `gmem_src`, which must still be a valid address).
__device__ __forceinline__ void af_cp_async16_to(unsigned smem_dst, const void* gmem_src, bool ok) {
#if AF_HAS_SM90_PIPE
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src), "r"(ok ? 16 : 0) : "memory");
#endif
}

// The producer side of a cp.async-filled stage: the barrier receives this thread's arrival once
// all of its earlier cp.async copies have landed. `noinc`: the arrival counts against the
// barrier's expected count (init it with the number of producer threads). Consumers that read
// the stage through the async proxy (wgmma) fence it after their wait (af_fence_proxy_async):
// cp.async writes through the generic proxy.
__device__ __forceinline__ void af_cp_async_mbar_arrive(unsigned long long* bar) {
#if AF_HAS_SM90_PIPE
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(af_smem_addr(bar)) : "memory");
#endif
}

template <int N>
__device__ __forceinline__ void af_setmaxnreg_dec() {
#if AF_HAS_SM90_PIPE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

template <int N>
__device__ __forceinline__ void af_setmaxnreg_inc() {
#if AF_HAS_SM90_PIPE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Named CTA barriers (ids 1..15; 0 is __syncthreads) over `count` threads, a multiple of 32:
// af_named_sync waits until `count` threads have reached the barrier (its own warp's included),
// af_named_arrive only adds the calling warp's threads. The sm90 prefill loop orders its two
// consumers' MMA issues with a pair of them (AfPingPong below).
// The id is a constant: a barrier named by a register makes ptxas reserve all sixteen.
template <int ID, int COUNT>
__device__ __forceinline__ void af_named_sync() {
#if AF_HAS_SM90_PIPE
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(COUNT) : "memory");
#endif
}
template <int ID, int COUNT>
__device__ __forceinline__ void af_named_arrive() {
#if AF_HAS_SM90_PIPE
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(COUNT) : "memory");
#endif
}

// Ping-pong of two consumer warpgroups (1 and 2) over steps 0..last: in every step each issues
// its MMAs inside begin(step) .. end(step), and the issues alternate warpgroup 1, 2, 1, 2, ...,
// so one's MMAs run on the tensor cores while the other computes its softmax (FlashAttention 3's
// "warp scheduler barrier"). Barrier 1 + w - 1 is warpgroup w's turn: warpgroup 1 waits for
// it from step 1 on (its first turn is free), warpgroup 2 from step 0; each hands the turn to the
// other at the end of a step, except warpgroup 2's last, so each barrier ends with as many
// arrivals as waits. Both warpgroups must run the same steps 0..last; `on` false (one consumer
// with nothing to compute) makes it a no-op.
struct AfPingPong {
  bool on;
  int wg, last;
  __device__ __forceinline__ void begin(int step) const {
    if (on && wg == 1 && step > 0) af_named_sync<1, 256>();
    if (on && wg == 2) af_named_sync<2, 256>();
  }
  __device__ __forceinline__ void end(int step) const {
    if (on && wg == 1) af_named_arrive<2, 256>();
    if (on && wg == 2 && step < last) af_named_arrive<1, 256>();
  }
};

// A TMA tensor map (CUtensorMap: 128 opaque bytes, encoded on the host by
// cuTensorMapEncodeTiled) and the pair the sm90 prefill loop takes as a __grid_constant__
// kernel parameter: K's and V's maps over the paged cache, `mode` 1 when they are valid (the
// producer then loads whole runs of `run` keys (8 to 64) of a page with tensor copies; 0:
// cp.async gathers), `slot_first` 1 when a page's slots are the map's second dimension (HND: [page][head][slot][d]),
// 0 when heads are (NHD: [page][slot][head][d]), and `run`. Matches src/engine/launch.rs's KvMaps.
struct alignas(128) AfTensorMap {
  unsigned long long opaque[16];
};
struct AfKvMaps {
  AfTensorMap k, v;
  int mode, slot_first, run;
};
static_assert(sizeof(AfKvMaps) == 384 && alignof(AfKvMaps) == 128, "AfKvMaps is launch.rs's KvMaps");

// Adds `bytes` to the transactions `bar`'s current phase waits for, without arriving.
__device__ __forceinline__ void af_mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
#if AF_HAS_SM90_PIPE
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(af_smem_addr(bar)), "r"(bytes) : "memory");
#endif
}

// A 4-d tensor copy of one box of `map` at coordinates (c0, c1, c2, c3) into shared memory at
// `smem_dst`, completing `bytes` of `bar`'s transactions.
__device__ __forceinline__ void af_tma_load_4d(unsigned smem_dst, const AfTensorMap* map, int c0, int c1, int c2, int c3, unsigned long long* bar) {
#if AF_HAS_SM90_PIPE
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0),
               "r"(c1), "r"(c2), "r"(c3), "r"(af_smem_addr(bar))
               : "memory");
#endif
}
