// attention.cu: causal GQA attention over packed sequences (training and prefill) and its
// backward (decode attention against the paged KV cache is kernels/decode.cu).
//
// Layouts: q, out, dq [n_tok, n_heads, D]; k, v, dk, dv [n_tok, n_kv, D] (bf16, packed tokens,
// sequence b owns rows cu[b]..cu[b+1]); lse, dot [n_heads, n_tok] f32. Query head h reads kv
// head h / (n_heads / n_kv). Scale 1/sqrt(D). Causal within each sequence. D is 64 or 128 (a
// template parameter; one entry point per value).
//
// Algorithm (flash-style, never a [seq, seq] matrix in memory): key/value tiles of 32 rows are
// staged in shared memory as f32; one warp owns a few query rows; lane l scores key l of the
// tile against each of the warp's rows (q rows are read from shared memory by broadcast), the
// online softmax keeps a running max m and sum l per row, and lane l accumulates output
// dimensions l, l+32, ... All arithmetic is f32 FFMA (no tensor cores in this version).
//
// Shared prefix (the shared-prompt layout, Prefix Grouper arXiv 2506.05433): with has_prefix
//   != 0, `prefix` holds 2 u32 per sequence, rows lo..hi whose keys sequence b's queries read in full
//   before their own causal keys (a GRPO response reads its prompt). The key loops of the
//   forward and of dq walk "virtual" keys: the hi - lo prefix rows, then the sequence's own. In
//   dk/dv a sequence's key block also sums, after its own causal queries, every query of each
//   sequence that reads it as prefix, from the CSR table rd_off[b]..rd_off[b+1] into rd (the
//   readers of sequence b in increasing order, built on the host), so the sum order is fixed.
//   With has_prefix = 0 the three tables are not read (any buffer may be passed).
// attn_fwd_d{64,128}: out = softmax(scale q k^T + causal mask) v; lse = m + log(l) (natural log
//   of the scaled scores). Launch: grid (ceil(max_len/16), n_heads, n_seq), block 128
//   (4 warps x 4 query rows).
// attn_bwd_dot: dot[h, t] = sum_d dout[t,h,d] * out[t,h,d] (the FA2 "D" term).
//   Launch: grid (ceil(n_tok*n_heads/8)), block 256 (one warp per (token, head)).
// attn_bwd_dq_d{64,128}: recomputes p = exp(scale q.k - lse), dp = dout.v, ds = p (dp - dot),
//   dq = scale * sum_j ds_j k_j. Launch: grid (ceil(max_len/8), n_heads, n_seq), block 128
//   (4 warps x 2 query rows).
// attn_bwd_dkdv_d{64,128}: per key j (8 keys per block, 2 per warp) sums over every query row i
//   >= j of every query head of its group: dv_j = sum p_ij dout_i, dk_j = scale sum ds_ij q_i;
//   query tiles of 32 rows in shared memory, lane = query row. No atomics: dq and dk/dv come from
//   two kernels that both recompute p. Launch: grid (ceil(max_len/8), n_kv, n_seq), block 128.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)
#define BC 32
#define FWD_RPW 4
#define FWD_BM (ATT_WARPS * FWD_RPW)
#define DQ_RPW 2
#define DQ_BM (ATT_WARPS * DQ_RPW)
#define KV_KPW 2
#define KV_BN (ATT_WARPS * KV_KPW)

