// driver.cpp: the stand-in CUDA driver (libcuda.so) of the virtual GPU. Test-only: the test
// script puts its folder first on LD_LIBRARY_PATH; nothing else ever finds it.
//
// It exports the subset of the driver API that tooln1 reaches through cudarc (prototypes from
// the CUDA 13 `cuda.h`, so the exported names and signatures are exactly the real ones) and
// enforces what the real driver enforces:
// - a device profile (H100 SXM 80 GB by default, H200 141 GB with TOOLN1_VGPU_DEVICE=h200;
//   TOOLN1_VGPU_DEVICES=N devices), compute capability 9.0, 132 SMs;
// - launch limits: at most 1024 threads per block (and the kernel's __launch_bounds__ and its
//   register count from the ptxas report), block z <= 64, grid y/z <= 65535, more than 48 KiB
//   of shared memory only after the MAX_DYNAMIC_SHARED_SIZE_BYTES opt-in, 227 KiB at most;
// - a current context for every call that needs one; cuInit before anything;
// - device memory: allocations fail once TOOLN1_VGPU_MEM_BYTES (default: the profile's memory)
//   is used; new memory is filled with 0xFF (NaN in bf16/f32, huge in u32); each allocation ends
//   at a guard page, and freed memory is made inaccessible (kept out of reuse), so an access
//   past the end or after free faults and is reported with the kernel and the allocation;
// - copies, memsets and launches check that their ranges lie in live allocations;
// - streams: work is queued and runs at the next synchronisation (stream, event, context, a copy
//   to pageable host memory, cuMemFree), in order per stream. Copies from pageable host memory
//   are staged at the call, as the real driver does; copies to or from page-locked host memory
//   (cuMemHostAlloc / cuMemHostRegister, or every host buffer with TOOLN1_VGPU_ASYNC=strict)
//   touch the host buffer only when the stream runs, so a buffer freed or changed too early is
//   caught. Freed page-locked memory is made inaccessible too.
// - stream capture and graphs (cuStreamBeginCapture .. cuStreamEndCapture, cuGraphInstantiate,
//   cuGraphLaunch): while a stream captures, its launches (parameters copied at the call),
//   async memsets, device-to-device and page-locked copies, event records and cuBLAS calls are
//   recorded instead of queued; what the real driver refuses during capture is refused with its
//   error code and invalidates the capture (see "capture" below); cuGraphLaunch checks every
//   recorded pointer against the live allocations, as a launch does, then queues the recorded
//   operations in order on its stream.
// Extensions for tests: vgpuMemStats(current, peak), vgpuResetPeak(), vgpuIsVirtual().
#include <cuda.h>
// Both the unversioned and the _v2 entry points of these are exported.
#undef cuDeviceGetUuid
#undef cuEventElapsedTime

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "vgpu.h"

#if defined(__SANITIZE_ADDRESS__)
#define VGPU_ASAN 1
#else
#define VGPU_ASAN 0
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace vgpu {

// ---- global state ---------------------------------------------------------------------------------
struct Alloc {
    uint64_t ptr;
    std::size_t size;
    void* map;
    std::size_t map_len;
    bool host;   // page-locked host memory
    int device;  // the device of a device allocation (-1 for host memory)
};

struct Op {
    std::function<void()> fn;
    const char* what;
    // Device ranges the operation reads or writes ((p, 0): a kernel's pointer parameter, which
    // must point into or just past a live allocation), checked again when a graph replays it.
    std::vector<std::pair<uint64_t, std::size_t>> uses;
};

struct Capture;

struct Stream {
    std::deque<Op> q;
    bool nonblocking;
    int device;
    bool draining = false;  // one thread at a time runs a stream's work, in order
    Capture* cap = nullptr;  // the capture sequence recording this stream's work, if any
};

// A stream capture sequence (cuStreamBeginCapture .. cuStreamEndCapture).
struct Capture {
    std::vector<Op> ops;
    bool invalid = false;
    const char* why = nullptr;  // the call that invalidated it
    CUstreamCaptureMode mode;
    uint64_t id;
    std::thread::id thread;
    Stream* stream;
};

// A captured graph and its executable instantiation: the recorded operations, in order.
struct Graph {
    std::vector<Op> ops;
};

struct Event {
    bool recorded = false;
    bool completed = false;
    double t_ms = 0;
    Stream* stream = nullptr;
    bool timing = true;
    bool captured = false;  // last recorded inside a capture sequence
};

struct Ctx {
    int device;
    int refs;
};

struct Module {
    std::vector<unsigned char> image;
};

struct Func {
    KernelInfo* k;
    Module* m;
    int max_dyn_smem;
};

static std::recursive_mutex mu;
static bool inited = false;
static std::map<uint64_t, Alloc> live;    // device allocations by start address
static std::map<uint64_t, Alloc> freed;   // quarantined freed device allocations
static std::map<uint64_t, Alloc> pinned;  // page-locked host ranges
static std::map<uint64_t, Alloc> pinned_freed;
static std::size_t used_bytes = 0, peak_bytes = 0;
static std::set<Stream*> streams;
static std::vector<Stream*> null_streams;  // each device's legacy default stream (made by cuInit)
static std::condition_variable_any drained;
static std::set<Event*> events;
static std::set<Module*> modules;
static std::set<Func*> funcs;
static std::vector<Ctx*> primary;
static thread_local Ctx* current = nullptr;
static std::set<Capture*> captures;  // every active capture sequence
static std::set<Graph*> graphs, execs;
static uint64_t next_capture_id = 1;

static int device_count() {
    const char* s = getenv("TOOLN1_VGPU_DEVICES");
    long n = s && *s ? strtol(s, nullptr, 10) : 1;
    return (int)(n < 1 ? 1 : (n > 16 ? 16 : n));
}

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

static const std::size_t kPage = (std::size_t)sysconf(_SC_PAGESIZE);

static std::size_t round_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

static const Alloc* find_in(const std::map<uint64_t, Alloc>& m, uint64_t p) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    if (p >= a.ptr && p < a.ptr + round_up(a.size, 256) + kPage) return &a;
    return nullptr;
}

bool device_range_ok(uint64_t p, std::size_t bytes) { return device_of_range(p, bytes) >= 0; }

int device_of_range(uint64_t p, std::size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = live.upper_bound(p);
    if (it == live.begin()) return -1;
    --it;
    const Alloc& a = it->second;
    return p >= a.ptr && p + bytes <= a.ptr + a.size && p + bytes >= p ? a.device : -1;
}

