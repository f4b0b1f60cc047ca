//! Command-line interface (compiled into the binary only; clap types never reach the library).

mod bench;
pub mod device;
mod eval;
mod generate;
mod inspect;
mod train;

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
    /// Fine-tune a LoRA adapter from a YAML recipe.
    Train(train::TrainArgs),
    /// Time LoRA training steps on a model built from its config with random weights.
    Bench(bench::BenchArgs),
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
    /// A LoRA adapter folder in the PEFT format (ours or one trained by PEFT).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// Load the model (and the adapter, if one was given) on a backend.
    pub fn load<B: burn::tensor::backend::Backend>(
        &self,
        precision: temper::model::WeightPrecision,
        device: &B::Device,
    ) -> Result<temper::model::LoadedModel<B>> {
        use anyhow::Context;
        let dir = resolve_model(&self.model.to_string_lossy(), None)?;
        let mut loaded = temper::model::load_model::<B>(&dir, precision, device).with_context(|| format!("loading {}", dir.display()))?;
        if let Some(a) = &self.adapter {
            let adapter = temper::export::Adapter::read(a)?;
            temper::lora::apply_adapter(&mut loaded.model, &adapter).with_context(|| format!("applying adapter {}", a.display()))?;
        }
        Ok(loaded)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Train(a) => train::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// A model folder, or (once hub support lands) a Hugging Face Hub id.
pub fn resolve_model(spec: &str, _revision: Option<&str>) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    anyhow::bail!("base model `{spec}` is not a folder (config.json + safetensors + tokenizer.json)")
}
