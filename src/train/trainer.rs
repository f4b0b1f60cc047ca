//! The training loop: batches -> token-weighted loss over the micro-batches of a step ->
//! global-norm clipping -> AdamW -> evaluation, checkpoints, metrics -> the PEFT adapter.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::{batches, Batch, DataConfig, DataStats, Example, Prepared};
use crate::export::{Adapter, HostTensor, WriteMode};
use crate::lora::{apply_adapter, extract_adapter, inject, LoraConfig};
use crate::model::CausalLm;
use crate::ops::dropout::{StepKey, TrainingScope};
use crate::ops::{TemperAutodiff, TemperBackend};
use crate::train::checkpoint::{self, OptimizerMoments, TrainerState};
use crate::train::config::TrainConfig;
use crate::train::metrics::{peak_rss_bytes, MetricLine, MetricsLog};
use crate::train::optim::{clip_global_norm, AdamState, AdamW};
use crate::train::step::{eval_nll, lora_params, micro_batch_grads};
use crate::{Error, Result};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Everything a run needs besides the model and the data.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Written into the adapter config and model card.
    pub base_model: String,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub output_dir: PathBuf,
    /// The recipe as given, copied next to the outputs.
    pub recipe_text: Option<String>,
    pub show_progress: bool,
    /// Stop after this many steps, as if killed (for resume tests).
    pub stop_after_steps: Option<usize>,
    /// The base model's license, carried into the adapter's model card.
    pub base_license: Option<crate::model::license::ModelLicense>,
}

/// `summary.json` of a finished run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub base_model: String,
    pub steps: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub initial_eval_loss: Option<f64>,
    pub final_train_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub final_eval_perplexity: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    pub wall_time_s: f64,
    pub adapter_dir: Option<PathBuf>,
    pub resumed_from_step: Option<usize>,
    /// Early stopping ended the run at this step.
    pub stopped_early_at: Option<usize>,
    /// The lowest eval loss and its step; with `load_best_at_end`, `adapter/` is that step's.
    pub best_eval_step: Option<usize>,
    pub best_eval_loss: Option<f64>,
    pub data: DataStats,
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
    /// The scaled gradients overflowed (only with a loss scale above 1): nothing was updated,
    /// and the step should be redone with a smaller scale.
    pub overflow: bool,
}

/// How to run one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    pub lr: f64,
    pub checkpointing: bool,
    /// Keys the LoRA dropout masks (its `micro_batch` is set per micro-batch).
    pub dropout: StepKey,
    /// The loss is multiplied by this before the backward pass and the gradients divided by it
    /// after (1 but for an f16 base: see [`LossScaler`]).
    pub loss_scale: f64,
    /// A mixture-of-experts model's load-balancing loss coefficient, when that loss is on
    /// (`train.output_router_logits`).
    pub aux_loss_coef: Option<f64>,
}

/// Dynamic loss scaling for an f16 base, as `torch.amp.GradScaler` does it: gradients flowing
/// back through f16 activations underflow to zero below ~6e-8, so the loss is scaled up before
/// the backward pass (the LoRA gradients, f32, are scaled back down). A step whose scaled
/// gradients overflow is redone, on the same micro-batches, with half the scale (GradScaler
/// skips it instead; redoing keeps every batch trained and the run deterministic); after
/// `GROWTH_INTERVAL` good steps the scale doubles. bf16 and f32 have f32's range: scale 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub good_steps: usize,
}

impl LossScaler {
    /// GradScaler's defaults: init_scale 2^16, growth_interval 2000.
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    /// The scaler for a base held in `dtype`, or where a checkpoint left it.
    pub fn for_dtype(dtype: burn::tensor::DType, saved: Option<(f64, usize)>) -> Self {
        match (dtype, saved) {
            (burn::tensor::DType::F16, Some((scale, good_steps))) => Self { scale, good_steps },
            (burn::tensor::DType::F16, None) => Self { scale: Self::INITIAL, good_steps: 0 },
            _ => Self { scale: 1.0, good_steps: 0 },
        }
    }

