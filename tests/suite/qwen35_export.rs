//! What happens to a Qwen 3.5 / Qwen3-Next adapter after training (issue 21): `temper merge`
//! into each checkpoint layout against PEFT's `merge_and_unload`, PEFT export names, the
//! serving rules of the hybrids, the llama.cpp GGUF layout, and `temper inspect`. Fixtures:
//! tests/fixtures/qwen35 (transformers 5.25, PEFT 0.22; see its README).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use temper::export::{merge_model, Adapter, MergeDtype, MergeInput, MergeOptions, WriteMode};

use crate::common::{f32s, fixtures, max_abs_diff, raw_tensors, worst_relative, Reference};

/// f32 merge vs PEFT: |ours - peft| <= MERGE_TOL * max(1, |peft|).
const MERGE_TOL: f32 = 1e-5;

fn q35() -> PathBuf {
    fixtures().join("qwen35")
}

fn q35_manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(q35().join("manifest.json")).unwrap()).unwrap()
}

fn merge(model: &str, adapter: &Path, out: &Path) {
    let input = MergeInput { adapter: Adapter::read(adapter).unwrap(), dir: adapter.to_path_buf(), weight: 1.0 };
    merge_model(
        &q35().join(model),
        &[input],
        MergeOptions { dtype: MergeDtype::Auto, untie: false },
        out,
        WriteMode::Refuse,
        &mut |_| {},
    )
    .unwrap();
}

/// Merge `adapter` into `model` and compare with `merged` (disk key -> PEFT's merged values):
/// those tensors within MERGE_TOL, every other tensor byte for byte. Returns the merged folder.
fn check_merge(model: &str, adapter: &Path, merged: &BTreeMap<String, Vec<f32>>, tmp: &Path) -> PathBuf {
    let out = tmp.join(format!("merged_{model}"));
    merge(model, adapter, &out);
    let base = raw_tensors(&q35().join(model).join("model.safetensors"));
    let got = raw_tensors(&out.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>(),
        "{model}: the base's tensors, no more, no fewer"
    );
    let mut changed = 0;
    for (name, (shape, bytes)) in &base {
        let (got_shape, got_bytes) = &got[name];
        assert_eq!(got_shape, shape, "{model}: {name}");
        match merged.get(name) {
            Some(want) => {
                let worst = worst_relative(&f32s(got_bytes), want);
                assert!(worst <= MERGE_TOL, "{model}: {name} differs from merge_and_unload by {worst:e} (relative)");
                assert_ne!(got_bytes, bytes, "{model}: {name} should have changed");
                changed += 1;
            }
            None => assert!(got_bytes == bytes, "{model}: {name} is not adapted and must be copied byte for byte"),
        }
    }
    assert_eq!(changed, merged.len(), "{model}: every merged tensor is in the base");
    out
}

fn peft_merged_text() -> BTreeMap<String, Vec<f32>> {
    raw_tensors(&q35().join("peft/qwen3_5_text/merged.safetensors"))
        .into_iter()
        .map(|(k, (_, b))| (k, f32s(&b)))
        .collect()
}

#[test]
fn qwen35_merged_weights_match_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let m = q35_manifest();
    let merged = peft_merged_text();
    assert_eq!(merged.len(), m["peft"]["qwen3_5_text"]["merged"]["changed_disk_keys"].as_u64().unwrap() as usize);
    check_merge("models/qwen3_5_text", &q35().join("peft/qwen3_5_text/adapter"), &merged, tmp.path());
}

/// The VLM checkpoint: the decoder's adapted tensors change under `model.language_model.*`
/// (PEFT's merged weights are the text model's, renamed: manifest `peft.qwen3_5.merged`), and the
/// vision tower, the MTP head and config.json are copied byte for byte (transformers' own save
/// drops `mtp.*`).
#[test]
fn qwen35_vlm_merge_keeps_vision_and_mtp_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let m = q35_manifest();
    let renamed: BTreeMap<String, Vec<f32>> = peft_merged_text()
        .into_iter()
        .map(|(k, v)| (k.replacen("model.layers.", "model.language_model.layers.", 1), v))
        .collect();
    let listed: Vec<&str> = m["peft"]["qwen3_5"]["merged"]["changed_disk_keys_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(renamed.keys().map(String::as_str).collect::<Vec<_>>(), listed);
    let out = check_merge("models/qwen3_5", &q35().join("peft/qwen3_5/adapter"), &renamed, tmp.path());
    let got = raw_tensors(&out.join("model.safetensors"));
    let (vision, mtp) = (
        got.keys().filter(|k| k.starts_with("model.visual.")).count(),
        got.keys().filter(|k| k.starts_with("mtp.")).count(),
    );
    assert!(vision >= 10 && mtp == 7, "{vision} vision and {mtp} mtp tensors kept");
    assert_eq!(
        std::fs::read(q35().join("models/qwen3_5/config.json")).unwrap(),
        std::fs::read(out.join("config.json")).unwrap()
    );
}

