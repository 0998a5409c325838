//! Launchers of kernels/grpo_loss.cu: per-token clipped surrogate + KL (grid-stride blocks of
//! 256), the reduction to the loss scalars and per-sequence weights, and dlogp.

use super::super::runtime::gen::launch::grpo_loss as k;
use super::super::runtime::CudaBuf;
use super::super::Cuda;
use super::{ew, i32_of};
use crate::backend::{check, GrpoLossCfg, GrpoLossOut, GrpoTokens, KlKind, LossAgg};
use crate::Result;

fn kl_code(k: KlKind) -> i32 {
    match k {
        KlKind::K1 => 0,
        KlKind::Abs => 1,
        KlKind::K2 => 2,
        KlKind::K3 => 3,
    }
}

/// The GRPO loss of `n_tok` tokens in `n_seq` sequences; writes dlogp.
pub(crate) fn grpo_loss(
    c: &Cuda,
    tokens: &GrpoTokens<'_, CudaBuf<f32>, CudaBuf<u32>>,
    dlogp: &mut CudaBuf<f32>,
    cfg: &GrpoLossCfg,
) -> Result<GrpoLossOut> {
    check::grpo_loss(tokens, dlogp, cfg)?;
    let GrpoTokens {
        logp,
        old_logp,
        ref_logp,
        adv,
        mask,
        seq_id,
        n_tok,
        n_seq,
    } = *tokens;
    let n = i32_of("grpo_loss", "n_tok", n_tok)?;
    if n_tok == 0 {
        return Ok(GrpoLossOut::default());
    }
    let mut stats = c.gpu.alloc::<f32>(6 * n_tok)?;
    k::grpo_token_fwd(
        &c.gpu,
        ew(n_tok),
        logp,
        old_logp,
        ref_logp,
        adv,
        &mut stats,
        n,
        cfg.clip_low,
        cfg.clip_high,
        cfg.kl_coef,
        kl_code(cfg.kl_kind),
    )?;
    let st: Vec<f32> = c.gpu.dtoh(stats.ptr(), 5 * n_tok)?;
    let mk: Vec<f32> = c.gpu.dtoh(mask.ptr(), n_tok)?;
    let sid: Vec<u32> = c.gpu.dtoh(seq_id.ptr(), n_tok)?;
    let (out, wseq) = grpo_reduce(&st, &mk, &sid, n_tok, n_seq, cfg)?;
    let wbuf = c.gpu.htod::<f32, f32>(&wseq)?;
    k::grpo_token_bwd(&c.gpu, ew(n_tok), &stats, mask, seq_id, &wbuf, dlogp, n)?;
    Ok(out)
}

/// Reduces the per-token GRPO rows (tok, pg, kl, clipped, ratio) to the loss scalars in f64 and
/// returns the per-sequence gradient weight w[s] = d loss / d tok_t for tokens of sequence s
/// (the mask value multiplies it on the device). Same aggregation as the CPU backend:
/// token-mean Σ m L / Σ m; seq-mean-token-sum Σ_s (Σ m L) / n_seq; seq-mean-token-mean mean over
/// non-empty sequences of (Σ m L / Σ m); seq-mean-token-sum-norm Σ m L / norm_len.
fn grpo_reduce(
    st: &[f32],
    mask: &[f32],
    seq: &[u32],
    n: usize,
    n_seq: usize,
    cfg: &GrpoLossCfg,
) -> Result<(GrpoLossOut, Vec<f32>)> {
    check::ids_below("grpo_loss", "seq_id", seq, n, n_seq, "n_seq")?;
    check::mask_weights(&mask[..n])?;
    let row = |k: usize, t: usize| st[k * n + t] as f64;
    let mut cnt_s = vec![0f64; n_seq];
    let mut tok_s = vec![0f64; n_seq];
    let mut pg_s = vec![0f64; n_seq];
    let (mut cnt, mut kl, mut clip, mut ratio) = (0f64, 0f64, 0f64, 0f64);
    for t in 0..n {
        let s = seq[t] as usize;
        let mk = mask[t] as f64;
        if mk == 0.0 {
            continue;
        }
        cnt_s[s] += mk;
        tok_s[s] += mk * row(0, t);
        pg_s[s] += mk * row(1, t);
        cnt += mk;
        kl += mk * row(2, t);
        clip += mk * row(3, t);
        ratio += mk * row(4, t);
    }
    let nonempty = cnt_s.iter().filter(|&&c| c != 0.0).count().max(1) as f64;
    let div = cfg.loss_scale_div as f64;
    // Weight of one unit of mask of sequence s in the aggregate.
    let w: Vec<f64> = (0..n_seq)
        .map(|s| match cfg.agg {
            LossAgg::TokenMean => {
                if cnt > 0.0 {
                    1.0 / cnt
                } else {
                    0.0
                }
            }
            LossAgg::SeqMeanTokenSum => 1.0 / n_seq.max(1) as f64,
            LossAgg::SeqMeanTokenMean => {
                if cnt_s[s] > 0.0 {
                    1.0 / (cnt_s[s] * nonempty)
                } else {
                    0.0
                }
            }
            LossAgg::SeqMeanTokenSumNorm => 1.0 / cfg.norm_len as f64,
        })
        .collect();
    let agg = |per: &[f64]| -> f64 { per.iter().zip(&w).map(|(x, ws)| x * ws).sum() };
    let mean = |x: f64| if cnt > 0.0 { x / cnt } else { 0.0 };
    let out = GrpoLossOut {
        loss: (agg(&tok_s) / div) as f32,
        pg_loss: agg(&pg_s) as f32,
        kl: mean(kl) as f32,
        clip_frac: mean(clip) as f32,
        ratio_mean: mean(ratio) as f32,
        n_tokens: cnt as f32,
    };
    Ok((out, w.into_iter().map(|x| (x / div) as f32).collect()))
}
