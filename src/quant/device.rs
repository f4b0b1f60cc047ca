//! A 4-bit weight on a device (or an FP8 one: [`Fp8Grid`]), and `y = x · dequant(W)ᵀ` whose backward gives
//! `dx = dy · dequant(W)` without keeping a dense copy of W between the two (bitsandbytes'
//! `MatMul4Bit` algorithm; shared/docs/QLORA-NOTES.md §1). The codes stay packed: 8 per 32-bit
//! word (WGSL has no 8-bit type), the bitsandbytes bytes reinterpreted little-endian, so word j
//! holds values 8j..8j+7 at shifts 4, 0, 12, 8, 20, 16, 28, 24. Dequantization is generic
//! tensor code (shift, mask, code-book lookup, scale by absmax) and runs on every backend.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{backend::Backend, DType, ElementConversion, Int, Tensor, TensorData, TensorPrimitive};

use crate::quant::nf4::Quantized4Bit;

const SHIFTS: [i64; 8] = [4, 0, 12, 8, 20, 16, 28, 24];

/// Double-quantized absmax on a device: the 8-bit codes packed 4 per 32-bit word (little
/// endian), one f32 per 256 codes, the signed dynamic map and the offset. Dequantized on the
/// device as bitsandbytes does: `map[code] * nested[block / 256] + offset`, in f32.
#[derive(Debug, Clone)]
pub struct NestedPrims<B: Backend> {
    pub codes: IntTensor<B>,
    pub nested_absmax: FloatTensor<B>,
    pub map: FloatTensor<B>,
    pub offset: f32,
    /// The number of absmax values (4-bit blocks).
    pub blocks: usize,
}

/// The primitives of a 4-bit `[out, in]` weight on backend `B`.
#[derive(Debug, Clone)]
pub struct Packed4Bit<B: Backend> {
    /// `ceil(n / 8)` words.
    pub words: IntTensor<B>,
    /// One f32 per block (empty when `nested` holds them).
    pub absmax: FloatTensor<B>,
    /// Double quantization: the absmax in 8 bits.
    pub nested: Option<NestedPrims<B>>,
    /// The 16-entry code book, f32.
    pub code: FloatTensor<B>,
    pub shape: [usize; 2],
    pub blocksize: usize,
    /// An FP8 (e4m3) weight kept in 8 bits: 4 codes per word, the 256-entry e4m3 code book, and
    /// `absmax` holding its scale grid (`weight_scale_inv`) instead of per-block absmax.
    pub fp8: Option<Fp8Grid>,
}

/// The scale grid of an FP8 weight on a device: one scale per `[bm, bn]` block of the `[out,
/// in]` weight (edge blocks partial; a per-tensor scale is one block of the whole weight),
/// row-major `[ceil(out / bm), ceil(in / bn)]` in `absmax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Grid {
    pub bm: usize,
    pub bn: usize,
}