/// PEFT's 3-D expert pairs (A `[E·r, in]`, B `[out, r·E]`) as each expert's `[out, in]` delta,
/// straight from the adapter file (fixtures README: `s · B.reshape(out, r, E)[:, :, e] @
/// A.reshape(E, r, in)[e]`), independent of Temper's reader.
fn expert_delta(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    experts: usize,
    e: usize,
    s: f32,
) -> Vec<f32> {
    let (rows, d_in, d_out) = (a_shape[0], a_shape[1], b_shape[0]);
    let r = rows / experts;
    let mut out = vec![0f32; d_out * d_in];
    for o in 0..d_out {
        for j in 0..r {
            let bv = b[o * rows + j * experts + e];
            for i in 0..d_in {
                out[o * d_in + i] += s * bv * a[(e * r + j) * d_in + i];
            }
        }
    }
    out
}

/// Fused Hub experts (`qwen3_5_moe`: `experts.gate_up_proj` `[E, 2I, H]`, `experts.down_proj`
/// `[E, H, I]`) and per-expert keys (`qwen3_5_moe_text`): each expert's slice gets its own delta,
/// and both layouts merge to the same weights.
#[test]
fn qwen35_moe_merge_writes_each_experts_delta_into_fused_and_per_expert_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let text_adapter = q35().join("peft/qwen3_5_moe_text/adapter");
    // The VLM holds the text model's weights: the same adapter under the VLM's PEFT names.
    let vlm_adapter = tmp.path().join("vlm_adapter");
    std::fs::create_dir(&vlm_adapter).unwrap();
    let cfg = std::fs::read_to_string(text_adapter.join("adapter_config.json"))
        .unwrap()
        .replace("models/qwen3_5_moe_text", "models/qwen3_5_moe");
    std::fs::write(vlm_adapter.join("adapter_config.json"), cfg).unwrap();
    let renamed: Vec<(String, Vec<usize>, Vec<u8>)> = raw_tensors(&text_adapter.join("adapter_model.safetensors"))
        .into_iter()
        .map(|(k, (s, b))| {
            (k.replacen("base_model.model.model.layers.", "base_model.model.model.language_model.layers.", 1), s, b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = renamed
        .iter()
        .map(|(k, s, b)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(vlm_adapter.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap())
        .unwrap();

    let (fused_out, per_out) = (tmp.path().join("fused"), tmp.path().join("per"));
    merge("models/qwen3_5_moe", &vlm_adapter, &fused_out);
    merge("models/qwen3_5_moe_text", &text_adapter, &per_out);
    let fused = raw_tensors(&fused_out.join("model.safetensors"));
    let fused_base = raw_tensors(&q35().join("models/qwen3_5_moe/model.safetensors"));
    let per = raw_tensors(&per_out.join("model.safetensors"));
    let lora = raw_tensors(&text_adapter.join("adapter_model.safetensors"));
    let m = q35_manifest();
    let s = m["peft"]["qwen3_5_moe_text"]["lora_config"]["lora_alpha"].as_f64().unwrap()
        / m["peft"]["qwen3_5_moe_text"]["lora_config"]["r"].as_f64().unwrap();
    let (experts, inter) = (4, 32);
    for layer in 0..4 {
        let key = |p: &str| format!("base_model.model.model.layers.{layer}.mlp.experts.{p}");
        let (ga, gb, da, db) = (
            &lora[&key("base_layer.lora_A.weight")],
            &lora[&key("base_layer.lora_B.weight")],
            &lora[&key("lora_A.weight")],
            &lora[&key("lora_B.weight")],
        );
        let gate_up = format!("model.language_model.layers.{layer}.mlp.experts.gate_up_proj");
        let down = format!("model.language_model.layers.{layer}.mlp.experts.down_proj");
        let (fgu, fd) = (f32s(&fused[&gate_up].1), f32s(&fused[&down].1));
        let (bgu, bd) = (f32s(&fused_base[&gate_up].1), f32s(&fused_base[&down].1));
        for e in 0..experts {
            let dgu = expert_delta(&f32s(&ga.1), &ga.0, &f32s(&gb.1), &gb.0, experts, e, s as f32);
            let dd = expert_delta(&f32s(&da.1), &da.0, &f32s(&db.1), &db.0, experts, e, s as f32);
            let n_gu = 2 * inter * 64;
            let want_gu: Vec<f32> = bgu[e * n_gu..(e + 1) * n_gu].iter().zip(&dgu).map(|(w, d)| w + d).collect();
            assert!(
                worst_relative(&fgu[e * n_gu..(e + 1) * n_gu], &want_gu) <= MERGE_TOL,
                "layer {layer} expert {e} gate_up"
            );
            let n_d = 64 * inter;
            let want_d: Vec<f32> = bd[e * n_d..(e + 1) * n_d].iter().zip(&dd).map(|(w, d)| w + d).collect();
            assert!(worst_relative(&fd[e * n_d..(e + 1) * n_d], &want_d) <= MERGE_TOL, "layer {layer} expert {e} down");
            // The per-expert layout: gate rows 0..I, up rows I..2I of the fused slice.
            let p = |n: &str| f32s(&per[&format!("model.layers.{layer}.mlp.experts.{e}.{n}.weight")].1);
            let half = inter * 64;
            assert!(
                max_abs_diff(&p("gate_proj"), &fgu[e * n_gu..e * n_gu + half]) <= 1e-6,
                "layer {layer} expert {e} gate_proj"
            );
            assert!(
                max_abs_diff(&p("up_proj"), &fgu[e * n_gu + half..(e + 1) * n_gu]) <= 1e-6,
                "layer {layer} expert {e} up_proj"
            );
            assert!(
                max_abs_diff(&p("down_proj"), &fd[e * n_d..(e + 1) * n_d]) <= 1e-6,
                "layer {layer} expert {e} down_proj"
            );
        }
    }
    for key in fused.keys().filter(|k| k.starts_with("model.visual.") || k.starts_with("mtp.")) {
        assert!(fused[key].1 == fused_base[key].1, "{key} copied byte for byte");
    }
}

/// Qwen3-Next's grouped `in_proj_qkvz` / `in_proj_ba`: the adapter was trained on the stored
/// rows, so the delta lands on them as they are (no permutation).
#[test]
fn qwen3_next_merge_adds_the_delta_to_the_stored_grouped_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = q35().join("peft/qwen3_next/adapter");
    let lora = raw_tensors(&adapter_dir.join("adapter_model.safetensors"));
    let base = raw_tensors(&q35().join("models/qwen3_next/model.safetensors"));
    let m = q35_manifest();
    let scalings = &m["peft"]["qwen3_next"]["scalings"];
    let mut want = BTreeMap::new();
    for (module, s) in scalings.as_object().unwrap() {
        let (a, b) = (
            &lora[&format!("base_model.model.{module}.lora_A.weight")],
            &lora[&format!("base_model.model.{module}.lora_B.weight")],
        );
        let (r, d_in, d_out) = (a.0[0], a.0[1], b.0[0]);
        let (a, b, s) = (f32s(&a.1), f32s(&b.1), s["scaling"].as_f64().unwrap() as f32);
        let mut w = f32s(&base[&format!("{module}.weight")].1);
        for o in 0..d_out {
            for i in 0..d_in {
                w[o * d_in + i] += s * (0..r).map(|j| b[o * r + j] * a[j * d_in + i]).sum::<f32>();
            }
        }
        want.insert(format!("{module}.weight"), w);
    }
    assert!(
        want.keys().any(|k| k.ends_with("in_proj_qkvz.weight"))
            && want.keys().any(|k| k.ends_with("in_proj_ba.weight"))
    );
    check_merge("models/qwen3_next", &adapter_dir, &want, tmp.path());
}

// ---- PEFT export ----------------------------------------------------------------------------

fn safetensor_keys(file: &Path) -> Vec<String> {
    raw_tensors(file).into_keys().collect()
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
}

/// Re-written by `Adapter::write`, the fixtures keep PEFT's keys on each class (the VLM's
/// `base_model.model.model.language_model.layers...`) and their tensors; an adapter whose recipe
/// said `all-linear` lists the modules it has (never in_proj_a / in_proj_b it did not train, which
/// PEFT's own `all-linear` would add), and the VLM's target regex reaches no vision module.
#[test]
fn qwen35_peft_export_keeps_peft_names_and_lists_the_trained_modules() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_next"] {
        let src = q35().join("peft").join(name).join("adapter");
        let mut adapter = Adapter::read(&src).unwrap();
        adapter.config.target_modules = temper::lora::TargetModules::Pattern("all-linear".into());
        let out = tmp.path().join(name);
        adapter.write(&out, WriteMode::Refuse, &[]).unwrap();
        assert_eq!(
            safetensor_keys(&out.join("adapter_model.safetensors")),
            safetensor_keys(&src.join("adapter_model.safetensors")),
            "{name}: PEFT's keys"
        );
        let (mine, peft) =
            (raw_tensors(&out.join("adapter_model.safetensors")), raw_tensors(&src.join("adapter_model.safetensors")));
        for (k, (shape, bytes)) in &peft {
            assert_eq!(&mine[k].0, shape, "{name}: {k}");
            assert!(max_abs_diff(&f32s(&mine[k].1), &f32s(bytes)) == 0.0, "{name}: {k} unchanged");
        }
        let (cfg, want) = (config(&out), config(&src));
        if name == "qwen3_5" {
            let re = regex::Regex::new(cfg["target_modules"].as_str().unwrap()).unwrap();
            let ckpt = raw_tensors(&q35().join("models/qwen3_5/model.safetensors"));
            let modules: Vec<String> =
                ckpt.keys().filter_map(|k| k.strip_suffix(".weight")).map(str::to_string).collect();
            let hit: Vec<&String> = modules.iter().filter(|m| re.is_match(m)).collect();
            let adapted: std::collections::BTreeSet<String> = peft
                .keys()
                .filter_map(|k| k.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight"))
                .map(str::to_string)
                .collect();
            assert_eq!(
                hit.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>(),
                adapted,
                "the regex matches exactly the adapted modules"
            );
        } else {
            assert_eq!(cfg["target_modules"], want["target_modules"], "{name}: explicit names of the trained modules");
        }
        // PEFT writes `[]` or null for no parameters; Temper leaves the key out.
        let params = |v: &Value| v["target_parameters"].as_array().cloned().unwrap_or_default();
        assert_eq!(params(&cfg), params(&want), "{name}");
    }
}

// ---- GGUF -----------------------------------------------------------------------------------

/// GGUF tensors by name: (dims, f32 data).
type GgufTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A GGUF file's string metadata and f32 tensors.
fn read_gguf(path: &Path) -> (BTreeMap<String, String>, GgufTensors) {
    let b = std::fs::read(path).unwrap();
    let mut p = 0usize;
    let mut take = |n: usize| {
        p += n;
        b[p - n..p].to_vec()
    };
    let u32_ = |v: Vec<u8>| u32::from_le_bytes(v.try_into().unwrap());
    let u64_ = |v: Vec<u8>| u64::from_le_bytes(v.try_into().unwrap()) as usize;
    assert_eq!(take(4), b"GGUF");
    take(4);
    let (n_t, n_kv) = (u64_(take(8)), u64_(take(8)));
    let string = |take: &mut dyn FnMut(usize) -> Vec<u8>| {
        let n = u64_(take(8));
        String::from_utf8(take(n)).unwrap()
    };
    let mut kv = BTreeMap::new();
    for _ in 0..n_kv {
        let key = string(&mut take);
        match u32_(take(4)) {
            8 => {
                let v = string(&mut take);
                kv.insert(key, v);
            }
            _ => {
                take(4);
            }
        }
    }
    let mut infos = Vec::new();
    for _ in 0..n_t {
        let name = string(&mut take);
        let nd = u32_(take(4)) as usize;
        let dims: Vec<usize> = (0..nd).map(|_| u64_(take(8))).collect();
        assert_eq!(u32_(take(4)), 0, "f32");
        infos.push((name, dims, u64_(take(8))));
    }
    let start = p.next_multiple_of(32);
    let tensors = infos.into_iter().map(|(name, dims, off)| {
        let n: usize = dims.iter().product();
        let data = f32s(&b[start + off..start + off + 4 * n]);
        (name, (dims, data))
    });
    (kv, tensors.collect())
}

fn temper(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_temper")).args(args).output().unwrap()
}

fn export_gguf(adapter: &Path, base: &str, out: &Path) -> std::process::Output {
    temper(&[
        "export",
        "--adapter",
        adapter.to_str().unwrap(),
        "--base",
        q35().join(base).to_str().unwrap(),
        "--format",
        "gguf",
        "--out",
        out.to_str().unwrap(),
    ])
}

/// Rows `rows` of a row-major matrix with `cols` columns.
fn rows_of(data: &[f32], cols: usize, rows: impl IntoIterator<Item = usize>) -> Vec<f32> {
    rows.into_iter().flat_map(|r| data[r * cols..(r + 1) * cols].to_vec()).collect()
}

/// `_reorder_v_heads` of llama.cpp's `conversion/qwen.py`, written out: value head (g, j) of
/// key head g moves from g·ratio + j to j·key_heads + g.
fn tiled(key_heads: usize, ratio: usize, head_dim: usize) -> Vec<usize> {
    let mut old_of_new = vec![0; key_heads * ratio * head_dim];
    for g in 0..key_heads {
        for j in 0..ratio {
            for d in 0..head_dim {
                old_of_new[(j * key_heads + g) * head_dim + d] = (g * ratio + j) * head_dim + d;
            }
        }
    }
    old_of_new
}

/// Qwen 3.5 as llama.cpp's `qwen35`: the converter's tensor names (attn_qkv, attn_gate,
/// ssm_out, attn_q with its gate rows, ffn_*), its value-head reorder (2 key heads, 4 value
/// heads) on B's rows and on out_proj's A columns, the scale folded into B; the VLM's adapter
/// gives the same file.
#[test]
fn qwen35_gguf_has_llama_cpp_names_and_value_head_order() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("text.gguf");
    let src = q35().join("peft/qwen3_5_text/adapter");
    let o = export_gguf(&src, "models/qwen3_5_text", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (kv, t) = read_gguf(&out);
    assert_eq!(kv["general.architecture"], "qwen35");
    let adapter = Adapter::read(&src).unwrap();
    let mut want: Vec<String> = Vec::new();
    for module in adapter.modules.keys() {
        let (layer, path) = module.strip_prefix("model.layers.").unwrap().split_once('.').unwrap();
        let n = match path {
            "linear_attn.in_proj_qkv" => "attn_qkv",
            "linear_attn.in_proj_z" => "attn_gate",
            "linear_attn.out_proj" => "ssm_out",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => panic!("{other}"),
        };
        want.extend(["lora_a", "lora_b"].map(|s| format!("blk.{layer}.{n}.weight.{s}")));
    }
    want.sort();
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), want);
    let (hk, r, d) = (2, 2, 16);
    // in_proj_qkv: q and k rows (64) as stored, the v rows tiled.
    let qkv = &adapter.modules["model.layers.0.linear_attn.in_proj_qkv"];
    let rank = qkv.a.shape[0];
    let rows: Vec<usize> = (0..64).chain(tiled(hk, r, d).into_iter().map(|i| 64 + i)).collect();
    assert_eq!(t["blk.0.attn_qkv.weight.lora_b"], (vec![rank, 128], rows_of(&qkv.b.data, rank, rows)));
    assert_eq!(t["blk.0.attn_qkv.weight.lora_a"], (vec![64, rank], qkv.a.data.clone()));
    // in_proj_z (rank 4 by rank_pattern, scaling 4 = alpha 16 / 4: nothing to fold).
    let z = &adapter.modules["model.layers.1.linear_attn.in_proj_z"];
    assert_eq!(t["blk.1.attn_gate.weight.lora_b"].1, rows_of(&z.b.data, 4, tiled(hk, r, d)));
    // out_proj: A's columns tiled, B as stored.
    let o_p = &adapter.modules["model.layers.2.linear_attn.out_proj"];
    let cols = tiled(hk, r, d);
    let a_tiled: Vec<f32> =
        o_p.a.data.chunks_exact(64).flat_map(|row| cols.iter().map(|&c| row[c]).collect::<Vec<_>>()).collect();
    assert_eq!(t["blk.2.ssm_out.weight.lora_a"].1, a_tiled);
    assert_eq!(t["blk.2.ssm_out.weight.lora_b"].1, o_p.b.data);
    // q_proj keeps its per-head [q | gate] rows; o_proj (alpha_pattern 8: scaling 1 against
    // llama.cpp's 16 / 8 = 2) has half of B folded in.
    assert_eq!(t["blk.3.attn_q.weight.lora_b"].1, adapter.modules["model.layers.3.self_attn.q_proj"].b.data);
    let ob: Vec<f32> = adapter.modules["model.layers.3.self_attn.o_proj"].b.data.iter().map(|x| x * 0.5).collect();
    assert!(max_abs_diff(&t["blk.3.attn_output.weight.lora_b"].1, &ob) <= 1e-7);
    // The VLM checkpoint converts to the same qwen35 GGUF.
    let vlm = tmp.path().join("vlm.gguf");
    let o = export_gguf(&q35().join("peft/qwen3_5/adapter"), "models/qwen3_5", &vlm);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&vlm).unwrap(), std::fs::read(&out).unwrap());
}

