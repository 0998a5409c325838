// sampling.cu: one token per row of f32 logits [rows, vocab], seeded and reproducible.
//
// sample_rows: one block (SMP_THREADS threads) per row r.
//   temperature == 0: greedy, argmax with the lowest index on ties.
//   else: z_i = logits_i / temperature, e_i = exp(z_i - max z) (unnormalised probabilities).
//     Order the vocabulary by logit descending, ties by ascending index (the CPU backend's
//     sort order). top_k > 0 keeps the first top_k entries of that order; top_p < 1
//     then keeps the shortest prefix whose mass reaches top_p of the kept mass; finally the
//     token is the first entry of the kept prefix whose inclusive cumulative mass exceeds
//     u * (kept mass) (equal only on a measure-zero boundary), with u = (splitmix64(seed ^ splitmix64(offset + r)) >> 40) / 2^24 and
//     splitmix64 the standard mixer. No sort is done: each "first entry whose cumulative mass
//     (or count) reaches a target" is found by a 4-pass radix select over the order-preserving
//     bit pattern of the logit (sign-flipped float bits) with 256-bin count/mass histograms in
//     shared memory, then an index-ordered scan among the entries with the selected logit.
//   Launch: grid (rows), block SMP_THREADS.
#include "common.cuh"

#define SMP_THREADS 512

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The same expression everywhere, so every pass sees bit-identical e values.
__device__ __forceinline__ float smp_e(const float* row, int i, float inv_t, float zmax) {
    return expf(row[i] * inv_t - zmax);
}

// Membership in the current prefix of the order: x > bx, or x == bx and i <= bi (x = logit).
__device__ __forceinline__ bool smp_in(float x, int i, float bx, int bi) {
    return x > bx || (x == bx && i <= bi);
}

// Order-preserving map of a float to u32 (larger float -> larger key).
__device__ __forceinline__ u32 smp_key(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float smp_unkey(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SmpSmem {
    float mass[256];
    u32 cnt[256];
    u32 prefix, pmask;
    float rem;
    int last;
    int chosen_cnt;
    u32 warp_cnt[SMP_THREADS / 32];
    int found;
};

// Finds the first entry (in the order above, restricted to the prefix (bv, bi)) whose inclusive
// cumulative mass (by_count: count) reaches `target`; when rounding leaves the target above the
// total, the last entry of the prefix. Returns its value and index through out_v / out_i
// (valid in every thread).
__device__ __forceinline__ void smp_select(const float* row, int vocab, float inv_t, float zmax, float bv, int bi,
                           bool by_count, float target, SmpSmem& sm, float* out_v, int* out_i) {
    const int tid = threadIdx.x;
    if (tid == 0) {
        sm.prefix = 0;
        sm.pmask = 0;
        sm.rem = target;
        sm.last = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = tid; j < 256; j += blockDim.x) {
            sm.mass[j] = 0.f;
            sm.cnt[j] = 0;
        }
        __syncthreads();
        const u32 prefix = sm.prefix, pmask = sm.pmask;
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float x = row[i];
            if (!smp_in(x, i, bv, bi)) continue;
            const float e = smp_e(row, i, inv_t, zmax);
            const u32 key = smp_key(x);
            if ((key & pmask) != prefix) continue;
            const u32 bin = (key >> shift) & 255u;
            atomicAdd(&sm.cnt[bin], 1u);
            atomicAdd(&sm.mass[bin], e);
        }
        __syncthreads();
        if (tid == 0) {
            int chosen = -1, lowest = -1;
            float cum = 0.f;
            const float rem = sm.rem;
            if (!sm.last) {
                for (int bin = 255; bin >= 0; --bin) {
                    if (sm.cnt[bin] == 0) continue;
                    const float val = by_count ? (float)sm.cnt[bin] : sm.mass[bin];
                    if (cum + val >= rem) {
                        chosen = bin;
                        break;
                    }
                    cum += val;
                }
            }
            if (chosen < 0) {
                for (int bin = 0; bin < 256; ++bin)
                    if (sm.cnt[bin] != 0) {
                        lowest = bin;
                        break;
                    }
                chosen = lowest < 0 ? 0 : lowest;
                sm.last = 1;
            } else {
                sm.rem = rem - cum;
            }
            sm.chosen_cnt = (int)sm.cnt[chosen];
            sm.prefix = prefix | ((u32)chosen << shift);
            sm.pmask = pmask | (255u << shift);
        }
        __syncthreads();
    }
    const float xv = smp_unkey(sm.prefix);
    const float v = expf(xv * inv_t - zmax);  // the e value shared by the tie group
    const int c = sm.chosen_cnt;
    int want;
    if (sm.last || c <= 0) {
        want = c > 0 ? c : 1;
    } else if (by_count) {
        want = (int)ceilf(sm.rem);
    } else {
        want = v > 0.f ? (int)ceilf(sm.rem / v) : c;
    }
    want = max(1, min(want, max(c, 1)));
    // The want-th (1-based) index, ascending, among prefix entries equal to v.
    const int lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    int seen = 0;
    if (tid == 0) sm.found = -1;
    __syncthreads();
    for (int base = 0; base < vocab; base += blockDim.x) {
        const int i = base + tid;
        bool hit = false;
        if (i < vocab) {
            const float x = row[i];
            hit = x == xv && smp_in(x, i, bv, bi);
        }
        const u32 ballot = __ballot_sync(FULL_MASK, hit);
        if (lane == 0) sm.warp_cnt[warp] = __popc(ballot);
        __syncthreads();
        int before = seen;
        for (int w = 0; w < warp; ++w) before += (int)sm.warp_cnt[w];
        int total = seen;
        for (int w = 0; w < nw; ++w) total += (int)sm.warp_cnt[w];
        if (hit) {
            const int rank = before + __popc(ballot & ((1u << lane) - 1u)) + 1;
            if (rank == want) sm.found = i;
        }
        __syncthreads();
        seen = total;
        if (sm.found >= 0 || seen >= want) break;
    }
    __syncthreads();
    *out_v = xv;
    *out_i = sm.found < 0 ? 0 : sm.found;
    __syncthreads();
}

