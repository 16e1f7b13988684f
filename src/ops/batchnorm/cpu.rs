#![allow(unused_variables)]
use super::BnBatchStats;
use crate::error::Result;
use crate::tensor::Tensor;

type Dims = (usize, usize, usize);

pub(super) fn batchnorm_forward_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, dims: Dims) -> Result<(Tensor, BnBatchStats)> {
    todo!()
}

pub(super) fn batchnorm_backward_train(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    stats: &BnBatchStats,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    todo!()
}

pub(super) fn batchnorm_forward_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
    dims: Dims,
) -> Result<Tensor> {
    todo!()
}

pub(super) fn batchnorm_backward_eval(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    todo!()
}

pub(super) fn batchnorm_update_running(
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    stats: &BnBatchStats,
    momentum: f32,
) -> Result<()> {
    todo!()
}
