// merge.cuh — merge_states: combine the f32 partials (o, lse) of split requests into the output.
// The merge is associative and commutative; the sink joins the denominator here, once.
//
// Needs: DTypeO, Params, HEAD_DIM_VO, HAS_SINK, NORMALIZE_SOFTMAX, af_sink.

// Mirrors src/engine/decode.rs `MergeWork`.
struct MergeWork {
  int req;
  int first;  // first partial slot
  int count;  // number of partial slots
  int token;  // output row (token index)
};

struct MergeArgs {
  DTypeO* o;
  float* lse;
  const float* part_o;
  const float* part_lse;
  const MergeWork* work;
  const int* num_work;
  const int* qo_indptr;
  const int* kv_indptr;
  const int* last_page_len;
  int num_qo_heads;
  int group;
  int page_size;
  float sm_scale;
};

// One CTA per (merge item, qo head); each thread owns head dims tx, tx + blockDim.x, ….
__device__ __forceinline__ void merge_body(const MergeArgs& a, const Params& p) {
  const int w = blockIdx.x;
  if (w >= *a.num_work) return;
  const MergeWork item = a.work[w];
  const int qo_head = blockIdx.y;
  float M = -AF_INF;
  for (int s = 0; s < item.count; ++s) M = fmaxf(M, a.part_lse[(long long)(item.first + s) * a.num_qo_heads + qo_head]);
  const long long out_row = (long long)item.token * a.num_qo_heads + qo_head;
#if NORMALIZE_SOFTMAX
  float W = 0.f;
  if (M != -AF_INF) {
    for (int s = 0; s < item.count; ++s) W += exp2f((a.part_lse[(long long)(item.first + s) * a.num_qo_heads + qo_head] - M) * AF_LOG2E);
  }
  float lse_total = M != -AF_INF ? M + logf(W) : -AF_INF;
  float final_scale = M != -AF_INF ? 1.f / W : 0.f;
#if HAS_SINK
  if (M != -AF_INF) {
    const int req = item.req;
    const int n_pages = a.kv_indptr[req + 1] - a.kv_indptr[req];
    const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
    const int q_len = a.qo_indptr[req + 1] - a.qo_indptr[req];
    const int q_pos = kv_len - q_len + (item.token - a.qo_indptr[req]);
    const float sk = af_sink(0.f, a.sm_scale, q_pos, 0, qo_head, qo_head / a.group, req, q_len, kv_len, p);
    const float mf = fmaxf(lse_total, sk);
    const float df = exp2f((lse_total - mf) * AF_LOG2E) + exp2f((sk - mf) * AF_LOG2E);
    final_scale *= exp2f((lse_total - mf) * AF_LOG2E) / df;
    lse_total = mf + logf(df);
  }
#endif
#else
  float lse_total = M != -AF_INF ? 0.f : -AF_INF;
  float final_scale = 1.f;
#endif
  for (int dd = threadIdx.x; dd < HEAD_DIM_VO; dd += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < item.count; ++s) {
      const long long row = (long long)(item.first + s) * a.num_qo_heads + qo_head;
#if NORMALIZE_SOFTMAX
      const float ls = a.part_lse[row];
      const float wgt = M != -AF_INF ? exp2f((ls - M) * AF_LOG2E) : 0.f;
      acc += wgt * a.part_o[row * HEAD_DIM_VO + dd];
#else
      acc += a.part_o[row * HEAD_DIM_VO + dd];
#endif
    }
    a.o[out_row * HEAD_DIM_VO + dd] = af_from_float<DTypeO>(acc * final_scale);
  }
  if (threadIdx.x == 0) a.lse[out_row] = lse_total;
}
