//! The CUDA runtime under the backend: driver detection without panics, one context and compute
//! stream (plus copy streams for copies to and from page-locked memory, and side streams for
//! NCCL, [`SideStream`]), module loading (embedded fatbins or NVRTC), a caching device
//! allocator, kernel launches with error checks, cuBLAS handles and CUDA events.
//!
//! Everything here talks to the driver API through cudarc's raw `result`/`sys` layers, so the
//! backend controls every allocation (the caching pool) and every launch (one stream).

use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{result as dr, sys};

use crate::{Error, Result};

pub(crate) mod gen {
    include!(concat!(env!("OUT_DIR"), "/kernels_gen.rs"));
}

/// How the kernels were embedded at build time: "fatbin" (nvcc) or "nvrtc" (sources).
pub const KERNEL_KIND: &str = gen::KIND;
/// The ptxas resource report of this build (empty when the build had no nvcc).
pub const PTXAS_REPORT: &str = gen::PTXAS_REPORT;
/// Whether this build's kernels were compiled by the pinned nvcc of tools/setup-cuda.sh (the
/// toolchain docs/ptxas-report.md comes from).
pub const NVCC_PINNED: bool = gen::NVCC_PINNED;

/// Device-side error bits (kernels/common.cuh).
pub(crate) const ERR_EMBED_ID: u32 = 1;
pub(crate) const ERR_TARGET_ID: u32 = 2;
pub(crate) const ERR_KV_ROW: u32 = 4;
pub(crate) const ERR_DECODE_LEN: u32 = 8;
pub(crate) const ERR_SAMPLE_LOGIT: u32 = 16;
pub(crate) const ERR_GRPO_SEQ: u32 = 32;
pub(crate) const ERR_GRPO_MASK: u32 = 64;
pub(crate) const ERR_DECODE_BLOCK: u32 = 128;
pub(crate) const ERR_SAMPLE_ROW: u32 = 256;

pub(crate) fn drv(what: &str, e: dr::DriverError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

pub(crate) fn blas(what: &str, e: cudarc::cublas::result::CublasError) -> Error {
    Error::Cuda(format!("{what}: cuBLAS error {:?}", e.0))
}

/// Element types a device buffer can hold.
pub trait Elem: Copy + 'static {
    const SIZE: usize;
}
/// bf16 stored as its 16-bit pattern.
#[derive(Clone, Copy, Debug)]
pub struct Bf16;
impl Elem for Bf16 {
    const SIZE: usize = 2;
}
impl Elem for f32 {
    const SIZE: usize = 4;
}
impl Elem for u32 {
    const SIZE: usize = 4;
}
impl Elem for f64 {
    const SIZE: usize = 8;
}

/// The caching device allocator: size classes (powers of two up to 1 MiB, then multiples of
/// 2 MiB) with a free list each. A dropped buffer returns to its list and is handed out again
/// to the next request of the same class, so after warm-up a training step allocates nothing
/// from the driver. Reuse is safe because every kernel runs on the pool's single stream: work
/// queued after the reuse runs after the work queued before it (a copy on the copy stream,
/// `Gpu::htod_pinned`, first waits for the work queued so far, and the compute stream waits for
/// the copy before reading its buffer, so it keeps that order; a buffer a [`SideStream`] uses is
/// dropped only after the compute stream has waited for that work). Freeing a block back to the
/// driver is not ordered by the stream, so [`Pool::trim`] waits for the stream first (work
/// still queued may read or write a cached block). The pool owns the stream and destroys it
/// last, after every buffer (each holds the pool) is gone.
pub struct Pool {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    free: Mutex<BTreeMap<usize, Vec<sys::CUdeviceptr>>>,
    stats: Mutex<PoolStats>,
    /// `TOOLN1_CUDA_POOL=exact`: every buffer is its own driver allocation of exactly the
    /// requested size, freed when dropped (no size classes, no caching), so that an access past
    /// a buffer's end reaches the end of its allocation, where a memory checker (the virtual
    /// GPU's guard pages or AddressSanitizer build, compute-sanitizer on a GPU) reports it.
    exact: bool,
    /// CUDA graphs' private arenas (`graph.rs`).
    pub(super) arenas: Mutex<super::graph::ArenaState>,
}

/// Counters of the caching allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Allocations served by the driver (cuMemAlloc).
    pub driver_allocs: u64,
    /// Allocations served from a free list.
    pub reuses: u64,
    /// Bytes currently held from the driver (in use or cached).
    pub bytes_held: u64,
    /// Bytes of the blocks handed out and not yet returned (at their size classes).
    pub bytes_in_use: u64,
    /// Bytes the live buffers asked for (before rounding to a size class).
    pub bytes_requested: u64,
    /// The largest `bytes_held` since the last [`Pool::reset_peak`], and `bytes_in_use` and
    /// `bytes_requested` at that moment.
    pub peak_held: u64,
    pub in_use_at_peak: u64,
    pub requested_at_peak: u64,
    /// The largest `bytes_in_use` since the last [`Pool::reset_peak`].
    pub peak_in_use: u64,
}

impl PoolStats {
    fn took(&mut self, class: u64, bytes: u64, from_driver: bool) {
        if from_driver {
            self.driver_allocs += 1;
            self.bytes_held += class;
        } else {
            self.reuses += 1;
        }
        self.bytes_in_use += class;
        self.bytes_requested += bytes;
        self.peak_in_use = self.peak_in_use.max(self.bytes_in_use);
        if self.bytes_held > self.peak_held {
            self.peak_held = self.bytes_held;
            self.in_use_at_peak = self.bytes_in_use;
            self.requested_at_peak = self.bytes_requested;
        }
    }
}

// SAFETY: the raw context handle is only used to make it current before freeing; the free
// lists are behind a mutex.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

/// Bytes the caching pool takes from the driver for a request of `bytes`: a power of two up to
/// 1 MiB (at least 256 B), above that a multiple of 2 MiB (the memory planner counts the same).
pub fn size_class(bytes: usize) -> usize {
    let b = bytes.max(256);
    if b <= 1 << 20 {
        b.next_power_of_two()
    } else {
        b.div_ceil(2 << 20) * (2 << 20)
    }
}

