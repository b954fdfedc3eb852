// epilogue.cuh — writing a finished decode row: the f32 partial of a split work item (for
// merge_states), or the output and LSE of an unsplit one, with the sink added there (once).

// Writes VEC output dims [c0, c0 + VEC) of one query head from its combined state (M, D, O).
// The thread with c0 == 0 writes the LSE.
template <class Tr>
__device__ __forceinline__ void decode_write8(const typename Tr::Args& a, const Params& p, const DecodeWork& item, int token, int qo_head, int kv_head, int req, int q_pos,
                                              int q_len, int kv_len, bool visible, float M, float D, float (&O)[Tr::VEC], int c0) {
  constexpr int HEAD_DIM_VO = Tr::HEAD_DIM_VO, VEC = Tr::VEC;
  float lse_out;
  if (item.partial >= 0) {
#if NORMALIZE_SOFTMAX
    // af_softmax_partial's rule, spelled out: the normalised o, then the LSE. (Through the
    // helper, NVVM schedules the LSE first and the CUDA-core kernels' code moves by 3%, from
    // the code measured in BENCHMARKS.md.)
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
    const SoftmaxFinal f = af_softmax_final(M, D, a.sm_scale, q_pos, qo_head, kv_head, req, q_len, kv_len, p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] *= f.scale;
    lse_out = f.lse;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) O[e] = 0.f;
    lse_out = -AF_INF;
  }
#else
  (void)p, (void)kv_head, (void)req, (void)q_pos, (void)q_len, (void)kv_len;
  lse_out = visible ? 0.f : -AF_INF;
#endif
  const long long row = (long long)token * a.num_qo_heads + qo_head;
  af_store8(a.o + row * HEAD_DIM_VO + c0, O);
  if (c0 == 0) a.lse[row] = lse_out;
}
