// decode.cu: the rollout's decode step against a paged KV cache: the KV-cache store and
// split-K decode attention (flash-decoding) read through a block table.
//
// Paged layout (PagedAttention, Kwon et al., SOSP 2023, arXiv 2309.06180; vLLM's
// csrc/attention/paged_attention_v2 kernels): the caches are [n_blocks * block_size, n_kv*D]
// bf16; sequence b's position j is cache row table[b*max_blocks + j/block_size]*block_size +
// j%block_size. q/out are [n_seq, n_heads*D]. Query head h reads kv head h / (n_heads/n_kv).
// Scale 1/sqrt(D). D is 64 or 128 (a template parameter; one entry point per value).
//
// Flash-decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context
// inference"): a sequence's keys are cut into `splits` chunks that different blocks process,
// each writing its partial softmax state (max m, sum l, unnormalised acc) to scratch; a merge
// kernel combines the chunks in split order. The split of a sequence depends on its length
// alone (dec_splits / dec_chunk below), so a sequence gives the same bits whatever the batch,
// the other sequences' lengths or its block layout.
//
// attn_decode_split_d{64,128}: grid (n_heads, n_seq, grid_splits), block 128 (4 warps).
//   Block (h, b, s) with s < dec_splits(lens[b]) scores positions [s*chunk, min(len,(s+1)*chunk))
//   like the training kernel's online softmax: warp w takes key tiles of 32 (lane = key), each
//   warp keeps its own (m, l, acc) and the four are merged through shared memory; it writes
//   part_ml[(b*n_heads+h)*DEC_MAX_SPLITS + s] = (m, l) and part_acc[..same.. * D + d] = acc.
//   Blocks past the sequence's split count, and those whose length or block ids are bad (the
//   merge reports them), write nothing.
// attn_decode_merge: grid (n_heads, n_seq), block 128. M = max_s m_s, L = sum_s l_s e^(m_s-M),
//   out = sum_s acc_s e^(m_s-M) / L over s = 0, 1, .. in order (empty chunks, m = -inf, are
//   skipped). A length outside 1..=max_len sets ERR_DECODE_LEN, a block id >= n_blocks among
//   the first ceil(len / block_size) of the sequence's table ERR_DECODE_BLOCK; either writes
//   NaN to the row, as the CPU backend rejects them.
// kv_store: k_cache[dst[t], :] = k[t, :], v_cache likewise, rows of kv_dim; a dst row >=
//   cache_rows sets ERR_KV_ROW. Launch: grid (n_tok), block 256.
#include "common.cuh"

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
#define DEC_TILE 32
// At most this many chunks per sequence, each of at least DEC_MIN_CHUNK positions (mirrored in
// src/backend/cuda/ops/decode.rs).
#define DEC_MAX_SPLITS 16
#define DEC_MIN_CHUNK 128

// Chunks of a sequence of `len` positions.
__device__ __forceinline__ int dec_splits(int len) {
    return min(DEC_MAX_SPLITS, (len + DEC_MIN_CHUNK - 1) / DEC_MIN_CHUNK);
}
// Positions per chunk: ceil(len / splits) rounded up to a whole key tile.
__device__ __forceinline__ int dec_chunk(int len, int splits) {
    const int c = (len + splits - 1) / splits;
    return (c + DEC_TILE - 1) / DEC_TILE * DEC_TILE;
}

template <int D>
__device__ __forceinline__ void attn_decode_split_impl(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const u32* __restrict__ lens, const u32* __restrict__ table, float* __restrict__ part_ml,
    float* __restrict__ part_acc, int max_blocks, int block_size, u32 n_blocks, int n_heads, int n_kv) {
    constexpr int C = D / 32;
    __shared__ float qs[D];
    __shared__ float wm[DEC_WARPS], wl[DEC_WARPS];
    __shared__ float wo[DEC_WARPS][D];
    __shared__ int bad;
    const int h = blockIdx.x, b = blockIdx.y, s = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 len_raw = lens[b];
    const long long max_len = (long long)max_blocks * block_size;
    if (len_raw == 0u || (long long)len_raw > max_len) return;  // the merge reports it
    const int len = (int)len_raw;
    const int splits = dec_splits(len);
    if (s >= splits) return;
    const int chunk = dec_chunk(len, splits);
    const int lo = s * chunk, hi = min(len, lo + chunk);
    const u32* trow = table + (size_t)b * max_blocks;
    const size_t part = ((size_t)b * n_heads + h) * DEC_MAX_SPLITS + s;
    if (tid == 0) bad = 0;
    __syncthreads();
    if (lo < hi) {
        for (int blk = lo / block_size + tid; blk <= (hi - 1) / block_size; blk += DEC_THREADS)
            if (trow[blk] >= n_blocks) bad = 1;
    }
    __syncthreads();
    if (bad) return;  // uniform over the block; the merge reports it
    const int kvh = h / (n_heads / n_kv);
    const size_t kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);
    const bf16_t* qrow = q + ((size_t)b * n_heads + h) * D;
    for (int d = tid; d < D; d += DEC_THREADS) qs[d] = bf2f(qrow[d]) * scale;
    __syncthreads();
    float m = NEG_INF_F, l = 0.f, o[C];
