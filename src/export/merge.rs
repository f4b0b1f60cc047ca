//! Merging adapters into a base model: W' = W + Σ_j weight_j · scaling_j · (B_j @ A_j), computed
//! in f32 and cast to the output dtype, written as a complete Hugging Face folder with the base's
//! sharding. Streams one shard and one tensor at a time: peak memory is about one tensor in f32
//! plus its bytes, never the model. Everything that can be refused is checked before anything is
//! written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use crate::export::atomic::{write_dir_atomically, WriteMode};
use crate::export::model_card;
use crate::export::peft::{Adapter, HostTensor, LoraPair, CONFIG_FILE, WEIGHTS_FILE};
use crate::export::shard::{all_finite, bytes_to_f32, f32_to_bytes, ShardReader, ShardWriter};
use crate::model::Checkpoint;
use crate::quant::{bnb_4bit_weights, dequantize_4bit, read_bnb_4bit};
use crate::{Error, Result};

const INDEX_FILE: &str = "model.safetensors.index.json";
const LM_HEAD: &str = "lm_head.weight";
const EMBED: &str = "model.embed_tokens.weight";

/// Output dtype of the merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// Each tensor keeps the dtype it has in the base.
    Auto,
    Bf16,
    F16,
    F32,
}

impl MergeDtype {
    fn resolve(self, stored: Dtype) -> Dtype {
        let float = matches!(stored, Dtype::F32 | Dtype::BF16 | Dtype::F16);
        match self {
            MergeDtype::Bf16 if float => Dtype::BF16,
            MergeDtype::F16 if float => Dtype::F16,
            MergeDtype::F32 if float => Dtype::F32,
            _ => stored,
        }
    }

    /// The name transformers uses in config.json (`torch_dtype`), if the dtype is forced.
    fn torch_name(self) -> Option<&'static str> {
        match self {
            MergeDtype::Auto => None,
            MergeDtype::Bf16 => Some("bfloat16"),
            MergeDtype::F16 => Some("float16"),
            MergeDtype::F32 => Some("float32"),
        }
    }
}

/// One adapter to merge, where it was read from, and its weight in the sum.
#[derive(Debug, Clone)]
pub struct MergeInput {
    pub adapter: Adapter,
    pub dir: PathBuf,
    pub weight: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    pub dtype: MergeDtype,
    /// Write a separate `lm_head.weight` when an adapter targets lm_head of a model that ties it
    /// to the embeddings (otherwise refused).
    pub untie: bool,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MergeSummary {
    pub shards: usize,
    pub tensors: usize,
    /// Base tensors that received a delta.
    pub merged: usize,
    pub bytes: u64,
    pub untied: bool,
    /// bitsandbytes 4-bit weights written dequantized (a 4-bit base merges into 16 / 32 bits).
    pub dequantized: usize,
}

/// One LoRA term of a base tensor: `scale · B @ A`.
struct Term<'a> {
    pair: std::borrow::Cow<'a, LoraPair>,
    scale: f32,
    /// Where the `[out, in]` update starts in the tensor (an expert's slice of a fused 3-D
    /// `experts.gate_up_proj`; 0 otherwise).
    offset: usize,
    /// The tensor holds the update transposed, `[in, out]` (gpt-oss's experts, used as x @ W).
    transposed: bool,
}

/// Everything validated: which base tensors get which terms.
struct Plan<'a> {
    terms: HashMap<String, Vec<Term<'a>>>,
    untie: bool,
    /// `lm_head.weight` is created from the embeddings (tied base without its own lm_head).
    new_lm_head: bool,
    /// The head's and the embeddings' names in this checkpoint's layout.
    lm_head: String,
    embed: String,
    /// A bitsandbytes 4-bit base: its 4-bit weights (name -> `[out, in]` and the dtype to write),
    /// the quant-state tensors that go away, and the checkpoint to dequantize from.
    four_bit: HashMap<String, (Vec<usize>, Dtype)>,
    quant_aux: std::collections::HashSet<String>,
    quant_source: Option<Checkpoint>,
}

