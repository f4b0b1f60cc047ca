//! Load a Hugging Face model folder and generate greedily, through the library API only.
//!
//!     cargo run --example generate -- ../shared/models/stories260K "Once upon a time"

use std::path::PathBuf;

use temper::data::TextTokenizer;
use temper::model::generate::{generate, stop_tokens, SamplingConfig};
use temper::model::{load_model, WeightPrecision};

type Backend = burn::backend::Flex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: generate MODEL_DIR [PROMPT]")?);
    let prompt = args.next().unwrap_or_else(|| "Once upon a time".into());
    let device = Default::default();
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    let model = load_model::<Backend>(&dir, WeightPrecision::F32, &device)?.model;
    let ids = tokenizer.encode(&prompt)?;
    let cfg = SamplingConfig {
        max_new_tokens: 48,
        stop_tokens: stop_tokens(&dir, &model.config, tokenizer.eos_id())?,
        ..SamplingConfig::default()
    };
    let new = generate(&model, &ids, &cfg, |_| {})?;
    println!("{}", tokenizer.decode(&[ids, new].concat())?);
    Ok(())
}
