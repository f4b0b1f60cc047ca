//! `temper train RECIPE.yaml [--set key=value ...] [--resume]`

use std::path::PathBuf;

use anyhow::{Context, Result};
use temper::data::{prepare, TextTokenizer};
use temper::ops::TemperAutodiff;
use temper::recipe::{LoadedRecipe, Recipe};
use temper::train::{train, RunConfig};

use super::device::{dispatch_train, train_precision, DeviceArg, Resolved, TrainTask};
use super::resolve_model;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The recipe (YAML).
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.max_steps=20` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the last complete checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Override the recipe's device: auto | cpu | cuda[:N] | wgpu
    #[arg(long)]
    pub device: Option<DeviceArg>,
}

struct TrainJob {
    loaded: LoadedRecipe,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut loaded = Recipe::load(&args.recipe, &args.set)?;
    if args.resume {
        loaded.recipe.train.resume = true;
    }
    let device = match args.device {
        Some(d) => d,
        None => loaded
            .recipe
            .device
            .parse::<DeviceArg>()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{}: recipe key `device`", args.recipe.display()))?,
    };
    dispatch_train(&device, TrainJob { loaded })
}

impl TrainTask for TrainJob {
    type Output = ();

    fn run<B: TemperAutodiff>(self, device: B::Device, kind: Resolved) -> Result<()> {
        let r = &self.loaded.recipe;
        let dir = resolve_model(&r.base_model, r.revision.as_deref())?;
        let license = temper::model::license::ModelLicense::read(&dir);
        eprintln!("license: {}", license.describe());
        let tokenizer = TextTokenizer::from_dir(&dir)?;
        let four_bit = r
            .quantization
            .as_ref()
            .map(|q| q.four_bit())
            .transpose()
            .map_err(|(k, e)| anyhow::anyhow!("quantization.{k}: {e}"))?
            .flatten();
        let keep_fp8 = !r.quantization.as_ref().is_some_and(|q| q.dequantize_fp8);
        let precision = train_precision(r.train.precision, kind)?;
        let mut loaded = temper::model::load_model_with::<B>(&dir, precision, four_bit, keep_fp8, &device)
            .with_context(|| format!("loading {}", dir.display()))?;
        let fp8 = temper::lora::projections_mut(&mut loaded.model)
            .iter()
            .filter(|(_, p)| p.quant.as_ref().is_some_and(|q| q.is_fp8()))
            .count();
        if fp8 > 0 {
            eprintln!("{fp8} FP8 projections kept in 8 bits on the device (quantization.dequantize_fp8: true dequantizes them as they load)");
        }
        if let Some(k) = four_bit {
            eprintln!("base quantized to {} as it loads (QLoRA)", k.describe());
        }
        if let Some(notice) = loaded.model.config.composite_notice() {
            eprintln!("{notice}");
        }
        if r.train.output_router_logits && loaded.model.config.moe.is_none() {
            anyhow::bail!(
                "train.output_router_logits: {} ({}) is not a mixture-of-experts model, so it has no router to balance",
                dir.display(),
                loaded.model.config.model_type
            );
        }
        // `prepare` prints the one data summary line.
        let data = prepare(&r.data, &tokenizer, std::path::Path::new("."), r.train.seed)?;
        let pad_id =
            tokenizer.pad_token.as_deref().and_then(|t| tokenizer.token_to_id(t)).or(tokenizer.eos_id()).unwrap_or(0);
        let run = RunConfig {
            base_model: r.base_model.clone(),
            lora: r.lora.clone(),
            data: r.data.clone(),
            train: r.train.clone(),
            output_dir: r.output.dir.clone(),
            recipe_text: Some(self.loaded.effective_yaml.clone()),
            show_progress: true,
            stop_after_steps: None,
            base_license: Some(license),
        };
        eprintln!("training on {kind}: {} -> {}", dir.display(), r.output.dir.display());
        let summary = train(loaded.model, &data, pad_id, &run)?;
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!("steps        {}", summary.steps);
        println!("train loss   {}", fmt(summary.final_train_loss));
        println!("eval loss    {} (before training: {})", fmt(summary.final_eval_loss), fmt(summary.initial_eval_loss));
        println!("tokens/s     {:.0}", summary.tokens_per_s);
        if let Some(a) = &summary.adapter_dir {
            println!("adapter      {}", a.display());
            super::print_servability(a, Some(&dir));
        }
        println!("run folder   {} (metrics.jsonl, loss_curve.svg, summary.json)", r.output.dir.display());
        Ok(())
    }
}
