//! bitsandbytes' 4-bit formats, on the host.
//!
//! As bitsandbytes 0.50 computes them (`backends/default/ops.py`, which the CPU backend uses for
//! `quantize_4bit`): the flattened weight in f32 is cut into blocks of `blocksize` values (the
//! last block may be shorter); each block's absmax is its largest |x|; a full block is scaled by
//! `x * (1 / absmax)` (the reciprocal first, in f32), the short last block by `x / absmax`; the
//! scaled value, clamped to [-1, 1], gets the code whose interval between midpoints holds it
//! (`torch.bucketize`: the number of midpoints strictly below it), FP4 through the code book's
//! sort order. Two codes per byte, the first in the high nibble; an odd count is padded with a
//! zero. Dequantization is `code[q] * absmax` in f32.

/// A 4-bit format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    /// NormalFloat 4 (QLoRA's quantiles of a normal distribution).
    Nf4,
    /// bitsandbytes' 4-bit float.
    Fp4,
}

/// `bitsandbytes.functional.get_4bit_type("nf4")`, in f32.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// `get_4bit_type("fp4")`: sign bit, two exponent bits, one mantissa bit, normalised by 1/6.
#[allow(clippy::excessive_precision)]
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
];

/// `torch.argsort(FP4_CODE)` as bitsandbytes gets it (its two zeros in this order).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

impl FourBit {
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBit::Nf4 => &NF4_CODE,
            FourBit::Fp4 => &FP4_CODE,
        }
    }

    /// The format a `quant_type` string names (`nf4`, `fp4`).
    pub fn from_name(name: &str) -> Option<Self> {
        [FourBit::Nf4, FourBit::Fp4].into_iter().find(|k| k.name() == name)
    }

    /// The `quant_type` string bitsandbytes and transformers use.
    pub fn name(self) -> &'static str {
        match self {
            FourBit::Nf4 => "nf4",
            FourBit::Fp4 => "fp4",
        }
    }

    fn order(self) -> [u8; 16] {
        match self {
            FourBit::Nf4 => std::array::from_fn(|i| i as u8),
            FourBit::Fp4 => FP4_ORDER,
        }
    }

    /// The 15 midpoints between the sorted codes, computed in f32 as bitsandbytes does.
    fn bounds(self) -> [f32; 15] {
        let (code, order) = (self.code(), self.order());
        std::array::from_fn(|k| (code[order[k] as usize] + code[order[k + 1] as usize]) / 2.0)
    }
}

/// A quantized weight: packed codes (`ceil(n / 2)` bytes) and one absmax per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4Bit {
    pub packed: Vec<u8>,
    pub absmax: Vec<f32>,
    pub blocksize: usize,
    pub kind: FourBit,
    /// Number of values (the weight's element count).
    pub len: usize,
    /// Double quantization: the 8-bit form of `absmax` (which then holds its dequantized values,
    /// what bitsandbytes computes with); the device keeps this form.
    pub nested: Option<crate::quant::NestedAbsmax>,
}

/// Quantize `values` (a weight flattened row-major, already in f32) in blocks of `blocksize`.
pub fn quantize_4bit(values: &[f32], blocksize: usize, kind: FourBit) -> Quantized4Bit {
    let blocksize = blocksize.max(1);
    let bounds = kind.bounds();
    let order = kind.order();
    let encode = |x: f32| -> u8 {
        let q = bounds.iter().take_while(|&&b| b < x).count();
        order[q]
    };
    let n = values.len();
    let full = n - n % blocksize;
    let mut codes: Vec<u8> = Vec::with_capacity(n + 1);
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for block in values[..full].chunks(blocksize) {
        let am = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let inv = 1.0 / am.max(1e-38);
        codes.extend(block.iter().map(|&x| encode((x * inv).clamp(-1.0, 1.0))));
        absmax.push(am);
    }
    if full < n {
        let rest = &values[full..];
        let am = rest.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-38);
        codes.extend(rest.iter().map(|&x| encode((x / am).clamp(-1.0, 1.0))));
        absmax.push(am);
    }
    if codes.len() % 2 == 1 {
        codes.push(encode(0.0));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    Quantized4Bit { packed, absmax, blocksize, kind, len: n, nested: None }
}

/// `code[q] * absmax[block]` in f32 for every value.
pub fn dequantize_4bit(q: &Quantized4Bit) -> Vec<f32> {
    let code = q.kind.code();
    (0..q.len)
        .map(|i| {
            let byte = q.packed[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            code[nibble as usize] * q.absmax[i / q.blocksize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_bounds_are_bitsandbytes_midpoints() {
        // Midpoints as bitsandbytes prints them (nf4: 15; fp4 has an exact 0.0 between its zeros).
        assert_eq!(FourBit::Nf4.bounds()[0], -0.848_096_4);
        assert_eq!(FourBit::Fp4.bounds()[7], 0.0);
        for kind in [FourBit::Nf4, FourBit::Fp4] {
            let values: Vec<f32> = kind.code().iter().map(|c| c * 3.0).collect();
            let q = quantize_4bit(&values, 16, kind);
            let back = dequantize_4bit(&q);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= 1e-6 || (*a == 0.0 && b.abs() == 0.0), "{kind:?}: {a} -> {b}");
            }
        }
    }
}
