//! Double quantization of the 4-bit absmax values, as bitsandbytes 0.50 does it on the CPU
//! (`quantize_4bit(..., compress_statistics=True)`): the per-block absmax (f32) minus their mean
//! is quantized to 8 bits with the signed dynamic map, in blocks of 256, each with its own f32
//! absmax. Dequantized, an absmax is `map[code] * nested_absmax[block] + offset`.
//!
//! Bit for bit with bitsandbytes (checked against `F.quantize_blockwise` on 400 random vectors
//! and against the `*_nf4_dq` fixtures):
//! - the 8-bit encoder is bitsandbytes' CPU one (`csrc/cpu_ops.cpp`, `quantize_cpu_impl`): a
//!   65,536-entry table over [-1, 1] that maps each grid point to the code whose midpoints
//!   bracket it, indexed by `(x * (1 / absmax) + 1) / 2 * 65535 + 0.5`. It is not an exact
//!   nearest-code search: a value within one grid step of a midpoint can take the far code;
//! - the offset is `torch.mean` of the absmax on the CPU, whose summation order this module
//!   reproduces (ATen `SumKernel.cpp`, `cascade_sum`: 8-lane vectors, 4-way ILP, 4-level cascade;
//!   below 8 values, the scalar 4-way path). torch sums more than 32,768 values (a weight of more
//!   than 2M values) on several threads, in an order that depends on the thread count; there the
//!   offset can differ from a given bitsandbytes run in its last bit (as two bitsandbytes runs
//!   with different thread counts differ from each other).

/// `bitsandbytes.functional.create_dynamic_map(signed=True)` as f32 bits (sorted, 256 entries).
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// Blocksize of the nested quantization (bitsandbytes fixes it at 256).
pub const NESTED_BLOCKSIZE: usize = 256;
const LUT_SIZE: usize = 65536;

/// The signed dynamic 8-bit map.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// Quantized absmax values: one u8 code per 4-bit block, one f32 absmax per 256 codes, and the
/// offset (the mean of the original absmax) added back after dequantization.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
}

impl NestedAbsmax {
    /// The absmax values bitsandbytes computes with: `map[code] * nested_absmax + offset` in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.nested_absmax[i / NESTED_BLOCKSIZE] + self.offset)
            .collect()
    }
}

/// Double-quantize `absmax` (the f32 per-block absmax of a 4-bit weight).
pub fn quantize_absmax(absmax: &[f32]) -> NestedAbsmax {
    let offset = torch_mean(absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centred, NESTED_BLOCKSIZE);
    NestedAbsmax { codes, nested_absmax, offset }
}

/// bitsandbytes' CPU `quantize_blockwise` with the dynamic map: codes and per-block absmax.
pub fn quantize_blockwise_8bit(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = lookup_table(&dynamic_map());
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize.max(1)));
    for block in values.chunks(blocksize.max(1)) {
        let am = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / am;
        codes.extend(block.iter().map(|&x| {
            let v = (x * inv).clamp(-1.0, 1.0);
            lut[((v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as usize]
        }));
    }
    (codes, absmax)
}

/// `build_quantize_lut`: grid point i (`-1 + 2i / 65535`) gets the first code whose upper
/// midpoint is not below it.
fn lookup_table(code: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = Vec::with_capacity(LUT_SIZE);
    let mut idx = 0usize;
    for i in 0..LUT_SIZE {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while idx < mid.len() && mid[idx] < val {
            idx += 1;
        }
        lut.push(idx as u8);
    }
    lut
}

/// `torch.mean` of an f32 vector on the CPU, single-threaded: the cascade sum, then `/ n`.
pub fn torch_mean(values: &[f32]) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    torch_sum(values) / values.len() as f32
}

const LANES: usize = 8;

fn torch_sum(x: &[f32]) -> f32 {
    let n = x.len();
    if n < LANES {
        // scalar_inner_sum: row_sum with 4-way ILP over single values.
        let size_ilp = n / 4;
        let mut ps = multi_row_sum::<1>(size_ilp, |i, k| [x[i * 4 + k]]);
        for v in &x[size_ilp * 4..] {
            ps[0][0] += v;
        }
        let mut s = ps[0][0];
        for p in &ps[1..] {
            s += p[0];
        }
        return s;
    }
    // vectorized_inner_sum: row_sum over 8-lane vectors, then the scalar tail, then the lanes.
    let vec_size = n / LANES;
    let vec = |v: usize| -> [f32; LANES] { std::array::from_fn(|l| x[v * LANES + l]) };
    let size_ilp = vec_size / 4;
    let mut ps = multi_row_sum::<LANES>(size_ilp, |i, k| vec(i * 4 + k));
    for v in size_ilp * 4..vec_size {
        add(&mut ps[0], &vec(v));
    }
    let (first, rest) = ps.split_at_mut(1);
    for p in rest.iter() {
        add(&mut first[0], p);
    }
    let mut total = 0.0f32;
    for v in &x[vec_size * LANES..] {
        total += v;
    }
    for l in first[0] {
        total += l;
    }
    total
}

fn add<const W: usize>(acc: &mut [f32; W], v: &[f32; W]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// ATen's `multi_row_sum` for 4 rows of `W`-lane values: a 4-level cascade whose level step is
/// `2^max(4, ceil_log2(size) / 4)`.
// The row index `k` walks two levels of `acc` at once, as ATen's loops do; iterators would hide
// the correspondence the bit-exactness depends on.
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<const W: usize>(size: usize, load: impl Fn(usize, usize) -> [f32; W]) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 { 1 } else { (usize::BITS - (size - 1).leading_zeros()) as usize };
    let level_power = 4usize.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; 4]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..4 {
                add(&mut acc[0][k], &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..4 {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..4 {
            add(&mut acc[0][k], &load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..4 {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_small_vectors_in_torch_order() {
        // Below 8 values: ((x0 + x4) + x1) + x2 + x3 in the 4-way scalar path, not left to right.
        let x = [1.0e8f32, 1.0, -1.0e8, 1.0, 0.5];
        let left_to_right = x.iter().fold(0.0f32, |s, v| s + v);
        assert_eq!(torch_sum(&x), (((1.0e8f32 + 0.5) + 1.0) + -1.0e8) + 1.0);
        assert_ne!(torch_sum(&x), left_to_right);
    }

    #[test]
    fn the_map_is_sorted_and_spans_minus_one_to_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m[0] > -1.0 && m[0] < -0.99);
    }
}
