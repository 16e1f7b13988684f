#![allow(unused_variables)]
use super::Pool2dCfg;
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn max_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    todo!()
}

pub(super) fn max_pool2d_backward(dy: &Tensor, x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    todo!()
}

pub(super) fn avg_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    todo!()
}

pub(super) fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], cfg: Pool2dCfg) -> Result<Tensor> {
    todo!()
}

pub(super) fn global_avg_pool_forward(x: &Tensor) -> Result<Tensor> {
    todo!()
}

pub(super) fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    todo!()
}

pub(super) fn global_max_pool_forward(x: &Tensor) -> Result<Tensor> {
    todo!()
}

pub(super) fn global_max_pool_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    todo!()
}

pub(super) fn stripe_avg_pool_forward(x: &Tensor, parts: usize) -> Result<Tensor> {
    todo!()
}

pub(super) fn stripe_avg_pool_backward(dy: &Tensor, x_shape: &[usize], parts: usize) -> Result<Tensor> {
    todo!()
}
