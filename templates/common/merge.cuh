// merge.cuh — merge_states: combine the f32 partials (o, lse) of split requests into the output.
// The merge is associative and commutative; the sink joins the denominator here, once
// (af_softmax_final, softmax.cuh).
//
// Needs: traits (DTypeO, HEAD_DIM_VO), the ABI structs (abi.cu.tera), softmax.cuh, and the variant's hooks.

// Partial weights kept in shared memory per merge item; a longer item recomputes the rest.
#define MERGE_STAGE 256

// Block-wide max (MAX) or sum over whole warps; `red` holds one value per warp.
template <bool MAX>
__device__ __forceinline__ float merge_reduce(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = MAX ? af_fmax(x, y) : x + y;
  }
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < (int)blockDim.x / 32; ++i) r = MAX ? af_fmax(r, red[i]) : r + red[i];
  __syncthreads();  // red is reused by the next reduction
  return r;
}

// One CTA of whole warps (at most 4) per (merge item, qo head) at a time: CTA x merges items
// x, x + gridDim.x, … (a fixed grid is smaller than its list's capacity; otherwise the grid is
// the list). The item's partial LSEs are read in parallel, one per thread, and their weights
// staged in shared memory; each thread then owns head dims tx, tx + blockDim.x, … and sums the
// partials' outputs with 8 loads in flight. Launched right behind the kernel that writes the
// partials (programmatic dependent launch on sm_90+): everything before af_wait_prior_grid
// reads only what the plan upload wrote.
template <class Tr>
__device__ __forceinline__ void merge_item(const MergeArgs<typename Tr::DTypeO>& a, const Params& p, const MergeWork item, float* wgt, float* red) {
  using DTypeO = typename Tr::DTypeO;
  constexpr int HEAD_DIM_VO = Tr::HEAD_DIM_VO;
  const int qo_head = blockIdx.y;
  const int tid = threadIdx.x, nt = blockDim.x;
  const long long H = a.num_qo_heads;
  const float* lse = a.part_lse + (long long)item.first * H + qo_head;

  float M = -AF_INF;
  for (int s = tid; s < item.count; s += nt) M = af_fmax(M, lse[s * H]);  // a NaN partial makes the row NaN
  M = merge_reduce<true>(M, red);
  const long long out_row = (long long)item.token * H + qo_head;
#if NORMALIZE_SOFTMAX
  float W = 0.f;
  for (int s = tid; s < item.count; s += nt) {
    const float e = M != -AF_INF ? exp2f((lse[s * H] - M) * AF_LOG2E) : 0.f;
    if (s < MERGE_STAGE) wgt[s] = e;
    W += e;
  }
  W = merge_reduce<false>(W, red);  // its barrier also publishes wgt
  float lse_total = M != -AF_INF ? M + logf(W) : -AF_INF;
  float final_scale = M != -AF_INF ? 1.f / W : 0.f;
#if HAS_SINK
  if (M != -AF_INF) {
    const int req = item.req;
    const int n_pages = a.kv_indptr[req + 1] - a.kv_indptr[req];
    const int kv_len = n_pages == 0 ? 0 : (n_pages - 1) * a.page_size + a.last_page_len[req];
    const int q_len = a.qo_indptr[req + 1] - a.qo_indptr[req];
    const int q_pos = kv_len - q_len + (item.token - a.qo_indptr[req]);
    // The partials combined are one row at max lse_total and denominator 1.
    const SoftmaxFinal f = af_softmax_final(lse_total, 1.f, a.sm_scale, q_pos, qo_head, qo_head / a.group, req, q_len, kv_len, p);
    final_scale *= f.scale;
    lse_total = f.lse;
  }
#endif
#else
  // Without normalisation the partials add up as they are.
  for (int s = tid; s < item.count && s < MERGE_STAGE; s += nt) wgt[s] = 1.f;
  __syncthreads();
  float lse_total = M != -AF_INF ? 0.f : -AF_INF;
  float final_scale = 1.f;
#endif
  const int staged = min(item.count, MERGE_STAGE);
  const long long step = H * HEAD_DIM_VO;
  const float* po = a.part_o + ((long long)item.first * H + qo_head) * HEAD_DIM_VO;
  for (int dd = tid; dd < HEAD_DIM_VO; dd += nt) {
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < staged; ++s) acc = fmaf(wgt[s], po[s * step + dd], acc);
    for (int s = staged; s < item.count; ++s) {
#if NORMALIZE_SOFTMAX
      const float e = M != -AF_INF ? exp2f((lse[s * H] - M) * AF_LOG2E) : 0.f;
#else
      const float e = 1.f;
#endif
      acc = fmaf(e, po[s * step + dd], acc);
    }
    a.o[out_row * HEAD_DIM_VO + dd] = af_from_float<DTypeO>(acc * final_scale);
  }
  if (tid == 0) a.lse[out_row] = lse_total;
}

template <class Tr>
__device__ __forceinline__ void merge_body(const MergeArgs<typename Tr::DTypeO>& a, const Params& p) {
  const int n = *a.num_work;
  if ((int)blockIdx.x >= n) return;
  __shared__ float wgt[MERGE_STAGE];
  __shared__ float red[4];
  af_wait_prior_grid();
  for (int w = blockIdx.x; w < n; w += gridDim.x) {
    merge_item<Tr>(a, p, a.work[w], wgt, red);
    __syncthreads();  // the next item rewrites wgt and red
  }
}
