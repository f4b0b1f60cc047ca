//! Files -> tokenised examples -> batches: the one code path training, evaluation and preview use.

use std::path::Path;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::Serialize;

use crate::data::config::DataConfig;
use crate::data::example::{Batch, Example};
use crate::data::jsonl::read_text_rows;
use crate::data::TextTokenizer;
use crate::{Error, Result};

/// Counts reported before training and written to the run summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DataStats {
    pub rows: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub truncated_rows: usize,
}

/// Tokenised training (and evaluation) examples.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub eval: Option<Vec<Example>>,
    pub stats: DataStats,
}

/// Read, tokenise and split the data a recipe names. Relative paths resolve against `base_dir`.
pub fn prepare(cfg: &DataConfig, tokenizer: &TextTokenizer, base_dir: &Path, seed: u64) -> Result<Prepared> {
    let mut stats = DataStats::default();
    let mut train = load_file(&base_dir.join(&cfg.train), cfg, tokenizer, &mut stats)?;
    let eval = match (&cfg.eval, cfg.val_split) {
        (Some(path), _) => Some(load_file(&base_dir.join(path), cfg, tokenizer, &mut DataStats::default())?),
        (None, Some(split)) if split > 0.0 => {
            if !(split < 1.0) {
                return Err(Error::InvalidArgument(format!("data.val_split must be in [0, 1), got {split}")));
            }
            let mut rng = StdRng::seed_from_u64(seed);
            train.shuffle(&mut rng);
            let n_eval = ((train.len() as f64 * split).round() as usize).clamp(1, train.len().saturating_sub(1).max(1));
            Some(train.split_off(train.len() - n_eval))
        }
        _ => None,
    };
    if train.is_empty() {
        return Err(Error::Data {
            path: base_dir.join(&cfg.train),
            line: 0,
            reason: "no training rows".into(),
        });
    }
    Ok(Prepared { train, eval, stats })
}

fn load_file(path: &Path, cfg: &DataConfig, tokenizer: &TextTokenizer, stats: &mut DataStats) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (_line, text) in read_text_rows(path)? {
        let mut ids = tokenizer.encode(&text)?;
        if let Some(eos) = tokenizer.eos_id() {
            ids.push(eos);
        }
        if ids.len() > cfg.seq_len {
            ids.truncate(cfg.seq_len);
            stats.truncated_rows += 1;
        }
        let ex = Example::all_trained(ids);
        stats.rows += 1;
        stats.tokens += ex.input_ids.len();
        stats.trained_tokens += ex.trained_tokens();
        out.push(ex);
    }
    Ok(out)
}

/// Micro-batches of one epoch, in an order fixed by `(seed, epoch)`.
pub fn batches(examples: &[Example], micro_batch_size: usize, _cfg: &DataConfig, pad_id: u32, seed: u64, epoch: usize) -> Vec<Batch> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(epoch as u64 * 0x9E37_79B9));
    order.shuffle(&mut rng);
    order
        .chunks(micro_batch_size.max(1))
        .map(|idx| {
            let rows: Vec<Example> = idx.iter().map(|&i| examples[i].clone()).collect();
            Batch::padded(&rows, pad_id)
        })
        .collect()
}
