//! Streaming safetensors I/O for the merge: read one tensor of a shard at a time with plain
//! file reads (no map, so pages already processed never count against resident memory), and
//! write a shard whose header is known up front, one tensor at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data_offsets: [usize; 2],
}

/// A safetensors file opened for reading tensor by tensor.
pub struct ShardReader {
    pub path: PathBuf,
    file: File,
    data_start: u64,
    /// `__metadata__`, if any.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensors in file order (by data offset).
    pub tensors: Vec<(String, TensorEntry)>,
}

impl ShardReader {
    /// Read and check the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(|_| bad("shorter than the 8-byte header length".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err(bad(format!("header length {header_len} does not fit a file of {file_len} bytes")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let mut map: BTreeMap<String, Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let metadata = match map.remove("__metadata__") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v).map_err(|e| bad(format!("__metadata__: {e}")))?),
        };
        let mut tensors = Vec::with_capacity(map.len());
        for (name, v) in map {
            let entry: TensorEntry = serde_json::from_value(v).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            tensors.push((name, entry));
        }
        tensors.sort_by_key(|(_, e)| e.data_offsets[0]);
        let data_len = file_len - 8 - header_len;
        let mut end = 0usize;
        for (name, e) in &tensors {
            let [start, stop] = e.data_offsets;
            let want = nbytes(e.dtype, &e.shape);
            if start != end || stop < start || stop - start != want {
                return Err(bad(format!(
                    "tensor `{name}` has data offsets {:?}, expected [{end}, {}]",
                    e.data_offsets,
                    end + want
                )));
            }
            end = stop;
        }
        if end as u64 != data_len {
            return Err(bad(format!(
                "tensor data ends at byte {end} but the file holds {data_len} data bytes: truncated download?"
            )));
        }
        Ok(ShardReader { path: path.to_path_buf(), file, data_start: 8 + header_len, metadata, tensors })
    }

    /// The raw little-endian bytes of tensor `index`.
    pub fn read_bytes(&mut self, index: usize) -> Result<Vec<u8>> {
        let (_, e) = &self.tensors[index];
        let [start, stop] = e.data_offsets;
        let mut buf = vec![0u8; stop - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|err| Error::io(&self.path, err))?;
        Ok(buf)
    }
}

/// Bytes a tensor of `dtype` and `shape` takes.
pub fn nbytes(dtype: Dtype, shape: &[usize]) -> usize {
    (shape.iter().product::<usize>() * dtype.bitsize()).div_ceil(8)
}

/// Little-endian bytes of a float dtype -> f32; `None` for other dtypes. The bulk work is a
/// memcpy and `half`'s slice conversion (vectorised), so it is fast even in a debug build.
pub fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use half::slice::HalfFloatSliceExt;
    if cfg!(target_endian = "big") {
        return bytes_to_f32_portable(dtype, bytes);
    }
    Some(match dtype {
        Dtype::F32 => {
            let mut v = vec![0f32; bytes.len() / 4];
            bytemuck::cast_slice_mut::<f32, u8>(&mut v).copy_from_slice(&bytes[..bytes.len() / 4 * 4]);
            v
        }
        Dtype::BF16 => {
            let mut h = bytemuck::zeroed_vec::<half::bf16>(bytes.len() / 2);
            bytemuck::cast_slice_mut::<half::bf16, u8>(&mut h).copy_from_slice(&bytes[..bytes.len() / 2 * 2]);
            let mut v = vec![0f32; h.len()];
            h.convert_to_f32_slice(&mut v);
            v
        }
        Dtype::F16 => {
            let mut h = bytemuck::zeroed_vec::<half::f16>(bytes.len() / 2);
            bytemuck::cast_slice_mut::<half::f16, u8>(&mut h).copy_from_slice(&bytes[..bytes.len() / 2 * 2]);
            let mut v = vec![0f32; h.len()];
            h.convert_to_f32_slice(&mut v);
            v
        }
        _ => return None,
    })
}

