//! `(I + A)⁻¹` for a batch of strictly lower-triangular `A`, exactly, by recursive blocks.
//!
//! The nilpotent product `(I - A)(I + A²)(I + A⁴)...` is exact in real arithmetic but its partial
//! products grow without bound in f32 when keys are correlated (β ≈ 1, nearly equal keys, no
//! decay make `A` close to a matrix of ones). Block inversion instead only ever multiplies
//! inverses of unit lower-triangular blocks, the same quantities forward substitution forms:
//! `[[L11, 0], [L21, L22]]⁻¹ = [[L11⁻¹, 0], [-L22⁻¹ L21 L11⁻¹, L22⁻¹]]`, from 1×1 blocks (all 1)
//! up to the whole matrix, each level one batched matmul pair over every block of every matrix.

use burn::tensor::{backend::Backend, DType, Int, Tensor};

/// `(I + A)⁻¹` of `a` `[m, c, c]` (strictly lower triangular; its diagonal and upper triangle
/// are ignored) -> `[m, c, c]`, unit lower triangular. Any `c`: the matrices are padded with
/// identity rows to the next power of two internally.
pub fn unit_lower_inverse<B: Backend>(a: Tensor<B, 3>) -> Tensor<B, 3> {
    let [m, c, _] = a.dims();
    let device = a.device();
    let dtype = a.dtype();
    let p = c.next_power_of_two();
    let mut a = a.tril(-1);
    if p > c {
        a = Tensor::cat(vec![a, Tensor::zeros([m, p - c, c], (&device, dtype))], 1);
        a = Tensor::cat(vec![a, Tensor::zeros([m, p, p - c], (&device, dtype))], 2);
    }
    // The inverse's diagonal blocks of size s: [m, p / s, s, s].
    let mut inv = Tensor::<B, 4>::ones([m, p, 1, 1], (&device, dtype));
    let mut s = 1;
    while s < p {
        let blocks = p / s;
        let pairs = blocks / 2;
        // Block (2j + 1, 2j) of A on the grid of s × s blocks: the L21 of pair j.
        let grid = a.clone().reshape([m, blocks, s, blocks, s]).swap_dims(2, 3).reshape([m, blocks * blocks, s, s]);
        let index = Tensor::<B, 1, Int>::arange_step(blocks as i64..(blocks * blocks) as i64, 2 * blocks + 2, &device);
        let l21 = grid.select(1, index);
        let inv_pairs = inv.reshape([m, pairs, 2, s, s]);
        let l11 = inv_pairs.clone().narrow(2, 0, 1).reshape([m, pairs, s, s]);
        let l22 = inv_pairs.narrow(2, 1, 1).reshape([m, pairs, s, s]);
        let x21 = if s == 1 { l21.neg() } else { l22.clone().matmul(l21).matmul(l11.clone()).neg() };
        let top = Tensor::cat(vec![l11, Tensor::zeros([m, pairs, s, s], (&device, dtype))], 3);
        let bottom = Tensor::cat(vec![x21, l22], 3);
        inv = Tensor::cat(vec![top, bottom], 2);
        s *= 2;
    }
    let inv = inv.reshape([m, p, p]);
    if p > c {
        inv.narrow(1, 0, c).narrow(2, 0, c)
    } else {
        inv
    }
}

/// `(I + A)⁻¹` of `a` `[m, c, c]` by plain forward substitution on the host in f64, one row at a
/// time -> f32 (the reference [`unit_lower_inverse`] is tested against).
pub fn forward_substitution<B: Backend>(a: Tensor<B, 3>) -> Tensor<B, 3> {
    let [m, c, _] = a.dims();
    let device = a.device();
    let a: Vec<f64> = a.cast(DType::F32).into_data().iter::<f32>().map(f64::from).collect();
    let mut x = vec![0.0f64; m * c * c];
    for b in 0..m {
        let (a, x) = (&a[b * c * c..(b + 1) * c * c], &mut x[b * c * c..(b + 1) * c * c]);
        // Row i of (I + A) X = I: X_i = e_i - Σ_{j<i} A_ij X_j.
        for i in 0..c {
            x[i * c + i] = 1.0;
            for j in 0..i {
                let aij = a[i * c + j];
                for col in 0..c {
                    x[i * c + col] -= aij * x[j * c + col];
                }
            }
        }
    }
    let x: Vec<f32> = x.into_iter().map(|v| v as f32).collect();
    Tensor::from_data(burn::tensor::TensorData::new(x, [m, c, c]), (&device, DType::F32))
}
