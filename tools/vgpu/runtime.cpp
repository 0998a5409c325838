// runtime.cpp: the virtual GPU's execution engine: the kernel registry, the fiber scheduler
// that runs the threads of a block, warp exchanges, barriers, and the worker threads that run
// blocks in parallel. Test-only: never linked into tooln1.
//
// Each CUDA thread is a fiber with its own stack (64 KiB, a guard page below it); a small
// hand-written x86-64 context switch saves the callee-saved registers (kernels never change
// the floating-point control words, so MXCSR and the x87 control word are not switched). The scheduler of a block runs every runnable fiber once per round, in the
// configured order (TOOLN1_VGPU_ORDER = forward | reverse | random, TOOLN1_VGPU_SEED), then
// releases barriers whose participants have all arrived. When no fiber can run and nothing
// can be released the block is deadlocked: the report says which threads wait where.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>

#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include "simt.h"
#include "vgpu.h"

#if defined(__SANITIZE_ADDRESS__)
#define VGPU_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#else
#define VGPU_ASAN 0
#endif

extern "C" void vgpu_ctx_switch(void** save_sp, void* to_sp);
extern "C" void vgpu_fiber_start();

asm(R"(
    .text
    .globl vgpu_ctx_switch
    .hidden vgpu_ctx_switch
    .type vgpu_ctx_switch,@function
vgpu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vgpu_ctx_switch,.-vgpu_ctx_switch

    .globl vgpu_fiber_start
    .hidden vgpu_fiber_start
    .type vgpu_fiber_start,@function
vgpu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size vgpu_fiber_start,.-vgpu_fiber_start
)");

namespace vgpu {


void report(const char* fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "[virtual GPU] %s\n", buf);
    fflush(stderr);
}

// ---- options --------------------------------------------------------------------------------------
static std::size_t parse_bytes(const char* s, std::size_t dflt) {
    if (!s || !*s) return dflt;
    char* end = nullptr;
    double v = strtod(s, &end);
    if (end == s || v <= 0) {
        report("TOOLN1_VGPU_MEM_BYTES=%s is not a positive size (e.g. 4000000 or 80G); using the default", s);
        return dflt;
    }
    switch (*end) {
        case 'k': case 'K': v *= 1024.0; break;
        case 'm': case 'M': v *= 1024.0 * 1024.0; break;
        case 'g': case 'G': v *= 1024.0 * 1024.0 * 1024.0; break;
        default: break;
    }
    return (std::size_t)v;
}

const Options& options() {
    static Options o = [] {
        Options o{};
        const char* ord = getenv("TOOLN1_VGPU_ORDER");
        o.order = Order::Forward;
        if (ord && !strcmp(ord, "reverse")) o.order = Order::Reverse;
        else if (ord && !strcmp(ord, "random")) o.order = Order::Random;
        else if (ord && *ord && strcmp(ord, "forward"))
            report("TOOLN1_VGPU_ORDER=%s: expected forward, reverse or random; using forward", ord);
        const char* seed = getenv("TOOLN1_VGPU_SEED");
        o.seed = seed && *seed ? strtoull(seed, nullptr, 10) : 0x5eed;
        const char* w = getenv("TOOLN1_VGPU_THREADS");
        long nw = w && *w ? strtol(w, nullptr, 10) : (long)std::thread::hardware_concurrency();
        o.workers = (int)(nw < 1 ? 1 : (nw > 64 ? 64 : nw));
        const char* dev = getenv("TOOLN1_VGPU_DEVICE");
        o.h200 = dev && !strcmp(dev, "h200");
        if (dev && *dev && strcmp(dev, "h100") && strcmp(dev, "h200"))
            report("TOOLN1_VGPU_DEVICE=%s: expected h100 or h200; using h100", dev);
        std::size_t dflt = o.h200 ? (std::size_t)143771 << 20 : (std::size_t)81559 << 20;
        o.mem_bytes = parse_bytes(getenv("TOOLN1_VGPU_MEM_BYTES"), dflt);
        const char* tr = getenv("TOOLN1_VGPU_TRACE");
        o.trace = tr && !strcmp(tr, "1");
        const char* as = getenv("TOOLN1_VGPU_ASYNC");
        o.strict_async = as && !strcmp(as, "strict");
        if (o.order == Order::Random) report("thread order random, TOOLN1_VGPU_SEED=%llu", (unsigned long long)o.seed);
        return o;
    }();
    return o;
}

}  // namespace vgpu

