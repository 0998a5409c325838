// util.cu: small memory and elementwise kernels used by the backend around the GEMMs.
//
// fill_f32:       x[i] = value, i < n.                           grid-stride, block 256.
// add_bf16:       a[i] = bf16(a[i] + b[i]), i < n.                grid-stride, block 256.
// add_f32:        a[i] += b[i], i < n (f32; a gradient shard accumulating a reduce-scatter).
//                 grid-stride, block 256.
// f32_to_bf16:    y[i] = bf16(x[i]).                              grid-stride, block 256.
// bias_rows:      y[r, j] = bias[j], r < m, j < n (bf16): the GEMM then adds x w^T with beta = 1,
//                 so the bias is added before the single rounding to bf16.  grid-stride.
// colsum_accum:   part[c, j] = sum_{r in chunk c} dy[r, j] over chunks of 64 rows (f32): the
//                 first pass of a bias gradient. grid (ceil(n/256), ceil(m/64)), block 256.
// sum_partials:   out[j] += sum_c part[c, j] for c < parts in increasing c (f32): the second
//                 pass, so a column sum over row chunks is deterministic (no atomics).
//                 grid ceil(n/256), block 256.
#include "common.cuh"

#define COLSUM_ROWS 64

extern "C" __global__ void fill_f32(float* __restrict__ x, long long n, float value) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = value;
}

extern "C" __global__ void add_bf16(bf16_t* __restrict__ a, const bf16_t* __restrict__ b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        a[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));
}

extern "C" __global__ void add_f32(float* __restrict__ a, const float* __restrict__ b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        a[i] += b[i];
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = f2bf(x[i]);
}

extern "C" __global__ void bias_rows(const bf16_t* __restrict__ bias, bf16_t* __restrict__ y, int m, int n) {
    const long long total = (long long)m * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = bias[i % n];
}

extern "C" __global__ void colsum_accum(const bf16_t* __restrict__ dy, float* __restrict__ part, int m, int n) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const int r0 = blockIdx.y * COLSUM_ROWS;
    const int r1 = min(m, r0 + COLSUM_ROWS);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) acc += bf2f(dy[(size_t)r * n + j]);
    part[(size_t)blockIdx.y * n + j] = acc;
}

extern "C" __global__ void sum_partials(const float* __restrict__ part, float* __restrict__ out, int parts,
                                        int n) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float acc = out[j];
    for (int c = 0; c < parts; ++c) acc += part[(size_t)c * n + j];
    out[j] = acc;
}