std::string describe_address(uint64_t p) {
    // Called from the fault handler: try the lock, never block.
    std::unique_lock<std::recursive_mutex> g(mu, std::try_to_lock);
    if (!g.owns_lock()) return "device memory tables busy";
    char b[256];
    if (const Alloc* a = find_in(live, p)) {
        if (p >= a->ptr + a->size)
            snprintf(b, sizeof b, "%llu bytes past the end of a %zu-byte device allocation at 0x%llx",
                     (unsigned long long)(p - a->ptr - a->size), a->size, (unsigned long long)a->ptr);
        else
            snprintf(b, sizeof b, "inside a live %zu-byte device allocation at 0x%llx (offset %llu)", a->size,
                     (unsigned long long)a->ptr, (unsigned long long)(p - a->ptr));
        return b;
    }
    if (const Alloc* a = find_in(freed, p)) {
        snprintf(b, sizeof b, "inside a FREED %zu-byte device allocation at 0x%llx (use after cuMemFree)", a->size,
                 (unsigned long long)a->ptr);
        return b;
    }
    if (const Alloc* a = find_in(pinned_freed, p)) {
        snprintf(b, sizeof b,
                 "inside FREED page-locked host memory (%zu bytes at 0x%llx): an asynchronous copy ran after its host "
                 "buffer was released",
                 a->size, (unsigned long long)a->ptr);
        return b;
    }
    return "not device memory (a host pointer or a wrong offset?)";
}

static bool is_pinned(const void* p, std::size_t n) {
    if (options().strict_async) return true;
    const Alloc* a = find_in(pinned, (uint64_t)(uintptr_t)p);
    return a && (uint64_t)(uintptr_t)p + n <= a->ptr + a->size;
}

// ---- streams --------------------------------------------------------------------------------------
static int current_device_or0() { return current ? current->device : 0; }
int current_device() { return current ? current->device : -1; }

// The stream a handle names: 0, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD are the legacy default
// stream of `device` (each device has its own, as each context has on a GPU).
static Stream* resolve(void* s, int device) {
    if (!s || (CUstream)s == CU_STREAM_LEGACY || (CUstream)s == CU_STREAM_PER_THREAD) {
        std::lock_guard<std::recursive_mutex> g(mu);
        if (null_streams.empty()) null_streams.push_back(new Stream{{}, false, 0, false});  // before cuInit
        return null_streams[device >= 0 && device < (int)null_streams.size() ? device : 0];
    }
    return (Stream*)s;
}
static Stream* to_stream(void* s) { return resolve(s, current_device_or0()); }

bool stream_valid(void* s) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!s || (CUstream)s == CU_STREAM_LEGACY || (CUstream)s == CU_STREAM_PER_THREAD || streams.count((Stream*)s))
        return true;
    for (Stream* n : null_streams)
        if (n == (Stream*)s) return true;
    return false;
}

void* stream_for(void* s, int device) { return resolve(s, device); }

int stream_device(void* s) {
    std::lock_guard<std::recursive_mutex> g(mu);
    return s ? ((Stream*)s)->device : -1;
}

// Queues an operation, or records it when the stream captures (an invalidated capture drops it:
// its cuStreamEndCapture fails anyway).
static void enqueue_op(Stream* st, Op op) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (st->cap) {
        if (options().trace) report("record %s in the capture of stream %p", op.what, (void*)st);
        if (!st->cap->invalid) st->cap->ops.push_back(std::move(op));
        return;
    }
    if (options().trace) report("queue %s on stream %p", op.what, (void*)st);
    st->q.push_back(std::move(op));
}

void enqueue(void* s, std::function<void()> op, const char* what) { enqueue_op(to_stream(s), Op{std::move(op), what, {}}); }

// ---- capture rules ----------------------------------------------------------------------------------
// As the CUDA driver API documents them (cuStreamBeginCapture, cuThreadExchangeStreamCaptureMode,
// and the programming guide's "Prohibited and Unhandled Operations" of stream capture).
static void invalidate(Capture* c, const char* api) {
    if (!c->invalid) {
        c->invalid = true;
        c->why = api;
        report("%s during stream capture (stream %p): the capture is invalidated", api, (void*)c->stream);
    }
}

// A potentially unsafe call (one that synchronises or is not stream-ordered: cuMemFree,
// synchronous copies and memsets, cuCtxSynchronize, cuMemFreeHost) is refused with
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED while this thread has a capture that is not RELAXED, or
// another thread has a GLOBAL one; the captures that forbid it are invalidated.
static CUresult unsafe_call(const char* api) {
    std::lock_guard<std::recursive_mutex> g(mu);
    const auto me = std::this_thread::get_id();
    bool refused = false;
    for (Capture* c : captures) {
        const bool forbids = c->mode == CU_STREAM_CAPTURE_MODE_GLOBAL ||
                             (c->mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && c->thread == me);
        if (forbids) {
            invalidate(c, api);
            refused = true;
        }
    }
    return refused ? CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED : CUDA_SUCCESS;
}

