//! `temper bench`: LoRA training (or forward) steps on a model built from its config with
//! random weights, reporting median step time, tokens/s, peak memory and the FLOP rate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use temper::data::Batch;
use temper::lora::{inject, LoraConfig};
use temper::model::{CausalLm, DecoderConfig, HfConfig, WeightSource};
use temper::ops::dropout::StepKey;
use temper::ops::TemperAutodiff;
use temper::train::metrics::peak_rss_bytes;
use temper::train::{optimizer_step, LossScaler, Optimizer, Precision, StepOptions, TrainConfig};

use super::device::{dispatch_train, train_precision, DeviceArg, Resolved, TrainTask};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A config.json, or a folder with one (no weights needed).
    #[arg(long, value_name = "CONFIG")]
    pub model: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Time inference forward passes instead of training steps.
    #[arg(long)]
    pub forward_only: bool,
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// The frozen base's dtype, as `train.precision` picks it: auto (bf16 on CUDA, f32
    /// elsewhere), f32, bf16 (CUDA) or f16 (CUDA).
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16", "f16"])]
    pub precision: String,
    /// LoRA dropout of the timed training steps (its masks are drawn on the host).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// auto | cpu | cuda[:N] | wgpu | ndarray
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// QLoRA: the decoder projections in NF4 (packed 4-bit, as bitsandbytes), the rest in the
    /// run's precision.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// With --load-in-4bit: the absmax values double-quantized (8-bit, blocks of 256).
    #[arg(long, requires = "load_in_4bit")]
    pub double_quant: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    device: String,
    mode: &'static str,
    precision: String,
    parameters: usize,
    seq_len: usize,
    batch: usize,
    steps: usize,
    median_step_s: f64,
    tokens_per_s: f64,
    gflop_per_token: f64,
    achieved_tflops: f64,
    peak_host_rss_mib: Option<f64>,
    /// CUDA / wgpu: the allocator's reserved pool after the timed steps (its peak).
    peak_device_mib: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = args.device.clone();
    dispatch_train(&device, args)
}

fn config_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("config.json")
    } else {
        p.to_path_buf()
    }
}

/// Matmul FLOPs per token: projections forward (2N) and, training, input gradients (2N) plus
/// LoRA (forward, input and weight gradients) and causal attention (computed over the full
/// square, as the kernels do). A sparse layer counts its router and the `top_k` experts a token
/// runs (and a shared expert), with LoRA on those experts (what `bench` targets on MoE models).
fn flops_per_token(cfg: &DecoderConfig, seq: usize, rank: usize, training: bool) -> f64 {
    let (h, i, l) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.num_layers as f64);
    let (q, kv) = ((cfg.num_heads * cfg.head_dim) as f64, (cfg.num_kv_heads * cfg.head_dim) as f64);
    let r = rank as f64;
    let attn_proj = h * q + 2.0 * h * kv + q * h;
    let attn_lora = (h + q) + 2.0 * (h + kv) + (q + h);
    let (mut linear, mut lora) = (cfg.vocab_size as f64 * h, 0.0);
    // MLA: the query (plain or through its latent), the shared latent, its expansion to per-head
    // keys and values, and o_proj; attention over (nope + rope)-wide keys and v-wide values.
    let (attn_proj, attn_lora, attn_width) = match &cfg.mla {
        Some(m) => {
            let (heads, kvr) = (cfg.num_heads as f64, m.kv_lora_rank as f64);
            let (qk, vd) = (heads * m.qk_dim() as f64, heads * m.v_dim as f64);
            let kv_a = kvr + m.rope_dim as f64;
            let kv_b = heads * (m.nope_dim + m.v_dim) as f64;
            let (q_proj, q_lora) = match m.q_lora_rank {
                Some(qr) => (h * qr as f64 + qr as f64 * qk, (h + qr as f64) + (qr as f64 + qk)),
                None => (h * qk, h + qk),
            };
            (q_proj + h * kv_a + kvr * kv_b + vd * h, q_lora + (h + kv_a) + (kvr + kv_b) + (vd + h), (qk + vd) / 2.0)
        }
        None => (attn_proj, attn_lora, q),
    };
    for layer in 0..cfg.num_layers {
        linear += attn_proj;
        lora += attn_lora * r;
        match &cfg.moe {
            Some(m) if m.is_sparse(layer) => {
                let (k, ie) = (m.top_k as f64, m.expert_intermediate as f64);
                linear += h * m.num_experts as f64 + k * 3.0 * h * ie;
                lora += k * ((h + 2.0 * ie) + (ie + h)) * r;
                if let Some(si) = m.shared_expert_intermediate {
                    linear += 3.0 * h * si as f64 + h;
                    lora += 2.0 * (h + si as f64) * r + (si as f64 + h) * r;
                }
            }
            _ => {
                linear += 3.0 * h * i;
                lora += (2.0 * (h + i) + (i + h)) * r;
            }
        }
    }
    let attn = 4.0 * seq as f64 * attn_width * l;
    if training {
        4.0 * linear + 3.0 * attn + 6.0 * lora
    } else {
        2.0 * linear + attn
    }
}

