//! `temper export --format gguf`: the llama.cpp LoRA GGUF layout read back by a small GGUF
//! reader. (Bit-exactness against llama.cpp's convert_lora_to_gguf.py was checked by hand with
//! scripts/reference/check_gguf.py; see docs/MERGE.md.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use temper::export::Adapter;

use crate::common::fixtures;

#[derive(Debug, PartialEq)]
enum Kv {
    Str(String),
    F32(f32),
    U32(u32),
}

struct Gguf {
    kv: BTreeMap<String, Kv>,
    /// name -> (dims, ggml type, f32 data)
    tensors: BTreeMap<String, (Vec<usize>, u32, Vec<f32>)>,
}

fn read_gguf(path: &Path) -> Gguf {
    let b = std::fs::read(path).unwrap();
    let mut p = 0usize;
    let mut take = |n: usize| {
        let s = &b[p..p + n];
        p += n;
        s.to_vec()
    };
    let u32_ = |v: Vec<u8>| u32::from_le_bytes(v.try_into().unwrap());
    let u64_ = |v: Vec<u8>| u64::from_le_bytes(v.try_into().unwrap()) as usize;
    assert_eq!(take(4), b"GGUF");
    assert_eq!(u32_(take(4)), 3);
    let (n_t, n_kv) = (u64_(take(8)), u64_(take(8)));
    let string = |take: &mut dyn FnMut(usize) -> Vec<u8>| {
        let n = u64_(take(8));
        String::from_utf8(take(n)).unwrap()
    };
    let mut kv = BTreeMap::new();
    for _ in 0..n_kv {
        let key = string(&mut take);
        let v = match u32_(take(4)) {
            8 => Kv::Str(string(&mut take)),
            6 => Kv::F32(f32::from_le_bytes(take(4).try_into().unwrap())),
            4 => Kv::U32(u32_(take(4))),
            t => panic!("unexpected kv type {t}"),
        };
        kv.insert(key, v);
    }
    let mut infos = Vec::new();
    for _ in 0..n_t {
        let name = string(&mut take);
        let nd = u32_(take(4)) as usize;
        let dims: Vec<usize> = (0..nd).map(|_| u64_(take(8))).collect();
        let ty = u32_(take(4));
        let off = u64_(take(8));
        assert_eq!(off % 32, 0, "{name}: offset aligned to 32");
        infos.push((name, dims, ty, off));
    }
    let data_start = p.next_multiple_of(32);
    let mut tensors = BTreeMap::new();
    for (name, dims, ty, off) in infos {
        let n: usize = dims.iter().product();
        let s = &b[data_start + off..];
        let data = match ty {
            0 => s[..n * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            1 => s[..n * 2].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            t => panic!("unexpected tensor type {t}"),
        };
        tensors.insert(name, (dims, ty, data));
    }
    Gguf { kv, tensors }
}

fn export(adapter: &str, base: &str, out: &Path, outtype: &str) {
    let a = fixtures().join(adapter);
    let b = fixtures().join(base);
    let o = Command::new(env!("CARGO_BIN_EXE_temper"))
        .args([
            "export",
            "--adapter",
            a.to_str().unwrap(),
            "--base",
            b.to_str().unwrap(),
            "--format",
            "gguf",
            "--outtype",
            outtype,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn gguf_export_has_llama_cpp_names_layout_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.gguf");
    export("peft/llama/adapter", "models/llama", &out, "f32");
    let g = read_gguf(&out);
    assert_eq!(g.kv["general.type"], Kv::Str("adapter".into()));
    assert_eq!(g.kv["adapter.type"], Kv::Str("lora".into()));
    assert_eq!(g.kv["general.architecture"], Kv::Str("llama".into()));
    assert_eq!(g.kv["adapter.lora.alpha"], Kv::F32(8.0));
    let adapter = Adapter::read(&fixtures().join("peft/llama/adapter")).unwrap();
    assert_eq!(g.tensors.len(), 2 * adapter.modules.len());
    // v_proj: A [r, in] stored as dims [in, r]; B [out, r] as [r, out], data unchanged.
    let v = &adapter.modules["model.layers.1.self_attn.v_proj"];
    let (dims, ty, data) = &g.tensors["blk.1.attn_v.weight.lora_a"];
    assert_eq!((dims.clone(), *ty), (vec![v.a.shape[1], v.a.shape[0]], 0));
    assert_eq!(data, &v.a.data);
    let (dims, _, data) = &g.tensors["blk.1.attn_v.weight.lora_b"];
    assert_eq!(dims, &vec![v.b.shape[1], v.b.shape[0]]);
    assert_eq!(data, &v.b.data);
    // q_proj: B rows permuted per head into llama.cpp's RoPE layout (6 heads, head_dim 8).
    let q = &adapter.modules["model.layers.0.self_attn.q_proj"];
    let (_, _, data) = &g.tensors["blk.0.attn_q.weight.lora_b"];
    let (r, hd) = (q.a.shape[0], 8);
    for head in 0..6 {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (dst, src) = (head * hd + i * 2 + j, head * hd + j * hd / 2 + i);
                assert_eq!(&data[dst * r..(dst + 1) * r], &q.b.data[src * r..(src + 1) * r]);
            }
        }
    }
}

#[test]
fn gguf_export_folds_rslora_and_alpha_pattern_into_b() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.gguf");
    export("peft/llama_rslora/adapter", "models/llama", &out, "f16");
    let g = read_gguf(&out);
    let adapter = Adapter::read(&fixtures().join("peft/llama_rslora/adapter")).unwrap();
    let Kv::F32(alpha) = g.kv["adapter.lora.alpha"] else { panic!("alpha") };
    // llama.cpp applies alpha / rank; the GGUF must then give PEFT's scaling exactly.
    for (module, gguf) in
        [("model.layers.1.self_attn.v_proj", "blk.1.attn_v"), ("model.layers.1.self_attn.o_proj", "blk.1.attn_output")]
    {
        let pair = &adapter.modules[module];
        let (dims, ty, b) = &g.tensors[&format!("{gguf}.weight.lora_b")];
        assert_eq!(*ty, 1, "f16");
        let r = dims[0] as f64;
        let want = adapter.config.scaling(module);
        let effective = b
            .iter()
            .zip(&pair.b.data)
            .find(|(_, x)| x.abs() > 1e-3)
            .map(|(g, x)| *g as f64 / *x as f64 * alpha as f64 / r)
            .unwrap();
        assert!((effective - want).abs() <= want * 2e-3, "{module}: effective scaling {effective}, PEFT {want}");
    }
}