// Test extension: the thread order of later launches (0 forward, 1 reverse, 2 random).
extern "C" __attribute__((visibility("default"))) void vgpuSetThreadOrder(int order) {
    vgpu::Options& o = const_cast<vgpu::Options&>(vgpu::options());
    o.order = order == 1 ? vgpu::Order::Reverse : (order == 2 ? vgpu::Order::Random : vgpu::Order::Forward);
}

namespace vgpu {

// ---- kernel registry ----------------------------------------------------------------------------
static std::map<std::string, KernelInfo*>& registry() {
    static std::map<std::string, KernelInfo*> r;
    return r;
}

void register_kernel(KernelInfo* k) {
    auto& r = registry();
    if (r.count(k->name)) {
        fprintf(stderr, "[virtual GPU] kernel %s defined twice (%s and %s)\n", k->name, r[k->name]->file, k->file);
        abort();
    }
    r[k->name] = k;
}

KernelInfo* find_kernel(const char* name) {
    auto& r = registry();
    auto it = r.find(name);
    return it == r.end() ? nullptr : it->second;
}

void set_kernel_resources(const char* name, int regs, int smem) {
    KernelInfo* k = find_kernel(name);
    if (!k) return;
    k->regs = regs;
    k->static_smem = smem;
}

// ---- fibers -------------------------------------------------------------------------------------
enum State : int { Runnable, AtBarrier, AtWarp, Done };

// Usable stack of a fiber: its slot less the guard page and the ThreadState at the bottom.
constexpr std::size_t kStateBytes = (sizeof(ThreadState) + 63) / 64 * 64;
constexpr std::size_t kStack = kSlot - kGuard - kStateBytes;

struct Fiber {
    ThreadState* ts;  // at the bottom of the fiber's stack slot
    void* sp;
    State state;
    const char* wkind;
    const char* wfile;
    int wline;
    unsigned wmask;
    int phase;
    unsigned char* stack_lo;
    void* fake;
};

struct WarpBuf {
    unsigned char buf[2][32][kExchangeBytes];
    unsigned arrived[2];
};

struct Worker {
    std::vector<Fiber> fibers;
    std::vector<WarpBuf> warps;
    unsigned char* stacks = nullptr;
    std::size_t nstacks = 0;
    void* sched_sp = nullptr;
    const void* sched_bottom = nullptr;
    std::size_t sched_size = 0;
    std::vector<unsigned char> dyn;
    BlockCtx blk{};
    const Launch* launch = nullptr;
    uint64_t rng = 0;
    std::vector<int> order;
    std::size_t live = 0;
    Fiber* running = nullptr;
};

static thread_local Worker* tw = nullptr;

static Worker& worker() {
    if (!tw) tw = new Worker();
    return *tw;
}

static uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void ensure_stacks(Worker& w, std::size_t n) {
    if (w.nstacks >= n) return;
    if ((std::size_t)sysconf(_SC_PAGESIZE) != kGuard) {
        report("the virtual GPU assumes 4 KiB pages");
        abort();
    }
    if (w.stacks) munmap(w.stacks, w.nstacks * kSlot);
    // Over-map by one slot so the slots can start on a kSlot boundary.
    const std::size_t len = (n + 1) * kSlot;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        report("cannot map %zu fiber stacks", n);
        abort();
    }
    uintptr_t base = ((uintptr_t)m + kSlot - 1) & ~(kSlot - 1);
    if (base > (uintptr_t)m) munmap(m, base - (uintptr_t)m);
    const uintptr_t end = (uintptr_t)m + len, used_end = base + n * kSlot;
    if (end > used_end) munmap((void*)used_end, end - used_end);
    w.stacks = (unsigned char*)base;
    w.nstacks = n;
    for (std::size_t i = 0; i < n; ++i) mprotect(w.stacks + i * kSlot, kGuard, PROT_NONE);  // guard page
}