/// Merge into `out` atomically: a failure leaves no partial folder, and an existing `out` is
/// only replaced with [`WriteMode::Replace`].
pub fn merge_model(
    model: &Path,
    inputs: &[MergeInput],
    opts: MergeOptions,
    out: &Path,
    mode: WriteMode,
    progress: &mut dyn FnMut(&str),
) -> Result<MergeSummary> {
    if same_dir(model, out) {
        return Err(Error::InvalidArgument(format!(
            "--out {} is the base model folder: write the merged model elsewhere",
            out.display()
        )));
    }
    let mut summary = None;
    write_dir_atomically(out, mode, |tmp| {
        summary = Some(write_merged(model, inputs, opts, tmp, progress)?);
        Ok(())
    })?;
    summary.ok_or_else(|| Error::InvalidArgument("merge wrote nothing".into()))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Write the merged model into the existing, empty folder `out` (not atomic; see [`merge_model`]).
pub fn write_merged(
    model: &Path,
    inputs: &[MergeInput],
    opts: MergeOptions,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<MergeSummary> {
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("no adapter to merge".into()));
    }
    let config_path = model.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: Value =
        serde_json::from_str(&config_text).map_err(|source| Error::Json { path: config_path.clone(), source })?;
    let checkpoint = Checkpoint::open(model)?;
    let mut plan = plan(model, &config, &checkpoint, inputs, opts)?;
    let files: Vec<PathBuf> = checkpoint.files().iter().map(|p| p.to_path_buf()).collect();
    let four_bit_dtype = plan.four_bit.values().next().map(|(_, d)| *d);
    if plan.four_bit.is_empty() {
        drop(checkpoint);
    } else {
        plan.quant_source = Some(checkpoint);
    }

    let mut summary =
        MergeSummary { shards: files.len(), tensors: 0, merged: 0, bytes: 0, untied: plan.untie, dequantized: 0 };
    let mut weight_map = BTreeMap::new();
    for src in &files {
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        progress(&name);
        let written = merge_shard(src, &out.join(&name), &plan, opts.dtype, &mut summary)?;
        for t in written {
            weight_map.insert(t, name.clone());
        }
    }
    if model.join(INDEX_FILE).is_file() {
        write_index(&model.join(INDEX_FILE), &out.join(INDEX_FILE), weight_map, summary.bytes)?;
    }
    let mut config_changed = false;
    if let Some(name) = opts.dtype.torch_name() {
        let key = if config.get("dtype").is_some() { "dtype" } else { "torch_dtype" };
        config[key] = Value::from(name);
        config_changed = true;
    }
    if let Some(d) = four_bit_dtype {
        // The merged model is a plain 16 / 32-bit checkpoint.
        if let Some(obj) = config.as_object_mut() {
            obj.remove("quantization_config");
            let key = if obj.contains_key("torch_dtype") { "torch_dtype" } else { "dtype" };
            obj.insert(key.into(), Value::from(dtype_name(d)));
        }
        config_changed = true;
    }
    if plan.untie {
        // transformers reads the text decoder's setting (text_config of a vision-language model).
        match config.get_mut("text_config").filter(|t| t.is_object()) {
            Some(text) => text["tie_word_embeddings"] = Value::Bool(false),
            None => config["tie_word_embeddings"] = Value::Bool(false),
        }
        config_changed = true;
    }
    let config_bytes = if config_changed { pretty(&config)? } else { config_text.into_bytes() };
    write(&out.join("config.json"), &config_bytes)?;
    copy_side_files(model, out)?;
    let card = model_card::merged_model_card(model, inputs, opts, &summary);
    write(&out.join("README.md"), card.as_bytes())?;
    Ok(summary)
}

