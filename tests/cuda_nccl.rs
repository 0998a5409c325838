//! NCCL through cudarc's `nccl` module on 2, 3 and 4 devices, one host thread per device (and
//! one thread driving every device with group calls): every collective and data type family
//! against a host reference on random inputs (seed printed, replay with TOOLN1_TEST_SEED), odd
//! counts, in-place calls, groups, a send/recv ring, pre-multiplied sums, and the misuse that must
//! be reported instead of hanging: ranks that disagree on a count, buffers that are not the
//! rank's device memory, a rank that never arrives (in a child process: that report aborts).
//!
//! Skips with the reason when there is no driver, no NCCL library or fewer than two devices, and
//! fails instead under TOOLN1_REQUIRE_CUDA=1. On the virtual GPU: TOOLN1_VGPU_DEVICES=4.
//!
//! Float results are compared with bounds, not bit for bit: NCCL's reduction order (rings and
//! trees) differs from the virtual GPU's rank order.

mod common;

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{result as nr, sys as ns, Comm, Id, NcclType, ReduceOp};
use half::{bf16, f16};

/// The number of devices the tests use (2..=4), or `None` after the skip line.
fn devices() -> Option<usize> {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        common::skip("no CUDA driver library");
        return None;
    }
    let n = match CudaContext::device_count() {
        Ok(n) => n as usize,
        Err(e) => {
            common::skip(&format!("no CUDA device ({e:?})"));
            return None;
        }
    };
    if n < 2 {
        common::skip(&format!(
            "{n} CUDA device(s); the NCCL tests need 2 or more (TOOLN1_VGPU_DEVICES=4 on the virtual GPU)"
        ));
        return None;
    }
    if !unsafe { ns::is_culib_present() } {
        common::skip("no NCCL library (libnccl.so.2)");
        return None;
    }
    Some(n.min(4))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Sum,
    Prod,
    Max,
    Min,
    Avg,
}
const OPS: [Op; 5] = [Op::Sum, Op::Prod, Op::Max, Op::Min, Op::Avg];

impl Op {
    fn nccl(self) -> ReduceOp {
        match self {
            Op::Sum => ReduceOp::Sum,
            Op::Prod => ReduceOp::Prod,
            Op::Max => ReduceOp::Max,
            Op::Min => ReduceOp::Min,
            Op::Avg => ReduceOp::Avg,
        }
    }
}

/// A data type of the tests: its conversions, its unit roundoff (0: exact) and inputs whose
/// reductions over 4 ranks neither overflow nor underflow.
trait Elem:
    NcclType + DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + std::fmt::Debug + 'static
{
    const NAME: &'static str;
    const U: f64;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Inclusive integer input range for `op` (integer types).
    fn range(op: Op) -> (i64, i64);
    fn gen(rng: &mut common::Rng, op: Op) -> Self {
        if Self::U == 0.0 {
            let (lo, hi) = Self::range(op);
            Self::from_f64((lo + rng.below((hi - lo + 1) as usize) as i64) as f64)
        } else if op == Op::Prod {
            let m = 0.5 + rng.uni() as f64;
            Self::from_f64(if rng.below(2) == 0 { m } else { -m })
        } else {
            Self::from_f64((rng.uni() as f64 * 2.0 - 1.0) * 2.0)
        }
    }
}

macro_rules! int_elem {
    ($t:ty, $name:expr, $sum:expr, $prod:expr) => {
        impl Elem for $t {
            const NAME: &'static str = $name;
            const U: f64 = 0.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn range(op: Op) -> (i64, i64) {
                match op {
                    Op::Prod => $prod,
                    _ => $sum,
                }
            }
        }
    };
}
int_elem!(i8, "int8", (-30, 30), (-3, 3));
int_elem!(u8, "uint8", (0, 60), (0, 3));
int_elem!(i32, "int32", (-1_000_000, 1_000_000), (-40, 40));
int_elem!(u32, "uint32", (0, 1_000_000), (0, 40));
int_elem!(i64, "int64", (-1_000_000_000, 1_000_000_000), (-1000, 1000));
int_elem!(u64, "uint64", (0, 1_000_000_000), (0, 1000));

