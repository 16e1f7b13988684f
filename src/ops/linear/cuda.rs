//! CUDA: products through cuBLAS; the bias is broadcast into the output before the product
//! accumulates onto it, and its gradient is a column sum.

use crate::cuda::cublas::{gemm, Gemm};
use crate::cuda::{empty, ptr, ptr_mut};
use crate::error::Result;
use crate::ops::elementwise::{broadcast_to, sum_to_shape};
use crate::tensor::Tensor;

/// (batch, in features, out features)
type Dims = (usize, usize, usize);

pub(super) fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, (n, fin, fout): Dims) -> Result<Tensor> {
    let (mut y, beta) = match b {
        Some(b) => (broadcast_to(b, &[n, fout])?, 1.0),
        None => (empty(&[n, fout])?.0, 0.0),
    };
    let py = ptr_mut(&mut y)?;
    gemm(Gemm { batch: 1, m: n, n: fout, k: fin, trans_a: false, trans_b: true, alpha: 1.0, beta }, ptr(x)?, ptr(w)?, py)?;
    Ok(y)
}

pub(super) fn linear_backward(dy: &Tensor, x: &Tensor, w: &Tensor, (n, fin, fout): Dims) -> Result<(Tensor, Tensor, Tensor)> {
    let (dx, pdx) = empty(&[n, fin])?;
    gemm(Gemm { batch: 1, m: n, n: fin, k: fout, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, ptr(dy)?, ptr(w)?, pdx)?;
    let (dw, pdw) = empty(&[fout, fin])?;
    gemm(Gemm { batch: 1, m: fout, n: fin, k: n, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 }, ptr(dy)?, ptr(x)?, pdw)?;
    let db = sum_to_shape(dy, &[fout])?;
    Ok((dx, dw, db))
}
