//! MXFP4 expert weights as gpt-oss checkpoints store them, dequantized bit for bit as
//! transformers 5.24 does on load (`transformers/integrations/mxfp4.py`,
//! `_convert_moe_packed_tensors` l.229-285 and its wrapper `convert_moe_packed_tensors`
//! l.288-311, reached from `Mxfp4Dequantize.convert` l.101-126 through `dequantize_convertops`
//! l.448-450).
//!
//! # Format
//!
//! A checkpoint holds, per fused expert weight (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`):
//!
//! * `*_blocks`: u8 `[E, rows, G, 16]`, `G = cols / 32`. Each byte packs two FP4 (e2m1) codes:
//!   the **low nibble first** (`byte & 0x0f` is the even column, `byte >> 4` the odd one), so byte
//!   `j` of block `g` holds columns `32 g + 2 j` (low) and `32 g + 2 j + 1` (high).
//! * `*_scales`: u8 `[E, rows, G]`, one E8M0 exponent per 32 values, **bias 127**: the block's
//!   values are multiplied by `2^(scale - 127)`.
//!
//! The code book is [`FP4_E2M1_VALUES`] (transformers' `FP4_VALUES`, l.29-46): `0, 0.5, 1, 1.5,
//! 2, 3, 4, 6` and the same negated for codes 8..15 (code 8 is `-0.0`).
//!
//! For gpt-oss, `gate_up_proj_blocks` is `[E, 2I, H/32, 16]` (rows = 2I, cols = H) and
//! `down_proj_blocks` is `[E, H, I/32, 16]` (rows = H, cols = I): rows are the output features and
//! cols the input features, i.e. the blocks are laid out `[E, out, in]`.
//!
//! # Output layouts
//!
//! * [`dequantize_mxfp4`]: **`[E, cols, rows]`**, row-major, the layout transformers keeps in memory
//!   (its final `out.transpose(1, 2).contiguous()`, l.285): `gate_up_proj [E, H, 2I]`,
//!   `down_proj [E, I, H]` (`x @ W`). Element `[e, c, r]` is at `(e * cols + c) * rows + r`.
//! * [`dequantize_mxfp4_rows`]: `[E, rows, cols]`, the same values before that transpose (the
//!   checkpoint's `[E, out, in]` order).
//!
//! # Exactness and bf16
//!
//! transformers computes `torch.ldexp(FP4_VALUES[code], scale - 127)` in the dtype of the
//! parameter it loads into (bf16 by default, the function's `dtype=torch.bfloat16`; f32 for a float32
//! model). Every result is a number with at most two significant bits times `2^-128 ..= 2^130`, exact
//! in f32 **and** in bf16 (both have 8 exponent bits; the smallest non-zero magnitude, `0.5 * 2^-127 =
//! 2^-128`, is a subnormal in both) except where it overflows to ±inf (`|value| >= 2^128`, only with
//! scales 254 and 255), which also happens identically in both. So no bf16 rounding is ever involved:
//! the f32 values returned here equal transformers' f32 output and its bf16 output widened to f32, bit
//! for bit (checked on the fixture, including every scale 0..255 and every byte). Zero codes stay
//! (signed) zeros even with scale 255: torch's `ldexp` never produces NaN here, and neither does this
//! module (scale 255 is *not* treated as the OCP spec's NaN, matching transformers).

use rayon::prelude::*;

/// The FP4 e2m1 code book, indexed by the 4-bit code (transformers' `FP4_VALUES`).
pub const FP4_E2M1_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The E8M0 scale bias: a block's values are multiplied by `2^(scale - MXFP4_SCALE_BIAS)`.
pub const MXFP4_SCALE_BIAS: i32 = 127;

/// FP4 values per block (one scale byte each).
pub const MXFP4_BLOCK_VALUES: usize = 32;

/// Bytes per block (two codes per byte): the last dimension of `*_blocks`.
pub const MXFP4_BLOCK_BYTES: usize = 16;

/// Rows decoded at a time before they are written transposed.
const TILE_ROWS: usize = 32;

/// One value: `FP4_E2M1_VALUES[code & 0xf] * 2^(scale - 127)`, the exact product rounded to f32
/// (i.e. `ldexp`; it is exact unless it overflows to ±inf).
pub fn mxfp4_value(code: u8, scale: u8) -> f32 {
    scale_table(scale)[(code & 0x0f) as usize]
}