macro_rules! float_elem {
    ($t:ty, $name:expr, $u:expr, $from:expr, $to:expr) => {
        impl Elem for $t {
            const NAME: &'static str = $name;
            const U: f64 = $u;
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn range(_: Op) -> (i64, i64) {
                (0, 0)
            }
        }
    };
}
float_elem!(
    f32,
    "float32",
    f32::EPSILON as f64 / 2.0,
    |x: f64| x as f32,
    |x: f32| x as f64
);
float_elem!(f64, "float64", f64::EPSILON / 2.0, |x: f64| x, |x: f64| x);
float_elem!(f16, "float16", 1.0 / 2048.0, f16::from_f64, |x: f16| x
    .to_f64());
float_elem!(bf16, "bfloat16", 1.0 / 256.0, bf16::from_f64, |x: bf16| x
    .to_f64());

/// The reference reduction of one element over the ranks (in rank order, in f64; integer avg
/// truncates, as NCCL's sum-then-divide does) and its error bound.
fn reduce_ref<T: Elem>(xs: &[T], op: Op) -> (f64, f64) {
    let v: Vec<f64> = xs.iter().map(|x| x.to_f64()).collect();
    let n = v.len() as f64;
    let abs: f64 = v.iter().map(|x| x.abs()).sum();
    let slack = (n + 1.0) * T::U;
    match op {
        Op::Sum => (v.iter().sum(), slack * abs + T::U * 1e-3),
        Op::Avg => {
            let s: f64 = v.iter().sum::<f64>() / n;
            let s = if T::U == 0.0 {
                (v.iter().sum::<f64>() / n).trunc()
            } else {
                s
            };
            (s, slack * abs / n + T::U * 1e-3)
        }
        Op::Prod => {
            let p: f64 = v.iter().product();
            (p, slack * p.abs())
        }
        Op::Max => (v.iter().cloned().fold(f64::NEG_INFINITY, f64::max), 0.0),
        Op::Min => (v.iter().cloned().fold(f64::INFINITY, f64::min), 0.0),
    }
}

fn compare<T: Elem>(what: &str, got: &[T], want: &[(f64, f64)]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, (w, tol))) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - w).abs() <= *tol,
            "{what}: element {i} is {g} where {w} is expected (bound {tol:.3e})"
        );
    }
}

fn exact<T: Elem>(v: &[T]) -> Vec<(f64, f64)> {
    v.iter().map(|x| (x.to_f64(), 0.0)).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    AllReduce,
    Reduce,
    Broadcast,
    AllGather,
    ReduceScatter,
}

/// One collective: its inputs per rank and each rank's expected receive buffer (empty: the
/// rank has none, e.g. a non-root of a reduce).
struct Case<T> {
    kind: Kind,
    op: Op,
    root: usize,
    inplace: bool,
    inputs: Vec<Vec<T>>,
    want: Vec<Vec<(f64, f64)>>,
}

impl<T> Case<T> {
    fn name(&self) -> String {
        format!(
            "{:?} {:?} root {} {} count {}",
            self.kind,
            self.op,
            self.root,
            if self.inplace {
                "in place"
            } else {
                "out of place"
            },
            self.inputs[0].len()
        )
    }
}

fn make_case<T: Elem>(
    rng: &mut common::Rng,
    n: usize,
    kind: Kind,
    op: Op,
    inplace: bool,
) -> Case<T> {
    // Odd counts, 1 among them.
    let count = if rng.below(5) == 0 {
        1
    } else {
        2 * rng.below(150) + 3
    };
    let root = rng.below(n);
    let len = if kind == Kind::ReduceScatter {
        n * count
    } else {
        count
    };
    let inputs: Vec<Vec<T>> = (0..n)
        .map(|_| (0..len).map(|_| T::gen(rng, op)).collect())
        .collect();
    let red = |off: usize| -> Vec<(f64, f64)> {
        (0..count)
            .map(|i| {
                let xs: Vec<T> = inputs.iter().map(|v| v[off + i]).collect();
                reduce_ref(&xs, op)
            })
            .collect()
    };
    let want = (0..n)
        .map(|r| match kind {
            Kind::AllReduce => red(0),
            Kind::Reduce if r == root => red(0),
            Kind::Reduce => vec![],
            Kind::Broadcast => exact(&inputs[root]),
            Kind::AllGather => inputs.iter().flat_map(|v| exact(v)).collect(),
            Kind::ReduceScatter => red(r * count),
        })
        .collect();
    Case {
        kind,
        op,
        root,
        inplace,
        inputs,
        want,
    }
}

