//! Write a random-weight Llama-architecture model in the Hugging Face layout (config.json,
//! bf16 safetensors shards + index) and a random PEFT adapter for it: the input of the merge
//! benchmark (`scripts/bench/merge_2gb.sh`). Generation is streamed tensor by tensor too.
//!
//! cargo run --no-default-features --example random_model -- OUT_DIR [LAYERS]
//! (22 layers of TinyLlama's shape: 1.1 B parameters, 2.2 GB in bf16, 3 shards of <= 1 GB)

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use temper::export::shard::ShardWriter;
use temper::export::{Adapter, HostTensor, LoraPair, WriteMode};
use temper::lora::{LoraConfig, TargetModules};

const HIDDEN: usize = 2048;
const FFN: usize = 5632;
const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const VOCAB: usize = 32000;
const SHARD_BYTES: usize = 1 << 30;
const RANK: usize = 16;

/// xorshift64*: fast, seeded, good enough for benchmark weights.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn tensors(layers: usize) -> Vec<(String, Vec<usize>)> {
    let kv = HIDDEN / HEADS * KV_HEADS;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("mlp.gate_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.up_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, FFN]),
        ] {
            t.push((format!("{p}.{n}"), s));
        }
    }
    t.push(("model.norm.weight".into(), vec![HIDDEN]));
    t.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    t
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = Path::new(args.get(1).ok_or("usage: random_model OUT_DIR [LAYERS]")?);
    let layers: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(22);
    let model = out.join("model");
    std::fs::create_dir_all(&model)?;
    let all = tensors(layers);
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut size = 0;
    for (name, shape) in all {
        let n = shape.iter().product::<usize>() * 2;
        if size + n > SHARD_BYTES && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(vec![]);
            size = 0;
        }
        size += n;
        shards.last_mut().ok_or("no shard")?.push((name, shape));
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        let header: Vec<(String, Dtype, Vec<usize>)> =
            shard.iter().map(|(n, s)| (n.clone(), Dtype::BF16, s.clone())).collect();
        let mut w = ShardWriter::create(&model.join(&file), &header, &meta)?;
        for (name, shape) in shard {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| half::bf16::from_f32(if norm { 1.0 } else { rng.uniform() * 0.035 }).to_le_bytes())
                .collect();
            w.write(name, &bytes)?;
            weight_map.insert(name.clone(), file.clone());
        }
        total += w.finish()?;
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(model.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": VOCAB, "tie_word_embeddings": false, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(model.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(model.join("generation_config.json"), "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n")?;

    let mut modules = BTreeMap::new();
    let kv = HIDDEN / HEADS * KV_HEADS;
    for i in 0..layers {
        for (n, d_out, d_in) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", kv, HIDDEN),
            ("self_attn.v_proj", kv, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", FFN, HIDDEN),
            ("mlp.up_proj", FFN, HIDDEN),
            ("mlp.down_proj", HIDDEN, FFN),
        ] {
            let mut t = |r: usize, c: usize, s: f32| HostTensor {
                shape: vec![r, c],
                data: (0..r * c).map(|_| rng.uniform() * s).collect(),
            };
            let pair = LoraPair { a: t(RANK, d_in, 0.02), b: t(d_out, RANK, 0.01) };
            modules.insert(format!("model.layers.{i}.{n}"), pair);
        }
    }
    let config = LoraConfig {
        r: RANK,
        lora_alpha: 32.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..LoraConfig::default()
    };
    Adapter {
        config,
        base_model: "random-llama-1.1b".into(),
        modules,
        nested: false,
        legacy_names: false,
        expert_format: Default::default(),
    }
    .write(&out.join("adapter"), WriteMode::Replace, &[])?;
    println!(
        "{} parameters-worth of bf16 ({total} bytes) in {} shard(s) under {}",
        total / 2,
        shards.len(),
        model.display()
    );
    Ok(())
}
