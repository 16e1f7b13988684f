//! CUDA launchers: batched products through cuBLAS (strided batched SGEMM), softmax from
//! kernels/attention.cu.

use crate::cuda::cublas::{gemm, Gemm};
use crate::cuda::{empty, int, launch, ptr, warp_grid, Arg, BLOCK};
use crate::error::Result;
use crate::tensor::Tensor;

/// (batch, m, n, k)
type Dims = (usize, usize, usize, usize);

/// out = op(a) op(b) per batch entry, out [batch, m, n].
fn bmm_into(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, (batch, m, n, k): Dims) -> Result<Tensor> {
    let (y, py) = empty(&[batch, m, n])?;
    gemm(Gemm { batch, m, n, k, trans_a, trans_b, alpha: 1.0, beta: 0.0 }, ptr(a)?, ptr(b)?, py)?;
    Ok(y)
}

pub(super) fn bmm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, dims: Dims) -> Result<Tensor> {
    bmm_into(a, b, trans_a, trans_b, dims)
}

/// With C = op(A) op(B): d op(A) = dC op(B)^T and d op(B) = op(A)^T dC, each written back in its
/// operand's stored layout (transposed storage gets the transposed product).
pub(super) fn bmm_backward(dy: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, dims: Dims) -> Result<(Tensor, Tensor)> {
    let (batch, m, n, k) = dims;
    let da = if trans_a { bmm_into(b, dy, trans_b, true, (batch, k, m, n))? } else { bmm_into(dy, b, false, !trans_b, (batch, m, k, n))? };
    let db = if trans_b { bmm_into(dy, a, true, trans_a, (batch, n, k, m))? } else { bmm_into(a, dy, !trans_a, false, (batch, k, n, m))? };
    Ok((da, db))
}

/// (rows, last-axis length) of a softmax input.
fn rows_len(x: &Tensor) -> (usize, usize) {
    let l = x.shape()[x.rank() - 1];
    (x.numel() / l, l)
}

pub(super) fn softmax_lastdim_forward(x: &Tensor) -> Result<Tensor> {
    let (rows, l) = rows_len(x);
    let (y, py) = empty(x.shape())?;
    launch("attention.cu", "softmax_forward", warp_grid(rows), BLOCK, &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), int(rows), int(l)])?;
    Ok(y)
}

pub(super) fn softmax_lastdim_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (rows, l) = rows_len(y);
    let (dx, pdx) = empty(y.shape())?;
    launch(
        "attention.cu",
        "softmax_backward",
        warp_grid(rows),
        BLOCK,
        &[Arg::Ptr(ptr(dy)?), Arg::Ptr(ptr(y)?), Arg::Ptr(pdx), int(rows), int(l)],
    )?;
    Ok(dx)
}
