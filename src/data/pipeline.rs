//! Files -> tokenised examples: the one code path training, evaluation and preview use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::Serialize;

use crate::data::config::{DataConfig, DataFormat, TemplateSource};
use crate::data::encode::Encoder;
use crate::data::example::Example;
use crate::data::record::{detect, parse};
use crate::data::source::{list_files, read_rows, RawRow, RowError, SkipReason};
use crate::data::template::ChatTemplate;
use crate::data::TextTokenizer;
use crate::{Error, Result};

/// Counts reported before training and written to the run summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DataStats {
    /// Training rows kept.
    pub rows: usize,
    /// Tokens of those rows (after truncation).
    pub tokens: usize,
    /// Trained next-token targets.
    pub trained_tokens: usize,
    /// Rows cut to `seq_len`.
    pub truncated_rows: usize,
    /// The format used (`auto` resolved to what was detected).
    pub format: String,
    /// Files read for training, in order.
    pub files: Vec<String>,
    /// Rows skipped (with `skip_invalid_rows`), by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Evaluation rows (held out by `val_split` or read from `eval`).
    pub eval_rows: usize,
    /// The length rows are truncated to (`data.seq_len`).
    pub seq_len: usize,
    /// With packing: sequences of `seq_len` the training rows fill.
    pub packed_sequences: Option<usize>,
    /// With packing: tokens / (packed_sequences × seq_len).
    pub packing_efficiency: Option<f64>,
}

impl DataStats {
    /// Share of tokens that are trained.
    pub fn trained_share(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.trained_tokens as f64 / self.tokens as f64
        }
    }

    /// A few human-readable lines for stderr.
    pub fn report(&self) -> String {
        let mut s = format!(
            "data: {} rows ({} format), {} tokens, {} trained ({:.1}%), {} truncated to {} tokens, {} eval rows",
            self.rows,
            self.format,
            self.tokens,
            self.trained_tokens,
            100.0 * self.trained_share(),
            self.truncated_rows,
            self.seq_len,
            self.eval_rows
        );
        if let (Some(n), Some(eff)) = (self.packed_sequences, self.packing_efficiency) {
            s.push_str(&format!("\ndata: packed into {n} sequences, {:.1}% of tokens are not padding", 100.0 * eff));
        }
        for (reason, n) in &self.skipped {
            s.push_str(&format!("\ndata: skipped {n} rows: {reason}"));
        }
        s
    }
}

/// Tokenised training (and evaluation) examples.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub eval: Option<Vec<Example>>,
    pub stats: DataStats,
}

