// swiglu.cu: the SwiGLU activation of the MLP.
//
// swiglu_fwd: out = silu(gate) * up, silu(g) = g * sigmoid(g); n elements, bf16 in and out.
// swiglu_bwd: with s = sigmoid(g): dgate = dout * up * s * (1 + g (1 - s)); dup = dout * g * s.
// Launch: grid-stride, block 256, grid min(ceil(n/256), 65535*8).
#include "common.cuh"

extern "C" __global__ void swiglu_fwd(const bf16_t* __restrict__ gate, const bf16_t* __restrict__ up,
                                      bf16_t* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = bf2f(gate[i]);
        const float s = 1.0f / (1.0f + expf(-g));
        out[i] = f2bf(g * s * bf2f(up[i]));
    }
}

extern "C" __global__ void swiglu_bwd(const bf16_t* __restrict__ dout, const bf16_t* __restrict__ gate,
                                      const bf16_t* __restrict__ up, bf16_t* __restrict__ dgate,
                                      bf16_t* __restrict__ dup, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = bf2f(gate[i]);
        const float u = bf2f(up[i]);
        const float d = bf2f(dout[i]);
        const float s = 1.0f / (1.0f + expf(-g));
        dgate[i] = f2bf(d * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = f2bf(d * g * s);
    }
}
