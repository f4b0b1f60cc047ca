//! 4-bit weights as bitsandbytes stores them (QLoRA, issue 10): the NF4 and FP4 code books,
//! blockwise absmax quantization and dequantization, bit-identical with
//! `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (0.50, CPU).

pub mod bnb;
pub mod device;
pub mod double;
pub mod fp8;
pub mod mxfp4;
pub mod nf4;

pub use bnb::{bnb_4bit_weights, is_bnb_4bit, read_bnb_4bit, Bnb4BitEntry, Bnb4BitWeight};
pub use double::{quantize_absmax, NestedAbsmax};
pub use nf4::{dequantize_4bit, quantize_4bit, FourBit, Quantized4Bit};

/// How to quantize an unquantized checkpoint as it loads (`--load-in-4bit`, a recipe's
/// `quantization`): bitsandbytes' defaults, blocks of 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadIn4Bit {
    pub kind: FourBit,
    /// bitsandbytes' `bnb_4bit_use_double_quant`: the absmax values quantized to 8 bits too.
    pub double_quant: bool,
}

impl LoadIn4Bit {
    /// Quantize a weight (flattened row-major, f32). With double quantization the returned
    /// absmax are the dequantized 8-bit ones, the values bitsandbytes computes with.
    pub fn quantize(self, values: &[f32]) -> Quantized4Bit {
        let mut q = quantize_4bit(values, 64, self.kind);
        if self.double_quant {
            let nested = quantize_absmax(&q.absmax);
            q.absmax = nested.dequantize();
            q.nested = Some(nested);
        }
        q
    }

    /// `nf4`, `nf4 + double quantization`, ...
    pub fn describe(self) -> String {
        if self.double_quant {
            format!("{} with double quantization", self.kind.name())
        } else {
            self.kind.name().to_string()
        }
    }
}
