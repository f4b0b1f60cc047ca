//! `temper inspect MODEL`: what a checkpoint is, read from its headers only.

use std::path::PathBuf;

use anyhow::{Context, Result};
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
    let stored_params: usize =
        ckpt.tensor_names().filter_map(|n| ckpt.info(n)).map(|(_, shape)| shape.iter().product::<usize>()).sum();
    let dtype = ckpt.dominant_dtype().map(|d| format!("{d:?}")).unwrap_or_else(|| "unknown".into());
    let tokenizer = TextTokenizer::from_dir(&args.model).ok();
    let chat_template = tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some());
    let hybrid = Hybrid::read(&args.model, &ckpt)?;
    let mut info = json!({
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
    // Keys added for the hybrid models (null / 0 for every other model); the keys above stay.
    info["layer_pattern"] = hybrid.pattern.as_ref().map_or(
        serde_json::Value::Null,
        |p| json!({ "gated_delta_net": p.delta_net, "attention": p.attention, "layer_types": p.layer_types }),
    );
    info["delta_net"] = serde_json::to_value(&hybrid.dims)?;
    info["vision_tower_tensors"] = json!(hybrid.vision_tensors);
    info["mtp_tensors"] = json!(hybrid.mtp_tensors);
    let license = temper::model::license::ModelLicense::read(&args.model);
    info["license"] = serde_json::to_value(&license)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let gqa = if cfg.num_kv_heads == cfg.num_heads {
        String::new()
    } else {
        format!(" (GQA: {} KV heads)", cfg.num_kv_heads)
    };
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
    if let Some(p) = &hybrid.pattern {
        println!(
            "layer types  {} layers: {} gated delta net, {} gated attention",
            p.layer_types.len(),
            p.delta_net,
            p.attention
        );
    }
    if let Some(d) = &hybrid.dims {
        let per_key = d.value_heads / d.key_heads.max(1);
        println!(
            "delta net    {} key heads x {}, {} value heads x {} ({per_key} per key head), conv kernel {}",
            d.key_heads, d.key_head_dim, d.value_heads, d.value_head_dim, d.conv_kernel
        );
    }
    println!("tied head    {}", cfg.tie_word_embeddings);
    println!("license      {}", license.describe());
    if let Some(notice) = cfg.composite_notice() {
        println!("vision       {notice}");
    }
    if hybrid.vision_tensors > 0 {
        println!("vision tower {} tensors (model.visual.*), present and not loaded", hybrid.vision_tensors);
    }
    if hybrid.mtp_tensors > 0 {
        println!("mtp head     {} tensors (mtp.*), present and not loaded", hybrid.mtp_tensors);
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

/// What a hybrid (Gated DeltaNet + attention) checkpoint has beyond the decoder's usual fields,
/// read from config.json (`text_config` of a wrapper) and the tensor names.
struct Hybrid {
    pattern: Option<Pattern>,
    dims: Option<DeltaNetDims>,
    /// `model.visual.*` tensors (the vision tower of a Qwen 3.5 checkpoint), never loaded.
    vision_tensors: usize,
    /// `mtp.*` tensors (the multi-token-prediction head), never loaded.
    mtp_tensors: usize,
}

struct Pattern {
    layer_types: Vec<String>,
    delta_net: usize,
    attention: usize,
}

#[derive(serde::Serialize)]
struct DeltaNetDims {
    key_heads: u64,
    value_heads: u64,
    key_head_dim: u64,
    value_head_dim: u64,
    conv_kernel: u64,
}

impl Hybrid {
    fn read(dir: &std::path::Path, ckpt: &Checkpoint) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let text = raw.get("text_config").filter(|t| t.is_object()).unwrap_or(&raw);
        let n = |k: &str| text.get(k).and_then(|v| v.as_u64());
        let dims = match (
            n("linear_num_key_heads"),
            n("linear_num_value_heads"),
            n("linear_key_head_dim"),
            n("linear_value_head_dim"),
        ) {
            (Some(key_heads), Some(value_heads), Some(key_head_dim), Some(value_head_dim)) => Some(DeltaNetDims {
                key_heads,
                value_heads,
                key_head_dim,
                value_head_dim,
                conv_kernel: n("linear_conv_kernel_dim").unwrap_or(4),
            }),
            _ => None,
        };
        // `layer_types`, or transformers' default: every `full_attention_interval`-th layer full.
        let layers = n("num_hidden_layers").unwrap_or(0) as usize;
        let types: Option<Vec<String>> = match text.get("layer_types").and_then(|v| v.as_array()) {
            Some(a) => Some(a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect()),
            None if dims.is_some() => {
                let every = n("full_attention_interval").unwrap_or(4).max(1) as usize;
                Some(
                    (0..layers)
                        .map(|i| if (i + 1) % every == 0 { "full_attention" } else { "linear_attention" }.to_string())
                        .collect(),
                )
            }
            None => None,
        };
        let pattern = types.filter(|t| t.iter().any(|x| x == "linear_attention")).map(|layer_types| Pattern {
            delta_net: layer_types.iter().filter(|t| *t == "linear_attention").count(),
            attention: layer_types.iter().filter(|t| *t != "linear_attention").count(),
            layer_types,
        });
        let count = |prefix: &str| ckpt.tensor_names().filter(|t| t.starts_with(prefix)).count();
        Ok(Hybrid { pattern, dims, vision_tensors: count("model.visual."), mtp_tensors: count("mtp.") })
    }
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
