//! Multi-head latent attention (DeepSeek-V2 / V3 / V3.2, Kimi K2, Moonlight): keys and values
//! come from a low-rank latent of each token plus one rotary key shared by all heads
//! ([`crate::model::config::MlaConfig`] has the tensors). The attention itself is
//! [`ops::attention`], with a value head dim that may differ from the query/key one.
//!
//! Generation caches the expanded per-head keys and values ([`LayerCache`], as for every other
//! attention layer), not the compressed latent transformers caches: re-expanding the latent at
//! every step would run `kv_b_proj` (and its LoRA delta) over the whole past once per new
//! token, and absorbing `kv_b_proj` into the queries (DeepSeek's inference trick) needs the
//! adapter merged first. The cost is memory: `heads · (qk_dim + v_dim)` values per token and
//! layer instead of `kv_lora_rank + rope_dim` (9x for Moonlight's 16 heads, 71x for
//! DeepSeek-V3's 128), which Temper's generation (evaluation, chat with the models one GPU
//! trains) affords.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::lora::LoraLinear;
use crate::model::attention::{AttentionMask, LayerCache};
use crate::model::norm::RmsNorm;
use crate::model::rope::RopeTables;
use crate::ops::{self, AttentionSpec, TemperBackend};

/// One layer's MLA (`self_attn.*` in the checkpoint). Field names follow the checkpoint.
#[derive(Module, Debug)]
pub struct LatentAttention<B: Backend> {
    /// The queries straight from the hidden state (`q_lora_rank: null`)...
    pub q_proj: Option<LoraLinear<B>>,
    /// ...or through the query latent: `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    pub q_a_proj: Option<LoraLinear<B>>,
    pub q_a_layernorm: Option<RmsNorm<B>>,
    pub q_b_proj: Option<LoraLinear<B>>,
    /// `[kv_lora_rank + rope_dim, hidden]`: the latent, then the shared rotary key.
    pub kv_a_proj_with_mqa: LoraLinear<B>,
    pub kv_a_layernorm: RmsNorm<B>,
    /// `[heads · (nope_dim + v_dim), kv_lora_rank]`: per head, its key (non-rotary part) and value.
    pub kv_b_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub num_heads: usize,
    pub kv_lora_rank: usize,
    pub nope_dim: usize,
    pub rope_dim: usize,
    pub v_dim: usize,
    pub scale: f64,
    /// DeepSeek's rotary layout: dims `2i` and `2i + 1` form pair `i` (V2's complex rotation,
    /// V3's `rope_interleave`). They are de-interleaved (evens, then odds) before the
    /// rotate-half rotation, as transformers' `apply_rotary_pos_emb_interleave` returns them; q
    /// and k get the same order, so their dot products are those of the interleaved rotation.
    pub interleaved: bool,
}

impl<B: TemperBackend> LatentAttention<B> {
    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`. With `cache`, the new keys and
    /// values are appended to it and attention covers the cached positions too.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: &AttentionMask,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, dn, dr, dv, r) = (self.num_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank);
        let dq = dn + dr;
        let q = match (&self.q_proj, &self.q_a_proj, &self.q_a_layernorm, &self.q_b_proj) {
            (Some(q), _, _, _) => q.forward(x.clone()),
            (None, Some(a), Some(norm), Some(bp)) => bp.forward(norm.forward(a.forward(x.clone()))),
            // The loader always builds one of the two query paths.
            _ => unreachable!("latent attention built without a query projection"),
        };
        let q = q.reshape([b, t, h, dq]);
        let q_nope = q.clone().slice([0..b, 0..t, 0..h, 0..dn]);
        let q_rot = q.slice([0..b, 0..t, 0..h, dn..dq]);
        let compressed = self.kv_a_proj_with_mqa.forward(x);
        let latent = compressed.clone().slice([0..b, 0..t, 0..r]);
        let k_rot = compressed.slice([0..b, 0..t, r..r + dr]).reshape([b, t, 1, dr]);
        let kv = self.kv_b_proj.forward(self.kv_a_layernorm.forward(latent)).reshape([b, t, h, dn + dv]);
        let k_nope = kv.clone().slice([0..b, 0..t, 0..h, 0..dn]);
        let v = kv.slice([0..b, 0..t, 0..h, dn..dn + dv]);
        let q_rot = rope.apply(self.pairs_first(q_rot));
        let k_rot = rope.apply(self.pairs_first(k_rot)).expand([b, t, h, dr]);
        let q = Tensor::cat(vec![q_nope, q_rot], 3).swap_dims(1, 2);
        let mut k = Tensor::cat(vec![k_nope, k_rot], 3).swap_dims(1, 2);
        let mut v = v.swap_dims(1, 2);
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 2);
                v = Tensor::cat(vec![prev.v, v], 2);
            }
            *slot = Some(LayerCache { k: k.clone(), v: v.clone() });
        }
        let spec = AttentionSpec {
            past_len: mask.past_len,
            segments: mask.segments.clone(),
            ..AttentionSpec::causal(self.scale)
        };
        let out = ops::attention(q, k, v, &spec).swap_dims(1, 2).reshape([b, t, h * dv]);
        self.o_proj.forward(out)
    }

    /// DeepSeek's interleaved rotary dims `[x0, x1, x2, x3, ...]` as `[x0, x2, ..., x1, x3, ...]`
    /// (unchanged when the layout is already rotate-half).
    fn pairs_first(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.interleaved {
            crate::model::attention::pairs_first(x)
        } else {
            x
        }
    }
}
