//! CUDA launchers (to come with the CUDA backend).
#![allow(unused_variables)]

use super::Conv2dCfg;
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn conv2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn conv2d_backward_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn conv2d_backward_filter(dy: &Tensor, x: &Tensor, w_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    crate::cuda::unavailable()
}

pub(super) fn conv2d_backward_bias(dy: &Tensor) -> Result<Tensor> {
    crate::cuda::unavailable()
}
