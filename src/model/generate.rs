//! Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p,
//! seeded), stopping at an end-of-sequence token or a token budget.

use burn::tensor::{Int, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::{CausalLm, KvCache};
use crate::ops::TemperBackend;
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f64,
    pub seed: u64,
    /// Token ids that end generation.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 42, stop_tokens: Vec::new() }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Generate after `prompt` (token ids); `on_token` sees each new id as it is chosen.
/// Returns the new ids (the stop token included when one ended generation).
pub fn generate<B: TemperBackend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    cfg: &SamplingConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt encodes to no tokens".into()));
    }
    model.config.check_length(prompt.len() + cfg.max_new_tokens, "the prompt plus max_new_tokens")?;
    let device = model.device();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new(model.config.num_layers);
    let mut out = Vec::new();
    let mut step_input: Vec<u32> = prompt.to_vec();
    for _ in 0..cfg.max_new_tokens {
        let t = step_input.len();
        let ids: Vec<i64> = step_input.iter().map(|&x| x as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, t]), &device);
        let ctx = model.causal_context(1, t, cache.len);
        let hidden = model.hidden_states(ids, &ctx, Some(&mut cache));
        let [_, _, h] = hidden.dims();
        let last = hidden.slice([0..1, t - 1..t, 0..h]);
        let logits: Vec<f32> = model
            .logits(last)
            .into_data()
            .to_vec()
            .map_err(|e| Error::InvalidArgument(format!("reading logits: {e:?}")))?;
        let next = choose(&logits, cfg, &mut rng);
        out.push(next);
        on_token(next);
        if cfg.stop_tokens.contains(&next) {
            break;
        }
        step_input = vec![next];
    }
    Ok(out)
}

/// Pick the next token from one row of logits.
pub fn choose(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64 / cfg.temperature)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    if cfg.top_k > 0 {
        cand.truncate(cfg.top_k);
    }
    let max = cand.first().map_or(0.0, |c| c.1);
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= cfg.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        cand.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r: f64 = rng.random();
    let mut acc = 0.0;
    for (c, p) in cand.iter().zip(&probs) {
        acc += p;
        if r < acc {
            return c.0;
        }
    }
    cand.last().map_or(0, |c| c.0)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// End-of-sequence ids: config.json's, generation_config.json's and the tokenizer's.
pub fn stop_tokens(
    dir: &std::path::Path,
    cfg: &crate::model::DecoderConfig,
    tokenizer_eos: Option<u32>,
) -> Result<Vec<u32>> {
    let mut ids = cfg.eos_token_ids.clone();
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
            Some(serde_json::Value::Array(a)) => ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
            _ => {}
        }
    }
    ids.extend(tokenizer_eos);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