impl<B: Backend> Packed4Bit<B> {
    /// Upload a host weight of shape `[out, in]`.
    pub fn upload(q: &Quantized4Bit, shape: [usize; 2], device: &B::Device) -> Self {
        let words = words_of::<B>(&q.packed, device);
        let floats = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (device, DType::F32)).into_primitive().tensor()
        };
        let (absmax, nested) = match &q.nested {
            Some(n) => {
                let prims = NestedPrims {
                    codes: words_of::<B>(&n.codes, device),
                    nested_absmax: floats(n.nested_absmax.clone()),
                    map: floats(crate::quant::double::dynamic_map().to_vec()),
                    offset: n.offset,
                    blocks: n.codes.len(),
                };
                (floats(Vec::new()), Some(prims))
            }
            None => (floats(q.absmax.clone()), None),
        };
        let code = floats(q.kind.code().to_vec());
        Packed4Bit { words, absmax, nested, code, shape, blocksize: q.blocksize, fp8: None }
    }

    /// Upload an FP8 e4m3 weight `[out, in]` (one byte per value, row-major) with its scale grid
    /// in blocks of `grid` (`scales` row-major, `[ceil(out / bm), ceil(in / bn)]`).
    pub fn upload_fp8(bytes: &[u8], scales: &[f32], grid: Fp8Grid, shape: [usize; 2], device: &B::Device) -> Self {
        let floats = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (device, DType::F32)).into_primitive().tensor()
        };
        Packed4Bit {
            words: words_of::<B>(bytes, device),
            absmax: floats(scales.to_vec()),
            nested: None,
            code: floats(crate::quant::fp8::e4m3_values().to_vec()),
            shape,
            blocksize: 0,
            fp8: Some(grid),
        }
    }

    /// An FP8 weight: `code[q] * scale[i / bm, j / bn]` in f32 (exactly the on-load values).
    fn dequantize_fp8(&self, grid: Fp8Grid, dtype: DType) -> Tensor<B, 2> {
        let [out, inp] = self.shape;
        let n = out * inp;
        let idx = unpack_bytes(Tensor::from_primitive(self.words.clone()), n);
        let code: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(self.code.clone()));
        let values = code.select(0, idx).reshape([out, inp]);
        let (gr, gc) = (out.div_ceil(grid.bm), inp.div_ceil(grid.bn));
        let scales: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(self.absmax.clone()));
        let full = scales
            .reshape([gr, 1, gc, 1])
            .expand([gr, grid.bm, gc, grid.bn])
            .reshape([gr * grid.bm, gc * grid.bn])
            .slice([0..out, 0..inp]);
        (values * full).cast(dtype)
    }

    /// The f32 absmax of every block: stored, or dequantized from the 8-bit codes.
    pub fn absmax(&self) -> Tensor<B, 1> {
        let Some(n) = &self.nested else { return Tensor::from_primitive(TensorPrimitive::Float(self.absmax.clone())) };
        let idx = unpack_bytes(Tensor::from_primitive(n.codes.clone()), n.blocks);
        let map: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(n.map.clone()));
        let values = map.select(0, idx);
        let nested: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(n.nested_absmax.clone()));
        let groups = nested.dims()[0];
        let scale = nested
            .reshape([groups, 1])
            .expand([groups, crate::quant::double::NESTED_BLOCKSIZE])
            .reshape([groups * crate::quant::double::NESTED_BLOCKSIZE])
            .slice(0..n.blocks);
        (values * scale).add_scalar(n.offset)
    }

    /// dequant(W) `[out, in]` in `dtype`: `code[q] * absmax[block]` in f32, then cast (as
    /// bitsandbytes).
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        if let Some(grid) = self.fp8 {
            return self.dequantize_fp8(grid, dtype);
        }
        let [out, inp] = self.shape;
        let n = out * inp;
        let words: Tensor<B, 1, Int> = Tensor::from_primitive(self.words.clone());
        let w = words.dims()[0];
        let nibbles: Vec<Tensor<B, 2, Int>> = SHIFTS
            .iter()
            .map(|&s| {
                words.clone().bitwise_right_shift_scalar(s.elem()).bitwise_and_scalar(15i64.elem()).reshape([w, 1])
            })
            .collect();
        let idx = Tensor::cat(nibbles, 1).reshape([w * 8]).slice(0..n);
        let code: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(self.code.clone()));
        let values = code.select(0, idx);
        let absmax = self.absmax();
        let bs = self.blocksize;
        let full = n - n % bs;
        let blocks = full / bs;
        let scaled = if full == n {
            (values.reshape([blocks, bs]) * absmax.reshape([blocks, 1])).reshape([n])
        } else {
            let head = (values.clone().slice(0..full).reshape([blocks, bs])
                * absmax.clone().slice(0..blocks).reshape([blocks, 1]))
            .reshape([full]);
            let tail = values.slice(full..n) * absmax.slice(blocks..blocks + 1);
            Tensor::cat(vec![head, tail], 0)
        };
        scaled.reshape([out, inp]).cast(dtype)
    }
}

