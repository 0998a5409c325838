//! Data-parallel building blocks on several CUDA devices over NCCL (`backend::cuda::NcclRank`),
//! one worker thread per device: the reduce-scatter into accumulating shards and the bf16
//! all-gather against host references on random inputs, gradient groups reduced on NCCL's own
//! stream against host sums and bit for bit against the compute stream, argument errors that
//! stop every rank instead of hanging one, and sharded AdamW over 2..=4 devices against the
//! single-device AdamW given the summed gradients; whole GRPO trainer runs on 2 and 4 devices
//! against one device for the same global batch, a 2-device resume, SFT on 2 devices against
//! one, and GRPO and SFT with the reductions overlapped against on the compute stream.
//! Seeds are printed; TOOLN1_TEST_SEED replays.
//!
//! Float sums are compared with bounds: NCCL's reduction order (rings, trees) is not rank
//! order. Skips with the reason when there is no device, no NCCL or fewer than two devices
//! (TOOLN1_REQUIRE_CUDA=1 fails instead); on the virtual GPU: TOOLN1_VGPU_DEVICES=4.

mod common;

use common::Rng;
use tooln1::backend::cuda::{
    nccl_available, nccl_group, nccl_group_on, Cuda, NcclRank, NcclStream,
};
use tooln1::backend::Backend;
use tooln1::dist::{Collective, ShardPlan};
use tooln1::model::layout::ParamLayout;
use tooln1::model::{init, Model};
use tooln1::train::config::OptimConfig;
use tooln1::train::optim::AdamW;
use tooln1::train::zero::ShardedAdamW;
use tooln1::Error;