static const char* cur_kernel_name() {
    Worker& w = worker();
    return w.launch ? w.launch->k->name : "?";
}

[[noreturn]] void kernel_error(const char* file, int line, const char* what) {
    Worker& w = worker();
    const ThreadState* t = w.running ? w.running->ts : nullptr;
    report("kernel `%s` (%s:%d), block (%u,%u,%u), thread (%u,%u,%u): %s", cur_kernel_name(), file, line,
           w.blk.idx.x, w.blk.idx.y, w.blk.idx.z, t ? t->tid.x : 0, t ? t->tid.y : 0, t ? t->tid.z : 0, what);
    abort();
}

static void yield_to_scheduler(Fiber* f) {
    Worker& w = worker();
#if VGPU_ASAN
    __sanitizer_start_switch_fiber(&f->fake, w.sched_bottom, w.sched_size);
#endif
    vgpu_ctx_switch(&f->sp, w.sched_sp);
#if VGPU_ASAN
    __sanitizer_finish_switch_fiber(f->fake, &w.sched_bottom, &w.sched_size);
#endif
}

static void fiber_main(Fiber* f) {
    Worker& w = worker();
#if VGPU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
    const Launch& l = *w.launch;
    std::vector<void*> args(l.k->nparams);
    for (int i = 0; i < l.k->nparams; ++i) args[i] = (void*)(l.blob.data() + l.offsets[i]);
    l.k->invoke(l.k->fn, args.data());
    if (f->ts->n_async > 0) kernel_error(l.k->file, 0, "the thread exited with cp.async copies it never waited for");
    args.clear();
    args.shrink_to_fit();
    f->state = Done;
    w.live--;
#if VGPU_ASAN
    __sanitizer_start_switch_fiber(nullptr, w.sched_bottom, w.sched_size);
#endif
    void* dead;
    vgpu_ctx_switch(&dead, w.sched_sp);
    __builtin_unreachable();
}

static Fiber* self_fiber() {
    Worker& w = worker();
    return w.running;
}

void syncthreads(const char* file, int line) {
    Fiber* f = self_fiber();
    if (!f) {
        report("__syncthreads outside a kernel (%s:%d)", file, line);
        abort();
    }
    f->state = AtBarrier;
    f->wkind = "__syncthreads";
    f->wfile = file;
    f->wline = line;
    yield_to_scheduler(f);
}

static void release_warp_if_complete(Worker& w, Fiber* f, int phase) {
    WarpBuf& wb = w.warps[f->ts->warp];
    const unsigned mask = f->wmask;
    if ((wb.arrived[phase] & mask) != mask) return;
    const unsigned base = f->ts->warp * 32;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& o = w.fibers[base + l];
        if ((o.wkind != f->wkind && strcmp(o.wkind, f->wkind) != 0) || o.wmask != mask) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "lanes of warp %u disagree at a warp operation: lane %u at %s (mask %08x, %s:%d), lane %u at %s "
                     "(mask %08x, %s:%d)",
                     f->ts->warp, f->ts->lane, f->wkind, mask, f->wfile, f->wline, l, o.wkind, o.wmask, o.wfile, o.wline);
            kernel_error(f->wfile, f->wline, msg);
        }
        o.state = Runnable;
    }
    wb.arrived[phase] &= ~mask;
}

