//! CUDA launchers (to come with the CUDA backend).
#![allow(unused_variables)]

use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn relu_forward(x: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn sigmoid_forward(x: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn sigmoid_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn mul_backward(dy: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    crate::cuda::unavailable()
}

pub(super) fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn sum_all(x: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn l2_normalize_forward(x: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn l2_normalize_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    crate::cuda::unavailable()
}
