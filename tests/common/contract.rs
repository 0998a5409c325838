//! Calls that break the shape contract of `tooln1::backend::check`, one list for every backend:
//! each must be rejected before any work with `Error::Arg`, and the CPU and the CUDA backend
//! must give the very same error (op, argument, expected, got) for each. A case is named
//! "op: argument ...", after the op and the argument its error must name.
//!
//! Only what the host can see is here (lengths, sizes, settings, offsets); what only the data
//! shows (ids, decode lengths, logits, masks) is checked on the device by the CUDA backend and
//! reported at the next synchronisation (`cuda_ops::both_backends_reject_the_same_bad_calls`).

use tooln1::backend::{
    AdamWState, AdamWStep, Backend, Cached, DType, GemmDims, GrpoLossCfg, GrpoTokens, Heads,
    KlKind, LinearGrads, LossAgg, Packed, RowCopy, SampleParams, SampleRows,
};
use tooln1::backend::{AttnGrads, AttnSaved, Qkv};
use tooln1::backend::{KvRows, LmHead, LogprobsGrads, LogprobsOut, NormDims, NormGrads, VocabDims};
use tooln1::Result;

/// (what the case breaks, the op's result with its output dropped).
pub type Case = (&'static str, Result<()>);

/// Every bad call, in a fixed order, run on backend `b`.
pub fn bad_calls<B: Backend>(b: &B) -> Vec<Case> {
    let t = |n: usize| b.zeros(n).unwrap();
    let f = |n: usize| b.zeros_f32(n).unwrap();
    let u = |v: &[u32]| b.upload_u32(v).unwrap();
    let mut out: Vec<Case> = vec![
        // memory and elementwise
        ("download: t shorter than n", b.download(&t(3), 4).map(drop)),
        (
            "download_f32: t shorter than n",
            b.download_f32(&f(3), 4).map(drop),
        ),
        (
            "download_u32: t shorter than n",
            b.download_u32(&u(&[1, 2]), 3).map(drop),
        ),
        ("copy: dst shorter than n", b.copy(&t(4), &mut t(3), 4)),
        (
            "copy_f32: src shorter than n",
            b.copy_f32(&f(3), &mut f(4), 4),
        ),
        ("fill_f32: t shorter than n", b.fill_f32(&mut f(2), 3, 1.0)),
        (
            "copy_rows: width 0",
            b.copy_rows(
                &mut t(8),
                RowCopy {
                    src: 0,
                    dst: 2,
                    n: 1,
                    width: 0,
                },
            ),
        ),
        (
            "copy_rows: t shorter than the rows",
            b.copy_rows(
                &mut t(11),
                RowCopy {
                    src: 0,
                    dst: 2,
                    n: 2,
                    width: 3,
                },
            ),
        ),
        (
            "copy_rows: dst overlapping the source rows",
            b.copy_rows(
                &mut t(30),
                RowCopy {
                    src: 1,
                    dst: 3,
                    n: 3,
                    width: 3,
                },
            ),
        ),
        (
            "copy_rows: n overflowing",
            b.copy_rows(
                &mut t(30),
                RowCopy {
                    src: 1,
                    dst: 3,
                    n: usize::MAX,
                    width: 3,
                },
            ),
        ),
        (
            "upload_raw: bytes 5 for 2 bf16 elements",
            b.upload_raw(DType::BF16, &[0u8; 5], 2).map(drop),
        ),
        (
            "upload_raw: bytes of an element count that overflows",
            b.upload_raw(DType::F32, &[0u8; 4], usize::MAX / 2)
                .map(drop),
        ),
        (
            "add_inplace: b shorter than n",
            b.add_inplace(&mut t(4), &t(3), 4),
        ),
        (
            "sum_squares_f32: t shorter than n",
            b.sum_squares_f32(&f(2), 3).map(drop),
        ),
    ];

    // GEMM
    let (m, n, k) = (3usize, 4usize, 5usize);
    out.push((
        "linear: y shorter than m * n",
        b.linear(
            &t(m * k),
            &t(n * k),
            None,
            &mut t(m * n - 1),
            GemmDims { m, n, k },
        ),
    ));
    out.push((
        "linear: x shorter than m * k",
        b.linear(
            &t(m * k - 1),
            &t(n * k),
            None,
            &mut t(m * n),
            GemmDims { m, n, k },
        ),
    ));
    out.push((
        "linear: bias shorter than n",
        b.linear(
            &t(m * k),
            &t(n * k),
            Some(&t(n - 1)),
            &mut t(m * n),
            GemmDims { m, n, k },
        ),
    ));
    out.push((
        "linear: x of m * k elements, a product that overflows",
        b.linear(
            &t(1),
            &t(1),
            None,
            &mut t(1),
            GemmDims {
                m: usize::MAX / 2,
                n: 1,
                k: 3,
            },
        ),
    ));
    out.push((
        "linear_bwd: dw shorter than n * k",
        b.linear_bwd(
            &t(m * n),
            &t(m * k),
            &t(n * k),
            LinearGrads {
                dx: Some(&mut t(m * k)),
                accumulate_dx: false,
                dw: Some(&mut f(n * k - 1)),
                dbias: None,
            },
            GemmDims { m, n, k },
        ),
    ));
    out.push((
        "linear_bwd: dbias shorter than n",
        b.linear_bwd(
            &t(m * n),
            &t(m * k),
            &t(n * k),
            LinearGrads {
                dx: None,
                accumulate_dx: false,
                dw: None,
                dbias: Some(&mut f(n - 1)),
            },
            GemmDims { m, n, k },
        ),
    ));
    out.push((
        "logits: out shorter than rows * vocab",
        b.logits(
            &t(2 * 8),
            &t(10 * 8),
            &mut f(19),
            VocabDims {
                n_tok: 2,
                dim: 8,
                vocab: 10,
            },
        ),
    ));

    // rows
    out.push((
        "embedding: dim 0",
        b.embedding(&u(&[0, 1]), &t(8), &mut t(8), 2, 0),
    ));
    out.push((
        "embedding: out shorter than n_tok * dim",
        b.embedding(&u(&[0, 1]), &t(8), &mut t(7), 2, 4),
    ));
    out.push((
        "embedding_bwd: dout shorter than n_tok * dim",
        b.embedding_bwd(&u(&[0, 1]), &t(7), &mut f(8), 2, 4),
    ));
    out.push((
        "embedding_bwd: ids shorter than n_tok",
        b.embedding_bwd(&u(&[0]), &t(8), &mut f(8), 2, 4),
    ));
    out.push((
        "rmsnorm: dim 0",
        b.rmsnorm(
            &t(4),
            &t(4),
            &mut t(4),
            &mut f(2),
            NormDims { rows: 2, dim: 0 },
            1e-6,
        ),
    ));
    out.push((
        "rmsnorm: rstd shorter than rows",
        b.rmsnorm(
            &t(8),
            &t(4),
            &mut t(8),
            &mut f(1),
            NormDims { rows: 2, dim: 4 },
            1e-6,
        ),
    ));
    out.push((
        "rmsnorm_bwd: dx shorter than rows * dim",
        b.rmsnorm_bwd(
            &t(8),
            &t(8),
            &t(4),
            &f(2),
            NormGrads {
                dx: &mut t(7),
                dw: None,
            },
            NormDims { rows: 2, dim: 4 },
        ),
    ));
    let pos = u(&[0, 1]);
    for (what, hd, theta, len) in [
        ("rope: theta 0", 64usize, 0.0f32, 128usize),
        ("rope: theta NaN", 64, f32::NAN, 128),
        ("rope: theta -1", 64, -1.0, 128),
        ("rope: head_dim odd", 63, 1e4, 128),
        (
            "rope: x shorter than n_tok * n_heads * head_dim",
            64,
            1e4,
            127,
        ),
    ] {
        out.push((what, b.rope(&mut t(len), &pos, 2, 1, hd, theta)));
    }
    out.push((
        "rope_bwd: head_dim 0",
        b.rope_bwd(&mut t(128), &pos, 2, 1, 0, 1e4),
    ));
    out.push((
        "rope_bwd: pos shorter than n_tok",
        b.rope_bwd(&mut t(192), &pos, 3, 1, 64, 1e4),
    ));
    out.push((
        "swiglu: out shorter than n",
        b.swiglu(&t(5), &t(5), &mut t(4), 5),
    ));
    out.push((
        "swiglu_bwd: dup shorter than n",
        b.swiglu_bwd(&t(5), &t(5), &t(5), &mut t(5), &mut t(4), 5),
    ));

    // attention
    let (nh, nkv, hd, nt) = (2usize, 1usize, 64usize, 12usize);
    let (qn, kn) = (nt * nh * hd, nt * nkv * hd);
    for (what, cu, dev, max_len, heads, kv, q_len, lse_len) in [
        (
            "attention: n_kv 0",
            vec![0u32, 5, 12],
            vec![0u32, 5, 12],
            12,
            nh,
            0,
            qn,
            nt * nh,
        ),
        (
            "attention: n_heads not a multiple of n_kv",
            vec![0, 5, 12],
            vec![0, 5, 12],
            12,
            3,
            2,
            qn,
            nt * nh,
        ),
        (
            "attention: n_heads 0",
            vec![0, 5, 12],
            vec![0, 5, 12],
            12,
            0,
            nkv,
            qn,
            nt * nh,
        ),
        (
            "attention: cu_host empty",
            vec![],
            vec![0],
            12,
            nh,
            nkv,
            qn,
            nt * nh,
        ),
        (
            "attention: cu_host not starting at 0",
            vec![1, 5, 12],
            vec![1, 5, 12],
            12,
            nh,
            nkv,
            qn,
            nt * nh,
        ),
        (
            "attention: cu_host decreasing",
            vec![0, 7, 5],
            vec![0, 7, 5],
            12,
            nh,
            nkv,
            qn,
            nt * nh,
        ),
        (
            "attention: max_len below the longest sequence",
            vec![0, 9, 12],
            vec![0, 9, 12],
            8,
            nh,
            nkv,
            qn,
            nt * nh,
        ),
        (
            "attention: cu_seqlens shorter than cu_host",
            vec![0, 5, 12],
            vec![0, 5],
            12,
            nh,
            nkv,
            qn,
            nt * nh,
        ),
        (
            "attention: q shorter than n_tok * n_heads * head_dim",
            vec![0, 5, 12],
            vec![0, 5, 12],
            12,
            nh,
            nkv,
            qn - 1,
            nt * nh,
        ),
        (
            "attention: lse shorter than n_tok * n_heads",
            vec![0, 5, 12],
            vec![0, 5, 12],
            12,
            nh,
            nkv,
            qn,
            nt * nh - 1,
        ),
    ] {
        let r = b.attention(
            Qkv {
                q: &t(q_len),
                k: &t(kn),
                v: &t(kn),
            },
            &mut t(qn),
            &mut f(lse_len),
            &Packed {
                cu_seqlens: &u(&dev),
                cu_host: &cu,
                max_len,
            },
            Heads {
                n_heads: heads,
                n_kv: kv,
                head_dim: hd,
            },
        );
        out.push((what, r));
    }
    let cu = [0u32, 5, 12];
    out.push((
        "attention_bwd: dk shorter than n_tok * n_kv * head_dim",
        b.attention_bwd(
            Qkv {
                q: &t(qn),
                k: &t(kn),
                v: &t(kn),
            },
            AttnSaved {
                dout: &t(qn),
                out: &t(qn),
                lse: &f(nt * nh),
            },
            AttnGrads {
                dq: &mut t(qn),
                dk: &mut t(kn - 1),
                dv: &mut t(kn),
            },
            &Packed {
                cu_seqlens: &u(&cu),
                cu_host: &cu,
                max_len: 12,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            },
        ),
    ));
    out.push((
        "attention_bwd: head_dim 0",
        b.attention_bwd(
            Qkv {
                q: &t(qn),
                k: &t(kn),
                v: &t(kn),
            },
            AttnSaved {
                dout: &t(qn),
                out: &t(qn),
                lse: &f(nt * nh),
            },
            AttnGrads {
                dq: &mut t(qn),
                dk: &mut t(kn),
                dv: &mut t(kn),
            },
            &Packed {
                cu_seqlens: &u(&cu),
                cu_host: &cu,
                max_len: 12,
            },
            Heads {
                n_heads: nh,
                n_kv: nkv,
                head_dim: 0,
            },
        ),
    ));
    let kvd = nkv * hd;
    out.push((
        "kv_store: kv_dim 0",
        b.kv_store(
            &t(kn),
            &t(kn),
            &u(&[0, 1]),
            &mut t(4 * kvd),
            &mut t(4 * kvd),
            KvRows {
                n_tok: 2,
                kv_dim: 0,
            },
        ),
    ));
    out.push((
        "kv_store: v_cache of another size than k_cache",
        b.kv_store(
            &t(kn),
            &t(kn),
            &u(&[0, 1]),
            &mut t(4 * kvd),
            &mut t(3 * kvd),
            KvRows {
                n_tok: 2,
                kv_dim: kvd,
            },
        ),
    ));
    out.push((
        "kv_store: dst shorter than n_tok",
        b.kv_store(
            &t(kn),
            &t(kn),
            &u(&[0]),
            &mut t(4 * kvd),
            &mut t(4 * kvd),
            KvRows {
                n_tok: 2,
                kv_dim: kvd,
            },
        ),
    ));
    // A paged cache of 4 blocks of 3 rows; two sequences of 2 table entries each.
    let (slots, bs, mb) = (2usize, 3usize, 2usize);
    let cache = 4 * bs * nkv * hd;
    let table = u(&[0, 1, 2, 3]);
    let decode =
        |q: usize, kc: usize, vc: usize, table: &B::I, cached: (usize, usize), h: Heads| {
            b.attention_decode(
                &t(slots * q),
                &t(kc),
                &t(vc),
                &Cached {
                    lens: &u(&[1, 2]),
                    table,
                    n_seq: slots,
                    max_blocks: cached.0,
                    block_size: cached.1,
                },
                &mut t(slots * q),
                h,
            )
        };
    let h = Heads {
        n_heads: nh,
        n_kv: nkv,
        head_dim: hd,
    };
    out.push((
        "attention_decode: k_cache not a whole number of blocks",
        decode(nh * hd, cache - 1, cache, &table, (mb, bs), h),
    ));
    out.push((
        "attention_decode: v_cache of another size than k_cache",
        decode(nh * hd, cache, cache + bs * nkv * hd, &table, (mb, bs), h),
    ));
    out.push((
        "attention_decode: table shorter than n_seq * max_blocks",
        decode(nh * hd, cache, cache, &u(&[0, 1, 2]), (mb, bs), h),
    ));
    out.push((
        "attention_decode: block_size 0",
        decode(nh * hd, cache, cache, &table, (mb, 0), h),
    ));
    out.push((
        "attention_decode: max_blocks 0",
        decode(nh * hd, cache, cache, &table, (0, bs), h),
    ));
    out.push((
        "attention_decode: n_heads 3 with n_kv 2",
        decode(
            3 * hd,
            cache * 2,
            cache * 2,
            &table,
            (mb, bs),
            Heads {
                n_heads: 3,
                n_kv: 2,
                head_dim: hd,
            },
        ),
    ));

    // vocabulary
    let (nt, dim, vocab) = (2usize, 8usize, 10usize);
    let tg = u(&[1, 2]);
    out.push((
        "logprobs: vocab 0",
        b.logprobs(
            LmHead {
                h: &t(nt * dim),
                w: &t(0),
                targets: &tg,
            },
            LogprobsOut {
                logp: &mut f(nt),
                lse: &mut f(nt),
                entropy: None,
            },
            VocabDims {
                n_tok: nt,
                dim,
                vocab: 0,
            },
            1.0,
        ),
    ));
    for (what, inv_t) in [
        ("logprobs: inv_t 0", 0.0f32),
        ("logprobs: inv_t -1", -1.0),
        ("logprobs: inv_t NaN", f32::NAN),
        ("logprobs: inv_t inf", f32::INFINITY),
    ] {
        out.push((
            what,
            b.logprobs(
                LmHead {
                    h: &t(nt * dim),
                    w: &t(vocab * dim),
                    targets: &tg,
                },
                LogprobsOut {
                    logp: &mut f(nt),
                    lse: &mut f(nt),
                    entropy: None,
                },
                VocabDims {
                    n_tok: nt,
                    dim,
                    vocab,
                },
                inv_t,
            ),
        ));
    }
    out.push((
        "logprobs_bwd: inv_t 0",
        b.logprobs_bwd(
            &f(nt),
            LmHead {
                h: &t(nt * dim),
                w: &t(vocab * dim),
                targets: &tg,
            },
            &f(nt),
            LogprobsGrads {
                dh: &mut t(nt * dim),
                dw: None,
            },
            VocabDims {
                n_tok: nt,
                dim,
                vocab,
            },
            0.0,
        ),
    ));
    out.push((
        "logprobs: entropy shorter than n_tok",
        b.logprobs(
            LmHead {
                h: &t(nt * dim),
                w: &t(vocab * dim),
                targets: &tg,
            },
            LogprobsOut {
                logp: &mut f(nt),
                lse: &mut f(nt),
                entropy: Some(&mut f(nt - 1)),
            },
            VocabDims {
                n_tok: nt,
                dim,
                vocab,
            },
            1.0,
        ),
    ));
    out.push((
        "logprobs: w shorter than vocab * dim",
        b.logprobs(
            LmHead {
                h: &t(nt * dim),
                w: &t(vocab * dim - 1),
                targets: &tg,
            },
            LogprobsOut {
                logp: &mut f(nt),
                lse: &mut f(nt),
                entropy: None,
            },
            VocabDims {
                n_tok: nt,
                dim,
                vocab,
            },
            1.0,
        ),
    ));
    out.push((
        "logprobs_bwd: dw shorter than vocab * dim",
        b.logprobs_bwd(
            &f(nt),
            LmHead {
                h: &t(nt * dim),
                w: &t(vocab * dim),
                targets: &tg,
            },
            &f(nt),
            LogprobsGrads {
                dh: &mut t(nt * dim),
                dw: Some(&mut f(vocab * dim - 1)),
            },
            VocabDims {
                n_tok: nt,
                dim,
                vocab,
            },
            1.0,
        ),
    ));
    out.push((
        "logprobs_bwd: dim 0",
        b.logprobs_bwd(
            &f(nt),
            LmHead {
                h: &t(0),
                w: &t(0),
                targets: &tg,
            },
            &f(nt),
            LogprobsGrads {
                dh: &mut t(0),
                dw: None,
            },
            VocabDims {
                n_tok: nt,
                dim: 0,
                vocab,
            },
            1.0,
        ),
    ));
    let sv = 7usize;
    for (what, temp, top_p) in [
        ("sample: top_p 1.5", 1.0f32, 1.5f32),
        ("sample: top_p -0.1", 1.0, -0.1),
        ("sample: top_p NaN", 1.0, f32::NAN),
        ("sample: temperature -1", -1.0, 1.0),
        ("sample: temperature inf", f32::INFINITY, 1.0),
        ("sample: temperature NaN", f32::NAN, 1.0),
    ] {
        out.push((
            what,
            super::sample_at(b, &f(2 * sv), &mut u(&[0, 0]), 2, sv, temp, top_p, 0, 1, 0),
        ));
    }
    out.push((
        "sample: vocab 0",
        super::sample_at(b, &f(2), &mut u(&[0, 0]), 2, 0, 1.0, 1.0, 0, 1, 0),
    ));
    out.push((
        "sample: out shorter than rows",
        super::sample_at(b, &f(2 * sv), &mut u(&[0]), 2, sv, 1.0, 1.0, 0, 1, 0),
    ));
    let sp = SampleParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 1,
    };
    let rows = |offsets: &'static [u64], src: Option<&'static [u32]>, n_rows: usize| SampleRows {
        offsets,
        src,
        n_rows,
        vocab: sv,
    };
    out.push((
        "sample: n_rows below the draws without src",
        b.sample(
            &f(3 * sv),
            &mut u(&[0, 0, 0]),
            &rows(&[0, 1, 2], None, 2),
            &sp,
        ),
    ));
    out.push((
        "sample: src of another length than offsets",
        b.sample(
            &f(2 * sv),
            &mut u(&[0, 0]),
            &rows(&[0, 1], Some(&[0]), 2),
            &sp,
        ),
    ));
    out.push((
        "sample: src row at n_rows",
        b.sample(
            &f(2 * sv),
            &mut u(&[0, 0, 0]),
            &rows(&[0, 1, 2], Some(&[0, 2, 1]), 2),
            &sp,
        ),
    ));
    out.push((
        "sample: logits shorter than n_rows * vocab",
        b.sample(&f(2 * sv), &mut u(&[0]), &rows(&[5], Some(&[0]), 3), &sp),
    ));

    // RL loss and optimiser
    let base = GrpoLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        kl_coef: 0.0,
        kl_kind: KlKind::K3,
        agg: LossAgg::TokenMean,
        norm_len: 1.0,
        loss_scale_div: 1.0,
    };
    let sid = u(&[0, 0, 1]);
    for (what, cfg, n_tok, dlogp) in [
        (
            "grpo_loss: loss_scale_div 0",
            GrpoLossCfg {
                loss_scale_div: 0.0,
                ..base
            },
            3usize,
            3usize,
        ),
        (
            "grpo_loss: loss_scale_div 0 with no tokens",
            GrpoLossCfg {
                loss_scale_div: 0.0,
                ..base
            },
            0,
            3,
        ),
        (
            "grpo_loss: loss_scale_div NaN",
            GrpoLossCfg {
                loss_scale_div: f32::NAN,
                ..base
            },
            3,
            3,
        ),
        (
            "grpo_loss: norm_len 0 for seq-mean-token-sum-norm",
            GrpoLossCfg {
                agg: LossAgg::SeqMeanTokenSumNorm,
                norm_len: 0.0,
                ..base
            },
            3,
            3,
        ),
        ("grpo_loss: dlogp shorter than n_tok", base, 3, 2),
    ] {
        let z = f(3);
        let r = b
            .grpo_loss(
                &GrpoTokens {
                    logp: &z,
                    old_logp: &z,
                    ref_logp: &z,
                    adv: &z,
                    mask: &z,
                    seq_id: &sid,
                    n_tok,
                    n_seq: 2,
                },
                &mut f(dlogp),
                &cfg,
            )
            .map(drop);
        out.push((what, r));
    }
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
        grad_scale: 1.0,
    };
    out.push((
        "adamw: step 0",
        b.adamw(
            AdamWState {
                param: &mut t(2),
                master: None,
                m: &mut f(2),
                v: &mut f(2),
            },
            &f(2),
            2,
            &hp,
        ),
    ));
    out.push((
        "adamw: master shorter than n",
        b.adamw(
            AdamWState {
                param: &mut t(2),
                master: Some(&mut f(1)),
                m: &mut f(2),
                v: &mut f(2),
            },
            &f(2),
            2,
            &AdamWStep { step: 1, ..hp },
        ),
    ));
    out.push((
        "adamw: m shorter than n",
        b.adamw(
            AdamWState {
                param: &mut t(2),
                master: None,
                m: &mut f(1),
                v: &mut f(2),
            },
            &f(2),
            2,
            &AdamWStep { step: 1, ..hp },
        ),
    ));
    out
}

/// The (op, argument, expected, got) of a contract error; panics (naming the case) on anything
/// else, or on an error that names another op or argument than the case's name, so a case that
/// is accepted, or rejected some other way, fails the calling test.
pub fn fields(case: &str, r: &Result<()>) -> (&'static str, &'static str, String, String) {
    let (want_op, rest) = case
        .split_once(": ")
        .expect("case named \"op: argument ...\"");
    let want_arg = rest.split(' ').next().unwrap_or("");
    match r {
        Err(
            e @ tooln1::Error::Arg {
                op,
                arg,
                expected,
                got,
            },
        ) => {
            assert_eq!((*op, *arg), (want_op, want_arg), "{case}: {e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "{op}: argument `{arg}`: expected {expected}, got {got}"
                )),
                "{case}: {msg}"
            );
            (op, arg, expected.clone(), got.clone())
        }
        Err(e) => panic!("{case}: rejected, but not as a contract error: {e}"),
        Ok(()) => panic!("{case}: accepted"),
    }
}