const unsigned char* warp_exchange_view(unsigned mask, const void* mine, unsigned bytes, const char* kind,
                                        const char* file, int line) {
    Fiber* f = self_fiber();
    if (!f) {
        report("%s outside a kernel (%s:%d)", kind, file, line);
        abort();
    }
    Worker& w = worker();
    const unsigned lane = f->ts->lane;
    if (bytes > kExchangeBytes) kernel_error(file, line, "warp exchange of more than kExchangeBytes per lane");
    if (!(mask >> lane & 1u)) kernel_error(file, line, "the calling lane is not in the mask of a warp intrinsic");
    const std::size_t n = w.fibers.size();
    const unsigned base = f->ts->warp * 32;
    if (base + 32 > n)
        for (unsigned l = 0; l < 32; ++l)
            if ((mask >> l & 1u) && base + l >= n) {
                char msg[256];
                snprintf(msg, sizeof msg, "%s mask %08x names lane %u, which does not exist (block of %zu threads)",
                         kind, mask, l, n);
                kernel_error(file, line, msg);
            }
    const int phase = f->phase;
    f->phase ^= 1;
    WarpBuf& wb = w.warps[f->ts->warp];
    std::memcpy(wb.buf[phase][lane], mine, bytes);
    f->state = AtWarp;
    f->wkind = kind;
    f->wfile = file;
    f->wline = line;
    f->wmask = mask;
    wb.arrived[phase] |= 1u << lane;
    release_warp_if_complete(w, f, phase);
    yield_to_scheduler(f);
    return &wb.buf[phase][0][0];
}

void warp_exchange(unsigned mask, const void* mine, unsigned bytes, void* all, const char* kind, const char* file,
                   int line) {
    const unsigned char* v = warp_exchange_view(mask, mine, bytes, kind, file, line);
    unsigned char* out = (unsigned char*)all;
    for (unsigned l = 0; l < 32; ++l) std::memcpy(out + l * bytes, v + l * kExchangeBytes, bytes);
}

void syncwarp(const char* file, int line, unsigned mask) {
    unsigned char dummy = 0, all[32];
    warp_exchange(mask, &dummy, 1, all, "__syncwarp", file, line);
}

static std::string thread_ranges(const std::vector<int>& ids) {
    std::string s;
    std::size_t i = 0;
    int shown = 0;
    while (i < ids.size()) {
        std::size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (shown++ == 8) {
            s += ", ...";
            break;
        }
        if (!s.empty()) s += ", ";
        s += std::to_string(ids[i]);
        if (j > i) s += "-" + std::to_string(ids[j]);
        i = j + 1;
    }
    return s;
}

[[noreturn]] static void deadlock(Worker& w, const char* why) {
    std::map<std::string, std::vector<int>> groups;
    for (std::size_t i = 0; i < w.fibers.size(); ++i) {
        const Fiber& f = w.fibers[i];
        std::string key;
        if (f.state == Done) key = "exited";
        else {
            char b[256];
            snprintf(b, sizeof b, "waiting at %s (%s:%d)", f.wkind, f.wfile, f.wline);
            key = b;
        }
        groups[key].push_back((int)i);
    }
    std::string msg;
    for (auto& g : groups) msg += "\n    threads " + thread_ranges(g.second) + ": " + g.first;
    report("kernel `%s`, block (%u,%u,%u): %s%s", cur_kernel_name(), w.blk.idx.x, w.blk.idx.y, w.blk.idx.z, why,
           msg.c_str());
    abort();
}

