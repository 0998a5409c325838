//! The built-in demo: a tiny Qwen2-architecture model learns a synthetic tool-calling task on
//! whatever backend is present, in minutes on two CPU cores.
//!
//! 1. Task: four functions (weather, timer, currency conversion, restaurant search); queries
//!    from templates whose arguments must be copied from the query (city, unit, currency,
//!    cuisine, amount) or derived from it (hours -> minutes). Training and held-out prompts are
//!    disjoint.
//! 2. Tokenizer: a byte-level BPE trained at start on the demo's own corpus with the `tokenizers`
//!    crate (offline, deterministic), with the Qwen special tokens (`<|endoftext|>`,
//!    `<|im_start|>`, `<|im_end|>`) and `<tool_call>`, `</tool_call>`, `<think>`, `</think>` as
//!    added tokens. The demo's system prompt (the Tool-N1 system prompt for its four tools,
//!    identical in every prompt) is registered as one added token so that a prompt is a few
//!    dozen tokens: the model never has to read the tool list, which is fixed.
//! 3. Prompts are rendered with the Qwen2.5 chat template.
//! 4. SFT warm start on noisy targets (a fraction of the answers carry one wrong argument), which
//!    teaches the format but leaves the argument choice uncertain; then GRPO with the Tool-N1
//!    reward raises the held-out reward.

use crate::backend::Backend;
use crate::data::{Message, Sample};
use crate::model::{init, Model, Qwen2Config};
use crate::reward::{Reward, ToolN1Reward};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::config::{LrSchedule, OptimConfig, SftConfig, TrainConfig};
use crate::train::metrics::StepMetrics;
use crate::train::rollout::SamplingParams;
use crate::train::runner::{evaluate_reward, prepare_prompts, PromptItem, Trainer};
use crate::train::sft::{prepare_sft, SftTrainer};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

const CITIES: [&str; 10] = [
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Berlin", "Madrid", "Seoul", "Quito",
];
const UNITS: [&str; 2] = ["celsius", "fahrenheit"];
const CURRENCIES: [&str; 5] = ["USD", "EUR", "GBP", "JPY", "CHF"];
const CUISINES: [&str; 5] = ["thai", "italian", "mexican", "indian", "greek"];

/// The demo's tool schemas.
pub fn demo_tools() -> Vec<Value> {
    vec![
        json!({"name": "get_weather", "description": "Current weather in a city.",
               "parameters": {"type": "object", "properties": {
                   "city": {"type": "string", "description": "City name"},
                   "unit": {"type": "string", "description": "celsius or fahrenheit"}},
                   "required": ["city", "unit"]}}),
        json!({"name": "set_timer", "description": "Start a countdown timer.",
               "parameters": {"type": "object", "properties": {
                   "minutes": {"type": "integer", "description": "Duration in minutes"}},
                   "required": ["minutes"]}}),
        json!({"name": "convert_currency", "description": "Convert an amount of money.",
               "parameters": {"type": "object", "properties": {
                   "amount": {"type": "integer", "description": "Amount to convert"},
                   "from": {"type": "string", "description": "Currency code to convert from"},
                   "to": {"type": "string", "description": "Currency code to convert to"}},
                   "required": ["amount", "from", "to"]}}),
        json!({"name": "find_restaurant", "description": "Find a restaurant.",
               "parameters": {"type": "object", "properties": {
                   "city": {"type": "string", "description": "City name"},
                   "cuisine": {"type": "string", "description": "Kind of food"}},
                   "required": ["city", "cuisine"]}}),
    ]
}

/// The demo's system prompt: the Tool-N1 system prompt for [`demo_tools`].
pub fn demo_system_prompt() -> String {
    crate::data::tooln1_system_prompt("", &demo_tools(), false)
}

/// One task instance: a query and its correct call.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskItem {
    pub query: String,
    pub name: String,
    pub arguments: serde_json::Map<String, Value>,
}

fn pick<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.random_range(0..xs.len())]
}

fn pick_other<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str], not: &str) -> &'a str {
    loop {
        let x = pick(rng, xs);
        if x != not {
            return x;
        }
    }
}

