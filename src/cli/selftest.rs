//! `temper selftest --fixtures tests/fixtures`: this build, on this device, against the
//! transformers reference outputs committed with the repository (logits and loss of every
//! fixture model). It is how a GPU machine with no Rust toolchain checks a carried binary
//! (`scripts/gpu/check.sh`); the test suite runs the same comparison on the CPU and wgpu.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;
use serde_json::Value;
use temper::export::shard::bytes_to_f32;
use temper::model::{load_model, WeightPrecision};
use temper::ops::loss::{nll_sum, shift_labels};
use temper::ops::TemperBackend;

use super::device::{resolve, run_task, DeviceArg, Resolved, Task, WGPU_F16_UNAVAILABLE};

/// Half precision (bf16 keeps 8 bits of mantissa, f16 11): the largest logit difference within
/// 4% of the largest reference logit, the loss within 0.02. Measured with bf16 on the CPU:
/// 1.2% to 1.9% and at most 0.0073 over the 13 fixtures (f16: well inside).
const HALF_LOGITS_REL_TOL: f32 = 0.04;
const HALF_LOSS_TOL: f32 = 0.02;
/// f32: the test suite's tolerances (absolute; the fixtures' logits are of order 1 to 30).
const F32_LOGITS_TOL: f32 = 1e-4;
const F32_LOSS_TOL: f32 = 1e-4;

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// The repository's tests/fixtures folder (manifest.json, models, reference).
    #[arg(long, value_name = "DIR", default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    /// auto | cpu | cuda[:N] | wgpu | ndarray
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Weights and activations in f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub precision: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct ModelResult {
    name: String,
    max_abs_logit_diff: f32,
    /// The largest |logit| of the reference (half precision's tolerance scales with it).
    max_abs_logit: f32,
    loss: f32,
    reference_loss: f32,
    pass: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    device: String,
    precision: String,
    /// f32: an absolute bound; half precision: relative to each model's largest |logit|.
    logits_tol: f32,
    logits_tol_relative: bool,
    loss_tol: f32,
    models: Vec<ModelResult>,
    pass: bool,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let precision = match args.precision.as_str() {
        "bf16" => WeightPrecision::Bf16,
        "f16" => WeightPrecision::F16,
        _ => WeightPrecision::F32,
    };
    let kind = resolve(&args.device)?;
    if precision != WeightPrecision::F32 && kind == Resolved::Wgpu {
        bail!("--precision {}: {WGPU_F16_UNAVAILABLE}", args.precision);
    }
    let json = args.json;
    let mut report = run_task(kind, precision, args)?;
    report.device = kind.to_string();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let logits = if report.logits_tol_relative {
            format!("{}% of the largest logit", report.logits_tol * 100.0)
        } else {
            format!("{:e}", report.logits_tol)
        };
        println!(
            "selftest on {} in {} (logits within {logits}, loss within {:e} of transformers)",
            report.device, report.precision, report.loss_tol
        );
        for m in &report.models {
            println!(
                "{:<18} {}  max |logit diff| {:.2e} (largest logit {:.1})  loss {:.6} vs {:.6}",
                m.name,
                if m.pass { "ok  " } else { "FAIL" },
                m.max_abs_logit_diff,
                m.max_abs_logit,
                m.loss,
                m.reference_loss
            );
        }
    }
    if !report.pass {
        bail!(
            "selftest failed: {} of {} fixture models outside tolerance",
            report.models.iter().filter(|m| !m.pass).count(),
            report.models.len()
        );
    }
    Ok(())
}

impl Task for SelftestArgs {
    type Output = Report;