impl Pool {
    fn alloc_bytes(&self, bytes: usize) -> Result<(sys::CUdeviceptr, usize)> {
        if let Some(got) = self.arena_alloc(bytes)? {
            return Ok(got);
        }
        let class = if self.exact {
            bytes.max(1)
        } else {
            size_class(bytes)
        };
        let took = |class: usize, driver: bool| {
            if let Ok(mut s) = self.stats.lock() {
                s.took(class as u64, bytes as u64, driver);
            }
        };
        if self.exact {
            // Nothing cached to trim: the driver's answer is final.
            let p = unsafe { dr::malloc_sync(class) }.map_err(|e| {
                Error::Cuda(format!(
                    "cuMemAlloc of {class} bytes failed: {e} (device memory exhausted?)"
                ))
            })?;
            took(class, true);
            return Ok((p, class));
        }
        if let Some(p) = self
            .free
            .lock()
            .map_err(|_| Error::msg("allocator lock poisoned"))?
            .get_mut(&class)
            .and_then(|v| v.pop())
        {
            took(class, false);
            return Ok((p, class));
        }
        // SAFETY: the pool's context is current on this thread (set by the caller's bind()).
        let p = match unsafe { dr::malloc_sync(class) } {
            Ok(p) => p,
            Err(_) => {
                // Out of memory: give the cached blocks back to the driver (after the queued
                // work that may still use them) and try once more.
                self.trim()?;
                unsafe { dr::malloc_sync(class) }.map_err(|e| {
                    Error::Cuda(format!(
                        "cuMemAlloc of {class} bytes failed: {e} (device memory exhausted?)"
                    ))
                })?
            }
        };
        took(class, true);
        Ok((p, class))
    }

    fn release(&self, ptr: sys::CUdeviceptr, class: usize, bytes: usize) {
        if let Ok(mut s) = self.stats.lock() {
            s.bytes_in_use -= class as u64;
            s.bytes_requested -= bytes as u64;
        }
        if self.arena_release(ptr, class) {
            return;
        }
        self.give_back(ptr, class);
    }

    /// The context and compute stream the pool's buffers are ordered by.
    pub(super) fn ctx(&self) -> sys::CUcontext {
        self.ctx
    }
    pub(super) fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// Counts a block handed out (`from_driver`: a new driver allocation).
    pub(super) fn count_took(&self, class: usize, bytes: usize, from_driver: bool) {
        if let Ok(mut s) = self.stats.lock() {
            s.took(class as u64, bytes as u64, from_driver);
        }
    }

    /// An unused block back to its free list (exact mode: to the driver).
    pub(super) fn give_back(&self, ptr: sys::CUdeviceptr, class: usize) {
        if self.exact {
            // cuMemFree waits for the work that may still use the buffer.
            unsafe {
                if dr::ctx::set_current(self.ctx).is_ok() && dr::free_sync(ptr).is_ok() {
                    if let Ok(mut s) = self.stats.lock() {
                        s.bytes_held -= class as u64;
                    }
                }
            }
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            f.entry(class).or_default().push(ptr);
        }
    }

    /// Starts a new peak of [`PoolStats::peak_held`] from the bytes held now.
    pub fn reset_peak(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.peak_held = s.bytes_held;
            s.in_use_at_peak = s.bytes_in_use;
            s.requested_at_peak = s.bytes_requested;
            s.peak_in_use = s.bytes_in_use;
        }
    }

    /// Frees every cached (unused) block, after waiting for the work queued on the stream (a
    /// block returned to the pool may still be read or written by it).
    pub fn trim(&self) -> Result<()> {
        let mut f = self
            .free
            .lock()
            .map_err(|_| Error::msg("allocator lock poisoned"))?;
        unsafe { dr::ctx::set_current(self.ctx) }.map_err(|e| drv("cuCtxSetCurrent", e))?;
        unsafe { dr::stream::synchronize(self.stream) }
            .map_err(|e| drv("cuStreamSynchronize (before freeing cached blocks)", e))?;
        let mut freed = 0u64;
        for (class, list) in f.iter_mut() {
            for p in list.drain(..) {
                unsafe { dr::free_sync(p) }.map_err(|e| drv("cuMemFree", e))?;
                freed += *class as u64;
            }
        }
        if let Ok(mut s) = self.stats.lock() {
            s.bytes_held -= freed;
        }
        Ok(())
    }

    /// Whether buffers are exact-size driver allocations (`TOOLN1_CUDA_POOL=exact`).
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    pub fn stats(&self) -> PoolStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.trim();
        // SAFETY: the last user of the stream is gone (every buffer and the Gpu hold the pool).
        unsafe {
            let _ = dr::stream::destroy(self.stream);
        }
    }
}

/// A device buffer of `len` elements of `E`, owned by the caching pool.
pub struct CudaBuf<E: Elem> {
    ptr: sys::CUdeviceptr,
    class: usize,
    len: usize,
    pool: Arc<Pool>,
    _e: PhantomData<E>,
}

// SAFETY: a device pointer is a plain integer; all access goes through the backend's stream.
unsafe impl<E: Elem> Send for CudaBuf<E> {}
unsafe impl<E: Elem> Sync for CudaBuf<E> {}

impl<E: Elem> CudaBuf<E> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Device address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        self.ptr + (i * E::SIZE) as u64
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Element `i` onwards as a kernel input.
    pub fn view(&self, i: usize) -> In<'_, E> {
        debug_assert!(i <= self.len.max(1), "view at {i} of {} elements", self.len);
        In {
            addr: self.at(i),
            _buf: PhantomData,
        }
    }
    /// Element `i` onwards as a kernel output.
    pub fn view_mut(&mut self, i: usize) -> Out<'_, E> {
        debug_assert!(i <= self.len.max(1), "view at {i} of {} elements", self.len);
        Out {
            addr: self.at(i),
            _buf: PhantomData,
        }
    }
}

impl<E: Elem> crate::backend::check::Buf for CudaBuf<E> {
    fn len(&self) -> usize {
        self.len
    }
}

impl<E: Elem> std::fmt::Debug for CudaBuf<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuf<{}>[{}] @ {:#x}",
            std::any::type_name::<E>(),
            self.len,
            self.ptr
        )
    }
}

impl<E: Elem> Drop for CudaBuf<E> {
    fn drop(&mut self) {
        self.pool
            .release(self.ptr, self.class, self.len.max(1) * E::SIZE);
    }
}

/// A device pointer to `const E` as a kernel parameter: the buffer (or the element of it) a
/// kernel reads. Built from `&CudaBuf<E>`, or with [`CudaBuf::view`] at an offset.
#[derive(Clone, Copy)]
pub struct In<'a, E: Elem> {
    addr: u64,
    _buf: PhantomData<&'a CudaBuf<E>>,
}

/// A device pointer to `E` as a kernel parameter: the buffer (or the element of it) a kernel
/// writes. Built from `&mut CudaBuf<E>`, with [`CudaBuf::view_mut`] at an offset, or
/// [`Out::null`] where the kernel takes a null pointer for "no output".
pub struct Out<'a, E: Elem> {
    addr: u64,
    _buf: PhantomData<&'a mut CudaBuf<E>>,
}

impl<E: Elem> In<'_, E> {
    pub(crate) fn addr(self) -> u64 {
        self.addr
    }
}

