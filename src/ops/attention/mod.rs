//! The position attention's building blocks: batched matrix products with optional transposes
//! (energy = Q^T K, out = X A^T need no explicit transpose) and a softmax over the last axis.

mod cpu;
mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Batched product dims (batch, m, n, k) of op(a) op(b) with a, b of rank 3.
/// op(a) is [m, k] per batch (a stored [B, m, k], or [B, k, m] when `trans_a`); op(b) is [k, n].
pub fn bmm_dims(op: &'static str, a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> Result<(usize, usize, usize, usize)> {
    crate::ensure_shape!(a.len() == 3 && b.len() == 3, op, "expected rank-3 operands, got {a:?} and {b:?}");
    crate::ensure_shape!(a[0] == b[0], op, "batch sizes differ: {a:?} and {b:?}");
    let (m, ka) = if trans_a { (a[2], a[1]) } else { (a[1], a[2]) };
    let (kb, n) = if trans_b { (b[2], b[1]) } else { (b[1], b[2]) };
    crate::ensure_shape!(
        ka == kb,
        op,
        "inner dims differ: {a:?}{} x {b:?}{}",
        if trans_a { "^T" } else { "" },
        if trans_b { "^T" } else { "" }
    );
    Ok((a[0], m, n, ka))
}

/// op(a) op(b) per batch entry: [B, m, n].
pub fn bmm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Attention);
    let dev = a.check_same("bmm", &[b])?;
    let dims = bmm_dims("bmm", a.shape(), b.shape(), trans_a, trans_b)?;
    match dev {
        Device::Cpu => cpu::bmm(a, b, trans_a, trans_b, dims),
        Device::Cuda => cuda::bmm(a, b, trans_a, trans_b, dims),
    }
}

/// Returns (da, db) of `bmm(a, b, trans_a, trans_b)`, each in its operand's stored layout.
pub fn bmm_backward(dy: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<(Tensor, Tensor)> {
    let _p = crate::profile::scope(crate::profile::Family::Attention);
    let dev = a.check_same("bmm_backward", &[dy, b])?;
    let dims = bmm_dims("bmm_backward", a.shape(), b.shape(), trans_a, trans_b)?;
    crate::ensure_shape!(
        dy.shape() == [dims.0, dims.1, dims.2],
        "bmm_backward",
        "dy {:?} != output [{}, {}, {}]",
        dy.shape(),
        dims.0,
        dims.1,
        dims.2
    );
    match dev {
        Device::Cpu => cpu::bmm_backward(dy, a, b, trans_a, trans_b, dims),
        Device::Cuda => cuda::bmm_backward(dy, a, b, trans_a, trans_b, dims),
    }
}

/// Softmax over the last axis, max-subtracted.
pub fn softmax_lastdim_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Attention);
    let dev = x.check_same("softmax_lastdim_forward", &[])?;
    crate::ensure_shape!(x.rank() >= 1 && x.shape()[x.rank() - 1] > 0, "softmax_lastdim_forward", "empty last axis in {:?}", x.shape());
    match dev {
        Device::Cpu => cpu::softmax_lastdim_forward(x),
        Device::Cuda => cuda::softmax_lastdim_forward(x),
    }
}

/// dx = y * (dy - sum(dy * y)) row-wise (y is the forward output).
pub fn softmax_lastdim_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Attention);
    let dev = y.check_same("softmax_lastdim_backward", &[dy])?;
    crate::ensure_shape!(dy.shape() == y.shape(), "softmax_lastdim_backward", "dy {:?} != y {:?}", dy.shape(), y.shape());
    match dev {
        Device::Cpu => cpu::softmax_lastdim_backward(dy, y),
        Device::Cuda => cuda::softmax_lastdim_backward(dy, y),
    }
}

#[cfg(test)]
mod tests;
