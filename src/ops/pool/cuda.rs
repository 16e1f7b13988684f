//! CUDA launchers of kernels/pool.cu. Inputs, outputs and gradients are all f32 or all bf16; the
//! kernel variant follows the input's dtype.

use super::Pool2dCfg;
use crate::cuda::nvrtc::by_dtype;
use crate::cuda::{empty_dtype, grid_for, int, launch, ptr, warp_grid, Arg, BLOCK};
use crate::error::Result;
use crate::tensor::Tensor;

const FILE: &str = "pool.cu";

/// Argument tail (NC, H, W, OH, OW, k, s, p) of the windowed pooling kernels.
fn window_args(x_shape: &[usize], y_shape: &[usize], cfg: Pool2dCfg) -> [Arg; 8] {
    [
        int(x_shape[0] * x_shape[1]),
        int(x_shape[2]),
        int(x_shape[3]),
        int(y_shape[2]),
        int(y_shape[3]),
        int(cfg.kernel),
        int(cfg.stride),
        int(cfg.padding),
    ]
}

pub(super) fn max_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    let (y, py) = empty_dtype(y_shape, x.dtype())?;
    let args: Vec<Arg> = [Arg::Ptr(ptr(x)?), Arg::Ptr(py)].into_iter().chain(window_args(x.shape(), y_shape, cfg)).collect();
    launch(FILE, by_dtype!(x.dtype(), "max_pool2d_forward"), grid_for(y.numel()), BLOCK, &args)?;
    Ok(y)
}

pub(super) fn max_pool2d_backward(dy: &Tensor, x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    let (dx, pdx) = empty_dtype(x.shape(), dy.dtype())?;
    let args: Vec<Arg> =
        [Arg::Ptr(ptr(dy)?), Arg::Ptr(ptr(x)?), Arg::Ptr(pdx)].into_iter().chain(window_args(x.shape(), dy.shape(), cfg)).collect();
    launch(FILE, by_dtype!(dy.dtype(), "max_pool2d_backward"), grid_for(dx.numel()), BLOCK, &args)?;
    Ok(dx)
}

pub(super) fn avg_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    let (y, py) = empty_dtype(y_shape, x.dtype())?;
    let args: Vec<Arg> = [Arg::Ptr(ptr(x)?), Arg::Ptr(py)].into_iter().chain(window_args(x.shape(), y_shape, cfg)).collect();
    launch(FILE, by_dtype!(x.dtype(), "avg_pool2d_forward"), grid_for(y.numel()), BLOCK, &args)?;
    Ok(y)
}

pub(super) fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], cfg: Pool2dCfg) -> Result<Tensor> {
    let (dx, pdx) = empty_dtype(x_shape, dy.dtype())?;
    let args: Vec<Arg> = [Arg::Ptr(ptr(dy)?), Arg::Ptr(pdx)].into_iter().chain(window_args(x_shape, dy.shape(), cfg)).collect();
    launch(FILE, by_dtype!(dy.dtype(), "avg_pool2d_backward"), grid_for(dx.numel()), BLOCK, &args)?;
    Ok(dx)
}

/// (N*C planes, H*W) of an NCHW shape.
fn planes(s: &[usize]) -> (usize, usize) {
    (s[0] * s[1], s[2] * s[3])
}

pub(super) fn global_avg_pool_forward(x: &Tensor) -> Result<Tensor> {
    let (np, hw) = planes(x.shape());
    let (y, py) = empty_dtype(&[x.shape()[0], x.shape()[1], 1, 1], x.dtype())?;
    launch(
        FILE,
        by_dtype!(x.dtype(), "global_avg_pool_forward"),
        warp_grid(np),
        BLOCK,
        &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), int(np), int(hw)],
    )?;
    Ok(y)
}

pub(super) fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let (_, hw) = planes(x_shape);
    let (dx, pdx) = empty_dtype(x_shape, dy.dtype())?;
    let n = dx.numel();
    launch(
        FILE,
        by_dtype!(dy.dtype(), "global_avg_pool_backward"),
        grid_for(n),
        BLOCK,
        &[Arg::Ptr(ptr(dy)?), Arg::Ptr(pdx), int(n), int(hw)],
    )?;
    Ok(dx)
}

pub(super) fn global_max_pool_forward(x: &Tensor) -> Result<Tensor> {
    let (np, hw) = planes(x.shape());
    let (y, py) = empty_dtype(&[x.shape()[0], x.shape()[1], 1, 1], x.dtype())?;
    launch(
        FILE,
        by_dtype!(x.dtype(), "global_max_pool_forward"),
        warp_grid(np),
        BLOCK,
        &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), int(np), int(hw)],
    )?;
    Ok(y)
}

pub(super) fn global_max_pool_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (np, hw) = planes(x.shape());
    let (dx, pdx) = empty_dtype(x.shape(), dy.dtype())?;
    launch(
        FILE,
        by_dtype!(dy.dtype(), "global_max_pool_backward"),
        warp_grid(np),
        BLOCK,
        &[Arg::Ptr(ptr(dy)?), Arg::Ptr(ptr(x)?), Arg::Ptr(pdx), int(np), int(hw)],
    )?;
    Ok(dx)
}

/// Argument tail (N, C, H, W, parts) of the stripe kernels.
fn stripe_args(s: &[usize], parts: usize) -> [Arg; 5] {
    [int(s[0]), int(s[1]), int(s[2]), int(s[3]), int(parts)]
}

pub(super) fn stripe_avg_pool_forward(x: &Tensor, parts: usize) -> Result<Tensor> {
    let s = x.shape();
    let (y, py) = empty_dtype(&[s[0], parts * s[1]], x.dtype())?;
    let args: Vec<Arg> = [Arg::Ptr(ptr(x)?), Arg::Ptr(py)].into_iter().chain(stripe_args(s, parts)).collect();
    launch(FILE, by_dtype!(x.dtype(), "stripe_avg_pool_forward"), warp_grid(y.numel()), BLOCK, &args)?;
    Ok(y)
}

pub(super) fn stripe_avg_pool_backward(dy: &Tensor, x_shape: &[usize], parts: usize) -> Result<Tensor> {
    let (dx, pdx) = empty_dtype(x_shape, dy.dtype())?;
    let args: Vec<Arg> = [Arg::Ptr(ptr(dy)?), Arg::Ptr(pdx)].into_iter().chain(stripe_args(x_shape, parts)).collect();
    launch(FILE, by_dtype!(dy.dtype(), "stripe_avg_pool_backward"), grid_for(dx.numel()), BLOCK, &args)?;
    Ok(dx)
}
