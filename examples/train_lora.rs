//! Train a LoRA adapter from Rust code, no YAML: stories260K on the project's story dataset,
//! then export the adapter in the PEFT format.
//!
//!     cargo run --release --example train_lora -- ../shared/models/stories260K runs/example

use std::path::{Path, PathBuf};

use temper::data::{prepare, DataConfig, TextTokenizer};
use temper::lora::{LoraConfig, TargetModules};
use temper::model::{load_model, WeightPrecision};
use temper::train::{train, RunConfig, TrainConfig};

type Backend = burn::backend::Autodiff<burn::backend::Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(args.next().ok_or("usage: train_lora MODEL_DIR OUTPUT_DIR")?);
    let output_dir = PathBuf::from(args.next().unwrap_or_else(|| "runs/example".into()));
    let device = Default::default();
    let tokenizer = TextTokenizer::from_dir(&model_dir)?;
    let model = load_model::<Backend>(&model_dir, WeightPrecision::F32, &device)?.model;

    let data = DataConfig {
        train: "datasets/stories/train.jsonl".into(),
        eval: Some("datasets/stories/eval.jsonl".into()),
        seq_len: 128,
        ..DataConfig::new("datasets/stories/train.jsonl")
    };
    let prepared = prepare(&data, &tokenizer, Path::new("."), 42)?;
    let run = RunConfig {
        base_license: Some(temper::model::license::ModelLicense::read(&model_dir)),
        base_model: model_dir.display().to_string(),
        lora: LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
            ..LoraConfig::default()
        },
        data,
        train: TrainConfig {
            max_steps: Some(20),
            micro_batch_size: 4,
            learning_rate: 1e-3,
            warmup_steps: Some(2),
            ..TrainConfig::default()
        },
        output_dir,
        recipe_text: None,
        show_progress: true,
        stop_after_steps: None,
    };
    let pad = tokenizer.eos_id().unwrap_or(0);
    let summary = train(model, &prepared, pad, &run)?;
    println!(
        "eval loss {:?} -> {:?}; adapter in {:?}",
        summary.initial_eval_loss, summary.final_eval_loss, summary.adapter_dir
    );
    Ok(())
}
