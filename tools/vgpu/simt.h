// simt.h: the SIMT shim. Force-included (g++ -include simt.h) before every kernels/*.cu so the
// kernels compile UNMODIFIED as host C++ and run on the virtual GPU's fiber scheduler.
//
// Execution model (runtime.cpp): one OS worker thread runs one thread block at a time; every
// CUDA thread of the block is a fiber with its own stack. A fiber runs until it reaches a
// scheduling point (__syncthreads, a warp intrinsic, __syncwarp) or returns; the scheduler then
// runs the next fiber in the configured order (forward, reverse or random: TOOLN1_VGPU_ORDER).
// - __shared__ is `static thread_local`: per block, because a worker runs one block at a time.
// - Warp intrinsics exchange values through a per-warp buffer; a warp operation completes when
//   every lane named in its mask has arrived at a warp operation of the same kind. A lane named
//   in the mask that has exited, or lanes at different operations, is reported and aborts.
// - Warps are exactly 32 lanes, numbered by the linear thread index as on the hardware.
// - Atomics are real atomics (blocks run in parallel on several workers).
//
// Nothing here is linked into tooln1 itself: this file only exists for the test-only stand-in
// driver built by tools/vgpu/build.sh.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define TOOLN1_VGPU 1

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
#define __constant__ static
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

namespace vgpu {

struct uint3v {
    unsigned x, y, z;
};

// Per-fiber state the kernel side reads (the runtime owns the rest of the fiber).
// A cp.async copy issued but not yet completed (it lands at the cp.async wait that covers its
// group, so a read before that wait sees the old contents, as it may on the hardware).
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned bytes;
    unsigned group;
};
constexpr unsigned kMaxAsync = 128;

// The block a worker is running (shared by its threads).
struct BlockCtx {
    uint3v idx, dim, grid;
    unsigned char* dyn_smem;
};

struct ThreadState {
    uint3v tid;
    const BlockCtx* blk;
    unsigned linear;  // linear thread index in the block
    unsigned lane, warp;
    unsigned n_async;     // pending cp.async copies
    unsigned open_group;  // index of the group that the next commit closes
    AsyncCopy async[kMaxAsync];
};

// Every fiber's stack lives in its own kSlot-aligned slot: [guard page][ThreadState][stack...].
// The running thread's state is found from the stack pointer, with no thread-local lookup.
constexpr uintptr_t kSlot = (uintptr_t)1 << 17;
constexpr uintptr_t kGuard = 4096;
inline ThreadState* self() {
    uintptr_t sp;
    asm("movq %%rsp, %0" : "=r"(sp));
    return reinterpret_cast<ThreadState*>((sp & ~(kSlot - 1)) + kGuard);
}

// Scheduling points (runtime.cpp).
__attribute__((visibility("default"))) void syncthreads(const char* file, int line);
__attribute__((visibility("default"))) void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);
// Warp exchange: every lane in `mask` contributes `bytes` (<= 32) from `mine`; after the call
// `all` holds the 32 lanes' contributions (lane-major, `bytes` each, at most kExchangeBytes;
// lanes outside the mask hold garbage). `kind` names the intrinsic, so lanes at different intrinsics are reported.
constexpr unsigned kExchangeBytes = 64;
// The same exchange without a copy: returns the warp's buffer (lane l's bytes at l *
// kExchangeBytes), valid until the calling lane's next-but-one warp operation.
__attribute__((visibility("default"))) const unsigned char* warp_exchange_view(unsigned mask, const void* mine, unsigned bytes, const char* kind,
                                        const char* file, int line);
__attribute__((visibility("default"))) void warp_exchange(unsigned mask, const void* mine, unsigned bytes, void* all, const char* kind,
                   const char* file, int line);
[[noreturn]] __attribute__((visibility("default"))) void kernel_error(const char* file, int line, const char* what);

template <class T>
inline T shfl_idx(unsigned mask, T v, int src, const char* kind, const char* file, int line, int width = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of a value over 8 bytes");
    const unsigned char* all = warp_exchange_view(mask, &v, sizeof(T), kind, file, line);
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) kernel_error(file, line, "shuffle width must be a power of two <= 32");
    const unsigned lane = self()->lane;
    const unsigned base = lane & ~(unsigned)(width - 1);
    const unsigned s = base + ((unsigned)src & (unsigned)(width - 1));
    if (!(mask >> s & 1u)) kernel_error(file, line, "shuffle reads a lane outside the mask");
    T out;
    std::memcpy(&out, all + s * kExchangeBytes, sizeof(T));
    return out;
}

template <class T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, const char* file, int line, int width = 32) {
    const unsigned lane = self()->lane;
    const int src = (int)(lane ^ (unsigned)lane_mask);
    // A source outside the width segment returns the caller's own value (CUDA semantics).
    const unsigned seg = lane & ~(unsigned)(width - 1);
    const unsigned s = (unsigned)src;
    if (s < seg || s >= seg + (unsigned)width) {
        warp_exchange_view(mask, &v, sizeof(T), "__shfl_xor_sync", file, line);
        return v;
    }
    return shfl_idx(mask, v, src - (int)seg, "__shfl_xor_sync", file, line, width);
}

