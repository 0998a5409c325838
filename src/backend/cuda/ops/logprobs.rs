//! Launchers of kernels/logprobs.cu: the fused lm_head + log-softmax + gather, streamed over
//! token x vocabulary chunks (a cuBLAS GEMM fills an f32 logits tile, a kernel with one block of
//! 256 threads per tile row folds it into running statistics), then a finalize pass per token.

use super::super::runtime::gen::launch::logprobs as k;
use super::super::runtime::{Bf16, BlasGemm, CudaBuf, Operand, Out};
use super::super::Cuda;
use super::linear::gemm_xwt;
use super::{blocks, ew, i32_of, util};
use crate::backend::{check, GemmDims, LmHead, LogprobsGrads, LogprobsOut, VocabDims};
use crate::Result;

/// What the kernels support beyond the shared contract: token and vocabulary positions that
/// fit in `int`.
fn limits(op: &'static str, n_tok: usize, vocab: usize) -> Result<()> {
    i32_of(op, "n_tok", n_tok)?;
    i32_of(op, "vocab", vocab)?;
    Ok(())
}

/// logp[t] = logits[t, targets[t]] - lse[t]; optionally the entropy per token.
pub(crate) fn forward(
    c: &Cuda,
    head: LmHead<'_, CudaBuf<Bf16>, CudaBuf<u32>>,
    out: LogprobsOut<'_, CudaBuf<f32>>,
    d: VocabDims,
    inv_t: f32,
) -> Result<()> {
    check::logprobs(head, &out, d, inv_t)?;
    let (LmHead { h, w, targets }, VocabDims { n_tok, dim, vocab }) = (head, d);
    let LogprobsOut { logp, lse, entropy } = out;
    limits("logprobs", n_tok, vocab)?;
    if n_tok == 0 {
        return Ok(());
    }
    let tc = c.tok_chunk.min(n_tok);
    let vc = c.vocab_chunk.min(vocab);
    let tile = c.gpu.alloc::<f32>(tc * vc)?;
    let mut m = c.gpu.alloc::<f32>(n_tok)?;
    let mut s = c.gpu.alloc::<f32>(n_tok)?;
    let mut wsum = c.gpu.alloc::<f32>(n_tok)?;
    let mut tgt = c.gpu.alloc::<f32>(n_tok)?;
    util::fill_f32(c, &mut tgt, n_tok, f32::NAN)?;
    for t0 in (0..n_tok).step_by(tc) {
        let rows = tc.min(n_tok - t0);
        for v0 in (0..vocab).step_by(vc) {
            let cols = vc.min(vocab - v0);
            gemm_xwt(
                c,
                h.at(t0 * dim),
                w.at(v0 * dim),
                Operand {
                    ptr: tile.ptr(),
                    ld: cols,
                },
                GemmDims {
                    m: rows,
                    n: cols,
                    k: dim,
                },
                0.0,
                true,
            )?;
            k::lp_chunk_fwd(
                &c.gpu,
                blocks(rows, 256),
                k::LpChunkFwd {
                    logits: &tile,
                    rows: rows as i32,
                    vc: cols as i32,
                    v0: v0 as i32,
                    targets,
                    t0: t0 as i32,
                    m: &mut m,
                    s: &mut s,
                    w: &mut wsum,
                    tgt: &mut tgt,
                    first: (v0 == 0) as i32,
                    inv_t,
                },
            )?;
        }
    }
    let ent: Out<'_, f32> = entropy.into();
    k::lp_finalize(
        &c.gpu,
        ew(n_tok),
        k::LpFinalize {
            m: &m,
            s: &s,
            w: &wsum,
            tgt: &tgt,
            targets,
            vocab: vocab as u32,
            logp,
            lse,
            entropy: ent,
            n: n_tok as i32,
            err: c.gpu.err(),
        },
    )
}

/// dh (overwritten) = dlogits · w, dw += dlogitsᵀ · h, per token x vocabulary chunk: the
/// logits tile is recomputed, a kernel turns it into bf16 dlogits, two GEMMs accumulate.
pub(crate) fn backward(
    c: &Cuda,
    dlogp: &CudaBuf<f32>,
    head: LmHead<'_, CudaBuf<Bf16>, CudaBuf<u32>>,
    lse: &CudaBuf<f32>,
    grads: LogprobsGrads<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    d: VocabDims,
    inv_t: f32,
) -> Result<()> {
    check::logprobs_bwd(dlogp, head, lse, &grads, d, inv_t)?;
    let (LmHead { h, w, targets }, VocabDims { n_tok, dim, vocab }) = (head, d);
    let LogprobsGrads { dh, dw } = grads;
    limits("logprobs_bwd", n_tok, vocab)?;
    let dw_ptr = dw.map(|d| d.ptr());
    if n_tok == 0 {
        return Ok(());
    }
    let tc = c.tok_chunk.min(n_tok);
    let vc = c.vocab_chunk.min(vocab);
    let tile = c.gpu.alloc::<f32>(tc * vc)?;
    let mut dl = c.gpu.alloc::<Bf16>(tc * vc)?;
    let dh32 = c.gpu.alloc::<f32>(tc * dim)?;
    for t0 in (0..n_tok).step_by(tc) {
        let rows = tc.min(n_tok - t0);
        for v0 in (0..vocab).step_by(vc) {
            let cols = vc.min(vocab - v0);
            gemm_xwt(
                c,
                h.at(t0 * dim),
                w.at(v0 * dim),
                Operand {
                    ptr: tile.ptr(),
                    ld: cols,
                },
                GemmDims {
                    m: rows,
                    n: cols,
                    k: dim,
                },
                0.0,
                true,
            )?;
            k::lp_chunk_bwd(
                &c.gpu,
                blocks(rows, 256),
                k::LpChunkBwd {
                    logits: &tile,
                    rows: rows as i32,
                    vc: cols as i32,
                    v0: v0 as i32,
                    targets,
                    t0: t0 as i32,
                    lse,
                    dlogp,
                    dl: &mut dl,
                    inv_t,
                },
            )?;
            // dh32[rows, dim] (+)= dl[rows, cols] w[v0.., dim]: column-major dh^T = w^T dl^T
            let beta = if v0 == 0 { 0.0 } else { 1.0 };
            c.gpu.gemm(
                BlasGemm {
                    ta: false,
                    tb: false,
                    m: dim,
                    n: rows,
                    k: cols,
                },
                Operand {
                    ptr: w.at(v0 * dim),
                    ld: dim,
                },
                Operand {
                    ptr: dl.ptr(),
                    ld: cols,
                },
                beta,
                Operand {
                    ptr: dh32.ptr(),
                    ld: dim,
                },
                true,
            )?;
            if let Some(dwp) = dw_ptr {
                // dw[v0.., dim] += dl^T h: column-major dw^T[dim, cols] += h^T[dim, rows] dl[rows, cols]
                c.gpu.gemm(
                    BlasGemm {
                        ta: false,
                        tb: true,
                        m: dim,
                        n: cols,
                        k: rows,
                    },
                    Operand {
                        ptr: h.at(t0 * dim),
                        ld: dim,
                    },
                    Operand {
                        ptr: dl.ptr(),
                        ld: cols,
                    },
                    1.0,
                    Operand {
                        ptr: dwp + (v0 * dim * 4) as u64,
                        ld: dim,
                    },
                    true,
                )?;
            }
        }
        util::f32_to_bf16(c, dh32.view(0), dh.view_mut(t0 * dim), rows * dim)?;
    }
    Ok(())
}
