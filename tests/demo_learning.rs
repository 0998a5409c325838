//! The learning check: with fixed seeds, GRPO raises the held-out reward of the demo's tiny
//! model over its SFT starting point.

use tooln1::backend::cpu::Cpu;
use tooln1::demo::{run_demo, DemoConfig};

#[test]
fn grpo_raises_heldout_reward_over_sft() {
    let cfg = DemoConfig {
        quiet: std::env::var("TOOLN1_DEMO_VERBOSE").is_err(),
        ..DemoConfig::test()
    };
    let t = std::time::Instant::now();
    let r = run_demo(Cpu, &cfg).unwrap();
    eprintln!(
        "demo: vocab {}, {} params, prompts {:.1} tokens; held-out reward random {:.3}, after SFT \
         {:.3} (greedy {:.3}), after GRPO {:.3} (greedy {:.3}); SFT {:.1} s, GRPO {:.1} s, total {:.1} s",
        r.vocab_size,
        r.num_params,
        r.prompt_tokens_mean,
        r.heldout_before_sft.0,
        r.heldout_after_sft.0,
        r.greedy_after_sft,
        r.heldout_after_grpo.0,
        r.greedy_after_grpo,
        r.time_sft_s,
        r.time_grpo_s,
        t.elapsed().as_secs_f64()
    );
    for m in &r.grpo_steps {
        eprintln!(
            "step {:>2}: reward {:.3} kl {:.4} clip {:.3} entropy {:.3} len {:.1}",
            m.step, m.reward_mean, m.kl, m.clip_frac, m.entropy, m.response_len_mean
        );
    }
    // SFT taught the format.
    assert!(
        r.heldout_after_sft.1 > 0.8,
        "format-ok after SFT {:.3}",
        r.heldout_after_sft.1
    );
    assert!(r.sft_loss_last < r.sft_loss_first);
    // GRPO raised the reward on its own rollouts (last ten steps vs first ten) ...
    let mean = |ms: &[tooln1::train::metrics::StepMetrics]| {
        ms.iter().map(|m| m.reward_mean).sum::<f64>() / ms.len() as f64
    };
    let k = r.grpo_steps.len();
    let (first, last) = (mean(&r.grpo_steps[..10]), mean(&r.grpo_steps[k - 10..]));
    assert!(
        first + 0.05 < last,
        "training reward {first:.3} -> {last:.3}"
    );
    // ... and on held-out prompts it never saw.
    assert!(
        r.heldout_after_grpo.0 > r.heldout_after_sft.0 + 0.04,
        "held-out reward after SFT {:.3}, after GRPO {:.3}",
        r.heldout_after_sft.0,
        r.heldout_after_grpo.0
    );
    assert!(
        r.greedy_after_grpo > r.greedy_after_sft,
        "greedy held-out reward after SFT {:.3}, after GRPO {:.3}",
        r.greedy_after_sft,
        r.greedy_after_grpo
    );
}
