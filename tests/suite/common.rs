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
