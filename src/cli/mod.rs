//! Command-line interface (compiled into the binary only; clap types never reach the library).

pub mod device;
mod eval;
mod generate;
mod inspect;
mod preview;

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
    /// Show the first rows of a dataset as the model sees them, trained tokens highlighted.
    Preview(preview::PreviewArgs),
}

/// Where a model comes from: a Hugging Face folder (config.json, safetensors, tokenizer.json).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder in the Hugging Face layout, or a Hub id (`owner/name`).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Hub revision (branch, tag or commit) when `--model` is a Hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// auto | cpu | cuda[:N] | wgpu
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(mut a) => {
            a.model = hub_model(&a.model, None)?;
            inspect::run(a)
        }
        Command::Generate(mut a) => {
            a.model.model = hub_model(&a.model.model, a.model.revision.as_deref())?;
            generate::run(a)
        }
        Command::Eval(mut a) => {
            a.model.model = hub_model(&a.model.model, a.model.revision.as_deref())?;
            eval::run(a)
        }
        Command::Preview(a) => preview::run(a),
    }
}

/// A local model folder as is; a Hub id downloaded (or read from the cache) to its snapshot folder.
fn hub_model(model: &std::path::Path, revision: Option<&str>) -> Result<PathBuf> {
    let spec = model.to_str().ok_or_else(|| anyhow::anyhow!("model path is not UTF-8: {}", model.display()))?;
    Ok(temper::hub::resolve_model(spec, revision)?)
}
