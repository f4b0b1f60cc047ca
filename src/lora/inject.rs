//! Which projections get adapters (PEFT's matching rules) and putting them there.

use burn::module::Param;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::lora::config::{LoraConfig, LoraInit, TargetModules};
use crate::lora::linear::{LoraDelta, LoraLinear};
use crate::model::config::Mixer;
use crate::model::decoder::DecoderLayer;
use crate::model::mlp::Mlp;
use crate::model::names::{legacy_live_names, peft_module_in};
use crate::model::{CausalLm, DecoderConfig};
use crate::ops::dropout::module_id;
use crate::{Error, Result};

/// Every projection of the model with its module name as in the checkpoint
/// (`model.layers.0.self_attn.q_proj`), lm_head last.
pub fn projections_mut<B: Backend>(model: &mut CausalLm<B>) -> Vec<(String, &mut LoraLinear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        out.extend(layer_projections_mut(layer, i));
    }
    if let Some(head) = model.lm_head.as_mut() {
        out.push(("lm_head".to_string(), head));
    }
    out
}

/// The projections of decoder layer `i`, named as in [`projections_mut`].
pub fn layer_projections_mut<B: Backend>(layer: &mut DecoderLayer<B>, i: usize) -> Vec<(String, &mut LoraLinear<B>)> {
    let mut out = Vec::new();
    if let Some(a) = layer.self_attn.as_mut() {
        for (name, p) in [
            ("q_proj", a.q_proj.as_mut()),
            ("k_proj", a.k_proj.as_mut()),
            ("v_proj", a.v_proj.as_mut()),
            ("qkv_proj", a.qkv_proj.as_mut()),
            ("o_proj", Some(&mut a.o_proj)),
        ] {
            if let Some(p) = p {
                out.push((format!("model.layers.{i}.self_attn.{name}"), p));
            }
        }
    }
    if let Some(a) = layer.latent_attn.as_mut() {
        for (name, p) in [
            ("q_proj", a.q_proj.as_mut()),
            ("q_a_proj", a.q_a_proj.as_mut()),
            ("q_b_proj", a.q_b_proj.as_mut()),
            ("kv_a_proj_with_mqa", Some(&mut a.kv_a_proj_with_mqa)),
            ("kv_b_proj", Some(&mut a.kv_b_proj)),
            ("o_proj", Some(&mut a.o_proj)),
        ] {
            if let Some(p) = p {
                out.push((format!("model.layers.{i}.self_attn.{name}"), p));
            }
        }
    }
    if let Some(d) = layer.linear_attn.as_mut() {
        for (name, p) in [
            ("in_proj_qkv", d.in_proj_qkv.as_mut()),
            ("in_proj_z", d.in_proj_z.as_mut()),
            ("in_proj_b", d.in_proj_b.as_mut()),
            ("in_proj_a", d.in_proj_a.as_mut()),
            ("in_proj_qkvz", d.in_proj_qkvz.as_mut()),
            ("in_proj_ba", d.in_proj_ba.as_mut()),
            ("out_proj", Some(&mut d.out_proj)),
        ] {
            if let Some(p) = p {
                out.push((format!("model.layers.{i}.linear_attn.{name}"), p));
            }
        }
    }
    let ffn = layer.ffn_name;
    if let Some(m) = layer.mlp.as_mut() {
        out.extend(mlp_projections_mut(m, &format!("model.layers.{i}.{ffn}")));
    }
    if let Some(moe) = layer.moe.as_mut() {
        let p = format!("model.layers.{i}.{ffn}");
        out.push((format!("{p}.{}", moe.router_name), &mut moe.gate));
        for (e, expert) in moe.experts.iter_mut().enumerate() {
            out.push((format!("{p}.experts.{e}.gate_up_proj"), &mut expert.gate_up_proj));
            out.push((format!("{p}.experts.{e}.down_proj"), &mut expert.down_proj));
        }
        if let Some(shared) = moe.shared_expert.as_mut() {
            out.extend(mlp_projections_mut(shared, &format!("{p}.{}", moe.shared_name)));
        }
        if let Some(g) = moe.shared_expert_gate.as_mut() {
            out.push((format!("{p}.shared_expert_gate"), g));
        }
    }
    out
}

