//! Where a text decoder's tensors sit in a checkpoint, and the module names PEFT gives them.
//!
//! Inside Temper every module is named as in a `*ForCausalLM` checkpoint (`model.layers.0.mlp.up_proj`,
//! `lm_head`). A vision-language checkpoint (Gemma 3 4B+, Mistral 3) holds the same decoder under
//! another prefix, in one of two layouts, and PEFT names its modules after the live transformers
//! model (`model.language_model.layers.0...`), whichever layout the files use.

/// The layout of a checkpoint's text-decoder tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextLayout {
    /// `model.*` and `lm_head.weight`: a `*ForCausalLM` checkpoint.
    #[default]
    Plain,
    /// `model.language_model.*` and `lm_head.weight`: a vision-language model as transformers
    /// >= 4.52 saves it.
    Nested,
    /// `language_model.model.*` and `language_model.lm_head.weight`: the layout of the original
    /// Hub uploads of Gemma 3 and Mistral 3 (transformers < 4.52).
    Legacy,
}

const NESTED: &str = "model.language_model.";
const LEGACY: &str = "language_model.model.";
const LEGACY_HEAD: &str = "language_model.lm_head";

impl TextLayout {
    /// The layout of a checkpoint, from its tensor names (the embedding matrix is always there).
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a String>) -> Self {
        for name in names {
            if name == "model.language_model.embed_tokens.weight" {
                return TextLayout::Nested;
            }
            if name == "language_model.model.embed_tokens.weight" {
                return TextLayout::Legacy;
            }
        }
        TextLayout::Plain
    }

    /// A tensor's name in the checkpoint, from Temper's name (`model.norm.weight`, `lm_head.weight`).
    pub fn checkpoint_name(self, name: &str) -> String {
        match (self, name.strip_prefix("model.")) {
            (TextLayout::Plain, _) => name.to_string(),
            (TextLayout::Nested, Some(rest)) => format!("{NESTED}{rest}"),
            (TextLayout::Legacy, Some(rest)) => format!("{LEGACY}{rest}"),
            (TextLayout::Nested, None) => name.to_string(),
            (TextLayout::Legacy, None) => format!("language_model.{name}"),
        }
    }
}

/// The module name PEFT uses (after `base_model.model.`): a composite model's decoder modules are
/// `model.language_model.*`, its head `lm_head`.
pub fn peft_module(name: &str, composite: bool) -> String {
    peft_module_in(name, composite, false)
}

/// [`peft_module`] for a composite model whose live transformers class keeps its decoder at
/// `language_model.model.*` and its head at `language_model.lm_head` (`legacy`: Llama 4's
/// `Llama4ForConditionalGeneration`).
pub fn peft_module_in(name: &str, composite: bool, legacy: bool) -> String {
    match name.strip_prefix("model.") {
        Some(rest) if composite && legacy => format!("{LEGACY}{rest}"),
        Some(rest) if composite => format!("{NESTED}{rest}"),
        None if composite && legacy => format!("language_model.{name}"),
        _ => name.to_string(),
    }
}

/// Whether transformers 5.25 names this vision-language family's decoder `language_model.model.*`
/// in the live model (and so in PEFT's keys): Llama 4. The others are `model.language_model.*`.
pub fn legacy_live_names(composite: Option<&str>) -> bool {
    composite == Some("llama4")
}

/// Whether a PEFT module name is in the `language_model.model.*` layout.
pub fn is_legacy_name(name: &str) -> bool {
    name.starts_with(LEGACY) || name.starts_with(LEGACY_HEAD)
}

/// Temper's module name for a name found in an adapter or a checkpoint, either layout; and
/// whether it was a composite model's name.
pub fn internal_module(name: &str) -> (String, bool) {
    if let Some(rest) = name.strip_prefix(NESTED).or_else(|| name.strip_prefix(LEGACY)) {
        return (format!("model.{rest}"), true);
    }
    if let Some(rest) = name.strip_prefix(LEGACY_HEAD) {
        return (format!("lm_head{rest}"), true);
    }
    (name.to_string(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_every_layout() {
        for (layout, layer, head) in [
            (TextLayout::Plain, "model.layers.3.mlp.up_proj.weight", "lm_head.weight"),
            (TextLayout::Nested, "model.language_model.layers.3.mlp.up_proj.weight", "lm_head.weight"),
            (TextLayout::Legacy, "language_model.model.layers.3.mlp.up_proj.weight", "language_model.lm_head.weight"),
        ] {
            assert_eq!(layout.checkpoint_name("model.layers.3.mlp.up_proj.weight"), layer);
            assert_eq!(layout.checkpoint_name("lm_head.weight"), head);
            assert_eq!(internal_module(layer).0, "model.layers.3.mlp.up_proj.weight");
            assert_eq!(internal_module(head).0, "lm_head.weight");
            assert_eq!(internal_module(layer).1, layout != TextLayout::Plain);
        }
        let names = ["vision_tower.x".to_string(), "language_model.model.embed_tokens.weight".to_string()];
        assert_eq!(TextLayout::detect(&names), TextLayout::Legacy);
        assert_eq!(
            peft_module("model.layers.0.self_attn.q_proj", true),
            "model.language_model.layers.0.self_attn.q_proj"
        );
        assert_eq!(peft_module("lm_head", true), "lm_head");
        assert_eq!(peft_module("model.layers.0.self_attn.q_proj", false), "model.layers.0.self_attn.q_proj");
    }
}
