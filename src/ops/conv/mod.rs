//! 2-d convolution (NCHW input, OIHW weights, square kernels), any stride, padding and group count,
//! depthwise included, with optional bias.
//!
//! x, w, dy, y, dx and dw share one dtype (f32 or bf16); the bias and its gradient are f32 (added
//! in f32 before the output is rounded).

mod cpu;
mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dCfg {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl Conv2dCfg {
    pub fn new(stride: usize, padding: usize, groups: usize) -> Self {
        Conv2dCfg { stride, padding, groups }
    }
}

/// Output shape of a convolution, or a shape error naming the op and both shapes.
pub fn conv2d_output_shape(x: &[usize], w: &[usize], cfg: Conv2dCfg) -> Result<[usize; 4]> {
    const OP: &str = "conv2d";
    crate::ensure_shape!(x.len() == 4, OP, "input must be NCHW, got {x:?}");
    crate::ensure_shape!(w.len() == 4, OP, "weight must be OIHW, got {w:?}");
    let (n, cin, h, wd) = (x[0], x[1], x[2], x[3]);
    let (cout, cin_g, kh, kw) = (w[0], w[1], w[2], w[3]);
    crate::ensure_shape!(cfg.groups >= 1 && cfg.stride >= 1, OP, "stride and groups must be positive ({cfg:?})");
    crate::ensure_shape!(kh == kw, OP, "only square kernels are supported, weight {w:?}");
    crate::ensure_shape!(
        cin == cin_g * cfg.groups && cout % cfg.groups == 0,
        OP,
        "input {x:?} has {cin} channels but weight {w:?} with {} groups expects {}",
        cfg.groups,
        cin_g * cfg.groups
    );
    crate::ensure_shape!(
        h + 2 * cfg.padding >= kh && wd + 2 * cfg.padding >= kw,
        OP,
        "kernel {kh}x{kw} larger than padded input {x:?} (padding {})",
        cfg.padding
    );
    let oh = (h + 2 * cfg.padding - kh) / cfg.stride + 1;
    let ow = (wd + 2 * cfg.padding - kw) / cfg.stride + 1;
    Ok([n, cout, oh, ow])
}

fn check_bias(w: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    if let Some(b) = bias {
        crate::ensure_shape!(
            b.shape() == [w.shape()[0]],
            "conv2d",
            "bias shape {:?} does not match {} output channels",
            b.shape(),
            w.shape()[0]
        );
    }
    Ok(())
}

pub fn conv2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Conv);
    let dev = x.check_same_dtype("conv2d_forward", &[w])?;
    Tensor::check_f32_on("conv2d_forward (bias)", dev, bias.as_slice())?;
    let y_shape = conv2d_output_shape(x.shape(), w.shape(), cfg)?;
    check_bias(w, bias)?;
    match dev {
        Device::Cpu => cpu::conv2d_forward(x, w, bias, cfg, &y_shape)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::conv2d_forward(x, w, bias, cfg, &y_shape),
    }
}

/// Gradient with respect to the input.
pub fn conv2d_backward_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Conv);
    let dev = dy.check_same_dtype("conv2d_backward_data", &[w])?;
    let y_shape = conv2d_output_shape(x_shape, w.shape(), cfg)?;
    crate::ensure_shape!(dy.shape() == y_shape, "conv2d_backward_data", "dy {:?} != output {:?}", dy.shape(), y_shape);
    match dev {
        Device::Cpu => cpu::conv2d_backward_data(dy, w, x_shape, cfg)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::conv2d_backward_data(dy, w, x_shape, cfg),
    }
}

/// Gradient with respect to the weight.
pub fn conv2d_backward_filter(dy: &Tensor, x: &Tensor, w_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Conv);
    let dev = dy.check_same_dtype("conv2d_backward_filter", &[x])?;
    let y_shape = conv2d_output_shape(x.shape(), w_shape, cfg)?;
    crate::ensure_shape!(dy.shape() == y_shape, "conv2d_backward_filter", "dy {:?} != output {:?}", dy.shape(), y_shape);
    match dev {
        Device::Cpu => cpu::conv2d_backward_filter(dy, x, w_shape, cfg)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::conv2d_backward_filter(dy, x, w_shape, cfg),
    }
}

/// Gradient with respect to the bias: dy summed over N, H and W, f32 whatever dy's dtype.
pub fn conv2d_backward_bias(dy: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Conv);
    let dev = dy.check_same_dtype("conv2d_backward_bias", &[])?;
    dy.dims4("conv2d_backward_bias")?;
    match dev {
        Device::Cpu => cpu::conv2d_backward_bias(dy),
        Device::Cuda => cuda::conv2d_backward_bias(dy),
    }
}

#[cfg(test)]
mod tests;
