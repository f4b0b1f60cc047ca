//! LoRA dropout masks that do not depend on the backend: the same recipe and seed drop the
//! same elements on the CPU, CUDA and wgpu, and a gradient-checkpointed recomputation drops
//! the same elements as the forward pass it repeats.
//!
//! Each mask element is a counter-based draw: a SplitMix64 finaliser of a key built from
//! (seed, optimizer step, micro-batch, module) plus the element's index, so any element can be
//! drawn on its own, in parallel, with no generator state to carry or checkpoint. The
//! decisions are drawn on the host: the CPU backends take them as a bool tensor, the GPUs packed
//! 32 to a word and expanded on the device with integer shifts ([`TemperBackend`] chooses).
//!
//! Dropout is applied only inside a [`TrainingScope`] (the trainer opens one per
//! micro-batch), never during evaluation or generation, whatever the backend.

use std::cell::Cell;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, ElementConversion, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::ops::TemperBackend;

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Which optimizer step and micro-batch a forward pass belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepKey {
    pub seed: u64,
    pub step: u64,
    pub micro_batch: u64,
}

impl StepKey {
    /// The key of one module's mask in this micro-batch.
    pub fn mask_key(&self, module: u64) -> MaskKey {
        let mut k = mix(self.seed.wrapping_add(GAMMA));
        for part in [self.step, self.micro_batch, module] {
            k = mix(k ^ part.wrapping_mul(GAMMA));
        }
        MaskKey(k)
    }
}

/// The key of one mask: every element's draw is a function of it and the element's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskKey(pub u64);

/// A stable 64-bit id for a module name (FNV-1a), so a module's masks do not depend on which
/// other modules are adapted.
pub fn module_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

thread_local! {
    static ACTIVE: Cell<Option<StepKey>> = const { Cell::new(None) };
}

/// While alive, LoRA dropout is applied with masks keyed by `key` (on this thread).
#[must_use = "dropout is active only while the scope is alive"]
pub struct TrainingScope {
    previous: Option<StepKey>,
}

impl TrainingScope {
    pub fn enter(key: StepKey) -> Self {
        Self { previous: ACTIVE.with(|a| a.replace(Some(key))) }
    }
}

