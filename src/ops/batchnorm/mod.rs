//! Batch normalisation over channel axis 1, for [N, C] (BatchNorm1d) and [N, C, H, W] (BatchNorm2d)
//! inputs, as PyTorch defines it: training normalises with the biased batch variance and updates the
//! running variance with the unbiased one.
//!
//! x, y, dy and dx share one dtype (f32 or bf16); gamma, beta, the running and batch statistics
//! and dgamma/dbeta are always f32.

mod cpu;
mod cuda;

use crate::error::Result;
use crate::ops::elementwise::{relu_backward, relu_forward};
use crate::tensor::{Device, Tensor};

pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

/// Per-channel statistics of one training batch, each of shape [C].
#[derive(Clone, Debug)]
pub struct BnBatchStats {
    pub mean: Tensor,
    /// 1 / sqrt(biased variance + eps).
    pub invstd: Tensor,
    /// Unbiased variance (divided by count - 1), what the running variance tracks.
    pub var_unbiased: Tensor,
}

/// The fixed statistics of eval-mode BatchNorm, as the CPU and CUDA passes take them.
#[derive(Clone, Copy)]
struct Running<'a> {
    mean: &'a Tensor,
    var: &'a Tensor,
    eps: f32,
}

/// (N, C, spatial size) of a BatchNorm input, checking gamma/beta (and any further [C] tensors).
fn bn_dims(op: &'static str, x: &Tensor, per_channel: &[&Tensor]) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    crate::ensure_shape!(s.len() == 2 || s.len() == 4, op, "expected [N, C] or [N, C, H, W], got {s:?}");
    let (n, c) = (s[0], s[1]);
    let hw: usize = s[2..].iter().product();
    for t in per_channel {
        crate::ensure_shape!(t.shape() == [c], op, "per-channel tensor of shape {:?} for input {s:?} with {c} channels", t.shape());
    }
    Ok((n, c, hw))
}

pub fn batchnorm_forward_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, BnBatchStats)> {
    forward_train("batchnorm_forward_train", x, gamma, beta, eps, false)
}

/// relu(batchnorm(x)) in training mode: on the GPU the ReLU is applied in the normalising pass.
pub fn batchnorm_relu_forward_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, BnBatchStats)> {
    forward_train("batchnorm_relu_forward_train", x, gamma, beta, eps, true)
}

fn forward_train(op: &'static str, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, relu: bool) -> Result<(Tensor, BnBatchStats)> {
    let _p = crate::profile::scope(crate::profile::Family::BatchNorm);
    let dev = x.check_same_dtype(op, &[])?;
    Tensor::check_f32_on(op, dev, &[gamma, beta])?;
    let (n, c, hw) = bn_dims(op, x, &[gamma, beta])?;
    crate::ensure_shape!(n * hw > 1, op, "training needs more than one value per channel, got input {:?}", x.shape());
    match dev {
        Device::Cpu => {
            let (y, stats) = cpu::batchnorm_forward_train(x, gamma, beta, eps, (n, c, hw))?;
            let y = y.rounded_to(x.dtype())?;
            Ok((if relu { relu_forward(&y)? } else { y }, stats))
        }
        Device::Cuda => cuda::batchnorm_forward_train(x, gamma, beta, eps, (n, c, hw), relu),
    }
}

/// Returns (dx, dgamma, dbeta).
pub fn batchnorm_backward_train(dy: &Tensor, x: &Tensor, gamma: &Tensor, stats: &BnBatchStats) -> Result<(Tensor, Tensor, Tensor)> {
    backward_train("batchnorm_backward_train", dy, None, x, gamma, stats)
}

/// Backward of y = relu(batchnorm(x)) given y: returns (dx, dgamma, dbeta). On the GPU the ReLU
/// mask is applied to dy inside the BatchNorm backward.
pub fn batchnorm_relu_backward_train(
    dy: &Tensor,
    y: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    stats: &BnBatchStats,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_train("batchnorm_relu_backward_train", dy, Some(y), x, gamma, stats)
}