/// One rank of a world: its device, stream and communicator.
struct Rank {
    rank: usize,
    n: usize,
    stream: Arc<CudaStream>,
    comm: Comm,
}

/// Runs `f` on `n` ranks, one thread per device, with a communicator made by ncclCommInitRank;
/// the legacy default stream of each device or a new stream.
fn world<R: Send>(n: usize, default_stream: bool, f: impl Fn(&Rank) -> R + Sync) -> Vec<R> {
    let id = Id::new().expect("ncclGetUniqueId");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let ctx = CudaContext::new(rank).expect("context");
                    let stream = if default_stream {
                        ctx.default_stream()
                    } else {
                        ctx.new_stream().expect("stream")
                    };
                    let comm = Comm::from_rank(stream.clone(), rank, n, id)
                        .unwrap_or_else(|e| panic!("ncclCommInitRank rank {rank}: {:?}", e.0));
                    f(&Rank {
                        rank,
                        n,
                        stream,
                        comm,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn filled<T: Elem>(s: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    // A value no reduction of the inputs produces by chance, so an unwritten buffer shows.
    s.clone_htod(&vec![T::from_f64(77.0); n]).unwrap()
}

fn run_case<T: Elem>(r: &Rank, c: &Case<T>) -> Vec<T> {
    let s = &r.stream;
    let x = &c.inputs[r.rank];
    let count = if c.kind == Kind::ReduceScatter {
        x.len() / r.n
    } else {
        x.len()
    };
    let op = c.op.nccl();
    let root = c.root as i32;
    let name = c.name();
    let ok = |res: Result<nr::NcclStatus, nr::NcclError>| {
        if let Err(e) = res {
            panic!("rank {}: {name}: {:?}", r.rank, e.0)
        }
    };
    let out = match (c.kind, c.inplace) {
        (Kind::AllReduce, true) => {
            let mut b = s.clone_htod(x).unwrap();
            ok(r.comm.all_reduce_in_place(&mut b, &op));
            b
        }
        (Kind::AllReduce, false) => {
            let a = s.clone_htod(x).unwrap();
            let mut b = filled::<T>(s, count);
            ok(r.comm.all_reduce(&a, &mut b, &op));
            b
        }
        (Kind::Reduce, true) => {
            let mut b = s.clone_htod(x).unwrap();
            ok(r.comm.reduce_in_place(&mut b, &op, root));
            b
        }
        (Kind::Reduce, false) => {
            let a = s.clone_htod(x).unwrap();
            let mut b = filled::<T>(s, count);
            if r.rank == c.root {
                ok(r.comm.reduce(&a, Some(&mut b), &op, root));
            } else {
                ok(r.comm.reduce(&a, None::<&mut CudaSlice<T>>, &op, root));
            }
            b
        }
        (Kind::Broadcast, true) => {
            let mut b = if r.rank == c.root {
                s.clone_htod(x).unwrap()
            } else {
                filled::<T>(s, count)
            };
            ok(r.comm.broadcast_in_place(&mut b, root));
            b
        }
        (Kind::Broadcast, false) => {
            let a = s.clone_htod(x).unwrap();
            let mut b = filled::<T>(s, count);
            if r.rank == c.root {
                ok(r.comm.broadcast(Some(&a), &mut b, root));
            } else {
                ok(r.comm.broadcast(None::<&CudaSlice<T>>, &mut b, root));
            }
            b
        }
        (Kind::AllGather, _) => {
            let a = s.clone_htod(x).unwrap();
            let mut b = filled::<T>(s, count * r.n);
            ok(r.comm.all_gather(&a, &mut b));
            b
        }
        (Kind::ReduceScatter, _) => {
            let a = s.clone_htod(x).unwrap();
            let mut b = filled::<T>(s, count);
            ok(r.comm.reduce_scatter(&a, &mut b, &op));
            b
        }
    };
    if c.want[r.rank].is_empty() {
        return vec![];
    }
    s.clone_dtoh(&out).unwrap()
}

fn check_type<T: Elem>(n: usize, rng: &mut common::Rng) {
    let mut cases: Vec<Case<T>> = vec![];
    for op in OPS {
        for inplace in [false, true] {
            cases.push(make_case(rng, n, Kind::AllReduce, op, inplace));
            cases.push(make_case(rng, n, Kind::Reduce, op, inplace));
        }
        cases.push(make_case(rng, n, Kind::ReduceScatter, op, false));
    }
    for inplace in [false, true] {
        cases.push(make_case(rng, n, Kind::Broadcast, Op::Sum, inplace));
    }
    cases.push(make_case(rng, n, Kind::AllGather, Op::Sum, false));
    let got = world(n, n == 2, |r| {
        cases.iter().map(|c| run_case(r, c)).collect::<Vec<_>>()
    });
    for (ci, c) in cases.iter().enumerate() {
        for (rank, g) in got.iter().enumerate() {
            let what = format!("{} ranks, {}, {}, rank {rank}", n, T::NAME, c.name());
            compare(&what, &g[ci], &c.want[rank]);
        }
    }
    println!("{n} ranks, {}: {} collectives match", T::NAME, cases.len());
}

#[test]
fn every_collective_and_type_matches_a_host_reference() {
    let Some(nd) = devices() else { return };
    let mut rng = common::Rng::new("cuda_nccl collectives");
    for n in 2..=nd {
        check_type::<f32>(n, &mut rng);
        check_type::<f64>(n, &mut rng);
        check_type::<f16>(n, &mut rng);
        check_type::<bf16>(n, &mut rng);
        check_type::<i8>(n, &mut rng);
        check_type::<u8>(n, &mut rng);
        check_type::<i32>(n, &mut rng);
        check_type::<u32>(n, &mut rng);
        check_type::<i64>(n, &mut rng);
        check_type::<u64>(n, &mut rng);
    }
}

#[test]
fn group_calls_and_a_send_recv_ring() {
    let Some(nd) = devices() else { return };
    let mut rng = common::Rng::new("cuda_nccl groups");
    for n in 2..=nd {
        let count = 2 * rng.below(200) + 1;
        let xs: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(count, 1.0)).collect();
        let ys: Vec<Vec<i32>> = (0..n)
            .map(|_| (0..count).map(|_| rng.below(1000) as i32).collect())
            .collect();
        let got = world(n, false, |r| {
            let s = &r.stream;
            let x = s.clone_htod(&xs[r.rank]).unwrap();
            let y = s.clone_htod(&ys[r.rank]).unwrap();
            let mut sum = filled::<f32>(s, count);
            let mut max = filled::<i32>(s, count);
            let mut from_left = filled::<f32>(s, count);
            let (next, prev) = ((r.rank + 1) % r.n, (r.rank + r.n - 1) % r.n);
            {
                let (xv, yv) = (x.slice(..), y.slice(..));
                let (sv, mv, lv) = (
                    sum.slice_mut(..),
                    max.slice_mut(..),
                    from_left.slice_mut(..),
                );
                let xv2 = x.slice(..);
                let mut g = r.comm.group();
                g.all_reduce(xv, sv, &ReduceOp::Sum).unwrap();
                g.all_reduce(yv, mv, &ReduceOp::Max).unwrap();
                g.send(xv2, next as i32).unwrap();
                g.recv(lv, prev as i32).unwrap();
            }
            (
                s.clone_dtoh(&sum).unwrap(),
                s.clone_dtoh(&max).unwrap(),
                s.clone_dtoh(&from_left).unwrap(),
            )
        });
        for (rank, (sum, max, left)) in got.iter().enumerate() {
            let want_sum: Vec<(f64, f64)> = (0..count)
                .map(|i| reduce_ref(&xs.iter().map(|v| v[i]).collect::<Vec<_>>(), Op::Sum))
                .collect();
            compare(
                &format!("{n} ranks, group all-reduce sum, rank {rank}"),
                sum,
                &want_sum,
            );
            let want_max: Vec<i32> = (0..count)
                .map(|i| ys.iter().map(|v| v[i]).max().unwrap())
                .collect();
            assert_eq!(
                max, &want_max,
                "{n} ranks, group all-reduce max, rank {rank}"
            );
            assert_eq!(
                left,
                &xs[(rank + n - 1) % n],
                "{n} ranks, ring: rank {rank} must hold rank {}'s data",
                (rank + n - 1) % n
            );
        }
        println!("{n} ranks: group of 2 all-reduces + ring send/recv of {count} elements match");
    }
}

fn ptr<T>(s: &CudaSlice<T>, st: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(st);
    p
}

#[test]
fn one_thread_drives_every_device_in_place_and_pre_multiplied() {
    let Some(nd) = devices() else { return };
    let mut rng = common::Rng::new("cuda_nccl one thread");
    for n in 2..=nd {
        let count = 2 * rng.below(100) + 1;
        let ctxs: Vec<_> = (0..n).map(|i| CudaContext::new(i).unwrap()).collect();
        let streams: Vec<_> = ctxs.iter().map(|c| c.default_stream()).collect();
        let mut comms = vec![std::ptr::null_mut(); n];
        let devs: Vec<i32> = (0..n as i32).collect();
        unsafe { nr::comm_init_all(comms.as_mut_ptr(), n as i32, devs.as_ptr()) }.unwrap();
        for (i, &c) in comms.iter().enumerate() {
            assert_eq!(unsafe { nr::comm_count(c) }.unwrap(), n as i32);
            assert_eq!(unsafe { nr::comm_cu_device(c) }.unwrap(), i as i32);
            assert_eq!(unsafe { nr::comm_user_rank(c) }.unwrap(), i as i32);
        }
        // Inputs: all-gather blocks, reduce-scatter blocks, pre-multiplied-sum vectors.
        let gather: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(count, 1.0)).collect();
        let scatter: Vec<Vec<f64>> = (0..n)
            .map(|_| rng.vec(n * count, 1.0).iter().map(|&x| x as f64).collect())
            .collect();
        let pm: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(count, 1.0)).collect();
        let scal: Vec<f32> = (0..n).map(|r| 0.5 * (r + 1) as f32).collect();
        let mut gbuf = vec![];
        let mut sbuf = vec![];
        let mut pbuf = vec![];
        let mut pout = vec![];
        let mut ops = vec![];
        for r in 0..n {
            let st = &streams[r];
            let mut g = vec![77.0f32; n * count];
            g[r * count..(r + 1) * count].copy_from_slice(&gather[r]);
            gbuf.push(st.clone_htod(&g).unwrap());
            sbuf.push(st.clone_htod(&scatter[r]).unwrap());
            pbuf.push(st.clone_htod(&pm[r]).unwrap());
            pout.push(filled::<f32>(st, count));
            let mut op = ns::ncclRedOp_t::ncclSum;
            let mut s = scal[r];
            unsafe {
                nr::reduce_op_create_pre_mul_sum(
                    &mut op,
                    &mut s as *mut f32 as *mut c_void,
                    ns::ncclDataType_t::ncclFloat32,
                    ns::ncclScalarResidence_t::ncclScalarHostImmediate,
                    comms[r],
                )
            }
            .unwrap();
            ops.push(op);
        }
        nr::group_start().unwrap();
        for r in 0..n {
            let st = &streams[r];
            let cs = st.cu_stream() as ns::cudaStream_t;
            let g = ptr(&gbuf[r], st);
            let s = ptr(&sbuf[r], st);
            unsafe {
                // In place: the send block is the rank's own block of the receive buffer.
                nr::all_gather(
                    (g + (r * count * 4) as u64) as *const c_void,
                    g as *mut c_void,
                    count,
                    ns::ncclDataType_t::ncclFloat32,
                    comms[r],
                    cs,
                )
                .unwrap();
                nr::reduce_scatter(
                    s as *const c_void,
                    (s + (r * count * 8) as u64) as *mut c_void,
                    count,
                    ns::ncclDataType_t::ncclFloat64,
                    ns::ncclRedOp_t::ncclSum,
                    comms[r],
                    cs,
                )
                .unwrap();
                nr::all_reduce(
                    ptr(&pbuf[r], st) as *const c_void,
                    ptr(&pout[r], st) as *mut c_void,
                    count,
                    ns::ncclDataType_t::ncclFloat32,
                    ops[r],
                    comms[r],
                    cs,
                )
                .unwrap();
            }
        }
        nr::group_end().unwrap();
        let want_gather: Vec<f32> = gather.concat();
        for r in 0..n {
            let st = &streams[r];
            let g: Vec<f32> = st.clone_dtoh(&gbuf[r]).unwrap();
            assert_eq!(g, want_gather, "{n} ranks: in-place all-gather on rank {r}");
            let s: Vec<f64> = st.clone_dtoh(&sbuf[r]).unwrap();
            let want: Vec<(f64, f64)> = (0..count)
                .map(|i| {
                    let xs: Vec<f64> = scatter.iter().map(|v| v[r * count + i]).collect();
                    reduce_ref(&xs, Op::Sum)
                })
                .collect();
            compare(
                &format!("{n} ranks: in-place reduce-scatter, rank {r}"),
                &s[r * count..(r + 1) * count],
                &want,
            );
            let p: Vec<f32> = st.clone_dtoh(&pout[r]).unwrap();
            let want: Vec<(f64, f64)> = (0..count)
                .map(|i| {
                    let v: f64 = (0..n).map(|q| pm[q][i] as f64 * scal[q] as f64).sum();
                    let abs: f64 = (0..n).map(|q| (pm[q][i] * scal[q]).abs() as f64).sum();
                    (v, 2.0 * (n as f64 + 1.0) * f32::EPSILON as f64 * abs)
                })
                .collect();
            compare(
                &format!("{n} ranks: pre-multiplied sum, rank {r}"),
                &p,
                &want,
            );
        }
        for r in 0..n {
            unsafe { nr::reduce_op_destroy(ops[r], comms[r]) }.unwrap();
            unsafe { nr::comm_destroy(comms[r]) }.unwrap();
        }
        println!("{n} ranks from one thread: in-place all-gather, in-place reduce-scatter, pre-multiplied sum match");
    }
}