fn plan<'a>(
    model: &Path,
    config: &Value,
    ckpt: &Checkpoint,
    inputs: &'a [MergeInput],
    opts: MergeOptions,
) -> Result<Plan<'a>> {
    // transformers omits the key when it equals the class default (true for Gemma, false for
    // Llama); a checkpoint without lm_head.weight is tied either way.
    let layout = ckpt.layout();
    let (lm_head, embed) = (layout.checkpoint_name(LM_HEAD), layout.checkpoint_name(EMBED));
    let text_config = config.get("text_config").filter(|t| t.is_object()).unwrap_or(config);
    let tied = text_config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(!ckpt.contains(&lm_head));
    let mut terms: HashMap<String, Vec<Term<'a>>> = HashMap::new();
    let mut untie = false;
    let (four_bit, quant_aux) = four_bit_weights(ckpt, opts.dtype)?;
    let mut new_lm_head = false;
    for input in inputs {
        if !input.weight.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "--weights: {} is not a finite number (adapter {})",
                input.weight,
                input.dir.display()
            )));
        }
        let cfg_path = input.dir.join(CONFIG_FILE);
        for (module, pair) in &input.adapter.modules {
            if let Some(parts) = moe_terms(model, ckpt, module, pair)? {
                let scale = (input.weight * input.adapter.config.scaling(module)) as f32;
                for (key, part, offset, transposed) in parts {
                    terms.entry(key).or_default().push(Term { pair: part, scale, offset, transposed });
                }
                continue;
            }
            // Adapter modules are Temper's names; the base may hold them under a prefix.
            let mut key = layout.checkpoint_name(&format!("{module}.weight"));
            let mut base_key = key.clone();
            if module == "lm_head" && tied {
                if !opts.untie {
                    return Err(Error::Unsupported {
                        path: cfg_path.clone(),
                        key: "target_modules".into(),
                        value: "lm_head".into(),
                        reason: format!("{} ties lm_head to embed_tokens, so a merged lm_head would also change the input embeddings; pass --untie to write a separate lm_head.weight", model.display()),
                    });
                }
                untie = true;
                if !ckpt.contains(&lm_head) {
                    new_lm_head = true;
                    base_key = embed.clone();
                    key = lm_head.clone();
                }
            }
            let (dtype, shape) = four_bit.get(&base_key).map(|(s, d)| (*d, s.clone())).or_else(|| ckpt.info(&base_key)).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "adapter {} has weights for `{module}`, but {} has no tensor `{base_key}`: was the adapter trained on another base model?",
                    input.dir.display(),
                    model.display()
                ))
            })?;
            if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(Error::TensorDtype {
                    path: model.to_path_buf(),
                    tensor: base_key,
                    dtype: format!("{dtype:?} (quantized or integer weights cannot be merged exactly)"),
                });
            }
            let (r, in_f, out_f) = (pair.a.shape[0], pair.a.shape[1], pair.b.shape[0]);
            if shape != [out_f, in_f] {
                return Err(Error::InvalidArgument(format!(
                    "adapter {}: `{module}` has lora_A {:?} and lora_B {:?}, i.e. a [{out_f}, {in_f}] update, but `{base_key}` in {} is {shape:?}: was the adapter trained on another base model?",
                    input.dir.join(WEIGHTS_FILE).display(),
                    pair.a.shape,
                    pair.b.shape,
                    model.display()
                )));
            }
            let (cfg_r, _) = input.adapter.config.rank_alpha(module);
            if cfg_r != r {
                return Err(Error::InvalidConfig {
                    path: cfg_path.clone(),
                    key: "r / rank_pattern".into(),
                    reason: format!("gives rank {cfg_r} for `{module}`, but its lora_A has {r} rows"),
                });
            }
            let scale = (input.weight * input.adapter.config.scaling(module)) as f32;
            terms.entry(key).or_default().push(Term {
                pair: std::borrow::Cow::Borrowed(pair),
                scale,
                offset: 0,
                transposed: false,
            });
        }
    }
    Ok(Plan { terms, untie, new_lm_head, lm_head, embed, four_bit, quant_aux, quant_source: None })
}

