//! CUDA launchers of kernels/batchnorm.cu (per-channel reductions: one block per channel). The
//! activations x, y, dy, dx are f32 or bf16 (the kernel variant follows x's dtype); gamma, beta,
//! the statistics and dgamma/dbeta are f32.

use super::{BnBatchStats, Running};
use crate::cuda::nvrtc::by_dtype;
use crate::cuda::{empty, empty_dtype, grid_for, int, launch, ptr, ptr_mut, Arg, BLOCK};
use crate::error::Result;
use crate::tensor::Tensor;

const FILE: &str = "batchnorm.cu";

/// (N, C, spatial size)
type Dims = (usize, usize, usize);

/// With `relu`, relu(batchnorm(x)) in the same pass.
pub(super) fn batchnorm_forward_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    dims: Dims,
    relu: bool,
) -> Result<(Tensor, BnBatchStats)> {
    let (n, c, hw) = dims;
    let (y, py) = empty_dtype(x.shape(), x.dtype())?;
    let (mean, pm) = empty(&[c])?;
    let (invstd, pi) = empty(&[c])?;
    let (var_unbiased, pv) = empty(&[c])?;
    launch(
        FILE,
        if relu { by_dtype!(x.dtype(), "bn_relu_forward_train") } else { by_dtype!(x.dtype(), "bn_forward_train") },
        c as u32,
        BLOCK,
        &[
            Arg::Ptr(ptr(x)?),
            Arg::Ptr(ptr(gamma)?),
            Arg::Ptr(ptr(beta)?),
            Arg::Ptr(py),
            Arg::Ptr(pm),
            Arg::Ptr(pi),
            Arg::Ptr(pv),
            int(n),
            int(c),
            int(hw),
            Arg::F32(eps),
        ],
    )?;
    Ok((y, BnBatchStats { mean, invstd, var_unbiased }))
}

/// With `relu_out` (the output y of relu(batchnorm(x))), dy is first masked to y > 0.
pub(super) fn batchnorm_backward_train(
    dy: &Tensor,
    relu_out: Option<&Tensor>,
    x: &Tensor,
    gamma: &Tensor,
    stats: &BnBatchStats,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, hw) = dims;
    let (dx, pdx) = empty_dtype(x.shape(), x.dtype())?;
    let (dgamma, pdg) = empty(&[c])?;
    let (dbeta, pdb) = empty(&[c])?;
    let mut args = vec![Arg::Ptr(ptr(dy)?)];
    if let Some(y) = relu_out {
        args.push(Arg::Ptr(ptr(y)?));
    }
    args.extend([
        Arg::Ptr(ptr(x)?),
        Arg::Ptr(ptr(gamma)?),
        Arg::Ptr(ptr(&stats.mean)?),
        Arg::Ptr(ptr(&stats.invstd)?),
        Arg::Ptr(pdx),
        Arg::Ptr(pdg),
        Arg::Ptr(pdb),
        int(n),
        int(c),
        int(hw),
    ]);
    let kernel =
        if relu_out.is_some() { by_dtype!(x.dtype(), "bn_relu_backward_train") } else { by_dtype!(x.dtype(), "bn_backward_train") };
    launch(FILE, kernel, c as u32, BLOCK, &args)?;
    Ok((dx, dgamma, dbeta))
}

pub(super) fn batchnorm_forward_eval(x: &Tensor, gamma: &Tensor, beta: &Tensor, run: Running, dims: Dims) -> Result<Tensor> {
    let (_, c, hw) = dims;
    let (y, py) = empty_dtype(x.shape(), x.dtype())?;
    let total = x.numel();
    launch(
        FILE,
        by_dtype!(x.dtype(), "bn_forward_eval"),
        grid_for(total),
        BLOCK,
        &[
            Arg::Ptr(ptr(x)?),
            Arg::Ptr(ptr(gamma)?),
            Arg::Ptr(ptr(beta)?),
            Arg::Ptr(ptr(run.mean)?),
            Arg::Ptr(ptr(run.var)?),
            Arg::Ptr(py),
            int(total),
            int(c),
            int(hw),
            Arg::F32(run.eps),
        ],
    )?;
    Ok(y)
}

pub(super) fn batchnorm_backward_eval(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    run: Running,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, hw) = dims;
    let (dx, pdx) = empty_dtype(x.shape(), x.dtype())?;
    let (dgamma, pdg) = empty(&[c])?;
    let (dbeta, pdb) = empty(&[c])?;
    launch(
        FILE,
        by_dtype!(x.dtype(), "bn_backward_eval"),
        c as u32,
        BLOCK,
        &[
            Arg::Ptr(ptr(dy)?),
            Arg::Ptr(ptr(x)?),
            Arg::Ptr(ptr(gamma)?),
            Arg::Ptr(ptr(run.mean)?),
            Arg::Ptr(ptr(run.var)?),
            Arg::Ptr(pdx),
            Arg::Ptr(pdg),
            Arg::Ptr(pdb),
            int(n),
            int(c),
            int(hw),
            Arg::F32(run.eps),
        ],
    )?;
    Ok((dx, dgamma, dbeta))
}

pub(super) fn batchnorm_update_running(
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    stats: &BnBatchStats,
    momentum: f32,
) -> Result<()> {
    let c = stats.mean.numel();
    let (pm, pv) = (ptr(&stats.mean)?, ptr(&stats.var_unbiased)?);
    launch(
        FILE,
        "bn_update_running",
        grid_for(c),
        BLOCK,
        &[Arg::Ptr(ptr_mut(running_mean)?), Arg::Ptr(ptr_mut(running_var)?), Arg::Ptr(pm), Arg::Ptr(pv), Arg::F32(momentum), int(c)],
    )
}
