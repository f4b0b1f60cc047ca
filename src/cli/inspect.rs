//! `temper inspect MODEL`: what a checkpoint is, read from its headers only.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;
use temper::data::TextTokenizer;
use temper::model::{Checkpoint, DecoderConfig};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Model folder in the Hugging Face layout.
    pub model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let (hf, cfg) = DecoderConfig::from_model_dir(&args.model)?;
    let ckpt = Checkpoint::open(&args.model)?;
    let stored_params: usize = ckpt
        .tensor_names()
        .filter_map(|n| ckpt.info(n))
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    let dtype = ckpt.dominant_dtype().map(|d| format!("{d:?}")).unwrap_or_else(|| "unknown".into());
    let tokenizer = TextTokenizer::from_dir(&args.model).ok();
    let chat_template = tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some());
    let info = json!({
        "model_type": cfg.model_type,
        "architecture": hf.architectures.as_ref().and_then(|a| a.first()).cloned(),
        "parameters": stored_params,
        "dtype": dtype,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": format!("{:?}", cfg.rope.scaling),
        "sliding_window": cfg.layer_windows.iter().flatten().next(),
        "sliding_layers": cfg.layer_windows.iter().filter(|w| w.is_some()).count(),
        "local_rope_theta": cfg.local_rope.as_ref().map(|r| r.theta),
        "vision_language": cfg.composite,
        "quantization": quantization(&hf),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "tokenizer": tokenizer.is_some(),
        "chat_template": chat_template,
        "files": ckpt.files().iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let gqa = if cfg.num_kv_heads == cfg.num_heads { String::new() } else { format!(" (GQA: {} KV heads)", cfg.num_kv_heads) };
    println!("model        {}", args.model.display());
    println!("architecture {} ({})", cfg.model_type, info["architecture"].as_str().unwrap_or("-"));
    println!("parameters   {} ({})", stored_params, human(stored_params));
    println!("dtype        {dtype}");
    println!("layers       {}", cfg.num_layers);
    println!("hidden       {} (MLP {})", cfg.hidden_size, cfg.intermediate_size);
    println!("heads        {} x {}{gqa}", cfg.num_heads, cfg.head_dim);
    println!("vocab        {}", cfg.vocab_size);
    println!("context      {} (rope_theta {}, {:?})", cfg.max_position_embeddings, cfg.rope.theta, cfg.rope.scaling);
    if let Some(w) = cfg.layer_windows.iter().flatten().next() {
        let local = cfg.local_rope.as_ref().map_or(String::new(), |r| format!(", own RoPE theta {}", r.theta));
        println!("sliding      {} of {} layers, window {w}{local}", info["sliding_layers"], cfg.num_layers);
    }
    println!("tied head    {}", cfg.tie_word_embeddings);
    if let Some(notice) = cfg.composite_notice() {
        println!("vision       {notice}");
    }
    if let Some(q) = info["quantization"].as_str() {
        println!("quantized    {q}");
    }
    println!(
        "tokenizer    {}",
        match (&tokenizer, chat_template) {
            (None, _) => "none (no tokenizer.json)",
            (Some(_), true) => "yes, with chat template",
            (Some(_), false) => "yes, no chat template",
        }
    );
    Ok(())
}

/// A bitsandbytes 4-bit checkpoint's scheme, e.g. "bitsandbytes 4-bit nf4, double quantization, compute dtype bfloat16".
fn quantization(hf: &temper::model::HfConfig) -> Option<String> {
    let q = hf.quantization_config.as_ref()?;
    let s = |k: &str| q.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let method = s("quant_method").unwrap_or_else(|| "?".into());
    let mut out = format!("{method} 4-bit {}", s("bnb_4bit_quant_type").unwrap_or_else(|| "fp4".into()));
    if q.get("bnb_4bit_use_double_quant").and_then(|v| v.as_bool()) == Some(true) {
        out.push_str(", double quantization");
    }
    if let Some(d) = s("bnb_4bit_compute_dtype") {
        out.push_str(&format!(", compute dtype {d}"));
    }
    Some(out)
}

fn human(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.1}K", n / 1e3)
    }
}
