//! Hugging Face decoder models on Burn: config, weights, the decoder, generation.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod delta_net;
pub mod generate;
pub mod license;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod names;
pub mod norm;
pub mod rope;
pub mod weights;

use std::path::Path;

use burn::tensor::{backend::Backend, DType};
use safetensors::Dtype;

pub use config::{DecoderConfig, HfConfig};
pub use decoder::{CausalLm, KvCache};
pub use weights::{Checkpoint, WeightSource};

use crate::Result;

/// Which dtype the frozen base weights are held in on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPrecision {
    /// Upcast everything to f32 (CPU, and any backend without half support).
    F32,
    /// Keep bf16 / f16 checkpoints as they are (CUDA); f32 checkpoints stay f32.
    Native,
    /// Hold weights in f16 whatever the checkpoint stores (wgpu, which has no bf16).
    F16,
    /// Hold weights in bf16 whatever the checkpoint stores (CUDA training).
    Bf16,
}

impl WeightPrecision {
    /// The dtype to hold a checkpoint stored as `stored` in.
    pub fn resolve(self, stored: Option<Dtype>) -> DType {
        match (self, stored) {
            (WeightPrecision::Native, Some(Dtype::BF16)) => DType::BF16,
            (WeightPrecision::Native, Some(Dtype::F16)) => DType::F16,
            (WeightPrecision::F16, _) => DType::F16,
            (WeightPrecision::Bf16, _) => DType::BF16,
            _ => DType::F32,
        }
    }
}

/// A loaded model folder: parsed config and the model on `device`.
pub struct LoadedModel<B: Backend> {
    pub hf_config: HfConfig,
    pub model: CausalLm<B>,
}

/// Load the model in a Hugging Face folder (config.json + safetensors).
pub fn load_model<B: Backend>(dir: &Path, precision: WeightPrecision, device: &B::Device) -> Result<LoadedModel<B>> {
    load_model_4bit(dir, precision, None, device)
}

/// [`load_model`], with the decoder projections quantized to `load_in_4bit` as they are read
/// (QLoRA on an unquantized checkpoint; a bitsandbytes 4-bit checkpoint is 4-bit either way).
pub fn load_model_4bit<B: Backend>(
    dir: &Path,
    precision: WeightPrecision,
    load_in_4bit: Option<crate::quant::LoadIn4Bit>,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    load_model_with(dir, precision, load_in_4bit, true, device)
}

/// [`load_model_4bit`], choosing what becomes of an FP8 checkpoint's projections: kept in 8 bits
/// on the device and dequantized block by block in each forward and backward (`keep_fp8`, one
/// byte per weight), or dequantized to the model's dtype as they load.
pub fn load_model_with<B: Backend>(
    dir: &Path,
    precision: WeightPrecision,
    load_in_4bit: Option<crate::quant::LoadIn4Bit>,
    keep_fp8: bool,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let (hf_config, cfg) = DecoderConfig::from_model_dir(dir)?;
    let mut checkpoint = Checkpoint::open(dir)?;
    checkpoint.quantize_on_load(load_in_4bit);
    checkpoint.keep_fp8(keep_fp8);
    let dtype = precision.resolve(checkpoint.dominant_dtype());
    let mut source = WeightSource::Checkpoint(checkpoint);
    let model = CausalLm::load(&cfg, &mut source, dtype, device)?;
    Ok(LoadedModel { hf_config, model })
}
