//! Uploads, downloads and device copies (no kernels: driver copies on the backend's stream),
//! and the copies beside queued work: from and to page-locked host memory on the copy stream.

use super::super::runtime::{Bf16, CopyDir, CudaBuf, Elem};
use super::super::Cuda;
use crate::backend::{
    bytes_to_f32, check, host_copy_len, DType, HostCopy, HostF32, HostMem, PendingUpload, RowCopy,
};
use crate::Result;
use cudarc::driver::result as dr;

/// f32 host values rounded to a bf16 device buffer.
pub(crate) fn upload_bf16(c: &Cuda, data: &[f32]) -> Result<CudaBuf<Bf16>> {
    let h: Vec<u16> = data
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    c.gpu.htod_owned::<Bf16, u16>(h)
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
    c.gpu.htod_owned::<Bf16, u16>(h)
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
pub(crate) fn write<E: Elem, H: Copy + Send + 'static>(
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
    // A copy of `data`, kept until the stream has run past the copy (the driver may read it
    // only then: page-locked memory, or the virtual GPU's TOOLN1_VGPU_ASYNC=strict).
    c.gpu.htod_into_owned(dst.ptr(), data.to_vec())
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

/// `n` f32 zeros in page-locked host memory; pageable memory (and synchronous copies) when the
/// driver refuses to lock it, said once per process on stderr.
pub(crate) fn host_f32(c: &Cuda, n: usize) -> Result<HostF32> {
    static REFUSED: std::sync::Once = std::sync::Once::new();
    match c.gpu.pinned_f32(n) {
        Ok(p) => Ok(HostF32::new(Box::new(p))),
        Err(e) => {
            REFUSED.call_once(|| {
                eprintln!(
                    "note: page-locked host memory was refused ({e}); host buffers (the host \
                     optimizer's state and staging) use pageable memory, with synchronous copies"
                )
            });
            Ok(HostF32::pageable(vec![0.0; n]))
        }
    }
}

/// The first `n` values of each `(t, n)` of `src` into `dst`, one after another: on the copy
/// stream after the work queued so far when `dst` is page-locked, else synchronously.
pub(crate) fn download_f32_async(
    c: &Cuda,
    src: &[(&CudaBuf<f32>, usize)],
    mut dst: HostF32,
) -> Result<HostCopy> {
    for &(t, n) in src {
        check::first_n("download_f32_async", t, n)?;
    }
    let total = host_copy_len("download_f32_async", src.iter().map(|s| s.1), dst.len())?;
    if total == 0 {
        return Ok(HostCopy::done(dst));
    }
    if !dst.pinned() {
        let mut at = 0;
        for &(t, n) in src {
            let v: Vec<f32> = c.gpu.dtoh(t.ptr(), n)?;
            dst[at..at + n].copy_from_slice(&v);
            at += n;
        }
        return Ok(HostCopy::done(dst));
    }
    let mut out = &mut dst[..total];
    // SAFETY: `out` is page-locked memory owned by `dst`, which the returned copy owns until
    // the copies have completed (`HostCopy` waits before giving it back or freeing it).
    let ev = c.gpu.copy_async(CopyDir::ToHost, |s| {
        for &(t, n) in src {
            let (head, rest) = std::mem::take(&mut out).split_at_mut(n);
            if n > 0 {
                unsafe { dr::memcpy_dtoh_async(head, t.ptr(), s)? };
            }
            out = rest;
        }
        Ok(())
    })?;
    Ok(HostCopy::queued(dst, Box::new(ev)))
}

/// Each slice of `src` rounded to bf16 (to nearest even, as [`upload_bf16`]) in a new device
/// buffer, through `stage`: the bf16 bits are written one slice after another into its bytes
/// and copied on the copy stream after the work queued so far when it is page-locked, else
/// uploaded as [`upload_bf16`] does.
pub(crate) fn upload_async(
    c: &Cuda,
    src: &[&[f32]],
    mut stage: HostF32,
) -> Result<(Vec<CudaBuf<Bf16>>, HostCopy)> {
    let total = host_copy_len("upload_async", src.iter().map(|s| s.len()), stage.len())?;
    if !stage.pinned() || total == 0 {
        let ts = src
            .iter()
            .map(|s| upload_bf16(c, s))
            .collect::<Result<_>>()?;
        return Ok((ts, HostCopy::done(stage)));
    }
    let words = &mut stage[..total.div_ceil(2)];
    // SAFETY: the f32 storage holds at least 2 * ceil(total / 2) >= total u16, suitably aligned.
    let bits: &mut [u16] =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), total) };
    let mut at = 0;
    for s in src {
        round_bf16(s, &mut bits[at..at + s.len()]);
        at += s.len();
    }
    let bufs = src
        .iter()
        .map(|s| c.gpu.alloc::<Bf16>(s.len()))
        .collect::<Result<Vec<_>>>()?;
    let mut from = &bits[..];
    // SAFETY: `bits` lies in page-locked memory owned by `stage`, which the returned copy owns
    // until the copies have completed.
    let ev = c.gpu.copy_async(CopyDir::ToDevice, |st| {
        for (s, buf) in src.iter().zip(&bufs) {
            let (head, rest) = from.split_at(s.len());
            if !head.is_empty() {
                unsafe { dr::memcpy_htod_async(buf.ptr(), head, st)? };
            }
            from = rest;
        }
        Ok(())
    })?;
    Ok((bufs, HostCopy::queued(stage, Box::new(ev))))
}

/// bf16 bits of `src` (to nearest even) into `out`, in fixed chunks on the CPU backend's pool.
fn round_bf16(src: &[f32], out: &mut [u16]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    crate::backend::cpu::fast::run(|| {
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, s)| {
                for (o, &x) in o.iter_mut().zip(s) {
                    *o = half::bf16::from_f32(x).to_bits();
                }
            });
    });
}