impl<'a, E: Elem> Out<'a, E> {
    /// The null pointer (an optional output the kernel skips).
    pub(crate) fn null() -> Out<'a, E> {
        Out {
            addr: 0,
            _buf: PhantomData,
        }
    }
    pub(crate) fn addr(self) -> u64 {
        self.addr
    }
}

impl<'a, E: Elem> From<&'a CudaBuf<E>> for In<'a, E> {
    fn from(b: &'a CudaBuf<E>) -> Self {
        b.view(0)
    }
}

impl<'a, E: Elem> From<&'a mut CudaBuf<E>> for Out<'a, E> {
    fn from(b: &'a mut CudaBuf<E>) -> Self {
        b.view_mut(0)
    }
}

impl<'a, E: Elem> From<Option<&'a mut CudaBuf<E>>> for Out<'a, E> {
    fn from(b: Option<&'a mut CudaBuf<E>>) -> Self {
        b.map_or_else(Out::null, |b| b.view_mut(0))
    }
}

/// Grid, block and dynamic shared memory of one kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

impl Launch {
    /// `grid` blocks of `threads` threads, no dynamic shared memory.
    pub fn new(grid: (u32, u32, u32), threads: u32) -> Launch {
        Launch {
            grid,
            block: (threads, 1, 1),
            smem: 0,
        }
    }
}

/// The most parameters a kernel may have (build.rs refuses more).
const MAX_KERNEL_PARAMS: usize = 24;

/// A CUDA event pair for timing work on the backend's stream.
pub struct Timer {
    start: sys::CUevent,
    stop: sys::CUevent,
    stream: sys::CUstream,
}

impl Timer {
    pub fn start(&self) -> Result<()> {
        unsafe { dr::event::record(self.start, self.stream) }.map_err(|e| drv("cuEventRecord", e))
    }
    /// Records the stop event, waits for it and returns the elapsed milliseconds.
    pub fn stop_ms(&self) -> Result<f32> {
        unsafe {
            dr::event::record(self.stop, self.stream).map_err(|e| drv("cuEventRecord", e))?;
            dr::event::synchronize(self.stop).map_err(|e| drv("cuEventSynchronize", e))?;
            dr::event::elapsed(self.start, self.stop).map_err(|e| drv("cuEventElapsedTime", e))
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        unsafe {
            let _ = dr::event::destroy(self.start);
            let _ = dr::event::destroy(self.stop);
        }
    }
}

/// The shape of a [`Gpu::gemm`] in cuBLAS's column-major terms: op(A)[m,k] · op(B)[k,n], A
/// transposed when `ta`, B when `tb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlasGemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// A [`Gpu::gemm`] operand: device address and leading dimension (column-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
}

/// Page-locked host memory of `len` values of `E` (cuMemHostAlloc), freed after the copy streams are idle, so a queued copy never reaches freed memory.
pub struct Pinned<E> {
    ptr: *mut E,
    len: usize,
    gpu: Arc<Gpu>,
}

/// Page-locked bytes (the streamed reference's layers).
pub type PinnedMem = Pinned<u8>;
/// Page-locked f32 values (the host optimizer's state and staging).
pub type PinnedF32 = Pinned<f32>;

// SAFETY: plain host memory owned by this value (`&mut` access only through `&mut self`).
unsafe impl<E: Send> Send for Pinned<E> {}
unsafe impl<E: Sync> Sync for Pinned<E> {}

impl<E> Pinned<E> {
    fn slice(&self) -> &[E] {
        // SAFETY: `ptr` holds `len` initialised values for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl crate::backend::HostMem for Pinned<u8> {
    fn bytes(&self) -> &[u8] {
        self.slice()
    }
    fn pinned(&self) -> bool {
        true
    }
}

impl crate::backend::HostF32Mem for Pinned<f32> {
    fn as_slice(&self) -> &[f32] {
        self.slice()
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `slice`, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn pinned(&self) -> bool {
        true
    }
}

impl<E> Drop for Pinned<E> {
    fn drop(&mut self) {
        unsafe {
            let _ = dr::ctx::set_current(self.gpu.ctx);
            let _ = dr::stream::synchronize(self.gpu.copy_stream);
            let _ = dr::stream::synchronize(self.gpu.down_stream);
            let _ = dr::free_host(self.ptr as *mut c_void);
        }
    }
}

/// Most bytes of upload sources [`Gpu::htod_owned`] keeps before it waits for the stream.
pub const KEPT_MAX_BYTES: usize = 256 << 20;

/// The direction of a [`Gpu::copy_async`] copy, which picks its copy stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDir {
    ToDevice,
    ToHost,
}

/// The completion event of a copy queued on a copy stream ([`Gpu::copy_async`]).
pub struct CopyEvent {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    event: sys::CUevent,
}

// SAFETY: driver handles; every use binds the context first.
unsafe impl Send for CopyEvent {}

impl crate::backend::CopyDone for CopyEvent {
    fn order(&mut self) -> Result<()> {
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        unsafe {
            dr::ctx::set_current(self.ctx)
                .and_then(|_| dr::stream::wait_event(self.stream, self.event, wait))
        }
        .map_err(|e| drv("cuStreamWaitEvent", e))
    }
    fn wait(self: Box<Self>) -> Result<()> {
        unsafe { dr::ctx::set_current(self.ctx).and_then(|_| dr::event::synchronize(self.event)) }
            .map_err(|e| drv("asynchronous copy (cuEventSynchronize)", e))
    }
}

impl Drop for CopyEvent {
    fn drop(&mut self) {
        unsafe {
            let _ = dr::ctx::set_current(self.ctx);
            let _ = dr::event::destroy(self.event);
        }
    }
}

/// Context, stream, modules, cuBLAS handle and allocator of one device.
pub struct Gpu {
    pub(crate) ctx: sys::CUcontext,
    pub(crate) stream: sys::CUstream,
    /// The stream of asynchronous copies to and from page-locked memory (streamed layers, the
    /// host optimizer; `Gpu::copy_async`): each copy waits for
    /// an event of `stream` recorded when it is issued, and `stream` waits for the copy's event
    /// before using its buffer, so pool blocks are never shared unordered between the two.
    copy_stream: sys::CUstream,
    /// The stream of asynchronous device-to-host copies into page-locked memory (the host
    /// optimizer's gradient downloads), ordered like `copy_stream`, so that downloads and
    /// uploads can run at once (on separate copy engines).
    down_stream: sys::CUstream,
    /// Host sources of uploads queued on `stream` ([`Gpu::htod_owned`]), kept until the stream
    /// is known to have run past them, and their bytes.
    kept: Mutex<(Vec<Box<dyn std::any::Any + Send>>, usize)>,
    pub(crate) blas: Mutex<cublas_sys::cublasHandle_t>,
    modules: Vec<sys::CUmodule>,
    /// The function handle of every kernel, by its index in `gen::KERNELS` (resolved at load).
    funcs: Vec<sys::CUfunction>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) err_flag: CudaBuf<u32>,
    pub(crate) sync_each: bool,
    /// The compute stream is being captured into a graph (`graph.rs`): no synchronisation
    /// after each op then (the driver forbids it during capture).
    pub(crate) capturing: std::sync::atomic::AtomicBool,
    pub name: String,
    pub cc: (i32, i32),
    /// The device's index among the visible devices.
    pub ordinal: usize,
}

