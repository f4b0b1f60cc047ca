//! What llama.cpp's converter does to the Gated DeltaNet's weights, applied to a LoRA pair so
//! that the adapter GGUF fits the base GGUF it is loaded onto (`conversion/qwen.py` of
//! ggml-org/llama.cpp):
//!
//! - `qwen35` / `qwen35moe` (`_LinearAttentionVReorderBase`): when there are fewer key heads than
//!   value heads, the value heads go from grouped-by-key-head order `[g0v0 g0v1 .. g1v0 ..]` to
//!   tiled order `[g0v0 g1v0 .. g0v1 g1v1 ..]` (`_reorder_v_heads`) in the v rows of
//!   `in_proj_qkv`, the rows of `in_proj_z` (`head_dim` dv), `in_proj_b` / `in_proj_a`
//!   (`head_dim` 1) and the columns of `out_proj`. B rows and A columns get the same permutation:
//!   `P (B A) = (P B) A`, `(B A) Pᵀ = B (A Pᵀ)`.
//! - `qwen3next` (`Qwen3NextModel.modify_tensors`): the grouped `in_proj_qkvz`
//!   (`[q_g k_g v_g z_g]` per key head g) is split into `attn_qkv` (all q, all k, all v, each in
//!   key-head order) and `attn_gate` (all z); both keep A. `in_proj_ba` stays grouped (`ssm_ba`).

use serde_json::Value;

/// The DeltaNet's head counts and dims from `config.json` (`text_config` of a wrapper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaNetDims {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
}

impl DeltaNetDims {
    /// `None` when the config has no linear-attention dims (every other model).
    pub fn from_config(cfg: &Value) -> Option<Self> {
        let text = cfg.get("text_config").filter(|t| t.is_object()).unwrap_or(cfg);
        let get = |k: &str| text.get(k).and_then(Value::as_u64).map(|x| x as usize).filter(|&x| x > 0);
        let dims = DeltaNetDims {
            key_heads: get("linear_num_key_heads")?,
            value_heads: get("linear_num_value_heads")?,
            key_dim: get("linear_key_head_dim")?,
            value_dim: get("linear_value_head_dim")?,
        };
        dims.value_heads.is_multiple_of(dims.key_heads).then_some(dims)
    }

    fn ratio(&self) -> usize {
        self.value_heads / self.key_heads
    }
}

/// How one module's pair is rewritten: rows of B kept in the order given (one entry per GGUF
/// tensor), and A's columns permuted.
pub struct Rewrite {
    /// For each GGUF tensor of the module: the B rows it takes, in order (`None`: all, as stored).
    pub b_rows: Vec<Option<Vec<usize>>>,
    /// A's columns in their new order (`None`: unchanged).
    pub a_cols: Option<Vec<usize>>,
}

impl Rewrite {
    fn plain() -> Self {
        Rewrite { b_rows: vec![None], a_cols: None }
    }
}

/// `_reorder_v_heads` as an index map over `heads = key_heads * ratio` blocks of `head_dim`:
/// entry n is the old index of new index n (new order `[ratio, key_heads, head_dim]`).
pub fn tiled_order(key_heads: usize, ratio: usize, head_dim: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(key_heads * ratio * head_dim);
    for j in 0..ratio {
        for g in 0..key_heads {
            out.extend((0..head_dim).map(|d| (g * ratio + j) * head_dim + d));
        }
    }
    out
}

/// The rewrite of `module` for llama.cpp architecture `arch` (see the module docs).
pub fn rewrite(arch: &str, dims: Option<DeltaNetDims>, module: &str) -> Rewrite {
    let Some(d) = dims else {
        return Rewrite::plain();
    };
    let last = module.rsplit('.').next().unwrap_or(module);
    if arch == "qwen3next" && last == "in_proj_qkvz" {
        let group = 2 * d.key_dim + 2 * d.ratio() * d.value_dim;
        let part = |offset: usize, len: usize| -> Vec<usize> {
            (0..d.key_heads).flat_map(|g| (0..len).map(move |i| g * group + offset + i)).collect()
        };
        let v = d.ratio() * d.value_dim;
        let mut qkv = part(0, d.key_dim);
        qkv.extend(part(d.key_dim, d.key_dim));
        qkv.extend(part(2 * d.key_dim, v));
        return Rewrite { b_rows: vec![Some(qkv), Some(part(2 * d.key_dim + v, v))], a_cols: None };
    }
    if !matches!(arch, "qwen35" | "qwen35moe") || d.ratio() == 1 {
        return Rewrite::plain();
    }
    let tiled = |head_dim: usize| tiled_order(d.key_heads, d.ratio(), head_dim);
    match last {
        "in_proj_qkv" => {
            let qk = 2 * d.key_heads * d.key_dim;
            let rows = (0..qk).chain(tiled(d.value_dim).into_iter().map(|i| qk + i)).collect();
            Rewrite { b_rows: vec![Some(rows)], a_cols: None }
        }
        "in_proj_z" => Rewrite { b_rows: vec![Some(tiled(d.value_dim))], a_cols: None },
        "in_proj_b" | "in_proj_a" => Rewrite { b_rows: vec![Some(tiled(1))], a_cols: None },
        "out_proj" if module.contains(".linear_attn.") => {
            Rewrite { b_rows: vec![None], a_cols: Some(tiled(d.value_dim)) }
        }
        _ => Rewrite::plain(),
    }
}

/// Rows `rows` of a row-major matrix with `cols` columns.
pub fn take_rows(data: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| data[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// Columns in the order `order` of a row-major matrix with `order.len()` columns.
pub fn take_cols(data: &[f32], order: &[usize]) -> Vec<f32> {
    let cols = order.len();
    data.chunks_exact(cols).flat_map(|row| order.iter().map(move |&c| row[c])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_order_is_reorder_v_heads() {
        // 2 key heads, 2 value heads each, head_dim 1: [g0v0 g0v1 g1v0 g1v1] -> [g0v0 g1v0 g0v1 g1v1].
        assert_eq!(tiled_order(2, 2, 1), [0, 2, 1, 3]);
        assert_eq!(tiled_order(2, 3, 2), [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        assert_eq!(tiled_order(1, 3, 1), [0, 1, 2]);
    }

    #[test]
    fn qwen3_next_qkvz_splits_into_ungrouped_qkv_and_z() {
        let d = DeltaNetDims { key_heads: 2, value_heads: 4, key_dim: 1, value_dim: 1 };
        // Per group: q k v v z z (6 rows).
        let r = rewrite("qwen3next", Some(d), "model.layers.0.linear_attn.in_proj_qkvz");
        assert_eq!(r.b_rows, vec![Some(vec![0, 6, 1, 7, 2, 3, 8, 9]), Some(vec![4, 5, 10, 11])]);
        assert_eq!(take_cols(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 0, 1]), [3.0, 1.0, 2.0, 6.0, 4.0, 5.0]);
    }
}