impl TrainTask for BenchArgs {
    type Output = ();

    fn run<B: TemperAutodiff>(self, device: B::Device, kind: Resolved) -> Result<()> {
        let path = config_path(&self.model);
        let cfg = HfConfig::from_file(&path)?.to_decoder_config(&path)?;
        let requested = match self.precision.as_str() {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            "f16" => Precision::F16,
            _ => Precision::Auto,
        };
        // The dtype training would hold this base in (a random base has no stored dtype).
        let dtype =
            train_precision(requested, kind).with_context(|| format!("--precision {}", self.precision))?.resolve(None);
        let mut weights = if self.load_in_4bit {
            WeightSource::random_4bit(
                0,
                cfg.norm_offset,
                temper::quant::LoadIn4Bit { kind: temper::quant::FourBit::Nf4, double_quant: self.double_quant },
            )
        } else {
            WeightSource::random(0, cfg.norm_offset)
        };
        let mut model = CausalLm::<B>::load(&cfg, &mut weights, dtype, &device)?;
        let mut rng = StdRng::seed_from_u64(1);
        let ids: Vec<Vec<u32>> = (0..self.batch)
            .map(|_| (0..self.seq_len).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect())
            .collect();
        let batch = Batch {
            labels: ids.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect(),
            positions: vec![(0..self.seq_len).collect(); self.batch],
            input_ids: ids,
            segments: None,
        };
        let mut times = Vec::with_capacity(self.steps);
        if self.forward_only {
            let inner = burn::module::AutodiffModule::valid(&model);
            let flat: Vec<i64> = batch.input_ids.iter().flatten().map(|&x| x as i64).collect();
            for s in 0..=self.steps {
                let input = Tensor::<B::InnerBackend, 2, Int>::from_data(
                    TensorData::new(flat.clone(), [self.batch, self.seq_len]),
                    &device,
                );
                let t0 = Instant::now();
                let logits = inner.forward(input);
                let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
                <B::InnerBackend as Backend>::sync(&device)?;
                if s > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
        } else {
            // A mixture-of-experts model: LoRA on its experts too (PEFT's target_parameters).
            let ffn = cfg.ffn_name;
            let target_parameters = cfg
                .moe
                .as_ref()
                .map(|_| vec![format!("{ffn}.experts.gate_up_proj"), format!("{ffn}.experts.down_proj")]);
            let lora = LoraConfig {
                r: self.rank,
                lora_alpha: 2.0 * self.rank as f64,
                lora_dropout: self.lora_dropout,
                target_parameters,
                ..LoraConfig::default()
            };
            inject(&mut model, &lora, 0)?;
            let tc = TrainConfig::default();
            let mut opt = Optimizer::new(&mut model, &tc);
            let mut scaler = LossScaler::for_dtype(dtype, None);
            for s in 0..=self.steps {
                let t0 = Instant::now();
                let o = StepOptions {
                    lr: 1e-4,
                    checkpointing: self.gradient_checkpointing,
                    dropout: StepKey { seed: 0, step: s as u64, micro_batch: 0 },
                    loss_scale: scaler.scale,
                    aux_loss_coef: None,
                };
                let stats = optimizer_step(&mut model, &mut opt, std::slice::from_ref(&batch), o)?;
                scaler.update(stats.overflow);
                B::sync(&device)?;
                if s > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let tokens = (self.batch * self.seq_len) as f64;
        let fpt = flops_per_token(&cfg, self.seq_len, self.rank, !self.forward_only);
        let report = Report {
            model: path.display().to_string(),
            device: kind.to_string(),
            precision: format!("{dtype:?}").to_lowercase(),
            mode: if self.forward_only {
                "forward"
            } else if self.gradient_checkpointing {
                "train+checkpointing"
            } else {
                "train"
            },
            parameters: cfg.num_parameters(),
            seq_len: self.seq_len,
            batch: self.batch,
            steps: times.len(),
            median_step_s: median,
            tokens_per_s: tokens / median,
            gflop_per_token: fpt / 1e9,
            achieved_tflops: fpt * tokens / median / 1e12,
            peak_host_rss_mib: peak_rss_bytes().map(|b| b as f64 / 1048576.0),
            peak_device_mib: B::temper_reserved_bytes(&device).map(|b| b as f64 / 1048576.0),
        };
        if self.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "{} on {} ({}), {} params, batch {} x seq {}",
                report.model, report.device, report.mode, report.parameters, self.batch, self.seq_len
            );
            println!("median step  {:.4} s", report.median_step_s);
            println!("tokens/s     {:.1}", report.tokens_per_s);
            println!(
                "compute      {:.3} GFLOP/token, {:.4} TFLOP/s achieved",
                report.gflop_per_token, report.achieved_tflops
            );
            if let Some(m) = report.peak_host_rss_mib {
                println!("peak RSS     {m:.0} MiB (host)");
            }
            if let Some(m) = report.peak_device_mib {
                println!("peak device  {m:.0} MiB (allocator pool)");
            }
        }
        Ok(())
    }
}