impl<B: Backend> Packed4Bit<B> {
    /// [`Packed4Bit::dequantize`] computed on the host, for the CPU backends, where the device
    /// is the host: one pass over the packed words (in parallel over rows) instead of the
    /// generic path's separate nibble, gather and scale tensors. The same f32 products.
    pub fn dequantize_on_host(&self, dtype: DType) -> Option<Tensor<B, 2>> {
        use rayon::prelude::*;
        let [out, inp] = self.shape;
        let words: Vec<i32> =
            Tensor::<B, 1, Int>::from_primitive(self.words.clone()).into_data().convert::<i32>().to_vec().ok()?;
        let absmax: Vec<f32> = self.absmax().into_data().convert::<f32>().to_vec().ok()?;
        let code: Vec<f32> = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(self.code.clone()))
            .into_data()
            .convert::<f32>()
            .to_vec()
            .ok()?;
        let mut values = vec![0.0f32; out * inp];
        if let Some(Fp8Grid { bm, bn }) = self.fp8 {
            let gc = inp.div_ceil(bn.max(1));
            if words.len() * 4 < out * inp || absmax.len() < out.div_ceil(bm.max(1)) * gc || code.len() < 256 {
                return None;
            }
            values.par_chunks_mut(inp.max(1)).enumerate().for_each(|(row, dst)| {
                let base = row * inp;
                let scales = &absmax[(row / bm) * gc..(row / bm + 1) * gc];
                for (j, v) in dst.iter_mut().enumerate() {
                    let i = base + j;
                    let byte = (words[i / 4] as u32 >> (8 * (i % 4))) & 0xff;
                    *v = code[byte as usize] * scales[j / bn];
                }
            });
            let device = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(self.code.clone())).device();
            return Some(
                Tensor::<B, 2>::from_data(TensorData::new(values, [out, inp]), (&device, DType::F32)).cast(dtype),
            );
        }
        let bs = self.blocksize.max(1);
        if words.len() * 8 < out * inp || absmax.len() < (out * inp).div_ceil(bs) || code.len() < 16 {
            return None;
        }
        values.par_chunks_mut(inp.max(1)).enumerate().for_each(|(row, dst)| {
            let base = row * inp;
            for (j, v) in dst.iter_mut().enumerate() {
                let i = base + j;
                // Byte i / 2 of the little-endian words; its high nibble first.
                let byte = (words[i / 8] as u32 >> (8 * ((i / 2) % 4))) & 0xff;
                let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                *v = code[q as usize] * absmax[i / bs];
            }
        });
        let device = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(self.code.clone())).device();
        Some(Tensor::<B, 2>::from_data(TensorData::new(values, [out, inp]), (&device, DType::F32)).cast(dtype))
    }
}

/// The first `n` bytes of 32-bit words packed little endian (byte `i` is bits `8 (i % 4)..` of
/// word `i / 4`): the inverse of [`words_of`], on the device.
fn unpack_bytes<B: Backend>(words: Tensor<B, 1, Int>, n: usize) -> Tensor<B, 1, Int> {
    let w = words.dims()[0];
    let bytes: Vec<Tensor<B, 2, Int>> = [0i64, 8, 16, 24]
        .iter()
        .map(|&s| words.clone().bitwise_right_shift_scalar(s.elem()).bitwise_and_scalar(255i64.elem()).reshape([w, 1]))
        .collect();
    Tensor::cat(bytes, 1).reshape([w * 4]).slice(0..n)
}

/// `bytes` as 32-bit words (little endian, zero-padded), the device's packed integer form.
fn words_of<B: Backend>(bytes: &[u8], device: &B::Device) -> IntTensor<B> {
    let words: Vec<i32> = bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            i32::from_le_bytes(w)
        })
        .collect();
    let n = words.len();
    Tensor::<B, 1, Int>::from_data(TensorData::new(words, [n]), device).into_primitive()
}

/// A 4-bit weight as a module field: plain tensors, which Burn treats as constants (no
/// optimizer, gradient or record touches them; `valid()` and `to_device` carry them).
#[derive(burn::module::Module, Debug)]
pub struct Weight4Bit<B: Backend> {
    pub words: Tensor<B, 1, Int>,
    pub absmax: Tensor<B, 1>,
    /// Double quantization: codes, nested absmax and map ([`NestedPrims`]).
    pub absmax_codes: Option<Tensor<B, 1, Int>>,
    pub nested_absmax: Option<Tensor<B, 1>>,
    pub absmax_map: Option<Tensor<B, 1>>,
    pub absmax_offset: f32,
    pub absmax_blocks: usize,
    pub code: Tensor<B, 1>,
    pub out_features: usize,
    pub in_features: usize,
    pub blocksize: usize,
    /// An FP8 weight in 8 bits: its scale blocks `[bm, bn]` (`[0, 0]` for a 4-bit weight).
    pub fp8_block: [usize; 2],
}

