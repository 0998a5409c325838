// common.cuh: helpers shared by every kernel file.
//
// Conventions of all kernels in this folder:
// - Storage: activations and weights are bf16, held as raw 16-bit patterns (`bf16_t`), so the
//   sources compile under nvcc and under NVRTC alike without any host or toolkit header.
//   Parameter gradients, optimizer moments, logprobs and softmax statistics are f32; indices
//   (token ids, positions, sequence offsets) are u32.
// - Arithmetic: every load is widened to f32 and every sum is accumulated in f32 (f64 for the
//   global gradient norm); results are rounded to bf16 (round-to-nearest-even) only when stored.
// - Entry points are `extern "C"` so the host finds them by plain name.
// - Errors found on the device (an index out of range) set a bit in a u32 flag word that the
//   host reads back at the next synchronisation point.
#pragma once

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define NEG_INF_F (__int_as_float(0xff800000))
#define BF16_NAN ((bf16_t)0x7fc0)

// Error bits (mirrored in src/backend/cuda/runtime.rs).
#define ERR_EMBED_ID 1u
#define ERR_TARGET_ID 2u
#define ERR_KV_ROW 4u
#define ERR_DECODE_LEN 8u
#define ERR_SAMPLE_LOGIT 16u

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. blockDim.x must be a multiple of 32 (<= 1024).
// Contains __syncthreads: call it from all threads of the block.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float red_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red_s[warp] = v;
    __syncthreads();
    float t = lane < nw ? red_s[lane] : 0.f;
    return warp_sum(t);
}

__device__ __forceinline__ double block_sum_d(double v) {
    __shared__ double redd_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) redd_s[warp] = v;
    __syncthreads();
    double t = lane < nw ? redd_s[lane] : 0.0;
    return warp_sum_d(t);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float redm_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) redm_s[warp] = v;
    __syncthreads();
    float t = lane < nw ? redm_s[lane] : NEG_INF_F;
    return warp_max(t);
}