// The capture state an operation on stream `s` meets: on a capturing stream, an invalidated
// capture refuses it (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED) and an `illegal` one (a
// synchronisation or query of the stream, a copy between it and pageable host memory) is
// refused with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates it; the legacy stream while
// a blocking stream of its device captures is CUDA_ERROR_STREAM_CAPTURE_IMPLICIT (its implicit
// synchronisation would join the capture), which invalidates that capture.
static CUresult capture_gate(void* s, const char* api, bool illegal) {
    Stream* st = to_stream(s);
    std::lock_guard<std::recursive_mutex> g(mu);
    if (st->cap) {
        if (st->cap->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        if (illegal) {
            invalidate(st->cap, api);
            return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
        return CUDA_SUCCESS;
    }
    bool legacy = false;
    for (Stream* n : null_streams) legacy |= n == st;
    if (legacy)
        for (Capture* c : captures)
            if (!c->stream->nonblocking && c->stream->device == st->device) {
                invalidate(c, api);
                return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
            }
    return CUDA_SUCCESS;
}

static bool capturing(void* s) {
    Stream* st = to_stream(s);
    std::lock_guard<std::recursive_mutex> g(mu);
    return st->cap != nullptr;
}

// Runs a stream's queued work in order until the queue is empty or `stop()` (checked before each
// operation, without the driver's lock held) says to stop. Only one thread at a time runs a
// stream: with `wait`, waits for another thread that is running it and then continues where that
// one stopped; without, returns false at once when another thread holds the stream.
static bool drain(Stream* st, const std::function<bool()>* stop, bool wait) {
    {
        std::unique_lock<std::recursive_mutex> g(mu);
        if (st->draining && !wait) return false;
        drained.wait(g, [st] { return !st->draining; });
        st->draining = true;
    }
    for (;;) {
        if (stop && (*stop)()) break;
        Op op;
        {
            std::lock_guard<std::recursive_mutex> g(mu);
            if (st->q.empty()) break;
            op = std::move(st->q.front());
            st->q.pop_front();
        }
        if (options().trace) report("run %s", op.what);
        op.fn();
    }
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        st->draining = false;
    }
    drained.notify_all();
    return true;
}

// Runs a stream's queued work in order (after any other thread that is running it).
static void flush(Stream* st) { drain(st, nullptr, true); }

bool run_until(void* s, const std::function<bool()>& stop) { return drain((Stream*)s, &stop, false); }

void flush_stream(void* s) { flush((Stream*)s); }

// Everything queued on the current device (context synchronisation; cuMemFree).
static void flush_all() {
    const int dev = current_device_or0();
    std::vector<Stream*> all;
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        for (Stream* s : streams)
            if (s->device == dev) all.push_back(s);
    }
    flush(resolve(nullptr, dev));
    for (Stream* s : all) flush(s);
}

// The legacy default stream waits for (and is waited on by) every blocking stream of its device.
static void flush_blocking() {
    const int dev = current_device_or0();
    std::vector<Stream*> all;
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        for (Stream* s : streams)
            if (!s->nonblocking && s->device == dev) all.push_back(s);
    }
    for (Stream* s : all) flush(s);
    flush(resolve(nullptr, dev));
}

}  // namespace vgpu

using namespace vgpu;

// ---- helpers --------------------------------------------------------------------------------------
#define NEED_INIT()                                  \
    do {                                             \
        if (!inited) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)
#define NEED_CTX()                                             \
    do {                                                       \
        if (!inited) return CUDA_ERROR_NOT_INITIALIZED;        \
        if (!current) {                                        \
            report("%s called without a current context", __func__); \
            return CUDA_ERROR_INVALID_CONTEXT;                 \
        }                                                      \
    } while (0)

static CUresult bad(CUresult r, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static CUresult bad(CUresult r, const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    report("%s", buf);
    return r;
}

static bool range_ok_or_report(const char* api, const char* what, uint64_t p, std::size_t n) {
    if (n == 0) return true;
    if (device_range_ok(p, n)) return true;
    report("%s: %s range [0x%llx, +%zu) is not inside one live device allocation: %s", api, what,
           (unsigned long long)p, n, describe_address(p).c_str());
    return false;
}

// ---- errors ----------------------------------------------------------------------------------------
struct ErrName {
    CUresult r;
    const char* name;
    const char* text;
};
static const ErrName kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
     "operation not permitted when stream is capturing"},
    {CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
    {CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
     "operation would make the legacy stream depend on a capturing blocking stream"},
    {CUDA_ERROR_CAPTURED_EVENT, "CUDA_ERROR_CAPTURED_EVENT",
     "operation not permitted on an event last recorded in a capturing stream"},
    {CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
     "attempt to terminate a thread-local capture sequence from another thread"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

EXPORT CUresult cuGetErrorName(CUresult error, const char** pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    for (auto& e : kErrors)
        if (e.r == error) {
            *pStr = e.name;
            return CUDA_SUCCESS;
        }
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult error, const char** pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    for (auto& e : kErrors)
        if (e.r == error) {
            *pStr = e.text;
            return CUDA_SUCCESS;
        }
    *pStr = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

// ---- init, devices ---------------------------------------------------------------------------------
EXPORT CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    install_fault_handler();  // also this thread's signal stack
    if (!inited) {
        inited = true;
        (void)options();
        for (int i = 0; i < device_count(); ++i) primary.push_back(new Ctx{i, 0});
        if (null_streams.empty()) null_streams.push_back(new Stream{{}, false, 0, false});
        while ((int)null_streams.size() < device_count())
            null_streams.push_back(new Stream{{}, false, (int)null_streams.size(), false});
    }
    return CUDA_SUCCESS;
}

// NVRTC opens libcuda.so.1 and asks it for internal export tables; the stand-in has none.
EXPORT CUresult cuGetExportTable(const void** table, const CUuuid*) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetCount(int* count) {
    NEED_INIT();
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = device_count();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
    NEED_INIT();
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

static bool dev_ok(CUdevice d) { return d >= 0 && d < device_count(); }

EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    NEED_INIT();
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(dev)) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", options().h200 ? "tooln1 virtual GPU (NVIDIA H200 profile)"
                                                     : "tooln1 virtual GPU (NVIDIA H100 80GB HBM3 profile)");
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    NEED_INIT();
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(dev)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = options().mem_bytes;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) {
    NEED_INIT();
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(dev)) return CUDA_ERROR_INVALID_DEVICE;
    memset(uuid, 0, sizeof *uuid);
    memcpy(uuid->bytes, "tooln1-vgpu", 11);
    uuid->bytes[15] = (char)dev;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

EXPORT CUresult cuDeviceGetAttribute(int* pi, CUdevice_attribute attrib, CUdevice dev) {
    NEED_INIT();
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(dev)) return CUDA_ERROR_INVALID_DEVICE;
    const bool h200 = options().h200;
    int v = 0;
    switch (attrib) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: v = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: v = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: v = 49152; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: v = 232448; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: v = 233472; break;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: v = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: v = h200 ? 3201000 : 2619000; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: v = 5120; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: v = 52428800; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: v = 132; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: v = 2048; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: v = 32; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: v = 1; break;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: v = 2; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: v = 1; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: v = dev; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: v = dev + 1; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: v = 0; break;  // stream-ordered allocation not modelled
        case CU_DEVICE_ATTRIBUTE_INTEGRATED: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: v = 1; break;
        case CU_DEVICE_ATTRIBUTE_TCC_DRIVER: v = 0; break;
        case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: v = 0; break;
        default: v = 0; break;
    }
    *pi = v;
    return CUDA_SUCCESS;
}

