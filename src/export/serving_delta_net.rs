//! The serving rules that only the Gated DeltaNet hybrids have (Qwen 3.5 `qwen3_5_text`,
//! `qwen3_5`, `qwen3_5_moe_text`, `qwen3_5_moe`; Qwen3-Next `qwen3_next`), on top of the
//! general ones of [`crate::export::serving`].
//!
//! vLLM (`vllm/model_executor/models/qwen3_5.py`, `qwen3_next.py`,
//! `model_executor/layers/mamba/gdn_linear_attn.py`, `lora/model_manager.py`,
//! `lora/layers/column_parallel_linear.py`):
//! - Qwen 3.5 with LoRA enabled builds `in_proj_qkv` and `in_proj_z` as two modules
//!   (`create_in_proj_qkvz=False`), so each takes its own adapter. `in_proj_b` and `in_proj_a`
//!   are packed into one `in_proj_ba` (`packed_modules_mapping`, a two-slice
//!   `MergedColumnParallelLinear` -> `MergedColumnParallelLinearWithLoRA`);
//!   `_create_merged_loras_inplace` fills a slice without LoRA with `None`, so an adapter on
//!   either alone or on both is served (a note). An adapter module named `in_proj_ba` or
//!   `in_proj_qkvz` is not a Qwen 3.5 checkpoint module and vLLM's expected-module list (the
//!   packed names replaced by their parts) does not hold it: V7 of the general rules.
//! - `Qwen3_5MoeForConditionalGeneration` sets `is_3d_moe_weight`: vLLM reads PEFT's 3-D expert
//!   LoRA (`FusedMoE3DWithLoRA`), and `_stack_moe_lora_weights` asserts that every layer has
//!   both the gate_up (`experts.base_layer`) and the down (`experts`) pair (V9 otherwise, and
//!   V9 for the 2-D per-expert form, which that class does not read). The text class
//!   `Qwen3_5MoeForCausalLM` does not set it: the general V9 (2-D form) applies.
//! - Qwen3-Next keeps `in_proj_qkvz` and `in_proj_ba` as single-slice modules (grouped layout,
//!   `packed_modules_mapping` maps each to itself): served as stored. Above one tensor-parallel
//!   rank, `ColumnParallelLinearWithLoRA.slice_lora_b` cuts a `MergedColumnParallelLinear`'s B
//!   in two halves while the one-shard base weight is cut contiguously (a note: serve with
//!   `--tensor-parallel-size 1`).
//!
//! mistral.rs (`mistralrs-core/src/models/gdn.rs`, `GatedDeltaNet::load`): the DeltaNet's
//! input projections are loaded (Qwen 3.5's four merged into Qwen3-Next's grouped two) into
//! plain `candle_nn::Linear`s, which take no LoRA: M10 for an adapter on any of them.
//! `out_proj` is a `RowParallelLayer` like every other projection.
//!
//! llama.cpp: the architectures and tensor names are in [`crate::export::gguf`]; the general
//! L1 / L2 rules apply.

use crate::export::serving::Verdict;

/// The DeltaNet's input projections, as the checkpoints name them.
const INPUT_PROJECTIONS: [&str; 6] =
    ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba"];

fn is_qwen35(model_type: Option<&str>) -> bool {
    matches!(model_type, Some("qwen3_5_text" | "qwen3_5" | "qwen3_5_moe_text" | "qwen3_5_moe"))
}

fn last_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// For a base whose vLLM class reads PEFT's 3-D expert form (`qwen3_5_moe`): whether the 3-D
/// expert tensors `names` are complete (both pairs in every layer). `None` for every other base.
pub fn vllm_3d_experts(model_type: Option<&str>, names: &[&str]) -> Option<Result<(), String>> {
    if model_type != Some("qwen3_5_moe") {
        return None;
    }
    let mut layers: std::collections::BTreeMap<&str, bool> = std::collections::BTreeMap::new();
    for name in names {
        if let Some(at) = name.find(".mlp.experts.") {
            let both = layers.entry(&name[..at]).or_default();
            *both |= name[at..].starts_with(".mlp.experts.base_layer.");
        }
    }
    let half: Vec<&str> = layers.iter().filter(|(_, both)| !**both).map(|(layer, _)| *layer).collect();
    Some(match half.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} layer(s) ({first}, ...) adapt only one of experts.gate_up_proj / experts.down_proj: vLLM's 3-D expert LoRA for Qwen3_5MoeForConditionalGeneration (is_3d_moe_weight) needs both in every layer",
            half.len()
        )),
    })
}

/// Add the hybrid models' rules to the verdicts `[vLLM, llama.cpp, mistral.rs]` for an adapter
/// on `modules` (PEFT's module names) of a base of `model_type`.
pub fn rules(model_type: Option<&str>, modules: &[String], verdicts: &mut [Verdict]) {
    let qwen35 = is_qwen35(model_type);
    let next = model_type == Some("qwen3_next");
    if !(qwen35 || next) {
        return;
    }
    let has = |names: &[&str]| modules.iter().any(|m| names.contains(&last_name(m)));
    if let Some(vllm) = verdicts.first_mut() {
        if qwen35 && has(&["in_proj_b", "in_proj_a"]) {
            vllm.notes.push("vLLM packs in_proj_b and in_proj_a into its in_proj_ba, one LoRA slice each".into());
        }
        let per_expert = modules.iter().filter(|m| crate::export::experts::split_expert_name(m).is_some()).count();
        if model_type == Some("qwen3_5_moe") && per_expert > 0 {
            vllm.problems.push((
                "V9",
                format!("{per_expert} expert modules are in the 2-D per-expert form; vLLM's Qwen3_5MoeForConditionalGeneration (is_3d_moe_weight) reads PEFT's 3-D form: `temper export --format peft` writes it"),
            ));
        }
        if next && has(&["in_proj_qkvz", "in_proj_ba"]) {
            vllm.notes.push("serve with --tensor-parallel-size 1: vLLM slices the B of in_proj_qkvz / in_proj_ba LoRA in halves across ranks, unlike their grouped base weights".into());
        }
    }
    let fused: Vec<&str> = {
        let mut names: Vec<&str> =
            modules.iter().map(|m| last_name(m)).filter(|n| INPUT_PROJECTIONS.contains(n)).collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    if let (Some(mistral), false) = (verdicts.get_mut(2), fused.is_empty()) {
        mistral.problems.push((
            "M10",
            format!(
                "mistral.rs loads the DeltaNet's input projections ({}) as plain Linear layers, which take no LoRA",
                fused.join(", ")
            ),
        ));
    }
}