// After a round in which no fiber can run: release the block barrier when every live thread
// waits at it, or report the deadlock.
static bool resolve(Worker& w) {
    std::size_t at_barrier = 0;
    const Fiber* first = nullptr;
    for (auto& f : w.fibers) {
        if (f.state == AtBarrier) {
            ++at_barrier;
            if (!first) first = &f;
        }
    }
    if (at_barrier > 0 && at_barrier == w.live) {
        for (auto& f : w.fibers)
            if (f.state == AtBarrier && (f.wline != first->wline || strcmp(f.wfile, first->wfile) != 0))
                deadlock(w, "threads wait at different __syncthreads calls");
        for (auto& f : w.fibers)
            if (f.state == AtBarrier) f.state = Runnable;
        return true;
    }
    // A warp operation can never complete when a lane it names has exited.
    for (auto& f : w.fibers) {
        if (f.state != AtWarp) continue;
        const unsigned base = f.ts->warp * 32;
        for (unsigned l = 0; l < 32; ++l)
            if ((f.wmask >> l & 1u) && w.fibers[base + l].state == Done) {
                char b[256];
                snprintf(b, sizeof b, "%s at %s:%d names lane %u of warp %u, which has exited", f.wkind, f.wfile,
                         f.wline, l, f.ts->warp);
                deadlock(w, b);
            }
    }
    deadlock(w, "deadlock: no thread can proceed");
}

static void run_block(Worker& w, const Launch& l, Dim3 bidx) {
    const unsigned nx = l.block.x, ny = l.block.y, nz = l.block.z;
    const std::size_t n = (std::size_t)nx * ny * nz;
    ensure_stacks(w, n);
    w.fibers.resize(n);
    w.warps.resize((n + 31) / 32);
    for (auto& wb : w.warps) wb.arrived[0] = wb.arrived[1] = 0;
    for (std::size_t i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        unsigned char* slot = w.stacks + i * kSlot;
        f.ts = new (slot + kGuard) ThreadState;  // default-initialised: the copy list is not cleared
        f.ts->blk = &w.blk;
        f.ts->tid = {(unsigned)(i % nx), (unsigned)((i / nx) % ny), (unsigned)(i / ((std::size_t)nx * ny))};
        f.ts->linear = (unsigned)i;
        f.ts->lane = (unsigned)(i & 31);
        f.ts->warp = (unsigned)(i >> 5);
        f.ts->n_async = 0;
        f.ts->open_group = 0;
        f.state = Runnable;
        f.wkind = "";
        f.wfile = "";
        f.wline = 0;
        f.wmask = 0;
        f.phase = 0;
        f.fake = nullptr;
        f.stack_lo = slot + kGuard + kStateBytes;
        // Initial frame popped by vgpu_ctx_switch: [pad] r15 r14 r13 r12 rbx rbp ret.
        uint64_t* top = (uint64_t*)(((uintptr_t)(f.stack_lo + kStack)) & ~(uintptr_t)15);
        uint64_t* sp = top - 16;
        sp[0] = 0;
        sp[1] = 0;                                 // r15
        sp[2] = 0;                                 // r14
        sp[3] = (uint64_t)(uintptr_t)&fiber_main;  // r13
        sp[4] = (uint64_t)(uintptr_t)&f;           // r12
        sp[5] = 0;                                 // rbx
        sp[6] = 0;                                 // rbp
        sp[7] = (uint64_t)(uintptr_t)&vgpu_fiber_start;
        f.sp = sp;
    }
    w.live = n;
    w.blk.idx = {bidx.x, bidx.y, bidx.z};
    if (l.smem) {
        w.dyn.assign(l.smem, 0xFF);  // NaN pattern: dynamic shared memory starts undefined
        w.blk.dyn_smem = w.dyn.data();
    } else {
        w.blk.dyn_smem = nullptr;
    }
    w.order.resize(n);
    const Order ord = options().order;
    for (std::size_t i = 0; i < n; ++i) w.order[i] = (int)(ord == Order::Reverse ? n - 1 - i : i);
    while (w.live > 0) {
        if (ord == Order::Random)
            for (std::size_t i = n; i > 1; --i) std::swap(w.order[i - 1], w.order[splitmix(w.rng) % i]);
        bool ran = false;
        for (std::size_t oi = 0; oi < n; ++oi) {
            Fiber& f = w.fibers[w.order[oi]];
            if (f.state != Runnable) continue;
            ran = true;
            w.running = &f;
#if VGPU_ASAN
            void* fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, f.stack_lo, kStack);
#endif
            vgpu_ctx_switch(&w.sched_sp, f.sp);
#if VGPU_ASAN
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
            w.running = nullptr;
        }
        if (w.live == 0) break;
        bool any_runnable = false;
        for (auto& f : w.fibers)
            if (f.state == Runnable) {
                any_runnable = true;
                break;
            }
        if (!any_runnable) resolve(w);
        (void)ran;
    }
}

