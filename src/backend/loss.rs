//! The GRPO loss aggregation, written once: how per-token losses become the loss scalar (verl's
//! `agg_loss`, verl/trainer/ppo/core_algos.py), used by the CPU math, by the CUDA backend (on
//! the per-sequence sums its kernel reduces on the device) and by the trainer (the micro-batch
//! scale).
//!
//! With `L_t` the loss of token t, `m_t` its mask weight and s(t) its sequence, the loss is
//! Σ_t (m_t / den[s(t)]) L_t / loss_scale_div, where den per [`LossAgg`]:
//! - token-mean: Σ_t m_t (all masked tokens);
//! - seq-mean-token-sum: n_seq;
//! - seq-mean-token-mean: (Σ_{t∈s} m_t) · (number of sequences with Σ m > 0);
//! - seq-mean-token-sum-norm (Dr.GRPO): norm_len.

use super::cpu::math::Real;
use super::{GrpoLossCfg, LossAgg};

/// The weights of one GRPO loss call's tokens, from the masked token count of every sequence.
#[derive(Clone, Debug)]
pub struct Aggregation<R> {
    /// The denominator of every sequence's tokens.
    den: Vec<R>,
    /// Σ m over every sequence.
    seq_cnt: Vec<R>,
    /// Σ m over all tokens.
    total: R,
    /// `loss_scale_div`.
    div: R,
}

impl<R: Real> Aggregation<R> {
    /// `seq_cnt[s]` = Σ m_t over the tokens of sequence s, `total` = Σ m_t over all tokens
    /// (summed by the caller in its own order and precision).
    pub fn new(cfg: &GrpoLossCfg, seq_cnt: Vec<R>, total: R) -> Self {
        let n_seq = seq_cnt.len();
        let nonempty = seq_cnt.iter().filter(|&&c| c != R::zero()).count();
        let den = seq_cnt
            .iter()
            .map(|&c| match cfg.agg {
                LossAgg::TokenMean => total,
                LossAgg::SeqMeanTokenSum => R::from_usize(n_seq),
                LossAgg::SeqMeanTokenMean => c * R::from_usize(nonempty),
                LossAgg::SeqMeanTokenSumNorm => R::from_f64(cfg.norm_len as f64),
            })
            .collect();
        Aggregation {
            den,
            seq_cnt,
            total,
            div: R::from_f64(cfg.loss_scale_div as f64),
        }
    }

    /// The weight of a token of sequence `s` with mask `m` in the aggregate (before the division
    /// by `loss_scale_div`): m / den[s], exactly 0 where m is 0.
    pub fn token_weight(&self, s: usize, m: R) -> R {
        if m == R::zero() {
            R::zero()
        } else {
            m / self.den[s]
        }
    }

    /// The weight of one unit of mask in sequence `s`: 1 / den[s], 0 for a sequence without
    /// masked tokens (none of whose tokens counts).
    pub fn seq_weight(&self, s: usize) -> R {
        if self.seq_cnt[s] == R::zero() {
            R::zero()
        } else {
            R::one() / self.den[s]
        }
    }

    /// `loss_scale_div`, which divides the loss and its gradient.
    pub fn div(&self) -> R {
        self.div
    }

    /// Σ m over all tokens.
    pub fn total(&self) -> R {
        self.total
    }

    /// A masked token sum as a mean over the masked tokens (0 without any): the kl, clip
    /// fraction and ratio statistics.
    pub fn token_mean(&self, x: R) -> R {
        if self.total != R::zero() {
            x / self.total
        } else {
            R::zero()
        }
    }
}

