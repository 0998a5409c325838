// cublas.cpp: the stand-in cuBLAS (libcublas.so) of the virtual GPU. Test-only.
//
// Written from cuBLAS's documented semantics (cuBLAS library guide, cublasGemmEx and
// cublasGemmStridedBatchedEx), not from tooln1's calls, so that a transposed, mis-strided or
// mistyped call fails or computes the wrong thing just as it would on a GPU:
//   C = alpha * op(A) * op(B) + beta * C, column-major; op(A) is m x k, op(B) is k x n, C is m x n;
//   A is lda x k when transa == N (else lda x m), B is ldb x n when transb == N (else ldb x k);
//   lda >= max(1, transa == N ? m : k), ldb >= max(1, transb == N ? k : n), ldc >= max(1, m), else
//   CUBLAS_STATUS_INVALID_VALUE; when beta == 0, C is not read (NaN in C does not propagate).
// Types modelled: A/B bf16 or f16 with C of the same type or f32, and A/B/C f32, with
// CUBLAS_COMPUTE_32F (or its _PEDANTIC / _FAST_* variants); host pointer mode; anything else is
// CUBLAS_STATUS_NOT_SUPPORTED. Products accumulate in f32 in k order.
// Every operand's extent must lie inside one live device allocation (checked at the call, as a
// bad pointer would fault on the device); the product runs on the handle's stream in order.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "vgpu.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef int cublasStatus_t;
enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum {
    COMPUTE_32F = 68,
    COMPUTE_32F_PEDANTIC = 69,
    COMPUTE_32F_FAST_16F = 74,
    COMPUTE_32F_FAST_16BF = 75,
    COMPUTE_32F_FAST_TF32 = 77,
};

struct Handle {
    void* stream;
    int math_mode;
};

static std::mutex hmu;
static std::set<Handle*> handles;

static bool handle_ok(Handle* h) {
    std::lock_guard<std::mutex> g(hmu);
    return handles.count(h) != 0;
}

