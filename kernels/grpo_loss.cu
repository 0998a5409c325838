// grpo_loss.cu: GRPO clipped surrogate + KL per token (verl core_algos), forward and backward.
//
// grpo_token_fwd, per token t (all f32):
//   d = logp - old; r = exp(clamp(d, -20, 20)); l1 = -A r; l2 = -A clip(r, 1-clip_low, 1+clip_high);
//   pg = max(l1, l2) (clipped when l2 > l1); kl by kind (0 k1: logp-ref, 1 abs, 2 k2: 0.5 (logp-ref)^2,
//   3 k3: x = clamp(ref-logp, -20, 20), kl = clamp(exp(x) - x - 1, -10, 10));
//   tok = pg + kl_coef * kl and its derivative dtok = d tok / d logp (clamps pass the gradient
//   inside their closed range, as torch.clamp does).
//   Writes stats[k * n + t] for k = 0 tok, 1 pg, 2 kl, 3 clipped (0/1), 4 ratio, 5 dtok.
//   Launch: grid ceil(n/256), block 256.
// grpo_seq_sums: the masked sums the aggregation needs, in f64, on the device: block s < n_seq
//   sums over the tokens with seq_id[t] == s (mask != 0): sums[3s] = sum m, sums[3s+1] = sum m tok,
//   sums[3s+2] = sum m pg; block n_seq sums over all tokens: sums[3 n_seq + k] for k = 0 sum m,
//   1 sum m kl, 2 sum m clipped, 3 sum m ratio, and checks every seq_id[t] < n_seq (else
//   ERR_GRPO_SEQ) and every mask[t] finite and >= 0 (else ERR_GRPO_MASK). Each block strides over
//   all n tokens (n_seq + 1 passes over seq_id, which stays in L2), and reduces in a fixed order,
//   so the sums are the same bits on every run. Launch: grid n_seq + 1, block 256.
// The host turns the n_seq + 1 sets of sums into the loss scalars and one weight per sequence
// (w[s] = d loss / d tok for the tokens of sequence s; src/backend/loss.rs), without a per-token
// download.
// grpo_token_bwd: dlogp[t] = mask[t] * w[seq_id[t]] * dtok[t] (0 where mask is 0).
//   Launch: grid ceil(n/256), block 256.
#include "common.cuh"

extern "C" __global__ void grpo_token_fwd(const float* __restrict__ logp, const float* __restrict__ old_logp,
                                          const float* __restrict__ ref_logp, const float* __restrict__ adv,
                                          float* __restrict__ stats, int n, float clip_low, float clip_high,
                                          float kl_coef, int kl_kind) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const float lp = logp[t], A = adv[t];
    const float d = lp - old_logp[t];
    const float dc = fminf(fmaxf(d, -20.f), 20.f);
    const float r = expf(dc);
    const float dr = (d >= -20.f && d <= 20.f) ? r : 0.f;
    const float lo = 1.f - clip_low, hi = 1.f + clip_high;
    const float rc = fminf(fmaxf(r, lo), hi);
    const float drc = (r >= lo && r <= hi) ? dr : 0.f;
    const float l1 = -A * r, l2 = -A * rc;
    const bool clipped = l2 > l1;
    const float pg = clipped ? l2 : l1;
    const float dpg = clipped ? -A * drc : -A * dr;
    const float ref = ref_logp[t];
    float kl, dkl;
    if (kl_kind == 0) {
        kl = lp - ref;
        dkl = 1.f;
    } else if (kl_kind == 1) {
        const float x = lp - ref;
        kl = fabsf(x);
        dkl = x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f);
    } else if (kl_kind == 2) {
        const float x = lp - ref;
        kl = 0.5f * x * x;
        dkl = x;
    } else {
        const float x = ref - lp;
        const float xc = fminf(fmaxf(x, -20.f), 20.f);
        const float ex = expf(xc);
        const float raw = ex - xc - 1.f;
        kl = fminf(fmaxf(raw, -10.f), 10.f);
        const float dxc = (x >= -20.f && x <= 20.f) ? -1.f : 0.f;
        dkl = (raw >= -10.f && raw <= 10.f) ? (ex - 1.f) * dxc : 0.f;
    }
    stats[t] = pg + kl_coef * kl;
    stats[(size_t)n + t] = pg;
    stats[2 * (size_t)n + t] = kl;
    stats[3 * (size_t)n + t] = clipped ? 1.f : 0.f;
    stats[4 * (size_t)n + t] = r;
    stats[5 * (size_t)n + t] = dpg + kl_coef * dkl;
}

extern "C" __global__ void grpo_seq_sums(const float* __restrict__ stats, const float* __restrict__ mask,
                                         const u32* __restrict__ seq_id, double* __restrict__ sums, int n,
                                         int n_seq, u32* err) {
    const int b = blockIdx.x;
    if (b > n_seq) return;
    if (b < n_seq) {
        double cnt = 0.0, tok = 0.0, pg = 0.0;
        for (int t = threadIdx.x; t < n; t += blockDim.x) {
            const float mk = mask[t];
            if (seq_id[t] != (u32)b || mk == 0.f) continue;
            const double m = (double)mk;
            cnt += m;
            tok += m * (double)stats[t];
            pg += m * (double)stats[(size_t)n + t];
        }
        cnt = block_sum_d(cnt);
        tok = block_sum_d(tok);
        pg = block_sum_d(pg);
        if (threadIdx.x == 0) {
            sums[3 * (size_t)b] = cnt;
            sums[3 * (size_t)b + 1] = tok;
            sums[3 * (size_t)b + 2] = pg;
        }
        return;
    }
    double cnt = 0.0, kl = 0.0, clip = 0.0, ratio = 0.0;
    u32 bad = 0;
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
        const float mk = mask[t];
        if (seq_id[t] >= (u32)n_seq) bad |= ERR_GRPO_SEQ;
        if (!(mk >= 0.f && mk <= 3.402823466e38f)) bad |= ERR_GRPO_MASK;  // NaN, -x and inf fail
        if (mk == 0.f) continue;
        const double m = (double)mk;
        cnt += m;
        kl += m * (double)stats[2 * (size_t)n + t];
        clip += m * (double)stats[3 * (size_t)n + t];
        ratio += m * (double)stats[4 * (size_t)n + t];
    }
    if (bad) atomicOr(err, bad);
    cnt = block_sum_d(cnt);
    kl = block_sum_d(kl);
    clip = block_sum_d(clip);
    ratio = block_sum_d(ratio);
    if (threadIdx.x == 0) {
        double* g = sums + 3 * (size_t)n_seq;
        g[0] = cnt;
        g[1] = kl;
        g[2] = clip;
        g[3] = ratio;
    }
}

extern "C" __global__ void grpo_token_bwd(const float* __restrict__ stats, const float* __restrict__ mask,
                                          const u32* __restrict__ seq_id, const float* __restrict__ wseq,
                                          float* __restrict__ dlogp, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const float mk = mask[t];
    dlogp[t] = mk != 0.f ? mk * wseq[seq_id[t]] * stats[5 * (size_t)n + t] : 0.f;
}
