//! Evaluation: token-weighted mean next-token NLL over rows, as transformers computes it with
//! `labels = input_ids`, accumulated over every row.

use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::model::CausalLm;
use crate::ops::loss::shift_labels;
use crate::ops::TemperBackend;
use crate::{Error, Result};

/// Loss over a set of rows.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct EvalResult {
    /// Mean NLL per predicted token.
    pub loss: f64,
    /// Predicted (trained) tokens counted.
    pub tokens: usize,
    pub perplexity: f64,
}

/// Running sum of NLL and token count.
#[derive(Debug, Default, Clone, Copy)]
pub struct LossAccumulator {
    pub nll: f64,
    pub tokens: usize,
}

impl LossAccumulator {
    pub fn add(&mut self, nll: f64, tokens: usize) {
        self.nll += nll;
        self.tokens += tokens;
    }

    pub fn result(&self) -> EvalResult {
        let loss = if self.tokens == 0 { f64::NAN } else { self.nll / self.tokens as f64 };
        EvalResult { loss, tokens: self.tokens, perplexity: loss.exp() }
    }
}

/// Sum of NLL and trained-token count for one row of ids and its labels (no padding).
pub fn row_nll<B: TemperBackend>(model: &CausalLm<B>, ids: &[u32], labels: &[i64]) -> Result<(f64, usize)> {
    let t = ids.len();
    let (targets, count) = shift_labels(&[labels.to_vec()]);
    if count == 0 {
        return Ok((0.0, 0));
    }
    let data: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, t]), &model.device());
    let ctx = model.causal_context(1, t, 0);
    let sum: f32 = model.nll_sum(model.hidden_states(input, &ctx, None), &targets).into_scalar().to_f32();
    if !sum.is_finite() {
        return Err(Error::NonFinite(format!("loss of a {t}-token row is {sum}")));
    }
    Ok((sum as f64, count))
}

use burn::tensor::ElementConversion;
trait ToF32 {
    fn to_f32(self) -> f32;
}
impl<E: ElementConversion> ToF32 for E {
    fn to_f32(self) -> f32 {
        self.elem::<f32>()
    }
}