/// Draw one task instance.
pub fn draw_task(rng: &mut ChaCha8Rng) -> TaskItem {
    let mut args = serde_json::Map::new();
    let (query, name) = match rng.random_range(0..4) {
        0 => {
            let city = pick(rng, &CITIES);
            let unit = pick(rng, &UNITS);
            args.insert("city".into(), json!(city));
            args.insert("unit".into(), json!(unit));
            let q = match rng.random_range(0..3) {
                0 => format!("What is the weather in {city} in {unit}?"),
                1 => format!("How warm is it in {city}? Use {unit}."),
                _ => format!("Give me the {unit} temperature for {city}."),
            };
            (q, "get_weather")
        }
        1 => {
            let q = match rng.random_range(0..4) {
                0 | 1 => {
                    let m = 5 * rng.random_range(1..=18);
                    args.insert("minutes".into(), json!(m));
                    if rng.random_bool(0.5) {
                        format!("Set a timer for {m} minutes.")
                    } else {
                        format!("Start a {m} minute timer.")
                    }
                }
                _ => {
                    let h = rng.random_range(1..=5);
                    args.insert("minutes".into(), json!(60 * h));
                    let s = if h == 1 { "" } else { "s" };
                    if rng.random_bool(0.5) {
                        format!("Set a timer for {h} hour{s}.")
                    } else {
                        format!("Remind me in {h} hour{s}.")
                    }
                }
            };
            (q, "set_timer")
        }
        2 => {
            let amount = rng.random_range(1..=99);
            let from = pick(rng, &CURRENCIES);
            let to = pick_other(rng, &CURRENCIES, from);
            args.insert("amount".into(), json!(amount));
            args.insert("from".into(), json!(from));
            args.insert("to".into(), json!(to));
            let q = if rng.random_bool(0.5) {
                format!("Convert {amount} {from} to {to}.")
            } else {
                format!("How much is {amount} {from} in {to}?")
            };
            (q, "convert_currency")
        }
        _ => {
            let city = pick(rng, &CITIES);
            let cuisine = pick(rng, &CUISINES);
            args.insert("city".into(), json!(city));
            args.insert("cuisine".into(), json!(cuisine));
            let q = if rng.random_bool(0.5) {
                format!("Find a {cuisine} restaurant in {city}.")
            } else {
                format!("I want {cuisine} food in {city}.")
            };
            (q, "find_restaurant")
        }
    };
    TaskItem {
        query,
        name: name.to_string(),
        arguments: args,
    }
}

/// A copy of `item`'s arguments with one argument replaced by a plausible wrong value.
pub fn corrupt(rng: &mut ChaCha8Rng, item: &TaskItem) -> serde_json::Map<String, Value> {
    let mut a = item.arguments.clone();
    let keys: Vec<String> = a.keys().cloned().collect();
    let k = keys[rng.random_range(0..keys.len())].clone();
    let cur = a[&k].clone();
    let new = match k.as_str() {
        "city" => json!(pick_other(rng, &CITIES, cur.as_str().unwrap_or(""))),
        "unit" => json!(pick_other(rng, &UNITS, cur.as_str().unwrap_or(""))),
        "cuisine" => json!(pick_other(rng, &CUISINES, cur.as_str().unwrap_or(""))),
        "from" | "to" => json!(pick_other(rng, &CURRENCIES, cur.as_str().unwrap_or(""))),
        "minutes" => {
            let m = cur.as_i64().unwrap_or(0);
            // hours not converted, or off by five minutes
            if m % 60 == 0 && rng.random_bool(0.5) {
                json!(m / 60)
            } else {
                json!(m + 5)
            }
        }
        _ => {
            let x = cur.as_i64().unwrap_or(0);
            json!(x + rng.random_range(1..=9))
        }
    };
    a.insert(k, new);
    a
}

/// The assistant reply for a call (Tool-N1 format: short reasoning, then the call list).
pub fn answer_text(name: &str, args: &serde_json::Map<String, Value>) -> String {
    let calls = json!([{"name": name, "arguments": Value::Object(args.clone())}]);
    format!(
        "<think>Use {name}.</think>\n<tool_call>{}</tool_call>",
        crate::pyjson::py_json(&calls)
    )
}

