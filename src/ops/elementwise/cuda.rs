//! CUDA launchers of kernels/elementwise.cu. Activations are f32 or bf16 (the kernel variant
//! follows the input's dtype, and outputs have the same dtype); l2_normalize is f32 only.

use crate::cuda::nvrtc::by_dtype;
use crate::cuda::{empty, empty_dtype, grid_for, int, launch, ptr, Arg, BLOCK, MAX_DIMS};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

const FILE: &str = "elementwise.cu";

/// y = f(x) for a unary kernel taking (x, y, n).
fn unary(kernel: &'static str, x: &Tensor) -> Result<Tensor> {
    let (y, py) = empty_dtype(x.shape(), x.dtype())?;
    let n = x.numel();
    launch(FILE, kernel, grid_for(n), BLOCK, &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), int(n)])?;
    Ok(y)
}

/// dx = f(dy, y) for a backward kernel taking (dy, y, dx, n).
fn unary_backward(kernel: &'static str, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (dx, pdx) = empty_dtype(y.shape(), y.dtype())?;
    let n = y.numel();
    launch(FILE, kernel, grid_for(n), BLOCK, &[Arg::Ptr(ptr(dy)?), Arg::Ptr(ptr(y)?), Arg::Ptr(pdx), int(n)])?;
    Ok(dx)
}

pub(super) fn relu_forward(x: &Tensor) -> Result<Tensor> {
    unary(by_dtype!(x.dtype(), "relu_forward"), x)
}

pub(super) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    unary_backward(by_dtype!(y.dtype(), "relu_backward"), dy, y)
}

pub(super) fn sigmoid_forward(x: &Tensor) -> Result<Tensor> {
    unary(by_dtype!(x.dtype(), "sigmoid_forward"), x)
}

pub(super) fn sigmoid_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    unary_backward(by_dtype!(y.dtype(), "sigmoid_backward"), dy, y)
}

fn dims_arg(op: &'static str, v: &[usize]) -> Result<Arg> {
    crate::ensure_shape!(v.len() <= MAX_DIMS, op, "more than {MAX_DIMS} dimensions after merging: {v:?}");
    let mut a = [0i32; MAX_DIMS];
    for (d, &s) in a.iter_mut().zip(v) {
        *d = s as i32;
    }
    Ok(Arg::Dims(a))
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Drops size-1 dims and merges neighbours that are contiguous in one another: the same index
/// space with fewer dims. Strides 0 (broadcast) merge with 0.
fn merge_dims(dims: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut d_out, mut s_out): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&d, &s) in dims.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match (d_out.last_mut(), s_out.last_mut()) {
            (Some(pd), Some(ps)) if *ps == s * d => {
                *pd *= d;
                *ps = s;
            }
            _ => {
                d_out.push(d);
                s_out.push(s);
            }
        }
    }
    (d_out, s_out)
}

/// out = a op b (op 0 add, 1 mul, 2 b broadcast to `shape`), b broadcast right-aligned, a and b of
/// b's dtype. The output has b's dtype, except that bf16 inputs may give an f32 output (exact for
/// a product: the bf16 gradient reductions below round only their sum).
fn broadcast_binary(op: i32, a: Option<&Tensor>, b: &Tensor, shape: &[usize], out_dtype: DType) -> Result<Tensor> {
    const OP: &str = "broadcast";
    // The kernel's pointer types must match every buffer's dtype (the launch cannot tell).
    if let Some(a) = a {
        b.check_same_dtype(OP, &[a])?;
    }
    let kernel = match (b.dtype(), out_dtype) {
        (DType::BF16, DType::F32) => "broadcast_binary_bf16_f32",
        (DType::F32, DType::BF16) => return Err(Error::Cuda(format!("{OP}: no f32 -> bf16 kernel"))),
        (dtype, _) => by_dtype!(dtype, "broadcast_binary"),
    };
    let lead = shape.len() - b.rank();
    let b_strides = contiguous_strides(b.shape());
    let strides: Vec<usize> =
        (0..shape.len()).map(|d| if d < lead || b.shape()[d - lead] == 1 { 0 } else { b_strides[d - lead] }).collect();
    let (dims, bstrides) = merge_dims(shape, &strides);
    let (out, pout) = empty_dtype(shape, out_dtype)?;
    let n = out.numel();
    let pa = match a {
        Some(a) => ptr(a)?,
        None => 0,
    };
    launch(
        FILE,
        kernel,
        grid_for(n),
        BLOCK,
        &[
            Arg::I32(op),
            Arg::Ptr(pa),
            Arg::Ptr(ptr(b)?),
            Arg::Ptr(pout),
            int(n),
            int(dims.len()),
            dims_arg(OP, &dims)?,
            dims_arg(OP, &bstrides)?,
        ],
    )?;
    Ok(out)
}

pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast_binary(0, Some(a), b, a.shape(), a.dtype())
}

pub(super) fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast_binary(1, Some(a), b, a.shape(), a.dtype())
}

pub(super) fn mul_backward(dy: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let da = mul(dy, b)?;
    let db = match a.dtype() {
        DType::BF16 if b.shape() != a.shape() => {
            // dy * a kept in f32 (exact) so that the reduced db is rounded to bf16 once.
            let prod = broadcast_binary(1, Some(dy), a, a.shape(), DType::F32)?;
            reduce_sum(&prod, b.shape(), DType::BF16)?
        }
        _ => sum_to_shape(&mul(dy, a)?, b.shape())?,
    };
    Ok((da, db))
}

pub(super) fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    reduce_sum(x, shape, x.dtype())
}

/// x summed over its broadcast dims to `shape`, accumulated in double and rounded once to
/// `out_dtype`: x's dtype, or bf16 for an f32 x (a product kept exact by mul_backward).
fn reduce_sum(x: &Tensor, shape: &[usize], out_dtype: DType) -> Result<Tensor> {
    const OP: &str = "sum_to_shape";
    let lead = x.rank() - shape.len();
    let xs = contiguous_strides(x.shape());
    let (mut kd, mut ks, mut rd, mut rs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (d, (&size, &stride)) in x.shape().iter().zip(&xs).enumerate() {
        if d >= lead && shape[d - lead] == size {
            kd.push(size);
            ks.push(stride);
        } else {
            rd.push(size);
            rs.push(stride);
        }
    }
    let (kd, ks) = merge_dims(&kd, &ks);
    let (rd, rs) = merge_dims(&rd, &rs);
    let n_out: usize = kd.iter().product();
    let n_red: usize = rd.iter().product();
    let (out, pout) = empty_dtype(shape, out_dtype)?;
    let args = [
        Arg::Ptr(ptr(x)?),
        Arg::Ptr(pout),
        int(n_out),
        int(n_red),
        int(kd.len()),
        dims_arg(OP, &kd)?,
        dims_arg(OP, &ks)?,
        int(rd.len()),
        dims_arg(OP, &rd)?,
        dims_arg(OP, &rs)?,
    ];
    let block = n_red > 128;
    let kernel = match (x.dtype(), out_dtype, block) {
        (DType::F32, DType::F32, true) => "reduce_sum_block",
        (DType::F32, DType::F32, false) => "reduce_sum_thread",
        (DType::BF16, DType::BF16, true) => "reduce_sum_block_bf16",
        (DType::BF16, DType::BF16, false) => "reduce_sum_thread_bf16",
        (DType::F32, DType::BF16, true) => "reduce_sum_block_f32_bf16",
        (DType::F32, DType::BF16, false) => "reduce_sum_thread_f32_bf16",
        (DType::BF16, DType::F32, _) => return Err(Error::Cuda("sum_to_shape: no bf16 -> f32 reduction kernel".into())),
    };
    if block {
        launch(FILE, kernel, n_out.min(1 << 16) as u32, BLOCK, &args)?;
    } else {
        launch(FILE, kernel, grid_for(n_out), BLOCK, &args)?;
    }
    Ok(out)
}

pub(super) fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    broadcast_binary(2, None, x, shape, x.dtype())
}