/// Stream one shard: header first, then each tensor read, merged, cast, checked and written.
/// Returns the tensor names written.
fn merge_shard(
    src: &Path,
    dst: &Path,
    plan: &Plan,
    dtype: MergeDtype,
    summary: &mut MergeSummary,
) -> Result<Vec<String>> {
    let mut reader = ShardReader::open(src)?;
    // (name in the output, index of the source tensor in `reader`)
    let mut order: Vec<(String, usize)> = Vec::with_capacity(reader.tensors.len() + 1);
    for (i, (name, _)) in reader.tensors.iter().enumerate() {
        if plan.quant_aux.contains(name) {
            continue;
        }
        order.push((name.clone(), i));
        if *name == plan.embed && plan.new_lm_head {
            order.push((plan.lm_head.clone(), i));
        }
    }
    let header: Vec<(String, Dtype, Vec<usize>)> = order
        .iter()
        .map(|(name, i)| {
            let e = &reader.tensors[*i].1;
            match plan.four_bit.get(name) {
                Some((shape, d)) => (name.clone(), *d, shape.clone()),
                None => (name.clone(), dtype.resolve(e.dtype), e.shape.clone()),
            }
        })
        .collect();
    let mut metadata = reader.metadata.clone().unwrap_or_default();
    metadata.insert("format".into(), "pt".into());
    let mut writer = ShardWriter::create(dst, &header, &metadata)?;
    for ((name, i), (_, out_dtype, shape)) in order.iter().zip(&header) {
        let terms = plan.terms.get(name);
        let src_dtype = reader.tensors[*i].1.dtype;
        let bytes = match (plan.four_bit.get(name), &plan.quant_source) {
            // An FP8 weight: dequantized with its scales, then merged and cast like any other.
            (Some(_), Some(ckpt)) if src_dtype == Dtype::F8_E4M3 => {
                summary.dequantized += 1;
                let w: Vec<f32> = ckpt.read(name, shape, burn::tensor::DType::F32)?.to_vec().map_err(|e| {
                    Error::InvalidArgument(format!("`{name}`: dequantized FP8 weight unreadable: {e:?}"))
                })?;
                with_terms(w, terms, shape, *out_dtype, summary)?
            }
            // A 4-bit weight: dequantized, then merged and cast like any other.
            (Some(_), Some(ckpt)) => {
                summary.dequantized += 1;
                let w = dequantize_4bit(&read_bnb_4bit(ckpt, name, [shape[0], shape[1]])?.quantized);
                with_terms(w, terms, shape, *out_dtype, summary)?
            }
            _ if terms.is_none() && src_dtype == *out_dtype => reader.read_bytes(*i)?,
            _ => {
                let raw = reader.read_bytes(*i)?;
                let w = bytes_to_f32(src_dtype, &raw).ok_or_else(|| Error::TensorDtype {
                    path: src.to_path_buf(),
                    tensor: name.clone(),
                    dtype: format!("{src_dtype:?}"),
                })?;
                drop(raw);
                with_terms(w, terms, shape, *out_dtype, summary)?
            }
        };
        if !all_finite(*out_dtype, &bytes) {
            return Err(Error::NonFinite(format!(
                "tensor `{name}` would contain NaN or infinity as {out_dtype:?} (base {}): nothing was written",
                src.display()
            )));
        }
        writer.write(name, &bytes)?;
        summary.tensors += 1;
    }
    summary.bytes += writer.finish()?;
    Ok(order.into_iter().map(|(n, _)| n).collect())
}

