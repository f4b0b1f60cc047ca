//! The CPU parity checks on the wgpu backend (fusion and autotune on), same tolerances. CI
//! runs them on Mesa's lavapipe, a conformant Vulkan device that runs on the CPU
//! (`apt-get install mesa-vulkan-drivers`); a machine without any Vulkan, Metal or DX12 device
//! fails them, as a missing asset fails the other tests.

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};

use crate::common::manifest;

type Gpu = Wgpu<f32, i32>;

/// Every fixture but `llama_deep`, whose reference holds only the last positions' logits (its
/// accuracy test is about the CPU reductions).
#[test]
fn wgpu_fixture_logits_match_transformers() {
    let m = manifest();
    let names: Vec<&String> = m["models"].as_object().expect("models").keys().filter(|n| *n != "llama_deep").collect();
    assert_eq!(names.len(), 12, "{names:?}");
    for name in names {
        crate::parity::check_fixture_on::<Gpu>(name, &WgpuDevice::default());
    }
}

#[test]
fn wgpu_kv_cache_decoding_matches_full_forward() {
    for name in ["llama", "mistral", "gemma2"] {
        crate::parity::check_kv_cache_on::<Gpu>(name, &WgpuDevice::default());
    }
}

#[test]
fn wgpu_peft_adapter_logits_match_peft() {
    crate::lora_parity::check_peft_logits_on::<Gpu>(&WgpuDevice::default());
}

#[test]
fn wgpu_lora_gradients_match_peft() {
    crate::lora_parity::check_peft_grads_on::<Autodiff<Gpu>>(&WgpuDevice::default());
}

#[test]
fn wgpu_ten_step_loss_curve_matches_pytorch() {
    crate::train_parity::run_on::<Autodiff<Gpu>>("llama_train", false, &WgpuDevice::default());
}
