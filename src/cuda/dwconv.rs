//! The engine's depthwise 3x3 convolution (stride 1, padding 1; kernels/dwconv.cu) and the switch
//! between it and cuDNN's grouped convolution, which `ops::conv` consults for those layers.
//!
//! The choice is `PLR_DEPTHWISE=engine|cudnn` (default: engine), read on first use, or
//! `set_depthwise_impl` at run time (benches compare both).

use std::sync::atomic::{AtomicU8, Ordering};

use super::nvrtc::by_dtype;
use super::{empty, empty_dtype, grid_for, int, launch, ptr, Arg, BLOCK};
use crate::error::{Error, Result};
use crate::ops::conv::Conv2dCfg;
use crate::tensor::{Device, Tensor};

const FILE: &str = "dwconv.cu";
const VAR: &str = "PLR_DEPTHWISE";

/// Which implementation runs depthwise 3x3 stride-1 convolutions on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepthwiseImpl {
    /// kernels/dwconv.cu
    Engine,
    /// cuDNN's grouped convolution (groups = channels)
    Cudnn,
}

/// 0: not chosen yet (read PLR_DEPTHWISE), else 1 + the variant.
static CHOICE: AtomicU8 = AtomicU8::new(0);

impl DepthwiseImpl {
    /// Parses a `PLR_DEPTHWISE` value.
    pub fn parse(s: &str) -> Result<DepthwiseImpl> {
        match s {
            "engine" => Ok(DepthwiseImpl::Engine),
            "cudnn" => Ok(DepthwiseImpl::Cudnn),
            _ => Err(Error::msg(format!("{VAR}={s:?}: expected \"engine\" or \"cudnn\""))),
        }
    }
}

/// Chooses the implementation for every later depthwise 3x3 convolution, overriding PLR_DEPTHWISE.
pub fn set_depthwise_impl(choice: DepthwiseImpl) {
    CHOICE.store(1 + choice as u8, Ordering::Relaxed);
}

/// The implementation in use: the last `set_depthwise_impl`, else PLR_DEPTHWISE, else Engine.
pub fn depthwise_impl() -> Result<DepthwiseImpl> {
    match CHOICE.load(Ordering::Relaxed) {
        1 => Ok(DepthwiseImpl::Engine),
        2 => Ok(DepthwiseImpl::Cudnn),
        _ => {
            let choice = match std::env::var(VAR) {
                Ok(v) => DepthwiseImpl::parse(&v)?,
                Err(std::env::VarError::NotPresent) => DepthwiseImpl::Engine,
                Err(e) => return Err(Error::msg(format!("{VAR}: {e}"))),
            };
            // A concurrent set_depthwise_impl wins over the environment.
            let _ = CHOICE.compare_exchange(0, 1 + choice as u8, Ordering::Relaxed, Ordering::Relaxed);
            Ok(choice)
        }
    }
}

/// Whether these kernels handle the convolution: depthwise with one output channel per group,
/// 3x3, stride 1, padding 1.
pub fn handles(x_shape: &[usize], w_shape: &[usize], cfg: Conv2dCfg) -> bool {
    x_shape.len() == 4 && cfg.stride == 1 && cfg.padding == 1 && cfg.groups == x_shape[1] && w_shape == [x_shape[1], 1, 3, 3]
}

fn check(op: &'static str, x_shape: &[usize], w_shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    crate::ensure_shape!(
        handles(x_shape, w_shape, Conv2dCfg::new(1, 1, x_shape.get(1).copied().unwrap_or(0))),
        op,
        "expects an NCHW input and [C, 1, 3, 3] weights, got {x_shape:?} and {w_shape:?}"
    );
    crate::ensure_shape!(x_shape.iter().product::<usize>() <= i32::MAX as usize, op, "input {x_shape:?} has more than 2^31 - 1 elements");
    Ok((x_shape[0], x_shape[1], x_shape[2], x_shape[3]))
}

/// y = depthwise 3x3 convolution of x (NCHW, on the GPU) with w [C, 1, 3, 3], stride 1, padding 1.
/// x and w are both f32 or both bf16; y has their dtype (as have the gradients below).
pub fn forward(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    correlate(by_dtype!(x.dtype(), "dwconv3x3_forward"), x, w)
}

/// dx from dy (shaped like x) and w.
pub fn backward_data(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    correlate(by_dtype!(dy.dtype(), "dwconv3x3_backward_data"), dy, w)
}