/// Qwen3-Next as llama.cpp's `qwen3next`: the grouped in_proj_qkvz splits into attn_qkv (all q,
/// all k, all v) and attn_gate (all z) sharing A; in_proj_ba stays grouped as ssm_ba.
#[test]
fn qwen3_next_gguf_splits_in_proj_qkvz_as_the_converter_does() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("next.gguf");
    let src = q35().join("peft/qwen3_next/adapter");
    let o = export_gguf(&src, "models/qwen3_next", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (kv, t) = read_gguf(&out);
    assert_eq!(kv["general.architecture"], "qwen3next");
    assert!(!t.keys().any(|k| k.contains("qkvz")), "{:?}", t.keys());
    let adapter = Adapter::read(&src).unwrap();
    let qkvz = &adapter.modules["model.layers.0.linear_attn.in_proj_qkvz"];
    let rank = qkvz.a.shape[0];
    // Per key head g (2): q 16, k 16, v 32, z 32 rows = 96.
    let group = |g: usize, off: usize, n: usize| (0..n).map(move |i| g * 96 + off + i);
    let qkv_rows: Vec<usize> = (0..2)
        .flat_map(|g| group(g, 0, 16))
        .chain((0..2).flat_map(|g| group(g, 16, 16)))
        .chain((0..2).flat_map(|g| group(g, 32, 32)))
        .collect();
    let z_rows: Vec<usize> = (0..2).flat_map(|g| group(g, 64, 32)).collect();
    assert_eq!(t["blk.0.attn_qkv.weight.lora_b"], (vec![rank, 128], rows_of(&qkvz.b.data, rank, qkv_rows)));
    assert_eq!(t["blk.0.attn_gate.weight.lora_b"], (vec![rank, 64], rows_of(&qkvz.b.data, rank, z_rows)));
    assert_eq!(t["blk.0.attn_qkv.weight.lora_a"].1, qkvz.a.data);
    assert_eq!(t["blk.0.attn_gate.weight.lora_a"].1, qkvz.a.data);
    assert_eq!(t["blk.1.ssm_ba.weight.lora_b"].1, adapter.modules["model.layers.1.linear_attn.in_proj_ba"].b.data);
}

