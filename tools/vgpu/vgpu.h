// vgpu.h: the virtual GPU's internal interface, shared by the kernel registry (generated),
// the fiber runtime (runtime.cpp), the stand-in driver (driver.cpp) and the stand-in cuBLAS
// (cublas.cpp). Test-only: never linked into tooln1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#define VGPU_API __attribute__((visibility("default")))

namespace vgpu {

constexpr int kMaxParams = 48;

// One `extern "C" __global__` entry point compiled for the host.
struct KernelInfo {
    const char* name;
    const char* file;
    void* fn;
    void (*invoke)(void* fn, void* const* args);
    int nparams;
    unsigned sizes[kMaxParams];
    bool is_ptr[kMaxParams];
    int max_threads;  // __launch_bounds__ (0: none)
    int regs;         // registers per thread from the ptxas report (0: unknown)
    int static_smem;  // static shared memory bytes from the ptxas report (-1: unknown)
};

VGPU_API void register_kernel(KernelInfo* k);
KernelInfo* find_kernel(const char* name);
void set_kernel_resources(const char* name, int regs, int smem);

template <class T>
inline T load_arg(void* p) {
    typedef typename std::remove_cv<T>::type U;
    U v;
    std::memcpy((void*)&v, p, sizeof(U));
    return v;
}

template <class... A, std::size_t... I>
void invoke_impl(void* fn, void* const* args, std::index_sequence<I...>) {
    auto f = reinterpret_cast<void (*)(A...)>(fn);
    f(load_arg<A>(args[I])...);
}

template <class... A>
void invoke_entry(void* fn, void* const* args) {
    invoke_impl<A...>(fn, args, std::index_sequence_for<A...>{});
}

struct Reg {
    template <class... A>
    Reg(const char* name, const char* file, void (*f)(A...), int max_threads) {
        static_assert(sizeof...(A) <= kMaxParams, "too many kernel parameters");
        KernelInfo* k = new KernelInfo();
        k->name = name;
        k->file = file;
        k->fn = reinterpret_cast<void*>(f);
        k->invoke = &invoke_entry<A...>;
        k->nparams = (int)sizeof...(A);
        unsigned sizes[] = {(unsigned)sizeof(A)..., 0u};
        bool ptrs[] = {std::is_pointer<A>::value..., false};
        for (int i = 0; i < k->nparams; ++i) {
            k->sizes[i] = sizes[i];
            k->is_ptr[i] = ptrs[i];
        }
        k->max_threads = max_threads;
        k->regs = 0;
        k->static_smem = -1;
        register_kernel(k);
    }
};

struct Dim3 {
    unsigned x, y, z;
};

// A kernel launch with its parameter values copied at launch time (as the driver does).
struct Launch {
    KernelInfo* k;
    Dim3 grid, block;
    unsigned smem;
    std::vector<unsigned char> blob;
    std::vector<unsigned> offsets;
};

// Runs every block of the launch (blocks in parallel on the worker threads, the threads of one
// block as fibers). Aborts the process with a report on a kernel fault.
void run_launch(const Launch& l);

// Installs the SIGSEGV/SIGBUS report (once per process) and this thread's signal stack.
VGPU_API void install_fault_handler();

// Adds one timed operation to the TOOLN1_VGPU_PROFILE=1 table.
VGPU_API void profile_add(const char* name, double ms, uint64_t blocks);

// ---- options (environment, read once) -----------------------------------------------------------
enum class Order { Forward, Reverse, Random };
struct Options {
    Order order;
    uint64_t seed;
    int workers;
    std::size_t mem_bytes;
    bool h200;
    bool trace;
    bool strict_async;
};
VGPU_API const Options& options();

// ---- device memory (driver.cpp) ---------------------------------------------------------------
// Whether [p, p + bytes) lies inside one live device allocation.
VGPU_API bool device_range_ok(uint64_t p, std::size_t bytes);
// A one-line description of what `p` is (live allocation, freed allocation, unknown).
VGPU_API std::string describe_address(uint64_t p);
// The device of the live device allocation that holds [p, p + bytes), or -1.
VGPU_API int device_of_range(uint64_t p, std::size_t bytes);
// The device of this thread's current context, or -1 without one.
VGPU_API int current_device();

// ---- streams (driver.cpp) ----------------------------------------------------------------------
// Queues work on a stream (0 = the default stream); it runs at the next synchronisation.
VGPU_API void enqueue(void* stream, std::function<void()> op, const char* what);
VGPU_API bool stream_valid(void* stream);
// The stream object a handle names, with 0 / CU_STREAM_LEGACY / CU_STREAM_PER_THREAD taken as
// the legacy default stream of `device`; its device.
VGPU_API void* stream_for(void* stream, int device);
VGPU_API int stream_device(void* stream_object);
// Runs a stream object's queued work, in order, until `stop()` (checked before each operation)
// or the queue is empty. Returns false at once, running nothing, while another thread runs it.
VGPU_API bool run_until(void* stream_object, const std::function<bool()>& stop);
// Runs all of a stream object's queued work (after any other thread that is running it).
VGPU_API void flush_stream(void* stream_object);

VGPU_API void report(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace vgpu