// SAFETY: raw handles, read-only after loading; cuBLAS calls are behind a mutex, every op binds
// the context to the calling thread before touching the driver.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

fn no_cuda(msg: impl Into<String>) -> Error {
    Error::NoCuda(msg.into())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    format!("the CUDA driver library failed while loading: {msg}")
}

/// Whether device `ordinal` exists: `Error::NoCuda` when the driver library is absent or the
/// driver reports no device (cuInit's CUDA_ERROR_NO_DEVICE, the toolkit's stub library, a
/// device count of 0); `Error::Cuda` for any other driver failure; `Error::Invalid` for an
/// ordinal beyond the devices present. Call inside `catch_unwind` (cudarc panics when an entry
/// point is missing from the library).
fn probe(ordinal: usize) -> Result<()> {
    // cudarc panics on first use when the library cannot be loaded: check for it first.
    if !unsafe { sys::is_culib_present() } {
        return Err(no_cuda(
            "the CUDA driver library (libcuda.so) is not installed on this machine",
        ));
    }
    dr::init().map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE | sys::CUresult::CUDA_ERROR_STUB_LIBRARY => {
            no_cuda(format!("cuInit: {e}"))
        }
        _ => drv("cuInit", e),
    })?;
    let count = dr::device::get_count().map_err(|e| drv("cuDeviceGetCount", e))?;
    if count <= 0 {
        return Err(no_cuda("the driver reports no CUDA device"));
    }
    if ordinal >= count as usize {
        return Err(Error::Invalid(format!(
            "CUDA device {ordinal} requested, {count} present"
        )));
    }
    Ok(())
}

/// The number of CUDA devices visible to this process (CUDA_VISIBLE_DEVICES applies);
/// `Error::NoCuda` without a driver or a device, as [`Gpu::open`] reports it.
pub fn device_count() -> Result<usize> {
    std::panic::catch_unwind(|| -> Result<usize> {
        probe(0)?;
        let count = dr::device::get_count().map_err(|e| drv("cuDeviceGetCount", e))?;
        Ok(count.max(0) as usize)
    })
    .unwrap_or_else(|p| Err(Error::Cuda(panic_text(p.as_ref()))))
}

/// (free, total) bytes of device `ordinal`, probed the same way as [`Gpu::open`] (so the same
/// `Error::NoCuda` / `Error::Cuda` split) through its primary context.
pub fn device_memory(ordinal: usize) -> Result<(u64, u64)> {
    std::panic::catch_unwind(|| -> Result<(u64, u64)> {
        probe(ordinal)?;
        let dev = dr::device::get(ordinal as i32).map_err(|e| drv("cuDeviceGet", e))?;
        let ctx = unsafe { dr::primary_ctx::retain(dev) }
            .map_err(|e| drv("cuDevicePrimaryCtxRetain", e))?;
        let info = unsafe { dr::ctx::set_current(ctx) }
            .map_err(|e| drv("cuCtxSetCurrent", e))
            .and_then(|_| dr::mem_get_info().map_err(|e| drv("cuMemGetInfo", e)));
        // Balance the retain (a Cuda backend on this device holds its own reference).
        let _ = std::panic::catch_unwind(|| unsafe { dr::primary_ctx::release(dev) });
        info.map(|(f, t)| (f as u64, t as u64))
    })
    .unwrap_or_else(|p| Err(Error::Cuda(panic_text(p.as_ref()))))
}