fn backward_train(
    op: &'static str,
    dy: &Tensor,
    relu_out: Option<&Tensor>,
    x: &Tensor,
    gamma: &Tensor,
    stats: &BnBatchStats,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _p = crate::profile::scope(crate::profile::Family::BatchNorm);
    let dev = x.check_same_dtype(op, &[dy])?;
    Tensor::check_f32_on(op, dev, &[gamma, &stats.mean, &stats.invstd])?;
    let dims = bn_dims(op, x, &[gamma, &stats.mean, &stats.invstd])?;
    crate::ensure_shape!(dy.shape() == x.shape(), op, "dy {:?} != x {:?}", dy.shape(), x.shape());
    if let Some(y) = relu_out {
        y.check_same_dtype(op, &[x])?;
        crate::ensure_shape!(y.shape() == x.shape(), op, "y {:?} != x {:?}", y.shape(), x.shape());
    }
    match dev {
        Device::Cpu => {
            let (dx, dgamma, dbeta) = match relu_out {
                Some(y) => cpu::batchnorm_backward_train(&relu_backward(dy, y)?, x, gamma, stats, dims)?,
                None => cpu::batchnorm_backward_train(dy, x, gamma, stats, dims)?,
            };
            Ok((dx.rounded_to(x.dtype())?, dgamma, dbeta))
        }
        Device::Cuda => cuda::batchnorm_backward_train(dy, relu_out, x, gamma, stats, dims),
    }
}

pub fn batchnorm_forward_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::BatchNorm);
    const OP: &str = "batchnorm_forward_eval";
    let dev = x.check_same_dtype(OP, &[])?;
    Tensor::check_f32_on(OP, dev, &[gamma, beta, running_mean, running_var])?;
    let dims = bn_dims(OP, x, &[gamma, beta, running_mean, running_var])?;
    let run = Running { mean: running_mean, var: running_var, eps };
    match dev {
        Device::Cpu => cpu::batchnorm_forward_eval(x, gamma, beta, run, dims)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::batchnorm_forward_eval(x, gamma, beta, run, dims),
    }
}

/// Returns (dx, dgamma, dbeta) of the eval-mode (fixed statistics) normalisation.
pub fn batchnorm_backward_eval(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _p = crate::profile::scope(crate::profile::Family::BatchNorm);
    const OP: &str = "batchnorm_backward_eval";
    let dev = x.check_same_dtype(OP, &[dy])?;
    Tensor::check_f32_on(OP, dev, &[gamma, running_mean, running_var])?;
    let dims = bn_dims(OP, x, &[gamma, running_mean, running_var])?;
    crate::ensure_shape!(dy.shape() == x.shape(), OP, "dy {:?} != x {:?}", dy.shape(), x.shape());
    let run = Running { mean: running_mean, var: running_var, eps };
    match dev {
        Device::Cpu => {
            let (dx, dgamma, dbeta) = cpu::batchnorm_backward_eval(dy, x, gamma, run, dims)?;
            Ok((dx.rounded_to(x.dtype())?, dgamma, dbeta))
        }
        Device::Cuda => cuda::batchnorm_backward_eval(dy, x, gamma, run, dims),
    }
}

/// running <- (1 - momentum) * running + momentum * batch, for the mean and the unbiased variance.
pub fn batchnorm_update_running(running_mean: &mut Tensor, running_var: &mut Tensor, stats: &BnBatchStats, momentum: f32) -> Result<()> {
    let _p = crate::profile::scope(crate::profile::Family::BatchNorm);
    const OP: &str = "batchnorm_update_running";
    let dev = running_mean.check_same(OP, &[running_var, &stats.mean, &stats.var_unbiased])?;
    crate::ensure_shape!(
        running_mean.shape() == stats.mean.shape() && running_var.shape() == stats.var_unbiased.shape(),
        OP,
        "running statistics {:?} do not match batch statistics {:?}",
        running_mean.shape(),
        stats.mean.shape()
    );
    match dev {
        Device::Cpu => cpu::batchnorm_update_running(running_mean, running_var, stats, momentum),
        Device::Cuda => cuda::batchnorm_update_running(running_mean, running_var, stats, momentum),
    }
}

#[cfg(test)]
mod tests;