/// The factor a micro-batch's `loss_scale_div` is multiplied by so that the micro-batch losses
/// of one mini-batch add up to the loss the aggregation defines over the whole mini-batch,
/// whatever the split: the mini-batch has `total_tokens` masked tokens in `total_seqs`
/// sequences, the micro-batch `tokens` in `seqs`.
pub fn micro_batch_scale(
    agg: LossAgg,
    total_tokens: usize,
    tokens: usize,
    total_seqs: usize,
    seqs: usize,
) -> f32 {
    match agg {
        LossAgg::TokenMean => total_tokens as f32 / tokens as f32,
        LossAgg::SeqMeanTokenSum | LossAgg::SeqMeanTokenMean => total_seqs as f32 / seqs as f32,
        // A plain sum over sequences (divided by the constant horizon): parts add up.
        LossAgg::SeqMeanTokenSumNorm => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{KlKind, LossAgg};

    fn cfg(agg: LossAgg) -> GrpoLossCfg {
        GrpoLossCfg {
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 0.0,
            kl_kind: KlKind::K3,
            agg,
            norm_len: 4.0,
            loss_scale_div: 2.0,
        }
    }

    /// Token and sequence weights of every mode, by hand: sequences with 2, 0 and 3 masked
    /// tokens (two non-empty).
    #[test]
    fn weights_of_every_mode() {
        for agg in LossAgg::ALL {
            let a = Aggregation::new(&cfg(agg), vec![2.0f64, 0.0, 3.0], 5.0);
            let den = |s: usize| match agg {
                LossAgg::TokenMean => 5.0,
                LossAgg::SeqMeanTokenSum => 3.0,
                LossAgg::SeqMeanTokenMean => [2.0, 0.0, 3.0][s] * 2.0,
                LossAgg::SeqMeanTokenSumNorm => 4.0,
            };
            for s in [0, 2] {
                assert_eq!(a.token_weight(s, 1.0), 1.0 / den(s), "{agg:?}");
                assert_eq!(a.token_weight(s, 0.5), 0.5 / den(s), "{agg:?}");
                assert_eq!(a.seq_weight(s), 1.0 / den(s), "{agg:?}");
            }
            assert_eq!(a.token_weight(0, 0.0), 0.0);
            assert_eq!(a.seq_weight(1), 0.0, "{agg:?}: an empty sequence counts");
            assert_eq!(a.div(), 2.0);
            assert_eq!(a.token_mean(2.5), 0.5);
        }
        let none = Aggregation::new(&cfg(LossAgg::TokenMean), vec![0.0f64; 2], 0.0);
        assert_eq!(none.token_mean(0.0), 0.0);
        assert_eq!(none.seq_weight(0), 0.0);
    }

    /// Split into micro-batches, each with its own aggregation and `loss_scale_div` multiplied
    /// by the micro-batch scale, the losses add up to the whole mini-batch's loss in every mode.
    #[test]
    fn micro_batch_losses_add_up() {
        // token losses of 4 sequences (every sequence has masked tokens, as in the trainer)
        let seqs: Vec<Vec<f64>> = vec![
            vec![0.3, -1.2],
            vec![2.0, 0.5, 0.25],
            vec![-0.7],
            vec![1.5, 1.0, -0.5, 0.125],
        ];
        let loss = |part: &[Vec<f64>], cfg: &GrpoLossCfg| -> f64 {
            let cnt: Vec<f64> = part.iter().map(|s| s.len() as f64).collect();
            let total = cnt.iter().sum();
            let a = Aggregation::new(cfg, cnt, total);
            let sum: f64 = part
                .iter()
                .enumerate()
                .flat_map(|(s, l)| l.iter().map(move |x| (s, x)))
                .map(|(s, x)| a.token_weight(s, 1.0) * x)
                .sum();
            sum / a.div()
        };
        let tokens = |p: &[Vec<f64>]| p.iter().map(|s| s.len()).sum::<usize>();
        for agg in LossAgg::ALL {
            let whole = loss(&seqs, &cfg(agg));
            let mut parts = 0.0;
            for part in [&seqs[..1], &seqs[1..3], &seqs[3..]] {
                let scale = micro_batch_scale(agg, tokens(&seqs), tokens(part), 4, part.len());
                let c = GrpoLossCfg {
                    loss_scale_div: 2.0 * scale,
                    ..cfg(agg)
                };
                parts += loss(part, &c);
            }
            assert!((parts - whole).abs() < 1e-6, "{agg:?}: {parts} vs {whole}");
        }
    }
}
