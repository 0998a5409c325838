// sampling.cu: one token per draw from f32 logits [n_rows, vocab], seeded and reproducible.
//
// sample_rows: one block (SMP_THREADS threads) per draw r < rows, which reads logits row
//   table[3r] with the stream offset table[3r+1] | table[3r+2] << 32 and writes out[r]; "row"
//   below is that logits row. A row id not below n_rows sets ERR_SAMPLE_ROW and leaves out[r]
//   unwritten (the table may be written on the device, e.g. inside a replayed graph).
//   Rejected like the CPU backend rejects them: a row holding NaN or +inf, or (temperature > 0)
//   a row that is all -inf, sets ERR_SAMPLE_LOGIT and leaves out[r] unwritten.
//   temperature == 0: greedy, argmax with the lowest index on ties.
//   else: z_i = logits_i / temperature, e_i = exp(z_i - max z) (unnormalised probabilities).
//     Order the vocabulary by logit descending, ties by ascending index (the CPU backend's
//     sort order). top_k > 0 keeps the first top_k entries of that order; top_p < 1
//     then keeps the shortest prefix whose mass reaches top_p of the kept mass; finally the
//     token is the first entry of the kept prefix whose inclusive cumulative mass exceeds
//     u * (kept mass), with u = (splitmix64(seed ^ splitmix64(offset)) >> 40) / 2^24 and
//     splitmix64 the standard mixer. No sort is done: each "first entry whose cumulative mass
//     (or count) reaches a target" is found by a 4-pass radix select over the order-preserving
//     bit pattern of the logit (sign-flipped float bits) with 256-bin count/mass histograms in
//     shared memory, then an index-ordered scan among the entries with the selected logit.
//   Determinism: masses are fixed-point integers, e_i -> round(e_i * 2^40) (e_i <= 1, so a
//     row of up to 2^24 entries sums without overflow in 64 bits). Integer addition is
//     associative, so the histograms built with atomics, the block sums and therefore the
//     chosen token are identical from run to run whatever order the threads add in (float
//     atomics would round differently with the order). Resolution 2^-40 of the largest
//     probability, finer than the f32 rounding of e_i itself. The comparisons are exact: the
//     nucleus target is ceil(top_p * mass) with "reaches" (>=), and "exceeds u * mass" is
//     "reaches floor(u * mass) + 1", computed exactly in integers (u has 24 bits).
//   Launch: grid (rows = draws), block SMP_THREADS.
#include "common.cuh"

#define SMP_THREADS 512

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 2^40: the fixed-point scale of the masses.
#define SMP_FX 1099511627776.0

// The fixed-point mass of logit x. The same expression everywhere, so every pass (and the tie
// group's value in smp_select) sees bit-identical values.
__device__ __forceinline__ u64 smp_fx(float x, float inv_t, float zmax) {
    const float e = expf(x * inv_t - zmax);
    return (u64)((double)e * SMP_FX + 0.5);
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
    u64 mass[256];
    u32 cnt[256];
    u32 prefix, pmask;
    u64 rem;
    int last;
    int chosen_cnt;
    u32 warp_cnt[SMP_THREADS / 32];
    int found;
    u64 total;
    int bad;
};

