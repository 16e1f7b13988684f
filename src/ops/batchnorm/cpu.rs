//! CPU BatchNorm. Per-channel statistics are summed in f64, one rayon task per channel; the
//! element-wise passes run in parallel over (image, channel) planes.

use rayon::prelude::*;

use super::BnBatchStats;
use crate::error::Result;
use crate::ops::cpu_util::sum_dot_f64;
use crate::tensor::Tensor;

type Dims = (usize, usize, usize);

/// Per channel, (sum of a, sum of a b) over every image and position.
fn channel_sums(a: &[f32], b: &[f32], (n, c, hw): Dims) -> Vec<(f64, f64)> {
    if hw == 1 {
        // [N, C]: a channel's values are C apart, so sum whole rows into per-channel accumulators,
        // blocks of channels in parallel.
        const BLOCK: usize = 256;
        let mut sums = vec![(0.0, 0.0); c];
        sums.par_chunks_mut(BLOCK).enumerate().for_each(|(blk, acc)| {
            for i in 0..n {
                let (o, len) = (i * c + blk * BLOCK, acc.len());
                for ((s, &x), &y) in acc.iter_mut().zip(&a[o..o + len]).zip(&b[o..o + len]) {
                    s.0 += x as f64;
                    s.1 += x as f64 * y as f64;
                }
            }
        });
        return sums;
    }
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..n).fold((0.0, 0.0), |(s, d), i| {
                let o = (i * c + ch) * hw;
                let (ps, pd) = sum_dot_f64(&a[o..o + hw], &b[o..o + hw]);
                (s + ps, d + pd)
            })
        })
        .collect()
}

/// A new tensor of `len` values (input layout) filled plane by plane in parallel:
/// `f(channel, offset of the plane, plane)`. One task per image when there are enough images, so
/// that one-value planes ([N, C] inputs) are not tasks of their own.
fn map_planes(len: usize, (n, c, hw): Dims, f: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; len];
    if hw == 0 || c == 0 {
        return out;
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
    out
}

fn to_tensor(v: Vec<f32>, c: usize) -> Result<Tensor> {
    Tensor::from_vec(v, &[c])
}

pub(super) fn batchnorm_forward_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, dims: Dims) -> Result<(Tensor, BnBatchStats)> {
    let (n, c, hw) = dims;
    let (xs, gs, bs) = (x.cpu_slice()?, gamma.cpu_slice()?, beta.cpu_slice()?);
    let m = (n * hw) as f64;
    let sums = channel_sums(xs, xs, dims);
    let mut mean = Vec::with_capacity(c);
    let mut invstd = Vec::with_capacity(c);
    let mut var_unbiased = Vec::with_capacity(c);
    for &(s, sq) in &sums {
        let mu = s / m;
        // One-pass variance in f64: cancellation is negligible unless |mean| / std exceeds ~1e5.
        let var = (sq / m - mu * mu).max(0.0);
        mean.push(mu as f32);
        invstd.push((1.0 / (var + eps as f64).sqrt()) as f32);
        var_unbiased.push((var * m / (m - 1.0)) as f32);
    }
    let scale: Vec<f32> = gs.iter().zip(&invstd).map(|(g, s)| g * s).collect();
    let y = map_planes(xs.len(), dims, |ch, off, o| {
        let (mu, sc, b) = (mean[ch], scale[ch], bs[ch]);
        for (o, &v) in o.iter_mut().zip(&xs[off..]) {
            *o = (v - mu) * sc + b;
        }
    });
    let stats = BnBatchStats { mean: to_tensor(mean, c)?, invstd: to_tensor(invstd, c)?, var_unbiased: to_tensor(var_unbiased, c)? };
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
    let sums = channel_sums(dys, xs, dims);
    // dbeta = sum dy; dgamma = sum dy xhat = invstd (sum dy x - mean sum dy).
    let dbeta: Vec<f32> = sums.iter().map(|&(s, _)| s as f32).collect();
    let dgamma_f64: Vec<f64> =
        sums.iter().zip(mean.iter().zip(invstd)).map(|(&(s, d), (&mu, &is))| is as f64 * (d - mu as f64 * s)).collect();
    // dx = gamma invstd (dy - dbeta / m - xhat dgamma / m) = a dy + b (x - mean) + c0.
    let coef: Vec<(f32, f32, f32)> = (0..c)
        .map(|ch| {
            let a = gs[ch] as f64 * invstd[ch] as f64;
            let b = -a * invstd[ch] as f64 * dgamma_f64[ch] / m;
            let c0 = -a * sums[ch].0 / m;
            (a as f32, b as f32, c0 as f32)
        })
        .collect();
    let dx = map_planes(xs.len(), dims, |ch, off, o| {
        let ((a, b, c0), mu) = (coef[ch], mean[ch]);
        for ((o, &d), &v) in o.iter_mut().zip(&dys[off..]).zip(&xs[off..]) {
            *o = a * d + b * (v - mu) + c0;
        }
    });
    let dgamma = dgamma_f64.iter().map(|&v| v as f32).collect();
    Ok((Tensor::from_vec(dx, x.shape())?, to_tensor(dgamma, c)?, to_tensor(dbeta, c)?))
}

/// 1 / sqrt(running_var + eps) per channel, in f64.
fn eval_invstd(running_var: &[f32], eps: f32) -> Vec<f64> {
    running_var.iter().map(|&v| 1.0 / (v as f64 + eps as f64).sqrt()).collect()
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
    let (xs, gs, bs) = (x.cpu_slice()?, gamma.cpu_slice()?, beta.cpu_slice()?);
    let (rm, rv) = (running_mean.cpu_slice()?, running_var.cpu_slice()?);
    let scale: Vec<f32> = eval_invstd(rv, eps).iter().zip(gs).map(|(&is, &g)| (is * g as f64) as f32).collect();
    let y = map_planes(xs.len(), dims, |ch, off, o| {
        let (mu, sc, b) = (rm[ch], scale[ch], bs[ch]);
        for (o, &v) in o.iter_mut().zip(&xs[off..]) {
            *o = (v - mu) * sc + b;
        }
    });
    Tensor::from_vec(y, x.shape())
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
    let c = dims.1;
    let (dys, xs, gs) = (dy.cpu_slice()?, x.cpu_slice()?, gamma.cpu_slice()?);
    let (rm, rv) = (running_mean.cpu_slice()?, running_var.cpu_slice()?);
    let invstd = eval_invstd(rv, eps);
    let sums = channel_sums(dys, xs, dims);
    let dbeta = sums.iter().map(|&(s, _)| s as f32).collect();
    let dgamma = sums.iter().zip(rm.iter().zip(&invstd)).map(|(&(s, d), (&mu, &is))| (is * (d - mu as f64 * s)) as f32).collect();
    let scale: Vec<f32> = invstd.iter().zip(gs).map(|(&is, &g)| (is * g as f64) as f32).collect();
    let dx = map_planes(xs.len(), dims, |ch, off, o| {
        let sc = scale[ch];
        for (o, &d) in o.iter_mut().zip(&dys[off..]) {
            *o = d * sc;
        }
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
