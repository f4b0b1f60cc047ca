//! `temper generate`: stream a completion of a prompt to stdout.

use std::io::Write;

use anyhow::Result;
use temper::data::TextTokenizer;
use temper::model::generate::{generate, stop_tokens, SamplingConfig};
use temper::model::WeightPrecision;
use temper::ops::TemperBackend;

use super::device::{dispatch, Task};
use super::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample from the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = args.model.device.clone();
    dispatch(&device, args)
}

impl Task for GenerateArgs {
    type Output = ();

    fn run<B: TemperBackend>(self, device: B::Device, precision: WeightPrecision) -> Result<()> {
        let dir = &self.model.model;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let loaded = self.model.load::<B>(precision, &device)?;
        let prompt = tokenizer.encode(&self.prompt)?;
        let cfg = SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop_tokens: stop_tokens(dir, &loaded.model.config, tokenizer.eos_id())?,
        };
        // Stream: decode the whole text so far and print what is new, so multi-byte characters
        // split across tokens come out whole.
        let mut ids = prompt.clone();
        let mut printed = tokenizer.decode(&ids)?;
        let mut stdout = std::io::stdout();
        write!(stdout, "{printed}")?;
        let mut stream_err = None;
        generate(&loaded.model, &prompt, &cfg, |id| {
            ids.push(id);
            match tokenizer.decode(&ids) {
                Ok(text) if text.starts_with(&printed) && !text.ends_with('\u{FFFD}') => {
                    let _ = write!(stdout, "{}", &text[printed.len()..]);
                    let _ = stdout.flush();
                    printed = text;
                }
                Ok(_) => {}
                Err(e) => stream_err = Some(e),
            }
        })?;
        if let Some(e) = stream_err {
            return Err(e.into());
        }
        writeln!(stdout)?;
        Ok(())
    }
}
