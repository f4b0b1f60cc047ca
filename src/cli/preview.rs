//! `temper preview`: the first rows of a dataset as the model sees them, trained tokens marked.
//! It runs `temper::data::prepare`, the code path training uses.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use temper::data::recipe::load_data_config;
use temper::data::{prepare, DataConfig, DataFormat, Example, TextTokenizer};
use temper::ops::loss::IGNORE_INDEX;

#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    /// Model folder or Hub id (`owner/name`); only its tokenizer is read.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// Hub revision (branch, tag or commit) of `--model`.
    #[arg(long)]
    pub revision: Option<String>,
    /// Data file, folder or `hub:owner/name/file` (overrides the recipe's `data.train`).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// auto | text | completion | alpaca | chat (overrides the recipe's).
    #[arg(long)]
    pub format: Option<DataFormat>,
    /// YAML recipe whose `data:` section is used (columns, template, masking options...).
    #[arg(long, value_name = "R")]
    pub recipe: Option<PathBuf>,
    /// Rows to show.
    #[arg(short = 'n', long = "rows", default_value_t = 3)]
    pub n: usize,
    /// One `{"input_ids": [...], "labels": [...]}` object per row on stdout.
    #[arg(long)]
    pub jsonl: bool,
}

pub fn run(args: PreviewArgs) -> Result<()> {
    let (mut cfg, base) = match &args.recipe {
        Some(r) => {
            let cfg = load_data_config(r)?;
            (cfg, r.parent().map(PathBuf::from).unwrap_or_default())
        }
        None => {
            let data = args.data.clone().context("give --data FILE or --recipe R")?;
            (DataConfig::new(data), PathBuf::from("."))
        }
    };
    if let (Some(data), Some(_)) = (&args.data, &args.recipe) {
        // A --data given with a recipe is relative to the current folder, not the recipe's.
        cfg.train = std::path::absolute(data).unwrap_or_else(|_| data.clone());
        cfg.train_files.clear();
    }
    if let Some(f) = args.format {
        cfg.format = f;
    }
    cfg.max_rows = Some(args.n.max(1));
    cfg.eval = None;
    cfg.val_split = None;
    let model = temper::hub::resolve_model(&args.model, args.revision.as_deref())?;
    let tok = TextTokenizer::from_dir(&model)?;
    let prepared = prepare(&cfg, &tok, &base, 0)?;
    let color = std::io::stdout().is_terminal();
    if prepared.stats.format == "chat" && !args.jsonl && !cfg.train_on_inputs {
        let yes_no = |b: bool| if b { "trained" } else { "not trained" };
        println!(
            "chat: assistant turns as the template renders them; reasoning {}, tool-call turns {}, empty think blocks {}, end of turn {}",
            yes_no(cfg.train_on_reasoning),
            yes_no(cfg.train_on_tool_calls),
            yes_no(cfg.train_on_empty_think),
            yes_no(cfg.train_on_eos)
        );
    }
    for (i, ex) in prepared.train.iter().take(args.n).enumerate() {
        if args.jsonl {
            println!("{}", json!({"input_ids": ex.input_ids, "labels": ex.labels}));
        } else {
            print_row(i + 1, ex, &tok, color)?;
        }
    }
    Ok(())
}

fn print_row(n: usize, ex: &Example, tok: &TextTokenizer, color: bool) -> Result<()> {
    let trained = ex.trained_tokens();
    let total = ex.input_ids.len();
    let share = if total == 0 { 0.0 } else { 100.0 * trained as f64 / total as f64 };
    println!("── row {n}: {total} tokens, {trained} trained ({share:.1}%)");
    let mut out = String::new();
    let mut start = 0;
    while start < total {
        let on = ex.labels[start] != IGNORE_INDEX;
        let end = (start..total).find(|&k| (ex.labels[k] != IGNORE_INDEX) != on).unwrap_or(total);
        let text = tok.decode_with_special(&ex.input_ids[start..end])?;
        match (on, color) {
            (false, _) => out.push_str(&text),
            (true, true) => out.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
            (true, false) => out.push_str(&format!("⟦{text}⟧")),
        }
        start = end;
    }
    println!("{out}\n");
    Ok(())
}
