//! Command-line interface (compiled into the binary only; clap types never reach the library).

mod bench;
pub mod device;
mod eval;
mod export;
mod generate;
mod inspect;
mod merge;
mod preview;
mod selftest;
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
    /// Show the first rows of a dataset as the model sees them, trained tokens highlighted.
    Preview(preview::PreviewArgs),
    /// Merge PEFT adapters into the base weights; writes a complete Hugging Face model folder.
    Merge(merge::MergeArgs),
    /// Export an adapter for serving: a clean PEFT folder or a llama.cpp LoRA GGUF.
    Export(export::ExportArgs),
    /// Check this build on this device against the transformers reference outputs committed
    /// in the repository's tests/fixtures (logits and loss of every fixture model).
    Selftest(selftest::SelftestArgs),
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
    /// A LoRA adapter folder in the PEFT format (ours or one trained by PEFT).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Quantize the decoder projections to 4 bits as they are loaded (QLoRA), bit for bit as
    /// bitsandbytes' quantize_4bit (blocks of 64). bitsandbytes 4-bit checkpoints are 4-bit
    /// without it.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// The 4-bit format for --load-in-4bit.
    #[arg(long, value_enum, default_value = "nf4", requires = "load_in_4bit")]
    pub quant_type: QuantTypeArg,
    /// With --load-in-4bit: quantize the absmax values too (bitsandbytes' double quantization,
    /// `bnb_4bit_use_double_quant`).
    #[arg(long, requires = "load_in_4bit")]
    pub double_quant: bool,
    /// Dequantize an FP8 checkpoint's projections as they load instead of keeping them in 8 bits
    /// on the device.
    #[arg(long)]
    pub dequantize_fp8: bool,
}

impl QuantTypeArg {
    pub fn four_bit(self) -> temper::quant::FourBit {
        match self {
            QuantTypeArg::Nf4 => temper::quant::FourBit::Nf4,
            QuantTypeArg::Fp4 => temper::quant::FourBit::Fp4,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum QuantTypeArg {
    Nf4,
    Fp4,
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
        let four_bit = self
            .load_in_4bit
            .then_some(temper::quant::LoadIn4Bit { kind: self.quant_type.four_bit(), double_quant: self.double_quant });
        let mut loaded = temper::model::load_model_with::<B>(&dir, precision, four_bit, !self.dequantize_fp8, device)
            .with_context(|| format!("loading {}", dir.display()))?;
        if let Some(notice) = loaded.model.config.composite_notice() {
            eprintln!("{notice}");
        }
        if let Some(a) = &self.adapter {
            let adapter = temper::export::Adapter::read(a)?;
            temper::lora::apply_adapter(&mut loaded.model, &adapter)
                .with_context(|| format!("applying adapter {}", a.display()))?;
        }
        Ok(loaded)
    }
}

/// One line per server (vLLM, llama.cpp, mistral.rs): will it serve the adapter in `dir`?
/// The base model folder, when known, lets the module names and the architecture be checked.
pub fn print_servability(dir: &std::path::Path, base: Option<&std::path::Path>) {
    use temper::export::serving::{check_adapter, ServingBase};
    let base = base.and_then(|b| ServingBase::from_model_dir(b).ok());
    match check_adapter(dir, base.as_ref()) {
        Ok(verdicts) => {
            for v in verdicts {
                println!("serving      {v}");
            }
        }
        Err(e) => eprintln!("serving      could not check {}: {e}", dir.display()),
    }
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
        Command::Train(a) => train::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Selftest(a) => selftest::run(a),
    }
}

/// A local model folder as is; a Hub id downloaded (or read from the cache) to its snapshot folder.
fn hub_model(model: &std::path::Path, revision: Option<&str>) -> Result<PathBuf> {
    let spec = model.to_str().ok_or_else(|| anyhow::anyhow!("model path is not UTF-8: {}", model.display()))?;
    resolve_model(spec, revision)
}

/// A model folder, or a Hugging Face Hub id (downloaded to, or read from, the standard cache).
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    Ok(temper::hub::resolve_model(spec, revision)?)
}
