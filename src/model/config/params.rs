//! The base model's parameter count, from the derived switches.

use super::DecoderConfig;

impl DecoderConfig {
    /// Number of parameters of the base model (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let qk_norms = match (self.qk_norm, self.qk_norm_whole) {
            (true, true) => q + kv,
            (true, false) => 2 * self.head_dim,
            _ => 0,
        };
        let norms = h * if self.sandwich_norms { 4 } else { 2 } + qk_norms;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let layer_mlp = |l: usize| match &self.moe {
            Some(m) if m.is_sparse(l) => {
                let shared = m.shared_expert_intermediate.map_or(0, |si| 3 * h * si + h);
                m.num_experts * (3 * h * m.expert_intermediate + h) + shared
            }
            _ => mlp,
        };
        (0..self.num_layers).map(|l| attn + layer_mlp(l) + norms).sum::<usize>() + embed + head + h
    }
}
