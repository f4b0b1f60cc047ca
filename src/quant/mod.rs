//! 4-bit weights as bitsandbytes stores them (QLoRA, issue 10): the NF4 and FP4 code books,
//! blockwise absmax quantization and dequantization, bit-identical with
//! `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (0.50, CPU).

pub mod bnb;
pub mod device;
pub mod nf4;

pub use bnb::{bnb_4bit_weights, is_bnb_4bit, read_bnb_4bit, Bnb4BitEntry, Bnb4BitWeight};
pub use nf4::{dequantize_4bit, quantize_4bit, FourBit, Quantized4Bit};
