//! Data-parallel building blocks on the CPU backend, with ranks as threads of this process:
//! the host collectives against sums computed here (rank order, so bit for bit), the abort
//! path (a failed or departed rank never leaves the others waiting), the shard plan, the split
//! of groups over ranks, `--gpus` parsing, and sharded AdamW against the single-rank AdamW given
//! the same summed gradients (bit for bit without clipping, within 1e-6 with it).
//! Seeds are printed; TOOLN1_TEST_SEED replays.

mod common;

use std::sync::Arc;

use common::Rng;
use tooln1::backend::cpu::Cpu;
use tooln1::backend::Backend;
use tooln1::dist::split::rank_groups;
use tooln1::dist::{host_group, Collective, GpuRequest, HostRank, ShardPlan};
use tooln1::model::layout::ParamLayout;
use tooln1::model::{init, Model};
use tooln1::train::config::OptimConfig;
use tooln1::train::optim::AdamW;
use tooln1::train::zero::ShardedAdamW;
use tooln1::Error;

/// Runs `f(rank)` on `world` threads, one handle each; returns the results by rank.
fn on_ranks<R: Send + 'static>(
    world: usize,
    f: impl Fn(HostRank) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = Arc::new(f);
    let hs: Vec<_> = host_group(world)
        .unwrap()
        .into_iter()
        .map(|h| {
            let f = f.clone();
            std::thread::spawn(move || f(h))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Σ_r xs[r] in rank order (f32).
fn rank_sum(xs: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = xs[0].clone();
    for x in &xs[1..] {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += *b;
        }
    }
    acc
}

#[test]
fn host_collectives_match_rank_order_sums() {
    let seed = common::seed("dist_host_collectives");
    let mut rng = Rng::from_seed(seed);
    for world in 1..=4 {
        let n = 1 + rng.below(37);
        let sends: Vec<Vec<f32>> = (0..world).map(|_| rng.vec(world * n + 3, 1.0)).collect();
        let accs: Vec<Vec<f32>> = (0..world).map(|_| rng.vec(n + 2, 1.0)).collect();
        let shards: Vec<Vec<f32>> = (0..world).map(|_| rng.vec(n, 1.0)).collect();
        let hosts: Vec<Vec<f64>> = (0..world)
            .map(|_| (0..5).map(|_| rng.uni() as f64 * 1e3).collect())
            .collect();
        let (s2, a2, sh2, h2) = (sends.clone(), accs.clone(), shards.clone(), hosts.clone());
        let out = on_ranks(world, move |h| {
            let r = h.rank();
            let b = Cpu;
            let mut acc = a2[r].clone();
            Collective::<Cpu>::reduce_scatter_add(&h, &b, &s2[r], &mut acc, n).unwrap();
            let mut gathered = vec![f32::NAN; world * n + 1];
            Collective::<Cpu>::all_gather(&h, &b, &sh2[r], &mut gathered, n).unwrap();
            let mut v = h2[r].clone();
            Collective::<Cpu>::all_reduce_host(&h, &mut v).unwrap();
            (acc, gathered, v)
        });
        let total: Vec<f32> = rank_sum(
            &sends
                .iter()
                .map(|s| s[..world * n].to_vec())
                .collect::<Vec<_>>(),
        );
        let mut host_sum = hosts[0].clone();
        for h in &hosts[1..] {
            for (a, b) in host_sum.iter_mut().zip(h) {
                *a += *b;
            }
        }
        for (r, (acc, gathered, v)) in out.iter().enumerate() {
            for i in 0..n {
                let want = accs[r][i] + total[r * n + i];
                assert_eq!(
                    acc[i].to_bits(),
                    want.to_bits(),
                    "seed {seed} world {world} rank {r} reduce_scatter [{i}]"
                );
            }
            assert_eq!(
                &acc[n..],
                &accs[r][n..],
                "seed {seed}: reduce_scatter wrote past n"
            );
            for q in 0..world {
                assert_eq!(
                    &gathered[q * n..(q + 1) * n],
                    &shards[q][..],
                    "seed {seed} world {world} all_gather"
                );
            }
            assert!(
                gathered[world * n].is_nan(),
                "all_gather wrote past world * n"
            );
            assert_eq!(v, &host_sum, "seed {seed} world {world} all_reduce_host");
        }
    }
}

#[test]
fn an_aborting_rank_stops_the_others() {
    let out = on_ranks(3, |h| {
        if h.rank() == 2 {
            h.abort("its data loader failed");
            return Ok(());
        }
        let mut v = [1.0f64];
        h.all_reduce_f64(&mut v)
    });
    for (r, res) in out.iter().enumerate().take(2) {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("rank 2") && e.contains("its data loader failed"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn a_departed_rank_stops_the_others() {
    // Rank 1 returns without joining the collective; dropping its handle stops the group.
    let out = on_ranks(2, |h| {
        if h.rank() == 1 {
            return None;
        }
        let mut v = [1.0f64];
        Some(h.all_reduce_f64(&mut v).map_err(|e| e.to_string()))
    });
    let e = out[0].clone().unwrap().unwrap_err();
    assert!(e.contains("rank 1") && e.contains("left the group"), "{e}");
}

#[test]
fn ranks_that_disagree_on_a_length_get_an_error() {
    let out = on_ranks(2, |h| {
        let mut v = vec![1.0f64; 3 + h.rank()];
        h.all_reduce_f64(&mut v).map_err(|e| e.to_string())
    });
    for res in out {
        let e = res.unwrap_err();
        assert!(
            e.contains("different lengths") && e.contains("[3, 4]"),
            "{e}"
        );
    }
}

#[test]
fn a_bad_argument_is_an_arg_error_and_stops_the_group() {
    let out = on_ranks(2, |h| {
        let b = Cpu;
        let n = 8;
        // Rank 0 passes a send buffer one shard short.
        let send = vec![1.0f32; if h.rank() == 0 { n } else { 2 * n }];
        let mut acc = vec![0.0f32; n];
        Collective::<Cpu>::reduce_scatter_add(&h, &b, &send, &mut acc, n)
    });
    match &out[0] {
        Err(Error::Arg { op, arg, .. }) => assert_eq!((*op, *arg), ("reduce_scatter", "send")),
        other => panic!("rank 0: {other:?}"),
    }
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 0") && e.contains("send"), "rank 1: {e}");
}

#[test]
fn shard_plan_covers_every_element_once() {
    for tied in [false, true] {
        let cfg = init::tiny_config(48, 3, 4, 2, 72, 61, tied);
        let layout = ParamLayout::new(&cfg);
        for world in 1..=8 {
            let plan = ShardPlan::new(&layout, world).unwrap();
            assert_eq!(plan.tensors.len(), layout.specs.len());
            // Buckets: the embedding, one per layer, then the rest, in order, covering all.
            assert_eq!(plan.buckets.len(), cfg.num_hidden_layers + 2, "tied {tied}");
            let mut next = 0;
            for b in &plan.buckets {
                assert_eq!(b.start, next);
                assert!(b.end > b.start);
                next = b.end;
            }
            assert_eq!(next, layout.specs.len());
            for (l, lp) in layout.layers.iter().enumerate() {
                assert_eq!(plan.bucket_of(lp.wq), Some(l + 1));
                assert_eq!(plan.bucket_of(lp.w_down), Some(l + 1));
            }
            for (t, s) in plan.tensors.iter().zip(&layout.specs) {
                assert_eq!(t.numel, s.numel());
                assert_eq!(t.shard % tooln1::dist::shard::SHARD_ALIGN, 0);
                assert!(t.padded(world) >= t.numel);
                let mut covered = 0;
                for r in 0..world {
                    let o = t.owned(r);
                    assert_eq!(o.start, (r * t.shard).min(t.numel));
                    assert!(o.len() <= t.shard);
                    if !o.is_empty() {
                        assert_eq!(o.start, covered, "{} world {world} rank {r}", s.name);
                    }
                    covered = covered.max(o.end);
                }
                assert_eq!(covered, t.numel, "{} world {world}", s.name);
            }
            assert_eq!(
                plan.shard_elems(),
                plan.tensors.iter().map(|t| t.shard).sum::<usize>()
            );
        }
    }
    let cfg = init::tiny_config(48, 1, 4, 2, 72, 61, false);
    assert!(ShardPlan::new(&ParamLayout::new(&cfg), 0).is_err());
}

#[test]
fn groups_split_over_ranks_without_spanning() {
    for n in 0..40 {
        for world in 1..=9 {
            let mut next = 0;
            let mut sizes = Vec::new();
            for r in 0..world {
                let g = rank_groups(n, world, r);
                assert_eq!(g.start, next, "n {n} world {world} rank {r}");
                next = g.end;
                sizes.push(g.len());
            }
            assert_eq!(next, n);
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "n {n} world {world}: {sizes:?}");
        }
    }
}

#[test]
fn gpus_flag_parses_and_resolves() {
    assert_eq!("all".parse::<GpuRequest>().unwrap(), GpuRequest::All);
    assert_eq!(" ALL ".parse::<GpuRequest>().unwrap(), GpuRequest::All);
    assert_eq!("3".parse::<GpuRequest>().unwrap(), GpuRequest::Count(3));
    for bad in ["0", "-1", "two", "", "1.5"] {
        let e = bad.parse::<GpuRequest>().unwrap_err().to_string();
        assert!(
            e.contains("--gpus") && e.contains("at least 1"),
            "{bad:?}: {e}"
        );
    }
    assert_eq!(GpuRequest::All.resolve(8).unwrap(), 8);
    assert_eq!(GpuRequest::Count(2).resolve(8).unwrap(), 2);
    let e = GpuRequest::Count(4).resolve(2).unwrap_err().to_string();
    assert!(e.contains("--gpus 4") && e.contains("only 2"), "{e}");
    assert!(matches!(GpuRequest::All.resolve(0), Err(Error::NoCuda(_))));
}

/// `world` ranks each with their own random gradients for `micro` micro-batches per update,
/// over `updates` updates: the sharded optimizer's weights on every rank against one AdamW
/// given the rank-order sums. Returns the largest relative difference of any weight.
fn sharded_vs_single(seed: u64, world: usize, tied: bool, clip: f32) -> f64 {
    let cfg = init::tiny_config(32, 2, 4, 2, 40, 53, tied);
    let host = init::random_params(&cfg, seed);
    let ocfg = OptimConfig {
        lr: 1e-2,
        grad_clip: clip,
        ..OptimConfig::default()
    };
    let (updates, micro) = (3usize, 2usize);
    let layout = ParamLayout::new(&cfg);
    let mut rng = Rng::from_seed(seed ^ 0x5eed);
    // grads[u][mb][r][tensor]
    let grads: Vec<Vec<Vec<Vec<Vec<f32>>>>> = (0..updates)
        .map(|_| {
            (0..micro)
                .map(|_| {
                    (0..world)
                        .map(|_| {
                            layout
                                .specs
                                .iter()
                                .map(|s| rng.vec(s.numel(), 0.5))
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();

    // The reference: one AdamW on the rank-order sums, accumulated over micro-batches.
    let b = Cpu;
    let params: Vec<Vec<f32>> = host.iter().map(|p| b.upload(p).unwrap()).collect();
    let mut single = Model::new(cfg.clone(), params).unwrap();
    let mut opt = AdamW::new(&b, &single, ocfg.clone()).unwrap();
    for u in &grads {
        let mut acc: Vec<Vec<f32>> = layout.specs.iter().map(|s| vec![0.0; s.numel()]).collect();
        for mb in u {
            for (i, a) in acc.iter_mut().enumerate() {
                let per_rank: Vec<Vec<f32>> = mb.iter().map(|r| r[i].clone()).collect();
                for (x, y) in a.iter_mut().zip(rank_sum(&per_rank)) {
                    *x += y;
                }
            }
        }
        let st = opt.step(&b, &mut single, &acc, updates as u64).unwrap();
        assert_eq!(
            st.grad_scale < 1.0,
            clip > 0.0,
            "clipping should be on exactly when set"
        );
    }
    let moved = single
        .params
        .iter()
        .zip(&host)
        .filter(|(p, h)| p != h)
        .count();
    assert_eq!(moved, host.len(), "every tensor should have moved");

    let (cfg2, host2, ocfg2, grads2) = (cfg.clone(), host.clone(), ocfg.clone(), grads.clone());
    let ranks = on_ranks(world, move |h| {
        let b = Cpu;
        let r = h.rank();
        let params: Vec<Vec<f32>> = host2.iter().map(|p| b.upload(p).unwrap()).collect();
        let mut model = Model::new(cfg2.clone(), params).unwrap();
        let plan = ShardPlan::new(&model.layout, world).unwrap();
        let mut opt = ShardedAdamW::new(&b, &model, ocfg2.clone(), plan, r).unwrap();
        let mut g = opt.alloc_grads(&b).unwrap();
        for u in &grads2 {
            for mb in u {
                for (i, t) in mb[r].iter().enumerate() {
                    g[i][..t.len()].copy_from_slice(t);
                }
                opt.reduce_all(&b, &h, &mut g).unwrap();
                assert!(
                    g.iter().all(|x| x.iter().all(|v| *v == 0.0)),
                    "grads not zeroed"
                );
            }
            opt.step(&b, &h, &mut model, updates as u64).unwrap();
        }
        model.params
    });
    let mut worst = 0.0f64;
    for (r, ps) in ranks.iter().enumerate() {
        for (i, (p, want)) in ps.iter().zip(&single.params).enumerate() {
            for (x, y) in p.iter().zip(want) {
                if clip == 0.0 {
                    assert_eq!(
                        x.to_bits(),
                        y.to_bits(),
                        "seed {seed} world {world} rank {r} tensor {}",
                        layout.specs[i].name
                    );
                }
                let d = ((x - y).abs() as f64) / (y.abs() as f64).max(1e-3);
                worst = worst.max(d);
            }
        }
    }
    worst
}

#[test]
fn sharded_adamw_equals_adamw_on_the_summed_gradient() {
    let seed = common::seed("dist_sharded_adamw");
    for world in 1..=4 {
        for tied in [false, true] {
            let d = sharded_vs_single(seed + world as u64, world, tied, 0.0);
            assert_eq!(d, 0.0);
            // Clipping on (the random gradients' norm is far above 1): the f64 norm sums in
            // another order, which may move the clip scale by an ulp.
            let d = sharded_vs_single(seed + world as u64, world, tied, 1.0);
            assert!(d < 1e-6, "seed {seed} world {world} tied {tied}: {d:e}");
        }
    }
}

#[test]
fn sharded_adamw_rejects_a_bad_rank_and_bucket() {
    let cfg = init::tiny_config(32, 1, 4, 2, 40, 53, false);
    let b = Cpu;
    let params: Vec<Vec<f32>> = init::random_params(&cfg, 1)
        .iter()
        .map(|p| b.upload(p).unwrap())
        .collect();
    let model = Model::new(cfg, params).unwrap();
    let plan = ShardPlan::new(&model.layout, 2).unwrap();
    let e = ShardedAdamW::new(&b, &model, OptimConfig::default(), plan.clone(), 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 2 of a 2-rank plan"), "{e}");
    let h = host_group(1).unwrap().pop().unwrap();
    let plan1 = ShardPlan::new(&model.layout, 1).unwrap();
    let mut opt = ShardedAdamW::new(&b, &model, OptimConfig::default(), plan1, 0).unwrap();
    let mut g = opt.alloc_grads(&b).unwrap();
    let nb = opt.plan.buckets.len();
    let e = opt
        .reduce_bucket(&b, &h, &mut g, nb)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("bucket {nb}")), "{e}");
}
