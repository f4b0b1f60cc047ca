//! LoRA on mixture-of-experts experts in PEFT's two on-disk forms (shared/docs/MOE-NOTES.md
//! §0.2, §1c). Inside Temper every expert projection is its own module,
//! `model.layers.L.mlp.experts.{e}.gate_up_proj` (`[2I, H]`) and `...experts.{e}.down_proj`
//! (`[H, I]`), with its own A `[r, in]` and B `[out, r]`.
//!
//! - **3-D (`target_parameters`, PEFT >= 0.17 on transformers 5):** one pair per fused parameter,
//!   A `[E*r, in]` with expert-major rows and B `[out, r*E]` with expert-minor columns: expert e
//!   is `A.reshape(E, r, in)[e]` and `B.reshape(out, r, E)[:, :, e]`. When both expert
//!   parameters of a layer are targeted, PEFT nests the wrappers, so gate_up's pair is
//!   `mlp.experts.base_layer.lora_*` and down's is `mlp.experts.lora_*`; alone, either is
//!   `mlp.experts.lora_*`.
//! - **2-D per expert (what vLLM and llama.cpp read):** `mlp.experts.{e}.gate_proj`, `up_proj`,
//!   `down_proj` (Mixtral: `block_sparse_moe.experts.{e}.w1`, `w3`, `w2`). Read, gate and up become
//!   one rank-2r gate_up delta (A stacked, B block-diagonal), which is exact: PEFT does the same.

use std::collections::BTreeMap;

use crate::export::{HostTensor, LoraPair};
use crate::{Error, Result};

/// How an adapter stores its expert deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertFormat {
    /// No expert deltas, or the 3-D `target_parameters` form (what Temper writes by default).
    #[default]
    Fused,
    /// The 2-D per-expert form; `mixtral`: Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`.
    PerExpert { mixtral: bool },
}

const GATE_UP: &str = "gate_up_proj";
const DOWN: &str = "down_proj";

/// The feed-forward blocks whose experts Temper reads: `mlp` and Llama 4's `feed_forward`.
const EXPERT_BLOCKS: [&str; 2] = [".mlp.experts", ".feed_forward.experts"];

/// `model.layers.3.mlp.experts.5.down_proj` -> (`model.layers.3.mlp.experts`, 5, `down_proj`)
/// (Llama 4: `...feed_forward.experts...`).
pub fn split_expert_name(module: &str) -> Option<(&str, usize, &str)> {
    let at = EXPERT_BLOCKS.iter().find_map(|b| module.find(&format!("{b}.")).map(|i| i + b.len()))?;
    let (prefix, rest) = module.split_at(at);
    let (e, proj) = rest.strip_prefix('.')?.split_once('.')?;
    Some((prefix, e.parse().ok()?, proj))
}

