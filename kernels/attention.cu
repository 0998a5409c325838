// attention.cu: decode attention against a KV cache, and the KV-cache store. Training and
// prefill attention (forward and backward) are in flash_attn.cu.
//
// Layouts: q/out [n_seq, n_heads*D], caches [n_seq*max_len, n_kv*D] (bf16). Query head h reads
// kv head h / (n_heads / n_kv). Scale 1/sqrt(D). D is 64 or 128 (a template parameter; one
// entry point per value).
//
// attn_decode_d{64,128}: one query per slot b against cache rows b*max_len + j, j < lens[b].
//   Four warps split the keys (each with its own online softmax, flash-style: never a score
//   vector in memory) and are merged through shared memory at the end.
//   Launch: grid (n_heads, n_seq), block 128. lens[b] must be in 1..=max_len (the new token's
//   key is already stored); any other length sets ERR_DECODE_LEN and writes NaN to the row, as
//   the CPU backend rejects it.
// kv_store: k_cache[dst[t], :] = k[t, :], v_cache likewise, rows of kv_dim; a dst row >=
//   cache_rows sets ERR_KV_ROW. Launch: grid (n_tok), block 256.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)
#define BC 32

template <int D>
__device__ __forceinline__ void attn_decode_impl(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc,
                                                 const bf16_t* __restrict__ vc, const u32* __restrict__ lens,
                                                 bf16_t* __restrict__ out, int max_len, int n_heads,
                                                 int n_kv, u32* __restrict__ err) {
    constexpr int C = D / 32;
    __shared__ float qs[D];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wo[ATT_WARPS][D];
    const int h = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 len_raw = lens[b];
    if (len_raw == 0u || len_raw > (u32)max_len) {  // uniform over the block
        if (tid == 0) atomicOr(err, ERR_DECODE_LEN);
        bf16_t* orow = out + ((size_t)b * n_heads + h) * D;
        for (int d = tid; d < D; d += ATT_THREADS) orow[d] = BF16_NAN;
        return;
    }
    const int len = (int)len_raw;
    const int kvh = h / (n_heads / n_kv);
    const size_t kstride = (size_t)n_kv * D;
    const float scale = rsqrtf((float)D);
    const bf16_t* qrow = q + ((size_t)b * n_heads + h) * D;
    for (int d = tid; d < D; d += ATT_THREADS) qs[d] = bf2f(qrow[d]) * scale;
    __syncthreads();
    const bf16_t* kbase = kc + (size_t)b * max_len * kstride + kvh * D;
    const bf16_t* vbase = vc + (size_t)b * max_len * kstride + kvh * D;
    float m = NEG_INF_F, l = 0.f, o[C];
#pragma unroll
    for (int c = 0; c < C; ++c) o[c] = 0.f;
    for (int t0 = warp * BC; t0 < len; t0 += ATT_WARPS * BC) {
        const int j = t0 + lane;
        float s = NEG_INF_F;
        if (j < len) {
            const bf16_t* kr = kbase + (size_t)j * kstride;
            float acc = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) acc += qs[d] * bf2f(kr[d]);
            s = acc;
        }
        const float mnew = fmaxf(m, warp_max(s));
        const float p = j < len ? expf(s - mnew) : 0.f;
        const float corr = m == NEG_INF_F ? 0.f : expf(m - mnew);
        l = l * corr + warp_sum(p);
        m = mnew;
#pragma unroll
        for (int c = 0; c < C; ++c) o[c] *= corr;
        const int jn = min(BC, len - t0);
        for (int jj = 0; jj < jn; ++jj) {
            const float pj = __shfl_sync(FULL_MASK, p, jj);
            const bf16_t* vr = vbase + (size_t)(t0 + jj) * kstride;
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
    for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, wm[w]);
    bf16_t* orow = out + ((size_t)b * n_heads + h) * D;
    for (int d = tid; d < D; d += ATT_THREADS) {
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) {
            if (wm[w] != NEG_INF_F) {
                const float f = expf(wm[w] - M);
                L += wl[w] * f;
                O += wo[w][d] * f;
            }
        }
        orow[d] = f2bf(L > 0.f ? O / L : 0.f);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_decode_d64(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* lens, bf16_t* out, int max_len,
                int n_heads, int n_kv, u32* err) {
    attn_decode_impl<64>(q, kc, vc, lens, out, max_len, n_heads, n_kv, err);
}
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attn_decode_d128(const bf16_t* q, const bf16_t* kc, const bf16_t* vc, const u32* lens, bf16_t* out, int max_len,
                 int n_heads, int n_kv, u32* err) {
    attn_decode_impl<128>(q, kc, vc, lens, out, max_len, n_heads, n_kv, err);
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