impl<B: Backend> Weight4Bit<B> {
    /// An FP8 e4m3 weight kept in 8 bits on the device ([`Packed4Bit::upload_fp8`]).
    pub fn fp8(bytes: &[u8], scales: &[f32], grid: Fp8Grid, shape: [usize; 2], device: &B::Device) -> Self {
        let p = Packed4Bit::<B>::upload_fp8(bytes, scales, grid, shape, device);
        Weight4Bit {
            words: Tensor::from_primitive(p.words),
            absmax: Tensor::from_primitive(TensorPrimitive::Float(p.absmax)),
            absmax_codes: None,
            nested_absmax: None,
            absmax_map: None,
            absmax_offset: 0.0,
            absmax_blocks: 0,
            code: Tensor::from_primitive(TensorPrimitive::Float(p.code)),
            out_features: shape[0],
            in_features: shape[1],
            blocksize: 0,
            fp8_block: [grid.bm, grid.bn],
        }
    }

    /// Whether this is an FP8 weight (8 bits per value) rather than a 4-bit one.
    pub fn is_fp8(&self) -> bool {
        self.fp8_block != [0, 0]
    }

    pub fn new(q: &Quantized4Bit, shape: [usize; 2], device: &B::Device) -> Self {
        let p = Packed4Bit::<B>::upload(q, shape, device);
        let float = |t: FloatTensor<B>| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
        let (absmax_codes, nested_absmax, absmax_map, absmax_offset, absmax_blocks) = match p.nested {
            Some(n) => (
                Some(Tensor::from_primitive(n.codes)),
                Some(float(n.nested_absmax)),
                Some(float(n.map)),
                n.offset,
                n.blocks,
            ),
            None => (None, None, None, 0.0, 0),
        };
        Weight4Bit {
            words: Tensor::from_primitive(p.words),
            absmax: Tensor::from_primitive(TensorPrimitive::Float(p.absmax)),
            absmax_codes,
            nested_absmax,
            absmax_map,
            absmax_offset,
            absmax_blocks,
            code: Tensor::from_primitive(TensorPrimitive::Float(p.code)),
            out_features: shape[0],
            in_features: shape[1],
            blocksize: p.blocksize,
            fp8_block: [0, 0],
        }
    }

    /// The primitives the 4-bit linear op takes (handles are shared, nothing is copied).
    pub fn packed(&self) -> Packed4Bit<B> {
        let nested = match (&self.absmax_codes, &self.nested_absmax, &self.absmax_map) {
            (Some(c), Some(n), Some(m)) => Some(NestedPrims {
                codes: c.clone().into_primitive(),
                nested_absmax: n.clone().into_primitive().tensor(),
                map: m.clone().into_primitive().tensor(),
                offset: self.absmax_offset,
                blocks: self.absmax_blocks,
            }),
            _ => None,
        };
        Packed4Bit {
            words: self.words.clone().into_primitive(),
            absmax: self.absmax.clone().into_primitive().tensor(),
            nested,
            code: self.code.clone().into_primitive().tensor(),
            shape: [self.out_features, self.in_features],
            blocksize: self.blocksize,
            fp8: self.is_fp8().then_some(Fp8Grid { bm: self.fp8_block[0], bn: self.fp8_block[1] }),
        }
    }
}

/// `x · dequant(W)ᵀ` for `x` `[rows, in]` (generic forward, also the backward's building block).
pub fn linear_4bit_forward<B: crate::ops::TemperBackend>(x: FloatTensor<B>, w: &Packed4Bit<B>) -> FloatTensor<B> {
    let x: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(x));
    let dense: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(B::temper_dequantize_4bit(w, x.dtype())));
    x.matmul(dense.transpose()).into_primitive().tensor()
}

/// `dy · dequant(W)` for `dy` `[rows, out]`: the input gradient.
pub fn linear_4bit_input_grad<B: crate::ops::TemperBackend>(dy: FloatTensor<B>, w: &Packed4Bit<B>) -> FloatTensor<B> {
    let dy: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(dy));
    let dense: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(B::temper_dequantize_4bit(w, dy.dtype())));
    dy.matmul(dense).into_primitive().tensor()
}
