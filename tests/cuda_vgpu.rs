//! Checks that only make sense on the virtual GPU (tools/vgpu): its device memory counters
//! (`vgpuMemStats`, the peak the memory planner's estimates will be checked against) follow the
//! backend's allocations, and its device profile is what the driver API reports. On a real GPU
//! (no `vgpuIsVirtual` symbol) the test says so and checks nothing else.

mod common;

use tooln1::backend::Backend;

type Stats = unsafe extern "C" fn(*mut usize, *mut usize);

#[test]
fn memory_counters_follow_allocations() {
    let Some(c) = common::gpu() else { return };
    // The driver library the backend loaded (dlopen hands back the same handle).
    let lib = unsafe { libloading::Library::new("libcuda.so") }.expect("libcuda.so is loaded");
    let stats: libloading::Symbol<Stats> = match unsafe { lib.get(b"vgpuMemStats\0") } {
        Ok(s) => s,
        Err(_) => {
            eprintln!("not the virtual GPU: its memory counters do not exist on a real driver");
            return;
        }
    };
    let read = || {
        let (mut cur, mut peak) = (0usize, 0usize);
        unsafe { stats(&mut cur, &mut peak) };
        (cur, peak)
    };
    let (cur0, _) = read();
    let n = 3 << 20; // 12 MiB of f32, a fresh size class for the caching pool
    let t = c.zeros_f32(n).unwrap();
    let (cur1, peak1) = read();
    assert!(
        cur1 >= cur0 + 4 * n,
        "current bytes {cur0} -> {cur1} after a {} byte allocation",
        4 * n
    );
    assert!(peak1 >= cur1, "peak {peak1} below current {cur1}");
    drop(t);
    c.trim().unwrap();
    let (cur2, peak2) = read();
    assert!(cur2 + 4 * n <= cur1, "trim gave back {} bytes", cur1 - cur2);
    assert_eq!(peak2, peak1, "the peak never decreases");
    assert!(c.name().contains("virtual GPU"), "device name {}", c.name());
}
