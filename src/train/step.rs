//! Forward and backward of one micro-batch, returning LoRA gradients. With gradient
//! checkpointing, the forward runs without a graph and each decoder block is recomputed in the
//! backward pass: only one block's activations are alive at a time.

use burn::module::{AutodiffModule, Param};
use burn::tensor::{backend::AutodiffBackend, Int, Tensor, TensorData};

use crate::data::Batch;
use crate::lora::projections_mut;
use crate::model::CausalLm;
use crate::ops::loss::shift_labels;
use crate::ops::{TemperAutodiff, TemperBackend};
use crate::{Error, Result};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Every trainable tensor of the model (A then B of each adapted projection, in module order),
/// with its PEFT key.
pub fn lora_params<B: AutodiffBackend>(model: &mut CausalLm<B>) -> Vec<(String, &mut Param<Tensor<B, 2>>)> {
    let mut out = Vec::new();
    for (name, proj) in projections_mut(model) {
        if let Some(lora) = proj.lora.as_mut() {
            out.push((format!("base_model.model.{name}.lora_A.weight"), &mut lora.lora_a));
            out.push((format!("base_model.model.{name}.lora_B.weight"), &mut lora.lora_b));
        }
    }
    out
}

/// Input tensor, context (positions, masks) and shifted targets of a batch.
fn inputs<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
    batch: &Batch,
) -> (Tensor<B, 2, Int>, crate::model::decoder::ForwardContext<B>, Vec<i64>) {
    let (b, t) = (batch.rows(), batch.seq_len());
    let ids: Vec<i64> = batch.input_ids.iter().flatten().map(|&x| x as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &model.device());
    let ctx = model.context(&batch.positions, 0, batch.segments.clone());
    let (targets, _) = shift_labels(&batch.labels);
    (ids, ctx, targets)
}

/// Summed NLL of a batch without building a graph (evaluation).
pub fn eval_nll<B: TemperBackend>(model: &CausalLm<B>, batch: &Batch) -> f64 {
    let (ids, ctx, targets) = inputs(model, batch);
    model.nll_sum(model.hidden_states(ids, &ctx, None), &targets).into_scalar().elem::<f64>()
}

use burn::tensor::ElementConversion;

/// A micro-batch's loss `[1]` and its LoRA gradients, in the order of `lora_params`.
pub type LossAndGrads<B> = (Tensor<Inner<B>, 1>, Vec<Tensor<Inner<B>, 2>>);

