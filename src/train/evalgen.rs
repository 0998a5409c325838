//! Evaluation generation: greedy outputs for BFCL / API-Bank prompts (Tool-N1 format), in
//! batches, written to a JSONL file of `{"id", "output"}` lines that the scorers read.

use crate::backend::Backend;
use crate::data::Message;
use crate::model::Model;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint::write_atomic;
use crate::train::rollout::{generate, SamplingParams};
use crate::{Error, Result};
use std::path::Path;

/// A prompt to answer: an id and its chat messages.
#[derive(Clone, Debug, PartialEq)]
pub struct GenPrompt {
    pub id: String,
    pub messages: Vec<Message>,
}

/// Generation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GenConfig {
    /// Prompts decoded together.
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Longer prompts are not generated for (their output is empty and they are counted).
    pub max_prompt_tokens: usize,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            batch_size: 32,
            max_new_tokens: 1024,
            max_prompt_tokens: 4096,
        }
    }
}

/// What [`generate_outputs`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenStats {
    pub prompts: usize,
    pub too_long: usize,
    pub truncated: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Greedy outputs for every prompt, in the prompts' order: (id, decoded text without the stop
/// token). Prompts are batched by similar length. `on_batch(done, total)` reports progress.
#[allow(clippy::too_many_arguments)]
pub fn generate_outputs<B: Backend>(
    b: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompts: &[GenPrompt],
    stop: &[u32],
    cfg: &GenConfig,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<(Vec<(String, String)>, GenStats)> {
    crate::ensure!(
        cfg.batch_size >= 1,
        "eval generation: batch size must be at least 1"
    );
    let t = std::time::Instant::now();
    let mut stats = GenStats {
        prompts: prompts.len(),
        ..Default::default()
    };
    let mut encoded: Vec<Option<Vec<u32>>> = Vec::with_capacity(prompts.len());
    for p in prompts {
        let text = template
            .render(&p.messages, None, true)
            .map_err(|e| Error::msg(format!("prompt {}: cannot render: {e}", p.id)))?;
        let ids = tok.encode(&text)?;
        if ids.is_empty() || ids.len() > cfg.max_prompt_tokens {
            stats.too_long += 1;
            encoded.push(None);
        } else {
            encoded.push(Some(ids));
        }
    }
    let mut order: Vec<usize> = (0..prompts.len())
        .filter(|&i| encoded[i].is_some())
        .collect();
    order.sort_by_key(|&i| encoded[i].as_ref().map(|v| v.len()).unwrap_or(0));
    let mut outputs = vec![String::new(); prompts.len()];
    let sp = SamplingParams {
        max_slots: cfg.batch_size,
        ..SamplingParams::greedy(cfg.max_new_tokens, stop.to_vec())
    };
    let mut done = 0;
    for chunk in order.chunks(cfg.batch_size) {
        let batch: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| encoded[i].clone().unwrap_or_default())
            .collect();
        let gens = generate(b, model, &batch, 1, &sp, 0, 0)?;
        for (g, &i) in gens.iter().zip(chunk) {
            stats.generated_tokens += g.tokens.len();
            stats.truncated += (!g.stopped) as usize;
            outputs[i] = tok.decode(g.content(), false)?;
        }
        done += chunk.len();
        on_batch(done, order.len());
    }
    stats.seconds = t.elapsed().as_secs_f64();
    Ok((
        prompts
            .iter()
            .zip(outputs)
            .map(|(p, o)| (p.id.clone(), o))
            .collect(),
        stats,
    ))
}

/// Write `{"id", "output"}` lines (write-then-rename).
pub fn write_outputs(path: &Path, outputs: &[(String, String)]) -> Result<()> {
    let mut body = String::new();
    for (id, out) in outputs {
        let line = serde_json::json!({"id": id, "output": out});
        body.push_str(&line.to_string());
        body.push('\n');
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    write_atomic(path, body.as_bytes())
}
