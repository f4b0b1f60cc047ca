//! The sparse mixture-of-experts MLP (qwen3_moe, qwen2_moe, mixtral, olmoe, gpt-oss, Qwen 3.5 /
//! Qwen3-Next, DeepSeek-V2 / V3): one more kind of MLP inside the decoder layer. A router picks
//! `top_k` experts per token ([`choose_experts`]: softmax, gpt-oss's top-k softmax, DeepSeek's
//! biased and group-limited sigmoid or group-limited softmax); only those run.
//!
//! Compute follows shared/docs/MOE-NOTES.md §7.2 (dropless, sort-based, split LoRA):
//! 1. router logits `[T, E]` -> softmax in f32; the top-k experts are chosen on the host (one
//!    device read per layer), the weights gathered on the device so gradients reach the router
//!    logits through the softmax (and the renormalisation), as in transformers;
//! 2. the `T * k` (token, expert) assignments are sorted by expert (stable), the tokens gathered
//!    into that order once, and each expert with work runs its two projections on its slice
//!    (a `LoraLinear` each, so its LoRA delta applies to its routed rows only, and `W + BA` is
//!    never formed);
//! 3. the outputs are weighted, put back in assignment order with the inverse permutation (a
//!    gather, no scatter-add) and summed over k.
//!
//! Time and memory scale with `T * k`, never with the number of experts.

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, DType, Int, Tensor, TensorData};

use crate::lora::LoraLinear;
use crate::model::config::{ExpertActivation, Routing};
use crate::model::mlp::{apply_activation, Mlp};
use crate::ops::TemperBackend;

/// One expert: transformers 5's `experts.gate_up_proj[e]` (`[2I, H]`, gate rows then up rows;
/// gpt-oss: its `[H, 2I]` transposed, gate and up interleaved) and `experts.down_proj[e]`
/// (`[H, I]`), with gpt-oss's biases.
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    pub gate_up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
}

#[derive(Module, Debug)]
pub struct MoeBlock<B: Backend> {
    /// The router, `mlp.gate`: `[E, H]`.
    pub gate: LoraLinear<B>,
    pub experts: Vec<Expert<B>>,
    /// Qwen2-MoE: an always-on expert, scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert: Option<Mlp<B>>,
    pub shared_expert_gate: Option<LoraLinear<B>>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    #[module(skip)]
    pub routing: Routing,
    /// The router's module name under `mlp.`: `gate`, or gpt-oss's `router`.
    #[module(skip)]
    pub router_name: &'static str,
    #[module(skip)]
    pub activation: ExpertActivation,
    /// DeepSeek: the routed sum's scale (`routed_scaling_factor`; 1 elsewhere).
    pub routed_scaling: f64,
    /// DeepSeek-V3: `mlp.gate.e_score_correction_bias`, added to the scores for the choice only
    /// (a frozen buffer, kept on the host where the choice is made).
    #[module(skip)]
    pub score_bias: Option<std::sync::Arc<Vec<f32>>>,
    /// DeepSeek: the router computes its logits in f32 (its weight is loaded in f32).
    pub router_f32: bool,
    /// The shared expert's module name under `mlp.` (`shared_expert` or DeepSeek's `shared_experts`).
    #[module(skip)]
    pub shared_name: &'static str,
    /// Llama 4: the experts see `w·x` and their outputs are summed unweighted.
    pub scale_input: bool,
}

/// The routing of one call, for the load-balancing loss and for tests.
#[derive(Debug, Clone)]
pub struct RouterOutput<B: Backend> {
    /// Raw router logits `[T, E]` (f32).
    pub logits: Tensor<B, 2>,
    /// Per token, the chosen experts in transformers' top-k order (descending probability).
    pub experts: Vec<Vec<usize>>,
}

