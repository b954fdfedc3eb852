// decode_simt.cuh — batch decode over the paged KV cache on CUDA cores: the main loop used when
// the GQA group is 1 (or the Q and KV types differ); decode_mma.cuh is the tensor-core one.
//
// A CTA of one KV head runs work items (request, KV chunk) in turn (scheduler.cuh). Threads are
// (tx, ty, tz): tx splits the head dim (each thread owns NV 16-byte vectors, strided by BDX so
// that the BDX lanes of a row read consecutive bytes), ty is the query head within the GQA group
// (all query heads of a KV head share every K/V load), tz splits each KV tile across thread
// groups. Shared-memory rows are swizzled or padded (traits.cuh) so that rows read by different
// tz hit other banks. K/V tiles stream through the located cp.async ring (kv_ring.cuh). Each
// (ty, tz) keeps an online-softmax state (softmax.cuh); the tz states combine at the end and
// leave through the epilogue (epilogue.cuh).
//
// Needs: traits (DecodeSimtTraits), the parts above, and the variant's hooks.

template <class Tr>
struct DecodeSimt {
  using Args = typename Tr::Args;
  using DTypeQ = typename Tr::DTypeQ;
  using DTypeKV = typename Tr::DTypeKV;
  enum : int { HEAD_DIM_QK = Tr::HEAD_DIM_QK, HEAD_DIM_VO = Tr::HEAD_DIM_VO, GROUP = Tr::GROUP };
  enum : int { BDX = Tr::BDX, BDZ = Tr::BDZ, TILE_PER_Z = Tr::TILE_PER_Z, STAGES = Tr::STAGES, NV = Tr::NV };
  enum : int { KV_TILE = Tr::KV_TILE, NUM_THREADS = Tr::NUM_THREADS, ROW_QK = Tr::ROW_QK, ROW_VO = Tr::ROW_VO, VEC = Tr::VEC };
  static_assert(Tr::KV_VEC == VEC, "the CUDA-core loop reads K/V rows 16 bytes (8 elements) at a time");

  // Work item w of the list (the caller loops a CTA over its items); `req < 0` pads a balanced
  // plan's list and does nothing.
    static __device__ __forceinline__ void body(const Args& a, const Params& p, int w, int kv_head) {
    const DecodeWork item = a.work[w];
    if (item.req < 0) return;
    const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
    const int tid = (tz * GROUP + ty) * BDX + tx;
    const DecodeRequest r = decode_request<Tr>(a, p, item, kv_head);
    const int req = r.req, token = r.token, q_len = r.q_len, page_begin = r.page_begin, kv_len = r.kv_len, q_pos = r.q_pos;
    const int lo = r.lo, hi = r.hi;
    const float sm_scale = a.sm_scale;
    const int qo_head = kv_head * GROUP + ty;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
    DTypeKV* v_smem = k_smem + STAGES * KV_TILE * ROW_QK;
    __shared__ KeyRows<DTypeKV> key_rows[STAGES][KV_TILE];

    // Vector v of this thread covers dims [(v * BDX + tx) * VEC, … + VEC).
    float qf[NV][VEC];
  #pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int d0 = (v * BDX + tx) * VEC;
      if (d0 < HEAD_DIM_QK) {
        af_load8(a.q + ((long long)token * a.num_qo_heads + qo_head) * HEAD_DIM_QK + d0, qf[v]);
      } else {
  #pragma unroll
        for (int e = 0; e < VEC; ++e) qf[v][e] = 0.f;
      }
    }
    const bool has_vo = tx * VEC < HEAD_DIM_VO;