/// Read, tokenise and split the data a recipe names. Relative paths resolve against `base_dir`.
/// Prints the detected format and the dataset statistics to stderr.
pub fn prepare(cfg: &DataConfig, tokenizer: &TextTokenizer, base_dir: &Path, seed: u64) -> Result<Prepared> {
    let mut stats = DataStats { seq_len: cfg.seq_len, ..DataStats::default() };
    let mut train_files = Vec::new();
    for spec in std::iter::once(&cfg.train).chain(&cfg.train_files) {
        train_files.extend(resolve(spec, cfg, base_dir)?);
    }
    let mut rows = Vec::new();
    for f in &train_files {
        rows.extend(read_rows(f, cfg.max_rows)?);
    }
    stats.files = train_files.iter().map(|p| p.display().to_string()).collect();
    let first = train_files.first().cloned().unwrap_or_else(|| base_dir.join(&cfg.train));
    let format = match cfg.format {
        DataFormat::Auto => {
            let (format, why) = detect(&rows, cfg).ok_or_else(|| Error::Data {
                path: first.clone(),
                line: rows.first().map_or(0, |r| r.line),
                reason: "cannot detect the format: no row has `messages`, `conversations`, `instruction`+`output`, \
                         `prompt`+`completion` or `text` (map other names with data.columns, or set data.format)"
                    .into(),
            })?;
            eprintln!("data: detected format `{}` (from {why})", format.name());
            format
        }
        f => f,
    };
    stats.format = format.name().into();
    let template = chat_template(cfg, tokenizer, base_dir)?;
    let encoder = Encoder::new(tokenizer, template, cfg);
    let mut train = encode_rows(&rows, format, &encoder, cfg, &mut stats)?;
    let eval = match (&cfg.eval, cfg.val_split) {
        (Some(spec), _) => {
            let mut eval_rows = Vec::new();
            for f in resolve(spec, cfg, base_dir)? {
                eval_rows.extend(read_rows(&f, cfg.max_rows)?);
            }
            let mut eval_stats = DataStats::default();
            let ev = encode_rows(&eval_rows, format, &encoder, cfg, &mut eval_stats)?;
            for (k, n) in eval_stats.skipped {
                *stats.skipped.entry(format!("eval.{k}")).or_default() += n;
            }
            Some(ev)
        }
        (None, Some(split)) if split > 0.0 => {
            if split.is_nan() || split >= 1.0 {
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
        return Err(Error::Data { path: first, line: 0, reason: "no training rows".into() });
    }
    stats.eval_rows = eval.as_ref().map_or(0, Vec::len);
    if cfg.packing {
        let n = crate::data::batching::pack_count(&train, cfg.seq_len);
        stats.packed_sequences = Some(n);
        let total: usize = train.iter().map(|e| e.input_ids.len()).sum();
        stats.packing_efficiency = Some(total as f64 / (n.max(1) * cfg.seq_len) as f64);
    }
    eprintln!("{}", stats.report());
    Ok(Prepared { train, eval, stats })
}

/// A `train`/`eval` entry -> local files (`hub:` specs are downloaded or read from the cache).
fn resolve(spec: &Path, cfg: &DataConfig, base_dir: &Path) -> Result<Vec<PathBuf>> {
    match spec.to_str().and_then(|s| s.strip_prefix("hub:")) {
        Some(hub) => crate::hub::resolve_dataset_files(hub, cfg.split.as_deref(), cfg.revision.as_deref()),
        None => list_files(&base_dir.join(spec)),
    }
}

/// The recipe's template (inline or a file), else the tokenizer's, else the plain one.
pub fn chat_template(cfg: &DataConfig, tokenizer: &TextTokenizer, base_dir: &Path) -> Result<ChatTemplate> {
    let (source, origin) = match &cfg.chat_template {
        Some(TemplateSource::Inline(s)) => (Some(s.clone()), PathBuf::from("data.chat_template")),
        Some(TemplateSource::File { file }) => {
            let path = base_dir.join(file);
            (Some(std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?), path)
        }
        None => (tokenizer.chat_template.clone(), PathBuf::from("tokenizer_config.json")),
    };
    ChatTemplate::new(source.as_deref(), tokenizer).map_err(|reason| Error::InvalidConfig {
        path: origin,
        key: "chat_template".into(),
        reason,
    })
}

/// Parse, encode and truncate rows; stop at the first bad row unless `skip_invalid_rows`.
fn encode_rows(
    rows: &[RawRow],
    format: DataFormat,
    encoder: &Encoder,
    cfg: &DataConfig,
    stats: &mut DataStats,
) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let result = row.value.clone().and_then(|obj| {
            let rec = parse(&obj, format, cfg)?;
            let mut ex = encoder.encode(&rec)?;
            let truncated = ex.input_ids.len() > cfg.seq_len;
            ex.input_ids.truncate(cfg.seq_len);
            ex.labels.truncate(cfg.seq_len);
            if ex.trained_tokens() == 0 {
                let why =
                    if truncated { format!(" after truncation to seq_len {}", cfg.seq_len) } else { String::new() };
                return Err(RowError::new(SkipReason::NoTrainedTokens, format!("no trained token{why}")));
            }
            Ok((ex, truncated))
        });
        match result {
            Ok((ex, truncated)) => {
                stats.rows += 1;
                stats.truncated_rows += usize::from(truncated);
                stats.tokens += ex.input_ids.len();
                stats.trained_tokens += ex.trained_tokens();
                out.push(ex);
            }
            Err(e) if cfg.skip_invalid_rows => *stats.skipped.entry(e.reason.name().to_string()).or_default() += 1,
            Err(e) => return Err(e.at(&row.file, row.line)),
        }
    }
    Ok(out)
}