fn correlate(kernel: &'static str, input: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = check(kernel, input.shape(), w.shape())?;
    input.check_same_dtype(kernel, &[w])?;
    let (out, po) = empty_dtype(input.shape(), input.dtype())?;
    let strips = n * c * h.div_ceil(ROWS) * wd;
    launch(
        FILE,
        kernel,
        grid_for(strips),
        BLOCK,
        &[Arg::Ptr(ptr(input)?), Arg::Ptr(ptr(w)?), Arg::Ptr(po), int(n * c), int(c), int(h), int(wd)],
    )?;
    Ok(out)
}

/// Output rows per thread (DW_ROWS in kernels/dwconv.cu).
const ROWS: usize = 4;

/// Blocks the filter gradient aims for in total (channels x image slices): a few per SM of an
/// H100 (132 SMs), so that even 64 channels fill the GPU.
const FILTER_BLOCKS: usize = 1024;

/// Image slices per channel for the filter gradient: enough for FILTER_BLOCKS blocks, at most one
/// per image. Depends only on the shape, so the summation order (and the result) is fixed.
pub fn filter_slices(n: usize, c: usize) -> usize {
    FILTER_BLOCKS.div_ceil(c.max(1)).clamp(1, n.max(1))
}

/// dw [C, 1, 3, 3] from dy and x (both NCHW on the GPU): per-block partial sums, then a second
/// kernel adds them in a fixed order (deterministic, no atomics).
pub fn backward_filter(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "dwconv3x3_backward_filter";
    let c = x.shape().get(1).copied().unwrap_or(0);
    let (n, c, h, wd) = check(OP, x.shape(), &[c, 1, 3, 3])?;
    crate::ensure_shape!(dy.shape() == x.shape(), OP, "dy {:?} must have the input's shape {:?}", dy.shape(), x.shape());
    x.check_same_dtype(OP, &[dy])?;
    if n * c * h * wd == 0 {
        return Tensor::zeros(&[c, 1, 3, 3], Device::Cuda)?.to_dtype(x.dtype());
    }
    let s = filter_slices(n, c);
    let (dw, pdw) = empty_dtype(&[c, 1, 3, 3], x.dtype())?;
    // f32 partial sums for either dtype. Freed when this returns, after both kernels are queued:
    // the allocator is stream-ordered.
    let (_partial, pp) = empty(&[c * s, 9])?;
    launch(
        FILE,
        by_dtype!(x.dtype(), "dwconv3x3_backward_filter_partial"),
        (c * s) as u32,
        BLOCK,
        &[Arg::Ptr(ptr(dy)?), Arg::Ptr(ptr(x)?), Arg::Ptr(pp), int(n), int(c), int(h), int(wd), int(s)],
    )?;
    launch(
        FILE,
        by_dtype!(x.dtype(), "dwconv3x3_backward_filter_reduce"),
        grid_for(c * 9),
        BLOCK,
        &[Arg::Ptr(pp), Arg::Ptr(pdw), int(c), int(s)],
    )?;
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_choice_and_names_the_variable_on_error() {
        assert_eq!(DepthwiseImpl::parse("engine").unwrap(), DepthwiseImpl::Engine);
        assert_eq!(DepthwiseImpl::parse("cudnn").unwrap(), DepthwiseImpl::Cudnn);
        let e = DepthwiseImpl::parse("fast").unwrap_err().to_string();
        assert!(e.contains("PLR_DEPTHWISE") && e.contains("fast"), "{e}");
    }

    #[test]
    fn only_depthwise_3x3_stride_1_pad_1_is_handled() {
        let x = [64, 128, 16, 8];
        assert!(handles(&x, &[128, 1, 3, 3], Conv2dCfg::new(1, 1, 128)));
        assert!(!handles(&x, &[128, 1, 3, 3], Conv2dCfg::new(2, 1, 128)));
        assert!(!handles(&x, &[128, 1, 3, 3], Conv2dCfg::new(1, 0, 128)));
        assert!(!handles(&x, &[256, 1, 3, 3], Conv2dCfg::new(1, 1, 128)), "channel multiplier 2");
        assert!(!handles(&x, &[128, 1, 5, 5], Conv2dCfg::new(1, 2, 128)));
        assert!(!handles(&x, &[128, 128, 3, 3], Conv2dCfg::new(1, 1, 1)));
    }

    #[test]
    fn filter_slices_fill_the_gpu_and_never_exceed_the_batch() {
        assert_eq!(filter_slices(64, 64), 16);
        assert_eq!(filter_slices(64, 512), 2);
        assert_eq!(filter_slices(64, 2048), 1);
        assert_eq!(filter_slices(3, 8), 3);
    }
}
