//! The f32 CPU backend.
//!
//! The math of every op lives in [`math`], generic over [`math::Real`], so that the tests run
//! the very same code in f64 for finite-difference checks: it is the oracle. The ops run the
//! multi-threaded, blocked f32 paths of [`fast`] (tested against [`math`] op by op). Each op
//! first checks its arguments against the shared contract ([`crate::backend::check`], the same
//! checks as the CUDA backend's) and then what only the data can tell (ids against their
//! ranges, decode lengths, sampling logits, GRPO masks), with the same structured errors.
//!
//! Threads: all available cores unless [`set_num_threads`] or the `TOOLN1_NUM_THREADS` (else
//! `RAYON_NUM_THREADS`) environment variable says otherwise. Results are the same bits for
//! every thread count.

pub mod fast;
pub mod math;
pub mod reuse_alloc;

pub use fast::{default_num_threads, num_threads, set_num_threads};
pub use reuse_alloc::ReuseAlloc;

use crate::backend::check;
use crate::backend::host_adamw;
use crate::backend::{
    AdamWState, AdamWStep, AttnGrads, AttnSaved, Backend, Cached, DType, GemmDims, GrpoLossCfg,
    GrpoLossOut, GrpoTokens, Heads, KeptLogits, KvRows, LinearGrads, LmHead, LogprobsGrads,
    LogprobsOut, NormDims, NormGrads, NormOut, Packed, Prefix, Qkv, RopeRows, RowCopy,
    SampleParams, SampleRows, VocabDims,
};
use crate::Result;

