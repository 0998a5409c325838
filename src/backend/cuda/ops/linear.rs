//! The linear layer and the full logits: cuBLAS GEMMs (bf16 inputs, f32 compute), with the
//! bias broadcast and bias-gradient column sums of kernels/util.cu.

use super::super::runtime::{Bf16, BlasGemm, CudaBuf, Operand};
use super::super::Cuda;
use super::{i32_of, util};
use crate::backend::{check, GemmDims, LinearGrads, VocabDims};
use crate::Result;

/// Row-major y[m, n] (= or += by `beta`) x[m, k] · w[n, k]ᵀ, with `y.ld` the row stride of y
/// and y f32 (`y_f32`) or bf16; x and w are device addresses of bf16 data.
pub(crate) fn gemm_xwt(
    c: &Cuda,
    x: u64,
    w: u64,
    y: Operand,
    d: GemmDims,
    beta: f32,
    y_f32: bool,
) -> Result<()> {
    let GemmDims { m, n, k } = d;
    // Row-major y[m,n] = x[m,k] w[n,k]^T  <=>  column-major y^T[n,m] = w^T x^T.
    let g = BlasGemm {
        ta: true,
        tb: false,
        m: n,
        n: m,
        k,
    };
    let (w, x) = (Operand { ptr: w, ld: k }, Operand { ptr: x, ld: k });
    c.gpu.gemm(g, w, x, beta, y, y_f32)
}

/// y[m,n] = x[m,k] · w[n,k]ᵀ (+ bias[n])
pub(crate) fn forward(
    c: &Cuda,
    x: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    bias: Option<&CudaBuf<Bf16>>,
    y: &mut CudaBuf<Bf16>,
    d: GemmDims,
) -> Result<()> {
    check::linear(x, w, bias, y, d)?;
    let GemmDims { m, n, k } = d;
    let beta = if let Some(b) = bias {
        util::bias_rows(
            c,
            b,
            y,
            i32_of("linear", "m", m)?,
            i32_of("linear", "n", n)?,
        )?;
        1.0
    } else {
        0.0
    };
    gemm_xwt(
        c,
        x.ptr(),
        w.ptr(),
        Operand {
            ptr: y.ptr(),
            ld: n,
        },
        GemmDims { m, n, k },
        beta,
        false,
    )
}

/// dx (= or +=) dy · w; dw += dyᵀ · x (f32); dbias += column sums of dy.
pub(crate) fn backward(
    c: &Cuda,
    dy: &CudaBuf<Bf16>,
    x: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    grads: LinearGrads<'_, CudaBuf<Bf16>, CudaBuf<f32>>,
    d: GemmDims,
) -> Result<()> {
    let LinearGrads {
        dx,
        accumulate_dx,
        dw,
        dbias,
    } = grads;
    check::linear_bwd(dy, x, w, dx.as_deref(), dw.as_deref(), dbias.as_deref(), d)?;
    let GemmDims { m, n, k } = d;
    if let Some(dx) = dx {
        // column-major dx^T[k,m] = w^T[k,n] dy^T[n,m]
        let beta = if accumulate_dx { 1.0 } else { 0.0 };
        c.gpu.gemm(
            BlasGemm {
                ta: false,
                tb: false,
                m: k,
                n: m,
                k: n,
            },
            Operand {
                ptr: w.ptr(),
                ld: k,
            },
            Operand {
                ptr: dy.ptr(),
                ld: n,
            },
            beta,
            Operand {
                ptr: dx.ptr(),
                ld: k,
            },
            false,
        )?;
    }
    if let Some(dw) = dw {
        // column-major dw^T[k,n] += x^T[k,m] dy[m,n]
        c.gpu.gemm(
            BlasGemm {
                ta: false,
                tb: true,
                m: k,
                n,
                k: m,
            },
            Operand {
                ptr: x.ptr(),
                ld: k,
            },
            Operand {
                ptr: dy.ptr(),
                ld: n,
            },
            1.0,
            Operand {
                ptr: dw.ptr(),
                ld: k,
            },
            true,
        )?;
    }
    if let Some(db) = dbias {
        let op = "linear_bwd";
        util::colsum_accum(c, dy, db, i32_of(op, "m", m)?, i32_of(op, "n", n)?)?;
    }
    Ok(())
}

/// out[r, v] = h[r, :] · w[v, :] in f32.
pub(crate) fn logits(
    c: &Cuda,
    h: &CudaBuf<Bf16>,
    w: &CudaBuf<Bf16>,
    out: &mut CudaBuf<f32>,
    d: VocabDims,
) -> Result<()> {
    check::logits(h, w, out, d)?;
    let (rows, vocab) = (d.n_tok, d.vocab);
    gemm_xwt(
        c,
        h.ptr(),
        w.ptr(),
        Operand {
            ptr: out.ptr(),
            ld: vocab,
        },
        GemmDims {
            m: rows,
            n: vocab,
            k: d.dim,
        },
        0.0,
        true,
    )
}
