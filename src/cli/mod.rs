//! The `tooln1` command line. Each family of subcommands lives in its own file; this file only
//! wires them together and turns errors into a message and an exit code.

pub mod data_cmds;
pub mod eval_cmds;
pub mod model_cmds;
pub mod reward_cmds;
pub mod train_cmds;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "tooln1",
    version,
    about = "GRPO training of tool-calling Qwen2.5 models (the Tool-N1 recipe) on CUDA or CPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a model's config, parameter count and a GRPO memory estimate.
    Inspect(model_cmds::InspectArgs),
    /// Write a tiny random Qwen2 model and tokenizer (demos, tests).
    InitTiny(model_cmds::InitTinyArgs),
    /// Score responses with the Tool-N1 reward.
    #[command(subcommand)]
    Reward(reward_cmds::RewardCmd),
    /// Prepare xLAM / ToolACE data in the unified JSONL format.
    #[command(subcommand)]
    Data(data_cmds::DataCmd),
    /// BFCL and API-Bank evaluation.
    #[command(subcommand)]
    Eval(eval_cmds::EvalCmd),
    /// GRPO training (with no arguments: the built-in demo).
    Train(train_cmds::TrainArgs),
    /// Supervised fine-tuning on assistant tokens.
    Sft(train_cmds::SftArgs),
    /// The built-in demo: tiny model, synthetic tool-calling task, SFT warm start, then GRPO.
    Demo(train_cmds::DemoArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => model_cmds::inspect(a),
        Command::InitTiny(a) => model_cmds::init_tiny(a),
        Command::Reward(c) => reward_cmds::run(c),
        Command::Data(c) => data_cmds::run(c),
        Command::Eval(c) => eval_cmds::run(c),
        Command::Train(a) => train_cmds::train(a),
        Command::Sft(a) => train_cmds::sft(a),
        Command::Demo(a) => train_cmds::demo(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
