//! Command-line interface (compiled into the binary only; clap types never reach the library).

pub mod device;
mod eval;
mod export;
mod generate;
mod inspect;
mod merge;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use device::DeviceArg;

/// Temper: LoRA fine-tuning for open-weight language models.
#[derive(Debug, Parser)]
#[command(name = "temper", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a model's architecture, size, dtype and tokenizer without loading its weights.
    Inspect(inspect::InspectArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Mean next-token loss and perplexity of a model on a `{"text": ...}` JSONL file.
    Eval(eval::EvalArgs),
    /// Merge PEFT adapters into the base weights; writes a complete Hugging Face model folder.
    Merge(merge::MergeArgs),
    /// Export an adapter for serving: a clean PEFT folder or a llama.cpp LoRA GGUF.
    Export(export::ExportArgs),
}

/// Where a model comes from: a Hugging Face folder (config.json, safetensors, tokenizer.json).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder in the Hugging Face layout.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// auto | cpu | cuda[:N] | wgpu
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
    }
}
