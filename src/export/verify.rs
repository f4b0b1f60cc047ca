//! `merge --verify`: run a few tokens through base + adapters and through the merged model and
//! report the largest logit difference.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use crate::export::merge::MergeInput;
use crate::export::peft::{Adapter, HostTensor, LoraPair};
use crate::lora::{apply_to, layer_projections_mut, projections_mut, LoraConfig, TargetModules};
use crate::model::decoder::{load_layer, ForwardContext};
use crate::model::{CausalLm, Checkpoint, DecoderConfig, WeightSource};
use crate::ops::TemperBackend;
use crate::{Error, Result};

/// How far the merged model's logits are from base + adapters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    pub tokens: usize,
    pub max_abs_logit_diff: f32,
    /// Largest |logit| of base + adapters, to judge the difference against.
    pub max_abs_logit: f32,
}

/// Compare logits of `base` + `inputs` (unmerged) with `merged` on `tokens` token ids, in f32
/// on `device`. The two models are streamed side by side, one decoder layer of each loaded at a
/// time: peak memory is the embeddings and heads of both plus two layers, never a whole model.
pub fn verify_merge<B: TemperBackend>(
    base: &Path,
    inputs: &[MergeInput],
    merged: &Path,
    tokens: &[u32],
    device: &B::Device,
) -> Result<VerifyReport> {
    let combined = combine(inputs)?;
    let (_, cfg_base) = DecoderConfig::from_model_dir(base)?;
    let (_, cfg_merged) = DecoderConfig::from_model_dir(merged)?;
    if cfg_base.num_layers != cfg_merged.num_layers || cfg_base.vocab_size != cfg_merged.vocab_size {
        return Err(Error::InvalidArgument(format!(
            "--verify: {} and {} are not the same architecture",
            base.display(),
            merged.display()
        )));
    }
    let mut w_base = WeightSource::Checkpoint(Checkpoint::open(base)?);
    let mut w_merged = WeightSource::Checkpoint(Checkpoint::open(merged)?);
    let mut remaining: BTreeMap<&str, &LoraPair> = combined.modules.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut head_base = CausalLm::<B>::load_without_layers(&cfg_base, &mut w_base, DType::F32, device)?;
    apply_to(projections_mut(&mut head_base), &combined, &mut remaining, device)?;
    let head_merged = CausalLm::<B>::load_without_layers(&cfg_merged, &mut w_merged, DType::F32, device)?;

    let ids: Vec<i64> = tokens.iter().map(|&t| (t as usize % cfg_base.vocab_size) as i64).collect();
    let input = || Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), device);
    let positions = vec![(0..ids.len()).collect::<Vec<_>>()];
    let ctx_base = ForwardContext::<B>::new(&cfg_base, &positions, 0, None, DType::F32, device);
    let ctx_merged = ForwardContext::<B>::new(&cfg_merged, &positions, 0, None, DType::F32, device);
    let (mut x_base, mut x_merged) = (head_base.embed(input()), head_merged.embed(input()));
    for i in 0..cfg_base.num_layers {
        let mut layer = load_layer::<B>(&cfg_base, &mut w_base, i, DType::F32, device)?;
        apply_to(layer_projections_mut(&mut layer, i), &combined, &mut remaining, device)?;
        x_base = layer.forward(x_base, &ctx_base, None);
        drop(layer);
        let layer = load_layer::<B>(&cfg_merged, &mut w_merged, i, DType::F32, device)?;
        x_merged = layer.forward(x_merged, &ctx_merged, None);
    }
    if let Some(name) = remaining.keys().next() {
        return Err(Error::InvalidArgument(format!(
            "--verify: the adapters have weights for `{name}`, which {} does not have",
            base.display()
        )));
    }
    let want = logits(head_base.logits(head_base.model.norm.forward(x_base)))?;
    let got = logits(head_merged.logits(head_merged.model.norm.forward(x_merged)))?;
    let max_abs_logit_diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    if !max_abs_logit_diff.is_finite() {
        return Err(Error::NonFinite(format!("logits of the merged model {}", merged.display())));
    }
    Ok(VerifyReport {
        tokens: ids.len(),
        max_abs_logit_diff,
        max_abs_logit: want.iter().map(|x| x.abs()).fold(0.0, f32::max),
    })
}

fn logits<B: Backend>(t: Tensor<B, 3>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| Error::InvalidArgument(format!("reading logits: {e:?}")))
}

/// All inputs as one adapter with scaling 1: per module, A stacked along the rank and B's
/// columns pre-multiplied by weight · scaling, so B_cat @ A_cat = Σ weight · scaling · B @ A.
pub fn combine(inputs: &[MergeInput]) -> Result<Adapter> {
    let first = inputs.first().ok_or_else(|| Error::InvalidArgument("no adapter to combine".into()))?;
    let mut parts: BTreeMap<String, Vec<(&LoraPair, f32)>> = BTreeMap::new();
    for i in inputs {
        for (m, pair) in &i.adapter.modules {
            parts.entry(m.clone()).or_default().push((pair, (i.weight * i.adapter.config.scaling(m)) as f32));
        }
    }
    let mut modules = BTreeMap::new();
    for (m, list) in parts {
        let d_in = list[0].0.a.shape[1];
        let d_out = list[0].0.b.shape[0];
        let rank: usize = list.iter().map(|(p, _)| p.a.shape[0]).sum();
        let mut a = Vec::with_capacity(rank * d_in);
        let mut b = vec![0f32; d_out * rank];
        let mut col = 0;
        for (p, s) in &list {
            if p.a.shape[1] != d_in || p.b.shape[0] != d_out {
                return Err(Error::InvalidArgument(format!(
                    "adapters disagree on the shape of `{m}`: were they trained on different base models?"
                )));
            }
            let r = p.a.shape[0];
            a.extend_from_slice(&p.a.data);
            for o in 0..d_out {
                for k in 0..r {
                    b[o * rank + col + k] = p.b.data[o * r + k] * s;
                }
            }
            col += r;
        }
        modules.insert(
            m,
            LoraPair {
                a: HostTensor { shape: vec![rank, d_in], data: a },
                b: HostTensor { shape: vec![d_out, rank], data: b },
            },
        );
    }
    let r0 = modules.values().next().map_or(1, |p| p.a.shape[0]);
    let odd: BTreeMap<String, usize> =
        modules.iter().filter(|(_, p)| p.a.shape[0] != r0).map(|(m, p)| (regex::escape(m), p.a.shape[0])).collect();
    let config = LoraConfig {
        r: r0,
        lora_alpha: r0 as f64,
        target_modules: TargetModules::List(modules.keys().cloned().collect()),
        alpha_pattern: odd.iter().map(|(k, &r)| (k.clone(), r as f64)).collect(),
        rank_pattern: odd,
        ..LoraConfig::default()
    };
    Ok(Adapter {
        config,
        base_model: first.adapter.base_model.clone(),
        modules,
        nested: first.adapter.nested,
        legacy_names: first.adapter.legacy_names,
        expert_format: first.adapter.expert_format,
    })
}