// ---- contexts -------------------------------------------------------------------------------------
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
    NEED_INIT();
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(dev)) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::recursive_mutex> g(mu);
    primary[dev]->refs++;
    *pctx = (CUcontext)primary[dev];
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    NEED_INIT();
    if (!dev_ok(dev)) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::recursive_mutex> g(mu);
    if (primary[dev]->refs <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    primary[dev]->refs--;
    return CUDA_SUCCESS;
}

static bool ctx_ok(CUcontext c) {
    for (Ctx* p : primary)
        if ((CUcontext)p == c) return p->refs > 0;
    return false;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    NEED_INIT();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (ctx && !ctx_ok(ctx)) return bad(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: context %p is not retained", (void*)ctx);
    current = (Ctx*)ctx;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext* pctx) {
    NEED_INIT();
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = (CUcontext)current;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) { return cuCtxSetCurrent(ctx); }
EXPORT CUresult cuCtxPopCurrent_v2(CUcontext* pctx) {
    NEED_INIT();
    if (pctx) *pctx = (CUcontext)current;
    current = nullptr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice* dev) {
    NEED_CTX();
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    *dev = current->device;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize() {
    NEED_CTX();
    if (CUresult r = unsafe_call("cuCtxSynchronize")) return r;
    {
        // Synchronising a context with a capturing stream is invalid whatever the mode.
        std::lock_guard<std::recursive_mutex> g(mu);
        bool refused = false;
        for (Capture* c : captures)
            if (c->stream->device == current->device) {
                invalidate(c, "cuCtxSynchronize");
                refused = true;
            }
        if (refused) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    flush_all();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetFlags(unsigned int) {
    NEED_CTX();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetLimit(size_t* v, CUlimit) {
    NEED_CTX();
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetLimit(CUlimit, size_t) {
    NEED_CTX();
    return CUDA_SUCCESS;
}

// ---- memory ---------------------------------------------------------------------------------------
static CUresult alloc_device(uint64_t* out, std::size_t bytes) {
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    const std::size_t acct = round_up(bytes, 512);
    if (acct > options().mem_bytes || used_bytes > options().mem_bytes - acct) {
        report("cuMemAlloc of %zu bytes: out of device memory (%zu of %zu bytes in use)", bytes, used_bytes,
               options().mem_bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    Alloc a{};
    a.size = bytes;
    a.device = current->device;
#if VGPU_ASAN
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(p, 0xFF, bytes);
    a.ptr = (uint64_t)(uintptr_t)p;
    a.map = p;
    a.map_len = 0;
#else
    const std::size_t body = round_up(round_up(bytes, 256), kPage);
    a.map_len = body + kPage;
    void* m = mmap(nullptr, a.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    a.map = m;
    unsigned char* guard = (unsigned char*)m + body;
    mprotect(guard, kPage, PROT_NONE);
    // The allocation ends as close to the guard page as 256-byte alignment allows.
    a.ptr = (uint64_t)(uintptr_t)(guard - round_up(bytes, 256));
    memset((void*)(uintptr_t)a.ptr, 0xFF, round_up(bytes, 256));
#endif
    live[a.ptr] = a;
    used_bytes += acct;
    if (used_bytes > peak_bytes) peak_bytes = used_bytes;
    *out = a.ptr;
    return CUDA_SUCCESS;
}

static void quarantine(std::map<uint64_t, Alloc>& q, const Alloc& a) {
#if VGPU_ASAN
    (void)q;
    free(a.map);
#else
    mprotect(a.map, a.map_len, PROT_NONE);
    madvise(a.map, a.map_len, MADV_DONTNEED);
    q[a.ptr] = a;
    // Keep the address space bounded: release the oldest quarantined ranges beyond 1M entries.
    if (q.size() > (1u << 20)) {
        auto it = q.begin();
        munmap(it->second.map, it->second.map_len);
        q.erase(it);
    }
#endif
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytes) {
    NEED_CTX();
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    uint64_t p = 0;
    CUresult r = alloc_device(&p, bytes);
    if (r == CUDA_SUCCESS) *dptr = (CUdeviceptr)p;
    return r;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    NEED_CTX();
    if (dptr == 0) return CUDA_SUCCESS;
    if (CUresult r = unsafe_call("cuMemFree")) return r;
    flush_all();  // the real cuMemFree waits for work that may still use the memory
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = live.find((uint64_t)dptr);
    if (it == live.end()) {
        if (find_in(freed, (uint64_t)dptr))
            return bad(CUDA_ERROR_INVALID_VALUE, "cuMemFree(0x%llx): double free", (unsigned long long)dptr);
        return bad(CUDA_ERROR_INVALID_VALUE, "cuMemFree(0x%llx): not the start of a device allocation (%s)",
                   (unsigned long long)dptr, describe_address((uint64_t)dptr).c_str());
    }
    Alloc a = it->second;
    live.erase(it);
    used_bytes -= round_up(a.size, 512);
    quarantine(freed, a);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    NEED_CTX();
    if (!free_b || !total) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    *total = options().mem_bytes;
    *free_b = options().mem_bytes - used_bytes;
    return CUDA_SUCCESS;
}

static CUresult alloc_host(void** pp, std::size_t bytes) {
    if (!pp || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    Alloc a{};
    a.size = bytes;
    a.host = true;
    a.device = -1;
#if VGPU_ASAN
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    a.map = p;
    a.ptr = (uint64_t)(uintptr_t)p;
#else
    a.map_len = round_up(bytes, kPage);
    void* m = mmap(nullptr, a.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    a.map = m;
    a.ptr = (uint64_t)(uintptr_t)m;
#endif
    pinned[a.ptr] = a;
    *pp = (void*)(uintptr_t)a.ptr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostAlloc(void** pp, size_t bytes, unsigned int) {
    NEED_CTX();
    return alloc_host(pp, bytes);
}
EXPORT CUresult cuMemAllocHost_v2(void** pp, size_t bytes) {
    NEED_CTX();
    return alloc_host(pp, bytes);
}

EXPORT CUresult cuMemFreeHost(void* p) {
    NEED_CTX();
    if (CUresult r = unsafe_call("cuMemFreeHost")) return r;
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = pinned.find((uint64_t)(uintptr_t)p);
    if (it == pinned.end() || (it->second.map_len == 0 && !VGPU_ASAN))
        return bad(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost(%p): not page-locked memory from cuMemHostAlloc", p);
    Alloc a = it->second;
    pinned.erase(it);
    // Work still queued that reads or writes this buffer faults, and is reported as such.
    quarantine(pinned_freed, a);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned int) {
    NEED_CTX();
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    Alloc a{};
    a.ptr = (uint64_t)(uintptr_t)p;
    a.size = bytes;
    a.host = true;
    a.device = -1;
    a.map_len = 0;
    pinned[a.ptr] = a;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostUnregister(void* p) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    auto it = pinned.find((uint64_t)(uintptr_t)p);
    if (it == pinned.end()) return CUDA_ERROR_INVALID_VALUE;
    pinned.erase(it);
    return CUDA_SUCCESS;
}

// ---- copies and memsets ------------------------------------------------------------------------------
static CUresult htod(uint64_t dst, const void* src, std::size_t n, CUstream s, bool sync, const char* api) {
    NEED_CTX();
    if (n == 0) return CUDA_SUCCESS;
    if (!src) return bad(CUDA_ERROR_INVALID_VALUE, "%s: null host pointer", api);
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "%s: invalid stream %p", api, (void*)s);
    if (!range_ok_or_report(api, "destination", dst, n)) return CUDA_ERROR_INVALID_VALUE;
    if (sync)
        if (CUresult r = unsafe_call(api)) return r;
    if (CUresult r = capture_gate(s, api, !sync && !is_pinned(src, n))) return r;
    if (!sync && is_pinned(src, n)) {
        enqueue_op(to_stream(s), Op{[dst, src, n] { memcpy((void*)(uintptr_t)dst, src, n); },
                                    "memcpy HtoD (page-locked, deferred read)", {{dst, n}}});
    } else {
        auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char*)src,
                                                                   (const unsigned char*)src + n);
        enqueue(s, [dst, staged] { memcpy((void*)(uintptr_t)dst, staged->data(), staged->size()); }, "memcpy HtoD");
    }
    if (sync) flush_blocking();
    return CUDA_SUCCESS;
}

static CUresult dtoh(void* dst, uint64_t src, std::size_t n, CUstream s, bool sync, const char* api) {
    NEED_CTX();
    if (n == 0) return CUDA_SUCCESS;
    if (!dst) return bad(CUDA_ERROR_INVALID_VALUE, "%s: null host pointer", api);
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "%s: invalid stream %p", api, (void*)s);
    if (!range_ok_or_report(api, "source", src, n)) return CUDA_ERROR_INVALID_VALUE;
    if (sync)
        if (CUresult r = unsafe_call(api)) return r;
    if (CUresult r = capture_gate(s, api, !sync && !is_pinned(dst, n))) return r;
    enqueue_op(to_stream(s), Op{[dst, src, n] { memcpy(dst, (const void*)(uintptr_t)src, n); }, "memcpy DtoH", {{src, n}}});
    if (sync) flush_blocking();
    else if (!is_pinned(dst, n)) flush(to_stream(s));
    return CUDA_SUCCESS;
}

static CUresult dtod(uint64_t dst, uint64_t src, std::size_t n, CUstream s, bool sync, const char* api) {
    NEED_CTX();
    if (n == 0) return CUDA_SUCCESS;
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "%s: invalid stream %p", api, (void*)s);
    if (!range_ok_or_report(api, "source", src, n) || !range_ok_or_report(api, "destination", dst, n))
        return CUDA_ERROR_INVALID_VALUE;
    if (sync)
        if (CUresult r = unsafe_call(api)) return r;
    if (CUresult r = capture_gate(s, api, false)) return r;
    enqueue_op(to_stream(s), Op{[dst, src, n] { memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n); },
                                "memcpy DtoD", {{src, n}, {dst, n}}});
    if (sync) flush_blocking();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return htod(dst, src, n, nullptr, true, "cuMemcpyHtoD");
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    return htod(dst, src, n, s, false, "cuMemcpyHtoDAsync");
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return dtoh(dst, src, n, nullptr, true, "cuMemcpyDtoH");
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    return dtoh(dst, src, n, s, false, "cuMemcpyDtoHAsync");
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return dtod(dst, src, n, nullptr, true, "cuMemcpyDtoD");
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return dtod(dst, src, n, s, false, "cuMemcpyDtoDAsync");
}

template <class T>
static CUresult memset_t(uint64_t dst, T v, std::size_t count, CUstream s, bool sync, const char* api) {
    NEED_CTX();
    if (count == 0) return CUDA_SUCCESS;
    if (dst % sizeof(T) != 0) return bad(CUDA_ERROR_INVALID_VALUE, "%s: destination 0x%llx is not %zu-byte aligned", api,
                                         (unsigned long long)dst, sizeof(T));
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "%s: invalid stream %p", api, (void*)s);
    if (!range_ok_or_report(api, "destination", dst, count * sizeof(T))) return CUDA_ERROR_INVALID_VALUE;
    if (sync)
        if (CUresult r = unsafe_call(api)) return r;
    if (CUresult r = capture_gate(s, api, false)) return r;
    enqueue_op(to_stream(s), Op{[dst, v, count] {
                                    T* p = (T*)(uintptr_t)dst;
                                    for (std::size_t i = 0; i < count; ++i) p[i] = v;
                                },
                                "memset", {{dst, count * sizeof(T)}}});
    if (sync) flush_blocking();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { return memset_t<unsigned char>(d, v, n, nullptr, true, "cuMemsetD8"); }
EXPORT CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
    return memset_t<unsigned char>(d, v, n, s, false, "cuMemsetD8Async");
}
EXPORT CUresult cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n) { return memset_t<unsigned short>(d, v, n, nullptr, true, "cuMemsetD16"); }
EXPORT CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream s) {
    return memset_t<unsigned short>(d, v, n, s, false, "cuMemsetD16Async");
}
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned int v, size_t n) { return memset_t<unsigned int>(d, v, n, nullptr, true, "cuMemsetD32"); }
EXPORT CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUstream s) {
    return memset_t<unsigned int>(d, v, n, s, false, "cuMemsetD32Async");
}

// ---- streams and events --------------------------------------------------------------------------
EXPORT CUresult cuStreamCreate(CUstream* ps, unsigned int flags) {
    NEED_CTX();
    if (!ps) return CUDA_ERROR_INVALID_VALUE;
    if (flags & ~1u) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* s = new Stream{{}, (flags & CU_STREAM_NON_BLOCKING) != 0, current->device, false};
    streams.insert(s);
    *ps = (CUstream)s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamCreateWithPriority(CUstream* ps, unsigned int flags, int) { return cuStreamCreate(ps, flags); }

EXPORT CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    NEED_CTX();
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamSynchronize(CUstream s) {
    NEED_CTX();
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuStreamSynchronize: invalid stream %p", (void*)s);
    if (CUresult r = capture_gate(s, "cuStreamSynchronize", true)) return r;
    if (!s || s == CU_STREAM_LEGACY) flush_blocking();
    else flush(to_stream(s));
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamQuery(CUstream s) {
    NEED_CTX();
    if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (CUresult r = capture_gate(s, "cuStreamQuery", true)) return r;
    std::lock_guard<std::recursive_mutex> g(mu);
    return to_stream(s)->q.empty() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    NEED_CTX();
    if (!s || !stream_valid(s) || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD)
        return bad(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: invalid stream %p", (void*)s);
    flush((Stream*)s);  // queued work still completes
    std::lock_guard<std::recursive_mutex> g(mu);
    // Unlisted but not freed: another thread's cuCtxSynchronize or cuMemFree may still be
    // draining it (stream objects are small; a test process makes few).
    streams.erase((Stream*)s);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventCreate(CUevent* pe, unsigned int flags) {
    NEED_CTX();
    if (!pe) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    Event* e = new Event();
    e->timing = !(flags & CU_EVENT_DISABLE_TIMING);
    events.insert(e);
    *pe = (CUevent)e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent ev, CUstream s) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!events.count((Event*)ev)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord: invalid event %p", (void*)ev);
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord: invalid stream %p", (void*)s);
    if (CUresult r = capture_gate(s, "cuEventRecord", false)) return r;
    Event* e = (Event*)ev;
    e->recorded = true;
    e->completed = false;
    e->stream = to_stream(s);
    e->captured = e->stream->cap != nullptr;
    enqueue(s,
            [e] {
                e->t_ms = now_ms();
                e->completed = true;
            },
            "event record");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecordWithFlags(CUevent ev, CUstream s, unsigned int) { return cuEventRecord(ev, s); }

EXPORT CUresult cuEventSynchronize(CUevent ev) {
    NEED_CTX();
    Stream* st;
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        if (!events.count((Event*)ev)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuEventSynchronize: invalid event");
        st = ((Event*)ev)->stream;
        if (((Event*)ev)->captured && st && st->cap) {
            invalidate(st->cap, "cuEventSynchronize of an event recorded in the capture");
            return CUDA_ERROR_CAPTURED_EVENT;
        }
    }
    if (st) flush(st);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventQuery(CUevent ev) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!events.count((Event*)ev)) return CUDA_ERROR_INVALID_HANDLE;
    Event* e = (Event*)ev;
    if (e->captured && e->stream && e->stream->cap) {
        invalidate(e->stream->cap, "cuEventQuery of an event recorded in the capture");
        return CUDA_ERROR_CAPTURED_EVENT;
    }
    return (!e->recorded || e->completed) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    if (!events.count((Event*)a) || !events.count((Event*)b)) return CUDA_ERROR_INVALID_HANDLE;
    Event* ea = (Event*)a;
    Event* eb = (Event*)b;
    if (!ea->timing || !eb->timing) return CUDA_ERROR_INVALID_HANDLE;
    if (!ea->recorded || !eb->recorded) return CUDA_ERROR_INVALID_HANDLE;
    if (!ea->completed || !eb->completed) return CUDA_ERROR_NOT_READY;
    *ms = (float)(eb->t_ms - ea->t_ms);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

EXPORT CUresult cuEventDestroy_v2(CUevent ev) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!events.count((Event*)ev)) return CUDA_ERROR_INVALID_HANDLE;
    Event* e = (Event*)ev;
    // Queued records still reference the event: leak it rather than free it under them.
    events.erase(e);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent ev, unsigned int) {
    NEED_CTX();
    Stream* st;
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        if (!events.count((Event*)ev)) return CUDA_ERROR_INVALID_HANDLE;
        if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
        st = ((Event*)ev)->stream;
    }
    // Conservative: the recording stream runs now, so the waiting stream's later work sees it.
    if (st) flush(st);
    return CUDA_SUCCESS;
}

// ---- modules and launches ------------------------------------------------------------------------
static std::size_t image_size(const unsigned char* img) {
    uint32_t magic;
    memcpy(&magic, img, 4);
    if (magic == 0xBA55ED50u) {  // fatbin: u32 magic, u16 version, u16 header size, u64 body size
        uint16_t hs;
        uint64_t body;
        memcpy(&hs, img + 6, 2);
        memcpy(&body, img + 8, 8);
        return hs + body;
    }
    if (img[0] == 0x7f && img[1] == 'E' && img[2] == 'L' && img[3] == 'F') {  // ELF64 cubin
        uint64_t shoff;
        uint16_t shentsize, shnum;
        memcpy(&shoff, img + 0x28, 8);
        memcpy(&shentsize, img + 0x3A, 2);
        memcpy(&shnum, img + 0x3C, 2);
        return shoff + (uint64_t)shentsize * shnum;
    }
    return strlen((const char*)img);  // PTX text
}

EXPORT CUresult cuModuleLoadData(CUmodule* pm, const void* image) {
    NEED_CTX();
    if (!pm || !image) return CUDA_ERROR_INVALID_VALUE;
    const unsigned char* img = (const unsigned char*)image;
    if (((uintptr_t)img & 7) != 0) return bad(CUDA_ERROR_INVALID_VALUE, "cuModuleLoadData: image is not 8-byte aligned");
    std::size_t n = image_size(img);
    if (n == 0 || n > ((std::size_t)1 << 32)) return bad(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: unrecognised image");
    Module* m = new Module();
    m->image.assign(img, img + n);
    std::lock_guard<std::recursive_mutex> g(mu);
    modules.insert(m);
    *pm = (CUmodule)m;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleLoadDataEx(CUmodule* pm, const void* image, unsigned int, CUjit_option*, void**) {
    return cuModuleLoadData(pm, image);
}

EXPORT CUresult cuModuleUnload(CUmodule mod) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!modules.count((Module*)mod)) return CUDA_ERROR_INVALID_HANDLE;
    modules.erase((Module*)mod);
    for (auto it = funcs.begin(); it != funcs.end();) {
        if ((*it)->m == (Module*)mod) it = funcs.erase(it);
        else ++it;
    }
    return CUDA_SUCCESS;
}

static bool mentions(const std::vector<unsigned char>& img, const char* name) {
    const std::size_t n = strlen(name);
    if (n == 0 || img.size() < n) return false;
    for (std::size_t i = 0; i + n <= img.size(); ++i) {
        if (img[i] == (unsigned char)name[0] && memcmp(&img[i], name, n) == 0) {
            const unsigned char after = i + n < img.size() ? img[i + n] : 0;
            const bool ident = (after >= '0' && after <= '9') || (after >= 'a' && after <= 'z') ||
                               (after >= 'A' && after <= 'Z') || after == '_';
            if (!ident) return true;
        }
    }
    return false;
}

EXPORT CUresult cuModuleGetFunction(CUfunction* pf, CUmodule mod, const char* name) {
    NEED_CTX();
    if (!pf || !name) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!modules.count((Module*)mod)) return CUDA_ERROR_INVALID_HANDLE;
    Module* m = (Module*)mod;
    if (!mentions(m->image, name))
        return bad(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction: module image does not contain a kernel named `%s`", name);
    KernelInfo* k = find_kernel(name);
    if (!k)
        return bad(CUDA_ERROR_NOT_FOUND,
                   "cuModuleGetFunction: kernel `%s` is in the image but not compiled into the virtual GPU (rebuild "
                   "it with tools/vgpu/build.sh from this checkout)",
                   name);
    Func* f = new Func{k, m, 49152 - (k->static_smem > 0 ? k->static_smem : 0)};
    funcs.insert(f);
    *pf = (CUfunction)f;
    return CUDA_SUCCESS;
}

static int reg_limited_threads(const KernelInfo* k) {
    if (k->regs <= 0) return 1024;
    // Registers are allocated per warp in units of 256; 64 Ki registers per block.
    const int per_warp = (k->regs * 32 + 255) / 256 * 256;
    int warps = 65536 / per_warp;
    if (warps > 32) warps = 32;
    return warps * 32;
}

EXPORT CUresult cuFuncGetAttribute(int* pi, CUfunction_attribute attrib, CUfunction hfunc) {
    NEED_CTX();
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!funcs.count((Func*)hfunc)) return CUDA_ERROR_INVALID_HANDLE;
    Func* f = (Func*)hfunc;
    const KernelInfo* k = f->k;
    switch (attrib) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: {
            int t = reg_limited_threads(k);
            if (k->max_threads > 0 && k->max_threads < t) t = k->max_threads;
            *pi = t;
            break;
        }
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *pi = k->static_smem > 0 ? k->static_smem : 0; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = k->regs; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *pi = f->max_dyn_smem; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: *pi = 90; break;
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *pi = 90; break;
        default: *pi = 0; break;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!funcs.count((Func*)hfunc)) return CUDA_ERROR_INVALID_HANDLE;
    Func* f = (Func*)hfunc;
    if (attrib == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        const int st = f->k->static_smem > 0 ? f->k->static_smem : 0;
        if (value < 0 || value + st > 232448)
            return bad(CUDA_ERROR_INVALID_VALUE,
                       "cuFuncSetAttribute(%s, MAX_DYNAMIC_SHARED_SIZE_BYTES, %d): more than 227 KiB with %d static",
                       f->k->name, value, st);
        f->max_dyn_smem = value;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetCacheConfig(CUfunction hfunc, CUfunc_cache) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    return funcs.count((Func*)hfunc) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuLaunchKernel(CUfunction hfunc, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    NEED_CTX();
    Func* f;
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        if (!funcs.count((Func*)hfunc)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: invalid function handle");
        f = (Func*)hfunc;
    }
    KernelInfo* k = f->k;
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "launch of `%s`: invalid stream %p", k->name, (void*)s);
    if (extra) return bad(CUDA_ERROR_INVALID_VALUE, "launch of `%s`: the `extra` parameter form is not modelled", k->name);
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535)
        return bad(CUDA_ERROR_INVALID_VALUE, "launch of `%s`: grid (%u, %u, %u) outside the limits (1..2^31-1, 1..65535, 1..65535)",
                   k->name, gx, gy, gz);
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || threads > 1024)
        return bad(CUDA_ERROR_INVALID_VALUE,
                   "launch of `%s`: block (%u, %u, %u) outside the limits (x, y <= 1024, z <= 64, x*y*z <= 1024)",
                   k->name, bx, by, bz);
    if (k->max_threads > 0 && threads > (unsigned long long)k->max_threads)
        return bad(CUDA_ERROR_INVALID_VALUE, "launch of `%s`: %llu threads per block exceed its __launch_bounds__(%d)",
                   k->name, threads, k->max_threads);
    if (threads > (unsigned long long)reg_limited_threads(k))
        return bad(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                   "launch of `%s`: %llu threads x %d registers exceed the 65536 registers of a block", k->name,
                   threads, k->regs);
    if ((int)smem > f->max_dyn_smem)
        return bad(CUDA_ERROR_INVALID_VALUE,
                   "launch of `%s`: %u bytes of dynamic shared memory exceed the limit of %d (over 48 KiB needs "
                   "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES))",
                   k->name, smem, f->max_dyn_smem);
    if (k->nparams > 0 && !params)
        return bad(CUDA_ERROR_INVALID_VALUE, "launch of `%s`: kernelParams is NULL for %d parameters", k->name, k->nparams);
    if (CUresult r = capture_gate(s, k->name, false)) return r;
    Launch l;
    std::vector<std::pair<uint64_t, std::size_t>> uses;
    l.k = k;
    l.grid = {gx, gy, gz};
    l.block = {bx, by, bz};
    l.smem = smem;
    std::size_t off = 0;
    for (int i = 0; i < k->nparams; ++i) {
        if (!params[i]) return bad(CUDA_ERROR_INVALID_VALUE, "launch of `%s`: kernelParams[%d] is NULL", k->name, i);
        off = round_up(off, 8);
        l.offsets.push_back((unsigned)off);
        l.blob.resize(off + k->sizes[i]);
        memcpy(l.blob.data() + off, params[i], k->sizes[i]);
        if (k->is_ptr[i]) {
            uint64_t p;
            memcpy(&p, params[i], 8);
            if (p != 0 && !device_range_ok(p, 0) && !device_range_ok(p - 1, 1))
                return bad(CUDA_ERROR_INVALID_VALUE,
                           "launch of `%s` (%s): pointer parameter %d = 0x%llx is not device memory: %s", k->name,
                           k->file, i, (unsigned long long)p, describe_address(p).c_str());
            if (p != 0) uses.emplace_back(p, 0);
        }
        off += k->sizes[i];
    }
    if (options().trace)
        report("launch %s grid (%u,%u,%u) block (%u,%u,%u) smem %u", k->name, gx, gy, gz, bx, by, bz, smem);
    auto lp = std::make_shared<Launch>(std::move(l));
    enqueue_op(to_stream(s), Op{[lp] { run_launch(*lp); }, k->name, std::move(uses)});
    return CUDA_SUCCESS;
}