/// The CPU backend (f32 everywhere).
#[derive(Clone, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type T = Vec<f32>;
    type F = Vec<f32>;
    type I = Vec<u32>;

    fn name(&self) -> String {
        "cpu (f32)".into()
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn zeros_f32(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_f32(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_u32(&self, data: &[u32]) -> Result<Vec<u32>> {
        Ok(data.to_vec())
    }
    fn upload_raw(&self, dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
        check::upload_raw(dtype, bytes.len(), n)?;
        Ok(crate::backend::bytes_to_f32(dtype, bytes))
    }
    fn download(&self, t: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        check::first_n("download", t, n)?;
        Ok(t[..n].to_vec())
    }
    fn download_f32(&self, t: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        check::first_n("download_f32", t, n)?;
        Ok(t[..n].to_vec())
    }
    fn download_u32(&self, t: &Vec<u32>, n: usize) -> Result<Vec<u32>> {
        check::first_n("download_u32", t, n)?;
        Ok(t[..n].to_vec())
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) -> Result<()> {
        check::copy("copy", src, dst, n)?;
        dst[..n].copy_from_slice(&src[..n]);
        Ok(())
    }
    fn copy_f32(&self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) -> Result<()> {
        check::copy("copy_f32", src, dst, n)?;
        dst[..n].copy_from_slice(&src[..n]);
        Ok(())
    }
    fn copy_rows(&self, t: &mut Vec<f32>, c: RowCopy) -> Result<()> {
        check::copy_rows(t, c)?;
        t.copy_within(c.src * c.width..(c.src + c.n) * c.width, c.dst * c.width);
        Ok(())
    }
    fn fill_f32(&self, t: &mut Vec<f32>, n: usize, value: f32) -> Result<()> {
        check::first_n("fill_f32", t, n)?;
        t[..n].fill(value);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn add_inplace(&self, a: &mut Vec<f32>, b: &Vec<f32>, n: usize) -> Result<()> {
        check::add_inplace(a, b, n)?;
        fast::run(|| fast::add_inplace(&mut a[..n], &b[..n]));
        Ok(())
    }
    fn sum_squares_f32(&self, t: &Vec<f32>, n: usize) -> Result<f64> {
        check::first_n("sum_squares_f32", t, n)?;
        Ok(t[..n].iter().map(|&x| x as f64 * x as f64).sum())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        y: &mut Vec<f32>,
        d: GemmDims,
    ) -> Result<()> {
        check::linear(x, w, bias, y, d)?;
        let GemmDims { m, n, k } = d;
        fast::run(|| fast::linear(x, w, bias.map(|b| b.as_slice()), y, m, n, k));
        Ok(())
    }

    fn linear_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        grads: LinearGrads<'_, Vec<f32>, Vec<f32>>,
        d: GemmDims,
    ) -> Result<()> {
        let LinearGrads {
            dx,
            accumulate_dx,
            dw,
            dbias,
        } = grads;
        check::linear_bwd(dy, x, w, dx.as_deref(), dw.as_deref(), dbias.as_deref(), d)?;
        let grads = LinearGrads {
            dx: dx.map(|d| d.as_mut_slice()),
            accumulate_dx,
            dw: dw.map(|d| d.as_mut_slice()),
            dbias: dbias.map(|d| d.as_mut_slice()),
        };
        fast::run(|| fast::linear_bwd(dy, x, w, grads, d));
        Ok(())
    }

    fn embedding(
        &self,
        ids: &Vec<u32>,
        table: &Vec<f32>,
        out: &mut Vec<f32>,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        let rows = check::embedding("embedding", ids, out, table, n_tok, dim)?;
        check::ids_below("embedding", "ids", ids, n_tok, rows, "table rows")?;
        math::embedding(ids, table, out, n_tok, dim);
        Ok(())
    }

    fn embedding_bwd(
        &self,
        ids: &Vec<u32>,
        dout: &Vec<f32>,
        dtable: &mut Vec<f32>,
        n_tok: usize,
        dim: usize,
    ) -> Result<()> {
        let rows = check::embedding("embedding_bwd", ids, dout, dtable, n_tok, dim)?;
        check::ids_below("embedding_bwd", "ids", ids, n_tok, rows, "dtable rows")?;
        math::embedding_bwd(ids, dout, dtable, n_tok, dim);
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        ids: &Vec<u32>,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        n: usize,
        dst_rows: usize,
        dim: usize,
    ) -> Result<()> {
        check::scatter_add_rows(ids, src, dst, n, dst_rows, dim)?;
        check::ids_below("scatter_add_rows", "ids", ids, n, dst_rows, "dst_rows")?;
        math::scatter_add_rows(ids, src, dst, n, dim);
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        d: NormDims,
        eps: f32,
    ) -> Result<()> {
        check::rmsnorm(x, w, out, rstd, d)?;
        fast::run(|| fast::rmsnorm(x, w, out, rstd, d, eps));
        Ok(())
    }

    fn add_rmsnorm(
        &self,
        x: &mut Vec<f32>,
        delta: &Vec<f32>,
        w: &Vec<f32>,
        y: NormOut<'_, Vec<f32>, Vec<f32>>,
        d: NormDims,
        eps: f32,
    ) -> Result<()> {
        check::add_rmsnorm(x, delta, w, &y, d)?;
        let y = NormOut {
            out: y.out.as_mut_slice(),
            rstd: y.rstd.as_mut_slice(),
        };
        fast::run(|| fast::add_rmsnorm(x, delta, w, y, d, eps));
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        grads: NormGrads<'_, Vec<f32>, Vec<f32>>,
        d: NormDims,
    ) -> Result<()> {
        check::rmsnorm_bwd(dout, x, w, rstd, &grads, d)?;
        let grads = NormGrads {
            dx: grads.dx.as_mut_slice(),
            dw: grads.dw.map(|d| d.as_mut_slice()),
        };
        fast::run(|| fast::rmsnorm_bwd(dout, x, w, rstd, grads, d));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        pos: &Vec<u32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        let d = RopeRows {
            n_tok,
            n_heads,
            head_dim,
        };
        check::rope("rope", x, pos, d, theta)?;
        fast::run(|| fast::rope(x, pos, d, theta, false));
        Ok(())
    }

    fn rope_bwd(
        &self,
        dx: &mut Vec<f32>,
        pos: &Vec<u32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        let d = RopeRows {
            n_tok,
            n_heads,
            head_dim,
        };
        check::rope("rope_bwd", dx, pos, d, theta)?;
        fast::run(|| fast::rope(dx, pos, d, theta, true));
        Ok(())
    }

    fn attention(
        &self,
        qkv: Qkv<'_, Vec<f32>>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        seqs: &Packed<'_, Vec<u32>>,
        heads: Heads,
    ) -> Result<()> {
        check::attention(qkv, out, lse, seqs, heads)?;
        check::same_offsets("attention", seqs.cu_seqlens, seqs.cu_host)?;
        let qkv = slices(qkv);
        fast::run(|| fast::attention(qkv, out, lse, seqs.cu_host, heads));
        Ok(())
    }

    fn attention_bwd(
        &self,
        qkv: Qkv<'_, Vec<f32>>,
        saved: AttnSaved<'_, Vec<f32>, Vec<f32>>,
        grads: AttnGrads<'_, Vec<f32>>,
        seqs: &Packed<'_, Vec<u32>>,
        heads: Heads,
    ) -> Result<()> {
        check::attention_bwd(qkv, saved, &grads, seqs, heads)?;
        check::same_offsets("attention_bwd", seqs.cu_seqlens, seqs.cu_host)?;
        let (qkv, saved, grads) = (slices(qkv), saved_slices(saved), grad_slices(grads));
        fast::run(|| fast::attention_bwd(qkv, saved, grads, seqs.cu_host, heads));
        Ok(())
    }

    fn attention_prefixed(
        &self,
        qkv: Qkv<'_, Vec<f32>>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        seqs: &Packed<'_, Vec<u32>>,
        prefix: &Prefix<'_, Vec<u32>>,
        heads: Heads,
    ) -> Result<()> {
        let op = "attention_prefixed";
        check::attention_prefixed(op, qkv, (out, lse), None, seqs, prefix, heads)?;
        check::same_offsets(op, seqs.cu_seqlens, seqs.cu_host)?;
        check::same_prefix(op, prefix.prefix, prefix.prefix_host)?;
        let (qkv, cu, pre) = (slices(qkv), seqs.cu_host, prefix.prefix_host);
        fast::run(|| fast::attention_prefixed(qkv, out, lse, cu, pre, heads));
        Ok(())
    }

    fn attention_prefixed_bwd(
        &self,
        qkv: Qkv<'_, Vec<f32>>,
        saved: AttnSaved<'_, Vec<f32>, Vec<f32>>,
        grads: AttnGrads<'_, Vec<f32>>,
        seqs: &Packed<'_, Vec<u32>>,
        prefix: &Prefix<'_, Vec<u32>>,
        heads: Heads,
    ) -> Result<()> {
        let op = "attention_prefixed_bwd";
        let AttnSaved { dout, out, lse } = saved;
        let bufs: check::BwdGrads<'_> = (dout, &*grads.dq, &*grads.dk, &*grads.dv);
        check::attention_prefixed(op, qkv, (out, lse), Some(bufs), seqs, prefix, heads)?;
        check::same_offsets(op, seqs.cu_seqlens, seqs.cu_host)?;
        check::same_prefix(op, prefix.prefix, prefix.prefix_host)?;
        let (qkv, saved, grads) = (slices(qkv), saved_slices(saved), grad_slices(grads));
        let (cu, pre) = (seqs.cu_host, prefix.prefix_host);
        fast::run(|| fast::attention_prefixed_bwd(qkv, saved, grads, cu, pre, heads));
        Ok(())
    }

    fn kv_store(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        dst: &Vec<u32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        kv: KvRows,
    ) -> Result<()> {
        let rows = check::kv_store(k, v, dst, k_cache, v_cache, kv)?;
        let KvRows { n_tok, kv_dim } = kv;
        check::ids_below("kv_store", "dst", dst, n_tok, rows, "cache rows")?;
        math::kv_store(k, v, dst, k_cache, v_cache, n_tok, kv_dim);
        Ok(())
    }

    fn attention_decode(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        cached: &Cached<'_, Vec<u32>>,
        out: &mut Vec<f32>,
        heads: Heads,
    ) -> Result<()> {
        let n_blocks = check::attention_decode(q, k_cache, v_cache, cached, out, heads)?;
        let cached = Cached {
            lens: cached.lens.as_slice(),
            table: cached.table.as_slice(),
            n_seq: cached.n_seq,
            max_blocks: cached.max_blocks,
            block_size: cached.block_size,
        };
        check::decode_table(&cached, n_blocks)?;
        fast::run(|| fast::attention_decode(q, k_cache, v_cache, &cached, out, heads));
        Ok(())
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>, n: usize) -> Result<()> {
        check::swiglu(gate, up, out, n)?;
        fast::run(|| fast::swiglu(gate, up, out, n));
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        n: usize,
    ) -> Result<()> {
        check::swiglu_bwd(dout, gate, up, dgate, dup, n)?;
        fast::run(|| fast::swiglu_bwd(dout, gate, up, dgate, dup, n));
        Ok(())
    }

    fn logprobs(
        &self,
        head: LmHead<'_, Vec<f32>, Vec<u32>>,
        out: LogprobsOut<'_, Vec<f32>>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()> {
        logprobs_cpu("logprobs", head, out, d, inv_t, None)
    }

    fn logprobs_bwd(
        &self,
        dlogp: &Vec<f32>,
        head: LmHead<'_, Vec<f32>, Vec<u32>>,
        lse: &Vec<f32>,
        grads: LogprobsGrads<'_, Vec<f32>, Vec<f32>>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()> {
        logprobs_bwd_cpu("logprobs_bwd", (dlogp, lse, None), head, grads, (d, inv_t))
    }

    fn keeps_logits(&self) -> bool {
        true
    }

    fn logprobs_keep(
        &self,
        head: LmHead<'_, Vec<f32>, Vec<u32>>,
        out: LogprobsOut<'_, Vec<f32>>,
        d: VocabDims,
        inv_t: f32,
        kept: &mut Vec<f32>,
    ) -> Result<()> {
        logprobs_cpu("logprobs_keep", head, out, d, inv_t, Some(kept))
    }

    fn logprobs_bwd_kept(
        &self,
        dlogp: &Vec<f32>,
        head: LmHead<'_, Vec<f32>, Vec<u32>>,
        saved: KeptLogits<'_, Vec<f32>>,
        grads: LogprobsGrads<'_, Vec<f32>, Vec<f32>>,
        d: VocabDims,
        inv_t: f32,
    ) -> Result<()> {
        let ins = (dlogp, saved.lse, Some(saved.logits));
        logprobs_bwd_cpu("logprobs_bwd_kept", ins, head, grads, (d, inv_t))
    }

    fn logits(&self, h: &Vec<f32>, w: &Vec<f32>, out: &mut Vec<f32>, d: VocabDims) -> Result<()> {
        check::logits(h, w, out, d)?;
        fast::run(|| fast::matmul_nt(h, w, out, d.n_tok, d.vocab, d.dim, 0.0));
        Ok(())
    }

    fn sample(
        &self,
        logits: &Vec<f32>,
        out: &mut Vec<u32>,
        rows: &SampleRows<'_>,
        p: &SampleParams,
    ) -> Result<()> {
        check::sample(logits, out, rows, p)?;
        check::sample_logits(logits, rows, p.temperature)?;
        let vocab = rows.vocab;
        for (d, &offset) in rows.offsets.iter().enumerate() {
            let r = rows.row(d);
            let row = &logits[r * vocab..(r + 1) * vocab];
            let u = math::sample_uniform(p.seed, offset);
            out[d] = math::sample_row(row, p.temperature, p.top_p, p.top_k, u);
        }
        Ok(())
    }

    fn grpo_loss(
        &self,
        tokens: &GrpoTokens<'_, Vec<f32>, Vec<u32>>,
        dlogp: &mut Vec<f32>,
        cfg: &GrpoLossCfg,
    ) -> Result<GrpoLossOut> {
        check::grpo_loss(tokens, dlogp, cfg)?;
        let GrpoTokens { seq_id, n_tok, .. } = *tokens;
        check::ids_below("grpo_loss", "seq_id", seq_id, n_tok, tokens.n_seq, "n_seq")?;
        check::mask_weights(&tokens.mask[..n_tok])?;
        let tokens = GrpoTokens {
            logp: tokens.logp.as_slice(),
            old_logp: tokens.old_logp.as_slice(),
            ref_logp: tokens.ref_logp.as_slice(),
            adv: tokens.adv.as_slice(),
            mask: tokens.mask.as_slice(),
            seq_id: seq_id.as_slice(),
            n_tok,
            n_seq: tokens.n_seq,
        };
        let s = math::grpo_loss(&tokens, dlogp, cfg);
        Ok(GrpoLossOut {
            loss: s.loss,
            pg_loss: s.pg_loss,
            kl: s.kl,
            clip_frac: s.clip_frac,
            ratio_mean: s.ratio_mean,
            n_tokens: s.n_tokens,
        })
    }

    fn adamw(
        &self,
        state: AdamWState<'_, Vec<f32>, Vec<f32>>,
        grad: &Vec<f32>,
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        check::adamw(&state, grad, n, hp.step)?;
        let AdamWState {
            param,
            master,
            m,
            v,
        } = state;
        // The host AdamW shared with the host-offloaded optimizer (the CUDA kernel's math).
        match master {
            None => host_adamw::adamw(param, grad, m, v, n, hp),
            Some(master) => {
                // Not needed where T is f32, but honoured: update the master, copy it back.
                host_adamw::adamw(master, grad, m, v, n, hp);
                param[..n].copy_from_slice(&master[..n]);
            }
        }
        Ok(())
    }

    fn needs_master(&self) -> bool {
        false
    }
}

/// The backend's buffers as the slices [`fast`] and [`math`] take.
fn slices<'a>(qkv: Qkv<'a, Vec<f32>>) -> Qkv<'a, [f32]> {
    Qkv {
        q: qkv.q,
        k: qkv.k,
        v: qkv.v,
    }
}

