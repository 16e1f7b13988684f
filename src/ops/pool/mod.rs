//! Pooling: max pool (pads with -inf), average pool (count includes padding, as PyTorch's default),
//! global average and max pools to [N, C, 1, 1], and the part-level stripe pool.
//!
//! Input, output and gradients share one dtype, f32 or bf16 (computed in f32, rounded once).

mod cpu;
mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dCfg {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Pool2dCfg {
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Pool2dCfg { kernel, stride, padding }
    }
}

pub fn pool2d_output_shape(op: &'static str, x: &[usize], cfg: Pool2dCfg) -> Result<[usize; 4]> {
    crate::ensure_shape!(x.len() == 4, op, "expected NCHW input, got {x:?}");
    crate::ensure_shape!(cfg.kernel >= 1 && cfg.stride >= 1, op, "kernel and stride must be positive ({cfg:?})");
    crate::ensure_shape!(2 * cfg.padding <= cfg.kernel, op, "padding {} exceeds half the kernel {}", cfg.padding, cfg.kernel);
    crate::ensure_shape!(
        x[2] + 2 * cfg.padding >= cfg.kernel && x[3] + 2 * cfg.padding >= cfg.kernel,
        op,
        "kernel {} larger than padded input {x:?}",
        cfg.kernel
    );
    let oh = (x[2] + 2 * cfg.padding - cfg.kernel) / cfg.stride + 1;
    let ow = (x[3] + 2 * cfg.padding - cfg.kernel) / cfg.stride + 1;
    Ok([x[0], x[1], oh, ow])
}

fn check_dy(op: &'static str, dy: &Tensor, expected: &[usize]) -> Result<()> {
    crate::ensure_shape!(dy.shape() == expected, op, "dy {:?} != output {:?}", dy.shape(), expected);
    Ok(())
}

pub fn max_pool2d_forward(x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("max_pool2d_forward", &[])?;
    let y = pool2d_output_shape("max_pool2d_forward", x.shape(), cfg)?;
    match dev {
        Device::Cpu => cpu::max_pool2d_forward(x, cfg, &y)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::max_pool2d_forward(x, cfg, &y),
    }
}

/// The gradient goes to the first maximum of each window (PyTorch's tie rule), found again from x.
pub fn max_pool2d_backward(dy: &Tensor, x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("max_pool2d_backward", &[dy])?;
    let y = pool2d_output_shape("max_pool2d_backward", x.shape(), cfg)?;
    check_dy("max_pool2d_backward", dy, &y)?;
    match dev {
        Device::Cpu => cpu::max_pool2d_backward(dy, x, cfg)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::max_pool2d_backward(dy, x, cfg),
    }
}

pub fn avg_pool2d_forward(x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("avg_pool2d_forward", &[])?;
    let y = pool2d_output_shape("avg_pool2d_forward", x.shape(), cfg)?;
    match dev {
        Device::Cpu => cpu::avg_pool2d_forward(x, cfg, &y)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::avg_pool2d_forward(x, cfg, &y),
    }
}

pub fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], cfg: Pool2dCfg) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = dy.check_same_dtype("avg_pool2d_backward", &[])?;
    let y = pool2d_output_shape("avg_pool2d_backward", x_shape, cfg)?;
    check_dy("avg_pool2d_backward", dy, &y)?;
    match dev {
        Device::Cpu => cpu::avg_pool2d_backward(dy, x_shape, cfg)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::avg_pool2d_backward(dy, x_shape, cfg),
    }
}

/// [N, C, H, W] -> [N, C, 1, 1] mean over H and W.
pub fn global_avg_pool_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("global_avg_pool_forward", &[])?;
    x.dims4("global_avg_pool_forward")?;
    match dev {
        Device::Cpu => cpu::global_avg_pool_forward(x)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::global_avg_pool_forward(x),
    }
}

pub fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = dy.check_same_dtype("global_avg_pool_backward", &[])?;
    crate::ensure_shape!(x_shape.len() == 4, "global_avg_pool_backward", "expected NCHW input shape, got {x_shape:?}");
    check_dy("global_avg_pool_backward", dy, &[x_shape[0], x_shape[1], 1, 1])?;
    match dev {
        Device::Cpu => cpu::global_avg_pool_backward(dy, x_shape)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::global_avg_pool_backward(dy, x_shape),
    }
}

/// [N, C, H, W] -> [N, C, 1, 1] maximum over H and W.
pub fn global_max_pool_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("global_max_pool_forward", &[])?;
    x.dims4("global_max_pool_forward")?;
    match dev {
        Device::Cpu => cpu::global_max_pool_forward(x)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::global_max_pool_forward(x),
    }
}

/// The gradient goes to the first maximum of each plane.
pub fn global_max_pool_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("global_max_pool_backward", &[dy])?;
    let (n, c, _, _) = x.dims4("global_max_pool_backward")?;
    check_dy("global_max_pool_backward", dy, &[n, c, 1, 1])?;
    match dev {
        Device::Cpu => cpu::global_max_pool_backward(dy, x)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::global_max_pool_backward(dy, x),
    }
}

fn check_parts(op: &'static str, x_shape: &[usize], parts: usize) -> Result<()> {
    crate::ensure_shape!(x_shape.len() == 4, op, "expected NCHW input, got {x_shape:?}");
    crate::ensure_shape!(parts >= 1 && x_shape[2].is_multiple_of(parts), op, "{parts} parts do not divide the height of input {x_shape:?}");
    Ok(())
}

/// Horizontal stripes: [N, C, H, W] -> [N, parts * C], element (n, p * C + c) the mean of rows
/// [p H/parts, (p+1) H/parts) of channel c. This is the official code's concatenation order.
pub fn stripe_avg_pool_forward(x: &Tensor, parts: usize) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = x.check_same_dtype("stripe_avg_pool_forward", &[])?;
    check_parts("stripe_avg_pool_forward", x.shape(), parts)?;
    match dev {
        Device::Cpu => cpu::stripe_avg_pool_forward(x, parts)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::stripe_avg_pool_forward(x, parts),
    }
}

pub fn stripe_avg_pool_backward(dy: &Tensor, x_shape: &[usize], parts: usize) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Pool);
    let dev = dy.check_same_dtype("stripe_avg_pool_backward", &[])?;
    check_parts("stripe_avg_pool_backward", x_shape, parts)?;
    check_dy("stripe_avg_pool_backward", dy, &[x_shape[0], parts * x_shape[1]])?;
    match dev {
        Device::Cpu => cpu::stripe_avg_pool_backward(dy, x_shape, parts)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::stripe_avg_pool_backward(dy, x_shape, parts),
    }
}

#[cfg(test)]
mod tests;
