//! Per-step metrics: one JSON line per step in `<out>/metrics.jsonl`, an indicatif progress bar
//! on stderr, and an end-of-run summary.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything logged for one GRPO step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub lr: f32,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub format_ok_rate: f64,
    pub exact_match_rate: f64,
    /// Fraction of groups whose rewards were all equal (zero advantage).
    pub zero_adv_groups: f64,
    pub loss: f64,
    pub pg_loss: f64,
    pub kl: f64,
    pub clip_frac: f64,
    pub ratio_mean: f64,
    pub entropy: f64,
    pub grad_norm: f64,
    pub response_len_mean: f64,
    pub response_len_max: usize,
    /// Responses cut at max_new_tokens.
    pub truncated_rate: f64,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
    pub updates: usize,
    pub time_rollout_s: f64,
    pub time_reward_s: f64,
    pub time_old_logprobs_s: f64,
    pub time_reference_s: f64,
    pub time_update_s: f64,
    pub time_step_s: f64,
    /// (prompt + response tokens) / step time.
    pub tokens_per_s: f64,
    /// Whether the training-side passes used the shared-prompt layout.
    #[serde(default)]
    pub shared_prompt: bool,
    /// Token rows through the layers in the old-logprob pass, the reference pass, and the
    /// policy forward + backward (all PPO epochs) of this step.
    #[serde(default)]
    pub tokens_old_logprobs: usize,
    #[serde(default)]
    pub tokens_reference: usize,
    #[serde(default)]
    pub tokens_update: usize,
    /// Token rows of one such pass done per sequence (every prompt repeated n times), the count
    /// the shared layout is compared with.
    #[serde(default)]
    pub tokens_naive_per_pass: usize,
    /// Rows through the lm_head + log-softmax per pass, and per sequence-wise pass.
    #[serde(default)]
    pub logit_rows_per_pass: usize,
    #[serde(default)]
    pub logit_rows_naive_per_pass: usize,
    /// Groups left out of the old, reference and update passes (`grpo.skip_zero_adv_groups`;
    /// 0 when off).
    #[serde(default)]
    pub groups_skipped: usize,
    /// Rollout token rows: through prefill (each prompt once, when shared), through decode
    /// (occupied slots only), and what the naive rollout computes for the same generations
    /// (every sequence prefilling its prompt, static batches of `rollout.max_slots` decoding
    /// until their longest response ends).
    #[serde(default)]
    pub tokens_rollout_prefill: u64,
    #[serde(default)]
    pub tokens_rollout_decode: u64,
    #[serde(default)]
    pub tokens_rollout_naive: u64,
    /// Prompt prefills of the rollout.
    #[serde(default)]
    pub rollout_prefills: usize,
    /// The paged KV cache during the rollout: the most blocks held at once and the most
    /// sequences decoded at once (the largest of any rank), and the sequences preempted for
    /// lack of blocks (summed over the ranks).
    #[serde(default)]
    pub rollout_kv_peak_blocks: usize,
    #[serde(default)]
    pub rollout_peak_concurrent: usize,
    #[serde(default)]
    pub rollout_preemptions: usize,
    /// Decode steps replayed as a CUDA graph and steps run with plain launches (summed over
    /// the ranks; `rollout.cuda_graphs`).
    #[serde(default)]
    pub rollout_graph_replays: usize,
    #[serde(default)]
    pub rollout_plain_decode_steps: usize,
    /// Model FLOPs per phase, counted from the config (`model::flops`): forward for the
    /// rollout and the old and reference passes, 3x forward per PPO epoch for the update
    /// (recomputation not counted).
    #[serde(default)]
    pub flops_rollout: f64,
    #[serde(default)]
    pub flops_old_logprobs: f64,
    #[serde(default)]
    pub flops_reference: f64,
    #[serde(default)]
    pub flops_update: f64,
    /// Token rows processed per second of each phase (rollout: prefill + decode rows; update:
    /// the pass's rows times the PPO epochs).
    #[serde(default)]
    pub tokens_per_s_rollout: f64,
    #[serde(default)]
    pub tokens_per_s_old_logprobs: f64,
    #[serde(default)]
    pub tokens_per_s_reference: f64,
    #[serde(default)]
    pub tokens_per_s_update: f64,
    /// The device peak the utilisation is measured against (TFLOP/s; `peak_tflops` in the
    /// config, else a known CUDA device's; none on the CPU unless configured).
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// Model FLOP utilisation per phase: FLOPs / time / peak (none without a peak).
    #[serde(default)]
    pub mfu_rollout: Option<f64>,
    #[serde(default)]
    pub mfu_old_logprobs: Option<f64>,
    #[serde(default)]
    pub mfu_reference: Option<f64>,
    #[serde(default)]
    pub mfu_update: Option<f64>,
    /// Peak resident memory of the process (host), MiB.
    pub peak_host_mib: f64,
}

/// Appends metric lines to a JSONL file (one flush per line).
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Open `path` for appending (a resumed run continues the same file; lines of steps at or
    /// after `first_step` left by an interrupted run are dropped first).
    pub fn open(path: &Path, first_step: u64) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        if path.exists() {
            let text = crate::safefs::read_to_string(path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s < first_step)
                })
                .collect();
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            super::checkpoint::write_atomic(path, body.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write<T: Serialize>(&mut self, m: &T) -> Result<()> {
        let line = serde_json::to_string(m).map_err(|e| Error::msg(e.to_string()))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 elsewhere).
pub fn peak_host_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A progress bar on stderr (hidden when `quiet`).
pub fn progress_bar(total: u64, quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// Mean of a metric over steps.
pub fn summarize(steps: &[StepMetrics]) -> String {
    if steps.is_empty() {
        return "no steps run".into();
    }
    let first = &steps[0];
    let last = &steps[steps.len() - 1];
    let time: f64 = steps.iter().map(|s| s.time_step_s).sum();
    let toks: usize = steps
        .iter()
        .map(|s| s.prompt_tokens + s.response_tokens)
        .sum();
    format!(
        "steps {}..{}: reward {:.3} -> {:.3}, exact-match {:.3} -> {:.3}, format-ok {:.3} -> {:.3}, \
         kl {:.4}, {:.1} s total, {:.0} tokens/s, peak host memory {:.0} MiB",
        first.step,
        last.step,
        first.reward_mean,
        last.reward_mean,
        first.exact_match_rate,
        last.exact_match_rate,
        first.format_ok_rate,
        last.format_ok_rate,
        last.kl,
        time,
        toks as f64 / time.max(1e-9),
        peak_host_mib()
    )
}
