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
#define ERR_GRPO_SEQ 32u
#define ERR_GRPO_MASK 64u
#define ERR_DECODE_BLOCK 128u
#define ERR_SAMPLE_ROW 256u

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

// Dynamic shared memory: `DYN_SMEM(float, buf);` declares `buf` over the launch's dynamic shared
// memory (an `extern __shared__` array on the device; the virtual GPU's per-block buffer there).
#ifdef TOOLN1_VGPU
#define DYN_SMEM(type, name) VGPU_DYN_SMEM(type, name)
#else
#define DYN_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

// ---- Tensor-core and asynchronous-copy building blocks (sm_80 and newer) -----------------------
// Register fragments follow the PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type": lane l, g = l >> 2, t = l & 3; each u32 holds two bf16, the lower index in the low half.
//   A (16x16, row-major): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                         a[3] = A[g+8][2t+8..]
//   B (16x8, k x n):      b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C, D (16x8 f32):      c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// The virtual GPU runs the host versions in tools/vgpu/simt.h, written from the same definitions.

// D = A * B + C, bf16 inputs, f32 accumulation (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
__device__ __forceinline__ void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2], const float c[4]) {
#ifdef TOOLN1_VGPU
    vgpu::mma_m16n8k16_bf16(d, a, b, c, __FILE__, __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

#ifndef TOOLN1_VGPU
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
#endif

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 pass the 16-byte row addresses of 8x8
// matrix i (shared memory); r[i] receives row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* row) {
#ifdef TOOLN1_VGPU
    vgpu::ldmatrix(r, 4, false, row, __FILE__, __LINE__);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
#endif
}

// As ldmatrix_x4 with two matrices (lanes 0..15 give the addresses).
__device__ __forceinline__ void ldmatrix_x2(u32 r[2], const void* row) {
#ifdef TOOLN1_VGPU
    vgpu::ldmatrix(r, 2, false, row, __FILE__, __LINE__);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(row)));
#endif
}

// ldmatrix .trans: r[i] receives elements (2(l%4), l/4) and (2(l%4)+1, l/4) of matrix i, i.e. the
// B fragment of mma.m16n8k16 from a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x2_trans(u32 r[2], const void* row) {
#ifdef TOOLN1_VGPU
    vgpu::ldmatrix(r, 2, true, row, __FILE__, __LINE__);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(row)));
#endif
}

// cp.async.cg.shared.global (16 bytes, both addresses 16-byte aligned): the copy completes at a
// later cp_async_wait<N> that covers its group.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#ifdef TOOLN1_VGPU
    vgpu::cp_async(smem, gmem, 16, __FILE__, __LINE__);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
#endif
}

// cp.async.commit_group: closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef TOOLN1_VGPU
    vgpu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef TOOLN1_VGPU
    vgpu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