impl<B: Backend> MoeBlock<B> {
    /// A block with `m`'s routing and activation; the router is `mlp.{router_name}`.
    pub fn new(
        m: &crate::model::config::MoeConfig,
        gate: LoraLinear<B>,
        router_name: &'static str,
        experts: Vec<Expert<B>>,
        shared_expert: Option<Mlp<B>>,
        shared_expert_gate: Option<LoraLinear<B>>,
    ) -> Self {
        MoeBlock {
            gate,
            experts,
            shared_expert,
            shared_expert_gate,
            top_k: m.top_k,
            norm_topk_prob: m.norm_topk_prob,
            routing: m.routing,
            router_name,
            activation: m.activation,
            routed_scaling: m.routed_scaling,
            score_bias: None,
            router_f32: m.router_f32,
            shared_name: m.shared_expert_name,
            scale_input: m.scale_input,
        }
    }
}

impl<B: TemperBackend> MoeBlock<B> {
    /// `[batch, seq, hidden]` -> same.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_routed(x).0
    }

    /// The output and the routing that produced it.
    pub fn forward_routed(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, RouterOutput<B>) {
        let [b, t, h] = x.dims();
        let n = b * t;
        let k = self.top_k;
        let e_count = self.experts.len();
        let device = x.device();
        let dtype = x.dtype();
        let router_in = if self.router_f32 { x.clone().cast(DType::F32) } else { x.clone() };
        let logits = self.gate.forward(router_in).reshape([n, e_count]).cast(DType::F32);
        // Softmax-then-top-k ranks by probability, top-k-then-softmax by logit: the same order.
        let probs = match self.routing {
            Routing::SoftmaxTopK | Routing::SoftmaxGrouped { .. } => activation::softmax(logits.clone(), 1),
            Routing::TopKSoftmax | Routing::SigmoidTopK => logits.clone(),
            Routing::SigmoidGrouped { .. } => activation::sigmoid(logits.clone()),
        };
        // Top-k on the host: one read of [T, E] per layer. Ties keep the lower expert id.
        let host: Vec<f32> = probs.clone().into_data().convert::<f32>().to_vec().unwrap_or_default();
        let chosen: Vec<Vec<usize>> = host
            .chunks(e_count.max(1))
            .take(n)
            .map(|row| choose_experts(row, self.routing, self.score_bias.as_deref().map(Vec::as_slice), k))
            .collect();
        let flat: Vec<i64> = chosen.iter().flatten().map(|&e| e as i64).collect();
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [n, k]), &device);
        let mut weights = probs.gather(1, idx);
        match self.routing {
            Routing::TopKSoftmax => weights = activation::softmax(weights, 1),
            Routing::SigmoidTopK => weights = activation::sigmoid(weights),
            _ => {}
        }
        if self.norm_topk_prob {
            let sum = weights.clone().sum_dim(1);
            weights = match self.routing {
                // DeepseekV3TopkRouter: `/ (sum + 1e-20)`.
                Routing::SigmoidGrouped { .. } => weights / sum.add_scalar(1e-20),
                _ => weights / sum,
            };
        }
        if self.routed_scaling != 1.0 {
            weights = weights.mul_scalar(self.routed_scaling);
        }
        let weights = weights.cast(dtype);

        // Assignment a = token * k + j, sorted stably by expert.
        let s = n * k;
        let mut perm: Vec<usize> = (0..s).collect();
        perm.sort_by_key(|&a| chosen[a / k][a % k]);
        let mut counts = vec![0usize; e_count];
        for &a in &perm {
            counts[chosen[a / k][a % k]] += 1;
        }
        let mut inv = vec![0i64; s];
        for (pos, &a) in perm.iter().enumerate() {
            inv[a] = pos as i64;
        }
        let ints = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v, [s]), &device);
        let tokens_sorted: Vec<i64> = perm.iter().map(|&a| (a / k) as i64).collect();
        let x2 = x.clone().reshape([n, h]);
        let w_sorted = weights.reshape([s]).select(0, ints(perm.iter().map(|&a| a as i64).collect()));
        let mut outputs = Vec::new();
        let mut offset = 0;
        // An expert no token chose still gets a (zero) gradient for its LoRA delta, as in PEFT,
        // whose 3-D delta covers every expert: AdamW then decays and moves it the same way.
        let mut idle: Option<Tensor<B, 1>> = None;
        for (e, &count) in counts.iter().enumerate() {
            if count == 0 {
                for proj in [&self.experts[e].gate_up_proj, &self.experts[e].down_proj] {
                    if let Some(l) = &proj.lora {
                        let z = (l.lora_a.val().sum() + l.lora_b.val().sum()).mul_scalar(0.0);
                        idle = Some(match idle {
                            Some(acc) => acc + z,
                            None => z,
                        });
                    }
                }
                continue;
            }
            // Each expert gathers its rows from the tokens (not a slice of one gathered [T * k, H]
            // tensor: a slice's backward writes a zero tensor of its whole source, once per expert).
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(tokens_sorted[offset..offset + count].to_vec(), [count]),
                &device,
            );
            let mut rows = x2.clone().select(0, idx);
            if self.scale_input {
                rows = rows * w_sorted.clone().slice(offset..offset + count).unsqueeze_dim(1);
            }
            let rows = rows.reshape([1, count, h]);
            outputs.push(self.experts[e].forward(rows, self.activation).reshape([count, h]));
            offset += count;
        }
        let mut y_sorted = Tensor::cat(outputs, 0);
        if let Some(z) = idle {
            y_sorted = y_sorted + z.cast(dtype).unsqueeze::<2>();
        }
        if !self.scale_input {
            y_sorted = y_sorted * w_sorted.unsqueeze_dim(1);
        }
        let y = y_sorted.select(0, ints(inv)).reshape([n, k, h]).sum_dim(1).reshape([b, t, h]);
        let y = match (&self.shared_expert, &self.shared_expert_gate) {
            // DeepSeek's shared experts are added as they are; a gated family always loads its gate.
            (Some(shared), Some(gate)) => y + activation::sigmoid(gate.forward(x.clone())) * shared.forward(x),
            (Some(shared), None) => y + shared.forward(x),
            _ => y,
        };
        (y, RouterOutput { logits, experts: chosen })
    }
}