/// Gradients of `nll_sum(batch) / denom` for every LoRA tensor (order of [`lora_params`]),
/// and the batch's summed NLL as a `[1]` tensor (read by the caller once per optimizer step,
/// so the device is not synchronised per micro-batch).
///
/// With `aux_coef`, the mixture-of-experts load-balancing loss joins the objective:
/// `coef * aux * trained_tokens(batch)` is added to the batch's NLL sum, so that after the
/// division by the step's token count each micro-batch's aux loss weighs its share of the tokens
/// (one micro-batch: `lm_loss + coef * aux`, transformers' total). The returned NLL stays the LM
/// loss alone.
pub fn micro_batch_grads<B: TemperAutodiff>(
    model: &mut CausalLm<B>,
    batch: &Batch,
    denom: f64,
    checkpointing: bool,
    aux_coef: Option<f64>,
) -> Result<LossAndGrads<B>> {
    if checkpointing {
        return checkpointed_grads(model, batch, denom, aux_coef);
    }
    let (ids, ctx, targets) = inputs(model, batch);
    let ctx = if aux_coef.is_some() { ctx.recording_router() } else { ctx };
    let nll = model.nll_sum(model.hidden_states(ids, &ctx, None), &targets);
    let nll_value = nll.clone().inner();
    let mut objective = nll;
    if let (Some(coef), Some(rec)) = (aux_coef, &ctx.router) {
        let layers = rec.borrow();
        let real = real_tokens(batch);
        let e = layers.first().map_or(0, |l| l.logits.dims()[1]);
        let (counts, rows) = crate::model::moe::load_balancing_counts(&layers, real.as_deref(), e);
        for layer in layers.iter() {
            let term = crate::model::moe::load_balancing_term(layer.logits.clone(), real.as_deref(), &counts, rows);
            objective = objective + term.mul_scalar(coef * batch.trained_tokens() as f64);
        }
    }
    let grads = objective.div_scalar(denom).backward();
    let out = lora_params(model)
        .into_iter()
        .map(|(key, p)| {
            p.val().grad(&grads).ok_or_else(|| Error::InvalidArgument(format!("no gradient reached {key}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((nll_value, out))
}

/// Block-level recomputation: forward every block without a graph keeping only its input,
/// then walk the blocks backwards, recomputing one block with a graph and back-propagating the
/// gradient of its output through it (surrogate loss `sum(output * upstream)`).
fn checkpointed_grads<B: TemperAutodiff>(
    model: &mut CausalLm<B>,
    batch: &Batch,
    denom: f64,
    aux_coef: Option<f64>,
) -> Result<LossAndGrads<B>> {
    let keys: Vec<String> = lora_params(model).into_iter().map(|(k, _)| k).collect();
    let mut acc: Vec<Option<Tensor<Inner<B>, 2>>> = vec![None; keys.len()];
    let inner = model.valid();
    let (ids, ctx_inner, targets) = inputs(&inner, batch);
    // The load-balancing loss is a sum over layers of terms whose counts span all layers: the
    // counts come from this forward, each layer's term joins its own block's recomputation.
    let ctx_inner = if aux_coef.is_some() { ctx_inner.recording_router() } else { ctx_inner };
    // Forward without a graph: the input of every block.
    let mut x = inner.embed(ids);
    let mut block_inputs = Vec::with_capacity(inner.model.layers.len());
    for layer in &inner.model.layers {
        block_inputs.push(x.clone());
        x = layer.forward(x, &ctx_inner, None);
    }
    let real = real_tokens(batch);
    let aux = match (aux_coef, &ctx_inner.router) {
        (Some(coef), Some(rec)) => {
            let layers = rec.borrow();
            let e = layers.first().map_or(0, |l| l.logits.dims()[1]);
            let (counts, rows) = crate::model::moe::load_balancing_counts(&layers, real.as_deref(), e);
            Some((coef * batch.trained_tokens() as f64, counts, rows))
        }
        _ => None,
    };
    let mut ctx = model.context(&batch.positions, 0, batch.segments.clone());
    if aux.is_some() {
        ctx = ctx.recording_router();
    }
    // Head: norm, logits, loss; gradient with respect to the last block's output.
    let top = Tensor::<B, 3>::from_inner(x).require_grad();
    let nll = model.nll_sum(model.model.norm.forward(top.clone()), &targets);
    let nll_value = nll.clone().inner();
    let grads = nll.div_scalar(denom).backward();
    collect(model, &grads, &mut acc);
    let mut upstream =
        top.grad(&grads).ok_or_else(|| Error::InvalidArgument("no gradient reached the last hidden state".into()))?;
    for i in (0..model.model.layers.len()).rev() {
        let input = Tensor::<B, 3>::from_inner(block_inputs[i].clone()).require_grad();
        let out = model.model.layers[i].forward(input.clone(), &ctx, None);
        let mut surrogate = (out * Tensor::from_inner(upstream).detach()).sum();
        if let (Some((scale, counts, rows)), Some(rec)) = (&aux, &ctx.router) {
            if let Some(layer) = rec.borrow_mut().pop() {
                let term = crate::model::moe::load_balancing_term(layer.logits, real.as_deref(), counts, *rows);
                surrogate = surrogate + term.mul_scalar(*scale / denom);
            }
        }
        let grads = surrogate.backward();
        collect(model, &grads, &mut acc);
        upstream = match input.grad(&grads) {
            Some(g) => g,
            None if i == 0 => break,
            None => return Err(Error::InvalidArgument(format!("no gradient reached the input of layer {i}"))),
        };
    }
    acc.into_iter()
        .zip(keys)
        .map(|(g, k)| g.ok_or_else(|| Error::InvalidArgument(format!("no gradient reached {k}"))))
        .collect::<Result<Vec<_>>>()
        .map(|g| (nll_value, g))
}

/// Which tokens count for the load-balancing loss: a packed batch's padding (segment 0) does
/// not, as transformers masks padding with the attention mask. A padded batch carries no mask,
/// so all its tokens count.
fn real_tokens(batch: &Batch) -> Option<Vec<bool>> {
    batch.segments.as_ref().map(|s| s.iter().flatten().map(|&seg| seg != 0).collect())
}

fn collect<B: AutodiffBackend>(model: &mut CausalLm<B>, grads: &B::Gradients, acc: &mut [Option<Tensor<Inner<B>, 2>>]) {
    for (slot, (_, p)) in acc.iter_mut().zip(lora_params(model)) {
        if let Some(g) = p.val().grad(grads) {
            *slot = Some(match slot.take() {
                Some(prev) => prev + g,
                None => g,
            });
        }
    }
}
