//! Launchers of kernels/mma_check.cu, the device self-check of the tensor-core building blocks
//! in `kernels/common.cuh` (mma.sync m16n8k16 bf16 -> f32, ldmatrix, cp.async): random tiles are
//! multiplied on the device (one warp per tile) and compared with the same product on the host
//! in f64.

use super::super::runtime::gen::launch::mma_check as k;
use super::super::runtime::Bf16;
use super::super::Cuda;
use super::blocks;
use crate::{Error, Result};

/// Result of [`Cuda::tensor_core_selfcheck`]: the worst relative error per path.
#[derive(Clone, Copy, Debug)]
pub struct TensorCoreCheck {
    /// Fragments gathered by index from global memory (mma alone).
    pub direct_rel_err: f64,
    /// Tiles staged by cp.async, fragments loaded with ldmatrix (mma + ldmatrix + cp.async).
    pub staged_rel_err: f64,
    /// Number of 16x16 by 16x8 tiles checked.
    pub tiles: usize,
}

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uni(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / 16_777_216.0) * 2.0 - 1.0
    }
}

impl Cuda {
    /// Multiplies `tiles` random 16x16 (A) by 16x8 (B) bf16 tiles plus a random f32 C on the
    /// device, through both check kernels, and returns the worst per-tile relative-norm error
    /// against the f64 host product of the same (bf16-rounded) inputs. Outputs are poisoned
    /// with NaN first, so a lane that writes nothing shows as an infinite error.
    pub fn tensor_core_selfcheck(&self, tiles: usize, seed: u64) -> Result<TensorCoreCheck> {
        if tiles == 0 {
            return Err(Error::Invalid(
                "tensor_core_selfcheck: tiles must be > 0".into(),
            ));
        }
        let mut r = SplitMix(seed);
        let a: Vec<half::bf16> = (0..tiles * 256)
            .map(|_| half::bf16::from_f32(r.uni()))
            .collect();
        let b: Vec<half::bf16> = (0..tiles * 128)
            .map(|_| half::bf16::from_f32(r.uni()))
            .collect();
        let c: Vec<f32> = (0..tiles * 128).map(|_| r.uni()).collect();
        let mut want = vec![0f64; tiles * 128];
        for t in 0..tiles {
            for i in 0..16 {
                for j in 0..8 {
                    let mut s = c[t * 128 + i * 8 + j] as f64;
                    for k in 0..16 {
                        s += a[t * 256 + i * 16 + k].to_f64() * b[t * 128 + k * 8 + j].to_f64();
                    }
                    want[t * 128 + i * 8 + j] = s;
                }
            }
        }
        let g = &self.gpu;
        let da = g.htod::<Bf16, u16>(&a.iter().map(|x| x.to_bits()).collect::<Vec<_>>())?;
        let db = g.htod::<Bf16, u16>(&b.iter().map(|x| x.to_bits()).collect::<Vec<_>>())?;
        let dc = g.htod::<f32, f32>(&c)?;
        let mut errs = [0f64; 2];
        let n = i32::try_from(tiles)
            .map_err(|_| Error::Invalid(format!("tensor_core_selfcheck: {tiles} tiles")))?;
        for (slot, err) in errs.iter_mut().enumerate() {
            let mut dd = g.htod::<f32, f32>(&vec![f32::NAN; tiles * 128])?;
            let launch = blocks(tiles, 32);
            if slot == 0 {
                let a = k::MmaCheckDirect {
                    a: &da,
                    b: &db,
                    c: &dc,
                    d: &mut dd,
                    tiles: n,
                };
                k::mma_check_direct(g, launch, a)?;
            } else {
                let a = k::MmaCheckStaged {
                    a: &da,
                    b: &db,
                    c: &dc,
                    d: &mut dd,
                    tiles: n,
                };
                k::mma_check_staged(g, launch, a)?;
            }
            let got: Vec<f32> = g.dtoh(dd.ptr(), tiles * 128)?;
            for t in 0..tiles {
                let (mut num, mut den) = (0f64, 0f64);
                for e in 0..128 {
                    let (x, y) = (got[t * 128 + e] as f64, want[t * 128 + e]);
                    num += if x.is_finite() {
                        (x - y) * (x - y)
                    } else {
                        f64::INFINITY
                    };
                    den += y * y;
                }
                *err = err.max((num / den.max(1e-30)).sqrt());
            }
        }
        Ok(TensorCoreCheck {
            direct_rel_err: errs[0],
            staged_rel_err: errs[1],
            tiles,
        })
    }
}