// Finds the first entry (in the order above, restricted to the prefix (bv, bi)) whose inclusive
// cumulative mass (by_count: count) reaches `target`; when rounding leaves the target above the
// total, the last entry of the prefix. Returns its value and index through out_v / out_i
// (valid in every thread).
__device__ __forceinline__ void smp_select(const float* row, int vocab, float inv_t, float zmax, float bv, int bi,
                           bool by_count, u64 target, SmpSmem& sm, float* out_v, int* out_i) {
    const int tid = threadIdx.x;
    if (tid == 0) {
        sm.prefix = 0;
        sm.pmask = 0;
        sm.rem = target;
        sm.last = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = tid; j < 256; j += blockDim.x) {
            sm.mass[j] = 0ull;
            sm.cnt[j] = 0;
        }
        __syncthreads();
        const u32 prefix = sm.prefix, pmask = sm.pmask;
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float x = row[i];
            if (!smp_in(x, i, bv, bi)) continue;
            const u32 key = smp_key(x);
            if ((key & pmask) != prefix) continue;
            const u32 bin = (key >> shift) & 255u;
            atomicAdd(&sm.cnt[bin], 1u);
            if (!by_count) atomicAdd(&sm.mass[bin], smp_fx(x, inv_t, zmax));
        }
        __syncthreads();
        if (tid == 0) {
            int chosen = -1, lowest = -1;
            u64 cum = 0;
            const u64 rem = sm.rem;
            if (!sm.last) {
                for (int bin = 255; bin >= 0; --bin) {
                    if (sm.cnt[bin] == 0) continue;
                    const u64 val = by_count ? (u64)sm.cnt[bin] : sm.mass[bin];
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
    const u64 v = smp_fx(xv, inv_t, zmax);  // the mass shared by the tie group
    const int c = sm.chosen_cnt;
    const u64 cmax = (u64)max(c, 1);
    const u64 rem = sm.rem;
    u64 w;
    if (sm.last || c <= 0) {
        w = cmax;
    } else if (rem == 0) {
        w = 1;
    } else if (by_count) {
        w = rem;
    } else {
        w = v > 0 ? (rem + v - 1) / v : cmax;  // ceil(rem / v) entries of mass v
    }
    const int want = (int)(w < 1 ? 1 : (w > cmax ? cmax : w));
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

// Fixed-point mass of the prefix (bv, bi); every thread gets it.
__device__ __forceinline__ u64 smp_mass(const float* row, int vocab, float inv_t, float zmax, float bv, int bi,
                                        SmpSmem& sm) {
    if (threadIdx.x == 0) sm.total = 0;
    __syncthreads();
    u64 acc = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = row[i];
        if (smp_in(x, i, bv, bi)) acc += smp_fx(x, inv_t, zmax);
    }
    if (acc != 0) atomicAdd(&sm.total, acc);
    __syncthreads();
    const u64 t = sm.total;
    __syncthreads();
    return t;
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sample_rows(const float* __restrict__ logits, u32* __restrict__ out, const u32* __restrict__ table, int rows,
            int n_rows, int vocab, float temperature, float top_p, int top_k, u64 seed, u32* __restrict__ err) {
    __shared__ SmpSmem sm;
    __shared__ float bvs[32];
    __shared__ int bis[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    if (table[3 * r] >= (u32)n_rows) {  // uniform over the block
        if (threadIdx.x == 0) atomicOr(err, ERR_SAMPLE_ROW);
        return;
    }
    const float* row = logits + (size_t)table[3 * r] * vocab;
    const u64 offset = (u64)table[3 * r + 1] | ((u64)table[3 * r + 2] << 32);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    if (tid == 0) sm.bad = 0;
    __syncthreads();
    bool bad = false;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float x = row[i];
        bad |= x != x || x == __int_as_float(0x7f800000);  // NaN or +inf
    }
    if (bad) atomicOr(&sm.bad, 1);
    __syncthreads();
    if (sm.bad) {  // uniform over the block
        if (tid == 0) atomicOr(err, ERR_SAMPLE_LOGIT);
        return;
    }
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
    if (zmax == NEG_INF_F) {  // all -inf: no distribution to sample from (uniform)
        if (tid == 0) atomicOr(err, ERR_SAMPLE_LOGIT);
        return;
    }
    float bv = NEG_INF_F;  // the whole vocabulary
    int bi = 0x7fffffff;
    float sel_v;
    int sel_i;
    if (top_k > 0 && top_k < vocab) {
        smp_select(row, vocab, inv_t, zmax, bv, bi, true, (u64)top_k, sm, &sel_v, &sel_i);
        bv = sel_v;
        bi = sel_i;
    }
    u64 mass = smp_mass(row, vocab, inv_t, zmax, bv, bi, sm);
    if (top_p < 1.0f) {
        const u64 target = (u64)ceil((double)top_p * (double)mass);
        smp_select(row, vocab, inv_t, zmax, bv, bi, false, target, sm, &sel_v, &sel_i);
        bv = sel_v;
        bi = sel_i;
        mass = smp_mass(row, vocab, inv_t, zmax, bv, bi, sm);
    }
    // u = ub / 2^24; floor(u * mass) exactly: mass = hi * 2^24 + lo.
    const u64 ub = splitmix64(seed ^ splitmix64(offset)) >> 40;
    const u64 below = (mass >> 24) * ub + (((mass & 0xffffffull) * ub) >> 24);
    smp_select(row, vocab, inv_t, zmax, bv, bi, false, below + 1, sm, &sel_v, &sel_i);
    if (tid == 0) out[r] = (u32)sel_i;
}