// ---- stream capture and graphs ---------------------------------------------------------------------
EXPORT CUresult cuStreamBeginCapture_v2(CUstream s, CUstreamCaptureMode mode) {
    NEED_CTX();
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuStreamBeginCapture: invalid stream %p", (void*)s);
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    if (!s || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD)
        return bad(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: the legacy stream cannot be captured");
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* st = to_stream(s);
    if (st->cap) return bad(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture: stream %p is already capturing", (void*)s);
    Capture* c = new Capture();
    c->mode = mode;
    c->id = next_capture_id++;
    c->thread = std::this_thread::get_id();
    c->stream = st;
    st->cap = c;
    captures.insert(c);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamEndCapture(CUstream s, CUgraph* pg) {
    NEED_CTX();
    if (!pg) return CUDA_ERROR_INVALID_VALUE;
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuStreamEndCapture: invalid stream %p", (void*)s);
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* st = to_stream(s);
    Capture* c = st->cap;
    if (!c) return bad(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture: stream %p is not capturing", (void*)s);
    if (c->mode != CU_STREAM_CAPTURE_MODE_RELAXED && c->thread != std::this_thread::get_id())
        return bad(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
                   "cuStreamEndCapture: the capture of stream %p was begun by another thread", (void*)s);
    st->cap = nullptr;
    captures.erase(c);
    std::unique_ptr<Capture> done(c);
    *pg = nullptr;
    if (c->invalid) {
        report("cuStreamEndCapture: the capture was invalidated by %s; no graph", c->why ? c->why : "an earlier error");
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    Graph* gr = new Graph{std::move(c->ops)};
    graphs.insert(gr);
    *pg = (CUgraph)gr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus* status) {
    NEED_CTX();
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* st = to_stream(s);
    if (!st->cap) {
        bool legacy = false;
        for (Stream* n : null_streams) legacy |= n == st;
        if (legacy)
            for (Capture* c : captures)
                if (!c->stream->nonblocking && c->stream->device == st->device) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
        *status = CU_STREAM_CAPTURE_STATUS_NONE;
    } else {
        *status = st->cap->invalid ? CU_STREAM_CAPTURE_STATUS_INVALIDATED : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamGetCaptureInfo(CUstream s, CUstreamCaptureStatus* status, cuuint64_t* id, CUgraph* graph,
                                       const CUgraphNode** deps, const CUgraphEdgeData** edges, size_t* ndeps) {
    CUresult r = cuStreamIsCapturing(s, status);
    if (r != CUDA_SUCCESS) return r;
    std::lock_guard<std::recursive_mutex> g(mu);
    Stream* st = to_stream(s);
    if (id) *id = st->cap ? st->cap->id : 0;
    if (graph) *graph = nullptr;  // the graph under construction is not exposed
    if (deps) *deps = nullptr;
    if (edges) *edges = nullptr;
    if (ndeps) *ndeps = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec* pe, CUgraph graph, unsigned long long flags) {
    NEED_CTX();
    if (!pe) return CUDA_ERROR_INVALID_VALUE;
    (void)flags;  // auto-free, upload, device launch and priority change nothing here
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!graphs.count((Graph*)graph)) return bad(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiate: invalid graph %p", (void*)graph);
    Graph* e = new Graph{((Graph*)graph)->ops};
    execs.insert(e);
    *pe = (CUgraphExec)e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGraphUpload(CUgraphExec exec, CUstream s) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!execs.count((Graph*)exec)) return CUDA_ERROR_INVALID_HANDLE;
    return stream_valid(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

// Queues the graph's operations in order on `s` (recorded into a capture when `s` captures),
// after checking that every range they use lies in a live allocation, as a launch checks its
// pointers: a graph replayed after one of its buffers was freed is refused with the buffer named.
EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    NEED_CTX();
    std::vector<Op> ops;
    {
        std::lock_guard<std::recursive_mutex> g(mu);
        if (!execs.count((Graph*)exec)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuGraphLaunch: invalid graph exec %p", (void*)exec);
        ops = ((Graph*)exec)->ops;
    }
    if (!stream_valid(s)) return bad(CUDA_ERROR_INVALID_HANDLE, "cuGraphLaunch: invalid stream %p", (void*)s);
    if (CUresult r = capture_gate(s, "cuGraphLaunch", false)) return r;
    for (std::size_t i = 0; i < ops.size(); ++i)
        for (auto [p, n] : ops[i].uses) {
            const bool ok = n == 0 ? device_range_ok(p, 0) || device_range_ok(p - 1, 1) : device_range_ok(p, n);
            if (!ok)
                return bad(CUDA_ERROR_INVALID_VALUE,
                           "cuGraphLaunch: node %zu (%s) uses [0x%llx, +%zu), which is not inside one live device "
                           "allocation: %s",
                           i, ops[i].what, (unsigned long long)p, n, describe_address(p).c_str());
        }
    Stream* st = to_stream(s);
    for (Op& op : ops) enqueue_op(st, std::move(op));
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!execs.erase((Graph*)exec)) return CUDA_ERROR_INVALID_HANDLE;
    // Launches already queued hold copies of the operations.
    delete (Graph*)exec;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGraphDestroy(CUgraph graph) {
    NEED_CTX();
    std::lock_guard<std::recursive_mutex> g(mu);
    if (!graphs.erase((Graph*)graph)) return CUDA_ERROR_INVALID_HANDLE;
    delete (Graph*)graph;
    return CUDA_SUCCESS;
}

// ---- test extensions --------------------------------------------------------------------------------
EXPORT int vgpuIsVirtual() { return 1; }

EXPORT void vgpuMemStats(size_t* current_bytes, size_t* peak) {
    std::lock_guard<std::recursive_mutex> g(mu);
    if (current_bytes) *current_bytes = used_bytes;
    if (peak) *peak = peak_bytes;
}

EXPORT void vgpuResetPeak() {
    std::lock_guard<std::recursive_mutex> g(mu);
    peak_bytes = used_bytes;
}
