//! The tensor-core building blocks of kernels/common.cuh (mma.sync m16n8k16 bf16 -> f32,
//! ldmatrix x4 / x2.trans, cp.async with two commit groups) multiply random tiles, compared with
//! an f64 host product of the same bf16 inputs. On the virtual GPU this checks the fragment
//! layouts and the kernel's indexing; on a real GPU, the instructions themselves.
//! The seed is printed; TOOLN1_TEST_SEED replays it. Skips (with the reason) only when no CUDA
//! device is present; TOOLN1_REQUIRE_CUDA=1 makes that a failure.

use tooln1::backend::cuda::Cuda;
use tooln1::Error;

fn gpu() -> Option<Cuda> {
    match Cuda::new() {
        Ok(c) => Some(c),
        Err(Error::NoCuda(m)) if std::env::var("TOOLN1_REQUIRE_CUDA").as_deref() != Ok("1") => {
            eprintln!("skipped: no CUDA device ({m})");
            None
        }
        Err(e) => panic!("CUDA backend unavailable: {e}"),
    }
}

#[test]
fn mma_ldmatrix_cp_async_match_host_product() {
    let Some(c) = gpu() else { return };
    let seed = std::env::var("TOOLN1_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("tensor cores: seed {seed} (TOOLN1_TEST_SEED={seed} replays)");
    let r = c.tensor_core_selfcheck(7, seed).unwrap();
    println!("{r:?}");
    // f32 accumulation of 16 bf16 products: the only error is f32 rounding (~1e-7 relative).
    assert!(r.direct_rel_err < 1e-5, "mma (direct fragments): {r:?}");
    assert!(r.staged_rel_err < 1e-5, "mma + ldmatrix + cp.async: {r:?}");
}
