//! What training consumes: tokenised examples with labels, and batches of them.

use crate::ops::loss::IGNORE_INDEX;

/// One tokenised training example: `labels[i]` is `input_ids[i]` where that token is trained,
/// `IGNORE_INDEX` (-100) where it is not (prompt, template, padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Every token trained (the `text` format).
    pub fn all_trained(input_ids: Vec<u32>) -> Self {
        let labels = input_ids.iter().map(|&x| x as i64).collect();
        Self { input_ids, labels }
    }

    /// Tokens whose label is not ignored, excluding the first (nothing predicts it).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// One micro-batch, rectangular `[rows, seq]`. Padding positions have label -100.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// Position id of each token (restarting at 0 for each packed example).
    pub positions: Vec<Vec<usize>>,
    /// With packing: which example each token belongs to, so attention stays inside it.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Right-pad examples to the longest one (no packing).
    pub fn padded(examples: &[Example], pad_id: u32) -> Self {
        let t = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(examples.len());
        let mut labels = Vec::with_capacity(examples.len());
        for e in examples {
            let mut ids = e.input_ids.clone();
            let mut lab = e.labels.clone();
            ids.resize(t, pad_id);
            lab.resize(t, IGNORE_INDEX);
            input_ids.push(ids);
            labels.push(lab);
        }
        Self { positions: vec![(0..t).collect(); examples.len()], input_ids, labels, segments: None }
    }

    pub fn rows(&self) -> usize {
        self.input_ids.len()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Trained (label != -100) next-token targets in the batch.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum()
    }
}
