//! Uploads, downloads and device copies (no kernels: driver copies on the backend's stream).

use super::super::runtime::{Bf16, CudaBuf, Elem};
use super::super::Cuda;
use crate::backend::{bytes_to_f32, check, DType, HostMem, PendingUpload, RowCopy};
use crate::Result;

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
    check::upload_raw(dtype, bytes.len(), n)?;
    let h: Vec<u16> = match dtype {
        // bf16 bytes are the device format already: copied bit for bit
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        DType::F16 | DType::F32 => bytes_to_f32(dtype, bytes)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_bits())
            .collect(),
    };
    c.gpu.htod::<Bf16, u16>(&h)
}

/// [`upload_raw`] of `src.bytes()[range]`; bf16 bytes from page-locked memory go on the copy
/// stream (`Gpu::htod_pinned`), anything else is a synchronous upload.
pub(crate) fn upload_raw_async(
    c: &Cuda,
    dtype: DType,
    src: &dyn HostMem,
    range: std::ops::Range<usize>,
    n: usize,
) -> Result<(CudaBuf<Bf16>, PendingUpload)> {
    let bytes = src.bytes().get(range.clone()).ok_or_else(|| {
        crate::Error::Invalid(format!(
            "upload_raw_async: bytes {range:?} of a {}-byte host buffer",
            src.bytes().len()
        ))
    })?;
    if dtype != DType::BF16 || !src.pinned() {
        return Ok((upload_raw(c, dtype, bytes, n)?, PendingUpload::done()));
    }
    check::upload_raw(dtype, bytes.len(), n)?;
    let buf = c.gpu.alloc::<Bf16>(n)?;
    if bytes.is_empty() {
        return Ok((buf, PendingUpload::done()));
    }
    let wait = c.gpu.htod_pinned(buf.ptr(), bytes)?;
    Ok((buf, PendingUpload::new(wait)))
}

/// The first `n` bf16 elements as f32 on the host.
pub(crate) fn download_bf16(c: &Cuda, t: &CudaBuf<Bf16>, n: usize) -> Result<Vec<f32>> {
    check::first_n("download", t, n)?;
    let h: Vec<u16> = c.gpu.dtoh(t.ptr(), n)?;
    Ok(h.into_iter()
        .map(|b| half::bf16::from_bits(b).to_f32())
        .collect())
}

/// The first `n` elements on the host (`op` names the op in errors).
pub(crate) fn download<E: Elem, H: Copy + Default>(
    c: &Cuda,
    t: &CudaBuf<E>,
    n: usize,
    op: &'static str,
) -> Result<Vec<H>> {
    check::first_n(op, t, n)?;
    c.gpu.dtoh(t.ptr(), n)
}

/// dst[..n] = src[..n] (`op` names the op in errors).
pub(crate) fn copy<E: Elem>(
    c: &Cuda,
    src: &CudaBuf<E>,
    dst: &mut CudaBuf<E>,
    n: usize,
    op: &'static str,
) -> Result<()> {
    check::copy(op, src, dst, n)?;
    c.gpu.bind()?;
    c.gpu.dtod(src.ptr(), dst.ptr(), n * E::SIZE)
}

/// Rows c.dst.. = rows c.src.. of one buffer (one device-to-device copy of c.n * c.width
/// elements on the backend's stream; the contract makes the ranges disjoint).
pub(crate) fn copy_rows<E: Elem>(c: &Cuda, t: &mut CudaBuf<E>, rc: RowCopy) -> Result<()> {
    check::copy_rows(t, rc)?;
    if rc.n == 0 {
        return Ok(());
    }
    c.gpu.bind()?;
    c.gpu.dtod(
        t.at(rc.src * rc.width),
        t.at(rc.dst * rc.width),
        rc.n * rc.width * E::SIZE,
    )
}

/// dst[..data.len()] = data in place (the buffer keeps its address: a graph's input).
pub(crate) fn write<E: Elem, H: Copy>(
    c: &Cuda,
    dst: &mut CudaBuf<E>,
    data: &[H],
    op: &'static str,
) -> Result<()> {
    debug_assert_eq!(std::mem::size_of::<H>(), E::SIZE);
    if data.len() > dst.len() {
        return Err(check::arg_error(
            op,
            "data",
            format!("at most dst's {} elements", dst.len()),
            data.len(),
        ));
    }
    if data.is_empty() {
        return Ok(());
    }
    c.gpu.bind()?;
    unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr(), data, c.gpu.stream) }
        .map_err(|e| super::super::runtime::drv("cuMemcpyHtoDAsync", e))
}

/// dst[..n] = src[off..off + n] (one device-to-device copy).
pub(crate) fn copy_at<E: Elem>(
    c: &Cuda,
    src: &CudaBuf<E>,
    off: usize,
    dst: &mut CudaBuf<E>,
    n: usize,
    op: &'static str,
) -> Result<()> {
    if off.checked_add(n).is_none_or(|e| e > src.len()) {
        return Err(check::arg_error(
            op,
            "off + n",
            format!("at most src's {} elements", src.len()),
            format!("{off} + {n}"),
        ));
    }
    if n > dst.len() {
        return Err(check::arg_error(
            op,
            "n",
            format!("at most dst's {} elements", dst.len()),
            n,
        ));
    }
    if n == 0 {
        return Ok(());
    }
    c.gpu.bind()?;
    c.gpu.dtod(src.at(off), dst.ptr(), n * E::SIZE)
}