impl Gpu {
    /// Opens device `ordinal`. Never panics. `Error::NoCuda` means exactly "this machine has
    /// no CUDA device": the driver library is absent, or the driver reports no device. Anything
    /// else that goes wrong next to a working driver (a too-old driver missing an entry point,
    /// cuBLAS not found, a kernel module that does not load) is `Error::Cuda`, so that a broken
    /// GPU setup is never mistaken for a machine without a GPU.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        std::panic::catch_unwind(|| {
            probe(ordinal)?;
            if !unsafe { cublas_sys::is_culib_present() } {
                return Err(Error::Cuda(
                    "libcublas.so was not found next to a working CUDA driver (set \
                     LD_LIBRARY_PATH to the CUDA 13 libraries)"
                        .into(),
                ));
            }
            Self::open_inner(ordinal)
        })
        .unwrap_or_else(|p| Err(Error::Cuda(panic_text(p.as_ref()))))
    }

    fn open_inner(ordinal: usize) -> Result<Gpu> {
        let dev = dr::device::get(ordinal as i32).map_err(|e| drv("cuDeviceGet", e))?;
        let name = dr::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        let cc = unsafe {
            let major = dr::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .map_err(|e| drv("cuDeviceGetAttribute", e))?;
            let minor = dr::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )
            .map_err(|e| drv("cuDeviceGetAttribute", e))?;
            (major, minor)
        };
        let ctx = unsafe { dr::primary_ctx::retain(dev) }
            .map_err(|e| drv("cuDevicePrimaryCtxRetain", e))?;
        unsafe { dr::ctx::set_current(ctx) }.map_err(|e| drv("cuCtxSetCurrent", e))?;
        let stream = dr::stream::create(dr::stream::StreamKind::NonBlocking)
            .map_err(|e| drv("cuStreamCreate", e))?;
        // From here on the pool owns the stream (and destroys it, also on an early return).
        let pool = Arc::new(Pool {
            ctx,
            stream,
            free: Mutex::new(BTreeMap::new()),
            stats: Mutex::new(PoolStats::default()),
            exact: std::env::var("TOOLN1_CUDA_POOL").is_ok_and(|v| v == "exact"),
            arenas: Default::default(),
        });
        let handle =
            cudarc::cublas::result::create_handle().map_err(|e| blas("cublasCreate", e))?;
        unsafe { cudarc::cublas::result::set_stream(handle, stream as _) }
            .map_err(|e| blas("cublasSetStream", e))?;

        let mut gpu_modules = Vec::with_capacity(gen::MODULES.len());
        for (name, image) in gen::MODULES {
            gpu_modules.push((*name, load_module(name, image, cc)?));
        }
        let funcs = gen::KERNELS
            .iter()
            .map(|(module, name)| {
                let m = gpu_modules
                    .iter()
                    .find(|(n, _)| n == module)
                    .map(|(_, m)| *m)
                    .ok_or_else(|| {
                        Error::Cuda(format!(
                            "kernel module `{module}` is not embedded (kernels/{module}.cu)"
                        ))
                    })?;
                let cname = CString::new(*name)
                    .map_err(|_| Error::Cuda(format!("kernel name {name:?}")))?;
                unsafe { dr::module::get_function(m, cname) }
                    .map_err(|e| drv(&format!("kernel `{name}` in kernels/{module}.cu"), e))
            })
            .collect::<Result<Vec<_>>>();
        let modules: Vec<sys::CUmodule> = gpu_modules.into_iter().map(|(_, m)| m).collect();
        let funcs = match funcs {
            Ok(f) => f,
            Err(e) => {
                for m in modules {
                    let _ = unsafe { dr::module::unload(m) };
                }
                return Err(e);
            }
        };
        let (p, class) = pool.alloc_bytes(4)?;
        unsafe { dr::memset_d8_async(p, 0, 4, stream) }.map_err(|e| drv("cuMemsetD8Async", e))?;
        let err_flag = CudaBuf {
            ptr: p,
            class,
            len: 1,
            pool: pool.clone(),
            _e: PhantomData,
        };
        let sync_each =
            cfg!(debug_assertions) || std::env::var("TOOLN1_CUDA_SYNC").is_ok_and(|v| v == "1");
        let copy_stream = dr::stream::create(dr::stream::StreamKind::NonBlocking)
            .map_err(|e| drv("cuStreamCreate", e))?;
        let down_stream = match dr::stream::create(dr::stream::StreamKind::NonBlocking) {
            Ok(s) => s,
            Err(e) => {
                unsafe {
                    let _ = dr::stream::destroy(copy_stream);
                }
                return Err(drv("cuStreamCreate", e));
            }
        };
        Ok(Gpu {
            ctx,
            stream,
            copy_stream,
            down_stream,
            kept: Mutex::new((Vec::new(), 0)),
            blas: Mutex::new(handle),
            modules,
            funcs,
            pool,
            err_flag,
            sync_each,
            capturing: Default::default(),
            name,
            cc,
            ordinal,
        })
    }

    /// The device-side error flag word as a kernel output (kernels/common.cuh `ERR_*` bits).
    pub(crate) fn err(&self) -> Out<'_, u32> {
        Out {
            addr: self.err_flag.ptr,
            _buf: PhantomData,
        }
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        unsafe { dr::ctx::set_current(self.ctx) }.map_err(|e| drv("cuCtxSetCurrent", e))
    }

    pub fn alloc<E: Elem>(&self, len: usize) -> Result<CudaBuf<E>> {
        self.bind()?;
        let (ptr, class) = self.pool.alloc_bytes(len.max(1) * E::SIZE)?;
        Ok(CudaBuf {
            ptr,
            class,
            len,
            pool: self.pool.clone(),
            _e: PhantomData,
        })
    }

    pub fn alloc_zeros<E: Elem>(&self, len: usize) -> Result<CudaBuf<E>> {
        let b = self.alloc::<E>(len)?;
        self.memset_zero(b.ptr, len * E::SIZE)?;
        Ok(b)
    }

    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { dr::memset_d8_async(ptr, 0, bytes, self.stream) }
            .map_err(|e| drv("cuMemsetD8Async", e))
    }

    /// A device buffer holding a copy of `data` ([`Gpu::htod_owned`] of a copy of it).
    pub fn htod<E: Elem, H: Copy + Send + 'static>(&self, data: &[H]) -> Result<CudaBuf<E>> {
        self.htod_owned(data.to_vec())
    }

    /// Copies `n` elements from device address `src` to the host (waits for the stream).
    pub fn dtoh<H: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<H>> {
        self.bind()?;
        let mut v = vec![H::default(); n];
        if n > 0 {
            unsafe { dr::memcpy_dtoh_async(&mut v[..], src, self.stream) }
                .map_err(|e| drv("cuMemcpyDtoHAsync", e))?;
        }
        self.sync()?;
        Ok(v)
    }

    /// `data` in page-locked host memory (cuMemHostAlloc, portable to every context).
    pub fn pinned(self: &Arc<Self>, data: &[u8]) -> Result<PinnedMem> {
        let p = self.pinned_alloc::<u8>(data.len())?;
        // SAFETY: `p` holds data.len() writable bytes just allocated.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.ptr, data.len()) };
        Ok(p)
    }

    /// Room for `n` values of `E` in page-locked host memory (portable to every context),
    /// not yet initialised: the caller writes all of it before anything reads it.
    fn pinned_alloc<E: Copy>(self: &Arc<Self>, n: usize) -> Result<Pinned<E>> {
        self.bind()?;
        let size = std::mem::size_of::<E>();
        let bytes = n
            .checked_mul(size)
            .ok_or_else(|| Error::Invalid(format!("page-locked buffer of {n} x {size} bytes")))?;
        let ptr = unsafe { dr::malloc_host(bytes.max(size), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|e| drv("cuMemHostAlloc", e))? as *mut E;
        Ok(Pinned {
            ptr,
            len: n,
            gpu: self.clone(),
        })
    }

    // ---- copies beside queued work: owned upload sources, page-locked memory, the copy stream

    /// A device buffer holding `data`, copied on the compute stream. `data` is kept alive until
    /// the stream is known to have run past the copy (the next [`Gpu::sync`], or a stream
    /// synchronisation once more than [`KEPT_MAX_BYTES`] are kept): a driver that reads the host
    /// memory only when the copy runs (page-locked memory; every host buffer under the virtual
    /// GPU's `TOOLN1_VGPU_ASYNC=strict`) never reads freed memory. (The real driver stages
    /// pageable memory at the call, CUDA Runtime API, "API synchronization behavior".)
    pub fn htod_owned<E: Elem, H: Copy + Send + 'static>(
        &self,
        data: Vec<H>,
    ) -> Result<CudaBuf<E>> {
        debug_assert_eq!(std::mem::size_of::<H>(), E::SIZE);
        let b = self.alloc::<E>(data.len())?;
        self.htod_into_owned(b.ptr, data)?;
        Ok(b)
    }

    /// `data` copied to device address `dst` (which must hold it) on the compute stream, `data`
    /// kept alive as [`Gpu::htod_owned`] keeps it.
    pub fn htod_into_owned<H: Copy + Send + 'static>(&self, dst: u64, data: Vec<H>) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        unsafe { dr::memcpy_htod_async(dst, &data[..], self.stream) }
            .map_err(|e| drv("cuMemcpyHtoDAsync", e))?;
        let bytes = std::mem::size_of_val(&data[..]);
        let full = {
            let mut k = self
                .kept
                .lock()
                .map_err(|_| Error::Cuda("the kept upload sources: a poisoned lock".into()))?;
            k.0.push(Box::new(data));
            k.1 += bytes;
            if k.1 > KEPT_MAX_BYTES {
                k.1 = 0;
                std::mem::take(&mut k.0)
            } else {
                Vec::new()
            }
        };
        if !full.is_empty() {
            let r = unsafe { dr::stream::synchronize(self.stream) };
            if r.is_err() {
                // As in `sync`: leaked rather than freed under copies that may not have run.
                std::mem::forget(full);
            }
            r.map_err(|e| drv("cuStreamSynchronize", e))?;
        }
        Ok(())
    }

    /// The kept upload sources, taken out before a stream synchronisation (their copies were
    /// queued before this call, so the synchronisation covers them; a source kept by another
    /// thread meanwhile stays) and dropped after it.
    fn take_kept(&self) -> Vec<Box<dyn std::any::Any + Send>> {
        match self.kept.lock() {
            Ok(mut k) => {
                k.1 = 0;
                std::mem::take(&mut k.0)
            }
            Err(_) => Vec::new(),
        }
    }

    /// `n` f32 zeros in page-locked host memory (cuMemHostAlloc, portable to every context).
    pub fn pinned_f32(self: &Arc<Self>, n: usize) -> Result<PinnedF32> {
        let p = self.pinned_alloc::<f32>(n)?;
        // SAFETY: `p` holds `n` f32 (page-aligned) just allocated.
        unsafe { std::ptr::write_bytes(p.ptr, 0, n) };
        Ok(p)
    }

    /// Queues `copy` on the copy stream of direction `dir` after the work queued on the compute
    /// stream so far (an event of the compute stream that the copy stream waits for), and
    /// returns the copy's completion event.
    pub fn copy_async(
        &self,
        dir: CopyDir,
        copy: impl FnOnce(sys::CUstream) -> std::result::Result<(), dr::DriverError>,
    ) -> Result<CopyEvent> {
        let cs = match dir {
            CopyDir::ToDevice => self.copy_stream,
            CopyDir::ToHost => self.down_stream,
        };
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let issued = dr::event::create(flags).map_err(|e| drv("cuEventCreate", e))?;
        let copied = match dr::event::create(flags) {
            Ok(e) => e,
            Err(e) => {
                unsafe {
                    let _ = dr::event::destroy(issued);
                }
                return Err(drv("cuEventCreate", e));
            }
        };
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        let queued = unsafe {
            dr::event::record(issued, self.stream)
                .and_then(|_| dr::stream::wait_event(cs, issued, wait))
                .and_then(|_| copy(cs))
                .and_then(|_| dr::event::record(copied, cs))
        };
        unsafe {
            let _ = dr::event::destroy(issued);
        }
        let ev = CopyEvent {
            ctx: self.ctx,
            stream: self.stream,
            event: copied,
        };
        queued.map_err(|e| drv("asynchronous copy on the copy stream", e))?;
        Ok(ev)
    }

    /// Queue a copy of `bytes` bytes from page-locked `src` to device address `dst` on the copy
    /// stream, after the work queued on the compute stream so far; the returned wait makes the
    /// compute stream wait for the copy.
    pub fn htod_pinned(&self, dst: u64, src: &[u8]) -> Result<Box<dyn FnOnce() -> Result<()>>> {
        let mut ev = self.copy_async(CopyDir::ToDevice, |s| unsafe {
            dr::memcpy_htod_async(dst, src, s)
        })?;
        Ok(Box::new(move || crate::backend::CopyDone::order(&mut ev)))
    }

    pub fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(|e| drv("cuMemcpyDtoDAsync", e))
    }

    /// Waits for the stream, then reports any device-side error flag (and clears it).
    pub fn sync(&self) -> Result<()> {
        let kept = self.take_kept();
        let r = unsafe { dr::stream::synchronize(self.stream) };
        if r.is_ok() {
            drop(kept);
        } else {
            // The copies are not known to have run (the context is unusable after a failed
            // synchronisation): their sources are leaked rather than freed under them.
            std::mem::forget(kept);
        }
        r.map_err(|e| drv("kernel execution (cuStreamSynchronize)", e))?;
        let mut flag = [0u32; 1];
        unsafe { dr::memcpy_dtoh_async(&mut flag[..], self.err_flag.ptr, self.stream) }
            .map_err(|e| drv("cuMemcpyDtoHAsync", e))?;
        unsafe { dr::stream::synchronize(self.stream) }
            .map_err(|e| drv("cuStreamSynchronize", e))?;
        if flag[0] != 0 {
            self.memset_zero(self.err_flag.ptr, 4)?;
            let mut what = Vec::new();
            if flag[0] & ERR_EMBED_ID != 0 {
                what.push("a token id >= vocab_size reached the embedding");
            }
            if flag[0] & ERR_TARGET_ID != 0 {
                what.push("a target id >= vocab_size reached logprobs");
            }
            if flag[0] & ERR_KV_ROW != 0 {
                what.push("a kv_store destination row is outside the KV cache");
            }
            if flag[0] & ERR_DECODE_LEN != 0 {
                what.push(
                    "attention_decode: a length in `lens` is 0 or above max_blocks * block_size",
                );
            }
            if flag[0] & ERR_DECODE_BLOCK != 0 {
                what.push(
                    "attention_decode: a block id in `table` is not below the cache's blocks",
                );
            }
            if flag[0] & ERR_SAMPLE_LOGIT != 0 {
                what.push(
                    "sample: a row of `logits` holds NaN or +inf, or is all -inf with \
                     temperature > 0",
                );
            }
            if flag[0] & ERR_SAMPLE_ROW != 0 {
                what.push("sample_table: a row id in `table` is not below n_rows");
            }
            if flag[0] & ERR_GRPO_SEQ != 0 {
                what.push("grpo_loss: an entry of `seq_id` is not below n_seq");
            }
            if flag[0] & ERR_GRPO_MASK != 0 {
                what.push("grpo_loss: an entry of `mask` is not a finite weight >= 0");
            }
            return Err(Error::Invalid(what.join("; ")));
        }
        Ok(())
    }

    /// Launches kernel `id` (its index in `gen::KERNELS`) with one 8-byte slot per parameter
    /// (the driver reads each parameter's real size from the slot's start). Called only by the
    /// typed launchers that build.rs generates from the kernel signatures. Checks the launch,
    /// and in debug builds (or with TOOLN1_CUDA_SYNC=1) waits for it so that a fault is
    /// reported at the kernel that caused it.
    pub(crate) fn launch_kernel(&self, id: usize, cfg: Launch, slots: &mut [u64]) -> Result<()> {
        let Launch { grid, block, smem } = cfg;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let name = gen::KERNELS[id].1;
        self.bind()?;
        let (stream, side) = match side_launch_stream(self) {
            Some(s) => (s, true),
            None => (self.stream, false),
        };
        let mut ptrs = [std::ptr::null_mut::<c_void>(); MAX_KERNEL_PARAMS];
        for (p, s) in ptrs.iter_mut().zip(slots.iter_mut()) {
            *p = s as *mut u64 as *mut c_void;
        }
        let n = slots.len();
        unsafe { dr::launch_kernel(self.funcs[id], grid, block, smem, stream, &mut ptrs[..n]) }
            .map_err(|e| {
                drv(
                    &format!("launch of `{name}` (grid {grid:?}, block {block:?})"),
                    e,
                )
            })?;
        // A side stream's work is checked where the compute stream joins it (SideStream).
        if self.sync_each && !side && !self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            self.sync()
                .map_err(|e| Error::Cuda(format!("after `{name}`: {e}")))?;
        }
        Ok(())
    }

    /// A pair of CUDA events on this stream.
    pub fn timer(&self) -> Result<Timer> {
        self.bind()?;
        let start = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| drv("cuEventCreate", e))?;
        let stop = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| drv("cuEventCreate", e))?;
        Ok(Timer {
            start,
            stop,
            stream: self.stream,
        })
    }

    /// cublasGemmEx in column-major terms: C[m,n] = alpha op(A)[m,k] op(B)[k,n] + beta C, with A and
    /// B bf16, C bf16 (`c_f32` false) or f32, f32 compute.
    pub fn gemm(
        &self,
        g: BlasGemm,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
        c_f32: bool,
    ) -> Result<()> {
        let BlasGemm { ta, tb, m, n, k } = g;
        let (Operand { ptr: a, ld: lda }, Operand { ptr: b, ld: ldb }) = (a, b);
        let Operand { ptr: c, ld: ldc } = c;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let to_i = |x: usize, what: &str| -> Result<i32> {
            i32::try_from(x).map_err(|_| Error::Invalid(format!("GEMM {what} = {x} exceeds i32")))
        };
        use cublas_sys::{cublasComputeType_t as Ct, cublasOperation_t as Op, cudaDataType as Dt};
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let alpha = 1.0f32;
        self.bind()?;
        let h = self
            .blas
            .lock()
            .map_err(|_| Error::msg("cuBLAS lock poisoned"))?;
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *h,
                op(ta),
                op(tb),
                to_i(m, "m")?,
                to_i(n, "n")?,
                to_i(k, "k")?,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                Dt::CUDA_R_16BF,
                to_i(lda, "lda")?,
                b as *const c_void,
                Dt::CUDA_R_16BF,
                to_i(ldb, "ldb")?,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                if c_f32 {
                    Dt::CUDA_R_32F
                } else {
                    Dt::CUDA_R_16BF
                },
                to_i(ldc, "ldc")?,
                Ct::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas("cublasGemmEx", e))?;
        drop(h);
        if self.sync_each && !self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            self.sync()
                .map_err(|e| Error::Cuda(format!("after cublasGemmEx: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = dr::ctx::set_current(self.ctx);
            let _ = dr::stream::synchronize(self.copy_stream);
            let _ = dr::stream::destroy(self.copy_stream);
            let _ = dr::stream::synchronize(self.down_stream);
            let _ = dr::stream::destroy(self.down_stream);
            let _ = dr::stream::synchronize(self.stream);
            if let Ok(h) = self.blas.lock() {
                let _ = cudarc::cublas::result::destroy_handle(*h);
            }
            for m in self.modules.drain(..) {
                let _ = dr::module::unload(m);
            }
            // The stream is destroyed by the pool, after the last buffer is gone.
        }
    }
}