fn bytes_to_f32_portable(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// f32 -> little-endian bytes of `dtype` (round to nearest even for bf16 / f16).
pub fn f32_to_bytes(dtype: Dtype, data: &[f32]) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    if cfg!(target_endian = "big") {
        return match dtype {
            Dtype::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            _ => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
    }
    match dtype {
        Dtype::BF16 => {
            let mut h = bytemuck::zeroed_vec::<half::bf16>(data.len());
            h.convert_from_f32_slice(data);
            bytemuck::cast_slice::<half::bf16, u8>(&h).to_vec()
        }
        Dtype::F16 => {
            let mut h = bytemuck::zeroed_vec::<half::f16>(data.len());
            h.convert_from_f32_slice(data);
            bytemuck::cast_slice::<half::f16, u8>(&h).to_vec()
        }
        _ => bytemuck::cast_slice::<f32, u8>(data).to_vec(),
    }
}

/// Whether every value of a float tensor is finite (other dtypes: true). A value is NaN or
/// infinite iff its exponent bits are all ones; the bulk is tested 64 bits at a time (SWAR), so
/// the check costs little even in a debug build.
pub fn all_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    // (exponent mask of one element replicated over a u64, element width in bytes)
    let (mask, width): (u64, usize) = match dtype {
        Dtype::F32 => (0x7F80_0000_7F80_0000, 4),
        Dtype::BF16 => (0x7F80_7F80_7F80_7F80, 2),
        Dtype::F16 => (0x7C00_7C00_7C00_7C00, 2),
        _ => return true,
    };
    let lane_mask = mask & ((1u64 << (8 * width)) - 1);
    let scalar_ok = |chunk: &[u8]| {
        chunk.chunks_exact(width).all(|c| {
            let v = c.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64);
            v & lane_mask != lane_mask
        })
    };
    let (head, words, tail) = bytemuck::pod_align_to::<u8, u64>(bytes);
    if head.len() % width != 0 {
        // Element boundaries do not line up with the words: check element by element.
        return scalar_ok(bytes);
    }
    // Per lane, t = (x & mask) ^ mask is zero iff the exponent is all ones; the high bit of every
    // lane of t is clear, so the classic "has a zero lane" test applies.
    let ones = match width {
        4 => 0x0000_0001_0000_0001u64,
        _ => 0x0001_0001_0001_0001u64,
    };
    let highs = ones << (8 * width - 1);
    let mut bad = 0u64;
    for &x in words {
        let t = (x & mask) ^ mask;
        bad |= t.wrapping_sub(ones) & !t & highs;
    }
    bad == 0 && scalar_ok(head) && scalar_ok(tail)
}

/// A safetensors file written tensor by tensor, in the order given to [`ShardWriter::create`].
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    planned: Vec<(String, TensorEntry)>,
    next: usize,
}

impl ShardWriter {
    /// Write the header for `tensors` (name, dtype, shape), laid out contiguously in that order.
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::InvalidArgument(e.to_string()))?,
        );
        let mut planned = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (name, dtype, shape) in tensors {
            let n = nbytes(*dtype, shape);
            let entry = TensorEntry { dtype: *dtype, shape: shape.clone(), data_offsets: [offset, offset + n] };
            offset += n;
            header
                .insert(name.clone(), serde_json::to_value(&entry).map_err(|e| Error::InvalidArgument(e.to_string()))?);
            planned.push((name.clone(), entry));
        }
        let mut json = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // Data starts 8-byte aligned, as the safetensors crate writes it.
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&json))
            .map_err(|e| Error::io(path, e))?;
        Ok(ShardWriter { path: path.to_path_buf(), out, planned, next: 0 })
    }

    /// Append the next tensor's bytes; its name and size must be the planned ones.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (want, entry) = self.planned.get(self.next).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: tensor `{name}` was not planned", self.path.display()))
        })?;
        let size = entry.data_offsets[1] - entry.data_offsets[0];
        if want != name || size != bytes.len() {
            return Err(Error::InvalidArgument(format!(
                "{}: expected tensor `{want}` of {size} bytes, got `{name}` of {} bytes",
                self.path.display(),
                bytes.len()
            )));
        }
        self.out.write_all(bytes).map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flush and sync; every planned tensor must have been written.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.planned.len() {
            return Err(Error::InvalidArgument(format!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.planned.len()
            )));
        }
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let file = self.out.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.planned.last().map_or(0, |(_, e)| e.data_offsets[1] as u64))
    }
}