/// 3-D expert LoRA has no llama.cpp tensor (the converter maps only the 2-D form): refused
/// before anything is written, naming the module and the architecture.
#[test]
fn qwen35_moe_gguf_with_3d_experts_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe.gguf");
    let o = export_gguf(&q35().join("peft/qwen3_5_moe_text/adapter"), "models/qwen3_5_moe_text", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("mlp.experts") && err.contains("qwen35moe"), "{err}");
    assert!(!out.exists());
}

// ---- serving ------------------------------------------------------------------------------

fn verdicts(dir: &Path, base: &str) -> Vec<temper::export::serving::Verdict> {
    let base = temper::export::serving::ServingBase::from_model_dir(&q35().join(base)).unwrap();
    temper::export::serving::check_adapter(dir, Some(&base)).unwrap()
}

fn broken(v: &[temper::export::serving::Verdict]) -> Vec<Vec<&'static str>> {
    v.iter()
        .map(|v| {
            let mut r = v.rules();
            r.dedup();
            r
        })
        .collect()
}

/// Write `src`'s adapter, with `edit` applied to its modules, to `tmp/name`.
fn edited(src: &str, tmp: &Path, name: &str, edit: impl FnOnce(&mut Adapter)) -> PathBuf {
    let mut a = Adapter::read(&q35().join("peft").join(src).join("adapter")).unwrap();
    edit(&mut a);
    let dir = tmp.join(name);
    a.write(&dir, WriteMode::Refuse, &[]).unwrap();
    dir
}

