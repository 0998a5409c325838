// adamw.cu: AdamW update and the global gradient norm.
//
// Parameters are stored in bf16; the optimizer keeps an f32 MASTER COPY of every parameter
// (needs_master() == true): the update is applied to the f32 master and the result is rounded
// to nearest-even into the bf16 parameter. No stochastic rounding. Moments m, v are f32.
//
// adamw_step, per element i < n (decoupled weight decay, bias correction bc1 = 1 - b1^t,
// bc2 = 1 - b2^t computed on the host in f64):
//   g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   p = master (or the bf16 param when master == NULL);
//   p -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * p); master = p; param = bf16(p).
//   Launch: grid-stride, block 256.
// sumsq_partial: partial[b] = sum over a grid-stride share of x[i]^2, accumulated in f64; the
//   host adds the partials (deterministic order). Launch: grid (G <= 1024), block 256.
#include "common.cuh"

extern "C" __global__ void adamw_step(bf16_t* __restrict__ param, float* __restrict__ master,
                                      const float* __restrict__ grad, float* __restrict__ m,
                                      float* __restrict__ v, long long n, float lr, float b1, float b2,
                                      float eps, float wd, float grad_scale, float bc1, float bc2) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = grad[i] * grad_scale;
        const float mi = b1 * m[i] + (1.f - b1) * g;
        const float vi = b2 * v[i] + (1.f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float p = master ? master[i] : bf2f(param[i]);
        p -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p);
        if (master) master[i] = p;
        param[i] = f2bf(p);
    }
}

extern "C" __global__ void sumsq_partial(const float* __restrict__ x, long long n, double* __restrict__ partial) {
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double v = (double)x[i];
        acc += v * v;
    }
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