impl Drop for TrainingScope {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// The micro-batch being trained on this thread, if any.
pub fn active() -> Option<StepKey> {
    ACTIVE.with(Cell::get)
}

/// Drop threshold on a 32-bit draw: an element is dropped when its draw is below it.
fn threshold(p: f64) -> u64 {
    ((p.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64).min(1 << 32)
}

/// Whether element `index` is kept.
fn keep(key: MaskKey, threshold: u64, index: u64) -> bool {
    (mix(key.0.wrapping_add(index.wrapping_add(1).wrapping_mul(GAMMA))) >> 32) >= threshold
}

/// The keep decisions of a `[rows, cols]` mask, packed: row-major, each row padded to whole
/// 32-bit words, bit `j` of word `w` is column `32 w + j`.
pub fn keep_words(key: MaskKey, rows: usize, cols: usize, p: f64) -> Vec<u32> {
    let per_row = cols.div_ceil(32);
    let t = threshold(p);
    let mut words = vec![0u32; rows * per_row];
    words.par_chunks_mut(per_row.max(1)).enumerate().for_each(|(r, row)| {
        for (w, word) in row.iter_mut().enumerate() {
            let start = w * 32;
            for j in 0..32.min(cols - start) {
                if keep(key, t, (r * cols + start + j) as u64) {
                    *word |= 1 << j;
                }
            }
        }
    });
    words
}

/// The `[rows, cols]` dropped elements (`true` where dropped), laid out on the host and moved as
/// bools: for the CPU backends, whose memory is the host's, this is one parallel pass.
pub fn dropped_on_host<B: Backend>(
    key: MaskKey,
    rows: usize,
    cols: usize,
    p: f64,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let t = threshold(p);
    let mut values = vec![false; rows * cols];
    values.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
        for (c, v) in row.iter_mut().enumerate() {
            *v = !keep(key, t, (r * cols + c) as u64);
        }
    });
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// The `[rows, cols]` dropped elements (`true` where dropped), sent packed 32 decisions a word
/// and expanded on the device with integer shifts: for the GPUs, 1/32 of a bool mask's transfer.
pub fn dropped_packed<B: Backend>(
    key: MaskKey,
    rows: usize,
    cols: usize,
    p: f64,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let per_row = cols.div_ceil(32);
    // Bit-for-bit into i32 (a backend's int type is at least 32 bits wide; a wider one
    // sign-extends, which only touches bits the shifts below never read).
    let words: Vec<i32> = keep_words(key, rows, cols, p).into_iter().map(|w| w as i32).collect();
    let words = Tensor::<B, 2, Int>::from_data(TensorData::new(words, [rows, per_row]), device);
    let lanes = Tensor::<B, 1, Int>::arange(0..32, device).reshape([1, 1, 32]).expand([rows, per_row, 32]);
    let bits = words
        .reshape([rows, per_row, 1])
        .expand([rows, per_row, 32])
        .bitwise_right_shift(lanes)
        .bitwise_and_scalar(1.elem())
        .reshape([rows, per_row * 32]);
    let bits = if per_row * 32 == cols { bits } else { bits.slice([0..rows, 0..cols]) };
    bits.equal_elem(0)
}

/// `x` with LoRA dropout applied: dropped elements zeroed, kept ones scaled by `1 / (1 - p)`.
/// Autodiff keeps only the bool mask for the backward pass.
pub fn apply<B: TemperBackend>(x: Tensor<B, 2>, key: MaskKey, p: f64) -> Tensor<B, 2> {
    let [rows, cols] = x.dims();
    let dropped = Tensor::<B, 2, Bool>::from_primitive(B::temper_dropout_mask(key, rows, cols, p, &x.device()));
    x.mask_fill(dropped, 0.0).mul_scalar(1.0 / (1.0 - p))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cpu = burn::backend::Flex;

    /// The dropped elements drawn one by one, in order: what both layouts must hold.
    fn reference(key: MaskKey, rows: usize, cols: usize, p: f64) -> Vec<bool> {
        let t = threshold(p);
        (0..rows * cols).map(|i| !keep(key, t, i as u64)).collect()
    }

    #[test]
    fn drop_rate_and_scale_follow_p() {
        let key = StepKey { seed: 7, step: 3, micro_batch: 1 }.mask_key(module_id("model.layers.0.self_attn.q_proj"));
        let ones = Tensor::<Cpu, 2>::ones([256, 300], &Default::default());
        let v: Vec<f32> = apply(ones, key, 0.1).into_data().to_vec().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        // 76,800 draws: the standard error of the rate is ~0.0011.
        assert!((dropped - 0.1).abs() < 0.006, "drop rate {dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-7));
    }

    #[test]
    fn keys_differ_by_step_micro_batch_and_module() {
        let base = StepKey { seed: 1, step: 0, micro_batch: 0 };
        let m = module_id("a");
        let masks = [
            base.mask_key(m),
            StepKey { step: 1, ..base }.mask_key(m),
            StepKey { micro_batch: 1, ..base }.mask_key(m),
            StepKey { seed: 2, ..base }.mask_key(m),
            base.mask_key(module_id("b")),
        ]
        .map(|k| reference(k, 4, 64, 0.5));
        for i in 0..masks.len() {
            for j in i + 1..masks.len() {
                assert_ne!(masks[i], masks[j], "masks {i} and {j}");
            }
        }
        assert_eq!(masks[0], reference(base.mask_key(m), 4, 64, 0.5));
    }

    #[test]
    fn packed_words_hold_the_same_decisions() {
        let key = MaskKey(42);
        let (rows, cols) = (5, 70);
        let words = keep_words(key, rows, cols, 0.3);
        let dropped = reference(key, rows, cols, 0.3);
        for r in 0..rows {
            for c in 0..cols {
                let bit = words[r * 3 + c / 32] >> (c % 32) & 1 == 1;
                assert_eq!(bit, !dropped[r * cols + c], "({r}, {c})");
            }
        }
    }

    /// The CPU backends' host layout and the GPUs' packed words expand to the same mask.
    #[test]
    fn host_and_packed_masks_agree() {
        let device = Default::default();
        let (key, rows, cols) = (MaskKey(9), 7, 75);
        let host: Vec<bool> = dropped_on_host::<Cpu>(key, rows, cols, 0.2, &device).into_data().to_vec().unwrap();
        let packed: Vec<bool> = dropped_packed::<Cpu>(key, rows, cols, 0.2, &device).into_data().to_vec().unwrap();
        assert_eq!(host, packed);
        assert_eq!(host, reference(key, rows, cols, 0.2));
    }

    #[test]
    fn scope_is_restored_on_drop() {
        assert_eq!(active(), None);
        let key = StepKey { seed: 1, step: 2, micro_batch: 3 };
        {
            let _scope = TrainingScope::enter(key);
            assert_eq!(active(), Some(key));
        }
        assert_eq!(active(), None);
    }
}