/// `w` (f32, of `shape`) with its LoRA terms added (a merged tensor is `[out, in]`), as
/// `out_dtype` bytes.
fn with_terms(
    mut w: Vec<f32>,
    terms: Option<&Vec<Term>>,
    shape: &[usize],
    out_dtype: Dtype,
    summary: &mut MergeSummary,
) -> Result<Vec<u8>> {
    if let Some(terms) = terms {
        let d_in = shape
            .last()
            .copied()
            .filter(|_| shape.len() >= 2)
            .ok_or_else(|| Error::InvalidArgument(format!("LoRA terms for a tensor of shape {shape:?}")))?;
        for t in terms {
            add_lora(&mut w, d_in, t)?;
        }
        summary.merged += 1;
    }
    Ok(f32_to_bytes(out_dtype, &w))
}

/// `W += scale · (B @ A)` for a row-major `[out, in]` f32 matrix, in one sgemm call
/// (C <- alpha·A·B + beta·C: the product is accumulated, then scaled once, then added, as
/// PEFT's `get_delta_weight` followed by `weight += delta`).
fn add_lora(w: &mut [f32], d_in: usize, t: &Term) -> Result<()> {
    let (a, b) = (&t.pair.a, &t.pair.b);
    if t.transposed {
        // W [in, out] += scale · (B @ A)ᵀ = scale · Aᵀ @ Bᵀ; `d_in` is the tensor's last dim = out.
        let (r, d_out, d_inner) = (a.shape[0], b.shape[0], a.shape[1]);
        let w = w.get_mut(t.offset..t.offset + d_out * d_inner).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "LoRA update of {d_inner} x {d_out} at {} does not fit the tensor",
                t.offset
            ))
        })?;
        if d_in != d_out || b.shape != [d_out, r] || a.data.len() != r * d_inner || b.data.len() != d_out * r {
            return Err(Error::InvalidArgument(format!(
                "LoRA shapes A {:?}, B {:?} do not fit a transposed [{d_inner}, {d_in}] weight",
                a.shape, b.shape
            )));
        }
        // SAFETY: as below; Aᵀ is A read with strides (1, d_inner), Bᵀ is B with strides (1, r).
        unsafe {
            matrixmultiply::sgemm(
                d_inner,
                r,
                d_out,
                t.scale,
                a.data.as_ptr(),
                1,
                d_inner as isize,
                b.data.as_ptr(),
                1,
                r as isize,
                1.0,
                w.as_mut_ptr(),
                d_out as isize,
                1,
            );
        }
        return Ok(());
    }
    let (r, d_out) = (a.shape[0], b.shape[0]);
    let w = w.get_mut(t.offset..t.offset + d_out * d_in).ok_or_else(|| {
        Error::InvalidArgument(format!("LoRA update of {d_out} x {d_in} at {} does not fit the tensor", t.offset))
    })?;
    if a.shape != [r, d_in]
        || b.shape != [d_out, r]
        || a.data.len() != r * d_in
        || b.data.len() != d_out * r
        || w.len() != d_out * d_in
    {
        return Err(Error::InvalidArgument(format!(
            "LoRA shapes A {:?}, B {:?} do not fit a [{d_out}, {d_in}] weight",
            a.shape, b.shape
        )));
    }
    // SAFETY: the three buffers are distinct allocations whose lengths were just checked
    // against the row-major strides given (B [d_out, r], A [r, d_in], W [d_out, d_in]).
    unsafe {
        matrixmultiply::sgemm(
            d_out,
            r,
            d_in,
            t.scale,
            b.data.as_ptr(),
            r as isize,
            1,
            a.data.as_ptr(),
            d_in as isize,
            1,
            1.0,
            w.as_mut_ptr(),
            d_in as isize,
            1,
        );
    }
    Ok(())
}

/// Per 4-bit weight: its shape and the dtype it is written in; and the names of the quant-state
/// tensors that the merged checkpoint drops.
type FourBitWeights = (HashMap<String, (Vec<usize>, Dtype)>, std::collections::HashSet<String>);

