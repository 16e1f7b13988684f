//! CUDA: cuDNN for the convolution and its data and filter gradients; the bias is added with the
//! broadcast kernel and its gradient is a per-channel sum.

use super::Conv2dCfg;
use crate::cuda::cudnn;
use crate::cuda::{empty, ptr};
use crate::error::Result;
use crate::ops::elementwise::{add, sum_to_shape};
use crate::tensor::Tensor;

pub(super) fn conv2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    let (y, py) = empty(y_shape)?;
    cudnn::conv2d_forward(ptr(x)?, ptr(w)?, py, x.shape(), w.shape(), cfg)?;
    match bias {
        Some(b) => add(&y, &b.reshape(&[1, y_shape[1], 1, 1])?),
        None => Ok(y),
    }
}

pub(super) fn conv2d_backward_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    let (dx, pdx) = empty(x_shape)?;
    cudnn::conv2d_backward_data(ptr(dy)?, ptr(w)?, pdx, x_shape, w.shape(), cfg)?;
    Ok(dx)
}

pub(super) fn conv2d_backward_filter(dy: &Tensor, x: &Tensor, w_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    let (dw, pdw) = empty(w_shape)?;
    cudnn::conv2d_backward_filter(ptr(dy)?, ptr(x)?, pdw, x.shape(), w_shape, cfg)?;
    Ok(dw)
}

pub(super) fn conv2d_backward_bias(dy: &Tensor) -> Result<Tensor> {
    let c = dy.shape()[1];
    sum_to_shape(dy, &[1, c, 1, 1])?.reshape(&[c])
}