// ---- worker threads -----------------------------------------------------------------------------
struct Pool {
    std::mutex m;
    std::condition_variable cv, done_cv;
    const Launch* job = nullptr;
    uint64_t gen = 0;
    std::atomic<uint64_t> next{0};
    uint64_t total = 0;
    int busy = 0;
    std::vector<std::thread> threads;
};

static Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: worker threads outlive static destructors
    return *p;
}

static void run_blocks(const Launch& l, uint64_t total) {
    Worker& w = worker();
    w.launch = &l;
    w.blk.dim = {l.block.x, l.block.y, l.block.z};
    w.blk.grid = {l.grid.x, l.grid.y, l.grid.z};
    const bool rev = options().order == Order::Reverse;
    Pool& p = pool();
    for (;;) {
        uint64_t b = p.next.fetch_add(1);
        if (b >= total) break;
        uint64_t lin = rev ? total - 1 - b : b;
        w.rng = options().seed ^ (lin * 0x9E3779B97F4A7C15ull);
        Dim3 bi{(unsigned)(lin % l.grid.x), (unsigned)((lin / l.grid.x) % l.grid.y),
                (unsigned)(lin / ((uint64_t)l.grid.x * l.grid.y))};
        run_block(w, l, bi);
    }
    w.launch = nullptr;
}

static void setup_altstack();

static void worker_loop() {
    setup_altstack();
    Pool& p = pool();
    uint64_t seen = 0;
    for (;;) {
        const Launch* job;
        uint64_t total;
        {
            std::unique_lock<std::mutex> g(p.m);
            p.cv.wait(g, [&] { return p.gen != seen; });
            seen = p.gen;
            job = p.job;
            total = p.total;
            if (!job) continue;
            p.busy++;
        }
        run_blocks(*job, total);
        {
            std::lock_guard<std::mutex> g(p.m);
            p.busy--;
        }
        p.done_cv.notify_all();
    }
}

// The fault report (installed at cuInit and again, per thread, at each launch).
void install_fault_handler();

// TOOLN1_VGPU_PROFILE=1: wall time and launch count per kernel, printed at exit.
struct ProfileRow {
    double ms = 0;
    uint64_t launches = 0, blocks = 0;
};
static std::mutex prof_mu;
static std::map<std::string, ProfileRow>* prof = nullptr;

static void print_profile() {
    std::lock_guard<std::mutex> g(prof_mu);
    if (!prof) return;
    std::vector<std::pair<std::string, ProfileRow>> rows(prof->begin(), prof->end());
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.ms > b.second.ms; });
    fprintf(stderr, "[virtual GPU] profile: kernel, launches, blocks, total ms\n");
    for (auto& r : rows)
        fprintf(stderr, "[virtual GPU]   %-28s %8llu %10llu %10.1f\n", r.first.c_str(),
                (unsigned long long)r.second.launches, (unsigned long long)r.second.blocks, r.second.ms);
}

void profile_add(const char* name, double ms, uint64_t blocks) {
    static const bool on = [] {
        const char* p = getenv("TOOLN1_VGPU_PROFILE");
        if (p && !strcmp(p, "1")) atexit(print_profile);
        return p && !strcmp(p, "1");
    }();
    if (!on) return;
    std::lock_guard<std::mutex> g(prof_mu);
    if (!prof) prof = new std::map<std::string, ProfileRow>();
    ProfileRow& r = (*prof)[name];
    r.ms += ms;
    r.launches++;
    r.blocks += blocks;
}

