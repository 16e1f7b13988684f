//! CUDA launchers of kernels/loss.cu. The triplet loss's Gram matrix comes from cuBLAS. Labels are
//! read by the kernels from a device buffer (`cuda::labels`), never passed as values derived from
//! them, so that a captured CUDA graph replays right on another batch's labels.

use crate::cuda::cublas::{gemm, Gemm};
use crate::cuda::{self, empty, grid_for, int, launch, ptr, warp_grid, Arg, BLOCK};
use crate::error::Result;
use crate::tensor::Tensor;

const FILE: &str = "loss.cu";

pub(super) fn cross_entropy_label_smooth_forward(logits: &Tensor, labels: &[usize], eps: f32) -> Result<Tensor> {
    let (n, k) = logits.dims2("cross_entropy_label_smooth")?;
    let y = cuda::labels(labels)?;
    let (loss, pl) = empty(&[1])?;
    launch(FILE, "ce_ls_forward", 1, BLOCK, &[Arg::Ptr(ptr(logits)?), Arg::Ptr(y.ptr()), Arg::Ptr(pl), int(n), int(k), Arg::F32(eps)])?;
    Ok(loss)
}

pub(super) fn cross_entropy_label_smooth_backward(dloss: &Tensor, logits: &Tensor, labels: &[usize], eps: f32) -> Result<Tensor> {
    let (n, k) = logits.dims2("cross_entropy_label_smooth_backward")?;
    let y = cuda::labels(labels)?;
    let (dz, pdz) = empty(logits.shape())?;
    launch(
        FILE,
        "ce_ls_backward",
        warp_grid(n),
        BLOCK,
        &[Arg::Ptr(ptr(dloss)?), Arg::Ptr(ptr(logits)?), Arg::Ptr(y.ptr()), Arg::Ptr(pdz), int(n), int(k), Arg::F32(eps)],
    )?;
    Ok(dz)
}

/// The Gram matrix x x^T [N, N] of x [N, D].
fn gram(x: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2("triplet_soft_margin")?;
    let px = ptr(x)?;
    let (gram, pg) = empty(&[n, n])?;
    gemm(Gemm { batch: 1, m: n, n, k: d, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 }, px, px, pg)?;
    Ok(gram)
}

pub(super) fn triplet_soft_margin_forward(x: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let n = x.shape()[0];
    let gram = gram(x)?;
    let y = cuda::labels(labels)?;
    let (loss, pl) = empty(&[1])?;
    launch(FILE, "triplet_forward", 1, BLOCK, &[Arg::Ptr(ptr(&gram)?), Arg::Ptr(y.ptr()), Arg::Ptr(pl), int(n)])?;
    Ok(loss)
}

pub(super) fn triplet_soft_margin_backward(dloss: &Tensor, x: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let (n, d) = x.dims2("triplet_soft_margin_backward")?;
    let gram = gram(x)?;
    let y = cuda::labels(labels)?;
    // Mined indices (int32, in f32-sized slots) and their coefficients.
    let (_pos, pp) = empty(&[n])?;
    let (_neg, pn) = empty(&[n])?;
    let (_cpos, pcp) = empty(&[n])?;
    let (_cneg, pcn) = empty(&[n])?;
    launch(
        FILE,
        "triplet_select",
        warp_grid(n),
        BLOCK,
        &[
            Arg::Ptr(ptr(&gram)?),
            Arg::Ptr(y.ptr()),
            Arg::Ptr(ptr(dloss)?),
            Arg::Ptr(pp),
            Arg::Ptr(pn),
            Arg::Ptr(pcp),
            Arg::Ptr(pcn),
            int(n),
        ],
    )?;
    let (dx, pdx) = empty(x.shape())?;
    launch(
        FILE,
        "triplet_backward",
        n as u32,
        BLOCK,
        &[Arg::Ptr(ptr(x)?), Arg::Ptr(pp), Arg::Ptr(pn), Arg::Ptr(pcp), Arg::Ptr(pcn), Arg::Ptr(pdx), int(n), int(d)],
    )?;
    Ok(dx)
}

pub(super) fn center_loss_forward(x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2("center_loss")?;
    let k = centers.shape()[0];
    let y = cuda::labels(labels)?;
    let (loss, pl) = empty(&[1])?;
    launch(
        FILE,
        "center_forward",
        1,
        BLOCK,
        &[Arg::Ptr(ptr(x)?), Arg::Ptr(ptr(centers)?), Arg::Ptr(y.ptr()), Arg::Ptr(pl), int(n), int(d), int(k)],
    )?;
    Ok(loss)
}

pub(super) fn center_loss_backward(dloss: &Tensor, x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, d) = x.dims2("center_loss_backward")?;
    let (k, dc) = centers.dims2("center_loss_backward")?;
    crate::ensure_shape!(d == dc, "center_loss_backward", "features {:?} and centers {:?} differ in width", x.shape(), centers.shape());
    let y = cuda::labels(labels)?;
    let (px, pc) = (ptr(x)?, ptr(centers)?);
    let (_coef, pcoef) = empty(&[n])?;
    launch(
        FILE,
        "center_coef",
        warp_grid(n),
        BLOCK,
        &[Arg::Ptr(px), Arg::Ptr(pc), Arg::Ptr(y.ptr()), Arg::Ptr(ptr(dloss)?), Arg::Ptr(pcoef), int(n), int(d), int(k)],
    )?;
    let (dx, pdx) = empty(x.shape())?;
    launch(
        FILE,
        "center_backward_x",
        grid_for(n * d),
        BLOCK,
        &[Arg::Ptr(px), Arg::Ptr(pc), Arg::Ptr(y.ptr()), Arg::Ptr(pcoef), Arg::Ptr(pdx), int(n), int(d), int(k)],
    )?;
    let (dcenters, pdc) = empty(centers.shape())?;
    launch(
        FILE,
        "center_backward_c",
        grid_for(k * d),
        BLOCK,
        &[Arg::Ptr(px), Arg::Ptr(pc), Arg::Ptr(y.ptr()), Arg::Ptr(pcoef), Arg::Ptr(pdc), int(n), int(d), int(k)],
    )?;
    Ok((dx, dcenters))
}
