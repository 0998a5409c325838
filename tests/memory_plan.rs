//! The memory planner: placements it picks, explicit choices it keeps, refusals, overflow, the
//! `memory` config setting and `inspect`'s plans for Qwen2.5-7B and 14B.

use tooln1::cli::model_cmds::{builtin_config, inspect_report, InspectArgs};
use tooln1::model::init::tiny_config;
use tooln1::model::plan::{plan, Budget, Caps, Place, Placement, Where, DEVICE_RESERVE};
use tooln1::train::config::{parse_config, SftConfig, TrainConfig};

const GB: u64 = 1_000_000_000;

fn tool_n1() -> TrainConfig {
    TrainConfig::default()
}

fn budget(gb: u64) -> Budget {
    Budget {
        device_free: gb * GB,
        host_available: None,
    }
}

#[test]
fn qwen7b_fits_one_80gb_gpu_with_the_optimizer_and_reference_on_the_host() {
    let cfg = builtin_config("qwen2.5-7b").unwrap();
    let shape = tool_n1().run_shape();
    let p = plan(&cfg, &shape, &budget(80), &Placement::default(), &Caps::ALL).unwrap();
    assert!(p.refusal.is_none(), "{p}");
    assert_eq!(p.optimizer, Where::Host);
    assert_eq!(p.reference, Where::Host);
    assert_eq!(p.grads, Where::Device);
    assert!(p.slots >= 1 && p.slots <= 256, "{p}");
    assert!(p.device_peak() <= 80 * GB - DEVICE_RESERVE, "{p}");
    // The host holds master + moments (12 bytes per parameter) and the bf16 reference.
    assert!(p.host_total >= 14 * 7_615_616_512, "{p}");
    // This build runs every placement of the design.
    assert_eq!(Caps::ENGINE, Caps::ALL);
    // With the reference and the gradients kept on the device, the smallest micro-batch (one
    // whole group of 4096 + 5 x 8192 tokens) does not fit: a refusal, not a crash.
    let on_device = Placement {
        reference: Place::Device,
        grads: Place::Device,
        ..Placement::default()
    };
    let e = plan(&cfg, &shape, &budget(80), &on_device, &Caps::ENGINE).unwrap();
    assert_eq!(e.optimizer, Where::Host);
    let why = e.refusal.as_deref().unwrap();
    assert!(why.contains("smallest micro-batch (45056 tokens)"), "{why}");
    // Gradients on the host as well: a smaller device peak than with them on the device.
    let all_host = Placement {
        optimizer: Place::Host,
        grads: Place::Host,
        reference: Place::Host,
    };
    let h = plan(&cfg, &shape, &budget(80), &all_host, &Caps::ENGINE).unwrap();
    assert!(h.refusal.is_none(), "{h}");
    assert_eq!(h.grads, Where::Host);
    assert!(h.train_peak < p.train_peak, "{h}\n{p}");
}

#[test]
fn a_small_model_stays_on_the_device_and_explicit_choices_are_kept() {
    let cfg = tiny_config(64, 2, 4, 2, 96, 300, false);
    let mut tc = tool_n1();
    tc.rollout.max_prompt_tokens = 100;
    tc.rollout.max_new_tokens = 50;
    let shape = tc.run_shape();
    let p = plan(
        &cfg,
        &shape,
        &budget(80),
        &Placement::default(),
        &Caps::ENGINE,
    )
    .unwrap();
    assert!(p.refusal.is_none(), "{p}");
    assert_eq!(
        (p.optimizer, p.grads, p.reference),
        (Where::Device, Where::Device, Where::Device)
    );
    assert_eq!(p.slots, 256);
    assert_eq!(p.micro_batch_tokens, 16384);
    let host = Placement {
        optimizer: Place::Host,
        ..Placement::default()
    };
    let p = plan(&cfg, &shape, &budget(80), &host, &Caps::ENGINE).unwrap();
    assert_eq!(p.optimizer, Where::Host);
    assert!(p.host_total > 0);
    // A placement outside what a build runs is an error naming what it runs.
    let g = Placement {
        grads: Place::Host,
        ..Placement::default()
    };
    let device_only = Caps {
        host_optimizer: true,
        host_grads: false,
        host_reference: false,
    };
    let e = plan(&cfg, &shape, &budget(80), &g, &device_only).unwrap_err();
    assert!(e.contains("host gradients: false"), "{e}");
    let p = plan(&cfg, &shape, &budget(80), &g, &Caps::ENGINE).unwrap();
    assert_eq!(p.grads, Where::Host);
}

