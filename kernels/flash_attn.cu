// flash_attn.cu: causal GQA attention over packed sequences for training and prefill, forward
// and backward, on tensor cores: FlashAttention-2 (Dao, arXiv 2307.08691, Algorithms 1 and 2).
//
// Layouts (the contract of Backend::attention / attention_prefixed and their backward): q, out,
// dout, dq [n_tok, n_heads, D]; k, v, dk, dv [n_tok, n_kv, D] (bf16, packed tokens, sequence b
// owns rows cu[b]..cu[b+1]); lse, dot [n_heads, n_tok] f32. Query head h reads kv head
// h / (n_heads / n_kv). Scale 1/sqrt(D). Causal within each sequence. D is 64 or 128 (a
// template parameter; one entry point per value).
//
// Shared prefix (the shared-prompt layout, Prefix Grouper arXiv 2506.05433): with has_prefix
//   != 0, `prefix` holds 2 u32 per sequence, rows lo..hi whose keys sequence b's queries read in
//   full before their own causal keys (a GRPO response reads its prompt). The key loops of the
//   forward and of dq walk the key tiles of the prefix rows lo..hi, then those of the sequence's
//   own rows. In dk/dv a sequence's key block sums, after its own causal queries, every query of
//   each sequence that reads it as prefix, from the CSR table rd_off[b]..rd_off[b+1] into rd
//   (the readers of sequence b in increasing order, built on the host), so the sum order is
//   fixed. With has_prefix = 0 the three tables are not read (any buffer may be passed).
//
// Tensor-core scheme (as FlashAttention-2's csrc/flash_attn/src/flash_fwd_kernel.h and
// flash_bwd_kernel.h): bf16 mma.sync m16n8k16 with f32 accumulation; every warp owns 16 rows
// of the score tile (query rows in the forward and dq, key rows in dk/dv). Tiles are staged in
// shared memory by cp.async (rows padded to D + 8 elements so the ldmatrix row addresses fall
// in distinct banks), the next tile's copy issued before the current tile is computed on
// (double buffering); A fragments come from ldmatrix_x4, B fragments from ldmatrix_x4 over
// rows of K, V, Q or dout (the n x k operand stored [n][k]) or ldmatrix_x2_trans (stored
// [k][n]). The scores' accumulator fragment is re-packed in registers as the bf16 A fragment of
// the next product (P·V, dS·K, P^T·dout, dS^T·Q), as FA2 does, so P never goes through shared
// memory. Online softmax in registers: each lane keeps the running max and a partial row sum of
// its two rows (g and g + 8), the sum reduced over the lane quad only at the end. Masks are
// applied only where a tile needs them: the causal mask on tiles that cross the diagonal, the
// bounds mask on tiles that end past a sequence or prefix; a tile wholly above a warp's
// diagonal is skipped by that warp. Rows past a sequence are zero-filled in shared memory, so a
// masked score never multiplies a stale value.
//
// Determinism: no float atomics anywhere; every output element is written by one block and
// summed in a fixed order, so each pass repeats bit for bit. dQ is therefore not accumulated
// across key blocks as in FA2's Algorithm 2 (atomicAdd of dQ): a separate kernel over query
// blocks recomputes P and dS for its rows (the dq kernel), and the dk/dv kernel over key blocks
// recomputes them again for its keys; both run on tensor cores. GQA: the dk/dv block loops over
// every query head of its kv group against its one K/V tile staged once (the sum over the group
// stays inside the block, again without atomics); the forward and dq blocks work on one query
// head and read their group's K/V tiles through L2.
//
// flash_fwd_d{64,128}: out = softmax(scale q k^T + mask) v; lse = m + log(l) (natural log of
//   the scaled scores). Launch: grid (ceil(max_len/64), n_heads, n_seq), block 128 (4 warps x
//   16 query rows), key tiles of 32 rows. The Q tile is staged once in the K/V buffers and
//   kept in registers as A fragments (FA2's Share_Q_K_smem), so static shared memory is
//   4 * 32 * (D + 8) * 2 bytes (34816 at D = 128).
// flash_bwd_dot: dot[h, t] = sum_d dout[t,h,d] * out[t,h,d] (FA2's D_i, compute_dot_do_o
//   in flash_bwd_preprocess_kernel.h). Launch: grid (ceil(n_tok*n_heads/8)), block 256 (one
//   warp per (token, head)).
// flash_bwd_dq_d{64,128}: p = exp(scale q.k - lse), dp = dout.v, ds = p (dp - dot),
//   dq = scale * sum_j ds_j k_j. Launch: grid (ceil(max_len/64), n_heads, n_seq), block 128
//   (4 warps x 16 query rows), key tiles of 32 rows; Q and dout staged once in the K/V buffers
//   and kept in registers.
// flash_bwd_dkdv_d{64,128}: for the 32 keys of a block (2 warps x 16 keys) over every query
//   of every head of the group that reads them: dv_j = sum_i p_ij dout_i, dk_j = scale sum_i
//   ds_ij q_i. K/V staged once; query tiles of 16 rows of Q and dout double-buffered. Launch:
//   grid (ceil(max_len/32), n_kv, n_seq), block 64.
#include "common.cuh"