pub(super) fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let (y, py) = empty_dtype(x.shape(), x.dtype())?;
    let n = x.numel();
    launch(FILE, by_dtype!(x.dtype(), "scale"), grid_for(n), BLOCK, &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), Arg::F32(alpha), int(n)])?;
    Ok(y)
}

pub(super) fn sum_all(x: &Tensor) -> Result<Tensor> {
    sum_to_shape(&x.reshape(&[x.numel()])?, &[1])
}

pub(super) fn l2_normalize_forward(x: &Tensor) -> Result<Tensor> {
    let (rows, d) = x.dims2("l2_normalize_forward")?;
    let (y, py) = empty(x.shape())?;
    launch(FILE, "l2_normalize_forward", rows as u32, BLOCK, &[Arg::Ptr(ptr(x)?), Arg::Ptr(py), int(d)])?;
    Ok(y)
}

pub(super) fn l2_normalize_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, d) = x.dims2("l2_normalize_backward")?;
    let (dx, pdx) = empty(x.shape())?;
    launch(FILE, "l2_normalize_backward", rows as u32, BLOCK, &[Arg::Ptr(ptr(dy)?), Arg::Ptr(ptr(x)?), Arg::Ptr(pdx), int(d)])?;
    Ok(dx)
}

/// dst[r, dst_off + c] = src[r, src_off + c] for r < rows, c < cols, with the given row pitches;
/// both buffers hold `dtype` values.
#[allow(clippy::too_many_arguments)]
fn copy2d(
    dtype: DType,
    src: u64,
    dst: u64,
    rows: usize,
    cols: usize,
    src_pitch: usize,
    src_off: usize,
    dst_pitch: usize,
    dst_off: usize,
) -> Result<()> {
    launch(
        FILE,
        by_dtype!(dtype, "copy2d"),
        grid_for(rows * cols),
        BLOCK,
        &[Arg::Ptr(src), Arg::Ptr(dst), int(rows), int(cols), int(src_pitch), int(src_off), int(dst_pitch), int(dst_off)],
    )
}

/// (product of dims before axis, product of dims after it)
fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[..axis].iter().product(), shape[axis + 1..].iter().product())
}

pub(super) fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let total: usize = xs.iter().map(|x| x.shape()[axis]).sum();
    let mut shape = xs[0].shape().to_vec();
    shape[axis] = total;
    let (outer, inner) = outer_inner(&shape, axis);
    let (y, py) = empty_dtype(&shape, xs[0].dtype())?;
    let mut off = 0;
    for x in xs {
        let cols = x.shape()[axis] * inner;
        copy2d(x.dtype(), ptr(x)?, py, outer, cols, cols, 0, total * inner, off * inner)?;
        off += x.shape()[axis];
    }
    Ok(y)
}

pub(super) fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    let (outer, inner) = outer_inner(&shape, axis);
    let (y, py) = empty_dtype(&shape, x.dtype())?;
    copy2d(x.dtype(), ptr(x)?, py, outer, len * inner, x.shape()[axis] * inner, start * inner, len * inner, 0)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::merge_dims;

    #[test]
    fn merging_keeps_the_index_space() {
        // Per-channel gate [N, C, 1, 1] broadcast over [N, C, H, W].
        assert_eq!(merge_dims(&[2, 3, 4, 5], &[3, 1, 0, 0]), (vec![6, 20], vec![1, 0]));
        // Channel bias [1, C, 1, 1]: stride 0 over N, 1 over C, 0 over H*W.
        assert_eq!(merge_dims(&[2, 3, 4, 5], &[0, 1, 0, 0]), (vec![2, 3, 20], vec![0, 1, 0]));
        // Same shape: one contiguous run; size-1 dims vanish.
        assert_eq!(merge_dims(&[2, 1, 4], &[4, 4, 1]), (vec![8], vec![1]));
        assert_eq!(merge_dims(&[1, 1], &[0, 0]), (vec![], vec![]));
    }
}
