// selftest.cpp: checks that the virtual GPU catches what it claims to catch. Each case plants a
// bug (or a limit violation) and expects the report, the error code or the wrong result that a
// real GPU would give; cases that must abort run in a child process. Built and run by
// tools/vgpu/test.sh; prints one line per case and "N passed, M failed".
#include <cuda.h>
#undef cuEventElapsedTime

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "simt.h"
#include "vgpu.h"

// ---- kernels with planted bugs ------------------------------------------------------------------
// Block sum through shared memory with the barrier between the writes and the reads removed.
extern "C" __global__ void st_missing_barrier(const float* x, float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    // __syncthreads() missing here
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int i = 0; i < 256; ++i) t += s[i];
        out[0] = t;
    }
}

// The same with the barrier: the reference.
extern "C" __global__ void st_with_barrier(const float* x, float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int i = 0; i < 256; ++i) t += s[i];
        out[0] = t;
    }
}

// Threads wait at two different __syncthreads calls.
extern "C" __global__ void st_divergent_barrier(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.f;
}

// Half of the warp exits, the other half shuffles with the full mask.
extern "C" __global__ void st_shuffle_exited_lane(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Writes one element past the end of its buffer.
extern "C" __global__ void st_out_of_bounds(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 2.f;  // should be i < n
}

// A cp.async copy that is never waited for.
extern "C" __global__ void st_cp_async_no_wait(const float* in, float* out) {
    __shared__ __attribute__((aligned(16))) float s[4];
    if (threadIdx.x == 0) {
        vgpu::cp_async(s, in, 16, __FILE__, __LINE__);
        vgpu::cp_async_commit();
        out[0] = s[0];
    }
}

// A plain kernel for the launch-limit cases.
extern "C" __global__ void st_fill(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 3.f;
}

__attribute__((init_priority(60000))) static vgpu::Reg st_registry[] = {
    vgpu::Reg("st_missing_barrier", "selftest.cpp", &st_missing_barrier, 0),
    vgpu::Reg("st_with_barrier", "selftest.cpp", &st_with_barrier, 0),
    vgpu::Reg("st_divergent_barrier", "selftest.cpp", &st_divergent_barrier, 0),
    vgpu::Reg("st_shuffle_exited_lane", "selftest.cpp", &st_shuffle_exited_lane, 0),
    vgpu::Reg("st_out_of_bounds", "selftest.cpp", &st_out_of_bounds, 0),
    vgpu::Reg("st_cp_async_no_wait", "selftest.cpp", &st_cp_async_no_wait, 0),
    vgpu::Reg("st_fill", "selftest.cpp", &st_fill, 256),
};

// ---- harness --------------------------------------------------------------------------------------
static int passed = 0, failed = 0;

static void result(const char* name, bool ok, const std::string& detail) {
    printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name, detail.c_str());
    (ok ? passed : failed)++;
}

static CUcontext ctx;
static CUmodule mod;

static const char* kImage =
    "// fake PTX naming the self-test kernels\n.entry st_missing_barrier\n.entry st_with_barrier\n"
    ".entry st_divergent_barrier\n.entry st_shuffle_exited_lane\n.entry st_out_of_bounds\n"
    ".entry st_cp_async_no_wait\n.entry st_fill\n";

static void setup() {
    cuInit(0);
    CUdevice d;
    cuDeviceGet(&d, 0);
    cuDevicePrimaryCtxRetain(&ctx, d);
    cuCtxSetCurrent(ctx);
    static std::vector<uint64_t> aligned((strlen(kImage) + 8) / 8 + 1, 0);
    memcpy(aligned.data(), kImage, strlen(kImage) + 1);
    if (cuModuleLoadData(&mod, aligned.data()) != CUDA_SUCCESS) {
        fprintf(stderr, "selftest: module load failed\n");
        exit(2);
    }
}

static CUfunction fn(const char* name) {
    CUfunction f = nullptr;
    if (cuModuleGetFunction(&f, mod, name) != CUDA_SUCCESS) {
        fprintf(stderr, "selftest: no function %s\n", name);
        exit(2);
    }
    return f;
}

static CUdeviceptr alloc_floats(size_t n, float v) {
    CUdeviceptr p;
    cuMemAlloc(&p, n * 4);
    std::vector<float> h(n, v);
    cuMemcpyHtoD(p, h.data(), n * 4);
    return p;
}

