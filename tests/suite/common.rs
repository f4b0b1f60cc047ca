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

/// max(1, max |x|): the scale a tolerance is relative to.
pub fn scale_of(x: &[f32]) -> f32 {
    x.iter().fold(1f32, |m, v| m.max(v.abs()))
}

/// The i64 `[batch, seq]` token ids `key` of a reference file, on `device`.
pub fn ref_ids<B: burn::tensor::backend::Backend>(
    r: &Reference,
    key: &str,
    device: &B::Device,
) -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    let (ids, shape) = r.i64(key);
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(ids, [shape[0], shape[1]]), device)
}

/// f32 logits of `input` at `positions` (one row per sequence), with optional segment ids.
pub fn logits_at<B: temper::ops::TemperBackend>(
    model: &temper::model::CausalLm<B>,
    input: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
    positions: Vec<Vec<usize>>,
    segments: Option<Vec<Vec<u32>>>,
) -> Vec<f32> {
    let ctx = model.context(&positions, 0, segments);
    model.logits(model.hidden_states(input, &ctx, None)).into_data().to_vec().unwrap()
}

/// Positions `0..t` for each of `b` rows.
pub fn arange(b: usize, t: usize) -> Vec<Vec<usize>> {
    vec![(0..t).collect(); b]
}

/// The left-padded batch of reference `r` (`padded.input_ids`, `.attention_mask`,
/// `.position_ids`, `.logits`) as generate runs it: pads in their own segment, the given
/// positions. Returns the largest logit difference at the real (mask 1) positions, how many
/// real positions there are, the batch's row length, and the reference logits' scale.
pub fn padded_batch_diff<B: temper::ops::TemperBackend>(
    model: &temper::model::CausalLm<B>,
    r: &Reference,
    device: &B::Device,
) -> (f32, usize, usize, f32) {
    let (mask, shape) = r.i64("padded.attention_mask");
    let (pos, _) = r.i64("padded.position_ids");
    let segments: Vec<Vec<u32>> = mask.chunks(shape[1]).map(|row| row.iter().map(|&x| x as u32).collect()).collect();
    let positions: Vec<Vec<usize>> =
        pos.chunks(shape[1]).map(|row| row.iter().map(|&p| p as usize).collect()).collect();
    let got = logits_at(model, ref_ids::<B>(r, "padded.input_ids", device), positions, Some(segments));
    let (want, wshape) = r.f32("padded.logits");
    let vocab = wshape[2];
    let mut worst = 0f32;
    let mut real = 0;
    for (p, &keep) in mask.iter().enumerate() {
        if keep == 1 {
            let span = p * vocab..(p + 1) * vocab;
            worst = worst.max(max_abs_diff(&got[span.clone()], &want[span]));
            real += 1;
        }
    }
    (worst, real, shape[1], scale_of(&want))
}

/// A PEFT adapter on its base, against PEFT's reference (`input_ids`, `logits`, `grad.*`):
/// logits within 1e-4 of max(1, |x|), the loss (labels = input_ids) within 1e-4 of `want_loss`,
/// and, with `grads`, every LoRA gradient (experts in PEFT's 3-D form) within 1e-4 of max(1, |x|),
/// each PEFT gradient checked once.
pub fn check_peft_adapter<B: temper::ops::TemperAutodiff>(
    name: &str,
    base: &Path,
    adapter: &Path,
    reference: &Path,
    want_loss: f32,
    grads: bool,
    device: &B::Device,
) {
    let tol = 1e-4f32;
    use burn::tensor::ElementConversion;
    use temper::ops::loss::{nll_sum, shift_labels};
    let mut model = temper::model::load_model::<B>(base, temper::model::WeightPrecision::F32, device)
        .unwrap_or_else(|e| panic!("{}: {e}", base.display()))
        .model;
    let adapter = temper::export::Adapter::read(adapter).unwrap_or_else(|err| panic!("{name}: {err}"));
    temper::lora::apply_adapter(&mut model, &adapter).unwrap_or_else(|err| panic!("{name}: {err}"));
    let r = Reference::open(reference);
    let logits = model.forward(ref_ids::<B>(&r, "input_ids", device));
    let got: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
    let want = r.f32("logits").0;
    let d = max_abs_diff(&got, &want);
    assert!(d <= tol * scale_of(&want), "{name}: adapter logits differ by {d:e} (largest {})", scale_of(&want));
    let (targets, count) = shift_labels(&[r.i64("input_ids").0]);
    let loss = nll_sum(logits, &targets).div_scalar(count as f32);
    let value = loss.clone().into_scalar().elem::<f32>();
    assert!((value - want_loss).abs() <= tol, "{name}: loss {value} vs PEFT {want_loss}");
    if !grads {
        return;
    }
    let g = loss.backward();
    let host = lora_grads(&mut model, &g, name);
    let fused = temper::export::experts::fuse_experts(&host).unwrap().0;
    let mut checked = 0;
    for (module, pair) in &fused {
        for (which, t) in [("A", &pair.a), ("B", &pair.b)] {
            let key = format!("grad.base_model.model.{module}.lora_{which}.weight");
            assert!(r.names().contains(&key), "{name}: Temper has {key}, PEFT has no such gradient");
            let (want, want_shape) = r.f32(&key);
            assert_eq!(t.shape, want_shape, "{name}: {key} shape");
            let d = max_abs_diff(&t.data, &want);
            assert!(d <= tol * scale_of(&want), "{name}: {key} differs by {d:e} (largest {})", scale_of(&want));
            checked += 1;
        }
    }
    let want_keys = r.names().iter().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, want_keys, "{name}: every PEFT gradient checked");
}

/// `temper merge` of `adapter` into the one-file checkpoint `base` against PEFT's
/// `merge_and_unload` (`merged`: the tensors it changed): those within 1e-5 of max(1, |x|),
/// every other tensor byte for byte, and every tensor of `merged` merged.
pub fn check_merge_matches_peft(base: &Path, adapter: &Path, merged: &Path) {
    use temper::export::{merge_model, Adapter, MergeDtype, MergeInput, MergeOptions, WriteMode};
    let want: std::collections::BTreeMap<String, Vec<f32>> =
        raw_tensors(merged).into_iter().map(|(k, (_, b))| (k, f32s(&b))).collect();
    let tmp = tempfile::tempdir().unwrap();
    let input = MergeInput { adapter: Adapter::read(adapter).unwrap(), dir: adapter.to_path_buf(), weight: 1.0 };
    let out = tmp.path().join("merged");
    let opts = MergeOptions { dtype: MergeDtype::Auto, untie: false };
    merge_model(base, &[input], opts, &out, WriteMode::Refuse, &mut |_| {}).unwrap();
    let base_tensors = raw_tensors(&base.join("model.safetensors"));
    let got = raw_tensors(&out.join("model.safetensors"));
    assert_eq!(got.keys().collect::<Vec<_>>(), base_tensors.keys().collect::<Vec<_>>(), "the base's tensors");
    let mut changed = 0;
    for (name, (shape, bytes)) in &base_tensors {
        let (got_shape, got_bytes) = &got[name];
        assert_eq!(got_shape, shape, "{name}");
        match want.get(name) {
            Some(w) => {
                let worst = worst_relative(&f32s(got_bytes), w);
                assert!(worst <= 1e-5, "{name} differs from merge_and_unload by {worst:e}");
                changed += 1;
            }
            None => assert!(got_bytes == bytes, "{name} is not adapted and must be copied byte for byte"),
        }
    }
    assert_eq!(changed, want.len(), "every adapted tensor merged");
}