// ---- Side streams: work queued beside the compute stream (NCCL collectives) -----------------

thread_local! {
    /// The (device, stream) this thread's kernel launches go to instead of that device's
    /// compute stream, while a [`SideStream::launches`] closure runs.
    static SIDE_LAUNCH: std::cell::Cell<Option<(usize, sys::CUstream)>> =
        const { std::cell::Cell::new(None) };
}

fn side_launch_stream(gpu: &Gpu) -> Option<sys::CUstream> {
    SIDE_LAUNCH
        .with(|c| c.get())
        .and_then(|(g, s)| (g == gpu as *const Gpu as usize).then_some(s))
}

fn new_event() -> Result<sys::CUevent> {
    dr::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
        .map_err(|e| drv("cuEventCreate", e))
}

/// `waiter` waits (on the device, not the host) for the work queued on `recorded` so far.
fn stream_waits(waiter: sys::CUstream, recorded: sys::CUstream) -> Result<()> {
    let ev = new_event()?;
    let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
    let r = unsafe {
        dr::event::record(ev, recorded)
            .map_err(|e| drv("cuEventRecord", e))
            .and_then(|_| {
                dr::stream::wait_event(waiter, ev, wait).map_err(|e| drv("cuStreamWaitEvent", e))
            })
    };
    // The wait keeps the recorded point: the event may go at once (CUDA frees it when done).
    let _ = unsafe { dr::event::destroy(ev) };
    r
}

