//! CUDA graphs: the compute stream captured into a graph (cuStreamBeginCapture ..
//! cuStreamEndCapture, thread-local mode, so that other threads' devices and tests are not
//! affected) and replayed with one cuGraphLaunch, and the private memory arena of the buffers
//! allocated while capturing.
//!
//! The arena follows PyTorch's CUDA graph private memory pools (`torch.cuda.graph`,
//! `c10/cuda/CUDACachingAllocator.cpp`: `beginAllocateToPool` / `endAllocateToPool` /
//! `releasePool`): a graph's replays read and write the addresses its captured work was
//! recorded with, so every block allocated during the capture belongs to the graph's own pool,
//! is never handed to work outside it, and goes back to the general allocator only when the
//! graph is destroyed. Blocks freed during the capture go back to the same private pool, where
//! later allocations of the capture may reuse them (the captured work runs in stream order, as
//! it did live). One difference: a block allocated before the capture and released during it
//! joins the arena too (its last readers are in the graph, so it must outlive the graph).
//!
//! Graphs may share one arena (PyTorch's `pool=` argument, a `graph_pool_handle()` passed to
//! several captures; vLLM captures its decode batch sizes into one pool): a capture given a
//! live graph allocates from that graph's arena, reusing the blocks the earlier capture freed.
//! Then the graphs' replays must not overlap (one stream orders them) and a buffer allocated
//! inside one may be overwritten by another's replay: read a graph's outputs before replaying
//! another. The arena is released with the last graph using it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as dr, sys};

use super::runtime::{drv, size_class, Gpu, Pool};
use crate::{Error, Result};

/// The blocks of one graph: every block (pointer, size class) and those free inside it.
#[derive(Default)]
pub(crate) struct Arena {
    blocks: Mutex<Vec<(sys::CUdeviceptr, usize)>>,
    free: Mutex<BTreeMap<usize, Vec<sys::CUdeviceptr>>>,
    /// Live graphs using the arena.
    graphs: std::sync::atomic::AtomicUsize,
}

/// The arena state of a [`Pool`]: the arena being filled by a capture, and the owner of every
/// block that belongs to a live arena.
#[derive(Default)]
pub(crate) struct ArenaState {
    capturing: Option<Arc<Arena>>,
    owner: HashMap<sys::CUdeviceptr, Arc<Arena>>,
}

fn poisoned() -> Error {
    Error::msg("allocator lock poisoned")
}

impl Pool {
    /// During a capture: a block of the capture's arena (a free one of the size class, else a
    /// new driver allocation, which the driver allows during capture). None outside a capture.
    pub(super) fn arena_alloc(&self, bytes: usize) -> Result<Option<(sys::CUdeviceptr, usize)>> {
        let mut st = self.arenas.lock().map_err(|_| poisoned())?;
        let Some(arena) = st.capturing.clone() else {
            return Ok(None);
        };
        let class = if self.is_exact() {
            bytes.max(1)
        } else {
            size_class(bytes)
        };
        let reused = arena
            .free
            .lock()
            .map_err(|_| poisoned())?
            .get_mut(&class)
            .and_then(|v| v.pop());
        let p = match reused {
            Some(p) => {
                self.count_took(class, bytes, false);
                p
            }
            None => {
                let p = unsafe { dr::malloc_sync(class) }.map_err(|e| {
                    Error::Cuda(format!(
                        "cuMemAlloc of {class} bytes during graph capture failed: {e}"
                    ))
                })?;
                arena
                    .blocks
                    .lock()
                    .map_err(|_| poisoned())?
                    .push((p, class));
                st.owner.insert(p, arena.clone());
                self.count_took(class, bytes, true);
                p
            }
        };
        Ok(Some((p, class)))
    }

    /// A released block that belongs to an arena (or is released during a capture, which then
    /// adopts it) goes to that arena's free list; true when so.
    pub(super) fn arena_release(&self, ptr: sys::CUdeviceptr, class: usize) -> bool {
        let Ok(mut st) = self.arenas.lock() else {
            return false;
        };
        let arena = match st.owner.get(&ptr) {
            Some(a) => a.clone(),
            None => match st.capturing.clone() {
                Some(a) => {
                    if let Ok(mut b) = a.blocks.lock() {
                        b.push((ptr, class));
                    }
                    st.owner.insert(ptr, a.clone());
                    a
                }
                None => return false,
            },
        };
        if let Ok(mut f) = arena.free.lock() {
            f.entry(class).or_default().push(ptr);
        }
        true
    }

