//! `temper export`: re-write an adapter as a clean PEFT folder, or as a llama.cpp LoRA GGUF.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use temper::export::gguf::{write_gguf, GgufType};
use temper::export::{Adapter, WriteMode};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// adapter_config.json + adapter_model.safetensors with the conservative PEFT key set.
    Peft,
    /// One llama.cpp LoRA adapter file (`llama-cli --lora FILE`).
    Gguf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OutType {
    F32,
    F16,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// PEFT adapter folder.
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Output folder (peft) or file (gguf).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Base model folder (its config.json names the architecture); default: the adapter's
    /// base_model_name_or_path when that is a local folder.
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// GGUF tensor type.
    #[arg(long, value_enum, default_value = "f32")]
    pub outtype: OutType,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let adapter = Adapter::read(&args.adapter).with_context(|| format!("reading adapter {}", args.adapter.display()))?;
    if args.out.exists() && !args.force {
        bail!("{} already exists (use --force to replace it)", args.out.display());
    }
    match args.format {
        Format::Peft => adapter.write(&args.out, WriteMode::Replace, &[])?,
        Format::Gguf => {
            let base = match args.base.clone() {
                Some(b) => b,
                None => {
                    let b = PathBuf::from(&adapter.base_model);
                    if adapter.base_model.is_empty() || !b.join("config.json").is_file() {
                        bail!("base model {:?} of {} is not a local folder: pass --base DIR (only its config.json is read)", adapter.base_model, args.adapter.display());
                    }
                    b
                }
            };
            let ty = match args.outtype {
                OutType::F32 => GgufType::F32,
                OutType::F16 => GgufType::F16,
            };
            write_gguf(&adapter, &base, &args.out, ty)?;
        }
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