/// A task instance as a unified sample (prompt = system + user; ground truth = the call).
pub fn to_sample(id: String, system: &str, item: &TaskItem) -> Sample {
    Sample {
        id,
        source: "demo".into(),
        messages: vec![
            Message {
                role: "system".into(),
                content: system.to_string(),
            },
            Message {
                role: "user".into(),
                content: item.query.clone(),
            },
        ],
        tools: demo_tools(),
        ground_truth: json!([{"name": item.name, "arguments": Value::Object(item.arguments.clone())}]),
    }
}

/// Train the demo's byte-level BPE tokenizer on `corpus` (deterministic), with the Qwen special
/// tokens and the tool-call / think tags, and `system` as one added token.
pub fn train_tokenizer(corpus: &[String], vocab_size: usize, system: &str) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let tags = ["<tool_call>", "</tool_call>", "<think>", "</think>"];
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tk = tokenizers::Tokenizer::new(BPE::default());
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevel::new(false, true, true)));
    // BPE learns only the plain text between the special tokens, the tags and the system prompt;
    // those are added after training (ids after the learned vocabulary) and cut out of any text
    // before BPE sees it.
    let cut: Vec<&str> = specials
        .iter()
        .chain(tags.iter())
        .copied()
        .chain(std::iter::once(system))
        .collect();
    let mut pieces: Vec<String> = Vec::new();
    for text in corpus {
        let mut rest: Vec<String> = vec![text.clone()];
        for c in &cut {
            rest = rest
                .iter()
                .flat_map(|r| r.split(c).map(String::from).collect::<Vec<_>>())
                .collect();
        }
        pieces.extend(rest.into_iter().filter(|p| !p.is_empty()));
    }
    tk.train(&mut trainer, pieces.iter())
        .map_err(|e| Error::msg(format!("demo tokenizer training failed: {e}")))?;
    tk.add_special_tokens(
        &specials
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    );
    let mut added: Vec<AddedToken> = tags.iter().map(|s| AddedToken::from(*s, false)).collect();
    added.push(AddedToken::from(system.to_string(), false));
    tk.add_tokens(&added);
    Ok(Tokenizer { inner: tk })
}

/// Demo settings (sizes chosen to learn in minutes on two CPU cores).
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub seed: u64,
    pub train_prompts: usize,
    pub heldout_prompts: usize,
    /// Fraction of SFT answers with one wrong argument.
    pub sft_noise: f64,
    pub sft_samples: usize,
    pub sft_steps: u64,
    pub sft_batch: usize,
    pub sft_lr: f32,
    pub grpo_steps: u64,
    pub prompts_per_step: usize,
    pub n: usize,
    pub grpo_lr: f32,
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// Samples per held-out prompt in the reward evaluation.
    pub eval_n: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub bpe_vocab: usize,
    /// Output folder (tokenizer, SFT model, GRPO metrics and checkpoints); None = nothing saved.
    pub out: Option<PathBuf>,
    pub quiet: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seed: 7,
            train_prompts: 512,
            heldout_prompts: 64,
            sft_noise: 0.3,
            sft_samples: 512,
            sft_steps: 500,
            sft_batch: 32,
            sft_lr: 3e-3,
            grpo_steps: 60,
            prompts_per_step: 16,
            n: 8,
            grpo_lr: 3e-4,
            temperature: 0.8,
            max_new_tokens: 48,
            eval_n: 4,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            bpe_vocab: 512,
            out: None,
            quiet: false,
        }
    }
}