    fn run<B: TemperBackend>(self, device: B::Device, precision: WeightPrecision) -> Result<Report> {
        let manifest_path = self.fixtures.join("manifest.json");
        let text =
            std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
        let models =
            manifest["models"].as_object().ok_or_else(|| anyhow!("{}: no `models` object", manifest_path.display()))?;
        let half = precision != WeightPrecision::F32;
        let (logits_tol, loss_tol) =
            if half { (HALF_LOGITS_REL_TOL, HALF_LOSS_TOL) } else { (F32_LOGITS_TOL, F32_LOSS_TOL) };
        let mut results = Vec::new();
        for (name, entry) in models {
            let field = |k: &str| {
                entry[k]
                    .as_str()
                    .ok_or_else(|| anyhow!("{}: models.{name}.{k} is not a string", manifest_path.display()))
            };
            let reference_loss = entry["loss"]
                .as_f64()
                .ok_or_else(|| anyhow!("{}: models.{name}.loss is not a number", manifest_path.display()))?
                as f32;
            let (diff, scale, loss) = check_model::<B>(
                &self.fixtures.join(field("path")?),
                &self.fixtures.join(field("reference")?),
                precision,
                &device,
            )
            .with_context(|| format!("fixture {name}"))?;
            let bound = if half { logits_tol * scale.max(1.0) } else { logits_tol };
            let pass = diff <= bound && (loss - reference_loss).abs() <= loss_tol;
            results.push(ModelResult {
                name: name.clone(),
                max_abs_logit_diff: diff,
                max_abs_logit: scale,
                loss,
                reference_loss,
                pass,
            });
        }
        if results.is_empty() {
            bail!("{}: no fixture models", manifest_path.display());
        }
        let name = match precision {
            WeightPrecision::Bf16 => "bf16",
            WeightPrecision::F16 => "f16",
            _ => "f32",
        };
        Ok(Report {
            device: String::new(),
            precision: name.into(),
            logits_tol,
            logits_tol_relative: half,
            loss_tol,
            pass: results.iter().all(|m| m.pass),
            models: results,
        })
    }
}

/// Max |logit - reference| (over the positions the reference holds: the last ones), max
/// |reference logit|, and the mean next-token loss over all positions.
fn check_model<B: TemperBackend>(
    model_dir: &Path,
    reference: &Path,
    precision: WeightPrecision,
    device: &B::Device,
) -> Result<(f32, f32, f32)> {
    let model = load_model::<B>(model_dir, precision, device)?.model;
    let bytes = std::fs::read(reference).with_context(|| format!("reading {}", reference.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", reference.display()))?;
    let tensor = |name: &str, dtype: Dtype| -> Result<(Vec<u8>, Vec<usize>)> {
        let t = st.tensor(name).with_context(|| format!("{}: tensor {name}", reference.display()))?;
        if t.dtype() != dtype {
            bail!("{}: tensor {name} is {:?}, expected {dtype:?}", reference.display(), t.dtype());
        }
        Ok((t.data().to_vec(), t.shape().to_vec()))
    };
    let (ids, shape) = tensor("input_ids", Dtype::I64)?;
    let ids: Vec<i64> =
        ids.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect();
    let (want, want_shape) = tensor("logits", Dtype::F32)?;
    let want =
        bytes_to_f32(Dtype::F32, &want).ok_or_else(|| anyhow!("{}: tensor logits is not f32", reference.display()))?;
    let [b, t] = [shape[0], shape[1]];
    let tail = want_shape.get(1).copied().unwrap_or(t).min(t);
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), device);
    let logits = model.forward(input).cast(burn::tensor::DType::F32);
    let got: Vec<f32> = logits
        .clone()
        .slice([0..b, t - tail..t])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow!("reading logits: {e:?}"))?;
    if got.len() != want.len() {
        bail!("{}: logits have {} values, the model gave {}", reference.display(), want.len(), got.len());
    }
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, |m, d| {
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    });
    let rows: Vec<Vec<i64>> = ids.chunks(t).map(<[i64]>::to_vec).collect();
    let (targets, count) = shift_labels(&rows);
    let loss = nll_sum(logits, &targets).into_scalar().elem::<f32>() / count.max(1) as f32;
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    Ok((diff, scale, loss))
}