/// The `k` experts one token's router row chooses, in transformers' order where it is defined
/// (descending score; ties keep the lower id). `row` holds the scores (softmax probabilities,
/// DeepSeek-V3's sigmoids, or gpt-oss's logits). DeepSeek-V3 ranks `row + bias` within the
/// best `topk_group` groups (a group's score: the sum of its two best, masked experts at -inf);
/// DeepSeek-V2's group-limited greedy ranks by the group's best and scores the others 0.
pub fn choose_experts(row: &[f32], routing: Routing, bias: Option<&[f32]>, k: usize) -> Vec<usize> {
    let e_count = row.len();
    let mut scores: Vec<f32> = match bias {
        Some(b) if matches!(routing, Routing::SigmoidGrouped { .. }) => row.iter().zip(b).map(|(s, b)| s + b).collect(),
        _ => row.to_vec(),
    };
    let by_score = |v: &[f32], i: usize, j: usize| v[j].total_cmp(&v[i]).then(i.cmp(&j));
    if let Routing::SigmoidGrouped { groups, topk_group } | Routing::SoftmaxGrouped { groups, topk_group } = routing {
        if groups > 1 && topk_group < groups {
            let per = e_count / groups;
            let group_score: Vec<f32> = scores
                .chunks(per)
                .map(|g| {
                    let mut sorted = g.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    match routing {
                        Routing::SigmoidGrouped { .. } => sorted.iter().take(2).sum(),
                        _ => sorted[0],
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..groups).collect();
            order.sort_by(|&i, &j| by_score(&group_score, i, j));
            let kept = &order[..topk_group];
            let masked = if matches!(routing, Routing::SigmoidGrouped { .. }) { f32::NEG_INFINITY } else { 0.0 };
            for (e, s) in scores.iter_mut().enumerate() {
                if !kept.contains(&(e / per)) {
                    *s = masked;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..e_count).collect();
    order.sort_by(|&i, &j| by_score(&scores, i, j));
    order.truncate(k);
    order
}

impl<B: TemperBackend> Expert<B> {
    /// `[1, rows, hidden]` -> same: `down(act(gate) * up)`, or gpt-oss's clamped GLU.
    pub fn forward(&self, x: Tensor<B, 3>, act: ExpertActivation) -> Tensor<B, 3> {
        let both = self.gate_up_proj.forward(x);
        let [b, t, two_i] = both.dims();
        let i = two_i / 2;
        let hidden = match act {
            ExpertActivation::Glu(f) => {
                let gate = both.clone().slice([0..b, 0..t, 0..i]);
                let up = both.slice([0..b, 0..t, i..two_i]);
                apply_activation(f, gate) * up
            }
            ExpertActivation::ClampGlu { alpha, limit } => {
                // Interleaved: column 2j is gate j, 2j + 1 is up j.
                let pairs = both.reshape([b, t, i, 2]);
                let gate = pairs.clone().slice([0..b, 0..t, 0..i, 0..1]).reshape([b, t, i]).clamp_max(limit);
                let up = pairs.slice([0..b, 0..t, 0..i, 1..2]).reshape([b, t, i]).clamp(-limit, limit);
                let glu = gate.clone() * activation::sigmoid(gate.mul_scalar(alpha));
                up.add_scalar(1.0) * glu
            }
        };
        self.down_proj.forward(hidden)
    }
}

/// The counts of transformers' `load_balancing_loss_func` over every recorded layer: how often
/// each expert was chosen among the real tokens (`real[t]`; all when `None`), and how many
/// (layer, token) rows there are. `[E]` counts and N.
pub fn load_balancing_counts<B: Backend>(
    layers: &[RouterOutput<B>],
    real: Option<&[bool]>,
    num_experts: usize,
) -> (Vec<f32>, usize) {
    let mut counts = vec![0.0f32; num_experts];
    let mut rows = 0;
    for layer in layers {
        for (t, chosen) in layer.experts.iter().enumerate() {
            if real.is_some_and(|r| !r.get(t).copied().unwrap_or(true)) {
                continue;
            }
            rows += 1;
            for &e in chosen {
                counts[e] += 1.0;
            }
        }
    }
    (counts, rows)
}

/// One layer's part of the load-balancing loss `E * sum_e f_e * P_e` (transformers'
/// `load_balancing_loss_func`, Switch Transformer eq. 4 without its 1/k): with `counts` and `rows`
/// from [`load_balancing_counts`] over all layers, `f_e = counts_e / rows` is a constant and
/// `P_e = sum over rows of softmax(logits)_e / rows`, so the loss is the sum over layers of
/// `E / rows^2 * sum_e counts_e * sum_t softmax(logits_t)_e`. Gradients reach the logits only.
pub fn load_balancing_term<B: Backend>(
    logits: Tensor<B, 2>,
    real: Option<&[bool]>,
    counts: &[f32],
    rows: usize,
) -> Tensor<B, 1> {
    let [t, e] = logits.dims();
    let device = logits.device();
    let mut p = activation::softmax(logits.cast(DType::F32), 1);
    if let Some(real) = real {
        let mask: Vec<f32> = (0..t).map(|i| if real.get(i).copied().unwrap_or(true) { 1.0 } else { 0.0 }).collect();
        p = p * Tensor::<B, 1>::from_data(TensorData::new(mask, [t]), (&device, DType::F32)).unsqueeze_dim(1);
    }
    let c = Tensor::<B, 1>::from_data(TensorData::new(counts.to_vec(), [e]), (&device, DType::F32));
    let scale = e as f64 / ((rows.max(1) * rows.max(1)) as f64);
    (p.sum_dim(0).reshape([e]) * c).sum().mul_scalar(scale)
}