/// Turn the 3-D and per-expert pairs PEFT wrote into Temper's per-expert modules, in place.
/// `ranks(module)` gives the configured rank of a fused expert parameter's name.
pub fn split_experts(
    modules: &mut BTreeMap<String, LoraPair>,
    rank_of: impl Fn(&str) -> usize,
    path: &std::path::Path,
) -> Result<ExpertFormat> {
    let bad = |tensor: &str, reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        key: tensor.to_string(),
        reason,
    };
    let mut format = ExpertFormat::Fused;
    // 2-D per expert: gate/up (w1/w3) pairs become one gate_up pair; w2 is down.
    let per_expert: Vec<String> = modules.keys().filter(|k| per_expert_role(k).is_some()).cloned().collect();
    let mut halves: BTreeMap<String, [Option<LoraPair>; 2]> = BTreeMap::new();
    for key in per_expert {
        let Some((base, role)) = per_expert_role(&key) else { continue };
        let Some(pair) = modules.remove(&key) else { continue };
        format = ExpertFormat::PerExpert { mixtral: key.contains(".block_sparse_moe.") };
        match role {
            "gate" => halves.entry(base).or_default()[0] = Some(pair),
            "up" => halves.entry(base).or_default()[1] = Some(pair),
            _ => {
                modules.insert(format!("{base}.{DOWN}"), pair);
            }
        }
    }
    for (base, [gate, up]) in halves {
        let (Some(g), Some(u)) = (gate, up) else {
            return Err(bad(&format!("base_model.model.{base}"), "has a LoRA pair for only one of gate_proj and up_proj (w1 / w3): Temper's experts fuse the two, so both are needed".into()));
        };
        modules.insert(format!("{base}.{GATE_UP}"), stack_block_diagonal(&g, &u));
    }
    // 3-D: `...mlp.experts` and `...mlp.experts.base_layer`.
    let fused: Vec<String> = modules
        .keys()
        .filter(|k| EXPERT_BLOCKS.iter().any(|b| k.ends_with(b) || k.ends_with(&format!("{b}.base_layer"))))
        .cloned()
        .collect();
    let mut by_layer: BTreeMap<String, Vec<(String, LoraPair)>> = BTreeMap::new();
    for key in fused {
        let prefix = key.trim_end_matches(".base_layer").to_string();
        if let Some(mut pair) = modules.remove(&key) {
            if is_llama4_experts(&prefix) {
                let r = rank_of(&format!("{prefix}.{GATE_UP}")).max(rank_of(&format!("{prefix}.{DOWN}")));
                pair = swap_orientation(&pair, r)
                    .ok_or_else(|| bad(&format!("base_model.model.{key}.lora_A.weight"), format!("has {:?} (lora_B {:?}): expected experts x r ({r}) rows, as PEFT's target_parameters writes", pair.a.shape, pair.b.shape)))?;
            }
            by_layer.entry(prefix).or_default().push((key, pair));
        }
    }
    for (prefix, pairs) in by_layer {
        // Two pairs: gate_up's B has twice as many rows as down's A has columns (2I vs I). A
        // lone pair is whichever of the two parameters the adapter targets.
        let roles: Vec<&str> = match pairs.as_slice() {
            [(_, p)] => vec![lone_role(&prefix, p, &rank_of)],
            [(k0, p0), (_, p1)] => {
                let gate_up_first = p0.b.shape[0] == 2 * p1.a.shape[1];
                let down_first = p1.b.shape[0] == 2 * p0.a.shape[1];
                match (gate_up_first, down_first) {
                    (true, false) => vec![GATE_UP, DOWN],
                    (false, true) => vec![DOWN, GATE_UP],
                    _ => return Err(bad(&format!("base_model.model.{k0}.lora_B.weight"), "the two expert LoRA pairs of this layer do not have the shapes of gate_up_proj [2I, H] and down_proj [H, I]".into())),
                }
            }
            _ => {
                return Err(bad(
                    &format!("base_model.model.{prefix}"),
                    "more than two expert LoRA pairs in one layer".into(),
                ))
            }
        };
        for ((key, pair), role) in pairs.into_iter().zip(roles) {
            let fused_name = format!("{prefix}.{role}");
            let r = rank_of(&fused_name);
            let rows = pair.a.shape[0];
            if r == 0 || rows % r != 0 || pair.b.shape[1] != rows {
                return Err(bad(&format!("base_model.model.{key}.lora_A.weight"), format!("has {rows} rows and lora_B {:?}: expected experts x r ({r}) rows, as PEFT's target_parameters writes", pair.b.shape)));
            }
            let e_count = rows / r;
            let (d_in, d_out) = (pair.a.shape[1], pair.b.shape[0]);
            for e in 0..e_count {
                let a = pair.a.data[e * r * d_in..(e + 1) * r * d_in].to_vec();
                let mut b = vec![0.0f32; d_out * r];
                for o in 0..d_out {
                    for j in 0..r {
                        b[o * r + j] = pair.b.data[o * rows + j * e_count + e];
                    }
                }
                let pair = LoraPair {
                    a: HostTensor { shape: vec![r, d_in], data: a },
                    b: HostTensor { shape: vec![d_out, r], data: b },
                };
                modules.insert(format!("{prefix}.{e}.{role}"), pair);
            }
        }
    }
    Ok(format)
}

/// Llama 4's experts (`feed_forward.experts`), whose 3-D LoRA PEFT orients by the parameter's
/// own `[E, in, out]` layout read as `[E, out, in]` (`Llama4TextExperts` has no `is_transposed`,
/// so PEFT swaps in and out: MOE-NOTES §4.4): expert e's delta is `W_e += s · B_e A_e` on the
/// stored `[in, out]` matrix, i.e. `s · A_eᵀ B_eᵀ` on Temper's `[out, in]`.
fn is_llama4_experts(prefix: &str) -> bool {
    prefix.ends_with(".feed_forward.experts")
}

