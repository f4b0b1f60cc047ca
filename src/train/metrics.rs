//! What a run reports: `metrics.jsonl` (a line per step and per evaluation), a loss-curve SVG,
//! and the peak memory of the process.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::export::write_file_atomically;
use crate::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricLine {
    Train { step: usize, loss: f64, lr: f64, grad_norm: f64, tokens: usize, tokens_per_s: f64, elapsed: f64 },
    Eval { step: usize, eval_loss: f64, eval_perplexity: f64, eval_tokens: usize },
}

impl MetricLine {
    pub fn step(&self) -> usize {
        match self {
            MetricLine::Train { step, .. } | MetricLine::Eval { step, .. } => *step,
        }
    }
}

/// Appends to `metrics.jsonl`, keeping the lines in memory for the plot.
pub struct MetricsLog {
    path: PathBuf,
    pub lines: Vec<MetricLine>,
}

impl MetricsLog {
    /// Open the log; when resuming at `resume_step`, keep only the lines up to it (a crashed run
    /// may have logged steps past its last checkpoint).
    pub fn open(path: &Path, resume_step: Option<usize>) -> Result<Self> {
        let mut lines = Vec::new();
        if let (Some(step), true) = (resume_step, path.is_file()) {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                if let Ok(m) = serde_json::from_str::<MetricLine>(l) {
                    if m.step() <= step {
                        lines.push(m);
                    }
                }
            }
        }
        let text: String = lines.iter().filter_map(|m| serde_json::to_string(m).ok()).map(|s| s + "\n").collect();
        write_file_atomically(path, text.as_bytes())?;
        Ok(Self { path: path.to_path_buf(), lines })
    }

    pub fn push(&mut self, line: MetricLine) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let text = serde_json::to_string(&line).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        writeln!(f, "{text}").map_err(|e| Error::io(&self.path, e))?;
        self.lines.push(line);
        Ok(())
    }

    /// The loss curve (train line, eval points) as a standalone SVG.
    pub fn svg(&self) -> String {
        let train: Vec<(f64, f64)> = self
            .lines
            .iter()
            .filter_map(|m| match m {
                MetricLine::Train { step, loss, .. } => Some((*step as f64, *loss)),
                _ => None,
            })
            .collect();
        let eval: Vec<(f64, f64)> = self
            .lines
            .iter()
            .filter_map(|m| match m {
                MetricLine::Eval { step, eval_loss, .. } => Some((*step as f64, *eval_loss)),
                _ => None,
            })
            .collect();
        loss_svg(&train, &eval)
    }
}

fn loss_svg(train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let (w, h, pad) = (720.0, 420.0, 56.0);
    let all: Vec<&(f64, f64)> = train.iter().chain(eval).collect();
    let max_x = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut lo, mut hi) =
        all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let x = |s: f64| pad + s / max_x * (w - 2.0 * pad);
    let y = |l: f64| h - pad - (l - lo) / (hi - lo) * (h - 2.0 * pad);
    let points =
        |pts: &[(f64, f64)]| pts.iter().map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1))).collect::<Vec<_>>().join(" ");
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">optimizer step</text>\n\
         <text x=\"14\" y=\"{cy}\" transform=\"rotate(-90 14 {cy})\" text-anchor=\"middle\">loss</text>\n\
         <text x=\"{pad}\" y=\"{ty}\">0</text><text x=\"{r}\" y=\"{ty}\" text-anchor=\"end\">{max_x}</text>\n\
         <text x=\"{lx}\" y=\"{b}\" text-anchor=\"end\">{lo:.3}</text><text x=\"{lx}\" y=\"{pad}\" text-anchor=\"end\">{hi:.3}</text>\n",
        b = h - pad, r = w - pad, cx = w / 2.0, ty = h - pad + 30.0, cy = h / 2.0, lx = pad - 4.0,
    );
    if !train.is_empty() {
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            points(train)
        );
    }
    if !eval.is_empty() {
        svg += &format!("<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" stroke-dasharray=\"4 3\" points=\"{}\"/>\n", points(eval));
        for p in eval {
            svg += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>\n", x(p.0), y(p.1));
        }
    }
    svg += &format!(
        "<text x=\"{a}\" y=\"{pad}\" fill=\"#1f77b4\">train loss</text><text x=\"{a}\" y=\"{b2}\" fill=\"#d62728\">eval loss</text>\n</svg>\n",
        a = w - pad - 90.0, b2 = pad + 16.0
    );
    svg
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
