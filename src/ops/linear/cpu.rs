#![allow(unused_variables)]
use crate::error::Result;
use crate::tensor::Tensor;

/// (batch, in features, out features)
type Dims = (usize, usize, usize);

pub(super) fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dims: Dims) -> Result<Tensor> {
    todo!()
}

pub(super) fn linear_backward(dy: &Tensor, x: &Tensor, w: &Tensor, dims: Dims) -> Result<(Tensor, Tensor, Tensor)> {
    todo!()
}