#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FA_BM (FA_WARPS * 16)
#define FA_BN 32
#define KV_WARPS 2
#define KV_THREADS (KV_WARPS * 32)
#define KV_BN (KV_WARPS * 16)
#define KV_BQ 16

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
}

// Stages rows 0..n-1 of a [ROWS, D] tile (row r at g + r * stride) into s (row pitch D + 8) by
// cp.async, 16 bytes per copy; rows n..ROWS-1 are zero-filled by plain stores.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void stage_tile(bf16_t* s, const bf16_t* g, size_t stride, int n, int tid) {
    constexpr int CH = D / 8;
    for (int i = tid; i < ROWS * CH; i += THREADS) {
        const int r = i / CH, c = (i % CH) * 8;
        bf16_t* dst = s + r * (D + 8) + c;
        if (r < n) {
            cp_async_16(dst, g + (size_t)r * stride + c);
        } else {
            u32* d32 = reinterpret_cast<u32*>(dst);
            d32[0] = 0u;
            d32[1] = 0u;
            d32[2] = 0u;
            d32[3] = 0u;
        }
    }
}

// A fragments (16 rows from `row0`, D columns) of a staged tile: f[ks] covers columns
// 16 ks .. 16 ks + 15. Matrices of ldmatrix_x4: (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
// (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) = a[0..3].
template <int D>
__device__ __forceinline__ void load_a_frags(u32 f[D / 16][4], const bf16_t* s, int row0, int lane) {
    const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(f[ks], s + (row0 + (mi & 1) * 8 + r8) * (D + 8) + ks * 16 + (mi >> 1) * 8);
}

// acc[nt] += A(16 x D, fragments a) * B, where B[k][n] = T[n0 + n][k] for a staged tile T of 8 *
// NT rows (the n x k operand stored [n][k]): one ldmatrix_x4 gives the b[0], b[1] of two n-tiles.
template <int D, int NT>
__device__ __forceinline__ void mma_abt(float acc[NT][4], const u32 a[D / 16][4], const bf16_t* t, int lane) {
    const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];
            ldmatrix_x4(b, t + (np * 16 + (mi >> 1) * 8 + r8) * (D + 8) + ks * 16 + (mi & 1) * 8);
            mma_bf16_16816(acc[2 * np], a[ks], b, acc[2 * np]);
            mma_bf16_16816(acc[2 * np + 1], a[ks], b + 2, acc[2 * np + 1]);
        }
    }
}

// acc[nd] (16 x D) += P * T, P a 16 x (16 KS) matrix held as the accumulator fragments p[2 KS]
// of 16 x 8 tiles (re-packed here as bf16 A fragments), T a staged [16 KS][D] tile (the k x n
// operand, loaded by ldmatrix_x2_trans).
template <int D, int KS>
__device__ __forceinline__ void mma_pv(float acc[D / 8][4], const float p[2 * KS][4], const bf16_t* t, int lane) {
    const int half = (lane >> 3) & 1, r8 = lane & 7;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        u32 a[4];
        a[0] = pack_bf16x2(p[2 * kk][0], p[2 * kk][1]);
        a[1] = pack_bf16x2(p[2 * kk][2], p[2 * kk][3]);
        a[2] = pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        a[3] = pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            u32 b[2];
            ldmatrix_x2_trans(b, t + (kk * 16 + half * 8 + r8) * (D + 8) + nd * 8);
            mma_bf16_16816(acc[nd], a, b, acc[nd]);
        }
    }
}

