//! Reading Hugging Face checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; each tensor is converted straight
//! from the map into the device tensor, so a checkpoint never sits in memory twice.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use memmap2::Mmap;
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::tensor::{Metadata, SafeTensorError};
use safetensors::Dtype;
use serde::Deserialize;

use crate::model::names::TextLayout;
use crate::quant::device::{Fp8Grid, Weight4Bit};
use crate::quant::{is_bnb_4bit, read_bnb_4bit, LoadIn4Bit};
use crate::{Error, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A safetensors checkpoint (one file or several shards), memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> index into `shards`
    index: HashMap<String, usize>,
    layout: TextLayout,
    /// Quantize the decoder projections to this 4-bit format as they are read (QLoRA on an
    /// f32 / f16 / bf16 checkpoint), as bitsandbytes' `quantize_4bit` does.
    quantize_on_load: Option<LoadIn4Bit>,
    /// An FP8 checkpoint's `quantization_config.weight_block_size` (`[rows, cols]` of a block).
    fp8_block: Option<[usize; 2]>,
    /// Keep FP8 projections in 8 bits on the device (dequantized block by block in the forward
    /// and backward) instead of dequantizing them as they load.
    keep_fp8: bool,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Where the weights of a model come from.
// One value per model load: boxing the larger variant would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
pub enum WeightSource {
    Checkpoint(Checkpoint),
    /// Random normal weights (std 0.02, norms at their identity value): for benchmarks and
    /// tests that need a model of a real shape but not its values.
    Random {
        rng: StdRng,
        norm_offset: f64,
        quantize_4bit: Option<LoadIn4Bit>,
    },
}

impl Checkpoint {
    /// Open the safetensors files of a model folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let idx: ShardIndex =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.clone(), source })?;
            let mut names: Vec<&String> = idx.weight_map.values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            let has_bin = dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists();
            return Err(Error::MissingTensor {
                path: dir.to_path_buf(),
                tensor: "model.safetensors".into(),
                hint: if has_bin {
                    " (only pickle .bin weights found: convert them to safetensors; .bin files can execute code when loaded and are never read)".into()
                } else {
                    " (no model.safetensors or model.safetensors.index.json in this folder)".into()
                },
            });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let shard = open_shard(path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        let layout = TextLayout::detect(index.keys());
        let fp8_block = fp8_block_size(dir);
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            index,
            layout,
            quantize_on_load: None,
            fp8_block,
            keep_fp8: true,
        })
    }

    /// Quantize every decoder projection to `kind` (blocks of 64, double quantization if asked)
    /// as it is loaded; checkpoints already in 4 bits are read as they are.
    pub fn quantize_on_load(&mut self, kind: Option<LoadIn4Bit>) {
        self.quantize_on_load = kind;
    }

    /// Where the text decoder's tensors sit (`model.*`, or a vision-language model's prefix).
    pub fn layout(&self) -> TextLayout {
        self.layout
    }

    /// Names of every tensor in the checkpoint.
    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Paths of the safetensors files.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// dtype and shape of a tensor, without reading it.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.metadata.info(name).map(|i| (i.dtype, i.shape.clone()))
    }

    /// A tensor's dtype, shape and raw little-endian bytes, straight from the map.
    pub fn raw(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        Some((info.dtype, info.shape.clone(), shard.bytes(info)?))
    }

    /// The folder the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dtype most tensors are stored in (what `inspect` reports).
    pub fn dominant_dtype(&self) -> Option<Dtype> {
        let mut counts: HashMap<String, (usize, Dtype)> = HashMap::new();
        for s in &self.shards {
            for info in s.metadata.tensors().values() {
                let n: usize = info.shape.iter().product();
                let e = counts.entry(format!("{:?}", info.dtype)).or_insert((0, info.dtype));
                e.0 += n;
            }
        }
        counts.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }

    /// Read one tensor as `TensorData` converted to `dtype`, checking its shape.
    pub fn read(&self, name: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        let shard = self.index.get(name).map(|&i| &self.shards[i]).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        let info = shard.metadata.info(name).ok_or_else(|| Error::MissingTensor {
            path: shard.path.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        if info.shape != shape {
            return Err(Error::TensorShape {
                path: shard.path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let bytes = shard.bytes(info).ok_or_else(|| Error::Safetensors {
            path: shard.path.clone(),
            reason: format!("tensor `{name}` lies outside the file"),
        })?;
        let src = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F8_E4M3 => return self.read_fp8(name, shape, bytes, dtype),
            other => {
                return Err(Error::TensorDtype {
                    path: shard.path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(convert(bytes, shape, src, dtype))
    }
}

impl Checkpoint {
    /// An FP8 (e4m3) weight and its `<name>_scale_inv`, dequantized ([`crate::quant::fp8`]).
    fn read_fp8(&self, name: &str, shape: &[usize], bytes: &[u8], dtype: DType) -> Result<TensorData> {
        let (scales, layout) = self.fp8_scales(name, shape, bytes)?;
        let values = crate::quant::fp8::dequantize_e4m3(bytes, shape, &scales, layout);
        let data = TensorData::new(values, shape.to_vec());
        Ok(if dtype == DType::F32 { data } else { data.convert_dtype(dtype) })
    }

    /// The scales of the FP8 weight `name` (its bytes `bytes`, its shape `shape`) and their layout,
    /// checked against the weight.
    fn fp8_scales(
        &self,
        name: &str,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(Vec<f32>, crate::quant::fp8::Fp8Scales)> {
        let scale_name = format!("{name}_scale_inv");
        let path = self.index.get(name).map_or_else(|| self.dir.clone(), |&i| self.shards[i].path.clone());
        let bad = |reason: String| Error::Safetensors { path: path.clone(), reason: format!("`{name}`: {reason}") };
        let Some((scale_dtype, scale_shape, scale_bytes)) = self.raw(&scale_name) else {
            return Err(bad(format!(
                "stored as float8 e4m3 without its scale `{scale_name}` (an FP8 checkpoint keeps one beside every FP8 weight)"
            )));
        };
        let scales = match scale_dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => crate::export::shard::bytes_to_f32(scale_dtype, scale_bytes)
                .ok_or_else(|| bad(format!("its scale `{scale_name}` could not be read as {scale_dtype:?}")))?,
            other => return Err(bad(format!("its scale `{scale_name}` is {other:?}; expected F32, BF16 or F16"))),
        };
        if scales.len() != scale_shape.iter().product::<usize>() {
            return Err(bad(format!(
                "its scale `{scale_name}` is truncated ({} values for {scale_shape:?})",
                scales.len()
            )));
        }
        let layout = crate::quant::fp8::Fp8Scales::resolve(shape, &scale_shape, self.fp8_block).map_err(bad)?;
        if bytes.len() != shape.iter().product::<usize>() {
            return Err(bad(format!("{} bytes for a {shape:?} float8 tensor", bytes.len())));
        }
        Ok((scales, layout))
    }

    /// Keep FP8 projections in 8 bits on the device (the default) or dequantize them as they load.
    pub fn keep_fp8(&mut self, keep: bool) {
        self.keep_fp8 = keep;
    }

    /// The FP8 e4m3 weight `name` (`[out, in]`) in 8 bits with its scale grid, when the
    /// checkpoint stores it so and FP8 weights are kept ([`Checkpoint::keep_fp8`]).
    fn fp8_weight<B: Backend>(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Option<Weight4Bit<B>>> {
        if !self.keep_fp8 {
            return Ok(None);
        }
        let Some((Dtype::F8_E4M3, stored, bytes)) = self.raw(name) else { return Ok(None) };
        if stored != shape {
            let path = self.index.get(name).map_or_else(|| self.dir.clone(), |&i| self.shards[i].path.clone());
            return Err(Error::TensorShape {
                path,
                tensor: name.to_string(),
                expected: shape.to_vec(),
                actual: stored,
            });
        }
        let (scales, layout) = self.fp8_scales(name, &shape, bytes)?;
        let grid = match layout {
            crate::quant::fp8::Fp8Scales::PerTensor => Fp8Grid { bm: shape[0].max(1), bn: shape[1].max(1) },
            crate::quant::fp8::Fp8Scales::Blocks { bm, bn } => Fp8Grid { bm, bn },
        };
        Ok(Some(Weight4Bit::fp8(bytes, &scales, grid, shape, device)))
    }
}

/// `quantization_config.weight_block_size` of an FP8 checkpoint's config.json, if any.
fn fp8_block_size(dir: &Path) -> Option<[usize; 2]> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let q = v.get("quantization_config").or_else(|| v.get("text_config")?.get("quantization_config"))?;
    let b = q.get("weight_block_size")?.as_array()?;
    match b.as_slice() {
        [r, c] => Some([r.as_u64()? as usize, c.as_u64()? as usize]),
        _ => None,
    }
}

impl Shard {
    /// A tensor's bytes in the map (`None` if its offsets lie outside the file).
    fn bytes(&self, info: &safetensors::tensor::TensorInfo) -> Option<&[u8]> {
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        self.mmap.get(base + start..base + end)
    }
}

/// Bytes of one dtype -> `TensorData` of another, in one pass.
fn convert(bytes: &[u8], shape: &[usize], src: DType, dst: DType) -> TensorData {
    if src == dst {
        return TensorData::from_bytes_vec(bytes.to_vec(), shape.to_vec(), src);
    }
    let as_f32: Vec<f32> = match src {
        DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    };
    let data = TensorData::new(as_f32, shape.to_vec());
    if dst == DType::F32 {
        data
    } else {
        data.convert_dtype(dst)
    }
}

fn open_shard(path: PathBuf) -> Result<Shard> {
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: the map is read-only; a checkpoint changed on disk while loading is undefined for
    // every framework that maps weights (transformers included) and is documented as such.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    match safetensors::SafeTensors::read_metadata(&mmap) {
        Ok((header_len, metadata)) => Ok(Shard { path, mmap, header_len, metadata }),
        Err(SafeTensorError::MetadataIncompleteBuffer) => {
            let reason = truncated_tensor(&mmap).map_or_else(
                || "the file is shorter than its header says: truncated download?".to_string(),
                |(name, need)| {
                    format!(
                        "tensor `{name}` ends at byte {need} but the file has {} bytes: truncated download?",
                        mmap.len()
                    )
                },
            );
            Err(Error::Safetensors { path, reason })
        }
        Err(e) => Err(Error::Safetensors { path, reason: e.to_string() }),
    }
}

/// For a file whose data is shorter than its header says, the first tensor cut off.
fn truncated_tensor(buf: &[u8]) -> Option<(String, usize)> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(buf.get(8..8 + n)?).ok()?;
    let data_len = buf.len().saturating_sub(8 + n);
    header
        .iter()
        .filter_map(|(name, v)| {
            let end = v.get("data_offsets")?.get(1)?.as_u64()? as usize;
            (end > data_len).then(|| (name.clone(), end + 8 + n))
        })
        .min_by_key(|(_, end)| *end)
}

impl WeightSource {
    pub fn random(seed: u64, norm_offset: f64) -> Self {
        WeightSource::Random { rng: StdRng::seed_from_u64(seed), norm_offset, quantize_4bit: None }
    }

    /// A random base whose decoder projections are 4-bit (benchmarks of QLoRA).
    pub fn random_4bit(seed: u64, norm_offset: f64, kind: LoadIn4Bit) -> Self {
        WeightSource::Random { rng: StdRng::seed_from_u64(seed), norm_offset, quantize_4bit: Some(kind) }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Checkpoint(c) => c.contains(&c.layout.checkpoint_name(name)),
            WeightSource::Random { .. } => true,
        }
    }

    /// A weight matrix or bias, as `dtype`, on `device`.
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        dtype: DType,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let data = match self {
            WeightSource::Checkpoint(c) => c.read(&c.layout.checkpoint_name(name), &shape, dtype)?,
            WeightSource::Random { rng, .. } => {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| normal(rng) * 0.02).collect();
                TensorData::new(v, shape).convert_dtype(dtype)
            }
        };
        Ok(Tensor::from_data(data, (device, dtype)))
    }

    /// gpt-oss's MXFP4 expert tensor `name` (`name_blocks` + `name_scales`), dequantized to the
    /// `shape` transformers holds in memory, if the checkpoint stores it so.
    pub fn mxfp4<B: Backend>(
        &mut self,
        name: &str,
        shape: [usize; 3],
        dtype: DType,
        device: &B::Device,
    ) -> Result<Option<Tensor<B, 3>>> {
        let WeightSource::Checkpoint(c) = self else { return Ok(None) };
        let blocks = c.layout.checkpoint_name(&format!("{name}_blocks"));
        if !c.contains(&blocks) {
            return Ok(None);
        }
        let scales = c.layout.checkpoint_name(&format!("{name}_scales"));
        let path = c.dir.clone();
        let u8_tensor = |key: &str| -> Result<(Vec<usize>, &[u8])> {
            match c.raw(key) {
                Some((Dtype::U8, s, bytes)) => Ok((s, bytes)),
                Some((d, _, _)) => Err(Error::TensorDtype {
                    path: path.clone(),
                    tensor: key.to_string(),
                    dtype: format!("{d:?} (MXFP4 blocks and scales are U8)"),
                }),
                None => Err(Error::MissingTensor {
                    path: path.clone(),
                    tensor: key.to_string(),
                    hint: " (MXFP4 blocks need their scales)".into(),
                }),
            }
        };
        let (bshape, bbytes) = u8_tensor(&blocks)?;
        let (_, sbytes) = u8_tensor(&scales)?;
        // Blocks `[E, rows, cols / 32, 16]` dequantize to `[E, cols, rows]` (transformers'
        // in-memory layout: gpt-oss's `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`).
        let [e, cols, rows] = shape;
        let want = vec![e, rows, cols / 32, 16];
        if bshape != want || cols % 32 != 0 {
            return Err(Error::TensorShape { path, tensor: blocks, expected: want, actual: bshape });
        }
        let values = crate::quant::mxfp4::dequantize_mxfp4(bbytes, sbytes, [e, rows, cols / 32, 16])
            .map_err(|reason| Error::InvalidConfig { path: path.clone(), key: scales.clone(), reason })?;
        Ok(Some(Tensor::from_data(TensorData::new(values, shape).convert_dtype(dtype), (device, dtype))))
    }

    /// The bitsandbytes 4-bit weight `name` (`[out, in]`), if the checkpoint stores it so.
    pub fn quant4<B: Backend>(
        &mut self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Option<Weight4Bit<B>>> {
        let c = match self {
            WeightSource::Checkpoint(c) => c,
            WeightSource::Random { quantize_4bit: None, .. } => return Ok(None),
            WeightSource::Random { rng, quantize_4bit: Some(kind), .. } => {
                let values: Vec<f32> = (0..shape[0] * shape[1]).map(|_| normal(rng) * 0.02).collect();
                return Ok(Some(Weight4Bit::new(&kind.quantize(&values), shape, device)));
            }
        };
        let name = c.layout.checkpoint_name(name);
        if !is_bnb_4bit(c, &name) {
            if c.quantize_on_load.is_none() {
                if let Some(w) = c.fp8_weight::<B>(&name, shape, device)? {
                    return Ok(Some(w));
                }
            }
            let Some(kind) = c.quantize_on_load else { return Ok(None) };
            let data = c.read(&name, &shape, DType::F32)?;
            let values = data.to_vec::<f32>().map_err(|e| Error::InvalidArgument(format!("reading {name}: {e:?}")))?;
            let q = kind.quantize(&values);
            return Ok(Some(Weight4Bit::new(&q, shape, device)));
        }
        let w = read_bnb_4bit(c, &name, shape)?;
        Ok(Some(Weight4Bit::new(&w.quantized, shape, device)))
    }

    /// A norm weight (always f32: tiny, and the norm is computed in f32).
    pub fn norm<B: Backend>(&mut self, name: &str, dim: usize, device: &B::Device) -> Result<Tensor<B, 1>> {
        match self {
            WeightSource::Random { norm_offset, .. } => {
                let identity = 1.0 - *norm_offset as f32;
                Ok(Tensor::from_data(TensorData::new(vec![identity; dim], [dim]), (device, DType::F32)))
            }
            _ => self.tensor(name, [dim], DType::F32, device),
        }
    }
}

/// A standard normal sample (Box-Muller), so random weights need no extra crate.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