#pragma unroll
    for (int c = 0; c < C; ++c) o[c] = 0.f;
    for (int t0 = lo + warp * DEC_TILE; t0 < hi; t0 += DEC_WARPS * DEC_TILE) {
        const int j = t0 + lane;
        float sc = NEG_INF_F;
        size_t row = 0;
        if (j < hi) {
            row = (size_t)trow[j / block_size] * block_size + j % block_size;
            const bf16_t* kr = kc + row * kstride + kvh * D;
            float acc = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) acc += qs[d] * bf2f(kr[d]);
            sc = acc;
        }
        const float mnew = fmaxf(m, warp_max(sc));
        const float p = j < hi ? expf(sc - mnew) : 0.f;
        const float corr = m == NEG_INF_F ? 0.f : expf(m - mnew);
        l = l * corr + warp_sum(p);
        m = mnew;
#pragma unroll
        for (int c = 0; c < C; ++c) o[c] *= corr;
        const int jn = min(DEC_TILE, hi - t0);
        for (int jj = 0; jj < jn; ++jj) {
            const float pj = __shfl_sync(FULL_MASK, p, jj);
            const size_t rj = (size_t)__shfl_sync(FULL_MASK, (u32)row, jj);
            const bf16_t* vr = vc + rj * kstride + kvh * D;
#pragma unroll
            for (int c = 0; c < C; ++c) o[c] += pj * bf2f(vr[lane + 32 * c]);
        }
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < C; ++c) wo[warp][lane + 32 * c] = o[c];
    __syncthreads();
    float M = NEG_INF_F;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, wm[w]);
    float* acc_out = part_acc + part * D;
    for (int d = tid; d < D; d += DEC_THREADS) {
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            if (wm[w] != NEG_INF_F) {
                const float f = expf(wm[w] - M);
                L += wl[w] * f;
                O += wo[w][d] * f;
            }
        }
        acc_out[d] = O;
        if (d == 0) {
            part_ml[part * 2] = M;
            part_ml[part * 2 + 1] = L;
        }
    }
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
attn_decode_split_d64(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* lens, const u32* table,
                      float* part_ml, float* part_acc, int max_blocks, int block_size, u32 n_blocks,
                      int n_heads, int n_kv) {
    attn_decode_split_impl<64>(q, kc, vc, lens, table, part_ml, part_acc, max_blocks, block_size, n_blocks,
                               n_heads, n_kv);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
attn_decode_split_d128(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* lens, const u32* table,
                       float* part_ml, float* part_acc, int max_blocks, int block_size, u32 n_blocks,
                       int n_heads, int n_kv) {
    attn_decode_split_impl<128>(q, kc, vc, lens, table, part_ml, part_acc, max_blocks, block_size, n_blocks,
                                n_heads, n_kv);
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
attn_decode_merge(const float* part_ml, const float* part_acc, const u32* lens, const u32* table, bf16_t* out,
                  int head_dim, int max_blocks, int block_size, u32 n_blocks, int n_heads, u32* err) {
    __shared__ int bad;
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    bf16_t* orow = out + ((size_t)b * n_heads + h) * head_dim;
    const u32 len_raw = lens[b];
    if (len_raw == 0u || (long long)len_raw > (long long)max_blocks * block_size) {  // uniform
        if (tid == 0) atomicOr(err, ERR_DECODE_LEN);
        for (int d = tid; d < head_dim; d += DEC_THREADS) orow[d] = BF16_NAN;
        return;
    }
    if (tid == 0) bad = 0;
    __syncthreads();
    const u32* trow = table + (size_t)b * max_blocks;
    const int nb = (int)((len_raw + (u32)block_size - 1u) / (u32)block_size);
    for (int blk = tid; blk < nb; blk += DEC_THREADS)
        if (trow[blk] >= n_blocks) bad = 1;
    __syncthreads();
    if (bad) {  // uniform over the block
        if (tid == 0) atomicOr(err, ERR_DECODE_BLOCK);
        for (int d = tid; d < head_dim; d += DEC_THREADS) orow[d] = BF16_NAN;
        return;
    }
    const int splits = dec_splits((int)len_raw);
    const size_t part = ((size_t)b * n_heads + h) * DEC_MAX_SPLITS;
    float M = NEG_INF_F;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[(part + s) * 2]);
    for (int d = tid; d < head_dim; d += DEC_THREADS) {
        float L = 0.f, O = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float ms = part_ml[(part + s) * 2];
            if (ms != NEG_INF_F) {  // an empty chunk adds nothing
                const float f = expf(ms - M);
                L += part_ml[(part + s) * 2 + 1] * f;
                O += part_acc[(part + s) * head_dim + d] * f;
            }
        }
        orow[d] = f2bf(L > 0.f ? O / L : 0.f);
    }
}

extern "C" __global__ void kv_store(const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                    const u32* __restrict__ dst, bf16_t* __restrict__ k_cache,
                                    bf16_t* __restrict__ v_cache, int n_tok, int kv_dim, u32 cache_rows,
                                    u32* err) {
    const int t = blockIdx.x;
    if (t >= n_tok) return;
    const u32 row = dst[t];
    if (row >= cache_rows) {
        if (threadIdx.x == 0) atomicOr(err, ERR_KV_ROW);
        return;
    }
    const bf16_t* ks = k + (size_t)t * kv_dim;
    const bf16_t* vs = v + (size_t)t * kv_dim;
    bf16_t* kd = k_cache + (size_t)row * kv_dim;
    bf16_t* vd = v_cache + (size_t)row * kv_dim;
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) {
        kd[j] = ks[j];
        vd[j] = vs[j];
    }
}
