//! Paths to fixtures and shared assets, and small readers for reference tensors.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// The CPU backend the tests run on (the one the binary uses for `--device cpu`).
pub type Cpu = burn::backend::Flex;
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `../shared` beside the crate (or `$TEMPER_SHARED`). A missing asset fails the test: a
/// skipped check would hide a regression.
pub fn shared(rel: &str) -> PathBuf {
    let root = std::env::var_os("TEMPER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let p = root.join(rel);
    assert!(p.exists(), "shared asset {} is missing: tests need ../shared beside the repository", p.display());
    p
}

pub fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json parses")
}

/// Reference tensors of one fixture file.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(path: &Path) -> Self {
        Self { bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("reference safetensors");
        let t = st.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name} missing"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn names(&self) -> Vec<String> {
        let st = SafeTensors::deserialize(&self.bytes).expect("reference safetensors");
        st.names().into_iter().map(str::to_string).collect()
    }

    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::F32, "{name}");
        (data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), shape)
    }

    pub fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::I64, "{name}");
        (data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(), shape)
    }
}

/// Largest absolute difference, asserting equal lengths.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    // NaN propagates (f32::max would drop it and let a NaN output pass any tolerance).
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if m.is_nan() || d.is_nan() { f32::NAN } else { m.max(d) })
}

/// Every LoRA pair's gradients in `grads`, by module name, asserting that no frozen base weight
/// got one (`what` names the model in messages).
pub fn lora_grads<B: burn::tensor::backend::AutodiffBackend>(
    model: &mut temper::model::CausalLm<B>,
    grads: &B::Gradients,
    what: &str,
) -> std::collections::BTreeMap<String, temper::export::LoraPair> {
    use temper::export::{HostTensor, LoraPair};
    let mut host = std::collections::BTreeMap::new();
    for (module, proj) in temper::lora::projections_mut(model) {
        assert!(proj.weight.val().grad(grads).is_none(), "{what}: frozen {module}.weight got a gradient");
        let Some(lora) = &proj.lora else { continue };
        let grad = |p: &burn::module::Param<burn::tensor::Tensor<B, 2>>| {
            let g = p.val().grad(grads).expect("LoRA parameter has a gradient");
            HostTensor { shape: g.dims().to_vec(), data: g.into_data().to_vec().unwrap() }
        };
        host.insert(module, LoraPair { a: grad(&lora.lora_a), b: grad(&lora.lora_b) });
    }
    host
}

/// Every tensor of a one-file checkpoint: name -> (shape, raw bytes).
pub fn raw_tensors(file: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// Little-endian f32 bytes as values.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// max |got - want| / max(1, |want|).
pub fn worst_relative(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f32::max)
}

/// A copy of the tiny fixture model in `src` (vocabulary 128, f32) in `dst`, its embeddings and
/// head widened to the stories260K tokenizer's 512 ids (the new rows small and deterministic)
/// and that tokenizer beside it: a model the CLI can train, chat with and evaluate.
pub fn with_stories_vocab(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    match cfg.get_mut("text_config") {
        Some(text) => text["vocab_size"] = 512.into(),
        None => cfg["vocab_size"] = 512.into(),
    }
    std::fs::write(dst.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = raw_tensors(&src.join("model.safetensors"))
        .into_iter()
        .map(|(name, (mut shape, mut data))| {
            if name.ends_with("embed_tokens.weight") || name.ends_with("lm_head.weight") {
                let cols = shape[1];
                data.extend(
                    (0..(512 - shape[0]) * cols)
                        .flat_map(|i| ((((i * 7919) % 1000) as f32 / 1000.0 - 0.5) * 0.1).to_le_bytes()),
                );
                shape[0] = 512;
            }
            (name, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(shared("models/stories260K").join(f), dst.join(f)).unwrap();
    }
}

/// `temper train` on `model` with a small packed-text recipe (`extra` appended under `lora:`),
/// writing into `run`: the process output.
pub fn train_stories(model: &Path, run: &Path, seq_len: usize, lora_extra: &str) -> std::process::Output {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/stories/train.jsonl");
    let recipe = run.with_extension("yaml");
    std::fs::write(
        &recipe,
        format!(
            "base_model: {}\ndata:\n  train: {}\n  format: text\n  seq_len: {seq_len}\n  packing: true\n  max_rows: 40\nlora:\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n{lora_extra}train:\n  max_steps: 3\n  micro_batch_size: 2\n  learning_rate: 1.0e-3\noutput:\n  dir: {}\ndevice: cpu\n",
            model.display(),
            data.display(),
            run.display()
        ),
    )
    .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_temper")).args(["train", recipe.to_str().unwrap()]).output().unwrap()
}