fn last_error(comm: ns::ncclComm_t) -> String {
    let p = unsafe { ns::ncclGetLastError(comm) };
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn ranks_that_disagree_on_a_count_get_an_error_not_a_hang() {
    let Some(_) = devices() else { return };
    let id = nr::get_uniqueid().unwrap();
    let out: Vec<(Result<(), ns::ncclResult_t>, ns::ncclResult_t, String)> =
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2usize)
                .map(|rank| {
                    s.spawn(move || {
                        let ctx = CudaContext::new(rank).unwrap();
                        let st = ctx.new_stream().unwrap();
                        let count = 5 + rank; // rank 1 sends one element more
                        let a = st.clone_htod(&vec![1.0f32; count]).unwrap();
                        let b = filled::<f32>(&st, count);
                        let mut comm = std::mem::MaybeUninit::uninit();
                        unsafe { nr::comm_init_rank(comm.as_mut_ptr(), 2, id, rank as i32) }
                            .unwrap();
                        let comm = unsafe { comm.assume_init() };
                        let r = unsafe {
                            nr::all_reduce(
                                ptr(&a, &st) as *const c_void,
                                ptr(&b, &st) as *mut c_void,
                                count,
                                ns::ncclDataType_t::ncclFloat32,
                                ns::ncclRedOp_t::ncclSum,
                                comm,
                                st.cu_stream() as ns::cudaStream_t,
                            )
                        };
                        // The rank whose call went through must not hang here.
                        st.synchronize().unwrap();
                        let got: Vec<f32> = st.clone_dtoh(&b).unwrap();
                        assert!(
                            got.iter().all(|&v| v == 77.0),
                            "rank {rank}: the cancelled all-reduce wrote {got:?}"
                        );
                        let mut asyncerr = ns::ncclResult_t::ncclSuccess;
                        unsafe { ns::ncclCommGetAsyncError(comm, &mut asyncerr) }
                            .result()
                            .unwrap();
                        let msg = last_error(comm);
                        unsafe { nr::comm_abort(comm) }.unwrap();
                        (r.map(|_| ()).map_err(|e| e.0), asyncerr, msg)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
    let errs: Vec<_> = out.iter().filter(|o| o.0.is_err()).collect();
    assert_eq!(
        errs.len(),
        1,
        "exactly the rank that called second gets the error: {:?}",
        out.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    assert_eq!(errs[0].0, Err(ns::ncclResult_t::ncclInvalidUsage));
    for (rank, (_, asyncerr, msg)) in out.iter().enumerate() {
        assert_eq!(*asyncerr, ns::ncclResult_t::ncclInvalidUsage, "rank {rank}");
        for part in ["ranks ", "disagree", "count 5 (rank 0)", "count 6 (rank 1)"] {
            assert!(msg.contains(part), "rank {rank}: {msg:?} lacks {part:?}");
        }
        println!("rank {rank}: {msg}");
    }
}

#[test]
fn buffers_that_are_not_the_ranks_device_memory_are_refused() {
    let Some(_) = devices() else { return };
    let ctxs: Vec<_> = (0..2).map(|i| CudaContext::new(i).unwrap()).collect();
    let st: Vec<_> = ctxs.iter().map(|c| c.new_stream().unwrap()).collect();
    let mut comms = vec![std::ptr::null_mut(); 2];
    unsafe { nr::comm_init_all(comms.as_mut_ptr(), 2, [0, 1].as_ptr()) }.unwrap();
    let on0 = st[0].clone_htod(&[1.0f32; 16]).unwrap();
    let on1 = st[1].clone_htod(&[1.0f32; 16]).unwrap();
    let call = |send: u64, recv: u64, count: usize| unsafe {
        nr::all_reduce(
            send as *const c_void,
            recv as *mut c_void,
            count,
            ns::ncclDataType_t::ncclFloat32,
            ns::ncclRedOp_t::ncclSum,
            comms[0],
            st[0].cu_stream() as ns::cudaStream_t,
        )
    };
    let (p0, p1) = (ptr(&on0, &st[0]), ptr(&on1, &st[1]));
    for (what, send, recv, count, expect) in [
        ("a buffer of device 1", p1, p0, 16, "memory of device 1"),
        (
            "a buffer past its end",
            p0,
            p0,
            17,
            "not inside one live device allocation",
        ),
        (
            "a host address",
            0x1000,
            p0,
            16,
            "not inside one live device allocation",
        ),
    ] {
        let r = call(send, recv, count);
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(ns::ncclResult_t::ncclInvalidArgument),
            "rank 0 given {what}"
        );
        let msg = last_error(comms[0]);
        for part in ["ncclAllReduce", "rank 0", expect] {
            assert!(msg.contains(part), "{what}: {msg:?} lacks {part:?}");
        }
        println!("{what}: {msg}");
    }
    // Nothing was queued: the communicators still work.
    for c in comms {
        unsafe { nr::comm_destroy(c) }.unwrap();
    }
}

const CHILD: &str = "TOOLN1_NCCL_TEST_CHILD";

#[test]
fn a_rank_that_never_arrives_is_reported_after_the_timeout() {
    let Some(_) = devices() else { return };
    let exe = std::env::current_exe().unwrap();
    let t = std::time::Instant::now();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "never_arriving_rank_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("TOOLN1_VGPU_NCCL_TIMEOUT_S", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "child: {} after {:.1} s\n{err}",
        out.status,
        t.elapsed().as_secs_f64()
    );
    assert!(!out.status.success(), "the child must abort, not finish");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("CHILD FINISHED"),
        "the child's stream synchronisation returned"
    );
    // A real NCCL hangs instead: this report is the virtual GPU's.
    if err.contains("[virtual GPU]") {
        for part in [
            "never completes",
            "collective #0",
            "rank 0 (device 0, ncclAllReduce(count 7, float32, sum))",
            "rank 1 (device 1) has not called it",
            "TOOLN1_VGPU_NCCL_TIMEOUT_S",
        ] {
            assert!(err.contains(part), "the report lacks {part:?}:\n{err}");
        }
    }
}

#[test]
#[ignore = "run in a child process by a_rank_that_never_arrives_is_reported_after_the_timeout"]
fn never_arriving_rank_child() {
    assert_eq!(
        std::env::var(CHILD).as_deref(),
        Ok("1"),
        "only run as a child"
    );
    let ctxs: Vec<_> = (0..2).map(|i| CudaContext::new(i).unwrap()).collect();
    let st = ctxs[0].new_stream().unwrap();
    let mut comms = vec![std::ptr::null_mut(); 2];
    unsafe { nr::comm_init_all(comms.as_mut_ptr(), 2, [0, 1].as_ptr()) }.unwrap();
    let a = st.clone_htod(&[1.0f32; 7]).unwrap();
    unsafe {
        nr::all_reduce(
            ptr(&a, &st) as *const c_void,
            ptr(&a, &st) as *mut c_void,
            7,
            ns::ncclDataType_t::ncclFloat32,
            ns::ncclRedOp_t::ncclSum,
            comms[0],
            st.cu_stream() as ns::cudaStream_t,
        )
    }
    .unwrap();
    // Rank 1 never calls it: this must not return.
    st.synchronize().unwrap();
    println!("CHILD FINISHED");
}
