//! CPU BatchNorm. Training passes run one rayon task per channel: the task sums its channel in
//! f64 and then normalises (or back-propagates) the same planes while they are still in cache, so
//! the input is read from memory once. The eval passes run in parallel over (image, channel) planes.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{BnBatchStats, Running};
use crate::error::Result;
use crate::ops::cpu_util::{sum_dot_f64, written_vec};
use crate::tensor::Tensor;

type Dims = (usize, usize, usize);

/// The `hw`-long planes of an [N, C, hw] buffer grouped by channel, each group in image order.
fn planes_by_channel<T>(buf: &mut [T], (n, c, hw): Dims) -> Vec<Vec<&mut [T]>> {
    let mut by_channel: Vec<Vec<&mut [T]>> = (0..c).map(|_| Vec::with_capacity(n)).collect();
    if hw > 0 {
        for (p, plane) in buf.chunks_mut(hw).enumerate() {
            by_channel[p % c].push(plane);
        }
    }
    by_channel
}

/// A new buffer in the input's layout, written channel by channel in parallel:
/// `f(channel, that channel's planes)` returns the channel's result and must write every plane.
fn per_channel<R: Send>(len: usize, dims: Dims, f: impl Fn(usize, Vec<&mut [MaybeUninit<f32>]>) -> R + Sync) -> (Vec<f32>, Vec<R>) {
    let mut results = Vec::new();
    // SAFETY: the planes cover the buffer (len = n c hw) and every `f` below writes all of them.
    let out = unsafe {
        written_vec(len, |o| {
            results = planes_by_channel(o, dims).into_par_iter().enumerate().map(|(ch, planes)| f(ch, planes)).collect();
        })
    };
    (out, results)
}

/// (sum of a, sum of a b) over channel `ch`'s planes.
fn channel_sums(a: &[f32], b: &[f32], ch: usize, (n, c, hw): Dims) -> (f64, f64) {
    (0..n).fold((0.0, 0.0), |(s, d), i| {
        let o = (i * c + ch) * hw;
        let (ps, pd) = sum_dot_f64(&a[o..o + hw], &b[o..o + hw]);
        (s + ps, d + pd)
    })
}

/// A new tensor of `len` values (input layout) filled plane by plane in parallel:
/// `f(channel, offset of the plane, plane)`, which must write the whole plane. One task per image
/// when there are enough images, so that one-value planes ([N, C] inputs) are not tasks of their own.
fn map_planes(len: usize, (n, c, hw): Dims, f: impl Fn(usize, usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    // SAFETY: the images' (or planes') chunks cover the buffer and `f` writes each plane in full.
    unsafe {
        written_vec(len, |out| {
            if hw == 0 || c == 0 {
                return;
            }
            if n >= rayon::current_num_threads() {
                out.par_chunks_mut(c * hw).enumerate().for_each(|(i, oi)| {
                    for (ch, o) in oi.chunks_mut(hw).enumerate() {
                        f(ch, (i * c + ch) * hw, o);
                    }
                });
            } else {
                out.par_chunks_mut(hw).enumerate().for_each(|(p, o)| f(p % c, p * hw, o));
            }
        })
    }
}

fn to_tensor(v: Vec<f32>, c: usize) -> Result<Tensor> {
    Tensor::from_vec(v, &[c])
}

pub(super) fn batchnorm_forward_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, dims: Dims) -> Result<(Tensor, BnBatchStats)> {
    let (n, c, hw) = dims;
    let (xs, gs, bs) = (x.cpu_slice()?, gamma.cpu_slice()?, beta.cpu_slice()?);
    let m = (n * hw) as f64;
    // Per channel: (mean, invstd, unbiased variance).
    let (y, per) = per_channel(xs.len(), dims, |ch, planes| {
        let (s, sq) = channel_sums(xs, xs, ch, dims);
        let mu = s / m;
        // One-pass variance in f64: cancellation is negligible unless |mean| / std exceeds ~1e5.
        let var = (sq / m - mu * mu).max(0.0);
        let invstd = 1.0 / (var + eps as f64).sqrt();
        let (mu32, sc, b) = (mu as f32, gs[ch] * invstd as f32, bs[ch]);
        for (i, o) in planes.into_iter().enumerate() {
            let xp = &xs[(i * c + ch) * hw..][..hw];
            o.iter_mut().zip(xp).for_each(|(o, &v)| _ = o.write((v - mu32) * sc + b));
        }
        (mu32, invstd as f32, (var * m / (m - 1.0)) as f32)
    });
    let stats = BnBatchStats {
        mean: to_tensor(per.iter().map(|p| p.0).collect(), c)?,
        invstd: to_tensor(per.iter().map(|p| p.1).collect(), c)?,
        var_unbiased: to_tensor(per.iter().map(|p| p.2).collect(), c)?,
    };
    Ok((Tensor::from_vec(y, x.shape())?, stats))
}

