//! FP8 checkpoints as they are uploaded (DeepSeek-V3 / Kimi K2 / Qwen 3.5 FP8, `quant_method:
//! "fp8"`): each projection's weight stored as float8 e4m3fn, and beside it `<name>_scale_inv`, the
//! multiplier that gives the weight back (despite its name it is multiplied, as DeepSeek's
//! `weight_dequant` and transformers' `Fp8Dequantize` do): one per `weight_block_size` block
//! (a `[ceil(rows / bm), ceil(cols / bn)]` grid, the edge blocks partial), or one for the tensor.
//!
//! Dequantized on load: `w[i, j] = f32(q[i, j]) * scale[i / bm, j / bn]` in f32, then cast to the
//! model's dtype, exactly as transformers 5.25's `Fp8Dequantize._dequantize_one` where it accepts
//! the shape (it refuses grids that do not divide the weight; the ceil-div grid is DeepSeek's).

use std::sync::OnceLock;

/// The 256 float8 e4m3fn values (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities, `S.1111.111` is NaN), exactly representable in f32.
fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (byte, v) in t.iter_mut().enumerate() {
            let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
            let exp = ((byte >> 3) & 0xF) as i32;
            let man = (byte & 0x7) as f32;
            *v = if exp == 0xF && byte & 0x7 == 0x7 {
                f32::NAN
            } else if exp == 0 {
                sign * man / 8.0 * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
        }
        t
    })
}

/// The 256 e4m3 values, indexed by the byte (the code book of an FP8 weight kept in 8 bits).
pub fn e4m3_values() -> &'static [f32; 256] {
    e4m3_table()
}

/// How the scales of one FP8 tensor are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Scales {
    /// One scale for the whole tensor.
    PerTensor,
    /// One per `[bm, bn]` block of a 2-D weight.
    Blocks { bm: usize, bn: usize },
}

impl Fp8Scales {
    /// The layout a scale tensor of `scale_shape` gives a weight of `shape`, with the config's
    /// `weight_block_size` if any; `Err` says what does not fit.
    pub fn resolve(shape: &[usize], scale_shape: &[usize], block: Option<[usize; 2]>) -> Result<Self, String> {
        let count: usize = scale_shape.iter().product();
        if count == 1 {
            return Ok(Self::PerTensor);
        }
        let (&[rows, cols], &[gr, gc]) = (shape, scale_shape) else {
            return Err(format!(
                "a scale grid {scale_shape:?} needs a 2-D weight and a 2-D grid (the weight is {shape:?})"
            ));
        };
        let [bm, bn] = match block {
            Some(b) => b,
            // Without weight_block_size, transformers derives the block from a grid that divides
            // the weight.
            None if gr > 0 && gc > 0 && rows % gr == 0 && cols % gc == 0 => [rows / gr, cols / gc],
            None => {
                return Err(format!(
                    "the scale grid {scale_shape:?} does not divide the weight {shape:?} and quantization_config has no weight_block_size"
                ))
            }
        };
        if bm == 0 || bn == 0 || rows.div_ceil(bm) != gr || cols.div_ceil(bn) != gc {
            return Err(format!(
                "the scale grid {scale_shape:?} does not fit a weight {shape:?} in blocks of [{bm}, {bn}] (expected [{}, {}])",
                rows.div_ceil(bm.max(1)),
                cols.div_ceil(bn.max(1))
            ));
        }
        Ok(Self::Blocks { bm, bn })
    }
}

/// The weight in f32: `f32(q) * scale` per element, row-major `[rows, cols]` (`shape` 2-D for
/// block scales; any shape for a per-tensor scale).
pub fn dequantize_e4m3(bytes: &[u8], shape: &[usize], scales: &[f32], layout: Fp8Scales) -> Vec<f32> {
    let table = e4m3_table();
    match layout {
        Fp8Scales::PerTensor => {
            let s = scales.first().copied().unwrap_or(1.0);
            bytes.iter().map(|&b| table[b as usize] * s).collect()
        }
        Fp8Scales::Blocks { bm, bn } => {
            let cols = shape.get(1).copied().unwrap_or(1).max(1);
            let gc = cols.div_ceil(bn);
            bytes
                .iter()
                .enumerate()
                .map(|(k, &b)| {
                    let (i, j) = (k / cols, k % cols);
                    table[b as usize] * scales[(i / bm) * gc + j / bn]
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_values_and_scale_grids() {
        let t = e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exponent 7, mantissa 0
        assert_eq!(t[0x7E], 448.0); // the largest finite value
        assert_eq!(t[0xFE], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
        assert_eq!(
            Fp8Scales::resolve(&[576, 64], &[5, 1], Some([128, 128])),
            Ok(Fp8Scales::Blocks { bm: 128, bn: 128 })
        );
        assert_eq!(Fp8Scales::resolve(&[64, 64], &[1], Some([128, 128])), Ok(Fp8Scales::PerTensor));
        assert_eq!(Fp8Scales::resolve(&[64, 96], &[2, 3], None), Ok(Fp8Scales::Blocks { bm: 32, bn: 32 }));
        assert!(Fp8Scales::resolve(&[576, 64], &[4, 1], Some([128, 128])).unwrap_err().contains("expected [5, 1]"));
        assert!(Fp8Scales::resolve(&[64, 96], &[3, 3], None).is_err());
        // A ragged grid: rows 0..40 use scale row 0, rows 40..64 scale row 1.
        let bytes = vec![0x38u8; 64 * 2];
        let w = dequantize_e4m3(&bytes, &[64, 2], &[2.0, 3.0], Fp8Scales::Blocks { bm: 40, bn: 40 });
        assert_eq!((w[39 * 2], w[40 * 2], w[63 * 2 + 1]), (2.0, 3.0, 3.0));
    }
}