/// A stream of its own on a device, beside the compute stream (the rank's NCCL stream). Work
/// on it is ordered against the compute stream only by events: [`SideStream::wait_compute`]
/// before it reads what compute work wrote, [`SideStream::join_compute`] before compute work
/// reads what it wrote. The caching pool knows only the compute stream, so a pool buffer that
/// work on this stream uses must stay alive until the compute stream has waited for that work
/// (or a [`StreamMark`] after it is done); only then may it be dropped.
pub struct SideStream {
    gpu: Arc<Gpu>,
    stream: sys::CUstream,
}

// SAFETY: a stream handle may be used from any thread with its context current; every call
// binds the device first.
unsafe impl Send for SideStream {}
unsafe impl Sync for SideStream {}

impl SideStream {
    /// A new non-blocking stream in `gpu`'s context.
    pub fn new(gpu: &Arc<Gpu>) -> Result<SideStream> {
        gpu.bind()?;
        let stream = dr::stream::create(dr::stream::StreamKind::NonBlocking)
            .map_err(|e| drv("cuStreamCreate", e))?;
        Ok(SideStream {
            gpu: gpu.clone(),
            stream,
        })
    }

    pub fn raw(&self) -> sys::CUstream {
        self.stream
    }

    /// Work queued here from now on runs after the work queued on the compute stream so far.
    pub fn wait_compute(&self) -> Result<()> {
        self.gpu.bind()?;
        stream_waits(self.stream, self.gpu.stream)
    }