EXPORT cublasStatus_t cublasCreate_v2(Handle** h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    std::lock_guard<std::mutex> g(hmu);
    *h = new Handle{nullptr, 0};
    handles.insert(*h);
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasDestroy_v2(Handle* h) {
    std::lock_guard<std::mutex> g(hmu);
    if (!handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    handles.erase(h);
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasSetStream_v2(Handle* h, void* stream) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!vgpu::stream_valid(stream)) {
        vgpu::report("cublasSetStream: invalid stream %p", stream);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGetStream_v2(Handle* h, void** stream) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasSetMathMode(Handle* h, int mode) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGetMathMode(Handle* h, int* mode) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = h->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}

static int esize(int t) { return t == R_32F ? 4 : 2; }

static float load(const void* base, int t, int64_t i) {
    if (t == R_32F) return ((const float*)base)[i];
    uint16_t b = ((const uint16_t*)base)[i];
    if (t == R_16BF) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    // IEEE half
    const uint32_t sign = (uint32_t)(b & 0x8000u) << 16, exp = (b >> 10) & 0x1f, man = b & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void store(void* base, int t, int64_t i, float v) {
    if (t == R_32F) {
        ((float*)base)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    if (t == R_16BF) {
        uint16_t r;
        if ((u & 0x7fffffffu) > 0x7f800000u) r = (uint16_t)((u >> 16) | 0x40u);
        else r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        ((uint16_t*)base)[i] = r;
        return;
    }
    // f32 -> IEEE half, round to nearest even
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t au = u & 0x7fffffffu;
    uint16_t r;
    if (au > 0x7f800000u) r = (uint16_t)(sign | 0x7e00u);
    else if (au >= 0x477ff000u) r = (uint16_t)(sign | 0x7c00u);
    else if (au < 0x38800000u) {
        float f;
        memcpy(&f, &au, 4);
        r = (uint16_t)(sign | (uint16_t)std::nearbyint(f * 16777216.0f));
    } else {
        uint32_t m = au + 0xfffu + ((au >> 13) & 1u) - 0x38000000u;
        r = (uint16_t)(sign | (m >> 13));
    }
    ((uint16_t*)base)[i] = r;
}

struct Gemm {
    int ta, tb;
    int64_t m, n, k;
    float alpha, beta;
    const void* A;
    int at;
    int64_t lda, sa;
    const void* B;
    int bt;
    int64_t ldb, sb;
    void* C;
    int ct;
    int64_t ldc, sc;
    int64_t batch;
};

// f32 dot product in eight interleaved partial sums (the order a tensor-core GEMM also does not
// keep), which the compiler turns into vector instructions.
static float dot(const float* a, const float* b, int64_t k) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t p = 0;
    for (; p + 8 <= k; p += 8)
        for (int u = 0; u < 8; ++u) s[u] += a[p + u] * b[p + u];
    float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; p < k; ++p) acc += a[p] * b[p];
    return acc;
}

static void run_gemm(const Gemm& g) {
    // op(A) as f32 rows (m x k), op(B) as f32 columns (n x k): C[i, j] = dot(Ar[i], Bc[j]).
    const int64_t m = g.m, n = g.n, k = g.k;
    std::vector<float> Ar((size_t)(m * k)), Bc((size_t)(n * k));
    for (int64_t b = 0; b < g.batch; ++b) {
        const char* A = (const char*)g.A + b * g.sa * esize(g.at);
        const char* B = (const char*)g.B + b * g.sb * esize(g.bt);
        char* C = (char*)g.C + b * g.sc * esize(g.ct);
        const bool product = g.alpha != 0.f && k > 0;
        if (product) {
        for (int64_t i = 0; i < m; ++i)
            for (int64_t p = 0; p < k; ++p)
                Ar[i * k + p] = load(A, g.at, g.ta == OP_N ? i + p * g.lda : p + i * g.lda);
        for (int64_t j = 0; j < n; ++j)
            for (int64_t p = 0; p < k; ++p)
                Bc[j * k + p] = load(B, g.bt, g.tb == OP_N ? p + j * g.ldb : j + p * g.ldb);
        }
        auto cols = [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; ++j) {
                const float* bc = Bc.data() + j * k;
                for (int64_t i = 0; i < m; ++i) {
                    const float* ar = Ar.data() + i * k;
                    float acc = product ? dot(ar, bc, k) : 0.f;
                    const int64_t ci = i + j * g.ldc;
                    float v = g.alpha * acc;
                    if (g.beta != 0.f) v += g.beta * load(C, g.ct, ci);
                    store(C, g.ct, ci, v);
                }
            }
        };
        const int workers = vgpu::options().workers;
        const int64_t work = m * n * (k > 0 ? k : 1);
        if (workers <= 1 || work < (1 << 18) || n < 2) {
            cols(0, n);
        } else {
            std::vector<std::thread> ts;
            const int64_t per = (n + workers - 1) / workers;
            for (int w = 1; w < workers; ++w) {
                const int64_t j0 = w * per, j1 = std::min<int64_t>(n, j0 + per);
                if (j0 < j1) ts.emplace_back(cols, j0, j1);
            }
            cols(0, std::min<int64_t>(n, per));
            for (auto& t : ts) t.join();
        }
    }
}

static bool extent_ok(const char* api, const char* name, const void* p, int t, int64_t rows, int64_t cols, int64_t ld,
                      int64_t stride, int64_t batch) {
    if (rows == 0 || cols == 0) return true;
    const int64_t last = (cols - 1) * ld + rows - 1 + (batch - 1) * stride;
    const uint64_t bytes = (uint64_t)(last + 1) * esize(t);
    if (vgpu::device_range_ok((uint64_t)(uintptr_t)p, bytes)) return true;
    vgpu::report("%s: matrix %s (%lld x %lld, ld %lld, %s) spans %llu bytes from %p, outside one live device allocation: %s",
                 api, name, (long long)rows, (long long)cols, (long long)ld, t == R_32F ? "f32" : "16-bit",
                 (unsigned long long)bytes, p, vgpu::describe_address((uint64_t)(uintptr_t)p).c_str());
    return false;
}

static cublasStatus_t gemm_common(const char* api, Handle* h, int ta, int tb, int64_t m, int64_t n, int64_t k,
                                  const void* alpha, const void* A, int at, int64_t lda, int64_t sa, const void* B,
                                  int bt, int64_t ldb, int64_t sb, const void* beta, void* C, int ct, int64_t ldc,
                                  int64_t sc, int64_t batch, int compute) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    auto inval = [&](const char* why) {
        vgpu::report("%s: %s (m %lld, n %lld, k %lld, lda %lld, ldb %lld, ldc %lld)", api, why, (long long)m,
                     (long long)n, (long long)k, (long long)lda, (long long)ldb, (long long)ldc);
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    if ((ta != OP_N && ta != OP_T && ta != OP_C) || (tb != OP_N && tb != OP_T && tb != OP_C))
        return inval("invalid transpose operation");
    if (m < 0 || n < 0 || k < 0 || batch < 0) return inval("negative dimension");
    if (lda < std::max<int64_t>(1, ta == OP_N ? m : k)) return inval("lda < max(1, rows of A)");
    if (ldb < std::max<int64_t>(1, tb == OP_N ? k : n)) return inval("ldb < max(1, rows of B)");
    if (ldc < std::max<int64_t>(1, m)) return inval("ldc < max(1, m)");
    if (!alpha || !beta) return inval("alpha or beta is NULL");
    const bool c32 = compute == COMPUTE_32F || compute == COMPUTE_32F_PEDANTIC || compute == COMPUTE_32F_FAST_16F ||
                     compute == COMPUTE_32F_FAST_16BF || compute == COMPUTE_32F_FAST_TF32;
    bool types = false;
    if (c32 && at == bt) {
        if (at == R_16BF || at == R_16F) types = ct == at || ct == R_32F;
        if (at == R_32F) types = ct == R_32F;
    }
    if (!types) {
        vgpu::report("%s: type combination A %d, B %d, C %d with compute type %d is not supported", api, at, bt, ct,
                     compute);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    Gemm g{};
    g.ta = ta;
    g.tb = tb;
    g.m = m;
    g.n = n;
    g.k = k;
    memcpy(&g.alpha, alpha, 4);
    memcpy(&g.beta, beta, 4);
    g.A = A;
    g.at = at;
    g.lda = lda;
    g.sa = sa;
    g.B = B;
    g.bt = bt;
    g.ldb = ldb;
    g.sb = sb;
    g.C = C;
    g.ct = ct;
    g.ldc = ldc;
    g.sc = sc;
    g.batch = batch;
    if (k > 0 && g.alpha != 0.f) {
        if (!extent_ok(api, "A", A, at, ta == OP_N ? m : k, ta == OP_N ? k : m, lda, sa, batch) ||
            !extent_ok(api, "B", B, bt, tb == OP_N ? k : n, tb == OP_N ? n : k, ldb, sb, batch))
            return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    if (!extent_ok(api, "C", C, ct, m, n, ldc, sc, batch)) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (k == 0) g.alpha = 0.f;
    vgpu::enqueue(h->stream, [g] { run_gemm(g); }, api);
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGemmEx(Handle* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A,
                                   int at, int lda, const void* B, int bt, int ldb, const void* beta, void* C, int ct,
                                   int ldc, int compute, int /*algo*/) {
    return gemm_common("cublasGemmEx", h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0,
                       1, compute);
}

EXPORT cublasStatus_t cublasGemmStridedBatchedEx(Handle* h, int ta, int tb, int m, int n, int k, const void* alpha,
                                                 const void* A, int at, int lda, long long sa, const void* B, int bt,
                                                 int ldb, long long sb, const void* beta, void* C, int ct, int ldc,
                                                 long long sc, int batch, int compute, int /*algo*/) {
    return gemm_common("cublasGemmStridedBatchedEx", h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta,
                       C, ct, ldc, sc, batch, compute);
}