/// Held by every test while it uses the devices. The virtual GPU runs a stream's work on the
/// host thread that synchronises it, and a `cuMemFree` (every drop with
/// `TOOLN1_CUDA_POOL=exact`, the pool's trims) runs every stream of its device, also another
/// test's NCCL stream: two tests' ranks could then each wait in the other's collective. On a GPU
/// the streams run by themselves.
static DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Backends on the first 2..=4 devices (and the devices' lock), or `None` after the skip line.
fn devices() -> Option<(std::sync::MutexGuard<'static, ()>, Vec<Cuda>)> {
    let lock = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let first = common::gpu()?;
    let mut devs = vec![first];
    while devs.len() < 4 {
        match Cuda::with_device(devs.len()) {
            Ok(c) => devs.push(c),
            Err(_) => break,
        }
    }
    if devs.len() < 2 {
        common::skip(&format!(
            "{} CUDA device(s); these tests need 2 or more (TOOLN1_VGPU_DEVICES=4 on the virtual GPU)",
            devs.len()
        ));
        return None;
    }
    if !nccl_available() {
        common::skip("no NCCL library (libnccl.so.2)");
        return None;
    }
    Some((lock, devs))
}

/// Runs `f(backend, rank)` on one thread per device; results by rank.
fn on_devices<R: Send>(devs: &[Cuda], f: impl Fn(&Cuda, NcclRank) -> R + Sync) -> Vec<R> {
    on_devices_on(devs, NcclStream::from_env().unwrap(), f)
}

/// [`on_devices`] with the reductions on `stream`.
fn on_devices_on<R: Send>(
    devs: &[Cuda],
    stream: NcclStream,
    f: impl Fn(&Cuda, NcclRank) -> R + Sync,
) -> Vec<R> {
    let ranks = nccl_group_on(devs, stream).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = devs
            .iter()
            .zip(ranks)
            .map(|(c, r)| {
                let f = &f;
                s.spawn(move || f(c, r))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn reduce_scatter_and_all_gather_match_host_sums() {
    let Some((_lock, devs)) = devices() else {
        return;
    };
    let seed = common::seed("cuda_dist_collectives");
    let mut rng = Rng::from_seed(seed);
    for world in 2..=devs.len() {
        let devs = &devs[..world];
        let n = 1 + rng.below(300);
        let sends: Vec<Vec<f32>> = (0..world).map(|_| rng.vec(world * n, 1.0)).collect();
        let accs: Vec<Vec<f32>> = (0..world).map(|_| rng.vec(n, 1.0)).collect();
        let shards: Vec<Vec<f32>> = (0..world)
            .map(|_| common::bf16_round(&rng.vec(n, 1.0)))
            .collect();
        let out = on_devices(devs, |c, h| {
            let r = h.rank();
            let send = c.upload_f32(&sends[r]).unwrap();
            let mut acc = c.upload_f32(&accs[r]).unwrap();
            // Twice: the second call adds into what the first left.
            h.reduce_scatter_add(c, &send, &mut acc, n).unwrap();
            h.reduce_scatter_add(c, &send, &mut acc, n).unwrap();
            let shard = c.upload(&shards[r]).unwrap();
            let mut gathered = common::poison(c, world * n);
            h.all_gather(c, &shard, &mut gathered, n).unwrap();
            let mut v = [r as f64, 1.0];
            h.all_reduce_host(&mut v).unwrap();
            (
                c.download_f32(&acc, n).unwrap(),
                c.download(&gathered, world * n).unwrap(),
                v,
            )
        });
        for (r, (acc, gathered, v)) in out.iter().enumerate() {
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    let s: f64 = sends.iter().map(|x| x[r * n + i] as f64).sum();
                    accs[r][i] as f64 + 2.0 * s
                })
                .collect();
            common::check(
                &format!("seed {seed} world {world} rank {r} reduce_scatter"),
                acc,
                &want,
                1e-6,
            );
            let all: Vec<f32> = shards.concat();
            assert_eq!(
                gathered, &all,
                "seed {seed} world {world} rank {r} all_gather"
            );
            let ws = (world * (world - 1) / 2) as f64;
            assert_eq!(v, &[ws, world as f64], "all_reduce_host");
        }
    }
}

/// Gradient groups reduced on NCCL's own stream (`reduce_scatter_add_group`, returning before
/// the sums are done) over several micro-batches: the uploads of each group's gradients are
/// still queued on the compute stream when the group is handed over, and fresh buffers of the
/// same sizes are filled with garbage right after (the caching pool hands out any block freed
/// too early). The sums after `wait_reduced` against host sums, and bit for bit against the
/// same calls with the reductions on the compute stream.
#[test]
fn group_reductions_on_their_own_stream_match_the_compute_stream() {
    let Some((_lock, devs)) = devices() else {
        return;
    };
    let seed = common::seed("cuda_dist_group_reductions");
    let mut rng = Rng::from_seed(seed);
    for world in 2..=devs.len() {
        let devs = &devs[..world];
        let (groups, rounds) = (2 + rng.below(3), 3);
        // ns[g][t]: per-rank elements of tensor t of group g.
        let ns: Vec<Vec<usize>> = (0..groups)
            .map(|_| (0..1 + rng.below(4)).map(|_| 1 + rng.below(200)).collect())
            .collect();
        // sends[round][g][t][rank]
        let sends: Vec<Vec<Vec<Vec<Vec<f32>>>>> = (0..rounds)
            .map(|_| {
                ns.iter()
                    .map(|g| {
                        g.iter()
                            .map(|&n| (0..world).map(|_| rng.vec(world * n, 1.0)).collect())
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let run = |stream: NcclStream| {
            on_devices_on(devs, stream, |c, h| {
                let r = h.rank();
                let mut accs: Vec<Vec<_>> = ns
                    .iter()
                    .map(|g| g.iter().map(|&n| c.zeros_f32(n).unwrap()).collect())
                    .collect();
                let mut garbage = Vec::new();
                for round in &sends {
                    for (g, acc) in accs.iter_mut().enumerate() {
                        let bufs: Vec<_> = round[g]
                            .iter()
                            .map(|t| c.upload_f32(&t[r]).unwrap())
                            .collect();
                        h.reduce_scatter_add_group(c, bufs, acc, &ns[g]).unwrap();
                        for t in &round[g] {
                            garbage.push(c.upload_f32(&vec![f32::NAN; t[r].len()]).unwrap());
                        }
                    }
                    garbage.clear();
                }
                h.wait_reduced(c).unwrap();
                accs.iter()
                    .zip(&ns)
                    .map(|(g, gn)| {
                        g.iter()
                            .zip(gn)
                            .map(|(a, &n)| c.download_f32(a, n).unwrap())
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
        };
        let own = run(NcclStream::Own);
        let serial = run(NcclStream::Compute);
        for (r, got) in own.iter().enumerate() {
            for (g, gn) in ns.iter().enumerate() {
                for (t, &n) in gn.iter().enumerate() {
                    let want: Vec<f64> = (0..n)
                        .map(|i| {
                            sends
                                .iter()
                                .map(|round| {
                                    round[g][t].iter().map(|x| x[r * n + i] as f64).sum::<f64>()
                                })
                                .sum()
                        })
                        .collect();
                    common::check(
                        &format!("seed {seed} world {world} rank {r} group {g} tensor {t}"),
                        &got[g][t],
                        &want,
                        1e-5,
                    );
                }
            }
            assert_eq!(
                got, &serial[r],
                "seed {seed} world {world} rank {r}: own stream vs compute stream"
            );
        }
    }
}

#[test]
fn a_bad_argument_stops_every_rank() {
    let Some((_lock, devs)) = devices() else {
        return;
    };
    let devs = &devs[..2];
    let n = 64;
    let out = on_devices(devs, |c, h| {
        // Rank 1's accumulator is one element short.
        let send = c.zeros_f32(2 * n).unwrap();
        let mut acc = c.zeros_f32(if h.rank() == 1 { n - 1 } else { n }).unwrap();
        h.reduce_scatter_add(c, &send, &mut acc, n)
    });
    match &out[1] {
        Err(Error::Arg { op, arg, .. }) => assert_eq!((*op, *arg), ("reduce_scatter", "acc")),
        other => panic!("rank 1: {other:?}"),
    }
    let e = out[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 1") && e.contains("acc"), "rank 0: {e}");
    let e = nccl_group(&[devs[0].clone(), devs[0].clone()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("twice"), "{e}");
}

#[test]
fn sharded_adamw_matches_single_device_adamw() {
    let Some((_lock, devs)) = devices() else {
        return;
    };
    let seed = common::seed("cuda_dist_sharded_adamw");
    for world in 2..=devs.len() {
        let devs = &devs[..world];
        let cfg = init::tiny_config(64, 2, 4, 2, 96, 77, world % 2 == 0);
        let host = init::random_params(&cfg, seed);
        let layout = ParamLayout::new(&cfg);
        let ocfg = OptimConfig {
            lr: 1e-3,
            ..OptimConfig::default()
        };
        let mut rng = Rng::from_seed(seed ^ world as u64);
        let (updates, micro) = (2usize, 2usize);
        // grads[u][mb][rank][tensor]
        let grads: Vec<Vec<Vec<Vec<Vec<f32>>>>> = (0..updates)
            .map(|_| {
                (0..micro)
                    .map(|_| {
                        (0..world)
                            .map(|_| {
                                layout
                                    .specs
                                    .iter()
                                    .map(|s| rng.vec(s.numel(), 0.1))
                                    .collect()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();

        // Reference: device 0 alone, given the sums (in f64, rounded once).
        let c0 = &devs[0];
        let params: Vec<_> = host.iter().map(|p| c0.upload(p).unwrap()).collect();
        let mut single = Model::new(cfg.clone(), params).unwrap();
        let mut opt = AdamW::new(c0, &single, ocfg.clone()).unwrap();
        let mut norms = Vec::new();
        for u in &grads {
            let summed: Vec<_> = (0..layout.specs.len())
                .map(|i| {
                    let s: Vec<f32> = (0..layout.specs[i].numel())
                        .map(|j| {
                            u.iter()
                                .flat_map(|mb| mb.iter().map(move |r| r[i][j] as f64))
                                .sum::<f64>() as f32
                        })
                        .collect();
                    c0.upload_f32(&s).unwrap()
                })
                .collect();
            norms.push(opt.step(c0, &mut single, &summed, updates as u64).unwrap());
        }
        let want: Vec<Vec<f32>> = single
            .params
            .iter()
            .zip(&layout.specs)
            .map(|(p, s)| c0.download(p, s.numel()).unwrap())
            .collect();

        let got = on_devices(devs, |c, h| {
            let r = h.rank();
            let params: Vec<_> = host.iter().map(|p| c.upload(p).unwrap()).collect();
            let mut model = Model::new(cfg.clone(), params).unwrap();
            let plan = ShardPlan::new(&model.layout, world).unwrap();
            let mut opt = ShardedAdamW::new(c, &model, ocfg.clone(), plan, r).unwrap();
            let mut g = opt.alloc_grads(c).unwrap();
            let mut stats = Vec::new();
            for u in &grads {
                for mb in u {
                    // Each gradient padded with zeros to world * shard, as alloc_grads makes it.
                    for (i, t) in opt.plan.tensors.iter().enumerate() {
                        let mut v = mb[r][i].clone();
                        v.resize(t.padded(world), 0.0);
                        g[i] = c.upload_f32(&v).unwrap();
                    }
                    opt.reduce_all(c, &h, &mut g).unwrap();
                }
                stats.push(opt.step(c, &h, &mut model, updates as u64).unwrap());
            }
            let ps: Vec<Vec<f32>> = model
                .params
                .iter()
                .zip(&model.layout.specs)
                .map(|(p, s)| c.download(p, s.numel()).unwrap())
                .collect();
            (ps, stats)
        });
        for (r, (ps, stats)) in got.iter().enumerate() {
            for (k, (s, w)) in stats.iter().zip(&norms).enumerate() {
                let d = (s.grad_norm - w.grad_norm).abs() / w.grad_norm;
                assert!(
                    d < 1e-5,
                    "seed {seed} world {world} rank {r} update {k}: grad norm {} vs {}",
                    s.grad_norm,
                    w.grad_norm
                );
            }
            for (i, (p, w)) in ps.iter().zip(&want).enumerate() {
                let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
                common::check(
                    &format!(
                        "seed {seed} world {world} rank {r} {}",
                        layout.specs[i].name
                    ),
                    p,
                    &w64,
                    4e-3,
                );
            }
            assert_eq!(ps, &got[0].0, "rank {r}'s weights differ from rank 0's");
        }
    }
}

/// GRPO trainer steps data parallel on 2 and 4 devices (ZeRO-2 AdamW over NCCL, gradients
/// reduced per backward group) against the same steps on one device, same global batch: sampled
/// rollouts that draw the same random numbers (the same tokens unless bf16 rounding moves a
/// draw across a token boundary: the response counts are checked first), then losses and
/// gradient norms within a bf16-accumulation bound, and every rank's weights identical. Then a
/// 2-device run resumed from its step-2 checkpoint on 2 devices equals the uninterrupted one,
/// and SFT on 2 devices matches one device.
#[test]
fn trainer_on_several_devices_matches_one() {
    use common::train::LikesE;
    use tooln1::train::config::{RunConfig, SftConfig};
    use tooln1::train::parallel::on_ranks;
    use tooln1::train::sft::SftItem;
    use tooln1::train::{checkpoint, RankComm, SftTrainer, TrainConfig, TrainData, Trainer};
    let Some((_lock, devs)) = devices() else {
        return;
    };
    let s = common::seed("cuda_dist_trainer");
    let tok = common::train::golden_tokenizer();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    // head_dim 64 (the CUDA attention kernels take 64 and 128).
    let mut cfg = init::tiny_config(128, 1, 2, 1, 96, vocab, true);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host: Vec<Vec<f32>> = init::random_params(&cfg, s)
        .iter()
        .map(|t| common::bf16_round(t))
        .collect();
    let prompts =
        common::train::chat_prompts(&tok, &["the tree", "set a timer", "weather here", "one"]);
    let tmp = tempfile::tempdir().unwrap();
    let tc = |out: &str, steps: u64| {
        let mut c = TrainConfig {
            run: RunConfig {
                out: tmp.path().join(out),
                steps,
                seed: s,
                ..RunConfig::default()
            },
            save_every: 2,
            ..TrainConfig::default()
        };
        c.rollout.n = 2;
        c.rollout.max_new_tokens = 5;
        c.rollout.temperature = 1.0;
        c.grpo.prompts_per_step = 4;
        c.grpo.mini_batch_prompts = 4;
        c.grpo.micro_batch_tokens = 64;
        c.grpo.kl_coef = 0.05;
        // The entropy term gives a gradient even when every group's rewards are equal (which
        // a random model's short responses can all score).
        c.grpo.entropy_coef = 0.01;
        c.optim.lr = 1e-3;
        c
    };
    let train = |c: &Cuda, comm: Option<RankComm<Cuda>>, out: &str, steps, resume: bool| {
        let reference = Model::from_host(c, cfg.clone(), &host)?;
        let data = TrainData {
            tokenizer: common::train::golden_tokenizer(),
            prompts: prompts.clone(),
            reward: Box::new(LikesE),
        };
        let mut t = if resume {
            let ck = checkpoint::resolve_resume(&tmp.path().join(out))?;
            Trainer::resume_in(c.clone(), &ck, reference, data, tc(out, steps), comm)?
        } else {
            let policy = Model::from_host(c, cfg.clone(), &host)?;
            Trainer::new_in(c.clone(), policy, reference, data, tc(out, steps), comm)?
        };
        t.quiet = true;
        let m = t.run()?;
        Ok((m, t.policy.to_host(c)?))
    };
    let group = |world: usize| -> Vec<(Cuda, RankComm<Cuda>)> {
        let ranks = nccl_group(&devs[..world]).unwrap();
        devs[..world]
            .iter()
            .cloned()
            .zip(ranks)
            .map(|(c, r)| (c, Box::new(r) as RankComm<Cuda>))
            .collect()
    };
    let close_weights = |a: &[Vec<f32>], b: &[Vec<f32>], what: &str| {
        // AdamW moves an element whose summed gradient is nearly zero by up to lr in the
        // direction of that sum's sign, which the order of float additions can flip.
        let mut worst = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            for (&u, &v) in x.iter().zip(y) {
                worst = worst.max((u - v).abs());
            }
        }
        println!("{what}: largest weight difference {worst:.3e}");
        assert!(worst < 2e-2, "{what}: weights differ by {worst}");
    };
    let (one_m, one_w) = train(&devs[0], None, "one", 2, false).unwrap();
    for world in [2usize, 4].into_iter().filter(|&w| w <= devs.len()) {
        let out = format!("w{world}");
        let ranks = on_ranks(group(world), |_, (c, r)| train(&c, Some(r), &out, 2, false)).unwrap();
        let (m, w) = &ranks[0];
        for (r, (_, wr)) in ranks.iter().enumerate() {
            assert_eq!(
                wr, w,
                "{world} devices: rank {r}'s weights differ from rank 0's"
            );
        }
        for (k, (a, b)) in m.iter().zip(&one_m).enumerate() {
            println!(
                "{world} devices step {}: loss {:.6} vs {:.6}, grad norm {:.6} vs {:.6}, \
                 response tokens {} vs {}",
                k + 1,
                a.loss,
                b.loss,
                a.grad_norm,
                b.grad_norm,
                a.response_tokens,
                b.response_tokens
            );
            assert_eq!(
                a.response_tokens,
                b.response_tokens,
                "step {}: rollouts differ",
                k + 1
            );
            assert_eq!(a.reward_mean, b.reward_mean);
            assert!(
                b.grad_norm > 0.0,
                "step {}: no gradient (all samples alike?)",
                k + 1
            );
            assert!(
                (a.loss - b.loss).abs() < 2e-3 * (1.0 + b.loss.abs()),
                "step {}: loss",
                k + 1
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() < 1e-2 * (1.0 + b.grad_norm),
                "step {}: grad norm",
                k + 1
            );
        }
        close_weights(w, &one_w, &format!("{world} devices vs 1"));
    }

    // 2 devices: 4 steps straight against 2 + resume on 2 devices + 2.
    let straight = on_ranks(group(2), |_, (c, r)| train(&c, Some(r), "a", 4, false)).unwrap();
    on_ranks(group(2), |_, (c, r)| train(&c, Some(r), "b", 2, false)).unwrap();
    let resumed = on_ranks(group(2), |_, (c, r)| train(&c, Some(r), "b", 4, true)).unwrap();
    assert_eq!(resumed[0].0.len(), 2);
    assert_eq!(
        resumed[0].1, straight[0].1,
        "2 -> 2 resume on the devices is not exact"
    );

    // SFT on 2 devices against one.
    let mut rng = Rng::from_seed(s ^ 0x5f7);
    let items: Vec<SftItem> = (0..5)
        .map(|_| {
            let len = 4 + rng.below(9);
            SftItem {
                tokens: (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect(),
                prompt_len: 1 + rng.below(len - 1),
            }
        })
        .collect();
    let sft = |c: &Cuda, comm: Option<RankComm<Cuda>>| {
        let mut sc = SftConfig {
            batch_size: 3,
            micro_batch_tokens: 16,
            ..SftConfig::default()
        };
        sc.run.steps = 2;
        sc.optim.lr = 1e-3;
        let model = Model::from_host(c, cfg.clone(), &host)?;
        let mut t = SftTrainer::new_in(c.clone(), model, items.clone(), sc, comm)?;
        t.quiet = true;
        let m = t.run(None)?;
        Ok((m, t.model.to_host(c)?))
    };
    let (m1, w1) = sft(&devs[0], None).unwrap();
    let two = on_ranks(group(2), |_, (c, r)| sft(&c, Some(r))).unwrap();
    assert_eq!(two[0].1, two[1].1, "SFT: the ranks' weights differ");
    for (a, b) in two[0].0.iter().zip(&m1) {
        println!(
            "SFT 2 devices step {}: loss {:.6} vs {:.6}",
            a.step, a.loss, b.loss
        );
        assert!((a.loss - b.loss).abs() < 2e-3 * (1.0 + b.loss.abs()));
    }
    close_weights(&two[0].1, &w1, "SFT 2 devices vs 1");
}

/// GRPO and SFT trainer steps on 2 devices with the gradient reductions on NCCL's own stream
/// (overlapping the backward) against the same steps with them on the compute stream
/// (`NcclStream::Compute`, `TOOLN1_NCCL_STREAM=compute`): the same operations in another
/// order of streams, so the same losses, gradient norms and weights, bit for bit. Three decoder
/// layers, so that several groups are in flight; SFT's 5 sequences split unevenly, so one rank
/// pads its passes (one tensor at a time) while the other reduces whole groups.
#[test]
fn overlapped_reductions_give_the_serial_bits() {
    use common::train::LikesE;
    use tooln1::train::config::{RunConfig, SftConfig};
    use tooln1::train::parallel::on_ranks;
    use tooln1::train::sft::SftItem;
    use tooln1::train::{RankComm, SftTrainer, TrainConfig, TrainData, Trainer};
    let Some((_lock, devs)) = devices() else {
        return;
    };
    let devs = &devs[..2];
    let s = common::seed("cuda_dist_overlap_bits");
    let tok = common::train::golden_tokenizer();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let mut cfg = init::tiny_config(128, 3, 2, 1, 96, vocab, false);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host: Vec<Vec<f32>> = init::random_params(&cfg, s)
        .iter()
        .map(|t| common::bf16_round(t))
        .collect();
    let prompts = common::train::chat_prompts(&tok, &["the tree", "set a timer"]);
    let tmp = tempfile::tempdir().unwrap();
    let group = |stream: NcclStream| -> Vec<(Cuda, RankComm<Cuda>)> {
        let ranks = nccl_group_on(devs, stream).unwrap();
        devs.iter()
            .cloned()
            .zip(ranks)
            .map(|(c, r)| (c, Box::new(r) as RankComm<Cuda>))
            .collect()
    };
    let grpo = |c: &Cuda, comm: RankComm<Cuda>, out: &str| {
        let mut tc = TrainConfig {
            run: RunConfig {
                out: tmp.path().join(out),
                steps: 2,
                seed: s,
                ..RunConfig::default()
            },
            save_every: 0,
            ..TrainConfig::default()
        };
        tc.rollout.n = 2;
        tc.rollout.max_new_tokens = 4;
        tc.rollout.temperature = 1.0;
        tc.grpo.prompts_per_step = 2;
        tc.grpo.mini_batch_prompts = 2;
        tc.grpo.micro_batch_tokens = 32;
        tc.grpo.entropy_coef = 0.01;
        tc.optim.lr = 1e-3;
        let data = TrainData {
            tokenizer: common::train::golden_tokenizer(),
            prompts: prompts.clone(),
            reward: Box::new(LikesE),
        };
        let policy = Model::from_host(c, cfg.clone(), &host)?;
        let reference = Model::from_host(c, cfg.clone(), &host)?;
        let mut t = Trainer::new_in(c.clone(), policy, reference, data, tc, Some(comm))?;
        t.quiet = true;
        let m = t.run()?;
        let sums: Vec<(f64, f64)> = m.iter().map(|m| (m.loss, m.grad_norm)).collect();
        Ok((sums, t.policy.to_host(c)?))
    };
    let mut rng = Rng::from_seed(s ^ 0x0e1);
    let items: Vec<SftItem> = (0..5)
        .map(|_| {
            let len = 4 + rng.below(9);
            SftItem {
                tokens: (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect(),
                prompt_len: 1 + rng.below(len - 1),
            }
        })
        .collect();
    let sft = |c: &Cuda, comm: RankComm<Cuda>| {
        let mut sc = SftConfig {
            batch_size: 5,
            micro_batch_tokens: 12,
            ..SftConfig::default()
        };
        sc.run.steps = 2;
        sc.run.out = tmp.path().join("sft");
        sc.optim.lr = 1e-3;
        let model = Model::from_host(c, cfg.clone(), &host)?;
        let mut t = SftTrainer::new_in(c.clone(), model, items.clone(), sc, Some(comm))?;
        t.quiet = true;
        let m = t.run(None)?;
        let sums: Vec<(f64, f64)> = m.iter().map(|m| (m.loss, m.grad_norm)).collect();
        Ok((sums, t.model.to_host(c)?))
    };
    let own = on_ranks(group(NcclStream::Own), |_, (c, r)| grpo(&c, r, "own")).unwrap();
    let serial = on_ranks(group(NcclStream::Compute), |_, (c, r)| {
        grpo(&c, r, "serial")
    })
    .unwrap();
    println!(
        "seed {s}: GRPO own stream {:?}, compute stream {:?}",
        own[0].0, serial[0].0
    );
    assert!(own[0].0.iter().all(|&(_, g)| g > 0.0), "GRPO: no gradient");
    for r in 0..2 {
        assert_eq!(
            own[r].0, serial[r].0,
            "seed {s} GRPO rank {r}: losses / grad norms"
        );
        assert!(
            own[r].1 == serial[r].1,
            "seed {s} GRPO rank {r}: weights differ"
        );
    }
    let own = on_ranks(group(NcclStream::Own), |_, (c, r)| sft(&c, r)).unwrap();
    let serial = on_ranks(group(NcclStream::Compute), |_, (c, r)| sft(&c, r)).unwrap();
    println!(
        "seed {s}: SFT own stream {:?}, compute stream {:?}",
        own[0].0, serial[0].0
    );
    for r in 0..2 {
        assert_eq!(
            own[r].0, serial[r].0,
            "seed {s} SFT rank {r}: losses / grad norms"
        );
        assert!(
            own[r].1 == serial[r].1,
            "seed {s} SFT rank {r}: weights differ"
        );
    }
}
