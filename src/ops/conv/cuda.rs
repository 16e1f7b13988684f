//! CUDA: cuDNN for the convolution and its data and filter gradients, except depthwise 3x3
//! stride-1 layers, which go to the engine's own kernels unless PLR_DEPTHWISE=cudnn (see
//! `cuda::dwconv`); the bias is added with the broadcast kernel and its gradient is a per-channel
//! sum. x, w, y, dy, dx and dw are all f32 or all bf16; the bias and its gradient are f32.

use super::Conv2dCfg;
use crate::cuda::dwconv::{self, DepthwiseImpl};
use crate::cuda::{cudnn, empty_dtype, ptr};
use crate::error::Result;
use crate::ops::elementwise::{add, sum_to_shape};
use crate::tensor::{DType, Tensor};

/// Whether the engine's depthwise kernels run this convolution.
fn engine_depthwise(x_shape: &[usize], w_shape: &[usize], cfg: Conv2dCfg) -> Result<bool> {
    Ok(dwconv::handles(x_shape, w_shape, cfg) && dwconv::depthwise_impl()? == DepthwiseImpl::Engine)
}

pub(super) fn conv2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    if let (Some(b), DType::BF16) = (bias, x.dtype()) {
        // The f32 bias must be added before the output's one rounding, and cuDNN has no bf16-in,
        // f32-out convolution: convolve the (exactly widened) inputs in f32, then round. Only the
        // attention gates' 1x1 convolutions on [N, C, 1, 1] have a bias, so this costs little.
        let y = conv2d_forward(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, Some(b), cfg, y_shape)?;
        return y.to_dtype(DType::BF16);
    }
    let y = if engine_depthwise(x.shape(), w.shape(), cfg)? {
        dwconv::forward(x, w)?
    } else {
        let (y, py) = empty_dtype(y_shape, x.dtype())?;
        cudnn::conv2d_forward(ptr(x)?, ptr(w)?, py, x.shape(), w.shape(), cfg, x.dtype())?;
        y
    };
    match bias {
        Some(b) => add(&y, &b.reshape(&[1, y_shape[1], 1, 1])?),
        None => Ok(y),
    }
}

pub(super) fn conv2d_backward_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    if engine_depthwise(x_shape, w.shape(), cfg)? {
        return dwconv::backward_data(dy, w);
    }
    let (dx, pdx) = empty_dtype(x_shape, dy.dtype())?;
    cudnn::conv2d_backward_data(ptr(dy)?, ptr(w)?, pdx, x_shape, w.shape(), cfg, dy.dtype())?;
    Ok(dx)
}

pub(super) fn conv2d_backward_filter(dy: &Tensor, x: &Tensor, w_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    if engine_depthwise(x.shape(), w_shape, cfg)? {
        return dwconv::backward_filter(dy, x);
    }
    let (dw, pdw) = empty_dtype(w_shape, x.dtype())?;
    cudnn::conv2d_backward_filter(ptr(dy)?, ptr(x)?, pdw, x.shape(), w_shape, cfg, x.dtype())?;
    Ok(dw)
}

/// The f32 bias gradient, also for a bf16 dy (widened exactly first: only the gates' small
/// [N, C, 1, 1] convolutions have a bias).
pub(super) fn conv2d_backward_bias(dy: &Tensor) -> Result<Tensor> {
    let c = dy.shape()[1];
    sum_to_shape(&dy.to_dtype(DType::F32)?, &[1, c, 1, 1])?.reshape(&[c])
}
