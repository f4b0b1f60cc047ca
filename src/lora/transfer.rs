//! Moving adapters between a model on a device and the host-side [`Adapter`] (PEFT format).

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::export::{Adapter, HostTensor, LoraPair};
use crate::lora::inject::projections_mut;
use crate::lora::{LoraConfig, LoraDelta, LoraLinear};
use crate::model::CausalLm;
use crate::ops::dropout::module_id;
use crate::{Error, Result};

/// Put the adapter's A/B into the model's projections (replacing any there). A module the model
/// does not have, or a shape that does not fit, is an error naming the tensor.
pub fn apply_adapter<B: Backend>(model: &mut CausalLm<B>, adapter: &Adapter) -> Result<()> {
    let device = model.device();
    let mut remaining: BTreeMap<&str, &LoraPair> = adapter.modules.iter().map(|(k, v)| (k.as_str(), v)).collect();
    apply_to(projections_mut(model), adapter, &mut remaining, &device)?;
    if let Some(name) = remaining.keys().next() {
        return Err(Error::InvalidArgument(format!(
            "adapter has weights for `{name}`, which this model does not have: was it trained on another base model?"
        )));
    }
    Ok(())
}

/// Put the adapter's A/B into those of `projections` it has, removing them from `remaining`.
pub fn apply_to<B: Backend>(
    projections: Vec<(String, &mut LoraLinear<B>)>,
    adapter: &Adapter,
    remaining: &mut BTreeMap<&str, &LoraPair>,
    device: &B::Device,
) -> Result<()> {
    for (name, proj) in projections {
        let Some(pair) = remaining.remove(name.as_str()) else { continue };
        let [d_out, d_in] = proj.dims();
        let r = pair.a.shape[0];
        if pair.a.shape != [r, d_in] {
            return Err(shape_error(&name, 'A', vec![r, d_in], &pair.a.shape));
        }
        if pair.b.shape != [d_out, r] {
            return Err(shape_error(&name, 'B', vec![d_out, r], &pair.b.shape));
        }
        let (cfg_r, _) = adapter.config.rank_alpha(&name);
        // A per-expert adapter's gate and up pairs become one gate_up pair of twice the rank
        // (export::experts), with the scaling of rank r.
        let fused_halves = name.ends_with(".gate_up_proj")
            && crate::export::experts::split_expert_name(&name).is_some()
            && r == 2 * cfg_r;
        if cfg_r != r && !fused_halves {
            return Err(Error::InvalidArgument(format!(
                "adapter tensor {name}.lora_A has rank {r} but adapter_config.json gives rank {cfg_r} for this module"
            )));
        }
        proj.lora = Some(LoraDelta {
            lora_a: Param::from_tensor(to_device(&pair.a, device)),
            lora_b: Param::from_tensor(to_device(&pair.b, device)),
            scaling: adapter.config.scaling(&name),
            dropout: adapter.config.lora_dropout,
            module: module_id(&name),
        });
    }
    Ok(())
}

fn shape_error(module: &str, which: char, expected: Vec<usize>, actual: &[usize]) -> Error {
    Error::InvalidArgument(format!(
        "adapter tensor base_model.model.{module}.lora_{which}.weight has shape {actual:?}, but this model needs {expected:?}: was it trained on another base model?"
    ))
}

fn to_device<B: Backend>(t: &HostTensor, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(t.data.clone(), [t.shape[0], t.shape[1]]), (device, DType::F32))
}

/// Copy every adapter in the model to the host, as a PEFT adapter with `config`.
pub fn extract_adapter<B: Backend>(model: &mut CausalLm<B>, config: &LoraConfig, base_model: &str) -> Result<Adapter> {
    let mut modules = BTreeMap::new();
    for (name, proj) in projections_mut(model) {
        if let Some(lora) = &proj.lora {
            modules.insert(name, LoraPair { a: to_host(lora.lora_a.val())?, b: to_host(lora.lora_b.val())? });
        }
    }
    Ok(Adapter {
        config: config.clone(),
        base_model: base_model.to_string(),
        modules,
        nested: model.config.composite.is_some(),
        legacy_names: crate::model::names::legacy_live_names(model.config.composite.as_deref()),
        expert_format: Default::default(),
    })
}

fn to_host<B: Backend>(t: Tensor<B, 2>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = t
        .cast(DType::F32)
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| Error::InvalidArgument(format!("reading adapter weights from the device: {e:?}")))?;
    Ok(HostTensor { shape, data })
}
