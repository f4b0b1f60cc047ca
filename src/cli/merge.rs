//! `temper merge`: fold one or more PEFT adapters into the base weights and write a complete
//! Hugging Face model folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use temper::export::{merge_model, verify_merge, Adapter, MergeDtype, MergeInput, MergeOptions, WriteMode};
use temper::model::WeightPrecision;
use temper::ops::TemperBackend;

use super::device::{dispatch, DeviceArg, Task};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    /// Keep each tensor's dtype from the base.
    Auto,
    Bf16,
    F16,
    F32,
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Base model folder (Hugging Face layout, safetensors).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// PEFT adapter folder; repeat to merge a weighted sum of several.
    #[arg(long = "adapter", value_name = "DIR", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (default: 1 for each).
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    pub weights: Vec<f64>,
    /// Output folder (written to a temporary name, then renamed).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// dtype of the written weights.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    /// Allow an adapter on lm_head of a model with tied embeddings: writes a separate lm_head.
    #[arg(long)]
    pub untie: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Afterwards, compare logits of base + adapters and of the merged model on a few tokens
    /// (both streamed a layer at a time). The default for models up to 2 B parameters.
    #[arg(long, conflicts_with = "no_verify")]
    pub verify: bool,
    /// Skip the check that is on by default for models up to 2 B parameters.
    #[arg(long)]
    pub no_verify: bool,
    /// Device for --verify: auto | cpu | cuda[:N] | wgpu
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let weights = match args.weights.len() {
        0 => vec![1.0; args.adapters.len()],
        n if n == args.adapters.len() => args.weights.clone(),
        n => bail!("--weights has {n} values for {} adapter(s): give one per --adapter", args.adapters.len()),
    };
    let mut inputs = Vec::new();
    for (dir, weight) in args.adapters.iter().zip(weights) {
        let adapter = Adapter::read(dir).with_context(|| format!("adapter {} cannot be merged", dir.display()))?;
        inputs.push(MergeInput { adapter, dir: dir.clone(), weight });
    }
    let opts = MergeOptions {
        dtype: match args.dtype {
            DtypeArg::Auto => MergeDtype::Auto,
            DtypeArg::Bf16 => MergeDtype::Bf16,
            DtypeArg::F16 => MergeDtype::F16,
            DtypeArg::F32 => MergeDtype::F32,
        },
        untie: args.untie,
    };
    let mode = if args.force { WriteMode::Replace } else { WriteMode::Refuse };
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("merge {spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let start = Instant::now();
    let summary =
        merge_model(&args.model, &inputs, opts, &args.out, mode, &mut |shard| bar.set_message(shard.to_string()))
            .with_context(|| format!("merging into {}", args.out.display()))?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "merged {} adapter(s) into {} of {} tensors ({} shard(s), {} bytes) in {secs:.1}s -> {}",
        inputs.len(),
        summary.merged,
        summary.tensors,
        summary.shards,
        summary.bytes,
        args.out.display()
    );
    // The dtype the merged weights were written in.
    let written = temper::model::Checkpoint::open(&args.out).ok().and_then(|c| c.dominant_dtype());
    if summary.dequantized > 0 {
        let fp8 = std::fs::read_to_string(args.model.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["quantization_config"]["quant_method"] == "fp8");
        let (what, again) = if fp8 { ("FP8", "in FP8") } else { ("bitsandbytes 4-bit", "in 4 bits") };
        eprintln!(
            "the base is {what}: {} weights were dequantized, merged in f32 and written as {} (quantize the merged model again to serve it {again})",
            summary.dequantized,
            written.map_or("?".to_string(), |d| format!("{d:?}"))
        );
    }
    let verify = if args.verify || (!args.no_verify && small_enough(&args.model)) {
        let task = VerifyTask { model: args.model.clone(), out: args.out.clone(), inputs };
        let report = dispatch(&args.device, task)?;
        eprintln!(
            "verify: {} tokens, max |logit difference| merged vs base+adapter = {:e} (max |logit| {:.3}){}",
            report.tokens,
            report.max_abs_logit_diff,
            report.max_abs_logit,
            if matches!(written, Some(safetensors::Dtype::BF16 | safetensors::Dtype::F16)) {
                "; the merged weights are rounded to 16 bits: merge with --dtype f32 to tell rounding from a wrong merge"
            } else {
                ""
            }
        );
        Some(report)
    } else {
        None
    };
    if args.json {
        println!("{}", serde_json::json!({ "summary": summary, "seconds": secs, "verify": verify }));
    }
    Ok(())
}

/// Models up to this many parameters are verified after merging unless `--no-verify`: the
/// check streams both models once more (measured in docs/MERGE.md).
const VERIFY_DEFAULT_MAX_PARAMETERS: usize = 2_000_000_000;

fn small_enough(model: &std::path::Path) -> bool {
    temper::model::DecoderConfig::from_model_dir(model)
        .is_ok_and(|(_, cfg)| cfg.num_parameters() <= VERIFY_DEFAULT_MAX_PARAMETERS)
}

struct VerifyTask {
    model: PathBuf,
    out: PathBuf,
    inputs: Vec<MergeInput>,
}

impl Task for VerifyTask {
    type Output = temper::export::VerifyReport;

    fn run<B: TemperBackend>(self, device: B::Device, _precision: WeightPrecision) -> Result<Self::Output> {
        // A few ordinary token ids (BOS 1, then a spread of ids; reduced modulo the vocabulary).
        let tokens = [1, 15, 307, 42, 1000, 2718, 99, 5];
        verify_merge::<B>(&self.model, &self.inputs, &self.out, &tokens, &device).context("--verify")
    }
}
