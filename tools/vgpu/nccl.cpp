// nccl.cpp: the stand-in NCCL (libnccl.so.2) of the virtual GPU. Test-only: found only through
// the LD_LIBRARY_PATH that tools/vgpu/run.sh and test.sh set, like the stand-in driver.
//
// It implements the part of the NCCL 2.x C API that cudarc's `nccl` module calls (prototypes
// written from NCCL's `nccl.h` documentation: ncclUniqueId is 128 bytes, enum values as in
// nccl.h) for the communicators of one process, whose ranks are virtual devices of the stand-in
// driver (one host thread per device, or one thread driving all of them with group calls):
// - communicators: ncclGetUniqueId, ncclCommInitRank (waits for every rank, as NCCL does),
//   ncclCommInitRankConfig, ncclCommInitAll, ncclCommFinalize / Destroy / Abort, Count,
//   CuDevice, UserRank, GetAsyncError, ncclGetLastError, ncclGetErrorString, ncclGetVersion;
// - collectives: AllReduce, Broadcast (and the legacy in-place Bcast), Reduce, AllGather,
//   ReduceScatter; point to point: Send, Recv; ncclGroupStart / ncclGroupEnd;
//   ncclRedOpCreatePreMulSum / ncclRedOpDestroy;
// - data types int8, uint8, int32, uint32, int64, uint64, float16, float32, float64, bfloat16;
//   ops sum, prod, max, min, avg and pre-multiplied sums.
//
// Semantics, as on GPUs: a call is only queued on its stream (the stand-in driver's deferred
// streams); an operation runs when every rank that takes part has reached it in its stream, and
// the stream does not go past it before it has run. Whoever runs a stream that reaches an
// operation also runs the streams of the other ranks up to it when nobody else does, so one
// thread may drive every device. Reductions run in rank order 0, 1, ..., n-1, in f32 for
// float16/bfloat16 (rounded to nearest even once, at the end), in the type itself otherwise
// (integers wrap); avg is the sum divided by the rank count (integers: truncated). Real NCCL's
// ring and tree orders differ: compare float results with bounds.
//
// Checked at the call (an error naming the call, the rank and the buffer): communicator, type,
// op, root / peer, stream on the communicator's device, every buffer inside one live device
// allocation of the rank's device. Ranks whose calls at the same position on a communicator
// differ (operation, count, type, op, root; for send/recv: count, type) get an error naming both
// ranks and what differs; the ranks that called first have their queued operation cancelled and
// see ncclInvalidUsage from ncclCommGetAsyncError. An operation that waits without any progress
// on its communicator for TOOLN1_VGPU_NCCL_TIMEOUT_S seconds (default 60) is reported with the
// ranks that wait and the ones that are missing, and the process aborts.
#include <cuda.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "vgpu.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

// ---- the public types (values as in nccl.h) -------------------------------------------------------
typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
} ncclResult_t;

typedef enum {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclNumTypes = 10,  // the float8 types (10, 11) are not modelled
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4, ncclNumOps = 5 } ncclRedOp_t;

typedef enum { ncclScalarDevice = 0, ncclScalarHostImmediate = 1 } ncclScalarResidence_t;

typedef struct {
    char internal[128];
} ncclUniqueId;

// The leading fields of ncclConfig_t, the same in every 2.x version that has it.
typedef struct {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking;
} ncclConfigHead;

struct ncclComm;
typedef struct ncclComm* ncclComm_t;
typedef struct CUstream_st* cudaStream_t;