fn mlp_projections_mut<'a, B: Backend>(m: &'a mut Mlp<B>, prefix: &str) -> Vec<(String, &'a mut LoraLinear<B>)> {
    let mut out = Vec::new();
    for (name, p) in [
        ("gate_proj", m.gate_proj.as_mut()),
        ("up_proj", m.up_proj.as_mut()),
        ("gate_up_proj", m.gate_up_proj.as_mut()),
        ("down_proj", Some(&mut m.down_proj)),
    ] {
        if let Some(p) = p {
            out.push((format!("{prefix}.{name}"), p));
        }
    }
    out
}

/// The projections' names, same order as [`projections_mut`] (from the model's config: see
/// [`module_names`]).
pub fn projection_names<B: Backend>(model: &CausalLm<B>) -> Vec<String> {
    module_names(&model.config)
}

/// The projections a model of this config has, by Temper's names, in [`projections_mut`]'s
/// order, without loading it.
pub fn module_names(cfg: &DecoderConfig) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..cfg.num_layers {
        match (cfg.layer_mixers.get(i), &cfg.delta_net, &cfg.mla) {
            (Some(Mixer::LatentAttention), _, Some(m)) => {
                let q: &[&str] = if m.q_lora_rank.is_some() { &["q_a_proj", "q_b_proj"] } else { &["q_proj"] };
                let rest = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"];
                names.extend(q.iter().chain(&rest).map(|n| format!("model.layers.{i}.self_attn.{n}")));
            }
            (Some(Mixer::GatedDeltaNet), Some(dn), _) => {
                let linear: &[&str] = if dn.grouped {
                    &["in_proj_qkvz", "in_proj_ba", "out_proj"]
                } else {
                    &["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
                };
                names.extend(linear.iter().map(|n| format!("model.layers.{i}.linear_attn.{n}")));
            }
            _ => {
                let attn: &[&str] = if cfg.fused_projections {
                    &["qkv_proj", "o_proj"]
                } else {
                    &["q_proj", "k_proj", "v_proj", "o_proj"]
                };
                names.extend(attn.iter().map(|n| format!("model.layers.{i}.self_attn.{n}")));
            }
        }
        let mlp: &[&str] =
            if cfg.fused_projections { &["gate_up_proj", "down_proj"] } else { &["gate_proj", "up_proj", "down_proj"] };
        match &cfg.moe {
            Some(m) if m.is_sparse(i) => {
                use crate::model::config::ExpertNaming;
                let p = format!("model.layers.{i}.{}", cfg.ffn_name);
                names.push(format!(
                    "{p}.{}",
                    if matches!(m.naming, ExpertNaming::GptOss | ExpertNaming::Llama4) { "router" } else { "gate" }
                ));
                for e in 0..m.num_experts {
                    names.push(format!("{p}.experts.{e}.gate_up_proj"));
                    names.push(format!("{p}.experts.{e}.down_proj"));
                }
                if m.shared_expert_intermediate.is_some() {
                    names.extend(mlp.iter().map(|n| format!("{p}.{}.{n}", m.shared_expert_name)));
                    if m.shared_expert_gated {
                        names.push(format!("{p}.shared_expert_gate"));
                    }
                }
            }
            _ => names.extend(mlp.iter().map(|n| format!("model.layers.{i}.{}.{n}", cfg.ffn_name))),
        }
    }
    if !cfg.tie_word_embeddings {
        names.push("lm_head".into());
    }
    names
}

/// The parameter PEFT's `target_parameters` names for a mixture-of-experts module: an expert's
/// projection `model.layers.3.mlp.experts.5.down_proj` is the slice of the fused
/// `model.layers.3.mlp.experts.down_proj`; the router `model.layers.3.mlp.gate` is
/// `model.layers.3.mlp.gate.weight`. `None` for every other module.
pub fn moe_parameter(module: &str) -> Option<String> {
    for ffn in [".mlp.", ".feed_forward."] {
        if let Some((head, tail)) = module.split_once(&format!("{ffn}experts.")) {
            let (_, proj) = tail.split_once('.')?;
            return Some(format!("{head}{ffn}experts.{proj}"));
        }
    }
    let router = [".mlp.gate", ".mlp.router", ".feed_forward.router"].iter().any(|r| module.ends_with(r));
    router.then(|| format!("{module}.weight"))
}