/// The 16 values of one scale. `2^e` for `e` in `-127..=128` is a normal f64, the product with a
/// code is exact in f64, and `as f32` rounds it exactly as `ldexp` would (to ±inf on overflow).
fn scale_table(scale: u8) -> [f32; 16] {
    let e = scale as i32 - MXFP4_SCALE_BIAS;
    let factor = f64::from_bits(((e + 1023) as u64) << 52);
    FP4_E2M1_VALUES.map(|v| (v as f64 * factor) as f32)
}

/// Checks the slice lengths against `shape = [E, rows, G, 16]`; returns `(E, rows, G)`.
fn validate(blocks: &[u8], scales: &[u8], shape: [usize; 4]) -> Result<(usize, usize, usize), String> {
    let [e, rows, g, b] = shape;
    if b != MXFP4_BLOCK_BYTES {
        return Err(format!(
            "MXFP4 blocks shape {shape:?}: the last dimension must be {MXFP4_BLOCK_BYTES} bytes \
             ({MXFP4_BLOCK_VALUES} FP4 values per scale), got {b}"
        ));
    }
    let too_large = || format!("MXFP4 blocks shape {shape:?}: the element count overflows usize");
    let n_scales = e.checked_mul(rows).and_then(|n| n.checked_mul(g)).ok_or_else(too_large)?;
    let n_blocks = n_scales.checked_mul(MXFP4_BLOCK_BYTES).ok_or_else(too_large)?;
    n_scales.checked_mul(MXFP4_BLOCK_VALUES).ok_or_else(too_large)?;
    if blocks.len() != n_blocks {
        return Err(format!(
            "MXFP4 blocks: shape {shape:?} needs E*rows*(cols/32)*16 = {e}*{rows}*{g}*16 = {n_blocks} bytes, \
             got {}",
            blocks.len()
        ));
    }
    if scales.len() != n_scales {
        return Err(format!(
            "MXFP4 scales: shape {shape:?} needs E*rows*(cols/32) = {e}*{rows}*{g} = {n_scales} bytes, got {}",
            scales.len()
        ));
    }
    Ok((e, rows, g))
}

/// Decodes one row: `blocks` holds its `G * 16` bytes, `scales` its `G` scales, `out` its `G * 32` values.
fn decode_row(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
    for ((blk, &scale), dst) in
        blocks.chunks_exact(MXFP4_BLOCK_BYTES).zip(scales).zip(out.chunks_exact_mut(MXFP4_BLOCK_VALUES))
    {
        let table = scale_table(scale);
        for (&byte, pair) in blk.iter().zip(dst.chunks_exact_mut(2)) {
            pair[0] = table[(byte & 0x0f) as usize];
            pair[1] = table[(byte >> 4) as usize];
        }
    }
}

/// Dequantizes MXFP4 `blocks` (u8 `[E, rows, cols/32, 16]`, row-major, `shape`) with their
/// `scales` (u8 `[E, rows, cols/32]`) into f32 **`[E, cols, rows]`**, row-major: the layout and the
/// values (bit for bit) of transformers' `convert_moe_packed_tensors`, i.e. gpt-oss'
/// `gate_up_proj [E, H, 2I]` from `gate_up_proj_blocks [E, 2I, H/32, 16]` and `down_proj [E, I, H]`
/// from `down_proj_blocks [E, H, I/32, 16]`. See the module docs for the nibble order and scale bias.
///
/// Errors when `shape[3] != 16` or a slice length does not match `shape`.
pub fn dequantize_mxfp4(blocks: &[u8], scales: &[u8], shape: [usize; 4]) -> Result<Vec<f32>, String> {
    let (e, rows, g) = validate(blocks, scales, shape)?;
    let cols = g * MXFP4_BLOCK_VALUES;
    let mut out = vec![0f32; e * cols * rows];
    if out.is_empty() {
        return Ok(out);
    }
    let row_bytes = g * MXFP4_BLOCK_BYTES;
    out.par_chunks_mut(cols * rows).enumerate().for_each(|(ei, dst)| {
        let mut tile = vec![0f32; TILE_ROWS.min(rows) * cols];
        for r0 in (0..rows).step_by(TILE_ROWS) {
            let n = TILE_ROWS.min(rows - r0);
            for i in 0..n {
                let r = ei * rows + r0 + i;
                decode_row(
                    &blocks[r * row_bytes..(r + 1) * row_bytes],
                    &scales[r * g..(r + 1) * g],
                    &mut tile[i * cols..(i + 1) * cols],
                );
            }
            for c in 0..cols {
                let d = &mut dst[c * rows + r0..c * rows + r0 + n];
                for (i, v) in d.iter_mut().enumerate() {
                    *v = tile[i * cols + c];
                }
            }
        }
    });
    Ok(out)
}