template <int D>
__device__ __forceinline__ void attn_fwd_impl(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                              const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                              float* __restrict__ lse, const u32* __restrict__ cu,
                                              const u32* __restrict__ prefix, int has_prefix, int n_tok,
                                              int n_heads, int n_kv) {
    constexpr int C = D / 32;
    __shared__ float Qs[FWD_BM][D];
    __shared__ float Ks[BC][D + 1];
    __shared__ float Vs[BC][D];
    const int b = blockIdx.z, h = blockIdx.y;
    const int s0 = (int)cu[b];
    const int len = (int)cu[b + 1] - s0;
    const int q0 = blockIdx.x * FWD_BM;
    if (q0 >= len) return;  // uniform over the block
    const int kvh = h / (n_heads / n_kv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t qstride = (size_t)n_heads * D, kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);

    for (int idx = tid; idx < FWD_BM * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx % D, qi = q0 + r;
        Qs[r][d] = qi < len ? bf2f(q[(size_t)(s0 + qi) * qstride + h * D + d]) * scale : 0.f;
    }
    float m[FWD_RPW], l[FWD_RPW], o[FWD_RPW][C];
#pragma unroll
    for (int rr = 0; rr < FWD_RPW; ++rr) {
        m[rr] = NEG_INF_F;
        l[rr] = 0.f;
#pragma unroll
        for (int c = 0; c < C; ++c) o[rr][c] = 0.f;
    }
    // virtual keys: the prefix rows plo..plo+plen, then the sequence's own keys
    const int plo = has_prefix ? (int)prefix[2 * b] : 0;
    const int plen = has_prefix ? (int)prefix[2 * b + 1] - plo : 0;
    const int kend = min(len, q0 + FWD_BM);
    for (int k0 = 0; k0 < plen + kend; k0 += BC) {
        __syncthreads();
        for (int idx = tid; idx < BC * D; idx += ATT_THREADS) {
            const int r = idx / D, d = idx % D, vj = k0 + r;
            const bool in = vj < plen || vj - plen < len;
            const int row = vj < plen ? plo + vj : s0 + vj - plen;
            const size_t off = (size_t)row * kstride + kvh * D + d;
            Ks[r][d] = in ? bf2f(k[off]) : 0.f;
            Vs[r][d] = in ? bf2f(v[off]) : 0.f;
        }
        __syncthreads();
        const int vj = k0 + lane, kj = vj - plen;
        float s[FWD_RPW];
#pragma unroll
        for (int rr = 0; rr < FWD_RPW; ++rr) s[rr] = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
            const float kv = Ks[lane][d];
#pragma unroll
            for (int rr = 0; rr < FWD_RPW; ++rr) s[rr] += Qs[warp * FWD_RPW + rr][d] * kv;
        }
        const int jn = min(BC, plen + kend - k0);
#pragma unroll
        for (int rr = 0; rr < FWD_RPW; ++rr) {
            const int qi = q0 + warp * FWD_RPW + rr;
            const bool valid = vj < plen || (kj < len && kj <= qi);
            const float sv = valid ? s[rr] : NEG_INF_F;
            const float mnew = fmaxf(m[rr], warp_max(sv));
            const float p = valid ? expf(sv - mnew) : 0.f;
            const float corr = m[rr] == NEG_INF_F ? 0.f : expf(m[rr] - mnew);
            l[rr] = l[rr] * corr + warp_sum(p);
            m[rr] = mnew;
#pragma unroll
            for (int c = 0; c < C; ++c) o[rr][c] *= corr;
            for (int j = 0; j < jn; ++j) {
                const float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
                for (int c = 0; c < C; ++c) o[rr][c] += pj * Vs[j][lane + 32 * c];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < FWD_RPW; ++rr) {
        const int qi = q0 + warp * FWD_RPW + rr;
        if (qi < len) {
            const float inv = 1.0f / l[rr];
            bf16_t* orow = out + (size_t)(s0 + qi) * qstride + h * D;
#pragma unroll
            for (int c = 0; c < C; ++c) orow[lane + 32 * c] = f2bf(o[rr][c] * inv);
            if (lane == 0) lse[(size_t)h * n_tok + s0 + qi] = m[rr] + logf(l[rr]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_fwd_d64(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse, const u32* cu,
             const u32* prefix, int has_prefix, int n_tok, int n_heads, int n_kv) {
    attn_fwd_impl<64>(q, k, v, out, lse, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_fwd_d128(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse, const u32* cu,
              const u32* prefix, int has_prefix, int n_tok, int n_heads, int n_kv) {
    attn_fwd_impl<128>(q, k, v, out, lse, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}

extern "C" __global__ void attn_bwd_dot(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ out,
                                        float* __restrict__ dot, int n_tok, int n_heads, int head_dim) {
    const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (gw >= n_tok * n_heads) return;  // uniform per warp
    const int t = gw / n_heads, h = gw % n_heads;
    const size_t base = (size_t)gw * head_dim;
    float acc = 0.f;
    for (int d = lane; d < head_dim; d += 32) acc += bf2f(dout[base + d]) * bf2f(out[base + d]);
    acc = warp_sum(acc);
    if (lane == 0) dot[(size_t)h * n_tok + t] = acc;
}

template <int D>
__device__ __forceinline__ void attn_bwd_dq_impl(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ q,
                                                 const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                                 const float* __restrict__ lse, const float* __restrict__ dot,
                                                 bf16_t* __restrict__ dq, const u32* __restrict__ cu,
                                                 const u32* __restrict__ prefix, int has_prefix, int n_tok,
                                                 int n_heads, int n_kv) {
    constexpr int C = D / 32;
    __shared__ float Qs[DQ_BM][D];
    __shared__ float Gs[DQ_BM][D];
    __shared__ float Ks[BC][D + 1];
    __shared__ float Vs[BC][D + 1];
    const int b = blockIdx.z, h = blockIdx.y;
    const int s0 = (int)cu[b];
    const int len = (int)cu[b + 1] - s0;
    const int q0 = blockIdx.x * DQ_BM;
    if (q0 >= len) return;
    const int kvh = h / (n_heads / n_kv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t qstride = (size_t)n_heads * D, kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);

    for (int idx = tid; idx < DQ_BM * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx % D, qi = q0 + r;
        const bool in = qi < len;
        const size_t off = (size_t)(s0 + qi) * qstride + h * D + d;
        Qs[r][d] = in ? bf2f(q[off]) * scale : 0.f;
        Gs[r][d] = in ? bf2f(dout[off]) : 0.f;
    }
    float lr[DQ_RPW], dr[DQ_RPW], acc[DQ_RPW][C];
#pragma unroll
    for (int rr = 0; rr < DQ_RPW; ++rr) {
        const int qi = q0 + warp * DQ_RPW + rr;
        lr[rr] = qi < len ? lse[(size_t)h * n_tok + s0 + qi] : 0.f;
        dr[rr] = qi < len ? dot[(size_t)h * n_tok + s0 + qi] : 0.f;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[rr][c] = 0.f;
    }
    const int plo = has_prefix ? (int)prefix[2 * b] : 0;
    const int plen = has_prefix ? (int)prefix[2 * b + 1] - plo : 0;
    const int kend = min(len, q0 + DQ_BM);
    for (int k0 = 0; k0 < plen + kend; k0 += BC) {
        __syncthreads();
        for (int idx = tid; idx < BC * D; idx += ATT_THREADS) {
            const int r = idx / D, d = idx % D, vj = k0 + r;
            const bool in = vj < plen || vj - plen < len;
            const int row = vj < plen ? plo + vj : s0 + vj - plen;
            const size_t off = (size_t)row * kstride + kvh * D + d;
            Ks[r][d] = in ? bf2f(k[off]) : 0.f;
            Vs[r][d] = in ? bf2f(v[off]) : 0.f;
        }
        __syncthreads();
        const int vj = k0 + lane, kj = vj - plen;
        float s[DQ_RPW], dp[DQ_RPW];
#pragma unroll
        for (int rr = 0; rr < DQ_RPW; ++rr) s[rr] = dp[rr] = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
            const float kv = Ks[lane][d], vv = Vs[lane][d];
#pragma unroll
            for (int rr = 0; rr < DQ_RPW; ++rr) {
                s[rr] += Qs[warp * DQ_RPW + rr][d] * kv;
                dp[rr] += Gs[warp * DQ_RPW + rr][d] * vv;
            }
        }
        const int jn = min(BC, plen + kend - k0);
#pragma unroll
        for (int rr = 0; rr < DQ_RPW; ++rr) {
            const int qi = q0 + warp * DQ_RPW + rr;
            const bool valid = qi < len && (vj < plen || (kj < len && kj <= qi));
            const float p = valid ? expf(s[rr] - lr[rr]) : 0.f;
            const float ds = p * (dp[rr] - dr[rr]);
            for (int j = 0; j < jn; ++j) {
                const float dsj = __shfl_sync(FULL_MASK, ds, j);
#pragma unroll
                for (int c = 0; c < C; ++c) acc[rr][c] += dsj * Ks[j][lane + 32 * c];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < DQ_RPW; ++rr) {
        const int qi = q0 + warp * DQ_RPW + rr;
        if (qi < len) {
            bf16_t* row = dq + (size_t)(s0 + qi) * qstride + h * D;
#pragma unroll
            for (int c = 0; c < C; ++c) row[lane + 32 * c] = f2bf(acc[rr][c] * scale);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_bwd_dq_d64(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                const float* dot, bf16_t* dq, const u32* cu, const u32* prefix, int has_prefix, int n_tok,
                int n_heads, int n_kv) {
    attn_bwd_dq_impl<64>(dout, q, k, v, lse, dot, dq, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_bwd_dq_d128(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                 const float* dot, bf16_t* dq, const u32* cu, const u32* prefix, int has_prefix, int n_tok,
                 int n_heads, int n_kv) {
    attn_bwd_dq_impl<128>(dout, q, k, v, lse, dot, dq, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}

template <int D>
__device__ __forceinline__ void attn_bwd_dkdv_impl(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ q,
                                                   const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                                   const float* __restrict__ lse, const float* __restrict__ dot,
                                                   bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
                                                   const u32* __restrict__ cu, const u32* __restrict__ prefix,
                                                   const u32* __restrict__ rd_off, const u32* __restrict__ rd,
                                                   int has_prefix, int n_tok, int n_heads, int n_kv) {
    constexpr int C = D / 32;
    __shared__ float Qs[BC][D + 1];
    __shared__ float Gs[BC][D + 1];
    __shared__ float Ks[KV_BN][D];
    __shared__ float Vs[KV_BN][D];
    __shared__ float Ls[BC];
    __shared__ float Ds[BC];
    const int b = blockIdx.z, g = blockIdx.y;
    const int s0 = (int)cu[b];
    const int len = (int)cu[b + 1] - s0;
    const int kb0 = blockIdx.x * KV_BN;
    if (kb0 >= len) return;
    const int rep = n_heads / n_kv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t qstride = (size_t)n_heads * D, kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);

    for (int idx = tid; idx < KV_BN * D; idx += ATT_THREADS) {
        const int r = idx / D, d = idx % D, kj = kb0 + r;
        const bool in = kj < len;
        const size_t off = (size_t)(s0 + kj) * kstride + g * D + d;
        Ks[r][d] = in ? bf2f(k[off]) : 0.f;
        Vs[r][d] = in ? bf2f(v[off]) : 0.f;
    }
    float adk[KV_KPW][C], adv[KV_KPW][C];
#pragma unroll
    for (int kk = 0; kk < KV_KPW; ++kk)
#pragma unroll
        for (int c = 0; c < C; ++c) adk[kk][c] = adv[kk][c] = 0.f;

    // query sources: src < 0 is the sequence itself (causal), src = r the r-th reader of this
    // sequence's rows as prefix (every query of it, keys in its prefix range)
    const int n_rd = has_prefix ? (int)(rd_off[b + 1] - rd_off[b]) : 0;
    for (int hq = g * rep; hq < (g + 1) * rep; ++hq) {
      for (int src = -1; src < n_rd; ++src) {
        const int rb = src < 0 ? b : (int)rd[rd_off[b] + src];
        const int qs0 = (int)cu[rb];
        const int qlen = (int)cu[rb + 1] - qs0;
        const int lo = src < 0 ? 0 : (int)prefix[2 * rb] - s0;
        const int hi = src < 0 ? 0 : (int)prefix[2 * rb + 1] - s0;
        for (int q0 = src < 0 ? (kb0 / BC) * BC : 0; q0 < qlen; q0 += BC) {
            __syncthreads();
            for (int idx = tid; idx < BC * D; idx += ATT_THREADS) {
                const int r = idx / D, d = idx % D, qi = q0 + r;
                const bool in = qi < qlen;
                const size_t off = (size_t)(qs0 + qi) * qstride + hq * D + d;
                Qs[r][d] = in ? bf2f(q[off]) : 0.f;
                Gs[r][d] = in ? bf2f(dout[off]) : 0.f;
            }
            if (tid < BC) {
                const int qi = q0 + tid;
                Ls[tid] = qi < qlen ? lse[(size_t)hq * n_tok + qs0 + qi] : 0.f;
                Ds[tid] = qi < qlen ? dot[(size_t)hq * n_tok + qs0 + qi] : 0.f;
            }
            __syncthreads();
            const int qi = q0 + lane;
            const int in_n = min(BC, qlen - q0);
#pragma unroll
            for (int kk = 0; kk < KV_KPW; ++kk) {
                const int wk = warp * KV_KPW + kk;
                const int kj = kb0 + wk;
                float s = 0.f, dp = 0.f;
#pragma unroll 8
                for (int d = 0; d < D; ++d) {
                    s += Qs[lane][d] * Ks[wk][d];
                    dp += Gs[lane][d] * Vs[wk][d];
                }
                const bool valid = qi < qlen && kj < len &&
                                   (src < 0 ? qi >= kj : (kj >= lo && kj < hi));
                const float p = valid ? expf(s * scale - Ls[lane]) : 0.f;
                const float ds = p * (dp - Ds[lane]);
                for (int i = 0; i < in_n; ++i) {
                    const float pi = __shfl_sync(FULL_MASK, p, i);
                    const float dsi = __shfl_sync(FULL_MASK, ds, i);
#pragma unroll
                    for (int c = 0; c < C; ++c) {
                        adv[kk][c] += pi * Gs[i][lane + 32 * c];
                        adk[kk][c] += dsi * Qs[i][lane + 32 * c];
                    }
                }
            }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < KV_KPW; ++kk) {
        const int kj = kb0 + warp * KV_KPW + kk;
        if (kj < len) {
            const size_t off = (size_t)(s0 + kj) * kstride + g * D;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                dk[off + lane + 32 * c] = f2bf(adk[kk][c] * scale);
                dv[off + lane + 32 * c] = f2bf(adv[kk][c]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_bwd_dkdv_d64(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                  const float* dot, bf16_t* dk, bf16_t* dv, const u32* cu, const u32* prefix,
                  const u32* rd_off, const u32* rd, int has_prefix, int n_tok, int n_heads, int n_kv) {
    attn_bwd_dkdv_impl<64>(dout, q, k, v, lse, dot, dk, dv, cu, prefix, rd_off, rd, has_prefix, n_tok, n_heads,
                           n_kv);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_bwd_dkdv_d128(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                   const float* dot, bf16_t* dk, bf16_t* dv, const u32* cu, const u32* prefix,
                   const u32* rd_off, const u32* rd, int has_prefix, int n_tok, int n_heads, int n_kv) {
    attn_bwd_dkdv_impl<128>(dout, q, k, v, lse, dot, dk, dv, cu, prefix, rd_off, rd, has_prefix, n_tok, n_heads,
                           n_kv);
}