/// A fused 3-D pair with each expert's A and B exchanged and transposed (`A'_e = B_eᵀ`,
/// `B'_e = A_eᵀ`), in the same fused layout (A expert-major rows, B expert-minor columns): turns
/// PEFT's Llama 4 expert LoRA into the `[out, in]` orientation every other family's has, and
/// back (it is its own inverse). `None` when the shapes do not hold `r`-row experts.
pub fn swap_orientation(pair: &LoraPair, r: usize) -> Option<LoraPair> {
    let (rows, x) = (*pair.a.shape.first()?, *pair.a.shape.get(1)?);
    let (y, cols) = (*pair.b.shape.first()?, *pair.b.shape.get(1)?);
    if r == 0 || rows % r != 0 || cols != rows || pair.a.data.len() != rows * x || pair.b.data.len() != y * cols {
        return None;
    }
    let e_count = rows / r;
    let mut a = vec![0.0f32; rows * y];
    let mut b = vec![0.0f32; x * rows];
    for e in 0..e_count {
        for j in 0..r {
            for yy in 0..y {
                a[(e * r + j) * y + yy] = pair.b.data[yy * cols + j * e_count + e];
            }
            for xx in 0..x {
                b[xx * rows + j * e_count + e] = pair.a.data[(e * r + j) * x + xx];
            }
        }
    }
    Some(LoraPair { a: HostTensor { shape: vec![rows, y], data: a }, b: HostTensor { shape: vec![x, rows], data: b } })
}

/// A lone 3-D pair: gate_up unless the adapter only targets down_proj (its rank lookup says
/// which names it targets: 0 for an untargeted one).
fn lone_role(prefix: &str, _pair: &LoraPair, rank_of: &impl Fn(&str) -> usize) -> &'static str {
    if rank_of(&format!("{prefix}.{GATE_UP}")) == 0 {
        DOWN
    } else {
        GATE_UP
    }
}

/// `...mlp.experts.{e}.gate_proj` -> (`...mlp.experts.{e}` in Temper's `mlp.` naming, "gate").
fn per_expert_role(key: &str) -> Option<(String, &'static str)> {
    let key = key.replacen(".block_sparse_moe.", ".mlp.", 1);
    let (prefix, e, proj) = split_expert_name(&key)?;
    let role = match proj {
        "gate_proj" | "w1" => "gate",
        "up_proj" | "w3" => "up",
        "down_proj" | "w2" => "down",
        _ => return None,
    };
    Some((format!("{prefix}.{e}"), role))
}

/// A = [A_g; A_u] `[2r, H]`, B = diag(B_g, B_u) `[2I, 2r]`: the gate_up delta of two pairs.
fn stack_block_diagonal(g: &LoraPair, u: &LoraPair) -> LoraPair {
    let (rg, ru) = (g.a.shape[0], u.a.shape[0]);
    let (ig, iu) = (g.b.shape[0], u.b.shape[0]);
    let r = rg + ru;
    let mut a = g.a.data.clone();
    a.extend_from_slice(&u.a.data);
    let mut b = vec![0.0f32; (ig + iu) * r];
    for o in 0..ig {
        b[o * r..o * r + rg].copy_from_slice(&g.b.data[o * rg..(o + 1) * rg]);
    }
    for o in 0..iu {
        b[(ig + o) * r + rg..(ig + o + 1) * r].copy_from_slice(&u.b.data[o * ru..(o + 1) * ru]);
    }
    LoraPair {
        a: HostTensor { shape: vec![r, g.a.shape[1]], data: a },
        b: HostTensor { shape: vec![ig + iu, r], data: b },
    }
}

