//! The CPU parity checks on the wgpu backend (fusion on), same tolerances, on any Vulkan /
//! Metal / DX12 device; without a GPU, Mesa's lavapipe (a conformant Vulkan device on the CPU,
//! `apt-get install mesa-vulkan-drivers`). `.ci/run` runs them, one at a time:
//!
//!     cargo test --test suite wgpu:: -- --ignored --test-threads 1
//!
//! They are `#[ignore]`d in a plain `cargo test` only because a machine without a Vulkan driver
//! cannot run them. Burn's autotune is off (Cargo.toml): with it, these tests failed in 3 of 6
//! cold-cache runs, on the kernel the tuner picked (tracel-ai/burn#5626).

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};

use crate::common::manifest;

type Gpu = Wgpu<f32, i32>;

/// Every fixture but `llama_deep`, whose reference holds only the last positions' logits (its
/// accuracy test is about the CPU reductions).
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_fixture_logits_match_transformers() {
    let m = manifest();
    let names: Vec<&String> = m["models"].as_object().expect("models").keys().filter(|n| *n != "llama_deep").collect();
    assert_eq!(names.len(), 21, "{names:?}");
    for name in names {
        crate::parity::check_fixture_on::<Gpu>(name, &WgpuDevice::default());
    }
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_kv_cache_decoding_matches_full_forward() {
    for name in ["llama", "mistral", "gemma2"] {
        crate::parity::check_kv_cache_on::<Gpu>(name, &WgpuDevice::default());
    }
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_peft_adapter_logits_match_peft() {
    crate::lora_parity::check_peft_logits_on::<Gpu>(&WgpuDevice::default());
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_lora_gradients_match_peft() {
    crate::lora_parity::check_peft_grads_on::<Autodiff<Gpu>>(&WgpuDevice::default());
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_ten_step_loss_curve_matches_pytorch() {
    crate::train_parity::run_on::<Autodiff<Gpu>>("llama_train", false, &WgpuDevice::default());
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_merged_model_matches_unmerged() {
    crate::merge::check_merged_matches_unmerged_on::<Gpu>(&WgpuDevice::default());
}

/// Dropout on: the same masks as on the CPU (they are drawn from the seed, step, micro-batch
/// and module, not from the backend's generator), so the same curve.
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_dropout_curve_equals_the_cpu_curve() {
    let (_, cpu) =
        crate::train_parity::curve_on::<crate::common::CpuAutodiff>("llama_train", false, 0.1, &Default::default());
    let (_, gpu) = crate::train_parity::curve_on::<Autodiff<Gpu>>("llama_train", false, 0.1, &WgpuDevice::default());
    crate::train_parity::assert_same_curve("cpu vs wgpu, dropout 0.1", &cpu, &gpu, 1e-5);
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_4bit_dequantization_matches_the_host() {
    crate::quant::check_device_dequantize_on::<Gpu>(&Default::default());
}

#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_lora_on_a_4bit_base_matches_peft() {
    crate::quant::check_4bit_peft_on::<burn::backend::Autodiff<Gpu>>(&Default::default());
}

/// The gated delta rule (chunked forward and hand-written backward) against the CPU, with
/// strong decays and packed segments.
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_gated_delta_rule_matches_the_cpu() {
    crate::delta_net_op::check_op_on::<Autodiff<Gpu>>("wgpu", &WgpuDevice::default());
}

/// Qwen 3.5 / Qwen3-Next: the six hybrid models' logits (the gated delta rule's chunked forward,
/// the causal convolution, the output-gated attention) on wgpu.
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_qwen35_logits_match_transformers() {
    crate::qwen35::check_logits_on::<Gpu>(&WgpuDevice::default(), crate::qwen35::GPU_LOGITS_TOL);
}

/// Qwen 3.5 / Qwen3-Next: PEFT adapters' logits and LoRA gradients (the delta rule's
/// hand-written backward) on wgpu.
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_qwen35_peft_logits_and_gradients_match() {
    crate::qwen35::check_peft_on::<Autodiff<Gpu>>(&WgpuDevice::default());
}

/// Ministral 3 (YaRN, the query temperature past the original context), alone and in the
/// `mistral3` wrapper: logits, and PEFT adapters' logits and LoRA gradients on wgpu.
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_ministral3_logits_and_peft_gradients_match() {
    crate::ministral3::check_logits_on::<Gpu>(&WgpuDevice::default());
    crate::ministral3::check_peft_on::<Autodiff<Gpu>>(&WgpuDevice::default());
}

/// DeepSeek-V2 / V3 / V3.2 and Kimi K2 on wgpu: multi-head latent attention (a value head dim
/// unlike the query's through the attention op) and DeepSeek's routers; logits, and PEFT
/// adapters' logits and LoRA gradients (routed experts included).
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_deepseek_logits_and_peft_gradients_match() {
    crate::deepseek::check_logits_on::<Gpu>(&WgpuDevice::default());
    crate::deepseek::check_peft_on::<Autodiff<Gpu>>(&WgpuDevice::default());
}

/// Llama 4 on wgpu: chunked attention (the op's chunk mask), complex-pair RoPE, the weightless
/// q/k norm, the NoPE temperature and the score-before-expert router; logits, and PEFT adapters'
/// logits and LoRA gradients (routed experts in PEFT's Llama 4 orientation).
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_llama4_logits_and_peft_gradients_match() {
    crate::llama4::check_logits_on::<Gpu>(&WgpuDevice::default());
    crate::llama4::check_peft_on::<Autodiff<Gpu>>(&WgpuDevice::default());
}

/// FP8 bases kept in 8 bits on wgpu (the generic dequantization: bytes unpacked from 32-bit
/// words, the e4m3 code book, the scale grid expanded): logits within 1e-4 of transformers on
/// divisible, ragged and per-tensor scales.
#[test]
#[ignore = "needs a Vulkan / Metal / DX12 device: run with --ignored --test-threads 1 (see the module docs)"]
fn wgpu_fp8_base_in_8_bits_matches_transformers() {
    let device = WgpuDevice::default();
    for name in ["block", "ragged", "per_tensor"] {
        let dir = crate::common::fixtures().join("fp8");
        let r = crate::common::Reference::open(&dir.join(format!("{name}.reference.safetensors")));
        let model = temper::model::load_model::<Gpu>(&dir.join(name), temper::model::WeightPrecision::F32, &device)
            .unwrap()
            .model;
        let (ids, shape) = r.i64("input_ids");
        let input = burn::tensor::Tensor::<Gpu, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [shape[0], shape[1]]),
            &device,
        );
        let got: Vec<f32> = model.forward(input).into_data().to_vec().unwrap();
        let d = crate::common::max_abs_diff(&got, &r.f32("logits").0);
        assert!(d <= 1e-4, "{name}: logits on an 8-bit FP8 base differ from transformers by {d:e}");
    }
}
