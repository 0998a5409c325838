//! Train with GRPO from a Rust program, without the CLI: load (or build) a model, plug in your own
//! reward and prompts, and run the loop.
//!
//! ```text
//! cargo run --release --example custom_reward                 # a tiny random model
//! cargo run --release --example custom_reward -- MODEL_DIR    # an HF Qwen2 folder
//! ```
//!
//! The reward here asks for answers that are a single word in upper case; any type that
//! implements `tooln1::reward::Reward` can take its place (the Tool-N1 reward is
//! `tooln1::reward::ToolN1Reward`).

use tooln1::backend::cpu::Cpu;
use tooln1::model::weights::load_model;
use tooln1::model::{init, Model};
use tooln1::reward::{Reward, RewardOutput};
use tooln1::tokenizer::{ChatTemplate, Tokenizer};
use tooln1::train::config::RunConfig;
use tooln1::train::{PromptItem, TrainConfig, Trainer};

struct ShoutOneWord;

impl Reward for ShoutOneWord {
    fn score(&self, response: &str, _ground_truth: &serde_json::Value) -> RewardOutput {
        let t = response.trim();
        let one_word = !t.is_empty() && !t.contains(char::is_whitespace);
        let upper = t.chars().any(|c| c.is_alphabetic())
            && t.chars().all(|c| !c.is_alphabetic() || c.is_uppercase());
        let reward = 0.5 * one_word as u8 as f32 + 0.5 * upper as u8 as f32;
        RewardOutput {
            reward,
            format_ok: one_word,
            calls_ok: one_word && upper,
            reason: format!("one word: {one_word}, upper case: {upper}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let b = Cpu;
    let arg = std::env::args().nth(1);
    // A model folder from the command line, or a tiny random model with the small test
    // tokenizer shipped in the repository.
    let (policy, reference, tok) = match &arg {
        Some(dir) => {
            let dir = std::path::Path::new(dir);
            (
                load_model(dir, &b)?,
                load_model(dir, &b)?,
                Tokenizer::from_dir(dir)?,
            )
        }
        None => {
            let tok = Tokenizer::from_file(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/golden/tokenizer/tokenizer.json"),
            )?;
            let vocab = tok.inner.get_vocab_size(true).div_ceil(64) * 64;
            let mut cfg = init::tiny_config(64, 2, 4, 2, 128, vocab, true);
            cfg.eos_token_id = vec![tok.require_token("<|im_end|>")?];
            let host = init::random_params(&cfg, 1);
            (
                Model::from_host(&b, cfg.clone(), &host)?,
                Model::from_host(&b, cfg, &host)?,
                tok,
            )
        }
    };

    // Prompts: chat-rendered questions (the reward ignores the ground truth here).
    let template = ChatTemplate::qwen25();
    let questions = [
        "Name a color.",
        "Say hello.",
        "Pick a fruit.",
        "Name an animal.",
    ];
    let mut prompts = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let msgs = [tooln1::data::Message {
            role: "user".into(),
            content: q.to_string(),
        }];
        let text = template.render(&msgs, None, true)?;
        prompts.push(PromptItem {
            id: format!("q{i}"),
            tokens: tok.encode(&text)?,
            ground_truth: serde_json::Value::Null,
        });
    }

    let mut cfg = TrainConfig {
        run: RunConfig {
            out: std::env::temp_dir().join("tooln1-custom-reward"),
            steps: 10,
            ..RunConfig::default()
        },
        save_every: 0,
        ..TrainConfig::default()
    };
    cfg.rollout.n = 4;
    cfg.rollout.max_new_tokens = 8;
    cfg.rollout.temperature = 1.0;
    cfg.grpo.prompts_per_step = 4;
    cfg.grpo.mini_batch_prompts = 2;
    cfg.optim.lr = 1e-3;

    let mut trainer = Trainer::new(
        b,
        policy,
        reference,
        tok,
        prompts,
        Box::new(ShoutOneWord),
        cfg,
    )?;
    let steps = trainer.run()?;
    for m in &steps {
        println!(
            "step {:>2}: reward {:.3}, kl {:.4}, response length {:.1}",
            m.step, m.reward_mean, m.kl, m.response_len_mean
        );
    }
    println!(
        "{}\ncheckpoint and metrics in {}",
        tooln1::train::metrics::summarize(&steps),
        trainer.cfg.run.out.display()
    );
    Ok(())
}