#[test]
fn slots_and_micro_batch_tokens_are_lowered_to_fit_and_never_raised() {
    let cfg = builtin_config("qwen2.5-7b").unwrap();
    let mut tc = tool_n1();
    tc.rollout.max_prompt_tokens = 4096;
    tc.rollout.max_new_tokens = 2048;
    tc.grpo.micro_batch_tokens = 1 << 20;
    let shape = tc.run_shape();
    let p = plan(
        &cfg,
        &shape,
        &budget(141),
        &Placement::default(),
        &Caps::ENGINE,
    )
    .unwrap();
    assert!(p.refusal.is_none(), "{p}");
    assert!(p.slots < 256 && p.slots >= 1, "{p}");
    assert!(p.micro_batch_tokens < 1 << 20, "{p}");
    assert!(p.train_peak <= 141 * GB - DEVICE_RESERVE);
    assert!(p.rollout_peak <= 141 * GB - DEVICE_RESERVE);
    // One more slot or token would not fit (the planner took the largest).
    let mut more = shape;
    more.max_slots = p.slots + 1;
    more.micro_batch_tokens = p.micro_batch_tokens + 1;
    let q = plan(
        &cfg,
        &more,
        &budget(141),
        &Placement::default(),
        &Caps::ENGINE,
    )
    .unwrap();
    assert_eq!(
        (q.slots, q.micro_batch_tokens),
        (p.slots, p.micro_batch_tokens)
    );
}

#[test]
fn nothing_fits_gives_a_refusal_with_the_table_and_huge_sizes_do_not_wrap() {
    let cfg = builtin_config("qwen2.5-14b").unwrap();
    let shape = tool_n1().run_shape();
    let p = plan(&cfg, &shape, &budget(16), &Placement::default(), &Caps::ALL).unwrap();
    let why = p.refusal.clone().unwrap();
    assert!(why.contains("device-resident state"), "{why}");
    assert!(p.to_string().contains("does not fit"), "{p}");
    let mut huge = shape;
    huge.max_len = u64::MAX / 2;
    huge.max_prompt = u64::MAX / 2;
    huge.min_micro_batch_tokens = u64::MAX;
    let p = plan(
        &cfg,
        &huge,
        &budget(1 << 30),
        &Placement::default(),
        &Caps::ALL,
    )
    .unwrap();
    assert!(p.refusal.is_some(), "{p}");
    assert!(p.to_string().contains("overflows"), "{p}");
    let host = Budget {
        device_free: 1 << 50,
        host_available: Some(1 << 30),
    };
    let p = plan(
        &cfg,
        &shape,
        &host,
        &Placement {
            optimizer: Place::Host,
            ..Placement::default()
        },
        &Caps::ALL,
    )
    .unwrap();
    assert!(p.refusal.unwrap().contains("host memory"));
}

