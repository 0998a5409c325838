//! [`ReuseAlloc`]: a process allocator that keeps large freed blocks and hands them out again,
//! so that a training step's activations do not come back from the kernel as fresh pages on
//! every step.
//!
//! Why: the CPU backend's buffers are plain `Vec<f32>`s; every forward allocates each layer's
//! activations and the backward frees them. glibc's malloc serves blocks above its mmap
//! threshold (at most 32 MiB, adjusted at run time) with `mmap` and returns them with `munmap`,
//! and trims the top of its heap past a threshold, so the next step faults every page in again
//! and the kernel zeroes it first. Measured at hidden 896, 1,024 tokens: 24k page faults per
//! forward + backward pair before, about 240 after; the kernel's page clearing had been 13% of a
//! profile's samples
//! (docs/performance.md). PyTorch's CPU tensors go through the same malloc.
//!
//! How: a block of at least [`MIN_BLOCK`] bytes (and alignment at most [`ALIGN`]) is rounded
//! up to a size class (eight classes per power of two: at most 12.5% more than asked for) and
//! taken from that class's free list if one is there, else from the system allocator. A freed
//! block goes back on its class's list while the lists hold less than [`MAX_KEPT`] bytes, else
//! to the system. Smaller blocks and stricter alignments go straight to the system allocator.
//! The addresses a computation gets have no effect on its results.
//!
//! The `tooln1` binary and the benchmarks install it (`#[global_allocator]`); a program that
//! embeds the library chooses its own allocator and may install this one the same way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks from this size (bytes) are kept for reuse.
pub const MIN_BLOCK: usize = 1 << 20;
/// The alignment every kept block has (and the most a request may ask for to be kept).
pub const ALIGN: usize = 64;
/// The most bytes the free lists hold; a block freed beyond that goes back to the system.
pub const MAX_KEPT: usize = 8 << 30;

/// Size classes per power of two.
const STEPS: usize = 8;
/// Classes: [`STEPS`] for each power of two from 2^20 to 2^63.
const CLASSES: usize = (64 - 20) * STEPS;

/// The process allocator described in the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReuseAlloc;

struct Lists {
    /// Free blocks (addresses) of each class.
    free: [Vec<usize>; CLASSES],
    /// Bytes held by the free lists.
    kept: usize,
}

static LISTS: Mutex<Lists> = Mutex::new(Lists {
    free: [const { Vec::new() }; CLASSES],
    kept: 0,
});

/// The class of a request of `size` bytes and the size of its blocks, for `size` at least
/// [`MIN_BLOCK`]; `None` when the class size would overflow.
fn class_of(size: usize) -> Option<(usize, usize)> {
    debug_assert!(size >= MIN_BLOCK);
    // size lies in [2^e, 2^(e+1)); the classes there are 2^e + j·2^(e−3), j = 0..8.
    let e = (usize::BITS - 1 - size.leading_zeros()) as usize;
    let j = (size - (1 << e)).div_ceil(1usize << (e - 3)); // 0..=8
    let (e, j) = if j == STEPS { (e + 1, 0) } else { (e, j) };
    if e >= usize::BITS as usize {
        return None;
    }
    let bytes = (1usize << e) + j * (1usize << (e - 3));
    let class = (e - 20) * STEPS + j;
    (class < CLASSES).then_some((class, bytes))
}

fn lists() -> std::sync::MutexGuard<'static, Lists> {
    LISTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kept class and block size of `layout`, if blocks of it are kept.
fn kept_class(layout: Layout) -> Option<(usize, usize)> {
    if layout.size() < MIN_BLOCK || layout.align() > ALIGN {
        return None;
    }
    class_of(layout.size())
}

// SAFETY: every block handed out is either the system allocator's answer for the same layout
// or a block of at least the requested size and alignment (its class's size, alignment ALIGN)
// that the system allocator gave for the class layout and that no one holds any more; a block
// is given back to the system with the layout it was allocated with.
unsafe impl GlobalAlloc for ReuseAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((class, bytes)) = kept_class(layout) else {
            return System.alloc(layout);
        };
        if let Some(p) = {
            let mut l = lists();
            let p = l.free[class].pop();
            if p.is_some() {
                l.kept -= bytes;
            }
            p
        } {
            return p as *mut u8;
        }
        match Layout::from_size_align(bytes, ALIGN) {
            Ok(l) => System.alloc(l),
            Err(_) => std::ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some((class, bytes)) = kept_class(layout) else {
            return System.alloc_zeroed(layout);
        };
        let reused = {
            let mut l = lists();
            let p = l.free[class].pop();
            if p.is_some() {
                l.kept -= bytes;
            }
            p
        };
        match reused {
            Some(p) => {
                let p = p as *mut u8;
                std::ptr::write_bytes(p, 0, layout.size());
                p
            }
            // Fresh pages from the system are zero already.
            None => match Layout::from_size_align(bytes, ALIGN) {
                Ok(l) => System.alloc_zeroed(l),
                Err(_) => std::ptr::null_mut(),
            },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((class, bytes)) = kept_class(layout) else {
            return System.dealloc(ptr, layout);
        };
        {
            let mut l = lists();
            if l.kept + bytes <= MAX_KEPT && l.free[class].try_reserve(1).is_ok() {
                l.free[class].push(ptr as usize);
                l.kept += bytes;
                return;
            }
        }
        // SAFETY: the block was allocated for this class layout (`alloc` above).
        System.dealloc(ptr, Layout::from_size_align_unchecked(bytes, ALIGN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_the_request_within_an_eighth() {
        let check = |size: usize| {
            let (class, bytes) = class_of(size).expect("a class");
            assert!(bytes >= size, "{size}: class size {bytes}");
            assert!(bytes - size <= size / 8, "{size}: class size {bytes}");
            assert!(class < CLASSES);
            class
        };
        let mut prev = 0;
        for size in (MIN_BLOCK..MIN_BLOCK * 9).step_by(4093) {
            let class = check(size);
            assert!(class >= prev, "classes grow with the size ({size})");
            prev = class;
        }
        for size in [2 * MIN_BLOCK + 1, (1 << 40) + 7, usize::MAX / 2] {
            check(size);
        }
        // Exact class sizes map to themselves.
        for j in 1..=STEPS {
            let s = MIN_BLOCK + j * (MIN_BLOCK / 8);
            assert_eq!(class_of(s).map(|c| c.1), Some(s));
        }
        assert_eq!(class_of(usize::MAX), None);
    }

    #[test]
    fn freed_blocks_come_back_zeroed_when_asked() {
        let a = ReuseAlloc;
        let layout = Layout::from_size_align(3 * MIN_BLOCK + 5, 8).unwrap();
        // SAFETY: layouts of non-zero size; every block is freed with its own layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert!(!q.is_null());
            let s = std::slice::from_raw_parts(q, layout.size());
            assert!(s.iter().all(|&b| b == 0));
            a.dealloc(q, layout);
            // Small and over-aligned requests pass through.
            let small = Layout::from_size_align(100, 8).unwrap();
            let r = a.alloc(small);
            assert!(!r.is_null());
            a.dealloc(r, small);
            let wide = Layout::from_size_align(2 * MIN_BLOCK, 4096).unwrap();
            let w = a.alloc(wide);
            assert!(!w.is_null() && (w as usize) % 4096 == 0);
            a.dealloc(w, wide);
        }
    }
}
