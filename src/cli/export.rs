//! `temper export`: re-write an adapter as a clean PEFT folder, as a llama.cpp LoRA GGUF, or as
//! an Ollama folder (the GGUF plus a Modelfile); then say which servers will take it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use temper::export::gguf::{write_gguf, GgufType};
use temper::export::ollama::{write_ollama, OllamaOptions};
use temper::export::{Adapter, WriteMode};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// adapter_config.json + adapter_model.safetensors with the conservative PEFT key set.
    Peft,
    /// PEFT, with mixture-of-experts deltas in the 2-D per-expert form (`experts.{e}.gate_proj`,
    /// Mixtral `block_sparse_moe.experts.{e}.w1`) that vLLM and llama.cpp's converter read for
    /// Mixtral, Qwen-MoE and OLMoE models, instead of PEFT's 3-D `target_parameters` form.
    PeftPerExpert,
    /// One llama.cpp LoRA adapter file (`llama-cli --lora FILE`).
    Gguf,
    /// A folder with adapter.gguf and a Modelfile (`ollama create NAME -f Modelfile`).
    Ollama,
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
    /// Output folder (peft, ollama) or file (gguf).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// gguf: the base model folder (its config.json names the architecture). ollama: the
    /// Modelfile's FROM, an Ollama model name or a base GGUF file. Default (gguf): the
    /// adapter's base_model_name_or_path when that is a local folder.
    #[arg(long, value_name = "DIR|GGUF|NAME")]
    pub base: Option<String>,
    /// ollama: the base model folder in the Hugging Face layout (config.json, tokenizer_config.json
    /// with the chat template); default: the adapter's base_model_name_or_path when local.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// GGUF tensor type.
    #[arg(long, value_enum, default_value = "f32")]
    pub outtype: OutType,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let adapter =
        Adapter::read(&args.adapter).with_context(|| format!("reading adapter {}", args.adapter.display()))?;
    if args.out.exists() && !args.force {
        bail!("{} already exists (use --force to replace it)", args.out.display());
    }
    let ty = match args.outtype {
        OutType::F32 => GgufType::F32,
        OutType::F16 => GgufType::F16,
    };
    // The adapter's own base folder, when it names a local one.
    let recorded = || {
        let b = PathBuf::from(&adapter.base_model);
        (!adapter.base_model.is_empty() && b.join("config.json").is_file()).then_some(b)
    };
    let base_dir = match args.format {
        Format::Peft => {
            adapter.write(&args.out, WriteMode::Replace, &[])?;
            args.base.as_ref().map(PathBuf::from).or_else(recorded)
        }
        Format::PeftPerExpert => {
            let base = args.base.as_ref().map(PathBuf::from).or_else(recorded);
            let Some(dir) = base.as_ref() else {
                bail!("--format peft-per-expert needs the base model folder (--base DIR): Mixtral names its experts differently from the other families");
            };
            let (_, cfg) = temper::model::DecoderConfig::from_model_dir(dir)
                .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
            if cfg.moe.is_none() {
                bail!("{} is not a mixture-of-experts model ({}): use --format peft", dir.display(), cfg.model_type);
            }
            // The 2-D per-expert form is the Hub layout of the families that store experts one
            // by one; gpt-oss and Llama 4 store them fused, and no reader takes them per expert.
            if matches!(cfg.model_type.as_str(), "gpt_oss" | "llama4_text") {
                bail!(
                    "{} stores its experts fused ({}), and no server reads their LoRA per expert: use --format peft (PEFT's 3-D target_parameters form)",
                    dir.display(),
                    cfg.model_type
                );
            }
            let mut per = adapter.clone();
            per.expert_format =
                temper::export::experts::ExpertFormat::PerExpert { mixtral: cfg.model_type == "mixtral" };
            per.write(&args.out, WriteMode::Replace, &[])?;
            base
        }
        Format::Gguf => {
            let Some(base) = args.base.as_ref().map(PathBuf::from).or_else(recorded) else {
                bail!(
                    "base model {:?} of {} is not a local folder: pass --base DIR (only its config.json is read)",
                    adapter.base_model,
                    args.adapter.display()
                );
            };
            write_gguf(&adapter, &base, &args.out, ty)?;
            Some(base)
        }
        Format::Ollama => {
            let Some(from) = &args.base else {
                bail!("--format ollama needs --base: the Modelfile's FROM (an Ollama model name, or a base GGUF file)");
            };
            let Some(model) = args.model.clone().or_else(recorded) else {
                bail!("base model {:?} of {} is not a local folder: pass --model DIR (its config.json and chat template are read)", adapter.base_model, args.adapter.display());
            };
            // A GGUF file is named by its absolute path: Ollama resolves relative paths against the Modelfile.
            let from = match std::path::Path::new(from).canonicalize() {
                Ok(p) if p.is_file() => p.display().to_string(),
                _ => from.clone(),
            };
            let tokenizer = temper::data::TextTokenizer::from_dir(&model).ok();
            let opts = OllamaOptions {
                from: &from,
                chat_template: tokenizer.as_ref().and_then(|t| t.chat_template.as_deref()),
                eos_token: tokenizer.as_ref().and_then(|t| t.eos_token.as_deref()),
                gguf_type: ty,
            };
            let mode = if args.force { WriteMode::Replace } else { WriteMode::Refuse };
            match write_ollama(&adapter, &model, &opts, &args.out, mode)? {
                Some(f) => eprintln!("Modelfile: TEMPLATE translated from the {f:?} chat format"),
                None => eprintln!("Modelfile: no TEMPLATE (the base's chat format is not one Temper translates; Ollama keeps the base model's)"),
            }
            Some(model)
        }
    };
    eprintln!("wrote {}", args.out.display());
    let checked = if matches!(args.format, Format::Peft | Format::PeftPerExpert) {
        args.out.clone()
    } else {
        args.adapter.clone()
    };
    super::print_servability(&checked, base_dir.as_deref());
    Ok(())
}