impl DemoConfig {
    /// A shorter run for the learning test (same task and model, fewer steps).
    pub fn test() -> Self {
        DemoConfig {
            sft_steps: 500,
            grpo_steps: 40,
            ..DemoConfig::default()
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    pub vocab_size: usize,
    pub num_params: u64,
    pub prompt_tokens_mean: f64,
    /// Held-out (reward, format-ok, exact) sampled at the rollout temperature.
    pub heldout_before_sft: (f64, f64, f64),
    pub heldout_after_sft: (f64, f64, f64),
    pub heldout_after_grpo: (f64, f64, f64),
    /// Held-out greedy reward after SFT and after GRPO.
    pub greedy_after_sft: f64,
    pub greedy_after_grpo: f64,
    pub sft_loss_first: f64,
    pub sft_loss_last: f64,
    pub grpo_steps: Vec<StepMetrics>,
    pub time_sft_s: f64,
    pub time_grpo_s: f64,
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}

/// Print greedy answers to a few prompts.
fn show_examples<B: Backend>(
    b: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[PromptItem],
    sp: &SamplingParams,
    label: &str,
) -> Result<()> {
    eprintln!(
        "greedy answers {label} on {} held-out prompts:",
        prompts.len()
    );
    let toks: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let gens = crate::train::rollout::generate(b, model, &toks, 1, sp, 0, 0)?;
    for (p, g) in prompts.iter().zip(&gens) {
        eprintln!(
            "  expected {}\n  answered {}",
            crate::pyjson::py_json(&p.ground_truth),
            tok.decode(&g.tokens, false)?
        );
    }
    Ok(())
}

/// Run the whole demo on backend `b` (cloned handles share the device; the frozen reference
/// model lives on the same backend).
pub fn run_demo<B: Backend>(b: B, cfg: &DemoConfig) -> Result<DemoReport> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let system = demo_system_prompt();
    let template = ChatTemplate::qwen25();

    // Task: disjoint training and held-out queries.
    let mut seen = HashSet::new();
    let mut train_items = Vec::new();
    let mut held_items = Vec::new();
    let mut guard = 0;
    while (train_items.len() < cfg.train_prompts || held_items.len() < cfg.heldout_prompts)
        && guard < 100 * (cfg.train_prompts + cfg.heldout_prompts + 1)
    {
        guard += 1;
        let it = draw_task(&mut rng);
        if !seen.insert(it.query.clone()) {
            continue;
        }
        if held_items.len() < cfg.heldout_prompts
            && (guard % 4 == 0 || train_items.len() >= cfg.train_prompts)
        {
            held_items.push(it);
        } else if train_items.len() < cfg.train_prompts {
            train_items.push(it);
        }
    }
    let train_samples: Vec<Sample> = train_items
        .iter()
        .enumerate()
        .map(|(i, it)| to_sample(format!("train-{i}"), &system, it))
        .collect();
    let held_samples: Vec<Sample> = held_items
        .iter()
        .enumerate()
        .map(|(i, it)| to_sample(format!("heldout-{i}"), &system, it))
        .collect();

    // SFT data: noisy answers for a subset of the training queries.
    let mut sft_samples = Vec::with_capacity(cfg.sft_samples);
    for k in 0..cfg.sft_samples {
        let it = &train_items[k % train_items.len()];
        let args = if rng.random_bool(cfg.sft_noise) {
            corrupt(&mut rng, it)
        } else {
            it.arguments.clone()
        };
        let mut s = to_sample(format!("sft-{k}"), &system, it);
        s.messages.push(Message {
            role: "assistant".into(),
            content: answer_text(&it.name, &args),
        });
        sft_samples.push(s);
    }

    // Tokenizer trained on the rendered corpus.
    let mut corpus = Vec::new();
    for s in train_samples.iter().chain(&held_samples) {
        corpus.push(template.render(&s.messages, None, true)?);
    }
    for s in &sft_samples {
        if let Some(m) = s.messages.last() {
            corpus.push(m.content.clone());
        }
    }
    let tok = train_tokenizer(&corpus, cfg.bpe_vocab, &system)?;
    let vocab = tok.inner.get_vocab_size(true);
    let vocab_padded = vocab.div_ceil(64) * 64;
    let im_end = tok
        .token_id("<|im_end|>")
        .ok_or_else(|| Error::msg("demo tokenizer lost <|im_end|>"))?;
    let eot = tok.token_id("<|endoftext|>").unwrap_or(im_end);

    let mut mcfg: Qwen2Config = init::tiny_config(
        cfg.hidden,
        cfg.layers,
        cfg.heads,
        cfg.kv_heads,
        cfg.intermediate,
        vocab_padded,
        true,
    );
    mcfg.bos_token_id = Some(eot);
    mcfg.eos_token_id = vec![im_end];
    mcfg.max_position_embeddings = 512;
    let host = init::random_params(&mcfg, cfg.seed ^ 0x5eed);
    let model = Model::from_host(&b, mcfg.clone(), &host)?;
    let num_params = model.layout.num_params();

    let (train_prompts, _) = prepare_prompts(&train_samples, &tok, &template, 512)?;
    let (held_prompts, _) = prepare_prompts(&held_samples, &tok, &template, 512)?;
    let (sft_items, _) = prepare_sft(&sft_samples, &tok, &template, 512)?;
    let prompt_tokens_mean = train_prompts.iter().map(|p| p.tokens.len()).sum::<usize>() as f64
        / train_prompts.len().max(1) as f64;
    say(
        cfg.quiet,
        &format!(
            "demo: backend {}, {} tools, {} training / {} held-out prompts, vocabulary {} \
             (padded {}), model {} parameters (hidden {}, {} layers), prompts {:.1} tokens on \
             average",
            b.name(),
            demo_tools().len(),
            train_prompts.len(),
            held_prompts.len(),
            vocab,
            vocab_padded,
            num_params,
            cfg.hidden,
            cfg.layers,
            prompt_tokens_mean
        ),
    );
    if let Some(out) = &cfg.out {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let p = out.join("tokenizer.json");
        tok.inner
            .save(&p, false)
            .map_err(|e| Error::msg(format!("{}: cannot save tokenizer: {e}", p.display())))?;
    }

    let reward = ToolN1Reward::default();
    let stop = vec![im_end, eot];
    let sampled = SamplingParams {
        temperature: cfg.temperature,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: cfg.max_new_tokens,
        stop: stop.clone(),
        max_slots: 256,
    };
    let greedy = SamplingParams::greedy(cfg.max_new_tokens, stop.clone());
    let eval_with = |b: &B, m: &Model<B>, tok: &Tokenizer, sp: &SamplingParams, n: usize| {
        evaluate_reward(
            b,
            m,
            tok,
            &held_prompts,
            &reward as &dyn Reward,
            n,
            sp,
            cfg.seed ^ 0xe7a1,
        )
    };
    let eval = |b: &B, m: &Model<B>, tok: &Tokenizer, sp: &SamplingParams, n: usize| {
        eval_with(b, m, tok, sp, n)
    };
    let before = eval(&b, &model, &tok, &sampled, 1)?;
    say(
        cfg.quiet,
        &format!("held-out reward of the random model: {:.3}", before.0),
    );

    // SFT warm start.
    let t = Instant::now();
    let sft_cfg = SftConfig {
        seed: cfg.seed,
        steps: cfg.sft_steps,
        batch_size: cfg.sft_batch,
        micro_batch_tokens: 4096,
        max_seq_tokens: 512,
        recompute: false,
        optim: OptimConfig {
            lr: cfg.sft_lr,
            schedule: LrSchedule::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
        ..SftConfig::default()
    };
    let mut sft = SftTrainer::new(b, model, sft_items, sft_cfg)?;
    sft.quiet = cfg.quiet;
    // The demo starts over each time: it replaces the checkpoints of an earlier demo run in
    // its own output folder (and only those).
    sft.discard_later = true;
    // Checkpoints copy the demo's tokenizer from the output folder, so each one is a complete
    // model folder (usable by `tooln1 eval ... run --model` and by transformers).
    sft.source_dir = cfg.out.clone();
    let sft_out = cfg.out.as_ref().map(|o| o.join("sft"));
    let sft_metrics = sft.run(sft_out.as_deref())?;
    let time_sft = t.elapsed().as_secs_f64();
    let (b, policy) = sft.into_parts();
    if !cfg.quiet {
        show_examples(
            &b,
            &policy,
            &tok,
            &held_prompts[..2.min(held_prompts.len())],
            &greedy,
            "after SFT",
        )?;
    }
    let after_sft = eval(&b, &policy, &tok, &sampled, cfg.eval_n)?;
    let greedy_sft = eval(&b, &policy, &tok, &greedy, 1)?.0;
    say(
        cfg.quiet,
        &format!(
            "after SFT ({} steps, loss {:.3} -> {:.3}, {:.1} s): held-out reward {:.3} sampled \
             (format ok {:.3}), {:.3} greedy",
            sft_metrics.len(),
            sft_metrics.first().map(|m| m.loss).unwrap_or(0.0),
            sft_metrics.last().map(|m| m.loss).unwrap_or(0.0),
            time_sft,
            after_sft.0,
            after_sft.1,
            greedy_sft
        ),
    );

    // GRPO from the SFT model; the reference is a frozen copy of it.
    let reference = Model::from_host(&b, mcfg.clone(), &policy.to_host(&b)?)?;
    let mut tcfg = TrainConfig {
        seed: cfg.seed,
        steps: cfg.grpo_steps,
        save_every: 0,
        ..TrainConfig::default()
    };
    tcfg.out = cfg.out.as_ref().map(|o| o.join("grpo")).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tooln1-demo-{}", std::process::id()))
    });
    tcfg.rollout.n = cfg.n;
    tcfg.rollout.temperature = cfg.temperature;
    tcfg.rollout.max_new_tokens = cfg.max_new_tokens;
    tcfg.rollout.max_prompt_tokens = 512;
    tcfg.grpo.prompts_per_step = cfg.prompts_per_step;
    tcfg.grpo.mini_batch_prompts = cfg.prompts_per_step;
    tcfg.grpo.micro_batch_tokens = 4096;
    tcfg.grpo.recompute = false;
    tcfg.optim.lr = cfg.grpo_lr;
    tcfg.optim.weight_decay = 0.0;
    let t = Instant::now();
    let mut trainer = Trainer::new(
        b,
        policy,
        reference,
        tok,
        train_prompts,
        Box::new(reward),
        tcfg,
    )?;
    trainer.quiet = cfg.quiet;
    trainer.discard_later = true;
    trainer.source_dir = cfg.out.clone();
    let steps = if cfg.out.is_some() {
        trainer.run()?
    } else {
        let mut v = Vec::new();
        while trainer.step < trainer.total_steps() {
            v.push(trainer.step()?);
        }
        v
    };
    let time_grpo = t.elapsed().as_secs_f64();
    let tok = &trainer.tokenizer;
    if !cfg.quiet {
        show_examples(
            &trainer.b,
            &trainer.policy,
            tok,
            &held_prompts[..2.min(held_prompts.len())],
            &greedy,
            "after GRPO",
        )?;
    }
    let after = eval_with(&trainer.b, &trainer.policy, tok, &sampled, cfg.eval_n)?;
    let greedy_after = eval_with(&trainer.b, &trainer.policy, tok, &greedy, 1)?.0;
    say(
        cfg.quiet,
        &format!(
            "after GRPO ({} steps, {:.1} s): held-out reward {:.3} sampled (format ok {:.3}), \
             {:.3} greedy",
            steps.len(),
            time_grpo,
            after.0,
            after.1,
            greedy_after
        ),
    );
    Ok(DemoReport {
        vocab_size: vocab,
        num_params,
        prompt_tokens_mean,
        heldout_before_sft: before,
        heldout_after_sft: after_sft,
        heldout_after_grpo: after,
        greedy_after_sft: greedy_sft,
        greedy_after_grpo: greedy_after,
        sft_loss_first: sft_metrics.first().map(|m| m.loss).unwrap_or(0.0),
        sft_loss_last: sft_metrics.last().map(|m| m.loss).unwrap_or(0.0),
        grpo_steps: steps,
        time_sft_s: time_sft,
        time_grpo_s: time_grpo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_and_corruptions() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let it = draw_task(&mut rng);
            assert!(!it.query.is_empty());
            let bad = corrupt(&mut rng, &it);
            assert_ne!(bad, it.arguments, "{it:?}");
            assert_eq!(bad.len(), it.arguments.len());
            let reward = ToolN1Reward::default();
            let gt = json!([{"name": it.name, "arguments": Value::Object(it.arguments.clone())}]);
            let good = answer_text(&it.name, &it.arguments);
            assert_eq!(reward.score(&good, &gt).reward, 1.0, "{good}");
            let wrong = answer_text(&it.name, &bad);
            assert_eq!(reward.score(&wrong, &gt).reward, 0.0, "{wrong}");
        }
    }
}
