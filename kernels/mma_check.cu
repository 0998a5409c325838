// mma_check.cu: self-check of the tensor-core building blocks in common.cuh (mma.sync m16n8k16
// bf16 -> f32, ldmatrix, cp.async), used by the backend's device self-test and by the tests; the
// attention and GEMM-like kernels build on exactly these helpers.
//
// mma_check_direct: D[16x8] = A[16x16] B[16x8] + C, one warp per tile, the fragments gathered
//   by index from global memory as the PTX ISA lays them out (no ldmatrix): checks mma alone.
// mma_check_staged: the same product with A and B staged in shared memory by cp.async (two
//   commit groups, waited for one at a time), the A fragments loaded by ldmatrix_x4 and the B
//   fragments by ldmatrix_x2_trans from the row-major [k][n] tile.
// Layouts: a [tiles, 16, 16] bf16 row-major, b [tiles, 16, 8] bf16 row-major ([k][n]),
//   c, d [tiles, 16, 8] f32 row-major. Launch: grid (tiles), block 32.
#include "common.cuh"

__device__ __forceinline__ u32 pack_bf16(bf16_t lo, bf16_t hi) { return (u32)lo | ((u32)hi << 16); }

__device__ __forceinline__ void mma_store(float* dt, const float acc[4], int lane) {
    const int g = lane >> 2, t = lane & 3;
    dt[g * 8 + 2 * t] = acc[0];
    dt[g * 8 + 2 * t + 1] = acc[1];
    dt[(g + 8) * 8 + 2 * t] = acc[2];
    dt[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

__device__ __forceinline__ void mma_load_c(const float* ct, float acc[4], int lane) {
    const int g = lane >> 2, t = lane & 3;
    acc[0] = ct[g * 8 + 2 * t];
    acc[1] = ct[g * 8 + 2 * t + 1];
    acc[2] = ct[(g + 8) * 8 + 2 * t];
    acc[3] = ct[(g + 8) * 8 + 2 * t + 1];
}

extern "C" __global__ void __launch_bounds__(32)
mma_check_direct(const bf16_t* __restrict__ a, const bf16_t* __restrict__ b, const float* __restrict__ c,
                 float* __restrict__ d, int tiles) {
    const int tile = blockIdx.x;
    if (tile >= tiles) return;
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const bf16_t* at = a + (size_t)tile * 256;
    const bf16_t* bt = b + (size_t)tile * 128;
    u32 fa[4], fb[2];
    fa[0] = pack_bf16(at[g * 16 + 2 * t], at[g * 16 + 2 * t + 1]);
    fa[1] = pack_bf16(at[(g + 8) * 16 + 2 * t], at[(g + 8) * 16 + 2 * t + 1]);
    fa[2] = pack_bf16(at[g * 16 + 2 * t + 8], at[g * 16 + 2 * t + 9]);
    fa[3] = pack_bf16(at[(g + 8) * 16 + 2 * t + 8], at[(g + 8) * 16 + 2 * t + 9]);
    fb[0] = pack_bf16(bt[(2 * t) * 8 + g], bt[(2 * t + 1) * 8 + g]);
    fb[1] = pack_bf16(bt[(2 * t + 8) * 8 + g], bt[(2 * t + 9) * 8 + g]);
    float acc[4], out[4];
    mma_load_c(c + (size_t)tile * 128, acc, lane);
    mma_bf16_16816(out, fa, fb, acc);
    mma_store(d + (size_t)tile * 128, out, lane);
}

extern "C" __global__ void __launch_bounds__(32)
mma_check_staged(const bf16_t* __restrict__ a, const bf16_t* __restrict__ b, const float* __restrict__ c,
                 float* __restrict__ d, int tiles) {
    __shared__ __align__(16) bf16_t As[16 * 16];
    __shared__ __align__(16) bf16_t Bs[16 * 8];
    const int tile = blockIdx.x;
    if (tile >= tiles) return;
    const int lane = threadIdx.x;
    const bf16_t* at = a + (size_t)tile * 256;
    const bf16_t* bt = b + (size_t)tile * 128;
    // A: 512 bytes = 32 copies of 16 bytes (group 0); B: 256 bytes = 16 copies (group 1).
    cp_async_16(As + lane * 8, at + lane * 8);
    cp_async_commit();
    if (lane < 16) cp_async_16(Bs + lane * 8, bt + lane * 8);
    cp_async_commit();
    cp_async_wait<1>();  // group 0 (A) has landed; B may still be in flight
    __syncthreads();
    // ldmatrix_x4 over A: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
    // (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) give a[0], a[1], a[2], a[3].
    const int mi = lane >> 3, r = lane & 7;
    u32 fa[4];
    ldmatrix_x4(fa, As + ((mi & 1) * 8 + r) * 16 + (mi >> 1) * 8);
    cp_async_wait<0>();
    __syncthreads();
    // ldmatrix_x2_trans over B ([k][n], 8 columns): matrices k 0-7 and k 8-15 give b[0], b[1].
    u32 fb[2];
    ldmatrix_x2_trans(fb, Bs + ((lane >> 3) & 1) * 64 + r * 8);
    float acc[4], out[4];
    mma_load_c(c + (size_t)tile * 128, acc, lane);
    mma_bf16_16816(out, fa, fb, acc);
    mma_store(d + (size_t)tile * 128, out, lane);
}