pub(super) fn batchnorm_backward_train(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    stats: &BnBatchStats,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, hw) = dims;
    let (dys, xs, gs) = (dy.cpu_slice()?, x.cpu_slice()?, gamma.cpu_slice()?);
    let (mean, invstd) = (stats.mean.cpu_slice()?, stats.invstd.cpu_slice()?);
    let m = (n * hw) as f64;
    // Per channel: (dgamma, dbeta).
    let (dx, per) = per_channel(xs.len(), dims, |ch, planes| {
        let (s, d) = channel_sums(dys, xs, ch, dims);
        let (mu, is) = (mean[ch], invstd[ch] as f64);
        // dbeta = sum dy; dgamma = sum dy xhat = invstd (sum dy x - mean sum dy).
        let dgamma = is * (d - mu as f64 * s);
        // dx = gamma invstd (dy - dbeta / m - xhat dgamma / m) = a dy + b (x - mean) + c0.
        let a = gs[ch] as f64 * is;
        let (b, c0) = ((-a * is * dgamma / m) as f32, (-a * s / m) as f32);
        let a = a as f32;
        for (i, o) in planes.into_iter().enumerate() {
            let off = (i * c + ch) * hw;
            let (dyp, xp) = (&dys[off..][..hw], &xs[off..][..hw]);
            o.iter_mut().zip(dyp.iter().zip(xp)).for_each(|(o, (&g, &v))| _ = o.write(a * g + b * (v - mu) + c0));
        }
        (dgamma as f32, s as f32)
    });
    let dgamma = per.iter().map(|p| p.0).collect();
    let dbeta = per.iter().map(|p| p.1).collect();
    Ok((Tensor::from_vec(dx, x.shape())?, to_tensor(dgamma, c)?, to_tensor(dbeta, c)?))
}

/// 1 / sqrt(running_var + eps) per channel, in f64.
fn eval_invstd(run: Running) -> Result<Vec<f64>> {
    Ok(run.var.cpu_slice()?.iter().map(|&v| 1.0 / (v as f64 + run.eps as f64).sqrt()).collect())
}

pub(super) fn batchnorm_forward_eval(x: &Tensor, gamma: &Tensor, beta: &Tensor, run: Running, dims: Dims) -> Result<Tensor> {
    let (xs, gs, bs) = (x.cpu_slice()?, gamma.cpu_slice()?, beta.cpu_slice()?);
    let rm = run.mean.cpu_slice()?;
    let scale: Vec<f32> = eval_invstd(run)?.iter().zip(gs).map(|(&is, &g)| (is * g as f64) as f32).collect();
    let y = map_planes(xs.len(), dims, |ch, off, o| {
        let (mu, sc, b) = (rm[ch], scale[ch], bs[ch]);
        o.iter_mut().zip(&xs[off..]).for_each(|(o, &v)| _ = o.write((v - mu) * sc + b));
    });
    Tensor::from_vec(y, x.shape())
}

pub(super) fn batchnorm_backward_eval(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    run: Running,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = dims.1;
    let (dys, xs, gs) = (dy.cpu_slice()?, x.cpu_slice()?, gamma.cpu_slice()?);
    let rm = run.mean.cpu_slice()?;
    let invstd = eval_invstd(run)?;
    let sums: Vec<(f64, f64)> = (0..c).into_par_iter().map(|ch| channel_sums(dys, xs, ch, dims)).collect();
    let dbeta = sums.iter().map(|&(s, _)| s as f32).collect();
    let dgamma = sums.iter().zip(rm.iter().zip(&invstd)).map(|(&(s, d), (&mu, &is))| (is * (d - mu as f64 * s)) as f32).collect();
    let scale: Vec<f32> = invstd.iter().zip(gs).map(|(&is, &g)| (is * g as f64) as f32).collect();
    let dx = map_planes(xs.len(), dims, |ch, off, o| {
        let sc = scale[ch];
        o.iter_mut().zip(&dys[off..]).for_each(|(o, &d)| _ = o.write(d * sc));
    });
    Ok((Tensor::from_vec(dx, x.shape())?, to_tensor(dgamma, c)?, to_tensor(dbeta, c)?))
}

pub(super) fn batchnorm_update_running(
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    stats: &BnBatchStats,
    momentum: f32,
) -> Result<()> {
    let (mean, var) = (stats.mean.cpu_slice()?, stats.var_unbiased.cpu_slice()?);
    for (r, &b) in running_mean.cpu_slice_mut()?.iter_mut().zip(mean) {
        *r = (1.0 - momentum) * *r + momentum * b;
    }
    for (r, &b) in running_var.cpu_slice_mut()?.iter_mut().zip(var) {
        *r = (1.0 - momentum) * *r + momentum * b;
    }
    Ok(())
}
