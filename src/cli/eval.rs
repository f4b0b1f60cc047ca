//! `temper eval`: token-weighted mean NLL, token count and perplexity on a JSONL file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use temper::data::jsonl::read_text_rows;
use temper::data::TextTokenizer;
use temper::model::WeightPrecision;
use temper::ops::TemperBackend;
use temper::train::eval::{row_nll, LossAccumulator};

use super::device::{dispatch, Task};
use super::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file of `{"text": ...}` rows.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Print `{"loss", "tokens", "perplexity"}` as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.model.device.clone();
    dispatch(&device, args)
}

impl Task for EvalArgs {
    type Output = ();

    fn run<B: TemperBackend>(self, device: B::Device, precision: WeightPrecision) -> Result<()> {
        let dir = &self.model.model;
        let rows = read_text_rows(&self.data)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let loaded = self.model.load::<B>(precision, &device)?;
        let max_len = loaded.model.config.max_position_embeddings;
        let bar = ProgressBar::new(rows.len() as u64).with_style(
            ProgressStyle::with_template("eval {bar:30} {pos}/{len} rows {elapsed}<{eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut acc = LossAccumulator::default();
        let mut long_rows = 0usize;
        for (line, text) in &rows {
            let ids = tokenizer.encode(text)?;
            loaded
                .model
                .config
                .check_length(ids.len(), "this row")
                .with_context(|| format!("{}:{line}", self.data.display()))?;
            if ids.len() > max_len {
                long_rows += 1;
            }
            let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            let (nll, n) =
                row_nll(&loaded.model, &ids, &labels).with_context(|| format!("{}:{line}", self.data.display()))?;
            acc.add(nll, n);
            bar.inc(1);
        }
        bar.finish_and_clear();
        if long_rows > 0 {
            eprintln!("warning: {long_rows} row(s) are longer than the model's context of {max_len} tokens; positions past it are extrapolated");
        }
        let result = acc.result();
        if self.json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            println!("loss       {:.6}", result.loss);
            println!("tokens     {}", result.tokens);
            println!("perplexity {:.4}", result.perplexity);
        }
        Ok(())
    }
}