fn saved_slices<'a>(s: AttnSaved<'a, Vec<f32>, Vec<f32>>) -> AttnSaved<'a, [f32], [f32]> {
    AttnSaved {
        dout: s.dout,
        out: s.out,
        lse: s.lse,
    }
}

fn grad_slices<'a>(g: AttnGrads<'a, Vec<f32>>) -> AttnGrads<'a, [f32]> {
    AttnGrads {
        dq: g.dq,
        dk: g.dk,
        dv: g.dv,
    }
}

/// [`Backend::logprobs`] and [`Backend::logprobs_keep`] (`kept`): the contract and data checks
/// under `op`'s name, then the fast path.
fn logprobs_cpu(
    op: &'static str,
    head: LmHead<'_, Vec<f32>, Vec<u32>>,
    out: LogprobsOut<'_, Vec<f32>>,
    d: VocabDims,
    inv_t: f32,
    kept: Option<&mut Vec<f32>>,
) -> Result<()> {
    check::logprobs(head, &out, d, inv_t)?;
    if let Some(k) = &kept {
        check::holds(op, "kept", *k, &[d.n_tok, d.vocab], "n_tok * vocab")?;
    }
    check::ids_below(op, "targets", head.targets, d.n_tok, d.vocab, "vocab")?;
    let out = LogprobsOut {
        logp: out.logp.as_mut_slice(),
        lse: out.lse.as_mut_slice(),
        entropy: out.entropy.map(|e| e.as_mut_slice()),
    };
    let kept = kept.map(|k| k.as_mut_slice());
    fast::run(|| fast::logprobs(head_slices(head), out, d, inv_t, kept));
    Ok(())
}