    float m = -AF_INF, d = 0.f;
    bool any = false;
    float o[NV][VEC];
  #pragma unroll
    for (int v = 0; v < NV; ++v)
  #pragma unroll
      for (int e = 0; e < VEC; ++e) o[v][e] = 0.f;
    kv_stream<Tr>(a, k_smem, v_smem, key_rows, lo, hi, page_begin, kv_head, tid, [&](int stage, int t) {
      const int tile_start = lo + t * KV_TILE;
      float l[TILE_PER_Z];
      float m_tile = -AF_INF;
  #pragma unroll
      for (int jj = 0; jj < TILE_PER_Z; ++jj) {
        const int j = tz * TILE_PER_Z + jj;
        const int pos = tile_start + j;
        float s = 0.f;
  #pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int d0 = (v * BDX + tx) * VEC;
          if (d0 < HEAD_DIM_QK) {
            float kf[VEC];
            af_load8(k_smem + (stage * KV_TILE + j) * ROW_QK + kv_chunk<Tr>(j, v * BDX + tx), kf);
  #pragma unroll
            for (int e = 0; e < VEC; ++e) s = fmaf(qf[v][e], kf[e], s);
          }
        }
  #pragma unroll
        for (int off = BDX / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        bool vis = pos <= hi;
  #if HAS_MASK
        vis = vis && af_mask(0.f, sm_scale, q_pos, pos, qo_head, kv_head, req, q_len, kv_len, p);
  #endif
  #if NORMALIZE_SOFTMAX
        l[jj] = vis ? af_logits(s, sm_scale, q_pos, pos, qo_head, kv_head, req, q_len, kv_len, p) : -AF_INF;
        m_tile = af_fmax(m_tile, l[jj]);
  #else
        l[jj] = vis ? af_logits(s, sm_scale, q_pos, pos, qo_head, kv_head, req, q_len, kv_len, p) : 0.f;
        any = any || vis;
  #endif
      }
      // o += w · V[key jj of this tz's share of the tile], over this thread's dims.
      auto add_v = [&](int jj, float w) {
  #pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int d0 = (v * BDX + tx) * VEC;
          if (d0 < HEAD_DIM_VO) {
            float vf[VEC];
            af_load8(v_smem + (stage * KV_TILE + tz * TILE_PER_Z + jj) * ROW_VO + kv_chunk<Tr>(tz * TILE_PER_Z + jj, v * BDX + tx), vf);
  #pragma unroll
            for (int e = 0; e < VEC; ++e) o[v][e] = fmaf(w, vf[e], o[v][e]);
          }
        }
      };
  #if NORMALIZE_SOFTMAX
      const float m_new = af_fmax(m, m_tile);
      if (m_new != -AF_INF) {
        const float scale = af_exp_diff(m, m_new);
        d *= scale;
  #pragma unroll
        for (int v = 0; v < NV; ++v)
  #pragma unroll
          for (int e = 0; e < VEC; ++e) o[v][e] *= scale;
  #pragma unroll
        for (int jj = 0; jj < TILE_PER_Z; ++jj) {
          const float pj = af_exp_diff(l[jj], m_new);
          d += pj;
          add_v(jj, pj);
        }
        m = m_new;
      }
  #else
  #pragma unroll
      for (int jj = 0; jj < TILE_PER_Z; ++jj) add_v(jj, l[jj]);
  #endif
    });
    __syncthreads();  // the ring is reused for the reduction below

    // Merge the BDZ states of each query head: red = [BDZ][GROUP] m, d, then o.
    float* red = reinterpret_cast<float*>(smem_raw);
    float* red_m = red;
    float* red_d = red_m + BDZ * GROUP;
    float* red_o = red_d + BDZ * GROUP;
    const int zg = tz * GROUP + ty;
    if (tx == 0) {
      red_m[zg] = m;
      red_d[zg] = NORMALIZE_SOFTMAX ? d : (any ? 1.f : 0.f);
    }
  #pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int d0 = (v * BDX + tx) * VEC;
      if (d0 < HEAD_DIM_VO) {
  #pragma unroll
        for (int e = 0; e < VEC; ++e) red_o[zg * HEAD_DIM_VO + d0 + e] = o[v][e];
      }
    }
    __syncthreads();
    if (tz != 0 || !has_vo) return;

    // Each of this thread's vectors is combined over the BDZ states and goes out through the shared
    // epilogue (the thread holding dims [0, 8) also writes the LSE).
  #pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int d0 = (v * BDX + tx) * VEC;
      if (d0 >= HEAD_DIM_VO) continue;
      float M, D, O[VEC];
      const bool visible = softmax_combine8<Tr, BDZ>(red_m, red_d, red_o, ty, d0, M, D, O);
      decode_write8<Tr>(a, p, item, token, qo_head, kv_head, req, q_pos, q_len, kv_len, visible, M, D, O, d0);
    }
  }
};