// Key tile tt of a query block: the prefix rows' tiles first (npt of them), then the
// sequence's own. `row` is the first packed row, `n` the number of real rows, `kj0` the first
// key (prefix-relative for a prefix tile, sequence-relative for an own one).
struct KeyTile {
    int row, n, kj0;
    bool own;
};

__device__ __forceinline__ KeyTile key_tile(int tt, int npt, int plo, int plen, int s0, int len) {
    KeyTile kt;
    kt.own = tt >= npt;
    kt.kj0 = (kt.own ? tt - npt : tt) * FA_BN;
    kt.row = (kt.own ? s0 : plo) + kt.kj0;
    kt.n = min(FA_BN, (kt.own ? len : plen) - kt.kj0);
    return kt;
}

// The scores of one warp's 16 query rows (from qw) against a key tile, masked where the tile
// needs it: keys past the tile's real rows, and keys after the query on a diagonal tile.
__device__ __forceinline__ void mask_scores(float s[FA_BN / 8][4], const KeyTile& kt, int qw, int lane) {
    const bool diag = kt.own && kt.kj0 + FA_BN - 1 > qw;
    if (!diag && kt.n == FA_BN) return;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < FA_BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = nt * 8 + 2 * t + (e & 1), qi = qw + g + 8 * (e >> 1);
            if (j >= kt.n || (kt.own && kt.kj0 + j > qi)) s[nt][e] = NEG_INF_F;
        }
}