namespace {

constexpr int kVersion = 23000;  // NCCL_VERSION(2, 30, 0): the ABI of the bindings it serves
constexpr unsigned kConfigMagic = 0xcafebeef;
const char kIdMagic[] = "tooln1-vgpu-nccl";

enum Kind { AllReduce, Broadcast, Reduce, AllGather, ReduceScatter, Send, Recv };
const char* kind_name(Kind k) {
    static const char* n[] = {"ncclAllReduce", "ncclBroadcast", "ncclReduce", "ncclAllGather",
                              "ncclReduceScatter", "ncclSend", "ncclRecv"};
    return n[k];
}
bool has_op(Kind k) { return k == AllReduce || k == Reduce || k == ReduceScatter; }
bool has_root(Kind k) { return k == Broadcast || k == Reduce; }

const char* type_name(int t) {
    static const char* n[] = {"int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32",
                              "float64", "bfloat16"};
    return t >= 0 && t < ncclNumTypes ? n[t] : "unknown type";
}
std::size_t type_size(int t) {
    static const std::size_t s[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
    return s[t];
}

// A user-defined op (ncclRedOpCreatePreMulSum) of one communicator.
struct UserOp {
    bool live = false;
    int dtype = 0;
    bool on_device = false;
    unsigned char host[8] = {};
    uint64_t dev = 0;
};

struct Clique;
struct Part;

// One rank's call.
struct Call {
    Kind kind = AllReduce;
    std::size_t count = 0;
    int dtype = 0;
    int op = 0;    // a built-in op, or ncclNumOps for a pre-multiplied sum (scalar below)
    int root = 0;  // root, or the peer of a send/recv
    uint64_t send = 0, recv = 0;
    void* stream = nullptr;  // the driver's stream object
    UserOp premul;
};

}  // namespace

struct ncclComm {
    Clique* cl = nullptr;
    int rank = 0;
    int device = 0;
    bool dead = false;
    ncclResult_t async_err = ncclSuccess;
    std::string last_err;
    uint64_t next_coll = 0;
    std::map<int, uint64_t> next_send, next_recv;
    std::string last_call = "none";
    std::vector<UserOp> ops;
    std::set<void*> streams;  // where its operations were queued (Finalize waits for them)
};

namespace {

// An operation of a communicator: a collective (one call per rank) or a send/recv pair (calls
// [0] = send on rank src, [1] = recv on rank dst).
struct Part {
    Clique* cl = nullptr;
    bool p2p = false;
    uint64_t seq = 0;
    int src = 0, dst = 0;
    std::vector<Call> calls;
    std::vector<char> posted, arrived;
    bool done = false, failed = false, running = false;
    int rank_of(std::size_t i) const { return p2p ? (i == 0 ? src : dst) : (int)i; }
};

struct Clique {
    std::string name;
    int nranks = 0;
    int joined = 0;
    std::vector<ncclComm*> comms;
    std::map<uint64_t, std::shared_ptr<Part>> colls;
    std::map<std::tuple<int, int, uint64_t>, std::shared_ptr<Part>> p2p;
    double last_progress = 0;
};

std::mutex M;
std::condition_variable CV;
std::set<ncclComm*> live_comms;
std::map<std::string, Clique*> pending_ids;  // ncclCommInitRank: cliques still being joined
uint64_t id_counter = 0, clique_counter = 0;
thread_local std::string thread_last_err;
thread_local int group_depth = 0;
struct Pending {
    ncclComm* comm;
    Call call;
};
thread_local std::vector<Pending> group_calls;

double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

double timeout_s() {
    static const double t = [] {
        const char* s = getenv("TOOLN1_VGPU_NCCL_TIMEOUT_S");
        const double v = s && *s ? strtod(s, nullptr) : 60.0;
        return v > 0 ? v : 60.0;
    }();
    return t;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// Reports an error of a call, remembers it for ncclGetLastError, returns `r`.
ncclResult_t fail(ncclComm* c, ncclResult_t r, const std::string& msg) {
    vgpu::report("%s", msg.c_str());
    thread_last_err = msg;
    if (c) c->last_err = msg;
    return r;
}

std::string who(const char* api, const ncclComm* c) {
    return fmt("%s (rank %d of %d, device %d, communicator %s)", api, c->rank, c->cl->nranks, c->device,
               c->cl->name.c_str());
}

std::string describe(const Call& k) {
    std::string s = fmt("%s(count %zu, %s", kind_name(k.kind), k.count, type_name(k.dtype));
    if (has_op(k.kind)) {
        static const char* ops[] = {"sum", "prod", "max", "min", "avg", "pre-multiplied sum"};
        s += ", ";
        s += ops[k.op];
    }
    if (has_root(k.kind)) s += fmt(", root %d", k.root);
    if (k.kind == Send || k.kind == Recv) s += fmt(", peer %d", k.root);
    return s + ")";
}

std::string part_name(const Part& p) {
    if (p.p2p) return fmt("send/recv #%llu from rank %d to rank %d", (unsigned long long)p.seq, p.src, p.dst);
    return fmt("collective #%llu", (unsigned long long)p.seq);
}

// What differs between two calls at the same position ("" when they match).
std::string differ(const Call& a, int ra, const Call& b, int rb) {
    std::string d;
    auto add = [&](const std::string& s) { d += (d.empty() ? "" : "; ") + s; };
    if (a.kind != b.kind && !(a.kind == Send && b.kind == Recv) && !(a.kind == Recv && b.kind == Send)) {
        add(fmt("operation %s (rank %d) vs %s (rank %d)", kind_name(a.kind), ra, kind_name(b.kind), rb));
        return d;
    }
    if (a.count != b.count) add(fmt("count %zu (rank %d) vs count %zu (rank %d)", a.count, ra, b.count, rb));
    if (a.dtype != b.dtype) add(fmt("type %s (rank %d) vs type %s (rank %d)", type_name(a.dtype), ra, type_name(b.dtype), rb));
    if (has_op(a.kind) && a.op != b.op) {
        static const char* ops[] = {"sum", "prod", "max", "min", "avg", "pre-multiplied sum"};
        add(fmt("op %s (rank %d) vs op %s (rank %d)", ops[a.op], ra, ops[b.op], rb));
    }
    if (has_root(a.kind) && a.root != b.root) add(fmt("root %d (rank %d) vs root %d (rank %d)", a.root, ra, b.root, rb));
    return d;
}

ncclComm* comm_ok(ncclComm_t c) {
    return c && live_comms.count(c) && !c->dead ? c : nullptr;
}

// ---- numerics --------------------------------------------------------------------------------------
float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        if (m == 0) f = s;
        else {
            int sh = 0;
            while (!(m & 0x400)) {
                m <<= 1;
                ++sh;
            }
            f = s | ((uint32_t)(113 - sh) << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) f = s | 0x7f800000u | (m << 13);
    else f = s | ((e + 112) << 23) | (m << 13);
    float x;
    memcpy(&x, &f, 4);
    return x;
}

uint16_t f2h(float x) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint16_t s = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return s | 0x7e00;
    if (a >= 0x477ff000u) return s | 0x7c00;  // 65520 and above round to infinity
    if (a < 0x38800000u) {                    // below 2^-14: subnormal (exact scaling, then RNE)
        float v;
        memcpy(&v, &a, 4);
        return s | (uint16_t)std::nearbyint(v * 16777216.0f);
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return s | (uint16_t)(r >> 13);
}

float bf2f(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t f2bf(float x) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct F16 {};
struct BF16 {};

// S: storage type (or the F16 / BF16 tags), A: the type the reduction runs in.
template <class S>
struct Num {
    using A = S;
    static A load(const unsigned char* p) {
        S v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    static void store(unsigned char* p, A v) { memcpy(p, &v, sizeof v); }
};
template <>
struct Num<F16> {
    using A = float;
    static A load(const unsigned char* p) {
        uint16_t v;
        memcpy(&v, p, 2);
        return h2f(v);
    }
    static void store(unsigned char* p, A v) {
        const uint16_t h = f2h(v);
        memcpy(p, &h, 2);
    }
};
template <>
struct Num<BF16> {
    using A = float;
    static A load(const unsigned char* p) {
        uint16_t v;
        memcpy(&v, p, 2);
        return bf2f(v);
    }
    static void store(unsigned char* p, A v) {
        const uint16_t h = f2bf(v);
        memcpy(p, &h, 2);
    }
};

template <class A>
A add(A a, A b) {
    if constexpr (std::is_integral_v<A>) {
        using U = std::make_unsigned_t<A>;
        return (A)(U)((U)a + (U)b);
    } else {
        return a + b;
    }
}
template <class A>
A mul(A a, A b) {
    if constexpr (std::is_integral_v<A>) {
        using U = std::make_unsigned_t<A>;
        return (A)(U)((U)a * (U)b);
    } else {
        return a * b;
    }
}

// out[i] = in[0][i] (op) in[1][i] (op) ... in rank order; `scal[r]` for a pre-multiplied sum.
template <class S>
void reduce_t(const std::vector<const unsigned char*>& in, unsigned char* out, std::size_t n, int op,
              const std::vector<const unsigned char*>& scal) {
    using N = Num<S>;
    using A = typename N::A;
    constexpr std::size_t W = std::is_same_v<S, F16> || std::is_same_v<S, BF16> ? 2 : sizeof(S);
    const std::size_t R = in.size();
    std::vector<A> sc(R);
    if (op == ncclNumOps)
        for (std::size_t r = 0; r < R; ++r) sc[r] = N::load(scal[r]);
    for (std::size_t i = 0; i < n; ++i) {
        A acc = N::load(in[0] + i * W);
        if (op == ncclNumOps) acc = mul(acc, sc[0]);
        for (std::size_t r = 1; r < R; ++r) {
            const A x = N::load(in[r] + i * W);
            switch (op) {
                case ncclSum:
                case ncclAvg: acc = add(acc, x); break;
                case ncclProd: acc = mul(acc, x); break;
                case ncclMax:
                    if constexpr (std::is_integral_v<A>) acc = x > acc ? x : acc;
                    else acc = std::fmax(acc, x);
                    break;
                case ncclMin:
                    if constexpr (std::is_integral_v<A>) acc = x < acc ? x : acc;
                    else acc = std::fmin(acc, x);
                    break;
                default: acc = add(acc, mul(x, sc[r])); break;
            }
        }
        if (op == ncclAvg) acc = (A)(acc / (A)R);
        N::store(out + i * W, acc);
    }
}

void reduce(int dtype, const std::vector<const unsigned char*>& in, unsigned char* out, std::size_t n, int op,
            const std::vector<const unsigned char*>& scal) {
    switch (dtype) {
        case ncclInt8: reduce_t<int8_t>(in, out, n, op, scal); break;
        case ncclUint8: reduce_t<uint8_t>(in, out, n, op, scal); break;
        case ncclInt32: reduce_t<int32_t>(in, out, n, op, scal); break;
        case ncclUint32: reduce_t<uint32_t>(in, out, n, op, scal); break;
        case ncclInt64: reduce_t<int64_t>(in, out, n, op, scal); break;
        case ncclUint64: reduce_t<uint64_t>(in, out, n, op, scal); break;
        case ncclFloat16: reduce_t<F16>(in, out, n, op, scal); break;
        case ncclFloat32: reduce_t<float>(in, out, n, op, scal); break;
        case ncclFloat64: reduce_t<double>(in, out, n, op, scal); break;
        case ncclBfloat16: reduce_t<BF16>(in, out, n, op, scal); break;
        default: break;
    }
}

unsigned char* ptr(uint64_t p) { return (unsigned char*)(uintptr_t)p; }

// Moves the data of an operation whose participants have all arrived. Every result is computed
// into host memory first, so in-place calls read their inputs before anything is written.
void execute(Part& p) {
    const Call& c0 = p.calls[0];
    const std::size_t es = type_size(c0.dtype), n = c0.count, bytes = n * es;
    if (p.p2p) {
        if (bytes) memmove(ptr(p.calls[1].recv), ptr(p.calls[0].send), bytes);
        return;
    }
    const std::size_t R = p.calls.size();
    std::vector<const unsigned char*> scal(R, nullptr);
    std::vector<unsigned char> hold(R * 8);
    for (std::size_t r = 0; r < R; ++r) {
        const UserOp& u = p.calls[r].premul;
        if (p.calls[r].op == ncclNumOps) {
            memcpy(&hold[r * 8], u.on_device ? ptr(u.dev) : u.host, es);
            scal[r] = &hold[r * 8];
        }
    }
    std::vector<const unsigned char*> in(R);
    switch (c0.kind) {
        case AllReduce:
        case Reduce: {
            for (std::size_t r = 0; r < R; ++r) in[r] = ptr(p.calls[r].send);
            std::vector<unsigned char> out(bytes);
            reduce(c0.dtype, in, out.data(), n, c0.op, scal);
            for (std::size_t r = 0; r < R; ++r)
                if (c0.kind == AllReduce || (int)r == c0.root) memcpy(ptr(p.calls[r].recv), out.data(), bytes);
            break;
        }
        case ReduceScatter: {
            std::vector<std::vector<unsigned char>> out(R, std::vector<unsigned char>(bytes));
            for (std::size_t q = 0; q < R; ++q) {
                for (std::size_t r = 0; r < R; ++r) in[r] = ptr(p.calls[r].send) + q * bytes;
                reduce(c0.dtype, in, out[q].data(), n, c0.op, scal);
            }
            for (std::size_t q = 0; q < R; ++q) memcpy(ptr(p.calls[q].recv), out[q].data(), bytes);
            break;
        }
        case AllGather: {
            std::vector<unsigned char> out(R * bytes);
            for (std::size_t r = 0; r < R; ++r) memcpy(out.data() + r * bytes, ptr(p.calls[r].send), bytes);
            for (std::size_t r = 0; r < R; ++r) memcpy(ptr(p.calls[r].recv), out.data(), R * bytes);
            break;
        }
        case Broadcast: {
            std::vector<unsigned char> out(ptr(p.calls[c0.root].send), ptr(p.calls[c0.root].send) + bytes);
            for (std::size_t r = 0; r < R; ++r) memcpy(ptr(p.calls[r].recv), out.data(), bytes);
            break;
        }
        default: break;
    }
}

// ---- posting (at the call) and running (in the streams) ------------------------------------------
struct Slot {
    std::shared_ptr<Part> part;
    std::size_t idx;
};

// A group's operations of one communicator, queued on its stream as two operations: "arrive"
// (marks the rank as there, runs the parts that are complete) and "wait" (the stream does not
// go past it before every part has run).
struct Unit {
    ncclComm* comm;
    std::vector<Slot> slots;
};

void erase_if_settled(const std::shared_ptr<Part>& p) {
    for (char x : p->posted)
        if (!x) return;
    if (!p->done) return;
    Clique* cl = p->cl;
    if (p->p2p) {
        auto it = cl->p2p.find({p->src, p->dst, p->seq});
        if (it != cl->p2p.end() && it->second == p) cl->p2p.erase(it);
    } else {
        auto it = cl->colls.find(p->seq);
        if (it != cl->colls.end() && it->second == p) cl->colls.erase(it);
    }
}

// Cancels a part: it will not run; every rank of the communicator sees `err` as its async error.
void cancel(Part& p, ncclResult_t err, const std::string& msg) {
    p.failed = true;
    p.done = true;
    for (ncclComm* c : p.cl->comms)
        if (c) {
            if (c->async_err == ncclSuccess) c->async_err = err;
            c->last_err = msg;
        }
}

// Registers one call of `c` (lock held). Returns the slot, or an error (reported).
ncclResult_t post(ncclComm* c, const Call& k, Slot* out) {
    Clique* cl = c->cl;
    std::shared_ptr<Part> p;
    std::size_t idx;
    if (k.kind == Send || k.kind == Recv) {
        const bool send = k.kind == Send;
        const int src = send ? c->rank : k.root, dst = send ? k.root : c->rank;
        const uint64_t seq = send ? c->next_send[k.root]++ : c->next_recv[k.root]++;
        auto& slot = cl->p2p[{src, dst, seq}];
        if (!slot) {
            slot = std::make_shared<Part>();
            slot->cl = cl;
            slot->p2p = true;
            slot->seq = seq;
            slot->src = src;
            slot->dst = dst;
            slot->calls.resize(2);
            slot->posted.assign(2, 0);
            slot->arrived.assign(2, 0);
        }
        p = slot;
        idx = send ? 0 : 1;
    } else {
        const uint64_t seq = c->next_coll++;
        auto& slot = cl->colls[seq];
        if (!slot) {
            slot = std::make_shared<Part>();
            slot->cl = cl;
            slot->seq = seq;
            slot->calls.resize(cl->nranks);
            slot->posted.assign(cl->nranks, 0);
            slot->arrived.assign(cl->nranks, 0);
        }
        p = slot;
        idx = (std::size_t)c->rank;
    }
    for (std::size_t j = 0; j < p->calls.size(); ++j) {
        const ncclComm* o = cl->comms[p->rank_of(j)];
        if (o && o->dead && !p->done) {
            cancel(*p, ncclRemoteError,
                   fmt("rank %d of communicator %s was aborted or destroyed; %s cannot run", o->rank, cl->name.c_str(),
                       part_name(*p).c_str()));
        }
    }
    c->last_call = part_name(*p) + " " + describe(k);
    cl->last_progress = now_s();
    p->calls[idx] = k;
    p->posted[idx] = 1;
    if (p->failed) {
        const std::string msg = who(kind_name(k.kind), c) + ": " + part_name(*p) +
                                " of this communicator was already cancelled: " + c->last_err;
        erase_if_settled(p);
        CV.notify_all();
        return fail(c, ncclInvalidUsage, msg);
    }
    for (std::size_t j = 0; j < p->calls.size(); ++j) {
        if (j == idx || !p->posted[j]) continue;
        const std::string d = differ(k, p->rank_of(idx), p->calls[j], p->rank_of(j));
        if (d.empty()) continue;
        const std::string msg = who(kind_name(k.kind), c) + ": ranks " + std::to_string(p->rank_of(idx)) + " and " +
                                std::to_string(p->rank_of(j)) + " disagree at " + part_name(*p) + ": " + d +
                                "; the operation is cancelled on every rank";
        cancel(*p, ncclInvalidUsage, msg);
        erase_if_settled(p);
        CV.notify_all();
        return fail(c, ncclInvalidUsage, msg);
    }
    c->streams.insert(k.stream);
    *out = Slot{p, idx};
    return ncclSuccess;
}

bool all_arrived(const Part& p) {
    for (char a : p.arrived)
        if (!a) return false;
    return true;
}

void arrive(const std::shared_ptr<Unit>& u) {
    std::vector<std::shared_ptr<Part>> ready;
    {
        std::lock_guard<std::mutex> g(M);
        for (const Slot& s : u->slots) {
            s.part->arrived[s.idx] = 1;
            s.part->cl->last_progress = now_s();
            if (!s.part->done && !s.part->running && all_arrived(*s.part)) {
                s.part->running = true;
                ready.push_back(s.part);
            }
        }
    }
    for (auto& p : ready) {
        if (vgpu::options().trace) vgpu::report("run %s %s", part_name(*p).c_str(), describe(p->calls[0]).c_str());
        execute(*p);
        std::lock_guard<std::mutex> g(M);
        p->done = true;
        p->cl->last_progress = now_s();
        erase_if_settled(p);
    }
    CV.notify_all();
}

[[noreturn]] void report_stuck(const Part& p, const ncclComm* waiter) {
    std::string waiting, missing;
    for (std::size_t j = 0; j < p.calls.size(); ++j) {
        const int r = p.rank_of(j);
        const ncclComm* c = p.cl->comms[r];
        const int dev = c ? c->device : -1;
        if (p.arrived[j]) {
            waiting += fmt("%s rank %d (device %d, %s)", waiting.empty() ? "" : ",", r, dev, describe(p.calls[j]).c_str());
        } else if (p.posted[j]) {
            missing += fmt("\n    rank %d (device %d) called %s, but its stream has not reached it (work queued "
                           "before it has not run)",
                           r, dev, describe(p.calls[j]).c_str());
        } else {
            missing += fmt("\n    rank %d (device %d) has not called it%s (its last call on this communicator: %s)", r,
                           dev, p.p2p ? (j == 0 ? " (the matching ncclSend)" : " (the matching ncclRecv)") : "",
                           c ? c->last_call.c_str() : "none");
        }
    }
    vgpu::report(
        "NCCL operation never completes: %s on communicator %s (%d ranks) made no progress for %.0f s "
        "(TOOLN1_VGPU_NCCL_TIMEOUT_S); rank %d noticed.\n    waiting in their streams:%s\n    missing:%s",
        part_name(p).c_str(), p.cl->name.c_str(), p.cl->nranks, timeout_s(), waiter->rank,
        waiting.empty() ? " none" : waiting.c_str(), missing.c_str());
    abort();
}

void wait_unit(const std::shared_ptr<Unit>& u) {
    for (;;) {
        std::vector<std::pair<void*, Slot>> drive;  // streams of ranks that called but have not arrived
        {
            std::unique_lock<std::mutex> g(M);
            const Part* stuck = nullptr;
            for (const Slot& s : u->slots) {
                if (s.part->done) continue;
                stuck = s.part.get();
                for (std::size_t j = 0; j < s.part->calls.size(); ++j)
                    if (s.part->posted[j] && !s.part->arrived[j]) drive.push_back({s.part->calls[j].stream, Slot{s.part, j}});
            }
            if (!stuck) return;
            if (now_s() - stuck->cl->last_progress > timeout_s()) report_stuck(*stuck, u->comm);
        }
        bool ran = false;
        for (auto& [stream, slot] : drive) {
            const Slot s = slot;
            ran |= vgpu::run_until(stream, [s] {
                std::lock_guard<std::mutex> g(M);
                return s.part->arrived[s.idx] || s.part->done;
            });
        }
        if (!ran) {
            std::unique_lock<std::mutex> g(M);
            CV.wait_for(g, std::chrono::milliseconds(20));
        }
    }
}

// Validates, posts and queues a rank's calls (a group, or one call outside a group).
ncclResult_t launch(std::vector<Pending>& calls) {
    ncclResult_t err = ncclSuccess;
    std::vector<std::shared_ptr<Unit>> units;
    {
        std::lock_guard<std::mutex> g(M);
        std::map<ncclComm*, std::shared_ptr<Unit>> by_comm;
        for (Pending& pc : calls) {
            ncclComm* c = comm_ok(pc.comm);
            if (!c) {
                if (err == ncclSuccess) err = ncclInvalidArgument;
                continue;
            }
            auto& u = by_comm[c];
            if (!u) {
                u = std::make_shared<Unit>();
                u->comm = c;
                units.push_back(u);
            }
            if (!u->slots.empty() && u->slots[0].part->calls[u->slots[0].idx].stream != pc.call.stream) {
                if (err == ncclSuccess)
                    err = fail(c, ncclInvalidUsage,
                               who(kind_name(pc.call.kind), c) +
                                   ": a group uses two streams for one communicator (not modelled: use one)");
                continue;
            }
            Slot s;
            const ncclResult_t r = post(c, pc.call, &s);
            if (r != ncclSuccess) {
                if (err == ncclSuccess) err = r;
                continue;
            }
            u->slots.push_back(s);
        }
    }
    for (auto& u : units) {
        if (u->slots.empty()) continue;
        void* stream = u->slots[0].part->calls[u->slots[0].idx].stream;
        vgpu::enqueue(stream, [u] { arrive(u); }, "NCCL operation (arrive)");
        vgpu::enqueue(stream, [u] { wait_unit(u); }, "NCCL operation (wait for the other ranks)");
    }
    return err;
}

// Checks that [p, p + bytes) is device memory of the rank's device.
ncclResult_t check_buf(ncclComm* c, const char* api, const char* name, uint64_t p, std::size_t bytes) {
    if (bytes == 0) return ncclSuccess;
    const int dev = vgpu::device_of_range(p, bytes);
    if (dev == c->device) return ncclSuccess;
    if (dev >= 0)
        return fail(c, ncclInvalidArgument,
                    who(api, c) + fmt(": %s [0x%llx, +%zu) is memory of device %d, not of this rank's device %d", name,
                                      (unsigned long long)p, bytes, dev, c->device));
    // A range that starts in an allocation but runs past its end: say where its last byte is.
    const bool starts_inside = vgpu::device_of_range(p, 1) >= 0;
    return fail(c, ncclInvalidArgument,
                who(api, c) + fmt(": %s [0x%llx, +%zu) is not inside one live device allocation: %s%s", name,
                                  (unsigned long long)p, bytes, starts_inside ? "its last byte is " : "",
                                  vgpu::describe_address(starts_inside ? p + bytes - 1 : p).c_str()));
}

ncclResult_t enqueue_call(Kind kind, const void* send, void* recv, std::size_t count, int dtype, int op, int root,
                          ncclComm_t comm, cudaStream_t stream) {
    const char* api = kind_name(kind);
    ncclComm* c;
    Call k;
    {
        std::lock_guard<std::mutex> g(M);
        c = comm_ok(comm);
        if (!c) return fail(nullptr, ncclInvalidArgument, fmt("%s: invalid or destroyed communicator %p", api, (void*)comm));
        k.kind = kind;
        k.count = count;
        k.dtype = dtype;
        k.root = root;
        if (dtype < 0 || dtype >= ncclNumTypes)
            return fail(c, ncclInvalidArgument, who(api, c) + fmt(": data type %d is not supported", dtype));
        if (has_op(kind)) {
            if (op >= 0 && op < ncclNumOps) k.op = op;
            else if (op >= ncclNumOps && op - ncclNumOps < (int)c->ops.size() && c->ops[op - ncclNumOps].live) {
                k.op = ncclNumOps;
                k.premul = c->ops[op - ncclNumOps];
                if (k.premul.dtype != dtype)
                    return fail(c, ncclInvalidArgument,
                                who(api, c) + fmt(": op %d was created for %s, used with %s", op,
                                                  type_name(k.premul.dtype), type_name(dtype)));
            } else
                return fail(c, ncclInvalidArgument, who(api, c) + fmt(": op %d is not an op of this communicator", op));
        }
        if ((has_root(kind) || kind == Send || kind == Recv) && (root < 0 || root >= c->cl->nranks))
            return fail(c, ncclInvalidArgument,
                        who(api, c) + fmt(": %s %d outside [0, %d)", has_root(kind) ? "root" : "peer", root, c->cl->nranks));
    }
    if (!vgpu::stream_valid(stream))
        return fail(c, ncclInvalidArgument, who(api, c) + fmt(": invalid stream %p", (void*)stream));
    k.stream = vgpu::stream_for(stream, c->device);
    const int sdev = vgpu::stream_device(k.stream);
    if (sdev != c->device)
        return fail(c, ncclInvalidArgument,
                    who(api, c) + fmt(": stream %p belongs to device %d, not to this rank's device", (void*)stream, sdev));
    k.send = (uint64_t)(uintptr_t)send;
    k.recv = (uint64_t)(uintptr_t)recv;
    const std::size_t b = count * type_size(dtype), R = (std::size_t)c->cl->nranks;
    ncclResult_t r = ncclSuccess;
    auto chk = [&](const char* name, uint64_t p, std::size_t n) {
        if (r == ncclSuccess) r = check_buf(c, api, name, p, n);
    };
    switch (kind) {
        case AllReduce:
            chk("sendbuff", k.send, b);
            chk("recvbuff", k.recv, b);
            break;
        case Broadcast:
            if (c->rank == root) chk("sendbuff", k.send, b);
            chk("recvbuff", k.recv, b);
            break;
        case Reduce:
            chk("sendbuff", k.send, b);
            if (c->rank == root) chk("recvbuff", k.recv, b);
            break;
        case AllGather:
            chk("sendbuff", k.send, b);
            chk("recvbuff", k.recv, b * R);
            break;
        case ReduceScatter:
            chk("sendbuff", k.send, b * R);
            chk("recvbuff", k.recv, b);
            break;
        case Send: chk("sendbuff", k.send, b); break;
        case Recv: chk("recvbuff", k.recv, b); break;
    }
    if (r != ncclSuccess) return r;
    if (k.op == ncclNumOps && k.premul.on_device) chk("the pre-multiplied sum's scalar", k.premul.dev, type_size(dtype));
    if (r != ncclSuccess) return r;
    if (group_depth > 0) {
        group_calls.push_back(Pending{c, k});
        return ncclSuccess;
    }
    std::vector<Pending> one{Pending{c, k}};
    return launch(one);
}

std::string id_key(const ncclUniqueId& id) { return std::string(id.internal, sizeof id.internal); }

ncclComm* new_comm(Clique* cl, int rank, int device) {
    ncclComm* c = new ncclComm();
    c->cl = cl;
    c->rank = rank;
    c->device = device;
    cl->comms[rank] = c;
    cl->joined++;
    live_comms.insert(c);
    return c;
}

Clique* new_clique(int nranks) {
    Clique* cl = new Clique();
    cl->nranks = nranks;
    cl->comms.assign(nranks, nullptr);
    cl->name = fmt("#%llu", (unsigned long long)++clique_counter);
    cl->last_progress = now_s();
    return cl;
}

int device_count() {
    cuInit(0);
    int n = 0;
    if (cuDeviceGetCount(&n) != CUDA_SUCCESS) return 0;
    return n;
}

ncclResult_t init_rank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank, const ncclConfigHead* config) {
    if (!out) return fail(nullptr, ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
    if (memcmp(id.internal, kIdMagic, sizeof kIdMagic) != 0)
        return fail(nullptr, ncclInvalidArgument, "ncclCommInitRank: the unique id does not come from ncclGetUniqueId");
    if (config && config->magic != kConfigMagic)
        return fail(nullptr, ncclInvalidArgument,
                    "ncclCommInitRankConfig: config was not initialised with NCCL_CONFIG_INITIALIZER");
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail(nullptr, ncclInvalidArgument, fmt("ncclCommInitRank: rank %d of %d ranks", rank, nranks));
    const int dn = device_count();
    int dev = vgpu::current_device();
    if (dev < 0) dev = 0;
    if (dev >= dn) return fail(nullptr, ncclInvalidUsage, fmt("ncclCommInitRank: no device %d", dev));
    std::unique_lock<std::mutex> g(M);
    Clique*& slot = pending_ids[id_key(id)];
    if (!slot) slot = new_clique(nranks);
    Clique* cl = slot;
    if (cl->nranks != nranks)
        return fail(nullptr, ncclInvalidArgument,
                    fmt("ncclCommInitRank (rank %d): %d ranks, but another rank of communicator %s said %d", rank, nranks,
                        cl->name.c_str(), cl->nranks));
    if (cl->comms[rank])
        return fail(nullptr, ncclInvalidUsage,
                    fmt("ncclCommInitRank: rank %d of communicator %s joined twice", rank, cl->name.c_str()));
    for (ncclComm* o : cl->comms)
        if (o && o->device == dev)
            return fail(nullptr, ncclInvalidUsage,
                        fmt("ncclCommInitRank: duplicate GPU: ranks %d and %d of communicator %s are both on device %d",
                            o->rank, rank, cl->name.c_str(), dev));
    ncclComm* c = new_comm(cl, rank, dev);
    cl->last_progress = now_s();
    if (cl->joined == nranks) pending_ids.erase(id_key(id));
    CV.notify_all();
    while (cl->joined < nranks) {
        CV.wait_for(g, std::chrono::milliseconds(50));
        if (cl->joined < nranks && now_s() - cl->last_progress > timeout_s()) {
            std::string in, out_s;
            for (int r = 0; r < nranks; ++r) (cl->comms[r] ? in : out_s) += " " + std::to_string(r);
            vgpu::report("ncclCommInitRank never completes: communicator %s (%d ranks) waited %.0f s "
                         "(TOOLN1_VGPU_NCCL_TIMEOUT_S) for ranks%s; joined:%s",
                         cl->name.c_str(), nranks, timeout_s(), out_s.c_str(), in.c_str());
            abort();
        }
    }
    *out = c;
    return ncclSuccess;
}

}  // namespace

// ---- the C API ---------------------------------------------------------------------------------------
EXPORT ncclResult_t ncclGetVersion(int* version) {
    if (!version) return fail(nullptr, ncclInvalidArgument, "ncclGetVersion: version is NULL");
    *version = kVersion;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return fail(nullptr, ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
    memset(id, 0, sizeof *id);
    memcpy(id->internal, kIdMagic, sizeof kIdMagic);
    std::lock_guard<std::mutex> g(M);
    const uint64_t n = ++id_counter, pid = (uint64_t)getpid();
    memcpy(id->internal + 32, &n, 8);
    memcpy(id->internal + 40, &pid, 8);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    return init_rank(comm, nranks, id, rank, nullptr);
}

EXPORT ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, void* config) {
    return init_rank(comm, nranks, id, rank, (const ncclConfigHead*)config);
}

EXPORT ncclResult_t ncclCommInitAll(ncclComm_t* comms, int ndev, const int* devlist) {
    if (!comms || ndev < 1) return fail(nullptr, ncclInvalidArgument, fmt("ncclCommInitAll: %d devices", ndev));
    const int dn = device_count();
    std::vector<int> devs(ndev);
    for (int i = 0; i < ndev; ++i) {
        devs[i] = devlist ? devlist[i] : i;
        if (devs[i] < 0 || devs[i] >= dn)
            return fail(nullptr, ncclInvalidArgument,
                        fmt("ncclCommInitAll: device %d (rank %d) does not exist (%d devices)", devs[i], i, dn));
        for (int j = 0; j < i; ++j)
            if (devs[j] == devs[i])
                return fail(nullptr, ncclInvalidUsage,
                            fmt("ncclCommInitAll: duplicate GPU: ranks %d and %d are both on device %d", j, i, devs[i]));
    }
    std::lock_guard<std::mutex> g(M);
    Clique* cl = new_clique(ndev);
    for (int i = 0; i < ndev; ++i) comms[i] = new_comm(cl, i, devs[i]);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    std::set<void*> streams;
    {
        std::lock_guard<std::mutex> g(M);
        ncclComm* c = comm_ok(comm);
        if (!c) return fail(nullptr, ncclInvalidArgument, fmt("ncclCommFinalize: invalid communicator %p", (void*)comm));
        streams = c->streams;
    }
    // Every operation queued on the communicator completes (this waits for the other ranks).
    for (void* s : streams) vgpu::flush_stream(s);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    const ncclResult_t r = ncclCommFinalize(comm);
    if (r != ncclSuccess) return r;
    std::lock_guard<std::mutex> g(M);
    comm->dead = true;  // the object stays allocated: queued work may still name it
    live_comms.erase(comm);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommAbort(ncclComm_t comm) {
    std::lock_guard<std::mutex> g(M);
    ncclComm* c = comm_ok(comm);
    if (!c) return fail(nullptr, ncclInvalidArgument, fmt("ncclCommAbort: invalid communicator %p", (void*)comm));
    // Operations of this rank that have not run are cancelled; the other ranks of them see
    // ncclRemoteError.
    int cancelled = 0;
    const std::string msg = fmt("rank %d of communicator %s was aborted (ncclCommAbort) before an operation it takes "
                                "part in ran",
                                c->rank, c->cl->name.c_str());
    auto sweep = [&](auto& m) {
        for (auto& kv : m) {
            Part& p = *kv.second;
            if (p.done) continue;
            for (std::size_t j = 0; j < p.calls.size(); ++j)
                if (p.rank_of(j) == c->rank) {
                    cancel(p, ncclRemoteError, msg);
                    ++cancelled;
                    break;
                }
        }
    };
    sweep(c->cl->colls);
    sweep(c->cl->p2p);
    if (cancelled) vgpu::report("ncclCommAbort: %s (%d operations cancelled)", msg.c_str(), cancelled);
    c->dead = true;
    live_comms.erase(c);
    CV.notify_all();
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    std::lock_guard<std::mutex> g(M);
    ncclComm* c = comm_ok(comm);
    if (!c || !count) return fail(c, ncclInvalidArgument, "ncclCommCount: invalid communicator or NULL count");
    *count = c->cl->nranks;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
    std::lock_guard<std::mutex> g(M);
    ncclComm* c = comm_ok(comm);
    if (!c || !device) return fail(c, ncclInvalidArgument, "ncclCommCuDevice: invalid communicator or NULL device");
    *device = c->device;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    std::lock_guard<std::mutex> g(M);
    ncclComm* c = comm_ok(comm);
    if (!c || !rank) return fail(c, ncclInvalidArgument, "ncclCommUserRank: invalid communicator or NULL rank");
    *rank = c->rank;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
    std::lock_guard<std::mutex> g(M);
    if (!comm || !live_comms.count(comm) || !async_error)
        return fail(nullptr, ncclInvalidArgument, "ncclCommGetAsyncError: invalid communicator or NULL asyncError");
    *async_error = comm->async_err;
    return ncclSuccess;
}

EXPORT const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

EXPORT const char* ncclGetLastError(ncclComm_t comm) {
    static thread_local std::string out;
    std::lock_guard<std::mutex> g(M);
    out = comm && live_comms.count(comm) && !comm->last_err.empty() ? comm->last_err : thread_last_err;
    return out.c_str();
}

EXPORT ncclResult_t ncclGroupStart() {
    ++group_depth;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclGroupEnd() {
    if (group_depth == 0) return fail(nullptr, ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--group_depth > 0) return ncclSuccess;
    std::vector<Pending> calls;
    calls.swap(group_calls);
    return launch(calls);
}

EXPORT ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, int datatype, int op,
                                  ncclComm_t comm, cudaStream_t stream) {
    return enqueue_call(AllReduce, sendbuff, recvbuff, count, datatype, op, 0, comm, stream);
}

EXPORT ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, int datatype, int root,
                                  ncclComm_t comm, cudaStream_t stream) {
    return enqueue_call(Broadcast, sendbuff, recvbuff, count, datatype, 0, root, comm, stream);
}

EXPORT ncclResult_t ncclBcast(void* buff, size_t count, int datatype, int root, ncclComm_t comm, cudaStream_t stream) {
    return enqueue_call(Broadcast, buff, buff, count, datatype, 0, root, comm, stream);
}

EXPORT ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, int datatype, int op, int root,
                               ncclComm_t comm, cudaStream_t stream) {
    return enqueue_call(Reduce, sendbuff, recvbuff, count, datatype, op, root, comm, stream);
}

EXPORT ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, int datatype,
                                  ncclComm_t comm, cudaStream_t stream) {
    return enqueue_call(AllGather, sendbuff, recvbuff, sendcount, datatype, 0, 0, comm, stream);
}

EXPORT ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, int datatype, int op,
                                      ncclComm_t comm, cudaStream_t stream) {
    return enqueue_call(ReduceScatter, sendbuff, recvbuff, recvcount, datatype, op, 0, comm, stream);
}

EXPORT ncclResult_t ncclSend(const void* sendbuff, size_t count, int datatype, int peer, ncclComm_t comm,
                             cudaStream_t stream) {
    return enqueue_call(Send, sendbuff, nullptr, count, datatype, 0, peer, comm, stream);
}

EXPORT ncclResult_t ncclRecv(void* recvbuff, size_t count, int datatype, int peer, ncclComm_t comm,
                             cudaStream_t stream) {
    return enqueue_call(Recv, nullptr, recvbuff, count, datatype, 0, peer, comm, stream);
}

EXPORT ncclResult_t ncclRedOpCreatePreMulSum(int* op, void* scalar, int datatype, int residence, ncclComm_t comm) {
    std::lock_guard<std::mutex> g(M);
    ncclComm* c = comm_ok(comm);
    if (!c) return fail(nullptr, ncclInvalidArgument, "ncclRedOpCreatePreMulSum: invalid communicator");
    if (!op || !scalar) return fail(c, ncclInvalidArgument, "ncclRedOpCreatePreMulSum: op or scalar is NULL");
    if (datatype < 0 || datatype >= ncclNumTypes)
        return fail(c, ncclInvalidArgument, fmt("ncclRedOpCreatePreMulSum: data type %d is not supported", datatype));
    UserOp u;
    u.live = true;
    u.dtype = datatype;
    if (residence == ncclScalarHostImmediate) memcpy(u.host, scalar, type_size(datatype));
    else if (residence == ncclScalarDevice) {
        u.on_device = true;
        u.dev = (uint64_t)(uintptr_t)scalar;
        if (vgpu::device_of_range(u.dev, type_size(datatype)) != c->device)
            return fail(c, ncclInvalidArgument,
                        who("ncclRedOpCreatePreMulSum", c) +
                            fmt(": the scalar %p is not device memory of this rank's device: %s", scalar,
                                vgpu::describe_address(u.dev).c_str()));
    } else
        return fail(c, ncclInvalidArgument, fmt("ncclRedOpCreatePreMulSum: residence %d", residence));
    std::size_t i = 0;
    while (i < c->ops.size() && c->ops[i].live) ++i;  // freed ids are reused, as in NCCL
    if (i == c->ops.size()) c->ops.push_back(u);
    else c->ops[i] = u;
    *op = ncclNumOps + (int)i;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclRedOpDestroy(int op, ncclComm_t comm) {
    std::lock_guard<std::mutex> g(M);
    ncclComm* c = comm_ok(comm);
    if (!c) return fail(nullptr, ncclInvalidArgument, "ncclRedOpDestroy: invalid communicator");
    const int i = op - ncclNumOps;
    if (i < 0 || i >= (int)c->ops.size() || !c->ops[i].live)
        return fail(c, ncclInvalidArgument, who("ncclRedOpDestroy", c) + fmt(": op %d was not created on it", op));
    // Calls already queued keep their own copy of the op.
    c->ops[i].live = false;
    return ncclSuccess;
}
