//! The one place a backend and a device are chosen. `--device auto` tries CUDA, then a wgpu
//! GPU (Vulkan / Metal / DX12), then the CPU, and says which it picked.

use std::str::FromStr;

use anyhow::{bail, Result};
use temper::model::WeightPrecision;
use temper::ops::{TemperAutodiff, TemperBackend};
use temper::train::Precision;

/// The CPU backend. Flex measured faster than ndarray on the forward pass (see README).
pub type Cpu = burn::backend::Flex;
/// The other CPU backend, selectable as `--device ndarray` for comparison.
pub type NdArray = burn::backend::NdArray<f32>;
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu<f32, i32>;

/// `--device` as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    /// The ndarray CPU backend (the alternative to Flex, kept for comparison).
    NdArray,
    Cuda(usize),
    Wgpu,
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "ndarray" => Ok(DeviceArg::NdArray),
            "wgpu" => Ok(DeviceArg::Wgpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceArg::Cuda(i)),
                _ => Err(format!("unknown device {s:?}: expected auto, cpu, cuda, cuda:N, wgpu or ndarray")),
            },
        }
    }
}

/// Work that runs on whichever backend was picked (inference).
pub trait Task {
    type Output;
    fn run<B: TemperBackend>(self, device: B::Device, precision: WeightPrecision) -> Result<Self::Output>;
}

/// Work that needs gradients (training); `kind` says which device was picked so the task can
/// choose its precision.
pub trait TrainTask {
    type Output;
    fn run<B: TemperAutodiff>(self, device: B::Device, kind: Resolved) -> Result<Self::Output>;
}

/// The device actually used, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Cpu,
    NdArray,
    Cuda(usize),
    Wgpu,
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolved::Cpu => write!(f, "cpu"),
            Resolved::NdArray => write!(f, "cpu (ndarray)"),
            Resolved::Cuda(i) => write!(f, "cuda:{i}"),
            Resolved::Wgpu => write!(f, "wgpu"),
        }
    }
}

/// Resolve `auto` by probing, and refuse a backend this build does not include.
pub fn resolve(arg: &DeviceArg) -> Result<Resolved> {
    let picked = match arg {
        DeviceArg::Cpu => Resolved::Cpu,
        DeviceArg::NdArray => Resolved::NdArray,
        DeviceArg::Cuda(i) => {
            if !cfg!(feature = "cuda") {
                bail!("--device cuda: this build has no CUDA backend (rebuild with `--features cuda`)");
            }
            Resolved::Cuda(*i)
        }
        DeviceArg::Wgpu => {
            if !cfg!(feature = "wgpu") {
                bail!("--device wgpu: this build has no wgpu backend (rebuild with `--features wgpu`)");
            }
            Resolved::Wgpu
        }
        DeviceArg::Auto => {
            if probe_cuda() {
                eprintln!("device: auto picked cuda:0");
                Resolved::Cuda(0)
            } else if probe_wgpu() {
                eprintln!("device: auto picked wgpu");
                Resolved::Wgpu
            } else {
                let cuda = if cfg!(feature = "cuda") {
                    "no CUDA driver or device found"
                } else {
                    "this build has no CUDA backend"
                };
                let wgpu = if cfg!(feature = "wgpu") {
                    "no GPU-type Vulkan / Metal / DX12 adapter, and a software one would be slower than the CPU"
                } else {
                    "this build has no wgpu backend"
                };
                eprintln!("device: auto picked cpu ({cuda}; {wgpu})");
                Resolved::Cpu
            }
        }
    };
    Ok(picked)
}

/// Run an inference task on the chosen device: f32 weights, but for CUDA, which keeps a
/// bf16 / f16 checkpoint as stored.
pub fn dispatch<T: Task>(arg: &DeviceArg, task: T) -> Result<T::Output> {
    let kind = resolve(arg)?;
    let precision = if matches!(kind, Resolved::Cuda(_)) { WeightPrecision::Native } else { WeightPrecision::F32 };
    run_task(kind, precision, task)
}

/// Run an inference task on an already resolved device with the weights in `precision`.
pub fn run_task<T: Task>(kind: Resolved, precision: WeightPrecision, task: T) -> Result<T::Output> {
    match kind {
        Resolved::Cpu => task.run::<Cpu>(Default::default(), precision),
        Resolved::NdArray => task.run::<NdArray>(Default::default(), precision),
        #[cfg(feature = "cuda")]
        Resolved::Cuda(i) => task.run::<Cuda>(burn::backend::cuda::CudaDevice { index: i }, precision),
        #[cfg(feature = "wgpu")]
        Resolved::Wgpu => task.run::<Wgpu>(Default::default(), precision),
        #[allow(unreachable_patterns)]
        other => bail!("backend {other} is not compiled into this build"),
    }
}

