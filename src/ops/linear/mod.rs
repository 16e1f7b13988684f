//! Fully connected layer y = x W^T + b, with x [N, in], W [out, in] (PyTorch's layout), b [out].

mod cpu;
mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

fn check(op: &'static str, x: &[usize], w: &[usize], b: Option<&[usize]>) -> Result<(usize, usize, usize)> {
    crate::ensure_shape!(x.len() == 2 && w.len() == 2, op, "expected x [N, in] and weight [out, in], got {x:?} and {w:?}");
    crate::ensure_shape!(x[1] == w[1], op, "input {x:?} has {} features but weight {w:?} expects {}", x[1], w[1]);
    if let Some(b) = b {
        crate::ensure_shape!(b == [w[0]], op, "bias {b:?} does not match weight {w:?}");
    }
    Ok((x[0], w[1], w[0]))
}

pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let _p = crate::profile::scope(crate::profile::Family::Linear);
    let others: Vec<&Tensor> = std::iter::once(w).chain(b).collect();
    let dev = x.check_same("linear_forward", &others)?;
    let dims = check("linear_forward", x.shape(), w.shape(), b.map(|b| b.shape()))?;
    match dev {
        Device::Cpu => cpu::linear_forward(x, w, b, dims),
        Device::Cuda => cuda::linear_forward(x, w, b, dims),
    }
}

/// Returns (dx, dw, db); db is dy summed over the batch.
pub fn linear_backward(dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let _p = crate::profile::scope(crate::profile::Family::Linear);
    let dev = x.check_same("linear_backward", &[dy, w])?;
    let dims = check("linear_backward", x.shape(), w.shape(), None)?;
    crate::ensure_shape!(dy.shape() == [dims.0, dims.2], "linear_backward", "dy {:?} != output [{}, {}]", dy.shape(), dims.0, dims.2);
    match dev {
        Device::Cpu => cpu::linear_backward(dy, x, w, dims),
        Device::Cuda => cuda::linear_backward(dy, x, w, dims),
    }
}

#[cfg(test)]
mod tests;