#[test]
fn the_memory_setting_parses_as_a_word_or_a_table() {
    let c: TrainConfig = parse_config("", "t", &[]).unwrap();
    assert!(c.memory.is_auto());
    let c: TrainConfig = parse_config("memory = \"auto\"\n", "t", &[]).unwrap();
    assert!(c.memory.is_auto());
    let c: TrainConfig = parse_config(
        "[memory]\noptimizer = \"host\"\n",
        "t",
        &["memory.reference=device".into()],
    )
    .unwrap();
    assert_eq!(c.memory.optimizer, Place::Host);
    assert_eq!(c.memory.reference, Place::Device);
    assert_eq!(c.memory.grads, Place::Auto);
    // Round trip through the saved config (what a resume reads).
    let text = toml::to_string(&c).unwrap();
    let back: TrainConfig = parse_config(&text, "saved", &[]).unwrap();
    assert_eq!(back.memory, c.memory);
    let s: SftConfig = parse_config("memory = \"auto\"\n", "s", &[]).unwrap();
    assert!(s.memory.is_auto());
    for bad in [
        "memory = \"gpu\"\n",
        "[memory]\noptimizer = \"disk\"\n",
        "[memory]\nmaster = \"host\"\n",
    ] {
        let e = parse_config::<TrainConfig>(bad, "t", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("memory") || e.contains("optimizer"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn inspect_prints_the_7b_and_14b_plans_on_80_and_141_gb() {
    for (name, params) in [("qwen2.5-7b", "7615616512"), ("qwen2.5-14b", "14770033664")] {
        let r = inspect_report(&InspectArgs {
            model: name.into(),
            micro_batch_tokens: 16384,
            rollout_seqs: 64,
            max_len: 4096,
            offload_reference: false,
            gpu_gb: vec![80.0, 141.0],
            gpus: vec![1],
            config: None,
        })
        .unwrap();
        assert!(r.contains(&format!("parameters: {params}")), "{r}");
        assert!(r.contains("one GPU with 80 GB free"), "{r}");
        assert!(r.contains("one GPU with 141 GB free"), "{r}");
        assert!(r.contains("KV-cache and activation budget"), "{r}");
        assert!(r.contains("host:"), "{r}");
    }
    // Qwen2.5-7B fits one 80 GB GPU with the placements this build runs.
    let r = inspect_report(&InspectArgs {
        model: "qwen2.5-7b".into(),
        micro_batch_tokens: 16384,
        rollout_seqs: 64,
        max_len: 4096,
        offload_reference: false,
        gpu_gb: vec![80.0],
        gpus: vec![1],
        config: None,
    })
    .unwrap();
    let plan80 = &r[r.find("one GPU with 80 GB free").unwrap()..];
    assert!(plan80.contains("  fits"), "{r}");
    assert!(plan80.contains("reference stream buffers"), "{r}");
    assert!(!r.contains("does not fit"), "{r}");
}

#[test]
fn qwen7b_fits_each_of_8_80gb_gpus_with_sharded_optimizer_state() {
    use tooln1::model::plan::RunShape;
    let cfg = builtin_config("qwen2.5-7b").unwrap();
    let one = tool_n1().run_shape();
    let shape = RunShape { ranks: 8, ..one };
    let p = plan(
        &cfg,
        &shape,
        &budget(80),
        &Placement::default(),
        &Caps::ENGINE,
    )
    .unwrap();
    assert!(p.refusal.is_none(), "{p}");
    // Several ranks keep the optimizer and the gradients on the device, sharded.
    assert_eq!(
        (p.optimizer, p.grads),
        (Where::Device, Where::Device),
        "{p}"
    );
    assert!(p.device_peak() <= 80 * GB - DEVICE_RESERVE, "{p}");
    let row = |what: &str| {
        p.rows
            .iter()
            .find(|r| r.item.starts_with(what))
            .unwrap_or_else(|| panic!("no row {what}:\n{p}"))
            .bytes
    };
    // One eighth of the f32 master (4 bytes per parameter), within the per-tensor padding and
    // the pool's rounding.
    let master = row("master weights (f32, 1/8)") as f64;
    let eighth = 4.0 * 7_615_616_512.0 / 8.0;
    assert!(
        master >= eighth && master < 1.1 * eighth,
        "{master} vs {eighth}"
    );
    assert_eq!(
        row("AdamW m + v (f32, 1/8)"),
        2 * row("master weights (f32, 1/8)")
    );
    // Only the open backward group's full-size gradients: far below the 30 GB of all of them.
    assert!(row("gradients of the open backward group") < 3 * GB, "{p}");
    // The one-GPU plan of the same run needs more device memory per GPU before activations.
    let single = plan(
        &cfg,
        &one,
        &budget(80),
        &Placement::default(),
        &Caps::ENGINE,
    )
    .unwrap();
    assert!(
        p.device_resident < single.device_resident + 14 * GB,
        "{p}\n{single}"
    );
    // A host optimizer is one-GPU only: asked for with 8 ranks, no placement satisfies it.
    let host_opt = Placement {
        optimizer: Place::Host,
        ..Placement::default()
    };
    let e = plan(&cfg, &shape, &budget(80), &host_opt, &Caps::ENGINE).unwrap_err();
    assert!(e.contains("no placement"), "{e}");
    // `inspect` prints the per-GPU plan for 1 and 8 GPUs by default.
    let r = inspect_report(&InspectArgs {
        model: "qwen2.5-7b".into(),
        micro_batch_tokens: 16384,
        rollout_seqs: 64,
        max_len: 4096,
        offload_reference: false,
        gpu_gb: vec![80.0],
        gpus: vec![1, 8],
        config: None,
    })
    .unwrap();
    assert!(r.contains("one GPU with 80 GB free"), "{r}");
    assert!(r.contains("each of 8 GPUs with 80 GB free"), "{r}");
    assert!(r.contains("to spare at the device peak"), "{r}");
}

#[test]
fn shard_lengths_match_the_shard_plan() {
    use tooln1::dist::ShardPlan;
    use tooln1::model::plan::shard_len;
    use tooln1::model::ParamLayout;
    for (hidden, layers, vocab) in [(32, 1, 96), (48, 2, 200), (3584, 1, 152064)] {
        let cfg = tiny_config(hidden, layers, 4, 2, hidden * 3 + 1, vocab, false);
        let layout = ParamLayout::new(&cfg);
        for world in [1usize, 2, 3, 7, 8] {
            let sp = ShardPlan::new(&layout, world).unwrap();
            for (t, s) in sp.tensors.iter().zip(&layout.specs) {
                assert_eq!(
                    t.shard as u64,
                    shard_len(s.numel() as u64, world as u64),
                    "{} over {world}",
                    s.name
                );
            }
        }
    }
}

/// The rollout's paged KV cache gets the device memory left beside the resident state and the
/// rollout's other working sets: more blocks on a larger GPU, never more than `slots + 1`
/// sequences at their longest, never fewer than one sequence and its prompt's last block; the
/// config's KV knobs are checked naming their fields.
#[test]
fn kv_block_pool_is_sized_from_free_memory() {
    let cfg = builtin_config("qwen2.5-7b").unwrap();
    let mut tc = tool_n1();
    tc.rollout.max_prompt_tokens = 2048;
    tc.rollout.max_new_tokens = 2048;
    tc.rollout.max_slots = 64;
    let shape = tc.run_shape();
    let per_seq = (4096u64).div_ceil(shape.kv_block_size);
    assert_eq!(shape.kv_block_size, 16);
    // bf16 k and v of 28 layers x 4 kv heads x 128 per token.
    let block = shape.kv_block_size * 28 * 2 * 4 * 128 * 2;
    let mut last = 0;
    for gb in [80u64, 141, 2000] {
        let p = plan(
            &cfg,
            &shape,
            &budget(gb),
            &Placement::default(),
            &Caps::ENGINE,
        )
        .unwrap();
        assert!(p.refusal.is_none(), "{p}");
        assert!(p.kv_blocks > per_seq, "{p}");
        assert!(p.kv_blocks <= (p.slots + 1) * per_seq, "{p}");
        assert!(p.kv_blocks >= last, "{gb} GB: {p}");
        assert!(p.rollout_peak <= gb * GB - DEVICE_RESERVE, "{p}");
        let row = p
            .rows
            .iter()
            .find(|r| r.item.starts_with("KV cache"))
            .unwrap();
        // The pool's blocks and the cache's scratch block (graph-replayed decode's padding).
        assert_eq!(row.bytes, (p.kv_blocks + 1) * block, "{p}");
        assert!(p
            .to_string()
            .contains(&format!("KV-cache blocks {}", p.kv_blocks)));
        last = p.kv_blocks;
        if gb == 2000 {
            // Memory to spare: the pool the rollout takes unconstrained.
            assert_eq!(p.kv_blocks, (p.slots + 1) * per_seq, "{p}");
        }
    }
    let mut bad = tc.clone();
    bad.rollout.kv_block_size = 0;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("rollout.kv_block_size"), "{e}");
    let mut bad = tc.clone();
    bad.rollout.kv_blocks = per_seq as usize;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("rollout.kv_blocks"), "{e}");
    let mut ok = tc;
    ok.rollout.kv_blocks = per_seq as usize + 1;
    ok.validate().unwrap();
}
