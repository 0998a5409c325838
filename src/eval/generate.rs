//! Evaluation generation: greedy outputs for BFCL / API-Bank prompts (Tool-N1 format), in
//! batches, written to a JSONL file of `{"id", "output"}` lines that the scorers read.

use crate::backend::Backend;
use crate::data::Message;
use crate::model::Model;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::train::checkpoint::write_atomic;
use crate::train::rollout::{generate, SamplingParams};
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// A prompt to answer: an id and its chat messages.
#[derive(Clone, Debug, PartialEq)]
pub struct GenPrompt {
    pub id: String,
    pub messages: Vec<Message>,
}

/// How prompts become tokens and outputs text: the tokenizer, the chat template the messages
/// are rendered with, and the token ids that end an output.
#[derive(Clone, Copy)]
pub struct Chat<'a> {
    pub tok: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub stop: &'a [u32],
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
/// token). Prompts are batched by similar length. After each batch, `on_batch(done, total,
/// outputs)` gets the progress and that batch's (id, output) pairs (e.g. to save them as they
/// come); an error from it stops the generation.
pub fn generate_outputs<B: Backend>(
    b: &B,
    model: &Model<B>,
    chat: Chat<'_>,
    prompts: &[GenPrompt],
    cfg: &GenConfig,
    mut on_batch: impl FnMut(usize, usize, &[(String, String)]) -> Result<()>,
) -> Result<(Vec<(String, String)>, GenStats)> {
    let Chat {
        tok,
        template,
        stop,
    } = chat;
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
        let mut finished = Vec::with_capacity(chunk.len());
        for (g, &i) in gens.iter().zip(chunk) {
            stats.generated_tokens += g.tokens.len();
            stats.truncated += (!g.stopped) as usize;
            outputs[i] = tok.decode(g.content(), false)?;
            finished.push((prompts[i].id.clone(), outputs[i].clone()));
        }
        done += chunk.len();
        on_batch(done, order.len(), &finished)?;
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

/// The file beside `out` that [`PartialOutputs`] appends to: `.NAME.partial`.
pub fn partial_path(out: &Path) -> std::path::PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.partial"))
}

/// Generations saved as they are made, so that an interrupted `eval ... run` keeps them and a
/// rerun with the same settings continues where it stopped. The first line records the
/// settings (`header`); a rerun with other settings is refused rather than mixing outputs of
/// two models.
pub struct PartialOutputs {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// (id, output) pairs already saved by an earlier, interrupted run.
    pub done: Vec<(String, String)>,
}

impl PartialOutputs {
    /// Open (or continue) the partial file of `out`. Also checks, before any generation, that
    /// `out` can be written: its folder is created and the partial file opened in it.
    pub fn open(out: &Path, header: &serde_json::Value) -> Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(out) {
            if !m.is_file() {
                return Err(Error::msg(format!(
                    "{}: exists and is not a regular file; choose another --out",
                    out.display()
                )));
            }
        }
        if let Some(dir) = out.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
        }
        let path = partial_path(out);
        let mut done = Vec::new();
        let mut fresh = !path.exists();
        if !fresh {
            let text = crate::safefs::read_to_string(&path)?;
            let mut lines = text.lines();
            let first: serde_json::Value = lines
                .next()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or(serde_json::Value::Null);
            for l in lines {
                // A line cut by a kill is incomplete JSON: that output is generated again.
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                    continue;
                };
                if let (Some(id), Some(o)) = (
                    v.get("id").and_then(|x| x.as_str()),
                    v.get("output").and_then(|x| x.as_str()),
                ) {
                    done.push((id.to_string(), o.to_string()));
                }
            }
            if first.get("settings") != Some(header) {
                if !done.is_empty() {
                    return Err(Error::msg(format!(
                        "{}: holds {} generations of an interrupted run with other settings \
                         ({}); delete it to start over, or rerun with those settings to continue",
                        path.display(),
                        done.len(),
                        first.get("settings").unwrap_or(&serde_json::Value::Null)
                    )));
                }
                // No generation in it yet: nothing to keep.
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                fresh = true;
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if fresh {
            let line = serde_json::json!({ "settings": header }).to_string();
            writeln!(file, "{line}").map_err(|e| Error::io(&path, e))?;
        } else {
            // Start on a fresh line in case the last one was cut.
            writeln!(file).map_err(|e| Error::io(&path, e))?;
        }
        Ok(PartialOutputs { path, file, done })
    }

    /// Append one batch of outputs and flush it to disk.
    pub fn append(&mut self, batch: &[(String, String)]) -> Result<()> {
        let mut body = String::new();
        for (id, out) in batch {
            body.push_str(&serde_json::json!({"id": id, "output": out}).to_string());
            body.push('\n');
        }
        self.file
            .write_all(body.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Remove the partial file once the complete output is written.
    pub fn finish(self) -> Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))
    }
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