/// PEFT's `check_target_module_exists` for one module name. Experts and routers are parameters
/// in transformers 5, so only `target_parameters` reaches them.
pub fn is_target(cfg: &LoraConfig, module: &str) -> bool {
    if let Some(param) = moe_parameter(module) {
        let hit = cfg.target_parameters.iter().flatten().any(|t| param == *t || param.ends_with(&format!(".{t}")));
        return hit && layer_allowed(cfg, module);
    }
    match &cfg.target_modules {
        TargetModules::Pattern(p) if p == "all-linear" => {
            module != "lm_head" && !opt_in_only(module) && layer_allowed(cfg, module)
        }
        // A regex ignores layers_to_transform in PEFT.
        TargetModules::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$")).is_ok_and(|re| re.is_match(module)),
        TargetModules::List(names) => {
            let hit = names.iter().any(|n| module == n || module.ends_with(&format!(".{n}")));
            hit && layer_allowed(cfg, module)
        }
    }
}

/// Projections `all-linear` leaves out and only a name in `target_modules` reaches: a gated delta
/// net's `in_proj_b` / `in_proj_a` (Qwen3-Next: `in_proj_ba`), which give each value head's
/// write strength and decay (two numbers per head: no trainer targets them by default).
fn opt_in_only(module: &str) -> bool {
    [".linear_attn.in_proj_b", ".linear_attn.in_proj_a", ".linear_attn.in_proj_ba"].iter().any(|s| module.ends_with(s))
}

fn layer_allowed(cfg: &LoraConfig, module: &str) -> bool {
    match &cfg.layers_to_transform {
        None => true,
        Some(layers) if layers.is_empty() => true,
        Some(layers) => layer_index(module).is_some_and(|i| layers.contains(&i)),
    }
}

/// `model.layers.7.mlp.up_proj` -> 7
pub fn layer_index(module: &str) -> Option<usize> {
    let mut parts = module.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Add fresh adapters to every targeted projection; returns the targeted module names.
/// A configuration that targets nothing is an error.
pub fn inject<B: Backend>(model: &mut CausalLm<B>, cfg: &LoraConfig, seed: u64) -> Result<Vec<String>> {
    cfg.validate().map_err(|reason| Error::InvalidArgument(format!("lora: {reason}")))?;
    let device = model.device();
    let mut rng = StdRng::seed_from_u64(seed);
    // A tied head is the embedding matrix: PEFT would adapt it in place; Temper has no separate
    // head to adapt, so naming it is an error rather than a silent no-op.
    if model.lm_head.is_none()
        && matches!(&cfg.target_modules, TargetModules::List(names) if names.iter().any(|n| n == "lm_head"))
    {
        return Err(Error::InvalidArgument(
            "lora.target_modules names lm_head, but this model ties lm_head to embed_tokens (tie_word_embeddings): there is no separate head to adapt; remove lm_head from target_modules".into(),
        ));
    }
    let mut targeted = Vec::new();
    let composite = model.config.composite.is_some();
    let legacy = legacy_live_names(model.config.composite.as_deref());
    for (name, proj) in projections_mut(model) {
        // Matched as PEFT sees the module: a vision-language model's decoder modules are
        // `model.language_model.*` there, so a PEFT regex for it works here too.
        if !is_target(cfg, &peft_module_in(&name, composite, legacy)) {
            continue;
        }
        let [d_out, d_in] = proj.dims();
        let (r, _) = cfg.rank_alpha(&name);
        let a = match &cfg.init_lora_weights {
            LoraInit::Named(_) => gaussian(&mut rng, r * d_in, 1.0 / r as f64),
            _ => uniform(&mut rng, r * d_in, 1.0 / (d_in as f64).sqrt()),
        };
        let b = match &cfg.init_lora_weights {
            LoraInit::Flag(false) => uniform(&mut rng, d_out * r, 1.0 / (r as f64).sqrt()),
            _ => vec![0.0; d_out * r],
        };
        proj.lora = Some(LoraDelta {
            lora_a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [r, d_in]), (&device, DType::F32))),
            lora_b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [d_out, r]), (&device, DType::F32))),
            scaling: cfg.scaling(&name),
            dropout: cfg.lora_dropout,
            module: module_id(&name),
        });
        targeted.push(name);
    }
    if targeted.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "lora.target_modules {:?} matches no projection of this model (its projections: {})",
            cfg.target_modules,
            projection_names(model)
                .iter()
                .map(|n| n.rsplit('.').next().unwrap_or(n))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(targeted)
}

fn uniform(rng: &mut StdRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
}

fn gaussian(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}