template <class T>
inline T shfl_down(unsigned mask, T v, unsigned delta, const char* file, int line, int width = 32) {
    const unsigned char* all = warp_exchange_view(mask, &v, sizeof(T), "__shfl_down_sync", file, line);
    const unsigned lane = self()->lane, seg = lane & ~(unsigned)(width - 1);
    const unsigned s = lane + delta;
    if (s >= seg + (unsigned)width) return v;
    if (!(mask >> s & 1u)) kernel_error(file, line, "shuffle reads a lane outside the mask");
    T out;
    std::memcpy(&out, all + s * kExchangeBytes, sizeof(T));
    return out;
}

template <class T>
inline T shfl_up(unsigned mask, T v, unsigned delta, const char* file, int line, int width = 32) {
    const unsigned char* all = warp_exchange_view(mask, &v, sizeof(T), "__shfl_up_sync", file, line);
    const unsigned lane = self()->lane, seg = lane & ~(unsigned)(width - 1);
    if (lane < seg + delta) return v;
    const unsigned s = lane - delta;
    if (!(mask >> s & 1u)) kernel_error(file, line, "shuffle reads a lane outside the mask");
    T out;
    std::memcpy(&out, all + s * kExchangeBytes, sizeof(T));
    return out;
}

inline unsigned ballot(unsigned mask, int pred, const char* kind, const char* file, int line) {
    unsigned char mine = pred ? 1 : 0;
    const unsigned char* all = warp_exchange_view(mask, &mine, 1, kind, file, line);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && all[l * kExchangeBytes]) r |= 1u << l;
    return r;
}

template <class T>
inline T bitcast(const void* p) {
    T out;
    std::memcpy(&out, p, sizeof(T));
    return out;
}

}  // namespace vgpu

// ---- built-in variables -------------------------------------------------------------------------
#define threadIdx (vgpu::self()->tid)
#define blockIdx (vgpu::self()->blk->idx)
#define blockDim (vgpu::self()->blk->dim)
#define gridDim (vgpu::self()->blk->grid)
#define warpSize 32