/// Like [`dequantize_mxfp4`] but without the transpose: f32 `[E, rows, cols]`, row-major (the
/// checkpoint's `[E, out, in]` order: gate_up `[E, 2I, H]`, down `[E, H, I]`). Same values.
pub fn dequantize_mxfp4_rows(blocks: &[u8], scales: &[u8], shape: [usize; 4]) -> Result<Vec<f32>, String> {
    let (e, rows, g) = validate(blocks, scales, shape)?;
    let cols = g * MXFP4_BLOCK_VALUES;
    let mut out = vec![0f32; e * rows * cols];
    if out.is_empty() {
        return Ok(out);
    }
    let row_bytes = g * MXFP4_BLOCK_BYTES;
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        decode_row(&blocks[r * row_bytes..(r + 1) * row_bytes], &scales[r * g..(r + 1) * g], dst);
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    fn fixture() -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moe/mxfp4/mxfp4.safetensors");
        std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn one_block_by_hand_low_nibble_first_bias_127() {
        // One block (E=1, rows=1, cols=32). Byte 0 = 0x21: low nibble 1 (+0.5) is column 0, high
        // nibble 2 (+1.0) column 1. Byte 1 = 0xF8: low 8 (-0.0) is column 2, high 0xF (-6.0) column 3.
        // Byte 15 = 0x7C: low 0xC (-2.0) is column 30, high 7 (+6.0) column 31. Scale 128 = 2^(128-127) = x2.
        let mut blocks = [0u8; 16];
        blocks[0] = 0x21;
        blocks[1] = 0xF8;
        blocks[15] = 0x7C;
        let out = dequantize_mxfp4(&blocks, &[128], [1, 1, 1, 16]).unwrap();
        let mut want = [0f32; 32];
        want[0] = 1.0;
        want[1] = 2.0;
        want[2] = -0.0;
        want[3] = -12.0;
        want[30] = -4.0;
        want[31] = 12.0;
        assert_eq!(bits(&out), bits(&want));
        assert!(out[2].is_sign_negative());
        // Scale 127 is x1 (the bias), 126 is x0.5.
        assert_eq!(dequantize_mxfp4(&blocks, &[127], [1, 1, 1, 16]).unwrap()[3], -6.0);
        assert_eq!(dequantize_mxfp4(&blocks, &[126], [1, 1, 1, 16]).unwrap()[3], -3.0);
    }

    #[test]
    fn two_rows_by_hand_output_is_transposed() {
        // E=1, rows=2, cols=32: the output is [E, cols, rows] = [1, 32, 2], element [c, r] at c*2 + r.
        let mut blocks = [0u8; 32];
        blocks[0] = 0x32; // row 0: col 0 = 1.0, col 1 = 1.5
        blocks[16 + 1] = 0x04; // row 1: col 2 = 2.0, col 3 = 0.0
        let scales = [127, 129]; // row 0 x1, row 1 x4
        let t = dequantize_mxfp4(&blocks, &scales, [1, 2, 1, 16]).unwrap();
        assert_eq!((t[0], t[2], t[2 * 2 + 1], t[3 * 2 + 1]), (1.0, 1.5, 8.0, 0.0));
        let r = dequantize_mxfp4_rows(&blocks, &scales, [1, 2, 1, 16]).unwrap();
        assert_eq!((r[0], r[1], r[32 + 2], r[32 + 3]), (1.0, 1.5, 8.0, 0.0));
    }

    #[test]
    fn extreme_scales_match_ldexp() {
        // Scale 0: 2^-127, code 1 (0.5) gives the smallest value 2^-128, a subnormal.
        assert_eq!(mxfp4_value(1, 0).to_bits(), 0x0020_0000);
        assert_eq!(mxfp4_value(15, 0), -6.0 * 2f32.powi(-127));
        // Scale 254: 2^127; 1.5 * 2^127 fits, 2 * 2^127 overflows.
        assert_eq!(mxfp4_value(3, 254), 1.5 * 2f32.powi(127));
        assert_eq!(mxfp4_value(4, 254), f32::INFINITY);
        // Scale 255: 2^128 (not NaN): 0.5 * 2^128 = 2^127, zeros stay signed zeros.
        assert_eq!(mxfp4_value(1, 255), 2f32.powi(127));
        assert_eq!(mxfp4_value(10, 255), f32::NEG_INFINITY);
        assert_eq!(mxfp4_value(0, 255).to_bits(), 0);
        assert_eq!(mxfp4_value(8, 255).to_bits(), 0x8000_0000);
        assert_eq!(mxfp4_value(0x17, 127), 6.0, "only the low nibble of `code` is used");
    }

    #[test]
    fn size_errors_name_the_problem() {
        let err = dequantize_mxfp4(&[0; 959], &[0; 60], [3, 10, 2, 16]).unwrap_err();
        assert!(err.contains("MXFP4 blocks") && err.contains("960") && err.contains("959"), "{err}");
        let err = dequantize_mxfp4(&[0; 960], &[0; 61], [3, 10, 2, 16]).unwrap_err();
        assert!(err.contains("MXFP4 scales") && err.contains("60") && err.contains("61"), "{err}");
        let err = dequantize_mxfp4_rows(&[0; 960], &[0; 120], [3, 10, 4, 8]).unwrap_err();
        assert!(err.contains("last dimension must be 16"), "{err}");
        let err = dequantize_mxfp4(&[], &[], [usize::MAX, 2, 1, 16]).unwrap_err();
        assert!(err.contains("overflows"), "{err}");
        assert!(dequantize_mxfp4(&[], &[], [0, 10, 2, 16]).unwrap().is_empty());
        assert!(dequantize_mxfp4(&[], &[], [2, 10, 0, 16]).unwrap().is_empty());
        assert!(dequantize_mxfp4_rows(&[], &[], [2, 0, 3, 16]).unwrap().is_empty());
    }

    #[test]
    fn bit_exact_with_transformers_fixture() {
        let bytes = fixture();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let info: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["mxfp4"]).unwrap();
        let cases = info["cases"].as_object().unwrap();
        assert_eq!(cases.len(), 3);
        for (name, case) in cases {
            let blocks = st.tensor(&format!("{name}.blocks")).unwrap();
            let scales = st.tensor(&format!("{name}.scales")).unwrap();
            let deq_f32 = st.tensor(&format!("{name}.dequant_f32")).unwrap();
            let deq_bf16 = st.tensor(&format!("{name}.dequant")).unwrap();
            assert_eq!(
                (blocks.dtype(), scales.dtype(), deq_f32.dtype(), deq_bf16.dtype()),
                (Dtype::U8, Dtype::U8, Dtype::F32, Dtype::BF16)
            );
            let s = blocks.shape();
            let shape = [s[0], s[1], s[2], s[3]];
            let [e, rows, g, _] = shape;
            let cols = g * 32;
            assert_eq!(case["E"].as_u64().unwrap() as usize, e);
            assert_eq!(case["rows"].as_u64().unwrap() as usize, rows);
            assert_eq!(case["cols"].as_u64().unwrap() as usize, cols);
            assert_eq!(deq_f32.shape(), [e, cols, rows], "{name}: transformers' layout is [E, cols, rows]");

            let want: Vec<u32> =
                deq_f32.data().chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
            let want_bf16: Vec<u32> = deq_bf16
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32().to_bits())
                .collect();
            assert_eq!(want, want_bf16, "{name}: transformers' bf16 and f32 results differ");

            let got = dequantize_mxfp4(blocks.data(), scales.data(), shape).unwrap();
            let got = bits(&got);
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{name}: {diff} of {} values differ from transformers", want.len());

            let rows_layout = dequantize_mxfp4_rows(blocks.data(), scales.data(), shape).unwrap();
            for ei in 0..e {
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(
                            rows_layout[(ei * rows + r) * cols + c].to_bits(),
                            want[(ei * cols + c) * rows + r],
                            "{name}: [{ei}, {r}, {c}]"
                        );
                    }
                }
            }
        }
    }
}