// Sum of e over the prefix (bv, bi).
__device__ __forceinline__ float smp_mass(const float* row, int vocab, float inv_t, float zmax, float bv, int bi) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (smp_in(row[i], i, bv, bi)) acc += smp_e(row, i, inv_t, zmax);
    }
    return block_sum(acc);
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sample_rows(const float* __restrict__ logits, u32* __restrict__ out, int rows, int vocab, float temperature,
            float top_p, int top_k, u64 seed, u64 offset) {
    __shared__ SmpSmem sm;
    __shared__ float bvs[32];
    __shared__ int bis[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + (size_t)r * vocab;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    if (temperature <= 0.f) {
        float bv = NEG_INF_F;
        int bi = 0x7fffffff;
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float x = row[i];
            if (x > bv || (x == bv && i < bi)) {  // NaN never wins
                bv = x;
                bi = i;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            bvs[warp] = bv;
            bis[warp] = bi;
        }
        __syncthreads();
        if (tid == 0) {
            float v = bvs[0];
            int idx = bis[0];
            for (int w = 1; w < nw; ++w)
                if (bvs[w] > v || (bvs[w] == v && bis[w] < idx)) {
                    v = bvs[w];
                    idx = bis[w];
                }
            out[r] = idx == 0x7fffffff ? 0u : (u32)idx;
        }
        return;
    }
    const float inv_t = 1.0f / temperature;
    float zm = NEG_INF_F;
    for (int i = tid; i < vocab; i += blockDim.x) zm = fmaxf(zm, row[i] * inv_t);
    const float zmax = block_max(zm);
    float bv = NEG_INF_F;  // the whole vocabulary
    int bi = 0x7fffffff;
    float sel_v;
    int sel_i;
    if (top_k > 0 && top_k < vocab) {
        smp_select(row, vocab, inv_t, zmax, bv, bi, true, (float)top_k, sm, &sel_v, &sel_i);
        bv = sel_v;
        bi = sel_i;
    }
    float mass = smp_mass(row, vocab, inv_t, zmax, bv, bi);
    if (top_p < 1.0f) {
        smp_select(row, vocab, inv_t, zmax, bv, bi, false, top_p * mass, sm, &sel_v, &sel_i);
        bv = sel_v;
        bi = sel_i;
        mass = smp_mass(row, vocab, inv_t, zmax, bv, bi);
    }
    const u64 h = splitmix64(seed ^ splitmix64(offset + (u64)r));
    const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
    smp_select(row, vocab, inv_t, zmax, bv, bi, false, u * mass, sm, &sel_v, &sel_i);
    if (tid == 0) out[r] = (u32)sel_i;
}
