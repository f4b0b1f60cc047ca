//! The recipe's `train:` section.

use serde::{Deserialize, Serialize};

use crate::train::optim::LrSchedule;

/// Precision of the frozen base weights during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 on the CPU, bf16 on CUDA, f32 on wgpu (where f16 hits a Burn fusion bug).
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// `train:` in a recipe. Every optimizer hyper-parameter is explicit (PyTorch defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Global-norm clipping threshold; `null` or 0 disables it.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Evaluate every this many steps (and at the end); `null` = only at the end.
    pub eval_steps: Option<usize>,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints (oldest deleted first).
    pub save_total_limit: Option<usize>,
    /// Recompute each decoder block in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    pub precision: Precision,
    /// Continue from the last complete checkpoint in the output folder.
    pub resume: bool,
    /// Mixture-of-experts models: add the router load-balancing loss (transformers'
    /// `output_router_logits`; off by default, as there).
    pub output_router_logits: bool,
    /// Its coefficient; default: the model's `router_aux_loss_coef`.
    pub router_aux_loss_coef: Option<f64>,
    /// Stop after this many evaluations in a row without an improvement of the eval loss by more
    /// than `early_stopping_threshold` over the best so far (transformers' EarlyStoppingCallback).
    pub early_stopping_patience: Option<usize>,
    pub early_stopping_threshold: f64,
    /// Write the adapter of the lowest eval loss (kept in `best_adapter/` as training goes) as
    /// the run's `adapter/`, instead of the last step's (transformers' `load_best_model_at_end`).
    pub load_best_at_end: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            micro_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-4,
            lr_scheduler: LrSchedule::Cosine,
            warmup_steps: None,
            warmup_ratio: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            seed: 42,
            eval_steps: None,
            save_steps: None,
            save_total_limit: None,
            gradient_checkpointing: false,
            precision: Precision::Auto,
            resume: false,
            output_router_logits: false,
            router_aux_loss_coef: None,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            load_best_at_end: false,
        }
    }
}

impl TrainConfig {
    /// `(key, reason)` of the first impossible value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive =
            |key: &'static str, v: usize| if v == 0 { Err((key, "must be at least 1".to_string())) } else { Ok(()) };
        positive("micro_batch_size", self.micro_batch_size)?;
        positive("gradient_accumulation_steps", self.gradient_accumulation_steps)?;
        if self.max_steps.is_none() {
            positive("epochs", self.epochs)?;
        }
        if let Some(s) = self.max_steps {
            positive("max_steps", s)?;
        }
        for (key, v) in [
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
            ("save_total_limit", self.save_total_limit),
            ("early_stopping_patience", self.early_stopping_patience),
        ] {
            if let Some(v) = v {
                positive(key, v)?;
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(("learning_rate", format!("must be positive, got {}", self.learning_rate)));
        }
        for (key, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err((key, format!("must be in [0, 1), got {v}")));
            }
        }
        if self.early_stopping_threshold.is_nan() || self.early_stopping_threshold < 0.0 {
            return Err(("early_stopping_threshold", format!("must be >= 0, got {}", self.early_stopping_threshold)));
        }
        if self.early_stopping_patience.is_some() && self.eval_steps.is_none() {
            return Err((
                "early_stopping_patience",
                "needs train.eval_steps: patience counts evaluations, and without eval_steps there is only the last"
                    .into(),
            ));
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            return Err(("adam_epsilon", format!("must be positive, got {}", self.adam_epsilon)));
        }
        if let Some(c) = self.router_aux_loss_coef {
            if !(c.is_finite() && c >= 0.0) {
                return Err(("router_aux_loss_coef", format!("must be a finite number >= 0, got {c}")));
            }
            if !self.output_router_logits {
                return Err((
                    "router_aux_loss_coef",
                    "is set but output_router_logits is false: the load-balancing loss is off".into(),
                ));
            }
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(("weight_decay", format!("must be >= 0, got {}", self.weight_decay)));
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..1.0).contains(&r) {
                return Err(("warmup_ratio", format!("must be in [0, 1), got {r}")));
            }
            if self.warmup_steps.is_some() {
                return Err(("warmup_ratio", "set warmup_steps or warmup_ratio, not both".into()));
            }
        }
        Ok(())
    }

    /// Warmup steps for a run of `total` optimizer steps.
    pub fn warmup(&self, total: usize) -> usize {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total as f64).ceil() as usize,
            _ => 0,
        }
    }
}
