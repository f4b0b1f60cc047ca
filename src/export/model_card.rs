//! The README.md written beside a merged model: Hub front matter and how the weights were made.

use std::path::Path;

use crate::export::merge::{MergeDtype, MergeInput, MergeOptions, MergeSummary};
use crate::model::license::ModelLicense;

/// The Hub's license keys for a card's front matter (each line ends with a newline; empty when
/// the base model declares none): a derivative carries its base model's license.
pub fn license_front_matter(l: &ModelLicense) -> String {
    let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = String::new();
    match &l.id {
        Some(id) => out.push_str(&format!("license: {}\n", quote(id))),
        None if l.is_known() => out.push_str("license: other\n"),
        None => return out,
    }
    if let Some(name) = &l.name {
        out.push_str(&format!("license_name: {}\n", quote(name)));
    }
    if let Some(link) = l.link.as_deref().filter(|k| k.starts_with("http")) {
        out.push_str(&format!("license_link: {}\n", quote(link)));
    }
    out
}

/// A `## License` section naming the base model's license (or saying it is unknown).
pub fn license_section(l: &ModelLicense) -> String {
    format!(
        "## License\n\nThe base model's license applies to this model and anything derived from it: {}.\n\n",
        l.describe()
    )
}

/// A model card for a merged model (YAML front matter the Hub reads, then plain Markdown).
pub fn merged_model_card(base: &Path, inputs: &[MergeInput], opts: MergeOptions, summary: &MergeSummary) -> String {
    let base_name =
        base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| base.display().to_string());
    let hub_base = inputs
        .iter()
        .map(|i| i.adapter.base_model.as_str())
        .find(|b| !b.is_empty() && !b.starts_with('/') && !b.starts_with('.'))
        .unwrap_or(&base_name);
    let dtype = match opts.dtype {
        MergeDtype::Auto => "same as the base model",
        MergeDtype::Bf16 => "bfloat16",
        MergeDtype::F16 => "float16",
        MergeDtype::F32 => "float32",
    };
    let license = ModelLicense::read(base);
    let mut card = format!(
        "---\nbase_model: {hub_base}\nlibrary_name: transformers\n{}tags:\n- temper\n- lora\n- merged\n---\n\n# {base_name} with merged LoRA adapter{}\n\n",
        license_front_matter(&license),
        if inputs.len() > 1 { "s" } else { "" }
    );
    card.push_str(&format!(
        "Made by `temper merge` (temper {}): W' = W + Σ weight · scaling · (B @ A), computed in float32 and \
         cast to the output dtype ({dtype}). It loads like any Hugging Face model \
         (`AutoModelForCausalLM.from_pretrained`) and needs no adapter library.\n\n",
        env!("CARGO_PKG_VERSION")
    ));
    card.push_str(
        "| adapter | trained on | weight | r | lora_alpha | rsLoRA | modules |\n|---|---|---|---|---|---|---|\n",
    );
    for i in inputs {
        let c = &i.adapter.config;
        card.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            i.dir.display(),
            if i.adapter.base_model.is_empty() { "-" } else { &i.adapter.base_model },
            i.weight,
            c.r,
            c.lora_alpha,
            c.use_rslora,
            i.adapter.modules.len()
        ));
    }
    card.push_str(&format!(
        "\n{} of {} tensors received a LoRA update; {} shard(s), {} bytes of weights.{}\n",
        summary.merged,
        summary.tensors,
        summary.shards,
        summary.bytes,
        if summary.untied {
            " lm_head was untied from the input embeddings (`tie_word_embeddings: false`)."
        } else {
            ""
        }
    ));
    card.push_str(&format!("\n{}", license_section(&license)));
    card
}
