//! Rotary position embeddings in the Hugging Face convention (`rotate_half`: the first half of
//! the rotary dimensions pairs with the second half), with the `rope_scaling` types used by the
//! supported families. Burn's own `RotaryEncoding` rotates adjacent pairs, which does not match
//! HF checkpoints, hence this module.

use std::f64::consts::PI;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use serde_json::Value;

/// How inverse frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 / 3.2 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (Qwen long-context checkpoints), with the cos/sin attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    /// LongRoPE (Phi-3.5, Phi-4-mini): per-frequency factors, the long ones once a call's
    /// positions reach past `original_max_position_embeddings`; cos/sin scaled by the attention factor.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// Dynamic NTK: `rope_theta` grows with the sequence once it passes `max_position_embeddings`.
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
}

/// RoPE parameters resolved from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Dimensions of each head that rotate (head_dim * partial_rotary_factor).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

fn get_f64(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("`{key}` must be a number")),
    }
}

fn require(obj: &serde_json::Map<String, Value>, key: &str) -> Result<f64, String> {
    get_f64(obj, key)?.ok_or_else(|| format!("`{key}` is required"))
}

impl RopeScaling {
    /// Parse a `rope_scaling` object; the error string says what is wrong or unsupported.
    /// `original_max_position_embeddings` is the config's top-level key (LongRoPE reads it there).
    pub fn from_json(
        v: &Value,
        max_position_embeddings: usize,
        original_max_position_embeddings: Option<usize>,
    ) -> Result<Self, String> {
        let obj = v.as_object().ok_or("expected an object")?;
        let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear { factor: require(obj, "factor")? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: require(obj, "factor")?,
                low_freq_factor: require(obj, "low_freq_factor")?,
                high_freq_factor: require(obj, "high_freq_factor")?,
                original_max_position_embeddings: require(obj, "original_max_position_embeddings")?,
            }),
            "yarn" => {
                let factor = require(obj, "factor")?;
                // As transformers 4.57: `factor` is used as given; the original context length
                // (for the correction range) defaults to max_position_embeddings.
                let original =
                    get_f64(obj, "original_max_position_embeddings")?.unwrap_or(max_position_embeddings as f64);
                let mscale = get_f64(obj, "mscale")?;
                let mscale_all_dim = get_f64(obj, "mscale_all_dim")?;
                let attention_factor = match (get_f64(obj, "attention_factor")?, mscale, mscale_all_dim) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        yarn_mscale(factor, m) / yarn_mscale(factor, ma)
                    }
                    _ => yarn_mscale(factor, 1.0),
                };
                Ok(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: get_f64(obj, "beta_fast")?.unwrap_or(32.0),
                    beta_slow: get_f64(obj, "beta_slow")?.unwrap_or(1.0),
                    attention_factor,
                    truncate: obj.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                })
            }
            "longrope" => {
                let factors = |key: &str| -> Result<Vec<f64>, String> {
                    obj.get(key)
                        .and_then(Value::as_array)
                        .ok_or(format!("`{key}` (a list of numbers) is required"))?
                        .iter()
                        .map(|x| x.as_f64().ok_or(format!("`{key}` must hold numbers only")))
                        .collect()
                };
                // As transformers 4.57: with a top-level original length, factor = max / original.
                let (original, factor) = match original_max_position_embeddings {
                    Some(o) if o > 0 => (o, max_position_embeddings as f64 / o as f64),
                    _ => (max_position_embeddings, get_f64(obj, "factor")?.unwrap_or(1.0)),
                };
                let attention_factor = match get_f64(obj, "attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                Ok(RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                })
            }
            "dynamic" => Ok(RopeScaling::Dynamic { factor: require(obj, "factor")?, max_position_embeddings }),
            other => Err(format!(
                "rope type {other:?} is not supported (supported: default, linear, llama3, yarn, longrope, dynamic)"
            )),
        }
    }
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeConfig {
    /// The per-frequency factor lists that must have `rotary_dim / 2` entries, checked on load.
    pub fn check(&self) -> Result<(), String> {
        if let RopeScaling::LongRope { short_factor, long_factor, .. } = &self.scaling {
            for (key, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() != self.rotary_dim / 2 {
                    return Err(format!(
                        "`{key}` has {} entries, expected rotary_dim / 2 = {}",
                        f.len(),
                        self.rotary_dim / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// Inverse frequencies (length rotary_dim / 2) and the factor cos and sin are scaled by,
    /// for a call whose positions reach `seq_len - 1` (the dynamic types depend on it).
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let dim = self.rotary_dim;
        // As transformers: float32 exponent, float32 power.
        let base: Vec<f32> =
            (0..dim / 2).map(|i| 1.0f32 / (self.theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
        match &self.scaling {
            RopeScaling::Default => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / *factor as f32).collect(), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let out = base
                    .iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .map(|f| f as f32)
                    .collect();
                (out, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let d = dim as f64;
                let theta = self.theta;
                let correction =
                    |rot: f64| (d * (original_max_position_embeddings / (rot * 2.0 * PI)).ln()) / (2.0 * theta.ln());
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let out = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolation)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                        let extrapolation_factor = 1.0 - ramp;
                        let interpolation = extrapolation / *factor as f32;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                (out, *attention_factor as f32)
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor } => {
                let ext = if seq_len > *original_max_position_embeddings { long_factor } else { short_factor };
                // transformers: 1 / (ext_factors * base ** (arange(0, dim, 2) / dim)), in float32.
                let out = (0..dim / 2)
                    .map(|i| {
                        1.0f32
                            / (ext.get(i).copied().unwrap_or(1.0) as f32
                                * (self.theta as f32).powf((2 * i) as f32 / dim as f32))
                    })
                    .collect();
                (out, *attention_factor as f32)
            }
            RopeScaling::Dynamic { factor, max_position_embeddings } => {
                if seq_len <= *max_position_embeddings {
                    return (base, 1.0);
                }
                let d = dim as f64;
                let theta = self.theta
                    * ((factor * seq_len as f64 / *max_position_embeddings as f64) - (factor - 1.0))
                        .powf(d / (d - 2.0));
                let out = (0..dim / 2).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
                (out, 1.0)
            }
        }
    }

    /// cos and sin tables for the given positions (one row per sequence), in `dtype`, laid
    /// out `[batch, seq, heads, head_dim]` for each head count in `heads` (queries and keys),
    /// so that rotating a projection's output is element-wise on contiguous tensors.
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<usize>],
        heads: &[usize],
        head_dim: usize,
        dtype: DType,
        device: &B::Device,
    ) -> RopeTables<B> {
        // transformers' dynamic types look at max(position_ids) + 1 of the call.
        let seq_len = positions.iter().flatten().max().map_or(0, |p| p + 1);
        let (inv_freq, scale) = self.inv_freq(seq_len);
        let half = inv_freq.len();
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        // One head's row: rotary dims scaled cos / sin, pass-through dims 1 / 0.
        let mut cos = Vec::with_capacity(b * t * head_dim);
        let mut sin = Vec::with_capacity(b * t * head_dim);
        for row in positions {
            for &p in row {
                let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos() * scale));
                    sin.extend(angles.iter().map(|a| a.sin() * scale));
                }
                cos.extend(std::iter::repeat_n(1.0, head_dim - 2 * half));
                sin.extend(std::iter::repeat_n(0.0, head_dim - 2 * half));
            }
        }
        let make = |v: &[f32], h: usize| {
            let full: Vec<f32> =
                v.chunks(head_dim).flat_map(|r| std::iter::repeat_n(r, h).flatten().copied()).collect();
            Tensor::<B, 4>::from_data(TensorData::new(full, [b, t, h, head_dim]), (device, DType::F32)).cast(dtype)
        };
        let mut distinct = heads.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        // rotate_half as a signed permutation: (x R)[j] = -x[j + half] (j < half),
        // x[j - half] (half <= j < rotary_dim), 0 on pass-through dims. Exact in any dtype.
        let mut r = vec![0.0f32; head_dim * head_dim];
        for j in 0..half {
            r[(j + half) * head_dim + j] = -1.0;
            r[j * head_dim + j + half] = 1.0;
        }
        RopeTables {
            by_heads: distinct.into_iter().map(|h| (h, make(&cos, h), make(&sin, h))).collect(),
            rotate_half: Tensor::<B, 2>::from_data(TensorData::new(r, [head_dim, head_dim]), (device, DType::F32))
                .cast(dtype),
            query_scale: None,
        }
    }
}