/// Run a training task on the chosen device (the backend wrapped in `Autodiff`).
pub fn dispatch_train<T: TrainTask>(arg: &DeviceArg, task: T) -> Result<T::Output> {
    use burn::backend::Autodiff;
    match resolve(arg)? {
        Resolved::Cpu => task.run::<Autodiff<Cpu>>(Default::default(), Resolved::Cpu),
        Resolved::NdArray => task.run::<Autodiff<NdArray>>(Default::default(), Resolved::NdArray),
        #[cfg(feature = "cuda")]
        Resolved::Cuda(i) => {
            task.run::<Autodiff<Cuda>>(burn::backend::cuda::CudaDevice { index: i }, Resolved::Cuda(i))
        }
        #[cfg(feature = "wgpu")]
        Resolved::Wgpu => task.run::<Autodiff<Wgpu>>(Default::default(), Resolved::Wgpu),
        #[allow(unreachable_patterns)]
        other => bail!("backend {other} is not compiled into this build"),
    }
}

/// Why wgpu runs in f32 only: an f16 model crashes Burn 0.21's kernel fusion on wgpu (a fused
/// reduce indexes past its arguments, burn-cubecl-fusion `engine/codegen/ir.rs:500`, then the
/// stream panics "Ordering is bigger than operations"); with autotune on the tuner survived it by
/// falling back to another candidate, but autotune is off (Cargo.toml). wgpu has no bf16.
pub const WGPU_F16_UNAVAILABLE: &str =
    "f16 on wgpu crashes Burn 0.21's kernel fusion (a fused reduce, burn-cubecl-fusion ir.rs:500), so wgpu runs in f32";

/// The dtype the frozen base is held in for training, from `train.precision`, saying what
/// `auto` picked: bf16 on CUDA, f32 on wgpu and the CPU. An f16 base (CUDA only, asked for)
/// gets dynamic loss scaling in the trainer, as torch.amp.GradScaler does.
pub fn train_precision(requested: Precision, kind: Resolved) -> Result<WeightPrecision> {
    Ok(match (requested, kind) {
        (Precision::Auto, Resolved::Cuda(_)) => {
            eprintln!("precision: auto picked bf16 (CUDA)");
            WeightPrecision::Bf16
        }
        (Precision::Auto, Resolved::Wgpu) => {
            eprintln!("precision: auto picked f32 ({WGPU_F16_UNAVAILABLE})");
            WeightPrecision::F32
        }
        (Precision::Auto | Precision::F32, _) => WeightPrecision::F32,
        (Precision::Bf16, Resolved::Cuda(_)) => WeightPrecision::Bf16,
        (Precision::F16, Resolved::Cuda(_)) => WeightPrecision::F16,
        (Precision::F16, Resolved::Wgpu) => bail!("train.precision f16: {WGPU_F16_UNAVAILABLE}; use f32"),
        (p, k) => {
            bail!("train.precision {p:?} is not available on {k} (CPU and wgpu train in f32; CUDA in f32, bf16 or f16)")
        }
    })
}

/// Keep Mesa's Vulkan device-selection layer from printing `error: XDG_RUNTIME_DIR is invalid
/// or not set in the environment.` on every wgpu start outside a desktop session (it tries to
/// reach a Wayland compositor to find the display's GPU): with no Wayland session to ask, and no
/// `MESA_VK_DEVICE_SELECT` / `DRI_PRIME` choice for it to honour, the layer has nothing to do, so
/// it is switched off by its documented `NODEVICE_SELECT=1`. Called first thing in `main`,
/// before any thread exists.
pub fn quiet_vulkan_loader() {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let absolute = |k: &str| std::env::var_os(k).is_some_and(|v| v.to_string_lossy().starts_with('/'));
    let wayland = absolute("XDG_RUNTIME_DIR") || absolute("WAYLAND_DISPLAY");
    if !wayland && !set("MESA_VK_DEVICE_SELECT") && !set("DRI_PRIME") && !set("NODEVICE_SELECT") {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// Run `f` with panics caught and their message silenced: backends panic when no driver or
/// adapter is present, which for a probe just means "not available".
#[allow(dead_code)]
fn quietly(f: impl FnOnce() -> bool + std::panic::UnwindSafe) -> bool {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(f).unwrap_or(false);
    std::panic::set_hook(hook);
    ok
}

#[cfg(feature = "cuda")]
fn probe_cuda() -> bool {
    quietly(|| {
        let device = burn::backend::cuda::CudaDevice { index: 0 };
        let t = burn::tensor::Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &device);
        t.sum().into_scalar() == 3.0
    })
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda() -> bool {
    false
}

#[cfg(feature = "wgpu")]
fn probe_wgpu() -> bool {
    use burn::backend::wgpu::WgpuDevice;
    // Only a real GPU: a software (CPU) adapter would be slower than the CPU backend.
    [WgpuDevice::DiscreteGpu(0), WgpuDevice::IntegratedGpu(0)].into_iter().any(|device| {
        quietly(move || {
            let t = burn::tensor::Tensor::<Wgpu, 1>::from_floats([1.0, 2.0], &device);
            t.sum().into_scalar() == 3.0
        })
    })
}

#[cfg(not(feature = "wgpu"))]
fn probe_wgpu() -> bool {
    false
}