    /// After a step: `false` if it overflowed and must be redone (the scale is halved).
    pub fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            self.scale /= 2.0;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.scale > 1.0 && self.good_steps >= Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// AdamW with its state and clipping threshold.
pub struct Optimizer<B: AutodiffBackend> {
    pub adamw: AdamW,
    pub state: AdamState<Inner<B>>,
    pub max_grad_norm: Option<f64>,
}

impl<B: AutodiffBackend> Optimizer<B> {
    pub fn new(model: &mut CausalLm<B>, cfg: &TrainConfig) -> Self {
        let device = model.device();
        let shapes: Vec<[usize; 2]> = lora_params(model).iter().map(|(_, p)| p.val().dims()).collect();
        Self {
            adamw: AdamW {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            state: AdamState::zeros(&shapes, &device),
            max_grad_norm: cfg.max_grad_norm,
        }
    }

    fn moments(&self, keys: &[String]) -> Result<OptimizerMoments> {
        let host = |t: &Tensor<Inner<B>, 2>| -> Result<HostTensor> {
            Ok(HostTensor {
                shape: t.dims().to_vec(),
                data: t.clone().into_data().to_vec::<f32>().map_err(|e| Error::InvalidArgument(format!("{e:?}")))?,
            })
        };
        Ok(OptimizerMoments {
            step: self.state.step,
            m: keys.iter().cloned().zip(self.state.m.iter().map(host).collect::<Result<Vec<_>>>()?).collect(),
            v: keys.iter().cloned().zip(self.state.v.iter().map(host).collect::<Result<Vec<_>>>()?).collect(),
        })
    }

    fn restore(
        &mut self,
        keys: &[String],
        saved: &OptimizerMoments,
        device: &burn::tensor::Device<Inner<B>>,
    ) -> Result<()> {
        let find = |list: &[(String, HostTensor)], key: &str| -> Result<Tensor<Inner<B>, 2>> {
            let (_, t) = list
                .iter()
                .find(|(k, _)| k == key)
                .ok_or_else(|| Error::InvalidArgument(format!("checkpoint optimizer state lacks `{key}`")))?;
            Ok(Tensor::from_data(burn::tensor::TensorData::new(t.data.clone(), [t.shape[0], t.shape[1]]), device))
        };
        self.state.step = saved.step;
        self.state.m = keys.iter().map(|k| find(&saved.m, k)).collect::<Result<_>>()?;
        self.state.v = keys.iter().map(|k| find(&saved.v, k)).collect::<Result<_>>()?;
        Ok(())
    }
}

/// One optimizer step over `micro_batches`: the loss is the mean NLL over all their trained
/// tokens (not a mean of per-batch means); gradients are clipped by global norm, then AdamW.
pub fn optimizer_step<B: TemperAutodiff>(
    model: &mut CausalLm<B>,
    opt: &mut Optimizer<B>,
    micro_batches: &[Batch],
    o: StepOptions,
) -> Result<StepStats> {
    let StepOptions { lr, checkpointing, dropout: step, loss_scale, aux_loss_coef } = o;
    let tokens: usize = micro_batches.iter().map(Batch::trained_tokens).sum();
    if tokens == 0 {
        return Err(Error::InvalidArgument("an optimizer step has no trained token (every label is masked)".into()));
    }
    let mut nll: Option<Tensor<Inner<B>, 1>> = None;
    let mut acc: Option<Vec<Tensor<Inner<B>, 2>>> = None;
    for (i, mb) in micro_batches.iter().enumerate() {
        let _dropout = TrainingScope::enter(StepKey { micro_batch: i as u64, ..step });
        let (n, grads) = micro_batch_grads(model, mb, tokens as f64 / loss_scale, checkpointing, aux_loss_coef)?;
        nll = Some(match nll {
            None => n,
            Some(prev) => prev + n,
        });
        acc = Some(match acc {
            None => grads,
            Some(prev) => prev.into_iter().zip(grads).map(|(a, b)| a + b).collect(),
        });
    }
    // One host read per optimizer step.
    let nll: f64 = nll.map_or(f64::NAN, |t| t.into_scalar().elem());
    let loss = nll / tokens as f64;
    if !loss.is_finite() {
        return Err(Error::NonFinite(format!("training loss is {loss}")));
    }
    let mut acc = acc.unwrap_or_default();
    if loss_scale != 1.0 {
        acc = acc.into_iter().map(|g| g.div_scalar(loss_scale)).collect();
    }
    let (grad_norm, grads) = clip_global_norm(acc, opt.max_grad_norm);
    if !grad_norm.is_finite() && loss_scale > 1.0 {
        return Ok(StepStats { loss, grad_norm, lr, tokens, overflow: true });
    }
    if !grad_norm.is_finite() {
        return Err(Error::NonFinite(format!("gradient norm is {grad_norm} (loss {loss})")));
    }
    let mut params = lora_params(model);
    let values: Vec<Tensor<Inner<B>, 2>> = params.iter().map(|(_, p)| p.val().inner()).collect();
    let updated = opt.adamw.step(values, &grads, lr, &mut opt.state);
    for ((_, p), new) in params.iter_mut().zip(updated) {
        **p = Param::initialized(p.id, Tensor::from_inner(new).require_grad());
    }
    Ok(StepStats { loss, grad_norm, lr, tokens, overflow: false })
}

/// Mean NLL per trained token over `examples`, without gradients.
pub fn evaluate<B: TemperBackend>(
    model: &CausalLm<B>,
    examples: &[Example],
    micro_batch_size: usize,
    cfg: &DataConfig,
    pad_id: u32,
) -> (f64, usize) {
    let mut nll = 0.0;
    let mut tokens = 0;
    for batch in batches(examples, micro_batch_size, cfg, pad_id, 0, 0) {
        tokens += batch.trained_tokens();
        nll += eval_nll(model, &batch);
    }
    (if tokens == 0 { f64::NAN } else { nll / tokens as f64 }, tokens)
}

/// Where the next micro-batch comes from; epochs are reshuffled from (seed, epoch).
struct DataCursor<'a> {
    examples: &'a [Example],
    cfg: &'a DataConfig,
    mbs: usize,
    pad_id: u32,
    seed: u64,
    epoch: usize,
    index: usize,
    current: Vec<Batch>,
}

impl<'a> DataCursor<'a> {
    fn next(&mut self) -> Batch {
        loop {
            if self.current.is_empty() {
                self.current = batches(self.examples, self.mbs, self.cfg, self.pad_id, self.seed, self.epoch);
            }
            if let Some(b) = self.current.get(self.index) {
                self.index += 1;
                return b.clone();
            }
            self.epoch += 1;
            self.index = 0;
            self.current.clear();
        }
    }
}

/// Train `model` (base weights loaded) on `data` as `run` says; writes checkpoints, metrics,
/// the loss curve, `summary.json` and `<output>/adapter/`.
pub fn train<B: TemperAutodiff>(
    mut model: CausalLm<B>,
    data: &Prepared,
    pad_id: u32,
    run: &RunConfig,
) -> Result<Summary> {
    let cfg = &run.train;
    cfg.validate().map_err(|(key, reason)| Error::InvalidArgument(format!("train.{key}: {reason}")))?;
    model.config.check_length(run.data.seq_len, "data.seq_len")?;
    let started = Instant::now();
    let device = model.device();
    std::fs::create_dir_all(&run.output_dir).map_err(|e| Error::io(&run.output_dir, e))?;
    if let Some(text) = &run.recipe_text {
        crate::export::write_file_atomically(&run.output_dir.join("recipe.yaml"), text.as_bytes())?;
    }

    let per_epoch = batches(&data.train, cfg.micro_batch_size, &run.data, pad_id, cfg.seed, 0).len();
    let total =
        cfg.max_steps.unwrap_or_else(|| (cfg.epochs * per_epoch).div_ceil(cfg.gradient_accumulation_steps)).max(1);
    let warmup = cfg.warmup(total);

    let resume = if cfg.resume { checkpoint::load_latest(&run.output_dir)? } else { None };
    let mut opt;
    let mut state = match resume {
        Some((state, adapter, moments, dir)) => {
            apply_adapter(&mut model, &adapter)?;
            opt = Optimizer::new(&mut model, cfg);
            let keys: Vec<String> = lora_params(&mut model).into_iter().map(|(k, _)| k).collect();
            opt.restore(&keys, &moments, &device)?;
            eprintln!("resuming from {} (step {}/{})", dir.display(), state.step, state.total_steps);
            if state.total_steps != total {
                return Err(Error::InvalidArgument(format!(
                    "the checkpoint in {} was made for {} steps but this recipe gives {total}: resume with the same recipe",
                    dir.display(),
                    state.total_steps
                )));
            }
            state
        }
        None => {
            inject(&mut model, &run.lora, cfg.seed)?;
            opt = Optimizer::new(&mut model, cfg);
            TrainerState {
                step: 0,
                total_steps: total,
                epoch: 0,
                batch_index: 0,
                seed: cfg.seed,
                tokens_seen: 0,
                elapsed_s: 0.0,
                last_loss: None,
                last_eval_loss: None,
                loss_scale: None,
                best_eval: None,
                evals_without_improvement: 0,
            }
        }
    };
    let resumed_from = (state.step > 0).then_some(state.step);
    let mut log = MetricsLog::open(&run.output_dir.join("metrics.jsonl"), Some(state.step))?;
    let keys: Vec<String> = lora_params(&mut model).into_iter().map(|(k, _)| k).collect();
    let mut cursor = DataCursor {
        examples: &data.train,
        cfg: &run.data,
        mbs: cfg.micro_batch_size,
        pad_id,
        seed: cfg.seed,
        epoch: state.epoch,
        index: state.batch_index,
        current: Vec::new(),
    };

    let eval_now = |model: &CausalLm<B>| {
        data.eval
            .as_ref()
            .filter(|e| !e.is_empty())
            .map(|e| evaluate(&model.valid(), e, cfg.micro_batch_size, &run.data, pad_id))
    };
    let initial_eval = if state.step == 0 { eval_now(&model).map(|(l, _)| l) } else { None };
    // The eval loss the next one is compared with: before training, or the last before a resume.
    let mut previous_eval = initial_eval.map(|l| (0, l)).or(state.last_eval_loss.map(|l| (state.step, l)));
    let bar = progress_bar(run.show_progress, total, state.step);
    let plain_every = (total / 20).max(1);
    let elapsed_before = state.elapsed_s;
    let clock = Instant::now();
    let tokens_before = state.tokens_seen;
    let dtype = model.dtype();
    let mut scaler = LossScaler::for_dtype(dtype, state.loss_scale);
    if dtype == burn::tensor::DType::F16 && state.step == 0 {
        eprintln!("f16 base: dynamic loss scaling from {} (as torch.amp.GradScaler)", scaler.scale);
    }

    let needs_eval = if cfg.early_stopping_patience.is_some() {
        Some("train.early_stopping_patience")
    } else {
        cfg.load_best_at_end.then_some("train.load_best_at_end")
    };
    if let (Some(key), true) = (needs_eval, data.eval.as_ref().is_none_or(Vec::is_empty)) {
        return Err(Error::InvalidArgument(format!("{key} needs evaluation rows: set data.eval or data.val_split")));
    }
    let best_dir = run.output_dir.join("best_adapter");
    // A resumed run whose last checkpoint had already run out of patience is finished.
    let mut stopped_early_at = cfg
        .early_stopping_patience
        .filter(|&p| state.step > 0 && state.evals_without_improvement >= p)
        .map(|_| state.step);
    while state.step < total && stopped_early_at.is_none() {
        if run.stop_after_steps.is_some_and(|s| state.step >= s) {
            break;
        }
        let micro: Vec<Batch> = (0..cfg.gradient_accumulation_steps).map(|_| cursor.next()).collect();
        let lr = cfg.learning_rate * cfg.lr_scheduler.factor(state.step, warmup, total);
        let stats = loop {
            let aux_loss_coef = if cfg.output_router_logits {
                model.config.moe.as_ref().map(|m| cfg.router_aux_loss_coef.unwrap_or(m.router_aux_loss_coef))
            } else {
                None
            };
            let o = StepOptions {
                lr,
                checkpointing: cfg.gradient_checkpointing,
                dropout: StepKey { seed: cfg.seed, step: state.step as u64, micro_batch: 0 },
                loss_scale: scaler.scale,
                aux_loss_coef,
            };
            let stats = optimizer_step(&mut model, &mut opt, &micro, o).map_err(|e| match e {
                Error::NonFinite(what) => Error::NonFinite(format!(
                    "{what} at step {}; training stopped, nothing written for this step (the last checkpoint is intact)",
                    state.step + 1
                )),
                other => other,
            })?;
            if scaler.update(stats.overflow) {
                break stats;
            }
        };
        state.loss_scale = (dtype == burn::tensor::DType::F16).then_some((scaler.scale, scaler.good_steps));
        state.step += 1;
        state.tokens_seen += stats.tokens;
        state.epoch = cursor.epoch;
        state.batch_index = cursor.index;
        state.last_loss = Some(stats.loss);
        let elapsed = elapsed_before + clock.elapsed().as_secs_f64();
        state.elapsed_s = elapsed;
        let tps = (state.tokens_seen - tokens_before) as f64 / clock.elapsed().as_secs_f64().max(1e-9);
        log.push(MetricLine::Train {
            step: state.step,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            tokens_per_s: tps,
            elapsed,
        })?;
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {:.4} lr {lr:.2e} {tps:.0} tok/s", stats.loss));
        if bar.is_hidden() && run.show_progress && (state.step % plain_every == 0 || state.step == total) {
            eprintln!(
                "step {}/{total} loss {:.4} lr {lr:.2e} grad_norm {:.3} {tps:.0} tok/s",
                state.step, stats.loss, stats.grad_norm
            );
        }
        let mut last = state.step == total;
        if last || cfg.eval_steps.is_some_and(|n| state.step % n == 0) {
            if let Some((loss, tokens)) = eval_now(&model) {
                state.last_eval_loss = Some(loss);
                // Early stopping as transformers' EarlyStoppingCallback: an evaluation improves
                // when it beats the best so far by more than the threshold.
                let improved = state.best_eval.is_none_or(|(_, b)| loss < b - cfg.early_stopping_threshold);
                state.evals_without_improvement = if improved { 0 } else { state.evals_without_improvement + 1 };
                if state.best_eval.is_none_or(|(_, b)| loss < b) {
                    state.best_eval = Some((state.step, loss));
                    if cfg.load_best_at_end {
                        extract_adapter(&mut model, &run.lora, &run.base_model)?.write(
                            &best_dir,
                            WriteMode::Replace,
                            &[],
                        )?;
                    }
                }
                log.push(MetricLine::Eval {
                    step: state.step,
                    eval_loss: loss,
                    eval_perplexity: loss.exp(),
                    eval_tokens: tokens,
                })?;
                let change =
                    previous_eval.map_or(String::new(), |(at, p)| format!(", {:+.4} since step {at}", loss - p));
                let line = format!("step {}: eval loss {loss:.4} (perplexity {:.3}{change})", state.step, loss.exp());
                previous_eval = Some((state.step, loss));
                // On a terminal above the progress bar; otherwise (the bar is hidden) a plain line.
                if !bar.is_hidden() {
                    bar.println(line);
                } else if run.show_progress {
                    eprintln!("{line}");
                }
                if !last && cfg.early_stopping_patience.is_some_and(|p| state.evals_without_improvement >= p) {
                    let (at, best) = state.best_eval.unwrap_or((state.step, loss));
                    let line = format!(
                        "early stopping at step {}: {} evaluations without an improvement of more than {} (best eval loss {best:.4} at step {at})",
                        state.step, state.evals_without_improvement, cfg.early_stopping_threshold
                    );
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.println(line);
                    }
                    stopped_early_at = Some(state.step);
                    last = true;
                }
            }
        }
        if last || cfg.save_steps.is_some_and(|n| state.step % n == 0) {
            let adapter = extract_adapter(&mut model, &run.lora, &run.base_model)?;
            checkpoint::save(&run.output_dir, &state, &adapter, &opt.moments(&keys)?, cfg.save_total_limit)?;
        }
        if stopped_early_at.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    crate::export::write_file_atomically(&run.output_dir.join("loss_curve.svg"), log.svg().as_bytes())?;

    let finished = state.step == total || stopped_early_at.is_some();
    let adapter_dir = if finished {
        let adapter = match (cfg.load_best_at_end, state.best_eval) {
            // The best step's adapter, written when it was evaluated (it survives a resume).
            (true, Some(_)) => Adapter::read(&best_dir)?,
            _ => extract_adapter(&mut model, &run.lora, &run.base_model)?,
        };
        let dir = run.output_dir.join("adapter");
        let card = model_card(run, &state, &adapter);
        adapter.write(&dir, WriteMode::Replace, &[("README.md", card.into_bytes())])?;
        Some(dir)
    } else {
        None
    };
    let wall = started.elapsed().as_secs_f64();
    let summary = Summary {
        base_model: run.base_model.clone(),
        steps: state.step,
        tokens: state.tokens_seen,
        tokens_per_s: (state.tokens_seen - tokens_before) as f64 / clock.elapsed().as_secs_f64().max(1e-9),
        initial_eval_loss: initial_eval,
        final_train_loss: state.last_loss,
        final_eval_loss: state.last_eval_loss,
        final_eval_perplexity: state.last_eval_loss.map(f64::exp),
        peak_rss_bytes: peak_rss_bytes(),
        wall_time_s: wall,
        adapter_dir,
        resumed_from_step: resumed_from,
        stopped_early_at,
        best_eval_step: state.best_eval.map(|(s, _)| s),
        best_eval_loss: state.best_eval.map(|(_, l)| l),
        data: data.stats.clone(),
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    crate::export::write_file_atomically(&run.output_dir.join("summary.json"), json.as_bytes())?;
    Ok(summary)
}

fn progress_bar(show: bool, total: usize, at: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("train {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(at as u64);
    bar
}

fn model_card(run: &RunConfig, state: &TrainerState, adapter: &Adapter) -> String {
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    let (front, license) = match &run.base_license {
        Some(l) => (crate::export::model_card::license_front_matter(l), crate::export::model_card::license_section(l)),
        None => (String::new(), String::new()),
    };
    format!(
        "---\nbase_model: {base}\nlibrary_name: peft\n{front}tags:\n- lora\n- temper\n---\n\n# LoRA adapter for {base}\n\n\
         Trained with [Temper](https://crates.io/crates/temper-lm).\n\n\
         - dataset: `{data}`\n- LoRA: r={r}, lora_alpha={alpha}, modules: {mods}\n- steps: {steps}, trained tokens: {tokens}\n\
         - final train loss: {tl}\n- final eval loss: {el}\n\n{license}## Recipe\n\n```yaml\n{recipe}\n```\n",
        base = run.base_model,
        data = run.data.train.display(),
        r = run.lora.r,
        alpha = run.lora.lora_alpha,
        mods = adapter.config_json()["target_modules"],
        steps = state.step,
        tokens = state.tokens_seen,
        tl = fmt(state.last_loss),
        el = fmt(state.last_eval_loss),
        recipe = run.recipe_text.as_deref().unwrap_or("(library API, no recipe)").trim_end(),
    )
}
