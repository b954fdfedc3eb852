// softmax.cuh — the softmax state every main loop keeps per query row: the running max m (in
// the loop's units), the denominator d and the weighted sum o; how a row's state moves when a
// tile raises its max; how partial states (of thread groups, warps or KV chunks) combine; and
// how a finished row becomes an output — with the sink added exactly once, wherever the row
// finishes (an unsplit work item, or merge_states for a split one).
//
// Semantics (src/reference/mod.rs): a row with nothing visible keeps m = -inf and gives o = 0,
// lse = -inf; a NaN logit makes its row NaN (af_fmax propagates it into m).

// e^(a - b) in the exp2 form the loops use.
__device__ __forceinline__ float af_exp_diff(float a, float b) { return exp2f((a - b) * AF_LOG2E); }

// The eager online update of decode: when a tile moves a row's max from m_old to m_new, its o
// and d scale by af_rescale, and a logit l weighs af_weight(l, m_new). A row with nothing
// visible yet (m_new = -inf) keeps its zero state: scale 1, weights 0.
__device__ __forceinline__ float af_rescale(float m_old, float m_new) { return m_new == -AF_INF ? 1.f : af_exp_diff(m_old, m_new); }
__device__ __forceinline__ float af_weight(float l, float m) { return m == -AF_INF ? 0.f : af_exp_diff(l, m); }

// The lazy update of prefill: a row's running max moves only when a score exceeds it by more
// than AF_MAX_SLACK (log2 units), so p = exp2((s - m) * exp_scale) stays below 2^AF_MAX_SLACK
// (exact in f32 and in the bf16/f16 P operand); the LSE uses the same m, so the result is
// unchanged. A tunable (ATTNFORGE_NVRTC_FLAGS=-DAF_MAX_SLACK=…).
#ifndef AF_MAX_SLACK
#define AF_MAX_SLACK 8.f
#endif
// AF_FIXED_MAX=0 (a developer's NVRTC flag, for A/B runs): no fixed max for bounded logits
// (prefill_rows.cuh); every row keeps the lazy running max.
#ifndef AF_FIXED_MAX
#define AF_FIXED_MAX 1
#endif
// The exponent base of a row whose max (in the loop's units) is m: 0 while nothing is visible.
__device__ __forceinline__ float af_lazy_base(float m, float exp_scale) { return m == -AF_INF ? 0.f : m * exp_scale; }

// 2^x on the FMA pipe instead of the MUFU (x < 2^7; x < -127 and -inf give 0, NaN stays NaN):
// floor(x) by a round-down add of 1.5 * 2^23 (it lands in the sum's low mantissa bits), 2^frac by
// a degree-3 polynomial (relative error 8.6e-5, our own weighted least-squares fit, far below the
// bf16/f16 rounding of P), and 2^floor(x) built as float bits: ten FMA/ALU instructions against
// one MUFU.EX2 (tier 2 `hopper::the_fma_exp2_…` holds it to f64 and to exp2f).
__device__ __forceinline__ float af_exp2_fma(float x) {
  const float t = __fadd_rd(x, 12582912.f);
  const float f = x - (t - 12582912.f);
  const float q = fmaf(fmaf(fmaf(0.0770652145f, f, 0.227646992f), f, 0.695116341f), f, 1.f);
  const float r = q * __int_as_float((__float_as_int(t) << 23) + 0x3f800000);
  return x < -127.f ? 0.f : r;
}
// Of every 4 column tiles of 8 keys, how many a lazy softmax update exponentiates with
// af_exp2_fma (a developer flag, ATTNFORGE_NVRTC_FLAGS=-DAF_EXP2_POLY=n; 0, the default: none).
// Measured on the H200 (sm90 loop, 16K d 128, one call, TFLOP/s for n = 0 / 1 / 2 / 3 / 4): soft
// cap 482 / 469 / 431 / 419 / 387, causal 623 / 578 / — / 460 / 433, non-causal 580 / 544 / — /
// 445 / 424 (BENCHMARKS.md, twelfth session). The soft cap's 23% is not the
// MUFU's 16 ops per clock (one tanh and one exp2 per score): the extra FMA-pipe instructions
// slowed every variant, so the loop is bound by instruction issue, not by the MUFU.
#ifndef AF_EXP2_POLY
#define AF_EXP2_POLY 0
#endif
// The lazy update's exponential of column tile n.
__device__ __forceinline__ float af_exp2_col(float x, int n) { return AF_EXP2_POLY > 0 && (n & 3) < AF_EXP2_POLY ? af_exp2_fma(x) : exp2f(x); }

// What a split work item stores (no sink: merge_states adds it once): its o normalised (times
// `inv`) and its LSE, M · unit + log D (M in the loop's units, `unit` its logit per unit); a
// chunk that saw nothing stores o = 0 and lse = -inf.
struct SoftmaxPartial {
  float inv;
  float lse;
};
__device__ __forceinline__ SoftmaxPartial af_softmax_partial(bool visible, float M, float unit, float D) {
  return {visible ? 1.f / D : 0.f, visible ? M * unit + logf(D) : -AF_INF};
}

// A finished softmax row: the factor its accumulated o is multiplied by, and its LSE. M is the
// row max as a logit, D the denominator at that max; the sink (one logit per row, the variant's
// `sink` hook) joins the denominator here, once.
struct SoftmaxFinal {
  float scale;
  float lse;
};
__device__ __forceinline__ SoftmaxFinal af_softmax_final(float M, float D, float sm_scale, int q_pos, int qo_head, int kv_head, int req, int q_len, int kv_len,
                                                         const Params& p) {
  float mf = M, df = D;
#if HAS_SINK
  const float sk = af_sink(0.f, sm_scale, q_pos, 0, qo_head, kv_head, req, q_len, kv_len, p);
  mf = fmaxf(M, sk);
  df = D * af_exp_diff(M, mf) + af_exp_diff(sk, mf);
#else
  (void)sm_scale, (void)q_pos, (void)qo_head, (void)kv_head, (void)req, (void)q_len, (void)kv_len, (void)p;
#endif
  return {af_exp_diff(M, mf) / df, mf + logf(df)};
}

// Combines the N partial states (m, d, o) of query row `row` that a CTA's thread groups or warps
// left in shared memory ([N][GROUP] m and d, then [N][GROUP][HEAD_DIM_VO] o) for output dims
// [c0, c0 + VEC): the combined max M, denominator D (without normalisation: the count of parts
// that saw a key) and output O. Returns whether any part saw a visible key.
template <class Tr, int N>
__device__ __forceinline__ bool softmax_combine8(const float* red_m, const float* red_d, const float* red_o, int row, int c0, float& M, float& D, float (&O)[Tr::VEC]) {
  constexpr int GROUP = Tr::GROUP, HEAD_DIM_VO = Tr::HEAD_DIM_VO, VEC = Tr::VEC;
  M = -AF_INF;
  D = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) O[e] = 0.f;
#if NORMALIZE_SOFTMAX
  for (int z = 0; z < N; ++z) M = af_fmax(M, red_m[z * GROUP + row]);
  if (M == -AF_INF) return false;
  for (int z = 0; z < N; ++z) {
    const float f = af_exp_diff(red_m[z * GROUP + row], M);
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