    /// Work queued on the compute stream from now on runs after the work queued here so far.
    pub fn join_compute(&self) -> Result<()> {
        self.gpu.bind()?;
        stream_waits(self.gpu.stream, self.stream)
    }

    /// An event after the work queued here so far.
    pub fn mark(&self) -> Result<StreamMark> {
        self.gpu.bind()?;
        let ev = new_event()?;
        if let Err(e) = unsafe { dr::event::record(ev, self.stream) } {
            let _ = unsafe { dr::event::destroy(ev) };
            return Err(drv("cuEventRecord", e));
        }
        Ok(StreamMark {
            ev,
            gpu: self.gpu.clone(),
        })
    }

    /// Runs `f` with this thread's kernel launches on this stream's device queued here instead
    /// of on the compute stream (without the debug build's wait after each launch).
    pub fn launches<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<(usize, sys::CUstream)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SIDE_LAUNCH.with(|c| c.set(self.0));
            }
        }
        let me = (Arc::as_ptr(&self.gpu) as usize, self.stream);
        let _restore = Restore(SIDE_LAUNCH.with(|c| c.replace(Some(me))));
        f()
    }

    /// Waits on the host for the work queued here.
    pub fn sync(&self) -> Result<()> {
        self.gpu.bind()?;
        unsafe { dr::stream::synchronize(self.stream) }
            .map_err(|e| drv("cuStreamSynchronize (side stream)", e))
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        let _ = self.sync();
        let _ = unsafe { dr::stream::destroy(self.stream) };
    }
}

/// An event recorded on a [`SideStream`]: whether the work before it is done, without waiting.
pub struct StreamMark {
    ev: sys::CUevent,
    gpu: Arc<Gpu>,
}

// SAFETY: as for SideStream.
unsafe impl Send for StreamMark {}
unsafe impl Sync for StreamMark {}

impl StreamMark {
    /// Whether the work before the mark has completed (cuEventQuery; never waits).
    pub fn done(&self) -> Result<bool> {
        self.gpu.bind()?;
        match unsafe { dr::event::query(self.ev) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(drv("cuEventQuery", e)),
        }
    }

    /// Work queued on the compute stream from now on runs after the work before the mark.
    pub fn wait_on_compute(&self) -> Result<()> {
        self.gpu.bind()?;
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        unsafe { dr::stream::wait_event(self.gpu.stream, self.ev, wait) }
            .map_err(|e| drv("cuStreamWaitEvent", e))
    }
}

impl Drop for StreamMark {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        let _ = unsafe { dr::event::destroy(self.ev) };
    }
}

fn load_module(name: &str, image: &[u8], cc: (i32, i32)) -> Result<sys::CUmodule> {
    let mut data: Vec<u8> = if gen::KIND == "nvrtc" {
        let src = std::str::from_utf8(image)
            .map_err(|_| Error::Cuda(format!("kernels/{name}.cu is not UTF-8")))?;
        compile_nvrtc(name, src, cc)?
    } else {
        image.to_vec()
    };
    data.push(0);
    // cuModuleLoadData wants an aligned image: copy into u64 storage.
    let mut aligned = vec![0u64; data.len().div_ceil(8)];
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), aligned.as_mut_ptr() as *mut u8, data.len());
        dr::module::load_data(aligned.as_ptr() as *const c_void)
    }
    .map_err(|e| drv(&format!("loading kernels/{name}.cu ({})", gen::KIND), e))
}

/// Compiles every kernel source with NVRTC for compute capability `cc` (no GPU needed, only
/// libnvrtc): the check that the run-time fallback of a build without nvcc works. Returns the
/// PTX size per module.
pub fn nvrtc_check(cc: (i32, i32)) -> Result<Vec<(String, usize)>> {
    let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
        .unwrap_or(false);
    if !present {
        return Err(no_cuda("libnvrtc.so was not found"));
    }
    gen::SOURCES
        .iter()
        .map(|(name, src)| compile_nvrtc(name, src, cc).map(|p| (name.to_string(), p.len())))
        .collect()
}

fn compile_nvrtc(name: &str, src: &str, cc: (i32, i32)) -> Result<Vec<u8>> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(no_cuda(
            "this build embeds kernel sources (no nvcc at build time) and libnvrtc.so was not found to compile them",
        ));
    }
    let arch = format!("--gpu-architecture=compute_{}{}", cc.0, cc.1);
    let opts = vec![arch, "-std=c++17".to_string(), "-lineinfo".to_string()];
    let csrc = CString::new(src)
        .map_err(|_| Error::Cuda(format!("kernels/{name}.cu contains a NUL byte")))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| Error::Invalid(name.to_string()))?;
    let prog = cudarc::nvrtc::result::create_program(&csrc, Some(&cname))
        .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram({name}): {e:?}")))?;
    let res = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    if res.is_err() {
        let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }
            .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
            .unwrap_or_default();
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
        return Err(Error::Cuda(format!(
            "NVRTC failed on kernels/{name}.cu:\n{log}"
        )));
    }
    let ptx = unsafe { cudarc::nvrtc::result::get_ptx(prog) }
        .map_err(|e| Error::Cuda(format!("nvrtcGetPTX({name}): {e:?}")))?;
    let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
    let mut bytes: Vec<u8> = ptx.iter().map(|&c| c as u8).collect();
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    /// The kernel table (build.rs) lists exactly the entry points that a plain scan of
    /// kernels/*.cu finds, the way tools/vgpu/gen_registry.py finds them: every kernel has its
    /// typed launcher (and, by `deny(dead_code)` on the launchers, a caller).
    #[test]
    fn every_kernel_has_a_launcher() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "cu") {
                continue;
            }
            let module = p.file_stem().unwrap().to_string_lossy().into_owned();
            let src = std::fs::read_to_string(&p).unwrap();
            for (i, _) in src.match_indices("__global__") {
                if !src[..i].trim_end().ends_with("extern \"C\"") {
                    continue;
                }
                // the name is the identifier before the parameter list's `(` (after any
                // `__launch_bounds__(...)`)
                let rest = &src[i..];
                let mut head = &rest[..rest.find('{').unwrap()];
                if let Some(b) = head.find("__launch_bounds__") {
                    let close = head[b..].find(')').unwrap();
                    head = &head[b + close + 1..];
                }
                let name = head[..head.find('(').unwrap()]
                    .split_whitespace()
                    .last()
                    .unwrap()
                    .to_string();
                found.push((module.clone(), name));
            }
        }
        found.sort();
        let mut table: Vec<(String, String)> = super::gen::KERNELS
            .iter()
            .map(|(m, n)| (m.to_string(), n.to_string()))
            .collect();
        table.sort();
        assert_eq!(table, found);
        assert!(found.len() >= 30, "only {} kernels found", found.len());
    }
}
