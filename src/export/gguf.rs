//! A PEFT adapter as a llama.cpp LoRA GGUF (what `convert_lora_to_gguf.py` writes), without
//! Python: GGUF v3, `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
//! tensors `blk.{i}.<gguf name>.weight.lora_a` / `.lora_b` (A stored `[r, in]`, GGUF dims
//! `[in, r]`; B `[out, r]`, dims `[r, out]`), Llama/Mistral q and k rows permuted into
//! llama.cpp's RoPE layout as the converter does for the base weights.
//!
//! llama.cpp scales every tensor pair by alpha / rank(pair) with one alpha. Where the adapter's
//! own scaling differs (rsLoRA, alpha_pattern), the ratio is folded into B so the GGUF applies
//! exactly PEFT's scaling (the converter ignores both and under-scales those adapters).
//!
//! The Gated DeltaNet hybrids (`qwen35`, `qwen35moe`, `qwen3next`) get the converter's row and
//! column rewrites of their base weights ([`crate::export::gguf_delta_net`]).

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::export::atomic::write_file_atomically;
use crate::export::gguf_delta_net::{rewrite, take_cols, take_rows, DeltaNetDims};
use crate::export::peft::Adapter;
use crate::{Error, Result};

const ALIGN: usize = 32;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_STRING: u32 = 8;

/// Tensor storage type in the GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
}

/// llama.cpp's architecture name and whether q/k rows are permuted for RoPE.
///
/// The Gated DeltaNet hybrids are the classes of llama.cpp's `conversion/qwen.py`:
/// `Qwen3_5TextModel` (`Qwen3_5ForCausalLM`, `Qwen3_5ForConditionalGeneration`) writes `qwen35`,
/// `Qwen3_5MoeTextModel` `qwen35moe`, `Qwen3NextModel` `qwen3next`; none permutes q/k.
pub fn architecture(model_type: &str) -> Option<(&'static str, bool)> {
    Some(match model_type {
        "llama" | "mistral" => ("llama", true),
        "qwen2" => ("qwen2", false),
        "qwen3" => ("qwen3", false),
        "phi3" => ("phi3", false),
        "gemma" => ("gemma", false),
        "gemma2" => ("gemma2", false),
        "qwen3_5_text" | "qwen3_5" => ("qwen35", false),
        "qwen3_5_moe_text" | "qwen3_5_moe" => ("qwen35moe", false),
        "qwen3_next" => ("qwen3next", false),
        _ => return None,
    })
}

