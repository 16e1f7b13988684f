//! The three PLR-OSNet losses, each returning a [1] tensor: label-smoothed cross-entropy,
//! batch-hard soft-margin triplet, center loss (see the spec, section 3). Labels are host slices of
//! class indices; backward functions take the loss gradient as a [1] tensor so it can stay on the
//! device.

mod cpu;
mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

fn check_rows(op: &'static str, x: &Tensor, labels: &[usize]) -> Result<(usize, usize)> {
    let (n, d) = x.dims2(op)?;
    crate::ensure_shape!(n == labels.len() && n > 0, op, "{} labels for input {:?}", labels.len(), x.shape());
    Ok((n, d))
}

fn check_dloss(op: &'static str, dloss: &Tensor) -> Result<()> {
    crate::ensure_shape!(dloss.shape() == [1], op, "loss gradient must have shape [1], got {:?}", dloss.shape());
    Ok(())
}

/// mean_i of -sum_k q_ik log softmax(z_i)_k with q_ik = (1 - eps) [k = y_i] + eps / K.
pub fn cross_entropy_label_smooth_forward(logits: &Tensor, labels: &[usize], eps: f32) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Loss);
    const OP: &str = "cross_entropy_label_smooth";
    let dev = logits.check_same(OP, &[])?;
    let (_, k) = check_rows(OP, logits, labels)?;
    if let Some(&bad) = labels.iter().find(|&&y| y >= k) {
        return Err(crate::error::Error::shape(OP, format!("label {bad} out of range for {k} classes")));
    }
    match dev {
        Device::Cpu => cpu::cross_entropy_label_smooth_forward(logits, labels, eps),
        Device::Cuda => cuda::cross_entropy_label_smooth_forward(logits, labels, eps),
    }
}

pub fn cross_entropy_label_smooth_backward(dloss: &Tensor, logits: &Tensor, labels: &[usize], eps: f32) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Loss);
    const OP: &str = "cross_entropy_label_smooth_backward";
    let dev = logits.check_same(OP, &[dloss])?;
    check_rows(OP, logits, labels)?;
    check_dloss(OP, dloss)?;
    match dev {
        Device::Cpu => cpu::cross_entropy_label_smooth_backward(dloss, logits, labels, eps),
        Device::Cuda => cuda::cross_entropy_label_smooth_backward(dloss, logits, labels, eps),
    }
}

/// Batch-hard soft-margin triplet: mean_i softplus(max_{y_j = y_i} d_ij - min_{y_j != y_i} d_ij)
/// with d_ij = sqrt(clamp(|a_i|^2 + |a_j|^2 - 2 a_i.a_j, 1e-12)). Anchors with no negative in the
/// batch are an error (a PK batch always has them).
pub fn triplet_soft_margin_forward(x: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Loss);
    const OP: &str = "triplet_soft_margin";
    let dev = x.check_same(OP, &[])?;
    check_rows(OP, x, labels)?;
    crate::ensure_shape!(labels.iter().any(|&y| y != labels[0]), OP, "the batch holds a single identity: no negatives");
    match dev {
        Device::Cpu => cpu::triplet_soft_margin_forward(x, labels),
        Device::Cuda => cuda::triplet_soft_margin_forward(x, labels),
    }
}

pub fn triplet_soft_margin_backward(dloss: &Tensor, x: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Loss);
    const OP: &str = "triplet_soft_margin_backward";
    let dev = x.check_same(OP, &[dloss])?;
    check_rows(OP, x, labels)?;
    check_dloss(OP, dloss)?;
    match dev {
        Device::Cpu => cpu::triplet_soft_margin_backward(dloss, x, labels),
        Device::Cuda => cuda::triplet_soft_margin_backward(dloss, x, labels),
    }
}

/// mean over samples with label < K of clamp(|x_i - c_{y_i}|^2, 1e-12, 1e12) (no 1/2 factor).
/// Samples whose label has no center are left out, as the official code does for CUHK03.
pub fn center_loss_forward(x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Loss);
    const OP: &str = "center_loss";
    let dev = x.check_same(OP, &[centers])?;
    let (_, d) = check_rows(OP, x, labels)?;
    let (_, dc) = centers.dims2(OP)?;
    crate::ensure_shape!(d == dc, OP, "features {:?} and centers {:?} differ in width", x.shape(), centers.shape());
    match dev {
        Device::Cpu => cpu::center_loss_forward(x, labels, centers),
        Device::Cuda => cuda::center_loss_forward(x, labels, centers),
    }
}

/// Returns (dx, dcenters).
pub fn center_loss_backward(dloss: &Tensor, x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<(Tensor, Tensor)> {
    let _p = crate::profile::scope(crate::profile::Family::Loss);
    const OP: &str = "center_loss_backward";
    let dev = x.check_same(OP, &[dloss, centers])?;
    check_rows(OP, x, labels)?;
    check_dloss(OP, dloss)?;
    match dev {
        Device::Cpu => cpu::center_loss_backward(dloss, x, labels, centers),
        Device::Cuda => cuda::center_loss_backward(dloss, x, labels, centers),
    }
}

#[cfg(test)]
mod tests;
