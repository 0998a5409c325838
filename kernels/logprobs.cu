// logprobs.cu: fused lm_head + log-softmax over the vocabulary + gather of the target, in chunks.
//
// The host walks token chunks [t0, t0+rows) and vocabulary chunks [v0, v0+vc). For each pair it
// computes one f32 logits tile [rows, vc] with a cuBLAS GEMM (bf16 h and w, f32 output) into a
// reusable workspace, then these kernels fold the tile into per-token running statistics, so the
// [n_tok, vocab] logits never exist in memory (Liger-style streaming).
//
// inv_t is the inverse temperature: every kernel reads a tile value z as x = z * inv_t (the
// logits of softmax(z / T), scaled in registers, no extra memory; inv_t = 1 leaves x = z exactly).
//
// lp_chunk_fwd: per token t (row r of the tile), with x = logits tile row * inv_t:
//   running max m[t], s[t] = sum exp(x - m), w[t] = sum exp(x - m) x (for the entropy), and the
//   target logit tgt[t] when targets[t] falls in this chunk. `first` != 0 starts the statistics.
//   Launch: grid (rows), block 256.
// lp_finalize: lse = m + log s; logp = tgt - lse; entropy = lse - w / s (optional).
//   targets[t] >= vocab sets ERR_TARGET_ID and writes NaN. Launch: grid ceil(n/256), block 256.
// lp_chunk_bwd: dlogits tile (bf16), the gradient with respect to the unscaled tile z,
//   dl[r, v] = inv_t * dlogp[t] * (1[v0+v == target] - exp(x - lse[t])), x = z * inv_t
//   recomputed from the f32 logits tile; the host then runs dh += dl . w[v0:v0+vc] and
//   dw[v0:v0+vc] += dl^T . h with cuBLAS (f32 accumulation; dh is accumulated in an f32
//   workspace and rounded to bf16 once at the end). Launch: grid (rows), block 256.
#include "common.cuh"

extern "C" __global__ void lp_chunk_fwd(const float* __restrict__ logits, int rows, int vc, int v0,
                                        const u32* __restrict__ targets, int t0, float* __restrict__ m,
                                        float* __restrict__ s, float* __restrict__ w,
                                        float* __restrict__ tgt, int first, float inv_t) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (size_t)r * vc;
    const int t = t0 + r;
    float lm = NEG_INF_F;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) lm = fmaxf(lm, x[j] * inv_t);
    lm = block_max(lm);
    float ls = 0.f, lw = 0.f;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        const float xj = x[j] * inv_t;
        const float e = expf(xj - lm);
        ls += e;
        lw += e * xj;
    }
    ls = block_sum(ls);
    lw = block_sum(lw);
    if (threadIdx.x == 0) {
        const u32 tg = targets[t];
        if (tg >= (u32)v0 && tg < (u32)(v0 + vc)) tgt[t] = x[tg - v0] * inv_t;
        if (first) {
            m[t] = lm;
            s[t] = ls;
            w[t] = lw;
        } else {
            const float mo = m[t];
            const float mn = fmaxf(mo, lm);
            const float fo = expf(mo - mn), fl = expf(lm - mn);
            m[t] = mn;
            s[t] = s[t] * fo + ls * fl;
            w[t] = w[t] * fo + lw * fl;
        }
    }
}

extern "C" __global__ void lp_finalize(const float* __restrict__ m, const float* __restrict__ s,
                                       const float* __restrict__ w, const float* __restrict__ tgt,
                                       const u32* __restrict__ targets, u32 vocab, float* __restrict__ logp,
                                       float* __restrict__ lse, float* __restrict__ entropy, int n,
                                       u32* err) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const float L = m[t] + logf(s[t]);
    lse[t] = L;
    if (targets[t] >= vocab) {
        atomicOr(err, ERR_TARGET_ID);
        logp[t] = __int_as_float(0x7fc00000);
    } else {
        logp[t] = tgt[t] - L;
    }
    if (entropy) entropy[t] = L - w[t] / s[t];
}

extern "C" __global__ void lp_chunk_bwd(const float* __restrict__ logits, int rows, int vc, int v0,
                                        const u32* __restrict__ targets, int t0,
                                        const float* __restrict__ lse, const float* __restrict__ dlogp,
                                        bf16_t* __restrict__ dl, float inv_t) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int t = t0 + r;
    const float* x = logits + (size_t)r * vc;
    bf16_t* d = dl + (size_t)r * vc;
    const float L = lse[t], g = dlogp[t] * inv_t;
    const u32 tg = targets[t];
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        const float onehot = (u32)(v0 + j) == tg ? 1.f : 0.f;
        d[j] = f2bf(g * (onehot - expf(x[j] * inv_t - L)));
    }
}
