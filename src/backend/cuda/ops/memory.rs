//! Uploads, downloads and device copies (no kernels: driver copies on the backend's stream).

use super::super::runtime::{Bf16, CudaBuf, Elem};
use super::super::Cuda;
use super::need;
use crate::backend::DType;
use crate::{ensure, Result};

/// f32 host values rounded to a bf16 device buffer.
pub(crate) fn upload_bf16(c: &Cuda, data: &[f32]) -> Result<CudaBuf<Bf16>> {
    let h: Vec<u16> = data
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    c.gpu.htod::<Bf16, u16>(&h)
}

/// A bf16 device tensor from checkpoint bytes (`n` elements of `dtype`, little endian).
pub(crate) fn upload_raw(c: &Cuda, dtype: DType, bytes: &[u8], n: usize) -> Result<CudaBuf<Bf16>> {
    ensure!(
        bytes.len() == n * dtype.size(),
        "upload_raw: {} bytes given for {n} elements of {dtype:?} ({} expected)",
        bytes.len(),
        n * dtype.size()
    );
    let h: Vec<u16> = match dtype {
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| {
                half::bf16::from_f32(
                    half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                )
                .to_bits()
            })
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits())
            .collect(),
    };
    c.gpu.htod::<Bf16, u16>(&h)
}

/// The first `n` bf16 elements as f32 on the host.
pub(crate) fn download_bf16(c: &Cuda, t: &CudaBuf<Bf16>, n: usize) -> Result<Vec<f32>> {
    need(t, n, "download")?;
    let h: Vec<u16> = c.gpu.dtoh(t.ptr(), n)?;
    Ok(h.into_iter()
        .map(|b| half::bf16::from_bits(b).to_f32())
        .collect())
}

/// The first `n` elements on the host (`what` names the op in errors).
pub(crate) fn download<E: Elem, H: Copy + Default>(
    c: &Cuda,
    t: &CudaBuf<E>,
    n: usize,
    what: &str,
) -> Result<Vec<H>> {
    need(t, n, what)?;
    c.gpu.dtoh(t.ptr(), n)
}

/// dst[..n] = src[..n] (`what` names the op in errors).
pub(crate) fn copy<E: Elem>(
    c: &Cuda,
    src: &CudaBuf<E>,
    dst: &mut CudaBuf<E>,
    n: usize,
    what: &str,
) -> Result<()> {
    need(src, n, &format!("{what} src"))?;
    need(dst, n, &format!("{what} dst"))?;
    c.gpu.bind()?;
    c.gpu.dtod(src.ptr(), dst.ptr(), n * E::SIZE)
}