// Runs `body` in a child; returns (aborted?, stderr text).
template <class F>
static std::pair<bool, std::string> in_child(F body) {
    int pipefd[2];
    if (pipe(pipefd) != 0) return {false, "pipe failed"};
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        body();
        _exit(0);
    }
    close(pipefd[1]);
    std::string text;
    char buf[4096];
    ssize_t k;
    while ((k = read(pipefd[0], buf, sizeof buf)) > 0) text.append(buf, (size_t)k);
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const bool aborted = WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0);
    return {aborted, text};
}

static bool has(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

extern "C" void vgpuSetThreadOrder(int order);

static float sum_kernel(const char* name, int order) {
    auto [ab, text] = in_child([name, order] {
        vgpuSetThreadOrder(order);
        CUdeviceptr x = alloc_floats(256, 1.f), out = alloc_floats(1, 0.f);
        CUfunction f = fn(name);
        void* args[] = {&x, &out};
        cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, nullptr, args, nullptr);
        float r = 0;
        cuMemcpyDtoH(&r, out, 4);
        fprintf(stderr, "SUM %g\n", r);
    });
    (void)ab;
    const size_t i = text.find("SUM ");
    return i == std::string::npos ? NAN : strtof(text.c_str() + i + 4, nullptr);
}

int main() {
    // The children inherit a context made before fork; the stand-in has no device to lose.
    setup();

    {
        const float good_fwd = sum_kernel("st_with_barrier", 0);
        const float good_rev = sum_kernel("st_with_barrier", 1);
        const float bad_fwd = sum_kernel("st_missing_barrier", 0);
        const float bad_rev = sum_kernel("st_missing_barrier", 1);
        char d[256];
        snprintf(d, sizeof d, "with barrier %g / %g; without: forward %g, reverse %g (expected 256)", good_fwd,
                 good_rev, bad_fwd, bad_rev);
        result("a missing __syncthreads changes the result in one of the orders",
               good_fwd == 256 && good_rev == 256 && (bad_fwd != 256 || bad_rev != 256), d);
    }
    {
        auto [ab, text] = in_child([] {
            CUdeviceptr out = alloc_floats(64, 0.f);
            void* args[] = {&out};
            cuLaunchKernel(fn("st_divergent_barrier"), 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr);
            cuCtxSynchronize();
        });
        result("threads at different __syncthreads are reported", ab && has(text, "different __syncthreads"),
               text.substr(0, text.find('\n')));
    }
    {
        auto [ab, text] = in_child([] {
            CUdeviceptr out = alloc_floats(32, 0.f);
            void* args[] = {&out};
            cuLaunchKernel(fn("st_shuffle_exited_lane"), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr);
            cuCtxSynchronize();
        });
        result("a shuffle naming an exited lane is reported", ab && has(text, "which has exited"),
               text.substr(0, text.find('\n')));
    }
    {
        auto [ab, text] = in_child([] {
            CUdeviceptr out;
            cuMemAlloc(&out, 1024 * 4);
            int n = 1024;
            void* args[] = {&out, &n};
            cuLaunchKernel(fn("st_out_of_bounds"), 4, 1, 1, 256, 1, 1, 0, nullptr, args, nullptr);
            cuLaunchKernel(fn("st_out_of_bounds"), 5, 1, 1, 256, 1, 1, 0, nullptr, args, nullptr);
            cuCtxSynchronize();
        });
        result("a write past the end of an allocation is reported", ab && has(text, "past the end"),
               text.substr(0, text.find('\n')));
    }
    {
        auto [ab, text] = in_child([] {
            CUdeviceptr out = alloc_floats(16, 0.f);
            cuMemFree(out);
            int n = 16;
            void* args[] = {&out, &n};
            CUresult r = cuLaunchKernel(fn("st_fill"), 1, 1, 1, 16, 1, 1, 0, nullptr, args, nullptr);
            if (r != CUDA_SUCCESS) {
                fprintf(stderr, "launch refused: %d\n", (int)r);
                _exit(3);
            }
            cuCtxSynchronize();
        });
        result("a launch on freed memory is refused", ab && has(text, "FREED"), text.substr(0, text.find('\n')));
    }
    {
        auto [ab, text] = in_child([] {
            CUdeviceptr in = alloc_floats(4, 5.f), out = alloc_floats(1, 0.f);
            void* args[] = {&in, &out};
            cuLaunchKernel(fn("st_cp_async_no_wait"), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr);
            cuCtxSynchronize();
        });
        result("a cp.async never waited for is reported", ab && has(text, "never waited"),
               text.substr(0, text.find('\n')));
    }
    {
        CUdeviceptr out = alloc_floats(2048, 0.f);
        int n = 2048;
        void* args[] = {&out, &n};
        CUfunction f = fn("st_fill");
        const CUresult too_many = cuLaunchKernel(f, 1, 1, 1, 1025, 1, 1, 0, nullptr, args, nullptr);
        const CUresult bounds = cuLaunchKernel(f, 1, 1, 1, 512, 1, 1, 0, nullptr, args, nullptr);
        const CUresult grid_y = cuLaunchKernel(f, 1, 65536, 1, 32, 1, 1, 0, nullptr, args, nullptr);
        const CUresult smem = cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 64 * 1024, nullptr, args, nullptr);
        cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 64 * 1024);
        const CUresult smem_ok = cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 64 * 1024, nullptr, args, nullptr);
        cuCtxSynchronize();
        char d[256];
        snprintf(d, sizeof d, "1025 threads -> %d, 512 over __launch_bounds__(256) -> %d, grid y 65536 -> %d, "
                 "64 KiB dynamic smem -> %d, after the opt-in -> %d",
                 (int)too_many, (int)bounds, (int)grid_y, (int)smem, (int)smem_ok);
        result("launch limits are enforced",
               too_many == CUDA_ERROR_INVALID_VALUE && bounds == CUDA_ERROR_INVALID_VALUE &&
                   grid_y == CUDA_ERROR_INVALID_VALUE && smem == CUDA_ERROR_INVALID_VALUE && smem_ok == CUDA_SUCCESS,
               d);
        cuMemFree(out);
    }
    {
        // An asynchronous copy from page-locked memory reads the buffer when the stream runs.
        CUstream s;
        cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
        float* pinned = nullptr;
        cuMemHostAlloc((void**)&pinned, 4, 0);
        pinned[0] = 1.f;
        CUdeviceptr d = alloc_floats(1, 0.f);
        cuMemcpyHtoDAsync(d, pinned, 4, s);
        pinned[0] = 7.f;  // changed before the copy ran: the device sees 7, as it may on a GPU
        cuStreamSynchronize(s);
        float got = 0;
        cuMemcpyDtoH(&got, d, 4);
        auto [ab, text] = in_child([] {
            CUstream s2;
            cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING);
            float* p = nullptr;
            cuMemHostAlloc((void**)&p, 4096, 0);
            CUdeviceptr d2 = alloc_floats(1024, 0.f);
            cuMemcpyHtoDAsync(d2, p, 4096, s2);
            cuMemFreeHost(p);  // freed before the copy ran
            cuStreamSynchronize(s2);
        });
        char det[512];
        snprintf(det, sizeof det, "changed buffer: device got %g; freed buffer: %s", got,
                 text.substr(0, text.find('\n')).c_str());
        result("page-locked copies run late, a freed host buffer is reported", got == 7.f && ab && has(text, "FREED page-locked"),
               det);
    }
    {
        auto [ab, text] = in_child([] {
            setenv("TOOLN1_VGPU_MEM_BYTES", "1048576", 1);  // read only by a fresh process: exec below
            execl("/proc/self/exe", "/proc/self/exe", "--oom-child", (char*)nullptr);
        });
        result("allocation fails at the memory limit", !ab && has(text, "out of device memory"),
               text.substr(0, text.find('\n')));
    }
    {
        // Stream capture: the captured work runs only when the graph is launched, each time.
        CUstream s;
        cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
        CUdeviceptr d = alloc_floats(64, 0.f);
        int n = 64;
        void* args[] = {&d, &n};
        const CUresult begin = cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        CUstreamCaptureStatus during = CU_STREAM_CAPTURE_STATUS_NONE;
        cuStreamIsCapturing(s, &during);
        const CUresult launch = cuLaunchKernel(fn("st_fill"), 1, 1, 1, 64, 1, 1, 0, s, args, nullptr);
        CUgraph g = nullptr;
        const CUresult end = cuStreamEndCapture(s, &g);
        cuStreamSynchronize(s);
        float before = -1, after = -1;
        cuMemcpyDtoH(&before, d, 4);
        CUgraphExec e = nullptr;
        const CUresult inst = cuGraphInstantiateWithFlags(&e, g, 0);
        cuMemsetD32Async(d, 0, 64, s);
        const CUresult l1 = cuGraphLaunch(e, s);
        cuStreamSynchronize(s);
        cuMemcpyDtoH(&after, d, 4);
        cuMemsetD32Async(d, 0, 64, s);
        cuGraphLaunch(e, s);
        cuStreamSynchronize(s);
        float again = -1;
        cuMemcpyDtoH(&again, d, 4);
        char det[256];
        snprintf(det, sizeof det, "begin %d, status %d, launch %d, end %d, instantiate %d, graph launch %d; "
                 "value before the replay %g, after %g, after a second replay %g",
                 (int)begin, (int)during, (int)launch, (int)end, (int)inst, (int)l1, before, after, again);
        result("captured work runs only at each graph launch",
               begin == 0 && during == CU_STREAM_CAPTURE_STATUS_ACTIVE && launch == 0 && end == 0 && g && inst == 0 &&
                   l1 == 0 && before == 0.f && after == 3.f && again == 3.f,
               det);
        cuGraphExecDestroy(e);
        cuGraphDestroy(g);
        cuMemFree(d);
    }
    {
        // Calls a capturing thread may not make: refused with the driver's code, the capture
        // invalidated (later work on the stream is refused, cuStreamEndCapture gives no graph).
        CUstream s;
        cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
        CUdeviceptr d = alloc_floats(64, 0.f);
        std::vector<float> host(64, 1.f);
        int n = 64;
        void* args[] = {&d, &n};
        std::string det;
        bool ok = true;
        struct Case {
            const char* name;
            CUresult want;
        };
        const Case cases[] = {{"cuStreamSynchronize", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED},
                              {"cuStreamQuery", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED},
                              {"cuCtxSynchronize", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED},
                              {"cuMemcpyHtoDAsync (pageable)", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED},
                              {"cuMemcpyDtoHAsync (pageable)", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED},
                              {"cuMemcpyHtoD", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED},
                              {"cuMemFree", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED}};
        for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); ++c) {
            CUdeviceptr spare;
            cuMemAlloc(&spare, 256);
            cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
            cuLaunchKernel(fn("st_fill"), 1, 1, 1, 64, 1, 1, 0, s, args, nullptr);
            CUresult r = CUDA_SUCCESS;
            switch (c) {
                case 0: r = cuStreamSynchronize(s); break;
                case 1: r = cuStreamQuery(s); break;
                case 2: r = cuCtxSynchronize(); break;
                case 3: r = cuMemcpyHtoDAsync(d, host.data(), 256, s); break;
                case 4: r = cuMemcpyDtoHAsync(host.data(), d, 256, s); break;
                case 5: r = cuMemcpyHtoD(d, host.data(), 256); break;
                case 6: r = cuMemFree(spare); break;
            }
            const CUresult later = cuLaunchKernel(fn("st_fill"), 1, 1, 1, 64, 1, 1, 0, s, args, nullptr);
            CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
            cuStreamIsCapturing(s, &st);
            CUgraph g = (CUgraph)1;
            const CUresult end = cuStreamEndCapture(s, &g);
            const bool good = r == cases[c].want && later == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED &&
                              st == CU_STREAM_CAPTURE_STATUS_INVALIDATED &&
                              end == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED && g == nullptr;
            ok &= good;
            char b[200];
            snprintf(b, sizeof b, "%s%s -> %d (later launch %d, end %d)", det.empty() ? "" : "; ", cases[c].name,
                     (int)r, (int)later, (int)end);
            det += b;
            cuMemFree(spare);
        }
        // RELAXED mode permits the unsafe calls; other threads' thread-local captures do not matter.
        CUdeviceptr spare;
        cuMemAlloc(&spare, 256);
        cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_RELAXED);
        const CUresult relaxed_free = cuMemFree(spare);
        CUgraph g = nullptr;
        const CUresult relaxed_end = cuStreamEndCapture(s, &g);
        cuGraphDestroy(g);
        det += "; RELAXED cuMemFree -> " + std::to_string((int)relaxed_free) + ", end " + std::to_string((int)relaxed_end);
        ok &= relaxed_free == CUDA_SUCCESS && relaxed_end == CUDA_SUCCESS;
        result("illegal calls during capture are refused and invalidate it", ok, det);
        cuMemFree(d);
    }
    {
        // An event recorded in the capture may not be queried (907); the legacy stream may not
        // run while a blocking stream of its device captures (906); a THREAD_LOCAL capture
        // ends only on the thread that began it (908). Each invalidates the capture.
        CUdeviceptr d = alloc_floats(64, 0.f);
        int n = 64;
        void* args[] = {&d, &n};
        CUstream s;
        cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
        CUevent ev;
        cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING);
        cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        cuEventRecord(ev, s);
        const CUresult query = cuEventQuery(ev);
        CUgraph g = nullptr;
        const CUresult end1 = cuStreamEndCapture(s, &g);
        CUstream blocking;
        cuStreamCreate(&blocking, 0);
        cuStreamBeginCapture_v2(blocking, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        const CUresult legacy = cuLaunchKernel(fn("st_fill"), 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr);
        const CUresult end2 = cuStreamEndCapture(blocking, &g);
        cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        CUresult other = CUDA_SUCCESS;
        std::thread t([&] {
            cuCtxSetCurrent(ctx);
            CUgraph g2 = nullptr;
            other = cuStreamEndCapture(s, &g2);
        });
        t.join();
        const CUresult end3 = cuStreamEndCapture(s, &g);
        cuGraphDestroy(g);
        cuCtxSynchronize();
        char det[256];
        snprintf(det, sizeof det,
                 "event query %d (end %d), legacy-stream launch %d (end %d), end from another thread %d (own "
                 "thread %d)",
                 (int)query, (int)end1, (int)legacy, (int)end2, (int)other, (int)end3);
        result("captured events, the legacy stream and other threads are refused as the driver does",
               query == CUDA_ERROR_CAPTURED_EVENT && end1 == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED &&
                   legacy == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT && end2 == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED &&
                   other == CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD && end3 == CUDA_SUCCESS,
               det);
        cuMemFree(d);
    }
    {
        // A graph whose buffer was freed is refused at launch, naming the freed allocation.
        auto [ab, text] = in_child([] {
            CUstream s;
            cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
            CUdeviceptr d = alloc_floats(16, 0.f);
            int n = 16;
            void* args[] = {&d, &n};
            cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
            cuLaunchKernel(fn("st_fill"), 1, 1, 1, 16, 1, 1, 0, s, args, nullptr);
            CUgraph g = nullptr;
            cuStreamEndCapture(s, &g);
            CUgraphExec e = nullptr;
            cuGraphInstantiateWithFlags(&e, g, 0);
            cuMemFree(d);
            const CUresult r = cuGraphLaunch(e, s);
            fprintf(stderr, "graph launch %d\n", (int)r);
            _exit(r == CUDA_ERROR_INVALID_VALUE ? 3 : 0);
        });
        result("a graph launch using freed memory is refused", ab && has(text, "FREED") && has(text, "graph launch 1"),
               text.substr(0, text.find('\n')));
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}

// The out-of-memory case runs in a fresh process so that the limit is read at start.
__attribute__((constructor)) static void oom_child_entry() {
    FILE* f = fopen("/proc/self/cmdline", "rb");
    if (!f) return;
    char buf[512] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    size_t first = strnlen(buf, n);
    if (first + 1 >= n || strcmp(buf + first + 1, "--oom-child") != 0) return;
    cuInit(0);
    CUdevice d;
    cuDeviceGet(&d, 0);
    CUcontext c;
    cuDevicePrimaryCtxRetain(&c, d);
    cuCtxSetCurrent(c);
    CUdeviceptr a, b;
    const CUresult r1 = cuMemAlloc(&a, 700 * 1024);
    const CUresult r2 = cuMemAlloc(&b, 700 * 1024);
    fprintf(stderr, "first %d second %d\n", (int)r1, (int)r2);
    _exit(r1 == CUDA_SUCCESS && r2 == CUDA_ERROR_OUT_OF_MEMORY ? 0 : 1);
}
