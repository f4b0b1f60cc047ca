//! 4-bit weights as bitsandbytes checkpoints store them (`quantization_config.quant_method:
//! bitsandbytes`, `load_in_4bit`; the `unsloth/*-bnb-4bit` uploads): for a projection `P`,
//! - `P.weight`: the packed codes, u8 `[n / 2, 1]`;
//! - `P.weight.absmax`: f32 per block, or with double quantization u8 codes of the absmax, with
//!   `P.weight.nested_absmax` (f32 per 256 blocks) and `P.weight.nested_quant_map` (256 f32);
//! - `P.weight.quant_map`: the 16-value code book;
//! - `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): u8 bytes of a JSON object with
//!   `quant_type`, `blocksize`, `dtype`, `shape`, and for double quantization
//!   `nested_blocksize` and `nested_offset`.
//!
//! A nested absmax is dequantized as bitsandbytes does: `nested_quant_map[q] *
//! nested_absmax[i / nested_blocksize] + nested_offset`, in f32.

use std::path::Path;

use safetensors::Dtype;
use serde::Deserialize;

use crate::model::Checkpoint;
use crate::quant::nf4::{FourBit, Quantized4Bit};
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    shape: Vec<usize>,
    #[serde(default)]
    nested_blocksize: Option<usize>,
    #[serde(default)]
    nested_offset: Option<f32>,
    /// The dtype the weight was quantized from (`float32`, `bfloat16`, ...).
    #[serde(default)]
    dtype: Option<String>,
}

/// The tensors besides the codes that make up a 4-bit weight (`<name>.<suffix>`).
const PARTS: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

/// A 4-bit weight of a bitsandbytes checkpoint, as its quant state describes it (no tensor data
/// read).
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4BitEntry {
    /// `model.layers.0.mlp.up_proj.weight`: the packed codes.
    pub name: String,
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// The dtype it was quantized from, as the quant state names it (`bfloat16`, ...).
    pub dtype: Option<String>,
    /// Its other tensors: absmax, code books, the quant state (those present or not).
    pub parts: Vec<String>,
}

/// Every 4-bit weight of a bitsandbytes checkpoint (none for any other checkpoint).
pub fn bnb_4bit_weights(ckpt: &Checkpoint) -> Result<Vec<Bnb4BitEntry>> {
    let path = ckpt.dir().to_path_buf();
    let mut names: Vec<&String> = ckpt.tensor_names().filter(|n| n.contains(".quant_state.bitsandbytes__")).collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|state| state.split_once(".quant_state.").map(|(weight, _)| weight.to_string()))
        .map(|name| {
            let (_, state_name, state) = quant_state(ckpt, &path, &name)?;
            if state.shape.len() != 2 {
                return Err(Error::InvalidConfig {
                    path: path.clone(),
                    key: state_name,
                    reason: format!("gives shape {:?} (expected [out, in])", state.shape),
                });
            }
            let mut parts: Vec<String> = PARTS.iter().map(|p| format!("{name}.{p}")).collect();
            parts.push(state_name);
            Ok(Bnb4BitEntry { name, shape: state.shape, dtype: state.dtype, parts })
        })
        .collect()
}

/// Whether the checkpoint stores `name` as a bitsandbytes 4-bit weight.
pub fn is_bnb_4bit(ckpt: &Checkpoint, name: &str) -> bool {
    state_tensor(ckpt, name).is_some()
}

/// The format and the quant-state tensor of the 4-bit weight `name`, if it is one.
fn state_tensor(ckpt: &Checkpoint, name: &str) -> Option<(FourBit, String)> {
    [FourBit::Nf4, FourBit::Fp4]
        .into_iter()
        .map(|k| (k, format!("{name}.quant_state.bitsandbytes__{}", k.name())))
        .find(|(_, s)| ckpt.contains(s))
}

/// The quant state of the 4-bit weight `name`: its format, its tensor's name and its contents.
fn quant_state(ckpt: &Checkpoint, path: &Path, name: &str) -> Result<(FourBit, String, QuantStateJson)> {
    let (kind, state_name) = state_tensor(ckpt, name).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: format!("{name}.quant_state.bitsandbytes__nf4"),
        hint: " (or __fp4: the quant state of a bitsandbytes 4-bit weight)".into(),
    })?;
    let (_, _, state_bytes) = raw(ckpt, path, &state_name, Dtype::U8)?;
    let state: QuantStateJson = serde_json::from_slice(state_bytes).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        key: state_name.clone(),
        reason: format!("is not a bitsandbytes quant state: {e}"),
    })?;
    Ok((kind, state_name, state))
}

/// A bitsandbytes 4-bit weight read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4BitWeight {
    pub quantized: Quantized4Bit,
    /// `[out, in]`, as the quant state gives it.
    pub shape: Vec<usize>,
    /// Whether its absmax was itself quantized (double quantization).
    pub double_quant: bool,
}