/// `model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight`, for any architecture; see
/// [`tensor_names`] for what one architecture holds.
pub fn tensor_name(module: &str) -> Option<String> {
    if module == "lm_head" {
        return Some("output.weight".into());
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, path) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let name = match path {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // gguf-py's tensor names for the Gated DeltaNet and the shared expert.
        "linear_attn.in_proj_qkv" => "attn_qkv",
        "linear_attn.in_proj_z" => "attn_gate",
        "linear_attn.in_proj_b" => "ssm_beta",
        "linear_attn.in_proj_a" => "ssm_alpha",
        "linear_attn.in_proj_ba" => "ssm_ba",
        "linear_attn.out_proj" => "ssm_out",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.weight"))
}

/// The GGUF tensors a module's delta lands in for llama.cpp architecture `arch`, or `None`
/// where that architecture has no such tensor. Qwen3-Next's grouped `in_proj_qkvz` becomes two,
/// `attn_qkv` and `attn_gate` (the converter splits it); Qwen 3.5 has no `in_proj_qkvz` /
/// `in_proj_ba` (vLLM's packed names, not the checkpoint's) and Qwen3-Next no separate
/// `in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a`.
pub fn tensor_names(arch: &str, module: &str) -> Option<Vec<String>> {
    let qwen35 = matches!(arch, "qwen35" | "qwen35moe");
    let last = module.rsplit('.').next().unwrap_or(module);
    match last {
        "in_proj_qkvz" if arch == "qwen3next" => {
            let layer = module.strip_prefix("model.layers.")?.split_once('.')?.0;
            Some(vec![format!("blk.{layer}.attn_qkv.weight"), format!("blk.{layer}.attn_gate.weight")])
        }
        "in_proj_qkvz" => None,
        "in_proj_ba" if arch != "qwen3next" => None,
        "in_proj_qkv" | "in_proj_z" | "in_proj_b" | "in_proj_a" if !qwen35 => None,
        _ if module.contains(".shared_expert.") && !(qwen35 || arch == "qwen3next") => None,
        _ => tensor_name(module).map(|n| vec![n]),
    }
}

/// The converter's `LlamaModel.permute` on the rows of a row-major `[out, cols]` matrix.
fn permute_rows(data: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    let out = data.len() / cols;
    let half = out / heads / 2;
    let mut res = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = h * 2 * half + j * half + i;
                let dst = h * 2 * half + i * 2 + j;
                res[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    res
}

/// Write `adapter` (trained on the model whose `config.json` is in `base`) as a GGUF LoRA.
pub fn write_gguf(adapter: &Adapter, base: &Path, out: &Path, ty: GgufType) -> Result<()> {
    let bytes = gguf_file_bytes(adapter, base, ty)?;
    write_file_atomically(out, &bytes)
}

/// The GGUF LoRA file's bytes for `adapter` on the model whose `config.json` is in `base`.
pub fn gguf_file_bytes(adapter: &Adapter, base: &Path, ty: GgufType) -> Result<Vec<u8>> {
    let cfg_path = base.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
    let model_type = cfg["model_type"].as_str().unwrap_or_default();
    let (arch, permute) = architecture(model_type).ok_or_else(|| Error::Unsupported {
        path: cfg_path.clone(),
        key: "model_type".into(),
        value: format!("{model_type:?}"),
        reason: "GGUF export supports llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, qwen3_5(_text), qwen3_5_moe(_text) and qwen3_next".into(),
    })?;
    // A vision-language wrapper keeps the decoder's settings in text_config.
    let text = cfg.get("text_config").filter(|t| t.is_object()).unwrap_or(&cfg);
    let heads = text["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let kv_heads = text["num_key_value_heads"].as_u64().map_or(heads, |k| k as usize);
    let delta_net = DeltaNetDims::from_config(&cfg);
    let alpha = adapter.config.lora_alpha;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (module, pair) in &adapter.modules {
        let names = tensor_names(arch, module).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "adapter module `{module}` has no tensor in llama.cpp's {arch} GGUF (model_type {model_type:?})"
            ))
        })?;
        let (r, d_in) = (pair.a.shape[0], pair.a.shape[1]);
        let fold = adapter.config.scaling(module) * r as f64 / alpha;
        let mut b = pair.b.data.clone();
        if (fold - 1.0).abs() > 1e-12 {
            b.iter_mut().for_each(|x| *x = (*x as f64 * fold) as f32);
        }
        if permute && module.ends_with("self_attn.q_proj") {
            b = permute_rows(&b, r, heads);
        } else if permute && module.ends_with("self_attn.k_proj") {
            b = permute_rows(&b, r, kv_heads);
        }
        // The converter's DeltaNet rewrites: B's rows per GGUF tensor, A's columns.
        let rw = rewrite(arch, delta_net, module);
        let a = rw.a_cols.as_ref().map_or_else(|| pair.a.data.clone(), |order| take_cols(&pair.a.data, order));
        for (name, rows) in names.iter().zip(&rw.b_rows) {
            let b = rows.as_ref().map_or_else(|| b.clone(), |rows| take_rows(&b, r, rows));
            tensors.push((format!("{name}.lora_a"), vec![d_in, r], a.clone()));
            tensors.push((format!("{name}.lora_b"), vec![r, b.len() / r.max(1)], b));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(gguf_bytes(arch, alpha as f32, &tensors, ty))
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn kv_str(buf: &mut Vec<u8>, k: &str, v: &str) {
    put_str(buf, k);
    buf.extend_from_slice(&T_STRING.to_le_bytes());
    put_str(buf, v);
}

fn gguf_bytes(arch: &str, alpha: f32, tensors: &[(String, Vec<usize>, Vec<f32>)], ty: GgufType) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(b"GGUF");
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&6u64.to_le_bytes());
    kv_str(&mut buf, "general.architecture", arch);
    kv_str(&mut buf, "general.type", "adapter");
    kv_str(&mut buf, "adapter.type", "lora");
    kv_str(&mut buf, "general.name", "Adapter");
    put_str(&mut buf, "adapter.lora.alpha");
    buf.extend_from_slice(&T_F32.to_le_bytes());
    buf.extend_from_slice(&alpha.to_le_bytes());
    put_str(&mut buf, "general.quantization_version");
    buf.extend_from_slice(&T_U32.to_le_bytes());
    buf.extend_from_slice(&2u32.to_le_bytes());
    let (ggml_type, width) = match ty {
        GgufType::F32 => (0u32, 4usize),
        GgufType::F16 => (1u32, 2usize),
    };
    let mut offset = 0usize;
    for (name, dims, data) in tensors {
        put_str(&mut buf, name);
        buf.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            buf.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&ggml_type.to_le_bytes());
        buf.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += (data.len() * width).next_multiple_of(ALIGN);
    }
    buf.resize(buf.len().next_multiple_of(ALIGN), 0);
    for (_, _, data) in tensors {
        for &x in data {
            let _ = match ty {
                GgufType::F32 => buf.write_all(&x.to_le_bytes()),
                GgufType::F16 => buf.write_all(&half::f16::from_f32(x).to_le_bytes()),
            };
        }
        buf.resize(buf.len().next_multiple_of(ALIGN), 0);
    }
    buf
}