/// vLLM keeps in_proj_qkv / in_proj_z apart and packs in_proj_b + in_proj_a (either alone is
/// fine); names that are vLLM's packed modules, not the checkpoint's, are refused; Qwen3-Next's
/// grouped projections are served as stored; mistral.rs takes no LoRA on the DeltaNet's input
/// projections; the MoE VLM class reads the 3-D expert form (both pairs per layer), the text
/// class the 2-D one.
#[test]
fn qwen35_serving_rules_follow_each_servers_code() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let all = edited("qwen3_5_text_ab", t, "ab", |_| {});
    let v = verdicts(&all, "models/qwen3_5_text");
    assert_eq!(broken(&v), [vec![], vec![], vec!["M10"]], "{v:#?}");
    assert!(v[0].notes.iter().any(|n| n.contains("in_proj_ba")), "{v:#?}");
    assert!(v[2].to_string().contains("in_proj_a, in_proj_b, in_proj_qkv, in_proj_z"), "{}", v[2]);
    let b_only = edited("qwen3_5_text_ab", t, "b_only", |a| {
        a.modules.retain(|m, _| m.ends_with("in_proj_b") || m.ends_with("o_proj"))
    });
    assert_eq!(broken(&verdicts(&b_only, "models/qwen3_5_text")), [vec![], vec![], vec!["M10"]]);
    let attn_only = edited("qwen3_5_text_ab", t, "attn", |a| {
        a.modules.retain(|m, _| m.contains("self_attn") || m.ends_with("out_proj"))
    });
    let v = verdicts(&attn_only, "models/qwen3_5_text");
    assert!(v.iter().all(|v| v.ok()), "{v:#?}");
    let packed = edited("qwen3_5_text_ab", t, "packed", |a| {
        let b = a.modules.remove("model.layers.0.linear_attn.in_proj_b").unwrap();
        let aa = a.modules.remove("model.layers.0.linear_attn.in_proj_a").unwrap();
        let mut data = b.b.data.clone();
        data.extend(&aa.b.data);
        let pair =
            temper::export::LoraPair { a: b.a.clone(), b: temper::export::HostTensor { shape: vec![8, 4], data } };
        a.modules.insert("model.layers.0.linear_attn.in_proj_ba".into(), pair);
    });
    assert_eq!(broken(&verdicts(&packed, "models/qwen3_5_text")), [vec!["V7"], vec!["L2"], vec!["M7", "M10"]]);

    let v = verdicts(&q35().join("peft/qwen3_next/adapter"), "models/qwen3_next");
    assert_eq!(broken(&v), [vec![], vec![], vec!["M10"]], "{v:#?}");
    assert!(v[0].notes.iter().any(|n| n.contains("--tensor-parallel-size 1")), "{v:#?}");

    // MoE: the text class reads per-expert 2-D LoRA; the VLM class the 3-D form.
    let v = verdicts(&q35().join("peft/qwen3_5_moe_text/adapter"), "models/qwen3_5_moe_text");
    assert_eq!(broken(&v), [vec!["V9"], vec!["L4"], vec!["M9", "M10"]], "{v:#?}");
    // (M4: a vision-language adapter's target_modules is a regex, which mistral.rs does not read.)
    let vlm = edited("qwen3_5_moe_text", t, "moe_vlm", |a| a.nested = true);
    let v = verdicts(&vlm, "models/qwen3_5_moe");
    assert_eq!(broken(&v), [vec![], vec!["L4"], vec!["M4", "M9", "M10"]], "{v:#?}");
    let down_only = edited("qwen3_5_moe_text", t, "down_only", |a| {
        a.nested = true;
        a.modules.retain(|m, _| !m.ends_with("gate_up_proj"));
    });
    let v = verdicts(&down_only, "models/qwen3_5_moe");
    assert_eq!(broken(&v)[0], ["V9"], "{v:#?}");
    assert!(v[0].to_string().contains("needs both"), "{}", v[0]);
    let per_expert = edited("qwen3_5_moe_text", t, "per_expert", |a| {
        a.nested = true;
        a.expert_format = temper::export::experts::ExpertFormat::PerExpert { mixtral: false };
    });
    assert_eq!(broken(&verdicts(&per_expert, "models/qwen3_5_moe"))[0], ["V9"]);
}

