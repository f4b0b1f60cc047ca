//! Examples -> micro-batches: packed (several examples per row, attention kept inside each) or
//! padded, grouped by length so little is spent on padding. Deterministic for `(seed, epoch)`.

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use crate::data::config::DataConfig;
use crate::data::example::{Batch, Example};
use crate::ops::loss::IGNORE_INDEX;

/// Without packing, rows are sorted by length inside windows of this many micro-batches.
const LENGTH_GROUP_BATCHES: usize = 64;

/// Micro-batches of one epoch, in an order fixed by `(seed, epoch)`.
pub fn batches(
    examples: &[Example],
    micro_batch_size: usize,
    cfg: &DataConfig,
    pad_id: u32,
    seed: u64,
    epoch: usize,
) -> Vec<Batch> {
    let mbs = micro_batch_size.max(1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(epoch as u64 * 0x9E37_79B9));
    order.shuffle(&mut rng);
    if cfg.packing {
        let packs = pack(examples, &order, cfg.seq_len);
        return packs.chunks(mbs).map(|rows| Batch::packed(examples, rows, pad_id)).collect();
    }
    if cfg.group_by_length {
        for window in order.chunks_mut(mbs * LENGTH_GROUP_BATCHES) {
            window.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
        }
    }
    let mut out: Vec<Batch> = order
        .chunks(mbs)
        .map(|idx| {
            let rows: Vec<Example> = idx.iter().map(|&i| examples[i].clone()).collect();
            Batch::padded(&rows, pad_id)
        })
        .collect();
    if cfg.group_by_length {
        out.shuffle(&mut rng);
    }
    out
}

/// Greedy packing in `order`: each row holds examples until the next would exceed `seq_len`.
pub fn pack(examples: &[Example], order: &[usize], seq_len: usize) -> Vec<Vec<usize>> {
    let mut packs: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut len = 0;
    for &i in order {
        let n = examples[i].input_ids.len();
        if !cur.is_empty() && len + n > seq_len {
            packs.push(std::mem::take(&mut cur));
            len = 0;
        }
        cur.push(i);
        len += n;
    }
    if !cur.is_empty() {
        packs.push(cur);
    }
    packs
}

/// How many rows of `seq_len` the examples pack into (in their stored order).
pub fn pack_count(examples: &[Example], seq_len: usize) -> usize {
    let order: Vec<usize> = (0..examples.len()).collect();
    pack(examples, &order, seq_len).len()
}

impl Batch {
    /// Rows of packed examples (`packs[r]` indexes `examples`), right-padded to the longest row.
    /// Positions restart at 0 for each example; segment ids are 1, 2, ... per example (0 for
    /// padding); the first token of each example has label -100 so the previous example's last
    /// token is never trained to predict it.
    pub fn packed(examples: &[Example], packs: &[Vec<usize>], pad_id: u32) -> Self {
        let t = packs.iter().map(|p| p.iter().map(|&i| examples[i].input_ids.len()).sum::<usize>()).max().unwrap_or(0);
        let mut b =
            Batch { input_ids: Vec::new(), labels: Vec::new(), positions: Vec::new(), segments: Some(Vec::new()) };
        let mut segments = Vec::with_capacity(packs.len());
        for p in packs {
            let (mut ids, mut labels, mut pos, mut seg) =
                (Vec::with_capacity(t), Vec::with_capacity(t), Vec::with_capacity(t), Vec::with_capacity(t));
            for (s, &i) in p.iter().enumerate() {
                let e = &examples[i];
                ids.extend_from_slice(&e.input_ids);
                labels.extend(e.labels.iter().enumerate().map(|(k, &l)| if k == 0 { IGNORE_INDEX } else { l }));
                pos.extend(0..e.input_ids.len());
                seg.extend(std::iter::repeat_n(s as u32 + 1, e.input_ids.len()));
            }
            let real = ids.len();
            ids.resize(t, pad_id);
            labels.resize(t, IGNORE_INDEX);
            pos.extend(0..t - real);
            seg.resize(t, 0);
            b.input_ids.push(ids);
            b.labels.push(labels);
            b.positions.push(pos);
            segments.push(seg);
        }
        b.segments = Some(segments);
        b
    }
}