/// Precomputed cos/sin for one forward call.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// Per head count: cos and sin `[batch, seq, heads, head_dim]`.
    pub by_heads: Vec<(usize, Tensor<B, 4>, Tensor<B, 4>)>,
    /// `[head_dim, head_dim]`
    pub rotate_half: Tensor<B, 2>,
    /// Ministral 3: the queries' factor per position `[batch, seq, 1, 1]`, applied after RoPE
    /// ([`crate::model::config::QueryScale`]).
    pub query_scale: Option<Tensor<B, 4>>,
}

impl<B: Backend> RopeTables<B> {
    /// Rotate `x`: `[batch, seq, heads, head_dim]` -> same shape, as
    /// `x * cos + rotate_half(x) * sin`. Only the first `rotary_dim` dimensions rotate (Phi-3's
    /// partial rotary factor); the tables leave the rest unchanged.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, t, h, d] = x.dims();
        let Some((_, cos, sin)) = self.by_heads.iter().find(|(n, _, _)| *n == h) else {
            unreachable!("rotary tables are built for every head count of the model");
        };
        let rotated = x.clone().reshape([b * t * h, d]).matmul(self.rotate_half.clone()).reshape([b, t, h, d]);
        x * cos.clone() + rotated * sin.clone()
    }

    /// Rotate the queries `[batch, seq, heads, head_dim]` and apply the query scale, if any.
    pub fn apply_query(&self, q: Tensor<B, 4>) -> Tensor<B, 4> {
        let q = self.apply(q);
        match &self.query_scale {
            Some(s) => q * s.clone(),
            None => q,
        }
    }
}