template <int D>
__device__ __forceinline__ void flash_fwd_impl(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                               const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                               float* __restrict__ lse, const u32* __restrict__ cu,
                                               const u32* __restrict__ prefix, int has_prefix, int n_tok,
                                               int n_heads, int n_kv) {
    constexpr int LD = D + 8, ND = D / 8, NT = FA_BN / 8;
    // K[2] then V[2]; the Q tile (FA_BM rows = 2 * FA_BN) first occupies K[0..1]
    __shared__ __align__(16) bf16_t smem[4 * FA_BN * LD];
    bf16_t* Ks = smem;
    bf16_t* Vs = smem + 2 * FA_BN * LD;
    const int b = blockIdx.z, h = blockIdx.y;
    const int s0 = (int)cu[b];
    const int len = (int)cu[b + 1] - s0;
    const int q0 = blockIdx.x * FA_BM;
    if (q0 >= len) return;  // uniform over the block
    const int kvh = h / (n_heads / n_kv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const size_t qstride = (size_t)n_heads * D, kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);

    stage_tile<D, FA_BM, FA_THREADS>(smem, q + (size_t)(s0 + q0) * qstride + h * D, qstride, min(FA_BM, len - q0),
                                     tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[D / 16][4];
    load_a_frags<D>(qf, smem, warp * 16, lane);
    __syncthreads();  // every warp holds its Q fragments before K/V overwrite the tile

    const int plo = has_prefix ? (int)prefix[2 * b] : 0;
    const int plen = has_prefix ? (int)prefix[2 * b + 1] - plo : 0;
    const int npt = (plen + FA_BN - 1) / FA_BN;
    const int kend = min(len, q0 + FA_BM);
    const int ntiles = npt + (kend + FA_BN - 1) / FA_BN;
    const bf16_t* kb = k + kvh * D;
    const bf16_t* vb = v + kvh * D;
    {
        const KeyTile kt = key_tile(0, npt, plo, plen, s0, len);
        stage_tile<D, FA_BN, FA_THREADS>(Ks, kb + (size_t)kt.row * kstride, kstride, kt.n, tid);
        stage_tile<D, FA_BN, FA_THREADS>(Vs, vb + (size_t)kt.row * kstride, kstride, kt.n, tid);
        cp_async_commit();
    }
    float o[ND][4], m[2] = {NEG_INF_F, NEG_INF_F}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    const int qw = q0 + warp * 16;
    for (int tt = 0; tt < ntiles; ++tt) {
        const int buf = tt & 1;
        if (tt + 1 < ntiles) {
            const KeyTile kn = key_tile(tt + 1, npt, plo, plen, s0, len);
            stage_tile<D, FA_BN, FA_THREADS>(Ks + (buf ^ 1) * FA_BN * LD, kb + (size_t)kn.row * kstride, kstride,
                                             kn.n, tid);
            stage_tile<D, FA_BN, FA_THREADS>(Vs + (buf ^ 1) * FA_BN * LD, vb + (size_t)kn.row * kstride, kstride,
                                             kn.n, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const KeyTile kt = key_tile(tt, npt, plo, plen, s0, len);
        if (!(kt.own && kt.kj0 > qw + 15)) {  // uniform per warp: a tile above the diagonal is skipped
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            mma_abt<D, NT>(s, qf, Ks + buf * FA_BN * LD, lane);
            mask_scores(s, kt, qw, lane);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = NEG_INF_F;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    s[nt][2 * hh] *= scale;
                    s[nt][2 * hh + 1] *= scale;
                    mx = fmaxf(mx, fmaxf(s[nt][2 * hh], s[nt][2 * hh + 1]));
                }
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
                const float mnew = fmaxf(m[hh], mx);
                const float base = mnew == NEG_INF_F ? 0.f : mnew;  // a row with no key yet
                const float corr = expf(m[hh] - base);
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    s[nt][2 * hh] = expf(s[nt][2 * hh] - base);
                    s[nt][2 * hh + 1] = expf(s[nt][2 * hh + 1] - base);
                    sum += s[nt][2 * hh] + s[nt][2 * hh + 1];
                }
                l[hh] = l[hh] * corr + sum;
                m[hh] = mnew;
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    o[nd][2 * hh] *= corr;
                    o[nd][2 * hh + 1] *= corr;
                }
            }
            mma_pv<D, FA_BN / 16>(o, s, Vs + buf * FA_BN * LD, lane);
        }
        __syncthreads();  // the buffer is refilled by the next iteration's copies
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float sum = l[hh];
        sum += __shfl_xor_sync(FULL_MASK, sum, 1);
        sum += __shfl_xor_sync(FULL_MASK, sum, 2);
        const int qi = qw + g + 8 * hh;
        if (qi < len) {
            const float inv = 1.0f / sum;
            bf16_t* orow = out + (size_t)(s0 + qi) * qstride + h * D;
#pragma unroll
            for (int nd = 0; nd < ND; ++nd)
                *reinterpret_cast<u32*>(orow + nd * 8 + 2 * t) =
                    pack_bf16x2(o[nd][2 * hh] * inv, o[nd][2 * hh + 1] * inv);
            if (t == 0) lse[(size_t)h * n_tok + s0 + qi] = m[hh] + logf(sum);
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_fwd_d64(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse, const u32* cu,
              const u32* prefix, int has_prefix, int n_tok, int n_heads, int n_kv) {
    flash_fwd_impl<64>(q, k, v, out, lse, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}
extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_fwd_d128(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse, const u32* cu,
               const u32* prefix, int has_prefix, int n_tok, int n_heads, int n_kv) {
    flash_fwd_impl<128>(q, k, v, out, lse, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}

extern "C" __global__ void flash_bwd_dot(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ out,
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
__device__ __forceinline__ void flash_bwd_dq_impl(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ q,
                                                  const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                                  const float* __restrict__ lse, const float* __restrict__ dot,
                                                  bf16_t* __restrict__ dq, const u32* __restrict__ cu,
                                                  const u32* __restrict__ prefix, int has_prefix, int n_tok,
                                                  int n_heads, int n_kv) {
    constexpr int LD = D + 8, ND = D / 8, NT = FA_BN / 8;
    // K[2] then V[2]; the Q and dout tiles (FA_BM rows each) first occupy K[0..1] and V[0..1]
    __shared__ __align__(16) bf16_t smem[4 * FA_BN * LD];
    bf16_t* Ks = smem;
    bf16_t* Vs = smem + 2 * FA_BN * LD;
    const int b = blockIdx.z, h = blockIdx.y;
    const int s0 = (int)cu[b];
    const int len = (int)cu[b + 1] - s0;
    const int q0 = blockIdx.x * FA_BM;
    if (q0 >= len) return;  // uniform over the block
    const int kvh = h / (n_heads / n_kv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const size_t qstride = (size_t)n_heads * D, kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);

    const size_t qoff = (size_t)(s0 + q0) * qstride + h * D;
    stage_tile<D, FA_BM, FA_THREADS>(Ks, q + qoff, qstride, min(FA_BM, len - q0), tid);
    stage_tile<D, FA_BM, FA_THREADS>(Vs, dout + qoff, qstride, min(FA_BM, len - q0), tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[D / 16][4], gf[D / 16][4];
    load_a_frags<D>(qf, Ks, warp * 16, lane);
    load_a_frags<D>(gf, Vs, warp * 16, lane);
    __syncthreads();
    const int qw = q0 + warp * 16;
    float lr[2], dr[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int qi = qw + g + 8 * hh;
        lr[hh] = qi < len ? lse[(size_t)h * n_tok + s0 + qi] : 0.f;
        dr[hh] = qi < len ? dot[(size_t)h * n_tok + s0 + qi] : 0.f;
    }

    const int plo = has_prefix ? (int)prefix[2 * b] : 0;
    const int plen = has_prefix ? (int)prefix[2 * b + 1] - plo : 0;
    const int npt = (plen + FA_BN - 1) / FA_BN;
    const int kend = min(len, q0 + FA_BM);
    const int ntiles = npt + (kend + FA_BN - 1) / FA_BN;
    const bf16_t* kb = k + kvh * D;
    const bf16_t* vb = v + kvh * D;
    {
        const KeyTile kt = key_tile(0, npt, plo, plen, s0, len);
        stage_tile<D, FA_BN, FA_THREADS>(Ks, kb + (size_t)kt.row * kstride, kstride, kt.n, tid);
        stage_tile<D, FA_BN, FA_THREADS>(Vs, vb + (size_t)kt.row * kstride, kstride, kt.n, tid);
        cp_async_commit();
    }
    float acc[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
    for (int tt = 0; tt < ntiles; ++tt) {
        const int buf = tt & 1;
        if (tt + 1 < ntiles) {
            const KeyTile kn = key_tile(tt + 1, npt, plo, plen, s0, len);
            stage_tile<D, FA_BN, FA_THREADS>(Ks + (buf ^ 1) * FA_BN * LD, kb + (size_t)kn.row * kstride, kstride,
                                             kn.n, tid);
            stage_tile<D, FA_BN, FA_THREADS>(Vs + (buf ^ 1) * FA_BN * LD, vb + (size_t)kn.row * kstride, kstride,
                                             kn.n, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const KeyTile kt = key_tile(tt, npt, plo, plen, s0, len);
        if (!(kt.own && kt.kj0 > qw + 15)) {  // uniform per warp
            const bf16_t* Kt = Ks + buf * FA_BN * LD;
            float s[NT][4], dp[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
                dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
            }
            mma_abt<D, NT>(s, qf, Kt, lane);
            mma_abt<D, NT>(dp, gf, Vs + buf * FA_BN * LD, lane);
            mask_scores(s, kt, qw, lane);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = expf(s[nt][e] * scale - lr[e >> 1]);
                    s[nt][e] = p * (dp[nt][e] - dr[e >> 1]);  // ds
                }
            mma_pv<D, FA_BN / 16>(acc, s, Kt, lane);
        }
        __syncthreads();
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int qi = qw + g + 8 * hh;
        if (qi < len) {
            bf16_t* row = dq + (size_t)(s0 + qi) * qstride + h * D;
#pragma unroll
            for (int nd = 0; nd < ND; ++nd)
                *reinterpret_cast<u32*>(row + nd * 8 + 2 * t) =
                    pack_bf16x2(acc[nd][2 * hh] * scale, acc[nd][2 * hh + 1] * scale);
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_bwd_dq_d64(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                 const float* dot, bf16_t* dq, const u32* cu, const u32* prefix, int has_prefix, int n_tok,
                 int n_heads, int n_kv) {
    flash_bwd_dq_impl<64>(dout, q, k, v, lse, dot, dq, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}
extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_bwd_dq_d128(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                  const float* dot, bf16_t* dq, const u32* cu, const u32* prefix, int has_prefix, int n_tok,
                  int n_heads, int n_kv) {
    flash_bwd_dq_impl<128>(dout, q, k, v, lse, dot, dq, cu, prefix, has_prefix, n_tok, n_heads, n_kv);
}

// The query tiles a dk/dv block visits, in summation order: for each query head of the kv
// group, the sequence's own queries from the block's first key on (src = -1), then every query
// of each reader of the sequence (src = 0..n_rd-1) whose prefix range overlaps the block's keys.
struct QueryWalk {
    int hq, src, q0, qs0, qlen, lo, hi;
    bool done;
};

__device__ __forceinline__ void walk_source(QueryWalk& w, int b, int s0, int len, int kb0, const u32* cu,
                                            const u32* prefix, const u32* rd_off, const u32* rd) {
    if (w.src < 0) {
        w.qs0 = s0;
        w.qlen = len;
        w.lo = 0;
        w.hi = len;
        w.q0 = (kb0 / KV_BQ) * KV_BQ;
    } else {
        const int rb = (int)rd[rd_off[b] + w.src];
        w.qs0 = (int)cu[rb];
        w.qlen = (int)cu[rb + 1] - w.qs0;
        w.lo = (int)prefix[2 * rb] - s0;
        w.hi = (int)prefix[2 * rb + 1] - s0;
        w.q0 = 0;
        if (w.hi <= kb0 || w.lo >= kb0 + KV_BN) w.qlen = 0;  // reads none of this block's keys
    }
}

// Moves w to the next query tile (w.q0 already advanced); sets w.done after the last head.
__device__ __forceinline__ void walk_settle(QueryWalk& w, int b, int s0, int len, int kb0, int n_rd, int hq_end,
                                            const u32* cu, const u32* prefix, const u32* rd_off, const u32* rd) {
    while (w.q0 >= w.qlen) {
        if (++w.src >= n_rd) {
            w.src = -1;
            if (++w.hq >= hq_end) {
                w.done = true;
                return;
            }
        }
        walk_source(w, b, s0, len, kb0, cu, prefix, rd_off, rd);
    }
}

template <int D>
__device__ __forceinline__ void flash_bwd_dkdv_impl(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ q,
                                                    const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                                    const float* __restrict__ lse, const float* __restrict__ dot,
                                                    bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
                                                    const u32* __restrict__ cu, const u32* __restrict__ prefix,
                                                    const u32* __restrict__ rd_off, const u32* __restrict__ rd,
                                                    int has_prefix, int n_tok, int n_heads, int n_kv) {
    constexpr int LD = D + 8, ND = D / 8, NT = KV_BQ / 8;
    __shared__ __align__(16) bf16_t Ks[KV_BN * LD];
    __shared__ __align__(16) bf16_t Vs[KV_BN * LD];
    __shared__ __align__(16) bf16_t Qs[2 * KV_BQ * LD];
    __shared__ __align__(16) bf16_t Gs[2 * KV_BQ * LD];
    const int b = blockIdx.z, grp = blockIdx.y;
    const int s0 = (int)cu[b];
    const int len = (int)cu[b + 1] - s0;
    const int kb0 = blockIdx.x * KV_BN;
    if (kb0 >= len) return;  // uniform over the block
    const int rep = n_heads / n_kv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const size_t qstride = (size_t)n_heads * D, kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);
    const int n_rd = has_prefix ? (int)(rd_off[b + 1] - rd_off[b]) : 0;
    const int hq_end = (grp + 1) * rep;

    const size_t koff = (size_t)(s0 + kb0) * kstride + grp * D;
    stage_tile<D, KV_BN, KV_THREADS>(Ks, k + koff, kstride, min(KV_BN, len - kb0), tid);
    stage_tile<D, KV_BN, KV_THREADS>(Vs, v + koff, kstride, min(KV_BN, len - kb0), tid);
    cp_async_commit();

    QueryWalk cur;
    cur.hq = grp * rep;
    cur.src = -1;
    cur.done = false;
    walk_source(cur, b, s0, len, kb0, cu, prefix, rd_off, rd);  // the own queries: never empty
    {
        const size_t off = (size_t)(cur.qs0 + cur.q0) * qstride + cur.hq * D;
        stage_tile<D, KV_BQ, KV_THREADS>(Qs, q + off, qstride, min(KV_BQ, cur.qlen - cur.q0), tid);
        stage_tile<D, KV_BQ, KV_THREADS>(Gs, dout + off, qstride, min(KV_BQ, cur.qlen - cur.q0), tid);
        cp_async_commit();
    }
    float adk[ND][4], adv[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) adk[nd][e] = adv[nd][e] = 0.f;
    const int kw = kb0 + warp * 16;  // this warp's first key
    int buf = 0;
    while (!cur.done) {
        QueryWalk nxt = cur;
        nxt.q0 += KV_BQ;
        walk_settle(nxt, b, s0, len, kb0, n_rd, hq_end, cu, prefix, rd_off, rd);
        if (!nxt.done) {
            const size_t off = (size_t)(nxt.qs0 + nxt.q0) * qstride + nxt.hq * D;
            const int n = min(KV_BQ, nxt.qlen - nxt.q0);
            stage_tile<D, KV_BQ, KV_THREADS>(Qs + (buf ^ 1) * KV_BQ * LD, q + off, qstride, n, tid);
            stage_tile<D, KV_BQ, KV_THREADS>(Gs + (buf ^ 1) * KV_BQ * LD, dout + off, qstride, n, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bool own = cur.src < 0;
        // uniform per warp: skip a tile whose queries all precede this warp's keys, or a reader
        // whose prefix range misses them
        const bool skip = own ? cur.q0 + KV_BQ - 1 < kw : (cur.hi <= kw || cur.lo >= kw + 16);
        if (!skip && kw < len) {
            const bf16_t* Qt = Qs + buf * KV_BQ * LD;
            const bf16_t* Gt = Gs + buf * KV_BQ * LD;
            float lq[NT][2], dq_[NT][2];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int qi = cur.q0 + nt * 8 + 2 * t + e;
                    const size_t at = (size_t)cur.hq * n_tok + cur.qs0 + qi;
                    lq[nt][e] = qi < cur.qlen ? lse[at] : 0.f;
                    dq_[nt][e] = qi < cur.qlen ? dot[at] : 0.f;
                }
            float st[NT][4], dpt[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
            {
                u32 kf[D / 16][4];
                load_a_frags<D>(kf, Ks, warp * 16, lane);
                mma_abt<D, NT>(st, kf, Qt, lane);  // S^T = K Q^T
                load_a_frags<D>(kf, Vs, warp * 16, lane);
                mma_abt<D, NT>(dpt, kf, Gt, lane);  // dP^T = V dout^T
            }
            // masks only where the tile needs them: ragged query tile or key block, the
            // causal diagonal, a prefix range that covers part of the warp's keys
            const bool need = cur.q0 + KV_BQ > cur.qlen || kw + 16 > len ||
                              (own ? cur.q0 < kw + 15 : (cur.lo > kw || cur.hi < kw + 16));
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float p = expf(st[nt][e] * scale - lq[nt][e & 1]);
                    if (need) {
                        const int qi = cur.q0 + nt * 8 + 2 * t + (e & 1), kj = kw + g + 8 * (e >> 1);
                        const bool ok = qi < cur.qlen && kj < len && (own ? qi >= kj : (kj >= cur.lo && kj < cur.hi));
                        if (!ok) p = 0.f;
                    }
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - dq_[nt][e & 1]);  // dS^T
                }
            mma_pv<D, KV_BQ / 16>(adv, st, Gt, lane);   // dV += P^T dout
            mma_pv<D, KV_BQ / 16>(adk, dpt, Qt, lane);  // dK += dS^T Q
        }
        __syncthreads();
        cur = nxt;
        buf ^= 1;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int kj = kw + g + 8 * hh;
        if (kj < len) {
            const size_t off = (size_t)(s0 + kj) * kstride + grp * D;
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                *reinterpret_cast<u32*>(dk + off + nd * 8 + 2 * t) =
                    pack_bf16x2(adk[nd][2 * hh] * scale, adk[nd][2 * hh + 1] * scale);
                *reinterpret_cast<u32*>(dv + off + nd * 8 + 2 * t) =
                    pack_bf16x2(adv[nd][2 * hh], adv[nd][2 * hh + 1]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(KV_THREADS)
flash_bwd_dkdv_d64(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                   const float* dot, bf16_t* dk, bf16_t* dv, const u32* cu, const u32* prefix, const u32* rd_off,
                   const u32* rd, int has_prefix, int n_tok, int n_heads, int n_kv) {
    flash_bwd_dkdv_impl<64>(dout, q, k, v, lse, dot, dk, dv, cu, prefix, rd_off, rd, has_prefix, n_tok, n_heads,
                            n_kv);
}
extern "C" __global__ void __launch_bounds__(KV_THREADS)
flash_bwd_dkdv_d128(const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* lse,
                    const float* dot, bf16_t* dk, bf16_t* dv, const u32* cu, const u32* prefix, const u32* rd_off,
                    const u32* rd, int has_prefix, int n_tok, int n_heads, int n_kv) {
    flash_bwd_dkdv_impl<128>(dout, q, k, v, lse, dot, dk, dv, cu, prefix, rd_off, rd, has_prefix, n_tok,
                             n_heads, n_kv);
}