/// [`Backend::logprobs_bwd`] and [`Backend::logprobs_bwd_kept`] (`ins` = (dlogp, lse, the kept
/// logits)), as [`logprobs_cpu`]; `dims` = (d, inv_t).
fn logprobs_bwd_cpu(
    op: &'static str,
    ins: (&Vec<f32>, &Vec<f32>, Option<&Vec<f32>>),
    head: LmHead<'_, Vec<f32>, Vec<u32>>,
    grads: LogprobsGrads<'_, Vec<f32>, Vec<f32>>,
    (d, inv_t): (VocabDims, f32),
) -> Result<()> {
    let (dlogp, lse, kept) = ins;
    check::logprobs_bwd(dlogp, head, lse, &grads, d, inv_t)?;
    if let Some(k) = kept {
        check::holds(op, "kept", k, &[d.n_tok, d.vocab], "n_tok * vocab")?;
    }
    check::ids_below(op, "targets", head.targets, d.n_tok, d.vocab, "vocab")?;
    let grads = LogprobsGrads {
        dh: grads.dh.as_mut_slice(),
        dw: grads.dw.map(|d| d.as_mut_slice()),
    };
    let saved = (lse.as_slice(), kept.map(|k| k.as_slice()));
    fast::run(|| fast::logprobs_bwd(dlogp, head_slices(head), saved, grads, d, inv_t));
    Ok(())
}

fn head_slices<'a>(h: LmHead<'a, Vec<f32>, Vec<u32>>) -> LmHead<'a, [f32], [u32]> {
    LmHead {
        h: h.h,
        w: h.w,
        targets: h.targets,
    }
}
