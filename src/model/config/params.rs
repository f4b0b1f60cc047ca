//! The base model's parameter count, from the derived switches.

use super::{DecoderConfig, Mixer};

impl DecoderConfig {
    /// Number of parameters of the base model (tied embeddings counted once). A composite
    /// checkpoint counts its text decoder only; Qwen 3.5's `mtp.*` weights are not counted.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let per_layer = |l: usize| {
            let mixer = match (self.layer_mixers.get(l), &self.delta_net, &self.mla) {
                (Some(Mixer::GatedDeltaNet), Some(d), _) => d.num_parameters(h),
                (Some(Mixer::LatentAttention), _, Some(m)) => m.num_parameters(h, self.num_heads),
                _ => self.attention_parameters(),
            };
            mixer + self.mlp_parameters(l) + h * if self.sandwich_norms { 4 } else { 2 }
        };
        (0..self.num_layers).map(per_layer).sum::<usize>() + embed + head + h
    }

    /// One attention block: projections (a gated `q_proj` has twice the rows), biases, q/k norms.
    fn attention_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let q_rows = if self.attn_output_gate { 2 * q } else { q };
        let mut attn = h * q_rows + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q_rows + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        attn + match (self.qk_norm, self.qk_norm_whole) {
            (true, true) => q + kv,
            (true, false) => 2 * self.head_dim,
            _ => 0,
        }
    }

    /// Layer `l`'s MLP: dense, or the router, experts and any shared expert with its gate.
    fn mlp_parameters(&self, l: usize) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match &self.moe {
            Some(m) if m.is_sparse(l) => {
                let gate = if m.shared_expert_gated { h } else { 0 };
                let shared = m.shared_expert_intermediate.map_or(0, |si| 3 * h * si + gate);
                m.num_experts * (3 * h * m.expert_intermediate + h) + shared
            }
            _ => 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 },
        }
    }
}