    /// Returns an arena's blocks to the general allocator (after the queued work, which may
    /// still replay the graph): free blocks go to the free lists (exact mode: to the driver),
    /// blocks still held by a buffer go there when it is dropped.
    fn arena_drop(&self, arena: &Arc<Arena>) -> Result<()> {
        unsafe { dr::ctx::set_current(self.ctx()) }.map_err(|e| drv("cuCtxSetCurrent", e))?;
        unsafe { dr::stream::synchronize(self.stream()) }
            .map_err(|e| drv("cuStreamSynchronize (before releasing a graph's memory)", e))?;
        let free: Vec<(usize, Vec<sys::CUdeviceptr>)> =
            std::mem::take(&mut *arena.free.lock().map_err(|_| poisoned())?)
                .into_iter()
                .collect();
        {
            let mut st = self.arenas.lock().map_err(|_| poisoned())?;
            for (p, _) in arena.blocks.lock().map_err(|_| poisoned())?.drain(..) {
                st.owner.remove(&p);
            }
        }
        for (class, list) in free {
            for p in list {
                self.give_back(p, class);
            }
        }
        Ok(())
    }
}

/// A captured and instantiated graph of the compute stream, with the arena of its buffers.
pub struct CudaGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    arena: Arc<Arena>,
    pool: Arc<Pool>,
    /// Replays so far.
    launches: std::sync::atomic::AtomicU64,
}

impl Gpu {
    /// Starts capturing the compute stream: until [`Gpu::end_capture`], kernels, GEMMs, memsets
    /// and device copies queued on it are recorded, not run, and buffers come from a new arena,
    /// or from `share`'s (see the module doc for what sharing requires).
    pub fn begin_capture(&self, share: Option<&CudaGraph>) -> Result<()> {
        self.bind()?;
        {
            let mut st = self.pool.arenas.lock().map_err(|_| poisoned())?;
            if st.capturing.is_some() {
                return Err(Error::Cuda(
                    "begin_capture: a capture is already running".into(),
                ));
            }
            st.capturing = Some(share.map_or_else(Default::default, |g| g.arena.clone()));
        }
        let r = unsafe {
            dr::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        };
        match r {
            Ok(()) => {
                self.capturing.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                if let Some(a) = self.take_capture_arena() {
                    let _ = self.release_unused(&a);
                }
                Err(drv("cuStreamBeginCapture", e))
            }
        }
    }

    /// Releases an arena no graph uses (after a failed capture into it).
    fn release_unused(&self, arena: &Arc<Arena>) -> Result<()> {
        if arena.graphs.load(Ordering::SeqCst) == 0 {
            self.pool.arena_drop(arena)?;
        }
        Ok(())
    }

    fn take_capture_arena(&self) -> Option<Arc<Arena>> {
        self.pool
            .arenas
            .lock()
            .ok()
            .and_then(|mut s| s.capturing.take())
    }

    /// Ends the capture begun by [`Gpu::begin_capture`] and instantiates its graph. Always
    /// leaves capture mode; an invalidated capture (a call the driver forbids while capturing)
    /// is an error, its memory returned to the allocator.
    pub fn end_capture(&self) -> Result<CudaGraph> {
        self.bind()?;
        self.capturing.store(false, Ordering::SeqCst);
        let ended = unsafe { dr::stream::end_capture(self.stream) };
        let arena = self
            .take_capture_arena()
            .ok_or_else(|| Error::Cuda("end_capture without begin_capture".into()))?;
        let graph = match ended {
            Ok(g) if !g.is_null() => g,
            Ok(_) => {
                self.release_unused(&arena)?;
                return Err(Error::Cuda("cuStreamEndCapture returned no graph".into()));
            }
            Err(e) => {
                self.release_unused(&arena)?;
                return Err(drv("stream capture (cuStreamEndCapture)", e));
            }
        };
        let exec = match unsafe { dr::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
        {
            Ok(x) => x,
            Err(e) => {
                unsafe {
                    let _ = dr::graph::destroy(graph);
                }
                self.release_unused(&arena)?;
                return Err(drv("cuGraphInstantiateWithFlags", e));
            }
        };
        arena.graphs.fetch_add(1, Ordering::SeqCst);
        Ok(CudaGraph {
            graph,
            exec,
            arena,
            pool: self.pool.clone(),
            launches: Default::default(),
        })
    }
}

impl CudaGraph {
    /// Queues the graph's work on the compute stream it was captured from.
    pub fn launch(&self) -> Result<()> {
        unsafe { dr::ctx::set_current(self.pool.ctx()) }.map_err(|e| drv("cuCtxSetCurrent", e))?;
        unsafe { dr::graph::launch(self.exec, self.pool.stream()) }
            .map_err(|e| drv("cuGraphLaunch", e))?;
        self.launches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of device memory the graph's arena holds.
    pub fn arena_bytes(&self) -> usize {
        self.arena
            .blocks
            .lock()
            .map(|b| b.iter().map(|&(_, c)| c).sum())
            .unwrap_or(0)
    }
}

impl crate::backend::ReplayGraph for CudaGraph {
    fn launch(&self) -> Result<()> {
        CudaGraph::launch(self)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        unsafe {
            if dr::ctx::set_current(self.pool.ctx()).is_ok() {
                let _ = dr::stream::synchronize(self.pool.stream());
                let _ = dr::graph::exec_destroy(self.exec);
                let _ = dr::graph::destroy(self.graph);
            }
        }
        if self.arena.graphs.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = self.pool.arena_drop(&self.arena);
        }
    }
}
