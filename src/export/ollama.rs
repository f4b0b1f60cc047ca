//! An adapter for Ollama: the llama.cpp LoRA GGUF plus a `Modelfile` (Ollama's documented
//! format: `FROM`, `ADAPTER`, `TEMPLATE`, `PARAMETER stop`). The chat template is translated to
//! Ollama's Go template for the turn formats Temper knows (recognised from the Hugging Face
//! template's markers); for any other, no `TEMPLATE` is written and Ollama keeps the base's.

use std::path::Path;

use crate::export::atomic::{write_dir_atomically, WriteMode};
use crate::export::gguf::{gguf_file_bytes, GgufType};
use crate::export::peft::Adapter;
use crate::{Error, Result};

/// A chat format with a known Ollama template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// Llama 3: `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`.
    Llama3,
    /// ChatML (Qwen, OLMo 3, SmolLM): `<|im_start|>role\n...<|im_end|>\n`.
    ChatMl,
    /// Gemma: `<start_of_turn>user|model\n...<end_of_turn>\n`, the system text in the first user turn.
    Gemma,
    /// Phi-3 / Phi-4-mini: `<|role|>...<|end|>` (Phi-3 puts a newline after each marker).
    Phi { newline: bool },
    /// Mistral Small 3.x / Tekken V7: `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]answer</s>`.
    Mistral,
}

impl ChatFormat {
    /// Recognise the format from a Hugging Face chat template's text. Conservative: templates
    /// that add text of their own around the turns (OLMo 3's function-calling system prompt,
    /// the older Mistral `[INST]` variants' spacing) are not translated.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<|start_header_id|>") {
            Some(ChatFormat::Llama3)
        } else if template.contains("<|im_start|>") && !template.contains("<functions>") {
            Some(ChatFormat::ChatMl)
        } else if template.contains("<start_of_turn>") {
            Some(ChatFormat::Gemma)
        } else if template.contains("<|end|>") && template.contains("<|assistant|>") {
            Some(ChatFormat::Phi { newline: template.contains("'|>' + '\\n'") || template.contains("|>\\n") })
        } else if template.contains("[INST]") && template.contains("[SYSTEM_PROMPT]") {
            Some(ChatFormat::Mistral)
        } else {
            None
        }
    }

    /// Ollama's Go template for this format: `.Messages` rendered turn by turn, ending with the
    /// assistant's header, as `add_generation_prompt` does.
    pub fn ollama_template(self) -> &'static str {
        match self {
            ChatFormat::Llama3 => concat!(
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n",
                "{{ .Content }}<|eot_id|>\n",
                "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            ChatFormat::ChatMl => concat!(
                "{{- range .Messages }}<|im_start|>{{ .Role }}\n",
                "{{ .Content }}<|im_end|>\n",
                "{{ end }}<|im_start|>assistant\n",
            ),
            ChatFormat::Gemma => concat!(
                "{{- $system := \"\" }}{{- range .Messages }}",
                "{{- if eq .Role \"system\" }}{{ $system = printf \"%s\\n\\n\" .Content }}",
                "{{- else if eq .Role \"user\" }}<start_of_turn>user\n{{ $system }}{{ .Content }}<end_of_turn>\n{{ $system = \"\" }}",
                "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n",
                "{{ end }}{{- end }}<start_of_turn>model\n",
            ),
            ChatFormat::Phi { newline: true } => concat!(
                "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n",
                "{{ end }}<|assistant|>\n",
            ),
            ChatFormat::Phi { newline: false } => concat!(
                "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>",
                "{{- end }}<|assistant|>",
            ),
            ChatFormat::Mistral => concat!(
                "{{- range .Messages }}",
                "{{- if eq .Role \"system\" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]",
                "{{- else if eq .Role \"user\" }}[INST]{{ .Content }}[/INST]",
                "{{- else if eq .Role \"assistant\" }}{{ .Content }}</s>",
                "{{- end }}{{- end }}",
            ),
        }
    }

    /// The markers that end a turn (Ollama's `PARAMETER stop`).
    pub fn stops(self) -> &'static [&'static str] {
        match self {
            ChatFormat::Llama3 => &["<|eot_id|>", "<|start_header_id|>"],
            ChatFormat::ChatMl => &["<|im_end|>", "<|im_start|>"],
            ChatFormat::Gemma => &["<end_of_turn>", "<start_of_turn>"],
            ChatFormat::Phi { .. } => &["<|end|>", "<|user|>", "<|assistant|>"],
            ChatFormat::Mistral => &["[INST]", "</s>"],
        }
    }
}

/// What goes into the Modelfile besides the adapter.
#[derive(Debug, Clone)]
pub struct OllamaOptions<'a> {
    /// `FROM`: an Ollama model name (`llama3.2:1b`) or a base GGUF file.
    pub from: &'a str,
    /// The base's chat template (tokenizer_config.json), if it has one.
    pub chat_template: Option<&'a str>,
    /// The tokenizer's end-of-sequence token, added to the stop list.
    pub eos_token: Option<&'a str>,
    pub gguf_type: GgufType,
}

/// The Modelfile text, and the format its template was translated from.
pub fn modelfile(opts: &OllamaOptions) -> (String, Option<ChatFormat>) {
    let format = opts.chat_template.and_then(ChatFormat::detect);
    let mut out = String::from(
        "# Written by `temper export --format ollama`. Create the model with:\n#   ollama create NAME -f Modelfile\n",
    );
    out.push_str(&format!("FROM {}\nADAPTER ./adapter.gguf\n", opts.from));
    let mut stops: Vec<&str> = Vec::new();
    match format {
        Some(f) => {
            out.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n", f.ollama_template()));
            stops.extend(f.stops());
        }
        None => out.push_str(
            "# No TEMPLATE: the base's chat format is not one Temper translates; Ollama keeps the base model's.\n",
        ),
    }
    if let Some(eos) = opts.eos_token.filter(|e| !e.is_empty() && !stops.contains(e)) {
        stops.push(eos);
    }
    for s in stops {
        out.push_str(&format!("PARAMETER stop \"{}\"\n", s.replace('\\', "\\\\").replace('"', "\\\"")));
    }
    (out, format)
}

/// Write `adapter.gguf` and `Modelfile` into the folder `out`, atomically. `hf_base` is the
/// adapter's base model in the Hugging Face layout (its config.json names the architecture).
pub fn write_ollama(
    adapter: &Adapter,
    hf_base: &Path,
    opts: &OllamaOptions,
    out: &Path,
    mode: WriteMode,
) -> Result<Option<ChatFormat>> {
    if opts.from.trim().is_empty() || opts.from.contains('\n') {
        return Err(Error::InvalidArgument(format!(
            "--base {:?}: expected an Ollama model name or a GGUF file",
            opts.from
        )));
    }
    let gguf = gguf_file_bytes(adapter, hf_base, opts.gguf_type)?;
    let (text, format) = modelfile(opts);
    write_dir_atomically(out, mode, |tmp| {
        std::fs::write(tmp.join("adapter.gguf"), &gguf).map_err(|e| Error::io(tmp.join("adapter.gguf"), e))?;
        std::fs::write(tmp.join("Modelfile"), text.as_bytes()).map_err(|e| Error::io(tmp.join("Modelfile"), e))
    })?;
    Ok(format)
}
