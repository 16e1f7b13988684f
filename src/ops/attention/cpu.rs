use rayon::prelude::*;

use crate::error::Result;
use crate::ops::cpu_util::{sum_dot_f64, sum_f64};
use crate::ops::gemm::sgemm;
use crate::tensor::Tensor;

/// (batch, m, n, k)
type Dims = (usize, usize, usize, usize);

/// Below this many elements a loop runs as one task.
const PAR_MIN: usize = 1 << 16;

/// Runs `f(batch index, output block, parallel)` over the `per`-sized blocks of `out`: one GEMM per
/// thread when there are enough batch entries, else one multithreaded GEMM after another.
fn per_batch(out: &mut [f32], per: usize, f: impl Fn(usize, &mut [f32], bool) + Sync) {
    if per == 0 {
        return;
    }
    if out.len() / per >= rayon::current_num_threads() {
        out.par_chunks_mut(per).enumerate().for_each(|(i, o)| f(i, o, false));
    } else {
        out.chunks_mut(per).enumerate().for_each(|(i, o)| f(i, o, true));
    }
}

pub(super) fn bmm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, (bs, m, n, k): Dims) -> Result<Tensor> {
    let (av, bv) = (a.cpu_slice()?, b.cpu_slice()?);
    let mut y = vec![0.0; bs * m * n];
    per_batch(&mut y, m * n, |i, y, par| sgemm(m, n, k, &av[i * m * k..], trans_a, &bv[i * k * n..], trans_b, y, false, par));
    Tensor::from_vec(y, &[bs, m, n])
}

pub(super) fn bmm_backward(
    dy: &Tensor,
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    (_, m, n, k): Dims,
) -> Result<(Tensor, Tensor)> {
    let (av, bv, dyv) = (a.cpu_slice()?, b.cpu_slice()?, dy.cpu_slice()?);
    // Y = op(A) op(B): d op(A) = dY op(B)^T, d op(B) = op(A)^T dY; a transposed operand gets the
    // transpose of its gradient, written directly as a product in the stored layout.
    let mut da = vec![0.0; a.numel()];
    per_batch(&mut da, m * k, |i, da, par| {
        let (b_i, dy_i) = (&bv[i * k * n..], &dyv[i * m * n..]);
        if trans_a {
            sgemm(k, m, n, b_i, trans_b, dy_i, true, da, false, par);
        } else {
            sgemm(m, k, n, dy_i, false, b_i, !trans_b, da, false, par);
        }
    });
    let mut db = vec![0.0; b.numel()];
    per_batch(&mut db, k * n, |i, db, par| {
        let (a_i, dy_i) = (&av[i * m * k..], &dyv[i * m * n..]);
        if trans_b {
            sgemm(n, k, m, dy_i, true, a_i, trans_a, db, false, par);
        } else {
            sgemm(k, n, m, a_i, !trans_a, dy_i, false, db, false, par);
        }
    });
    Ok((Tensor::from_vec(da, a.shape())?, Tensor::from_vec(db, b.shape())?))
}

pub(super) fn softmax_lastdim_forward(x: &Tensor) -> Result<Tensor> {
    let d = x.shape()[x.rank() - 1];
    let xv = x.cpu_slice()?;
    let mut y = vec![0.0; xv.len()];
    y.par_chunks_mut(d).zip(xv.par_chunks(d)).with_min_len((PAR_MIN / d).max(1)).for_each(|(y, x)| {
        let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        y.iter_mut().zip(x).for_each(|(y, &v)| *y = (v - mx).exp());
        // A separate vectorised f64 sum: a running f64 sum in the loop above would be scalar.
        let inv = (1.0 / sum_f64(y)) as f32;
        y.iter_mut().for_each(|v| *v *= inv);
    });
    Tensor::from_vec(y, x.shape())
}

pub(super) fn softmax_lastdim_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let d = y.shape().last().copied().unwrap_or(1);
    let (yv, dyv) = (y.cpu_slice()?, dy.cpu_slice()?);
    let mut dx = vec![0.0; yv.len()];
    if d == 0 {
        return Tensor::from_vec(dx, y.shape());
    }
    dx.par_chunks_mut(d).zip(yv.par_chunks(d).zip(dyv.par_chunks(d))).with_min_len((PAR_MIN / d).max(1)).for_each(|(dx, (y, dy))| {
        let dot = sum_dot_f64(y, dy).1 as f32;
        dx.iter_mut().zip(y.iter().zip(dy)).for_each(|(dx, (&y, &g))| *dx = y * (g - dot));
    });
    Tensor::from_vec(dx, y.shape())
}
