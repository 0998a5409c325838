// rmsnorm.cu: RMSNorm forward and backward.
//
// rmsnorm_fwd: rstd[r] = 1/sqrt(mean_j x[r,j]^2 + eps); out[r,j] = x[r,j] * rstd[r] * w[j].
//   x, out [rows, dim] bf16; w [dim] bf16; rstd [rows] f32 (saved for the backward).
//   Launch: grid (rows), block 256; one block per row, f32 block reduction.
// add_rmsnorm_fwd: the residual add fused into the norm that reads it: x[r,j] =
//   bf16(x[r,j] + delta[r,j]) (util.cu's add_bf16, the same f32 sum and rounding), then
//   rmsnorm_fwd on the new row (same loop, same block reduction, so the same bits). x, delta, out
//   [rows, dim] bf16 (x in place); w [dim]; rstd [rows] f32. One read of x and delta, one write
//   of x and out per element (the output loop reads back x[r,j], which the same thread has just
//   written). Launch: grid (rows), block 256, as rmsnorm_fwd.
// rmsnorm_bwd_dx: with g = dout, c[r] = sum_j g[r,j] w[j] x[r,j]:
//   dx[r,j] += rstd[r] * w[j] * g[r,j] - x[r,j] * rstd[r]^3 * c[r] / dim   (accumulates into the
//   residual-stream gradient, bf16). Launch: grid (rows), block 256.
// rmsnorm_bwd_dw: part[c, j] = sum_{r in chunk c} g[r,j] x[r,j] rstd[r], chunks of RMS_DW_ROWS
//   rows (f32); util.cu's sum_partials then adds the chunks in order into dw[j], so the
//   parameter gradient is deterministic (no atomics). Launch: grid (ceil(dim/256),
//   ceil(rows/RMS_DW_ROWS)), block 256; each thread owns one column of one chunk (coalesced).
//
// Fusing the residual add into the norm follows the fused add + RMSNorm of vLLM
// (csrc/layernorm_kernels.cu, fused_add_rms_norm_kernel), which also updates the residual in
// place; the sum is rounded to bf16 before it is squared, as the separate add rounds it.
#include "common.cuh"

#define RMS_DW_ROWS 64

extern "C" __global__ void rmsnorm_fwd(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                                       bf16_t* __restrict__ out, float* __restrict__ rstd, int rows,
                                       int dim, float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16_t* xr = x + (size_t)r * dim;
    float ss = 0.f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = bf2f(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss);
    const float rs = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    bf16_t* o = out + (size_t)r * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = f2bf(bf2f(xr[j]) * rs * bf2f(w[j]));
}

extern "C" __global__ void add_rmsnorm_fwd(bf16_t* __restrict__ x, const bf16_t* __restrict__ delta,
                                           const bf16_t* __restrict__ w, bf16_t* __restrict__ out,
                                           float* __restrict__ rstd, int rows, int dim, float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    bf16_t* xr = x + (size_t)r * dim;
    const bf16_t* dr = delta + (size_t)r * dim;
    float ss = 0.f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const bf16_t s = f2bf(bf2f(xr[j]) + bf2f(dr[j]));
        xr[j] = s;
        const float v = bf2f(s);
        ss += v * v;
    }
    ss = block_sum(ss);
    const float rs = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    bf16_t* o = out + (size_t)r * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = f2bf(bf2f(xr[j]) * rs * bf2f(w[j]));
}

extern "C" __global__ void rmsnorm_bwd_dx(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ x,
                                          const bf16_t* __restrict__ w, const float* __restrict__ rstd,
                                          bf16_t* __restrict__ dx, int rows, int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16_t* xr = x + (size_t)r * dim;
    const bf16_t* gr = dout + (size_t)r * dim;
    float c = 0.f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) c += bf2f(gr[j]) * bf2f(w[j]) * bf2f(xr[j]);
    c = block_sum(c);
    const float rs = rstd[r];
    const float k = rs * rs * rs * c / (float)dim;
    bf16_t* d = dx + (size_t)r * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = rs * bf2f(w[j]) * bf2f(gr[j]) - bf2f(xr[j]) * k;
        d[j] = f2bf(bf2f(d[j]) + v);
    }
}

extern "C" __global__ void rmsnorm_bwd_dw(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ x,
                                          const float* __restrict__ rstd, float* __restrict__ part,
                                          int rows, int dim) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    const int r0 = blockIdx.y * RMS_DW_ROWS;
    const int r1 = min(rows, r0 + RMS_DW_ROWS);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) acc += bf2f(dout[(size_t)r * dim + j]) * bf2f(x[(size_t)r * dim + j]) * rstd[r];
    part[(size_t)blockIdx.y * dim + j] = acc;
}