void run_launch(const Launch& l) {
    install_fault_handler();
    const auto t_start = std::chrono::steady_clock::now();
    struct Done {
        const Launch& l;
        std::chrono::steady_clock::time_point t;
        ~Done() {
            profile_add(l.k->name,
                        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count(),
                        (uint64_t)l.grid.x * l.grid.y * l.grid.z);
        }
    } done{l, t_start};
    const uint64_t total = (uint64_t)l.grid.x * l.grid.y * l.grid.z;
    Pool& p = pool();
    static std::mutex launch_mutex;  // one kernel at a time (streams are executed in order)
    std::lock_guard<std::mutex> one(launch_mutex);
    const int want = options().workers - 1;
    if (total > 1 && want > 0) {
        {
            std::lock_guard<std::mutex> g(p.m);
            p.next = 0;
            while ((int)p.threads.size() < want) {
                p.threads.emplace_back(worker_loop);
                p.threads.back().detach();
            }
            p.job = &l;
            p.total = total;
            p.gen++;
        }
        p.cv.notify_all();
        run_blocks(l, total);
        std::unique_lock<std::mutex> g(p.m);
        p.done_cv.wait(g, [&] { return p.busy == 0 && p.next >= total; });
        // Workers that have not yet woken for this generation would find no block left; wait
        // for them too so the next launch does not race with a late starter.
        p.job = nullptr;
    } else {
        p.next = 0;
        run_blocks(l, total);
    }
}

// ---- faults -------------------------------------------------------------------------------------
// Runs on the faulting thread's alternate signal stack: formats into a static buffer and writes
// it with write(2), so that a fault while the C library is busy is still reported.
static void on_fault(int sig, siginfo_t* si, void*) {
    static char buf[1024];
    const uint64_t a = (uint64_t)(uintptr_t)si->si_addr;
    Worker* w = tw;
    std::string what = "?";
    bool in_stacks = false;
    if (w && w->stacks)
        in_stacks = a >= (uint64_t)(uintptr_t)w->stacks && a < (uint64_t)(uintptr_t)(w->stacks + w->nstacks * kSlot);
    if (in_stacks) what = "a thread's stack overflowed its slot";
    else what = describe_address(a);
    int n;
    if (w && w->launch && w->running) {
        const ThreadState* t = w->running->ts;
        n = snprintf(buf, sizeof buf,
                     "[virtual GPU] kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u): illegal %s at address 0x%llx: %s\n",
                     w->launch->k->name, w->blk.idx.x, w->blk.idx.y, w->blk.idx.z, t->tid.x, t->tid.y, t->tid.z,
                     sig == SIGBUS ? "access (bus error)" : "memory access", (unsigned long long)a, what.c_str());
    } else {
        n = snprintf(buf, sizeof buf, "[virtual GPU] illegal memory access at address 0x%llx outside a kernel: %s\n",
                     (unsigned long long)a, what.c_str());
    }
    if (n > 0) {
        ssize_t ignored = write(2, buf, (size_t)(n < (int)sizeof buf ? n : (int)sizeof buf - 1));
        (void)ignored;
    }
    void* frames[48];
    const int nf = backtrace(frames, 48);
    backtrace_symbols_fd(frames, nf, 2);
    signal(SIGABRT, SIG_DFL);
    abort();
}

static void setup_altstack() {
    static thread_local bool alt = false;
    if (alt) return;
    alt = true;
    stack_t ss{};
    ss.ss_size = 256 * 1024;
    ss.ss_sp = malloc(ss.ss_size);
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
}

void install_fault_handler() {
    setup_altstack();
    static std::once_flag once;
    std::call_once(once, [] {
        if (getenv("TOOLN1_VGPU_NO_SIGNALS")) return;
        struct sigaction sa{};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    });
}

}  // namespace vgpu