/// A bitsandbytes 4-bit checkpoint's 4-bit weights (name -> `[out, in]`, and the dtype to write:
/// `--dtype`, or the dtype it was quantized from), and the quant-state tensors a dequantized
/// checkpoint drops. Empty for any other checkpoint.
fn four_bit_weights(ckpt: &Checkpoint, dtype: MergeDtype) -> Result<FourBitWeights> {
    let mut weights = HashMap::new();
    let mut aux = std::collections::HashSet::new();
    for entry in bnb_4bit_weights(ckpt)? {
        let stored = match entry.dtype.as_deref() {
            Some("bfloat16") => Dtype::BF16,
            Some("float16") => Dtype::F16,
            _ => Dtype::F32,
        };
        weights.insert(entry.name, (entry.shape, dtype.resolve(stored)));
        aux.extend(entry.parts);
    }
    // FP8 (e4m3) weights: dequantized with their scales and written in bf16 (or `--dtype`), the
    // scales (and static activation scales) dropped.
    let fp8: Vec<(String, Vec<usize>)> = ckpt
        .tensor_names()
        .filter_map(|n| match ckpt.info(n) {
            Some((Dtype::F8_E4M3, shape)) => Some((n.clone(), shape)),
            _ => None,
        })
        .collect();
    for (name, shape) in fp8 {
        weights.insert(name.clone(), (shape, dtype.resolve(Dtype::BF16)));
        let stem = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        for extra in [format!("{name}_scale_inv"), format!("{stem}.input_scale"), format!("{stem}.activation_scale")] {
            if ckpt.contains(&extra) {
                aux.insert(extra);
            }
        }
    }
    Ok((weights, aux))
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

fn write_index(src: &Path, dst: &Path, weight_map: BTreeMap<String, String>, total: u64) -> Result<()> {
    let text = std::fs::read_to_string(src).map_err(|e| Error::io(src, e))?;
    let mut index: Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: src.to_path_buf(), source })?;
    if !index.get("metadata").is_some_and(Value::is_object) {
        index["metadata"] = Value::Object(Default::default());
    }
    index["metadata"]["total_size"] = Value::from(total);
    index["weight_map"] = serde_json::to_value(weight_map).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write(dst, &pretty(&index)?)
}

