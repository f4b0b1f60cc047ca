//! Packing: several rows per sequence with restarting positions and segment masks gives the same
//! loss as the rows one by one (stories260K on the Flex CPU backend); batching is deterministic.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use temper::data::{batches, prepare, Batch, DataConfig, Example};
use temper::model::{load_model, CausalLm, WeightPrecision};
use temper::ops::loss::{nll_sum, shift_labels, IGNORE_INDEX};

use crate::common::{fixtures, shared, Cpu};
use crate::data_formats::{stories_tok, write};

/// Summed NLL and trained-target count of one batch.
fn batch_loss(model: &CausalLm<Cpu>, b: &Batch) -> (f64, usize) {
    let device = Default::default();
    let (rows, t) = (b.rows(), b.seq_len());
    let ids: Vec<i64> = b.input_ids.iter().flatten().map(|&x| x as i64).collect();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [rows, t]), &device);
    let ctx = model.context(&b.positions, 0, b.segments.clone());
    let logits = model.logits(model.hidden_states(ids, &ctx, None));
    let (targets, count) = shift_labels(&b.labels);
    (nll_sum(logits, &targets).into_scalar() as f64, count)
}

fn examples(tmp: &Path) -> (Vec<Example>, DataConfig) {
    // Completion rows (masked prompts) and text rows of different lengths.
    let mut text = std::fs::read_to_string(fixtures().join("eval.jsonl")).unwrap();
    text.push_str("{\"prompt\": \"Lily saw a bird.\", \"completion\": \" It sang a song.\"}\n");
    let texts: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            match v.get("text") {
                Some(t) => serde_json::json!({"prompt": "", "completion": t}).to_string(),
                None => l.to_string(),
            }
        })
        .collect();
    let f = write(tmp, "rows.jsonl", &texts.join("\n"));
    let mut cfg = DataConfig::new(&f);
    cfg.seq_len = 96;
    let p = prepare(&cfg, &stories_tok(), Path::new("/"), 0).unwrap();
    (p.train, cfg)
}

#[test]
fn packed_loss_equals_unpacked_loss_on_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (ex, mut cfg) = examples(tmp.path());
    let model =
        load_model::<Cpu>(&shared("models/stories260K"), WeightPrecision::F32, &Default::default()).unwrap().model;
    let sum = |bs: &[Batch]| bs.iter().map(|b| batch_loss(&model, b)).fold((0.0, 0), |(a, n), (x, m)| (a + x, n + m));
    cfg.packing = false;
    let (plain, n_plain) = sum(&batches(&ex, 1, &cfg, 0, 7, 0));
    cfg.packing = true;
    let packed_batches = batches(&ex, 2, &cfg, 0, 7, 0);
    assert!(
        packed_batches.iter().any(|b| b.segments.as_ref().unwrap().iter().any(|s| s.iter().max() > Some(&1))),
        "rows were packed"
    );
    assert!(packed_batches.len() < ex.len());
    let (packed, n_packed) = sum(&packed_batches);
    assert_eq!(n_plain, n_packed, "same trained targets");
    let (a, b) = (plain / n_plain as f64, packed / n_packed as f64);
    assert!((a - b).abs() < 1e-5, "unpacked {a} vs packed {b}");
}

#[test]
fn packed_rows_restart_positions_and_ignore_each_first_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (ex, mut cfg) = examples(tmp.path());
    cfg.packing = true;
    for b in batches(&ex, 2, &cfg, 0, 3, 1) {
        let segs = b.segments.as_ref().unwrap();
        assert_eq!(segs.len(), b.rows(), "one segment row per batch row");
        for (r, seg) in segs.iter().enumerate() {
            assert!(b.input_ids[r].len() <= cfg.seq_len);
            for i in 0..b.seq_len() {
                let starts = i == 0 || seg[i] != seg[i - 1];
                if seg[i] == 0 {
                    assert_eq!(b.labels[r][i], IGNORE_INDEX, "padding is never trained");
                } else if starts {
                    assert_eq!((b.positions[r][i], b.labels[r][i]), (0, IGNORE_INDEX), "example start");
                } else {
                    assert_eq!(b.positions[r][i], b.positions[r][i - 1] + 1);
                }
            }
        }
    }
}

#[test]
fn batches_are_deterministic_per_seed_and_epoch_and_group_lengths() {
    let tmp = tempfile::tempdir().unwrap();
    let (ex, mut cfg) = examples(tmp.path());
    assert_eq!(batches(&ex, 2, &cfg, 0, 5, 2), batches(&ex, 2, &cfg, 0, 5, 2));
    assert_ne!(batches(&ex, 2, &cfg, 0, 5, 2), batches(&ex, 2, &cfg, 0, 5, 3));
    let padding = |bs: &[Batch]| bs.iter().map(|b| b.rows() * b.seq_len()).sum::<usize>();
    let grouped = padding(&batches(&ex, 2, &cfg, 0, 5, 0));
    cfg.group_by_length = false;
    let total: usize = ex.iter().map(|e| e.input_ids.len()).sum();
    let worst = (0..8).map(|s| padding(&batches(&ex, 2, &cfg, 0, s, 0))).max().unwrap();
    assert!(grouped >= total && grouped <= worst, "grouped {grouped}, ungrouped worst {worst}, tokens {total}");
    let all: usize = batches(&ex, 2, &cfg, 0, 5, 0).iter().map(|b| b.rows()).sum();
    assert_eq!(all, ex.len(), "every example once per epoch");
}

#[test]
fn packing_statistics_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut cfg) = examples(tmp.path());
    cfg.packing = true;
    let p = prepare(&cfg, &stories_tok(), Path::new("/"), 0).unwrap();
    let eff = p.stats.packing_efficiency.unwrap();
    assert!(eff > 0.3 && eff <= 1.0, "{eff}");
    assert!(p.stats.packed_sequences.unwrap() < p.stats.rows);
}