/// The adapter's modules with each layer's per-expert pairs fused into PEFT's 3-D form (names
/// as PEFT keys them, without the `base_model.model.` prefix), plus the fused parameters
/// targeted (`mlp.experts.gate_up_proj`, ...). Every expert of a layer must have a pair of one
/// rank.
pub fn fuse_experts(modules: &BTreeMap<String, LoraPair>) -> Result<(BTreeMap<String, LoraPair>, Vec<String>)> {
    let mut out = BTreeMap::new();
    let mut groups: BTreeMap<(String, String), BTreeMap<usize, &LoraPair>> = BTreeMap::new();
    for (name, pair) in modules {
        match split_expert_name(name) {
            Some((prefix, e, proj)) => {
                groups.entry((prefix.to_string(), proj.to_string())).or_default().insert(e, pair);
            }
            None => {
                out.insert(name.clone(), pair.clone());
            }
        }
    }
    let mut params = std::collections::BTreeSet::new();
    let layers_with_both: std::collections::BTreeSet<String> = groups
        .keys()
        .filter(|(p, proj)| proj == GATE_UP && groups.contains_key(&(p.clone(), DOWN.to_string())))
        .map(|(p, _)| p.clone())
        .collect();
    for ((prefix, proj), experts) in &groups {
        let e_count = experts.len();
        if experts.keys().copied().ne(0..e_count) {
            return Err(Error::InvalidArgument(format!(
                "{prefix}: LoRA on some experts' {proj} but not all; PEFT's 3-D form needs every expert"
            )));
        }
        let first = experts[&0];
        let (r, d_in, d_out) = (first.a.shape[0], first.a.shape[1], first.b.shape[0]);
        if experts.values().any(|p| p.a.shape != first.a.shape || p.b.shape != first.b.shape) {
            return Err(Error::InvalidArgument(format!(
                "{prefix}: the experts' {proj} deltas differ in rank or shape; PEFT's 3-D form needs one"
            )));
        }
        let rows = e_count * r;
        let mut a = Vec::with_capacity(rows * d_in);
        let mut b = vec![0.0f32; d_out * rows];
        for (&e, p) in experts {
            a.extend_from_slice(&p.a.data);
            for o in 0..d_out {
                for j in 0..r {
                    b[o * rows + j * e_count + e] = p.b.data[o * r + j];
                }
            }
        }
        let key = if proj == GATE_UP && layers_with_both.contains(prefix) {
            format!("{prefix}.base_layer")
        } else {
            prefix.clone()
        };
        let mut pair = LoraPair {
            a: HostTensor { shape: vec![rows, d_in], data: a },
            b: HostTensor { shape: vec![d_out, rows], data: b },
        };
        if is_llama4_experts(prefix) {
            pair = swap_orientation(&pair, r)
                .ok_or_else(|| Error::InvalidArgument(format!("{prefix}: expert LoRA of an unexpected shape")))?;
        }
        out.insert(key, pair);
        let block = if is_llama4_experts(prefix) { "feed_forward" } else { "mlp" };
        params.insert(format!("{block}.experts.{proj}"));
    }
    Ok((out, params.into_iter().collect()))
}

/// Whether any module is an expert projection.
pub fn has_experts(modules: &BTreeMap<String, LoraPair>) -> bool {
    modules.keys().any(|k| split_expert_name(k).is_some())
}

/// The adapter's modules with each expert's gate_up delta split into PEFT's 2-D per-expert
/// `gate_proj` and `up_proj` pairs (the same A; B's first and second halves of the rows) and
/// down as `down_proj`; Mixtral: `block_sparse_moe.experts.{e}.w1`, `w3`, `w2`. Exact. Routers
/// and every other module are kept as they are.
pub fn per_expert(modules: &BTreeMap<String, LoraPair>, mixtral: bool) -> BTreeMap<String, LoraPair> {
    let mut out = BTreeMap::new();
    for (name, pair) in modules {
        let Some((prefix, e, proj)) = split_expert_name(name) else {
            out.insert(name.clone(), pair.clone());
            continue;
        };
        let base = if mixtral {
            format!("{}.block_sparse_moe.experts.{e}", prefix.trim_end_matches(".mlp.experts"))
        } else {
            format!("{prefix}.{e}")
        };
        let n = |qwen: &str, mx: &str| format!("{base}.{}", if mixtral { mx } else { qwen });
        if proj == DOWN {
            out.insert(n("down_proj", "w2"), pair.clone());
            continue;
        }
        let (r, half) = (pair.a.shape[0], pair.b.shape[0] / 2);
        let rows = |lo: usize| LoraPair {
            a: pair.a.clone(),
            b: HostTensor { shape: vec![half, r], data: pair.b.data[lo * r..(lo + half) * r].to_vec() },
        };
        out.insert(n("gate_proj", "w1"), rows(0));
        out.insert(n("up_proj", "w3"), rows(half));
    }
    out
}
