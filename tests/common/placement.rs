//! The host placements of `memory.grads` and `memory.reference` against the device placement,
//! written once over the backend: the streamed model's passes and the host gradient sums bit
//! for bit against the resident ones, and whole GRPO and SFT runs (with a resume) whose final
//! weights must be the same bits whatever the placement. `tests/host_placement.rs` runs them on
//! the CPU backend, `tests/cuda_host_placement.rs` on the CUDA backend.

use std::path::Path;

use super::train::{golden_tokenizer, LikesE};
use super::Rng;
use tooln1::backend::Backend;
use tooln1::model::{init, Group, Model, PackedBatch, Qwen2Config};
use tooln1::train::checkpoint;
use tooln1::train::config::{Place, Placement, RunConfig, SftConfig};
use tooln1::train::host_grads::HostGrads;
use tooln1::train::sft::{SftItem, SftTrainer};
use tooln1::train::{PromptItem, TrainConfig, Trainer};

pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

pub fn same(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(bits(x), bits(y), "{what}: tensor {i} differs");
    }
}

fn tokens(r: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| r.below(vocab) as u32).collect()
}

/// A random batch: whole sequences, or shared-prompt groups.
pub fn random_batch(r: &mut Rng, vocab: usize, shared: bool) -> PackedBatch {
    if shared {
        let prompts: Vec<Vec<u32>> = (0..1 + r.below(2))
            .map(|_| {
                let n = 2 + r.below(6);
                tokens(r, n, vocab)
            })
            .collect();
        let responses: Vec<Vec<Vec<u32>>> = prompts
            .iter()
            .map(|_| {
                (0..1 + r.below(3))
                    .map(|_| {
                        let n = 2 + r.below(5);
                        tokens(r, n, vocab)
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<Vec<&[u32]>> = responses
            .iter()
            .map(|g| g.iter().map(|s| s.as_slice()).collect())
            .collect();
        let groups: Vec<Group<'_>> = prompts
            .iter()
            .zip(&refs)
            .map(|(p, rs)| Group {
                prompt: p,
                responses: rs,
            })
            .collect();
        PackedBatch::shared_groups(&groups).unwrap()
    } else {
        let seqs: Vec<Vec<u32>> = (0..1 + r.below(3))
            .map(|_| {
                let n = 2 + r.below(10);
                tokens(r, n, vocab)
            })
            .collect();
        PackedBatch::from_sequences(&seqs).unwrap()
    }
}

/// The streamed model's forward passes (logprobs at a random temperature with entropy, full
/// logits, prefill and decode) against the resident model's, bit for bit; the passes that
/// need resident weights are errors.
pub fn check_streamed_reference<B: Backend>(
    b: &B,
    cfg: &Qwen2Config,
    host: &[Vec<f32>],
    r: &mut Rng,
) {
    let resident = Model::from_host(b, cfg.clone(), host).unwrap();
    let streamed = Model::from_host(b, cfg.clone(), host)
        .unwrap()
        .into_streamed(b)
        .unwrap();
    let hl = streamed.host_layers().unwrap();
    assert_eq!(hl.len(), cfg.num_hidden_layers);
    same(
        &resident.to_host(b).unwrap(),
        &streamed.to_host(b).unwrap(),
        "weights read back",
    );
    let v = cfg.vocab_size;
    for shared in [false, true, false, true] {
        let batch = random_batch(r, v, shared);
        let (dr, ds) = (
            resident.upload_batch(b, &batch).unwrap(),
            streamed.upload_batch(b, &batch).unwrap(),
        );
        let inv_t = 0.5 + r.uni() * 1.5;
        let (lr, er) = resident.logprobs_at(b, &dr, true, inv_t).unwrap();
        let (ls, es) = streamed.logprobs_at(b, &ds, true, inv_t).unwrap();
        assert_eq!(bits(&lr), bits(&ls), "logprobs (shared {shared})");
        assert_eq!(bits(&er.unwrap()), bits(&es.unwrap()), "entropy");
        if !shared {
            let fr = resident.forward_logits(b, &dr).unwrap();
            let fs = streamed.forward_logits(b, &ds).unwrap();
            assert_eq!(bits(&fr), bits(&fs), "logits");
        }
        let e = streamed.forward_train(b, &ds, false, true).err().unwrap();
        assert!(e.to_string().contains("streamed"), "{e}");
    }
    // Prefill + decode through the KV cache.
    let (slots, max_len) = (3, 16);
    let mut cr = resident.new_cache(b, slots, max_len).unwrap();
    let mut cs = streamed.new_cache(b, slots, max_len).unwrap();
    let prompts: Vec<Vec<u32>> = (0..slots)
        .map(|_| {
            let n = 1 + r.below(6);
            tokens(r, n, v)
        })
        .collect();
    let pr = resident.prefill(b, &mut cr, &prompts).unwrap();
    let ps = streamed.prefill(b, &mut cs, &prompts).unwrap();
    let n = slots * v;
    assert_eq!(
        bits(&b.download_f32(&pr, n).unwrap()),
        bits(&b.download_f32(&ps, n).unwrap()),
        "prefill logits"
    );
    for _ in 0..3 {
        let t = tokens(r, slots, v);
        let dr = resident.decode(b, &mut cr, &t).unwrap();
        let ds = streamed.decode(b, &mut cs, &t).unwrap();
        assert_eq!(
            bits(&b.download_f32(&dr, n).unwrap()),
            bits(&b.download_f32(&ds, n).unwrap()),
            "decode logits"
        );
    }
}

/// Gradients summed in host memory over several micro-batches (forward + backward each)
/// against the resident buffers, bit for bit; then zeroed and summed again.
pub fn check_host_grads<B: Backend>(
    b: &B,
    cfg: &Qwen2Config,
    host: &[Vec<f32>],
    recompute: bool,
    r: &mut Rng,
) {
    let model = Model::from_host(b, cfg.clone(), host).unwrap();
    let mut dev = model.zero_grads(b).unwrap();
    let mut hg = HostGrads::new(&model).unwrap();
    let v = cfg.vocab_size;
    for round in 0..2 {
        if round == 1 {
            tooln1::train::optim::zero_grads(b, &model, &mut dev).unwrap();
            hg.zero();
        }
        for _ in 0..2 + r.below(2) {
            let shared = r.below(2) == 1;
            let batch = random_batch(r, v, shared);
            let db = model.upload_batch(b, &batch).unwrap();
            let m = batch.n_logits();
            let dl = b.upload_f32(&r.vec(m, 1.0)).unwrap();
            let tape = model.forward_train(b, &db, false, recompute).unwrap();
            model.backward(b, &db, tape, &dl, &mut dev).unwrap();
            let tape = model.forward_train(b, &db, false, recompute).unwrap();
            model.backward(b, &db, tape, &dl, &mut hg).unwrap();
        }
        for (i, s) in model.layout.specs.iter().enumerate() {
            let d = b.download_f32(&dev[i], s.numel()).unwrap();
            assert_eq!(
                bits(&d),
                bits(&hg.tensor(i)),
                "round {round}: gradient of {} (recompute {recompute})",
                s.name
            );
        }
    }
}

/// A tiny GRPO problem: a config of the golden tokenizer's vocabulary, random weights, prompts.
pub struct GrpoCase {
    pub cfg: Qwen2Config,
    pub host: Vec<Vec<f32>>,
    pub prompts: Vec<PromptItem>,
}

/// `dims` = (hidden, heads, kv heads, intermediate).
pub fn grpo_case(dims: (usize, usize, usize, usize), tied: bool, seed: u64) -> GrpoCase {
    let tok = golden_tokenizer();
    let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
    let (hidden, heads, kv, inter) = dims;
    let mut cfg = init::tiny_config(hidden, 2, heads, kv, inter, vocab, tied);
    cfg.eos_token_id = vec![tok.token_id("<|im_end|>").unwrap()];
    let host = init::random_params(&cfg, seed);
    let prompts = super::train::chat_prompts(
        &tok,
        &["the tree", "set a timer", "weather here", "call me"],
    );
    GrpoCase { cfg, host, prompts }
}

pub fn grpo_config(out: &Path, steps: u64, memory: Placement, seed: u64) -> TrainConfig {
    let mut c = TrainConfig {
        run: RunConfig {
            out: out.to_path_buf(),
            steps,
            seed,
            ..RunConfig::default()
        },
        save_every: 2,
        ..TrainConfig::default()
    };
    c.rollout.n = 3;
    c.rollout.max_new_tokens = 5;
    c.rollout.temperature = 1.0;
    c.rollout.max_slots = 4;
    c.grpo.prompts_per_step = 2;
    // Two groups per update and a token budget below two groups: several micro-batches.
    c.grpo.mini_batch_prompts = 2;
    c.grpo.micro_batch_tokens = 24;
    c.grpo.kl_coef = 0.05;
    c.optim.lr = 2e-3;
    c.memory = memory;
    c
}

fn trainer<B: Backend>(b: B, case: &GrpoCase, tc: TrainConfig) -> Trainer<B> {
    let policy = Model::from_host(&b, case.cfg.clone(), &case.host).unwrap();
    let reference = Model::from_host(&b, case.cfg.clone(), &case.host).unwrap();
    let mut t = Trainer::new(
        b,
        policy,
        reference,
        golden_tokenizer(),
        case.prompts.clone(),
        Box::new(LikesE),
        tc,
    )
    .unwrap();
    t.quiet = true;
    t
}

/// Final weights of a 4-step GRPO run in `out`: straight through with `first`, or (`resume`
/// given) 2 steps with `first`, then resumed from the step-2 checkpoint for 2 more with
/// `resume`.
pub fn grpo_weights<B: Backend>(
    mk: &dyn Fn() -> B,
    case: &GrpoCase,
    out: &Path,
    first: Placement,
    resume: Option<Placement>,
    seed: u64,
) -> Vec<Vec<f32>> {
    let Some(second) = resume else {
        let mut t = trainer(mk(), case, grpo_config(out, 4, first, seed));
        assert_eq!(
            t.reference.host_layers().is_some(),
            first.reference == Place::Host
        );
        t.run().unwrap();
        return t.policy.to_host(&t.b).unwrap();
    };
    let mut t = trainer(mk(), case, grpo_config(out, 2, first, seed));
    t.run().unwrap();
    drop(t);
    let ck = checkpoint::resolve_resume(out).unwrap();
    let b = mk();
    let reference = Model::from_host(&b, case.cfg.clone(), &case.host).unwrap();
    let mut t = Trainer::resume(
        b,
        &ck,
        reference,
        golden_tokenizer(),
        case.prompts.clone(),
        Box::new(LikesE),
        grpo_config(out, 4, second, seed),
    )
    .unwrap();
    t.quiet = true;
    assert_eq!(
        t.reference.host_layers().is_some(),
        second.reference == Place::Host
    );
    t.run().unwrap();
    t.policy.to_host(&t.b).unwrap()
}

/// Random SFT items over `vocab`.
pub fn sft_items(r: &mut Rng, vocab: usize) -> Vec<SftItem> {
    (0..5)
        .map(|i| SftItem {
            tokens: tokens(r, 6 + 3 * i, vocab),
            prompt_len: 2 + i,
        })
        .collect()
}

/// Final weights of a 3-step SFT run with gradients placed by `grads`.
pub fn sft_weights<B: Backend>(
    b: B,
    cfg: &Qwen2Config,
    host: &[Vec<f32>],
    items: &[SftItem],
    memory: Placement,
) -> Vec<Vec<f32>> {
    let mut c = SftConfig {
        batch_size: 2,
        micro_batch_tokens: 16,
        ..SftConfig::default()
    };
    c.run.steps = 3;
    c.optim.lr = 1e-2;
    c.optim.warmup_steps = 0;
    c.memory = memory;
    let model = Model::from_host(&b, cfg.clone(), host).unwrap();
    let mut t = SftTrainer::new(b, model, items.to_vec(), c).unwrap();
    t.quiet = true;
    t.run(None).unwrap();
    t.model.to_host(&t.b).unwrap()
}

/// Every placement of the optimizer and gradients (and, for GRPO, the reference) worth
/// comparing against the all-device one.
pub fn host_placements(grpo: bool) -> Vec<Placement> {
    let p = |optimizer, grads, reference| Placement {
        optimizer,
        grads,
        reference,
    };
    let (d, h) = (Place::Device, Place::Host);
    let mut v = vec![p(d, h, d), p(h, h, d)];
    if grpo {
        v.extend([p(d, d, h), p(d, h, h), p(h, h, h)]);
    }
    v
}

pub fn device_placement() -> Placement {
    Placement {
        optimizer: Place::Device,
        grads: Place::Device,
        reference: Place::Device,
    }
}
