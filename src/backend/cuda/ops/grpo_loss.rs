//! Launchers of kernels/grpo_loss.cu: the per-token clipped surrogate + KL (grid-stride blocks
//! of 256), the masked per-sequence sums reduced on the device (one block of 256 per sequence
//! plus one for the whole call), the aggregation of those sums on the host
//! ([`crate::backend::loss`], the same as the CPU backend's), and dlogp.

use super::super::runtime::gen::launch::grpo_loss as k;
use super::super::runtime::CudaBuf;
use super::super::Cuda;
use super::{blocks, ew, i32_of};
use crate::backend::loss::Aggregation;
use crate::backend::{check, GrpoLossCfg, GrpoLossOut, GrpoTokens, KlKind};
use crate::Result;

fn kl_code(k: KlKind) -> i32 {
    match k {
        KlKind::K1 => 0,
        KlKind::Abs => 1,
        KlKind::K2 => 2,
        KlKind::K3 => 3,
    }
}

/// The GRPO loss of `n_tok` tokens in `n_seq` sequences; writes dlogp. The only transfers are
/// the n_seq * 3 + 4 sums down and the n_seq weights up. A seq_id out of range or a bad mask
/// weight is found on the device and reported by the download's synchronisation, before dlogp
/// is written.
pub(crate) fn grpo_loss(
    c: &Cuda,
    tokens: &GrpoTokens<'_, CudaBuf<f32>, CudaBuf<u32>>,
    dlogp: &mut CudaBuf<f32>,
    cfg: &GrpoLossCfg,
) -> Result<GrpoLossOut> {
    let op = "grpo_loss";
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
    let n = i32_of(op, "n_tok", n_tok)?;
    let ns = i32_of(op, "n_seq", n_seq)?;
    if n_tok == 0 {
        return Ok(GrpoLossOut::default());
    }
    let mut stats = c.gpu.alloc::<f32>(6 * n_tok)?;
    k::grpo_token_fwd(
        &c.gpu,
        ew(n_tok),
        k::GrpoTokenFwd {
            logp,
            old_logp,
            ref_logp,
            adv,
            stats: &mut stats,
            n,
            clip_low: cfg.clip_low,
            clip_high: cfg.clip_high,
            kl_coef: cfg.kl_coef,
            kl_kind: kl_code(cfg.kl_kind),
        },
    )?;
    let mut sums = c.gpu.alloc::<f64>(3 * n_seq + 4)?;
    k::grpo_seq_sums(
        &c.gpu,
        blocks(n_seq + 1, 256),
        k::GrpoSeqSums {
            stats: &stats,
            mask,
            seq_id,
            sums: &mut sums,
            n,
            n_seq: ns,
            err: c.gpu.err(),
        },
    )?;
    let sums: Vec<f64> = c.gpu.dtoh(sums.ptr(), 3 * n_seq + 4)?;
    let (out, wseq) = reduce(&sums, n_seq, cfg);
    let wbuf = c.gpu.htod::<f32, f32>(&wseq)?;
    let a = k::GrpoTokenBwd {
        stats: &stats,
        mask,
        seq_id,
        wseq: &wbuf,
        dlogp,
        n,
    };
    k::grpo_token_bwd(&c.gpu, ew(n_tok), a)?;
    Ok(out)
}

/// The loss scalars and the per-sequence gradient weights w[s] = d loss / d tok_t for the tokens
/// of sequence s (the kernel multiplies by the token's mask), in f64, from the device sums
/// (per sequence: Σ m, Σ m tok, Σ m pg; then over all tokens: Σ m, Σ m kl, Σ m clipped,
/// Σ m ratio).
fn reduce(sums: &[f64], n_seq: usize, cfg: &GrpoLossCfg) -> (GrpoLossOut, Vec<f32>) {
    let per = |k: usize| (0..n_seq).map(move |s| sums[3 * s + k]);
    let g = &sums[3 * n_seq..];
    let agg = Aggregation::new(cfg, per(0).collect(), g[0]);
    let weights: Vec<f64> = (0..n_seq).map(|s| agg.seq_weight(s)).collect();
    let weighted = |k: usize| -> f64 { per(k).zip(&weights).map(|(x, w)| x * w).sum() };
    let out = GrpoLossOut {
        loss: (weighted(1) / agg.div()) as f32,
        pg_loss: weighted(2) as f32,
        kl: agg.token_mean(g[1]) as f32,
        clip_frac: agg.token_mean(g[2]) as f32,
        ratio_mean: agg.token_mean(g[3]) as f32,
        n_tokens: agg.total() as f32,
    };
    let wseq = weights.iter().map(|w| (w / agg.div()) as f32).collect();
    (out, wseq)
}
