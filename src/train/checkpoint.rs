//! Checkpoints: `<output>/checkpoints/checkpoint-<step>/` holding the adapter (PEFT format),
//! the optimizer moments, and the trainer state (step, data position, seed, history). Each is
//! written to a temporary folder and renamed, so a kill at any moment leaves the previous
//! checkpoint complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::export::{write_dir_atomically, Adapter, HostTensor, WriteMode};
use crate::{Error, Result};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ADAPTER_DIR: &str = "adapter";

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Data position: the next micro-batch is batch `batch_index` of epoch `epoch`.
    pub epoch: usize,
    pub batch_index: usize,
    /// Dropout masks are drawn from (seed, step, micro-batch, module), so they need no saved state.
    pub seed: u64,
    pub tokens_seen: usize,
    pub elapsed_s: f64,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    /// An f16 base's dynamic loss scale and its count of good steps (absent otherwise, and in
    /// checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<(f64, usize)>,
    /// The lowest eval loss so far and its step (early stopping, `load_best_at_end`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_eval: Option<(usize, f64)>,
    /// Evaluations since the eval loss last improved by more than the threshold.
    #[serde(default)]
    pub evals_without_improvement: usize,
}

/// Optimizer moments by PEFT tensor key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerMoments {
    pub step: usize,
    pub m: Vec<(String, HostTensor)>,
    pub v: Vec<(String, HostTensor)>,
}

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Write a checkpoint atomically and keep at most `keep` of them.
pub fn save(
    output: &Path,
    state: &TrainerState,
    adapter: &Adapter,
    moments: &OptimizerMoments,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(output).join(format!("checkpoint-{:08}", state.step));
    let state_json = serde_json::to_string_pretty(state).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let opt_bytes = moments_bytes(moments)?;
    write_dir_atomically(&dir, WriteMode::Replace, |tmp| {
        adapter.write(&tmp.join(ADAPTER_DIR), WriteMode::Replace, &[])?;
        std::fs::write(tmp.join(OPTIMIZER_FILE), &opt_bytes).map_err(|e| Error::io(tmp.join(OPTIMIZER_FILE), e))?;
        // The state file last: its presence marks a complete checkpoint.
        std::fs::write(tmp.join(STATE_FILE), state_json.as_bytes()).map_err(|e| Error::io(tmp.join(STATE_FILE), e))
    })?;
    if let Some(keep) = keep {
        let all = list(output)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(dir)
}

/// Complete checkpoints, oldest first.
pub fn list(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoints_dir(output);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let path = entry.map_err(|e| Error::io(&dir, e))?.path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if path.join(STATE_FILE).is_file() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The last complete checkpoint: its state, adapter and optimizer moments.
pub fn load_latest(output: &Path) -> Result<Option<(TrainerState, Adapter, OptimizerMoments, PathBuf)>> {
    let Some((_, dir)) = list(output)?.pop() else {
        return Ok(None);
    };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json { path: state_path, source })?;
    let adapter = Adapter::read(&dir.join(ADAPTER_DIR))?;
    let moments = read_moments(&dir.join(OPTIMIZER_FILE))?;
    Ok(Some((state, adapter, moments, dir)))
}

fn moments_bytes(m: &OptimizerMoments) -> Result<Vec<u8>> {
    let entries: Vec<(String, &HostTensor)> = [("m.", &m.m), ("v.", &m.v)]
        .into_iter()
        .flat_map(|(prefix, list)| list.iter().map(move |(key, t)| (format!("{prefix}{key}"), t)))
        .collect();
    crate::export::peft::f32_safetensors(&entries, HashMap::from([("step".to_string(), m.step.to_string())]))
}

fn read_moments(path: &Path) -> Result<OptimizerMoments> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("missing `step` metadata".into()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = OptimizerMoments { step, ..Default::default() };
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
        let t = HostTensor {
            shape: view.shape().to_vec(),
            data: view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        };
        match name.split_once('.') {
            Some(("m", key)) => out.m.push((key.to_string(), t)),
            Some(("v", key)) => out.v.push((key.to_string(), t)),
            _ => return Err(bad(format!("unexpected tensor `{name}`"))),
        }
    }
    Ok(out)
}