/// Tokenizer files, generation_config.json and other small side files: every top-level file
/// except weights (safetensors, pickles, GGUF), the shard index, config.json and README.md.
fn copy_side_files(model: &Path, out: &Path) -> Result<()> {
    let skip_ext = ["safetensors", "bin", "pt", "pth", "ckpt", "gguf", "h5", "msgpack", "onnx"];
    let entries = std::fs::read_dir(model).map_err(|e| Error::io(model, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(model, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ext = Path::new(&name).extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        let is_file = entry.file_type().map_err(|e| Error::io(entry.path(), e))?.is_file();
        if !is_file
            || name.starts_with('.')
            || skip_ext.contains(&ext.as_str())
            || [INDEX_FILE, "config.json", "README.md"].contains(&name.as_str())
        {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&name)).map_err(|e| Error::io(entry.path(), e))?;
    }
    Ok(())
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    s.push('\n');
    Ok(s.into_bytes())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// A mixture-of-experts module's merge terms in the base's own layout: an expert's gate_up
/// delta `[2I, H]` splits into the Hub's per-expert `gate_proj` / `up_proj` (Mixtral: `w1` /
/// `w3`) rows, or lands in its slice of transformers 5's fused `experts.gate_up_proj`
/// `[E, 2I, H]`; down into `down_proj` (`w2`) or its slice of `experts.down_proj`. Mixtral's
/// router is `block_sparse_moe.gate`. `None` for any other module.
#[allow(clippy::type_complexity)]
fn moe_terms<'a>(
    model: &Path,
    ckpt: &Checkpoint,
    module: &str,
    pair: &'a LoraPair,
) -> Result<Option<Vec<(String, std::borrow::Cow<'a, LoraPair>, usize, bool)>>> {
    use std::borrow::Cow;
    let layout = ckpt.layout();
    let name = |n: &str| layout.checkpoint_name(n);
    let mismatch = |key: &str, shape: &[usize], want: [usize; 2]| {
        Error::InvalidArgument(format!("adapter module `{module}` is a [{}, {}] update, but `{key}` in {} is {shape:?}: was the adapter trained on another base model?", want[0], want[1], model.display()))
    };
    let (out_f, in_f) = (pair.b.shape[0], pair.a.shape[1]);
    // gpt-oss's `mlp.router` is a plain [E, H] weight under its own name.
    if module.ends_with(".mlp.router") {
        return Ok(None);
    }
    if module.ends_with(".mlp.gate") {
        let mixtral = name(&format!("{}.block_sparse_moe.gate.weight", module.trim_end_matches(".mlp.gate")));
        if ckpt.contains(&mixtral) {
            return Ok(Some(vec![(mixtral, Cow::Borrowed(pair), 0, false)]));
        }
        return Ok(None);
    }
    let Some((prefix, e, proj)) = crate::export::experts::split_expert_name(module) else { return Ok(None) };
    let layer = prefix.trim_end_matches(".mlp.experts");
    let fused = name(&format!("{prefix}.{proj}"));
    if ckpt.contains(&format!("{fused}_blocks")) {
        return Err(Error::Unsupported {
            path: model.to_path_buf(),
            key: format!("{fused}_blocks"),
            value: "MXFP4".into(),
            reason: "merging into MXFP4 expert weights is not implemented; merge into a bf16 copy of the base".into(),
        });
    }
    if let Some((_, shape)) = ckpt.info(&fused) {
        // gpt-oss and Llama 4 keep their experts as x @ W: `[E, in, out]` (gpt-oss's biases mark
        // the layout; Llama 4's `feed_forward.experts` always are).
        let transposed = ckpt.contains(&format!("{fused}_bias")) || prefix.ends_with(".feed_forward.experts");
        let want = if transposed { [in_f, out_f] } else { [out_f, in_f] };
        if shape.len() != 3 || shape[1] != want[0] || shape[2] != want[1] || e >= shape[0] {
            return Err(mismatch(&fused, &shape, want));
        }
        return Ok(Some(vec![(fused, Cow::Borrowed(pair), e * out_f * in_f, transposed)]));
    }
    let mixtral = ckpt.contains(&name(&format!("{layer}.block_sparse_moe.experts.{e}.w2.weight")));
    let key = |qwen: &str, mx: &str| {
        if mixtral {
            name(&format!("{layer}.block_sparse_moe.experts.{e}.{mx}.weight"))
        } else {
            name(&format!("{prefix}.{e}.{qwen}.weight"))
        }
    };
    let check = |key: &String, want: [usize; 2]| -> Result<()> {
        match ckpt.info(key) {
            Some((_, shape)) if shape == want => Ok(()),
            Some((_, shape)) => Err(mismatch(key, &shape, want)),
            None => Err(Error::InvalidArgument(format!(
                "adapter module `{module}`: {} has no tensor `{key}`: was the adapter trained on another base model?",
                model.display()
            ))),
        }
    };
    if proj == "down_proj" {
        let k = key("down_proj", "w2");
        check(&k, [out_f, in_f])?;
        return Ok(Some(vec![(k, Cow::Borrowed(pair), 0, false)]));
    }
    // gate_up: B's first half of the rows is gate's, the second up's.
    let half = out_f / 2;
    let r = pair.a.shape[0];
    let rows = |lo: usize| LoraPair {
        a: pair.a.clone(),
        b: HostTensor { shape: vec![half, r], data: pair.b.data[lo * r..(lo + half) * r].to_vec() },
    };
    let (g, u) = (key("gate_proj", "w1"), key("up_proj", "w3"));
    check(&g, [half, in_f])?;
    check(&u, [half, in_f])?;
    Ok(Some(vec![(g, Cow::Owned(rows(0)), 0, false), (u, Cow::Owned(rows(half)), 0, false)]))
}