// ---- barriers and warp intrinsics --------------------------------------------------------------
#define __syncthreads() vgpu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) vgpu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, src, ...) \
    vgpu::shfl_idx((unsigned)(mask), (v), (int)(src), "__shfl_sync", __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, lm, ...) \
    vgpu::shfl_xor((unsigned)(mask), (v), (int)(lm), __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) \
    vgpu::shfl_down((unsigned)(mask), (v), (unsigned)(d), __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) \
    vgpu::shfl_up((unsigned)(mask), (v), (unsigned)(d), __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __ballot_sync(mask, p) vgpu::ballot((unsigned)(mask), (p), "__ballot_sync", __FILE__, __LINE__)
#define __any_sync(mask, p) (vgpu::ballot((unsigned)(mask), (p), "__any_sync", __FILE__, __LINE__) != 0u)
#define __all_sync(mask, p) \
    (vgpu::ballot((unsigned)(mask), (p), "__all_sync", __FILE__, __LINE__) == (unsigned)(mask))
#define __activemask() 0xffffffffu

// ---- bit casts and integer intrinsics -----------------------------------------------------------
inline float __int_as_float(int x) { return vgpu::bitcast<float>(&x); }
inline int __float_as_int(float x) { return vgpu::bitcast<int>(&x); }
inline float __uint_as_float(unsigned x) { return vgpu::bitcast<float>(&x); }
inline unsigned __float_as_uint(float x) { return vgpu::bitcast<unsigned>(&x); }
inline double __longlong_as_double(long long x) { return vgpu::bitcast<double>(&x); }
inline long long __double_as_longlong(double x) { return vgpu::bitcast<long long>(&x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}

// ---- math ---------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline void sincosf_shim(float x, float* s, float* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
#define sincosf(x, s, c) sincosf_shim((x), (s), (c))

template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a > (C)b ? (C)a : (C)b;
}

// ---- atomics (relaxed, like the hardware's plain atomics) ---------------------------------------
template <class T>
inline typename std::enable_if<std::is_integral<T>::value, T>::type atomicAdd(T* p, T v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
template <class T>
inline T vgpu_atomic_float_op(T* p, T v, int op) {
    typedef typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type U;
    U* up = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(up, __ATOMIC_RELAXED);
    for (;;) {
        T o;
        std::memcpy(&o, &old, sizeof(T));
        T n = op == 0 ? o + v : (op == 1 ? (v > o ? v : o) : (v < o ? v : o));
        U nu;
        std::memcpy(&nu, &n, sizeof(T));
        if (__atomic_compare_exchange_n(up, &old, nu, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
    }
}
inline float atomicAdd(float* p, float v) { return vgpu_atomic_float_op(p, v, 0); }
inline double atomicAdd(double* p, double v) { return vgpu_atomic_float_op(p, v, 0); }
template <class T>
inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
template <class T>
inline typename std::enable_if<std::is_integral<T>::value, T>::type atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T>
inline typename std::enable_if<std::is_integral<T>::value, T>::type atomicMin(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Dynamic shared memory of the current block (see DYN_SMEM in kernels/common.cuh).
#define VGPU_DYN_SMEM(type, name) type* name = reinterpret_cast<type*>(vgpu::self()->blk->dyn_smem)

// ---- tensor-core and async-copy instructions (host versions of kernels/common.cuh's helpers) ----
// Each follows the PTX ISA's definition exactly: "Warp-level matrix fragments for mma.m16n8k16"
// (bf16 A 16x16 row-major in 4 registers, B 16x8 column-major in 2, C/D 16x8 f32 in 4; lane l has
// groupID g = l >> 2 and thread-in-group t = l & 3), "ldmatrix" (lanes 8i..8i+7 give the row
// addresses of matrix i; each lane receives row l/4, elements 2(l%4), 2(l%4)+1 of every matrix,
// or with .trans the transposed pair), and "cp.async" / "cp.async.wait_group".
namespace vgpu {

inline float bf16_lo(uint32_t r) { return __uint_as_float(r << 16); }
inline float bf16_hi(uint32_t r) { return __uint_as_float(r & 0xffff0000u); }

inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                              const char* file, int line) {
    struct Frag {
        uint32_t a[4], b[2];
    } mine, all[32];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
    warp_exchange(0xffffffffu, &mine, sizeof mine, all, "mma.sync.m16n8k16", file, line);
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const uint32_t* ra = all[l].a;
        A[g][2 * t] = bf16_lo(ra[0]);
        A[g][2 * t + 1] = bf16_hi(ra[0]);
        A[g + 8][2 * t] = bf16_lo(ra[1]);
        A[g + 8][2 * t + 1] = bf16_hi(ra[1]);
        A[g][2 * t + 8] = bf16_lo(ra[2]);
        A[g][2 * t + 9] = bf16_hi(ra[2]);
        A[g + 8][2 * t + 8] = bf16_lo(ra[3]);
        A[g + 8][2 * t + 9] = bf16_hi(ra[3]);
        const uint32_t* rb = all[l].b;
        B[2 * t][g] = bf16_lo(rb[0]);
        B[2 * t + 1][g] = bf16_hi(rb[0]);
        B[2 * t + 8][g] = bf16_lo(rb[1]);
        B[2 * t + 9][g] = bf16_hi(rb[1]);
    }
    const int l = (int)self()->lane, g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
}

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: N in {1, 2, 4}.
inline void ldmatrix(uint32_t* r, int n, bool trans, const void* row_addr, const char* file, int line) {
    const void* all[32];
    warp_exchange(0xffffffffu, &row_addr, sizeof row_addr, all, trans ? "ldmatrix.trans" : "ldmatrix", file, line);
    const int l = (int)self()->lane;
    for (int i = 0; i < n; ++i) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* row = (const uint16_t*)all[i * 8 + l / 4];
            lo = row[2 * (l % 4)];
            hi = row[2 * (l % 4) + 1];
        } else {
            lo = ((const uint16_t*)all[i * 8 + 2 * (l % 4)])[l / 4];
            hi = ((const uint16_t*)all[i * 8 + 2 * (l % 4) + 1])[l / 4];
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    // Every lane has read before any lane goes on (the instruction reads as one).
    syncwarp(file, line);
}

inline void cp_async(void* dst, const void* src, unsigned bytes, const char* file, int line) {
    ThreadState* t = self();
    if (bytes != 4 && bytes != 8 && bytes != 16) kernel_error(file, line, "cp.async size must be 4, 8 or 16 bytes");
    if (((uintptr_t)dst | (uintptr_t)src) % bytes) kernel_error(file, line, "cp.async address not aligned to its size");
    if (t->n_async == kMaxAsync) kernel_error(file, line, "too many cp.async copies in flight");
    t->async[t->n_async++] = AsyncCopy{dst, src, bytes, t->open_group};
}

inline void cp_async_commit() { self()->open_group++; }

// Completes every copy except those of the newest `keep` committed groups (and of the open one).
inline void cp_async_wait(unsigned keep) {
    ThreadState* t = self();
    const unsigned limit = t->open_group >= keep ? t->open_group - keep : 0;
    unsigned w = 0;
    for (unsigned i = 0; i < t->n_async; ++i) {
        AsyncCopy& c = t->async[i];
        if (c.group < limit) std::memcpy(c.dst, c.src, c.bytes);
        else t->async[w++] = c;
    }
    t->n_async = w;
}

}  // namespace vgpu
