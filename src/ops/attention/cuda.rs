//! CUDA launchers (to come with the CUDA backend).
#![allow(unused_variables)]

use crate::error::Result;
use crate::tensor::Tensor;

/// (batch, m, n, k)
type Dims = (usize, usize, usize, usize);

pub(super) fn bmm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, dims: Dims) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn bmm_backward(dy: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, dims: Dims) -> Result<(Tensor, Tensor)> {
    crate::cuda::unavailable()
}

pub(super) fn softmax_lastdim_forward(x: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn softmax_lastdim_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}