// ---- the model itself (needs the Qwen 3.5 decoder) -------------------------------------------

/// Logits of the merged checkpoint, loaded by Temper, against PEFT's logits with the adapter
/// unmerged and against Temper's own base + adapter unmerged: 1e-4 for Qwen 3.5 (measured 7.0e-5
/// / 8.0e-5 against PEFT, 3.4e-5 / 5.2e-5 against Temper unmerged). Qwen3-Next measured 1.5e-4
/// against PEFT and 3.6e-4 against Temper unmerged, whose own distance to PEFT is 2.1e-4 on this
/// batch; its merged weights equal base + s·B·A to 1e-5 (`qwen3_next_merge_adds_the_delta_...`),
/// so the gap is the GDN's amplification of f32 rounding (fixtures README, "Numerical
/// sensitivity": up to 1e-4 between transformers' own two kernels), not the merge: bounds 2e-4
/// and 5e-4 there.
#[test]
fn qwen35_merged_models_logits_match_peft_with_the_adapter() {
    use burn::tensor::{Int, Tensor, TensorData};
    use temper::model::{load_model, WeightPrecision};
    type B = crate::common::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let m = q35_manifest();
    let device = Default::default();
    for (name, model, vs_peft, vs_own) in [
        ("qwen3_5_text", "models/qwen3_5_text", 1e-4, 1e-4),
        ("qwen3_5", "models/qwen3_5", 1e-4, 1e-4),
        ("qwen3_5_moe_text", "models/qwen3_5_moe_text", 1e-4, 1e-4),
        ("qwen3_next", "models/qwen3_next", 2e-4, 5e-4),
    ] {
        let adapter_dir = q35().join("peft").join(name).join("adapter");
        let out = tmp.path().join(name);
        merge(model, &adapter_dir, &out);
        let r = Reference::open(&q35().join(m["peft"][name]["reference"].as_str().unwrap()));
        let (ids, shape) = r.i64("input_ids");
        let logits = |lm: &temper::model::CausalLm<B>| -> Vec<f32> {
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [shape[0], shape[1]]), &device);
            lm.forward(input).into_data().to_vec().unwrap()
        };
        let merged = logits(&load_model::<B>(&out, WeightPrecision::F32, &device).unwrap().model);
        let mut unmerged = load_model::<B>(&q35().join(model), WeightPrecision::F32, &device).unwrap().model;
        temper::lora::apply_adapter(&mut unmerged, &Adapter::read(&adapter_dir).unwrap()).unwrap();
        let unmerged = logits(&unmerged);
        let peft = r.f32("logits").0;
        let (d_peft, d_own, d_unmerged_peft) =
            (max_abs_diff(&merged, &peft), max_abs_diff(&merged, &unmerged), max_abs_diff(&unmerged, &peft));
        eprintln!("{name}: merged vs PEFT {d_peft:e}, merged vs Temper unmerged {d_own:e}, Temper unmerged vs PEFT {d_unmerged_peft:e}");
        assert!(d_peft <= vs_peft, "{name}: merged logits vs PEFT with the adapter {d_peft:e}");
        assert!(d_own <= vs_own, "{name}: merged vs unmerged in Temper {d_own:e}");
    }
}

/// `temper inspect`: the layer pattern, the DeltaNet dims, and the VLM's unloaded vision tower
/// and MTP head; `--json` keeps its keys and adds new ones.
#[test]
fn qwen35_inspect_shows_layer_pattern_delta_net_and_unloaded_parts() {
    let o = temper(&["inspect", q35().join("models/qwen3_5").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("4 layers: 3 gated delta net, 1 gated attention"), "{text}");
    assert!(text.contains("2 key heads x 16, 4 value heads x 16 (2 per key head), conv kernel 4"), "{text}");
    assert!(text.contains("vision tower") && text.contains("mtp head     7 tensors"), "{text}");
    let o = temper(&["inspect", "--json", q35().join("models/qwen3_5_text_r3").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["model_type", "architecture", "parameters", "layers", "hidden_size", "vision_language", "files"] {
        assert!(j.get(key).is_some(), "{key} kept");
    }
    assert_eq!(j["layer_pattern"]["gated_delta_net"], 3);
    assert_eq!(j["layer_pattern"]["attention"], 2);
    assert_eq!(j["delta_net"]["value_heads"], 6);
    assert_eq!((j["vision_tower_tensors"].as_u64(), j["mtp_tensors"].as_u64()), (Some(0), Some(0)));
}