/// Read the 4-bit weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`), checking its quant
/// state against the tensors and against `expected` (`[out, in]` from the model's config).
pub fn read_bnb_4bit(ckpt: &Checkpoint, name: &str, expected: [usize; 2]) -> Result<Bnb4BitWeight> {
    let path = ckpt.dir().to_path_buf();
    let bad =
        |tensor: &str, reason: String| Error::InvalidConfig { path: path.clone(), key: tensor.to_string(), reason };
    let (kind, state_name, state) = quant_state(ckpt, &path, name)?;
    if state.quant_type != kind.name() {
        return Err(bad(&state_name, format!("says quant_type {:?} under a {} name", state.quant_type, kind.name())));
    }
    if state.shape != expected {
        return Err(Error::TensorShape {
            path: path.clone(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            actual: state.shape,
        });
    }
    let n: usize = expected.iter().product();
    let bs = state.blocksize;
    if bs == 0 || !bs.is_power_of_two() {
        return Err(bad(&state_name, format!("blocksize {bs} is not a power of two")));
    }
    let blocks = n.div_ceil(bs);
    let (_, packed_shape, packed) = raw(ckpt, &path, name, Dtype::U8)?;
    if packed.len() != n.div_ceil(2) {
        return Err(bad(
            name,
            format!(
                "holds {} bytes ({packed_shape:?}) but a {expected:?} 4-bit weight needs {}",
                packed.len(),
                n.div_ceil(2)
            ),
        ));
    }
    let code_name = format!("{name}.quant_map");
    // bitsandbytes dequantizes with its own code book; the stored copy (f32, or rounded to
    // 16 bits) only has to be that book.
    let code = floats(ckpt, &path, &code_name)?;
    if code.len() != 16 || code.iter().zip(kind.code()).any(|(a, b)| (a - b).abs() > 4e-3) {
        return Err(bad(&code_name, format!("is not bitsandbytes' {} code book", kind.name())));
    }
    let absmax_name = format!("{name}.absmax");
    let double_quant = state.nested_blocksize.is_some();
    let mut nested = None;
    let absmax = if double_quant {
        let (_, _, q) = raw(ckpt, &path, &absmax_name, Dtype::U8)?;
        let nbs = state.nested_blocksize.unwrap_or(256);
        let offset =
            state.nested_offset.ok_or_else(|| bad(&state_name, "has nested_blocksize but no nested_offset".into()))?;
        let nested_absmax = floats(ckpt, &path, &format!("{name}.nested_absmax"))?;
        let nested_code = floats(ckpt, &path, &format!("{name}.nested_quant_map"))?;
        if nbs == 0 || nested_code.len() != 256 || nested_absmax.len() != q.len().div_ceil(nbs) {
            return Err(bad(
                &format!("{name}.nested_absmax"),
                format!(
                    "{} values and a {}-entry code book do not fit {} absmax codes in blocks of {nbs}",
                    nested_absmax.len(),
                    nested_code.len(),
                    q.len()
                ),
            ));
        }
        let values: Vec<f32> =
            q.iter().enumerate().map(|(i, &c)| nested_code[c as usize] * nested_absmax[i / nbs] + offset).collect();
        // The device keeps the 8-bit form when the checkpoint's is the standard one.
        let standard = nbs == crate::quant::double::NESTED_BLOCKSIZE
            && nested_code.iter().zip(crate::quant::double::dynamic_map()).all(|(a, b)| a.to_bits() == b.to_bits());
        nested = standard.then(|| crate::quant::NestedAbsmax {
            codes: q.to_vec(),
            nested_absmax: nested_absmax.clone(),
            offset,
        });
        values
    } else {
        // f32, or bf16 / f16 (bitsandbytes upcasts it to f32 before use).
        floats(ckpt, &path, &absmax_name)?
    };
    if absmax.len() != blocks {
        return Err(bad(
            &absmax_name,
            format!("has {} blocks; {n} values in blocks of {bs} need {blocks}", absmax.len()),
        ));
    }
    Ok(Bnb4BitWeight {
        quantized: Quantized4Bit { packed: packed.to_vec(), absmax, blocksize: bs, kind, len: n, nested },
        shape: expected.to_vec(),
        double_quant,
    })
}

fn raw<'a>(ckpt: &'a Checkpoint, path: &Path, name: &str, dtype: Dtype) -> Result<(Dtype, Vec<usize>, &'a [u8])> {
    let (d, shape, bytes) = ckpt.raw(name).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        hint: " (part of a bitsandbytes 4-bit weight)".into(),
    })?;
    if d != dtype {
        return Err(Error::TensorDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("{d:?} (expected {dtype:?})"),
        });
    }
    Ok((d, shape, bytes))
}

/// A float tensor (f32, bf16 or f16) as f32.
fn floats(ckpt: &Checkpoint, path: &Path, name: &str) -> Result<Vec<f32>> {
    let (d, _, bytes) = ckpt.raw(name).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        hint: " (part of a bitsandbytes 4-bit weight)".into(),
    })?;
    crate::export::shard::bytes_to_f32(d, bytes).ok_or_else(|| Error::TensorDtype {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: format!("{d:?} (expected a float tensor)"),
    })
}
