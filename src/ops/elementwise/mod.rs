//! Elementwise and shape ops: ReLU, sigmoid, add and multiply with broadcasting (per-channel gate
//! [N,C,1,1], learned scalar [1]), constant scaling, sums, row-wise L2 normalisation, concat/narrow.
//!
//! Broadcasting follows NumPy, right-aligned: `b` may have fewer dims than `a`, and each of its dims
//! is 1 or equal to `a`'s. The result has `a`'s shape.
//!
//! Every op here but `sum_all` and the L2 normalisation (f32 only) takes f32 or bf16 tensors, all
//! of one dtype, and returns that dtype: it computes in f32 and rounds each output once.

mod cpu;
mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Errors unless `b` broadcasts to `a` (right-aligned, each dim 1 or equal).
pub fn check_broadcast(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    let ok = b.len() <= a.len() && b.iter().rev().zip(a.iter().rev()).all(|(&bd, &ad)| bd == 1 || bd == ad);
    crate::ensure_shape!(ok, op, "shape {b:?} does not broadcast to {a:?}");
    Ok(())
}

pub fn relu_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    match x.check_same_dtype("relu_forward", &[])? {
        Device::Cpu => cpu::relu_forward(x)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::relu_forward(x),
    }
}

/// dx = dy where y > 0, else 0 (y is the forward output).
pub fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = dy.check_same_dtype("relu_backward", &[y])?;
    crate::ensure_shape!(dy.shape() == y.shape(), "relu_backward", "dy {:?} != y {:?}", dy.shape(), y.shape());
    match dev {
        Device::Cpu => cpu::relu_backward(dy, y)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::relu_backward(dy, y),
    }
}

pub fn sigmoid_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    match x.check_same_dtype("sigmoid_forward", &[])? {
        Device::Cpu => cpu::sigmoid_forward(x)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::sigmoid_forward(x),
    }
}

/// dx = dy * y * (1 - y) (y is the forward output).
pub fn sigmoid_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = dy.check_same_dtype("sigmoid_backward", &[y])?;
    crate::ensure_shape!(dy.shape() == y.shape(), "sigmoid_backward", "dy {:?} != y {:?}", dy.shape(), y.shape());
    match dev {
        Device::Cpu => cpu::sigmoid_backward(dy, y)?.rounded_to(dy.dtype()),
        Device::Cuda => cuda::sigmoid_backward(dy, y),
    }
}

/// a + b, with b broadcast to a's shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = a.check_same_dtype("add", &[b])?;
    check_broadcast("add", a.shape(), b.shape())?;
    match dev {
        Device::Cpu => cpu::add(a, b)?.rounded_to(a.dtype()),
        Device::Cuda => cuda::add(a, b),
    }
}

/// a * b, with b broadcast to a's shape.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = a.check_same_dtype("mul", &[b])?;
    check_broadcast("mul", a.shape(), b.shape())?;
    match dev {
        Device::Cpu => cpu::mul(a, b)?.rounded_to(a.dtype()),
        Device::Cuda => cuda::mul(a, b),
    }
}

/// Returns (da, db) of `mul(a, b)`; db is reduced to b's shape.
pub fn mul_backward(dy: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = a.check_same_dtype("mul_backward", &[dy, b])?;
    check_broadcast("mul_backward", a.shape(), b.shape())?;
    crate::ensure_shape!(dy.shape() == a.shape(), "mul_backward", "dy {:?} != a {:?}", dy.shape(), a.shape());
    match dev {
        Device::Cpu => {
            let (da, db) = cpu::mul_backward(dy, a, b)?;
            Ok((da.rounded_to(a.dtype())?, db.rounded_to(a.dtype())?))
        }
        Device::Cuda => cuda::mul_backward(dy, a, b),
    }
}

/// Sums x over the broadcast dims so the result has `shape` (the backward of broadcasting).
pub fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = x.check_same_dtype("sum_to_shape", &[])?;
    check_broadcast("sum_to_shape", x.shape(), shape)?;
    if x.shape() == shape {
        return Ok(x.clone());
    }
    match dev {
        Device::Cpu => cpu::sum_to_shape(x, shape)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::sum_to_shape(x, shape),
    }
}

/// x broadcast to `shape` (the backward of `sum_to_shape` and of `sum_all`).
pub fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = x.check_same_dtype("broadcast_to", &[])?;
    check_broadcast("broadcast_to", shape, x.shape())?;
    if x.shape() == shape {
        return Ok(x.clone());
    }
    match dev {
        Device::Cpu => cpu::broadcast_to(x, shape)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::broadcast_to(x, shape),
    }
}

/// alpha * x for a constant alpha.
pub fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    match x.check_same_dtype("scale", &[])? {
        Device::Cpu => cpu::scale(x, alpha)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::scale(x, alpha),
    }
}

/// Sum of all elements, shape [1].
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    match x.check_same("sum_all", &[])? {
        Device::Cpu => cpu::sum_all(x),
        Device::Cuda => cuda::sum_all(x),
    }
}

/// Row-wise x / max(||x||_2, 1e-12) of an [N, D] tensor (torch.nn.functional.normalize).
pub fn l2_normalize_forward(x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = x.check_same("l2_normalize_forward", &[])?;
    x.dims2("l2_normalize_forward")?;
    match dev {
        Device::Cpu => cpu::l2_normalize_forward(x),
        Device::Cuda => cuda::l2_normalize_forward(x),
    }
}

pub fn l2_normalize_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = x.check_same("l2_normalize_backward", &[dy])?;
    x.dims2("l2_normalize_backward")?;
    crate::ensure_shape!(dy.shape() == x.shape(), "l2_normalize_backward", "dy {:?} != x {:?}", dy.shape(), x.shape());
    match dev {
        Device::Cpu => cpu::l2_normalize_backward(dy, x),
        Device::Cuda => cuda::l2_normalize_backward(dy, x),
    }
}

/// Concatenation along `axis`; all other dims must agree.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    crate::ensure_shape!(!xs.is_empty(), "concat", "nothing to concatenate");
    let dev = xs[0].check_same_dtype("concat", &xs[1..])?;
    let first = xs[0].shape();
    crate::ensure_shape!(axis < first.len(), "concat", "axis {axis} out of range for shape {first:?}");
    for x in xs {
        let s = x.shape();
        let same_rest = s.len() == first.len() && s.iter().zip(first).enumerate().all(|(i, (a, b))| i == axis || a == b);
        crate::ensure_shape!(same_rest, "concat", "shapes {first:?} and {s:?} differ outside axis {axis}");
    }
    match dev {
        Device::Cpu => cpu::concat(xs, axis)?.rounded_to(xs[0].dtype()),
        Device::Cuda => cuda::concat(xs, axis),
    }
}

/// The slice [start, start + len) of x along `axis` (copied).
pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Elementwise);
    let dev = x.check_same_dtype("narrow", &[])?;
    let s = x.shape();
    crate::ensure_shape!(
        axis < s.len() && start + len <= s[axis],
        "narrow",
        "[{start}, {}) out of range on axis {axis} of {s:?}",
        start + len
    );
    match dev {
        Device::Cpu => cpu::narrow(x, axis, start, len)?.rounded_to(x.dtype()),
        Device::Cuda => cuda::narrow(x, axis, start, len),
    }
}

#[cfg(test)]
mod tests;
