//! CPU pooling, parallel over (image, channel) planes.

use rayon::prelude::*;

use super::Pool2dCfg;
use crate::error::{Error, Result};
use crate::ops::cpu_util::sum_f64;
use crate::tensor::{numel, Tensor};

/// Input rows (or columns) [lo, hi) of window `o`: padding is the part of the window outside.
fn window(o: usize, cfg: Pool2dCfg, len: usize) -> (usize, usize) {
    let start = o * cfg.stride;
    (start.saturating_sub(cfg.padding), (start + cfg.kernel).saturating_sub(cfg.padding).min(len))
}

/// Index and value of the first maximum in scan order (a NaN wins, as in PyTorch); starts at the
/// first index with -inf, so an all -inf range keeps its first index.
fn first_max(indices: impl Iterator<Item = usize>, x: &[f32]) -> (usize, f32) {
    let mut best = (usize::MAX, f32::NEG_INFINITY);
    for i in indices {
        let v = x[i];
        if best.0 == usize::MAX || v > best.1 || v.is_nan() {
            best = (i, v);
        }
    }
    best
}

/// Flat plane index of the first maximum in window (oy, ox); None for a window of padding only.
fn window_argmax(x: &[f32], (h, w): (usize, usize), oy: usize, ox: usize, cfg: Pool2dCfg) -> Option<(usize, f32)> {
    let (y0, y1) = window(oy, cfg, h);
    let (x0, x1) = window(ox, cfg, w);
    let (i, v) = first_max((y0..y1).flat_map(|iy| (x0..x1).map(move |ix| iy * w + ix)), x);
    (i != usize::MAX).then_some((i, v))
}

/// A zeroed buffer of `len` values filled plane by plane in parallel: `f(plane index, plane)`.
fn map_planes(len: usize, plane: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; len];
    if plane > 0 {
        out.par_chunks_mut(plane).enumerate().for_each(|(p, o)| f(p, o));
    }
    out
}

/// Spatial dims of an NCHW shape, refusing empty planes (nothing to pool over).
fn plane_dims(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    let (h, w) = (shape[2], shape[3]);
    if h == 0 || w == 0 {
        return Err(Error::shape(op, format!("input {shape:?} has empty planes")));
    }
    Ok((h, w))
}

pub(super) fn max_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    let hw = plane_dims("max_pool2d_forward", x.shape())?;
    let xs = x.cpu_slice()?;
    let (oh, ow) = (y_shape[2], y_shape[3]);
    let plane = hw.0 * hw.1;
    let y = map_planes(numel(y_shape), oh * ow, |p, yp| {
        let xp = &xs[p * plane..][..plane];
        for (o, v) in yp.iter_mut().enumerate() {
            *v = window_argmax(xp, hw, o / ow, o % ow, cfg).map_or(f32::NEG_INFINITY, |m| m.1);
        }
    });
    Tensor::from_vec(y, y_shape)
}

pub(super) fn max_pool2d_backward(dy: &Tensor, x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    let hw = plane_dims("max_pool2d_backward", x.shape())?;
    let (dys, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let (oh, ow) = (dy.shape()[2], dy.shape()[3]);
    let plane = hw.0 * hw.1;
    let dx = map_planes(xs.len(), plane, |p, dxp| {
        let xp = &xs[p * plane..][..plane];
        for (o, &d) in dys[p * oh * ow..][..oh * ow].iter().enumerate() {
            if let Some((i, _)) = window_argmax(xp, hw, o / ow, o % ow, cfg) {
                dxp[i] += d;
            }
        }
    });
    Tensor::from_vec(dx, x.shape())
}

pub(super) fn avg_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    let (h, w) = plane_dims("avg_pool2d_forward", x.shape())?;
    let xs = x.cpu_slice()?;
    let (oh, ow) = (y_shape[2], y_shape[3]);
    // count_include_pad: padding counts as zeros, so every window divides by kernel^2.
    let inv = 1.0 / (cfg.kernel * cfg.kernel) as f32;
    let y = map_planes(numel(y_shape), oh * ow, |p, yp| {
        let xp = &xs[p * h * w..][..h * w];
        for (o, v) in yp.iter_mut().enumerate() {
            let (y0, y1) = window(o / ow, cfg, h);
            let (x0, x1) = window(o % ow, cfg, w);
            *v = (y0..y1).map(|iy| xp[iy * w + x0..iy * w + x1].iter().sum::<f32>()).sum::<f32>() * inv;
        }
    });
    Tensor::from_vec(y, y_shape)
}

pub(super) fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], cfg: Pool2dCfg) -> Result<Tensor> {
    let (h, w) = plane_dims("avg_pool2d_backward", x_shape)?;
    let dys = dy.cpu_slice()?;
    let (oh, ow) = (dy.shape()[2], dy.shape()[3]);
    let inv = 1.0 / (cfg.kernel * cfg.kernel) as f32;
    let dx = map_planes(numel(x_shape), h * w, |p, dxp| {
        for (o, &d) in dys[p * oh * ow..][..oh * ow].iter().enumerate() {
            let (y0, y1) = window(o / ow, cfg, h);
            let (x0, x1) = window(o % ow, cfg, w);
            for iy in y0..y1 {
                dxp[iy * w + x0..iy * w + x1].iter_mut().for_each(|v| *v += d * inv);
            }
        }
    });
    Tensor::from_vec(dx, x_shape)
}

pub(super) fn global_avg_pool_forward(x: &Tensor) -> Result<Tensor> {
    let (h, w) = plane_dims("global_avg_pool_forward", x.shape())?;
    let xs = x.cpu_slice()?;
    let y: Vec<f32> = xs.par_chunks(h * w).map(|p| (sum_f64(p) / p.len() as f64) as f32).collect();
    Tensor::from_vec(y, &[x.shape()[0], x.shape()[1], 1, 1])
}

pub(super) fn global_avg_pool_backward(dy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let (h, w) = plane_dims("global_avg_pool_backward", x_shape)?;
    let dys = dy.cpu_slice()?;
    let inv = 1.0 / (h * w) as f32;
    let dx = map_planes(numel(x_shape), h * w, |p, dxp| dxp.fill(dys[p] * inv));
    Tensor::from_vec(dx, x_shape)
}

pub(super) fn global_max_pool_forward(x: &Tensor) -> Result<Tensor> {
    let (h, w) = plane_dims("global_max_pool_forward", x.shape())?;
    let xs = x.cpu_slice()?;
    let y: Vec<f32> = xs.par_chunks(h * w).map(|p| first_max(0..p.len(), p).1).collect();
    Tensor::from_vec(y, &[x.shape()[0], x.shape()[1], 1, 1])
}

pub(super) fn global_max_pool_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (h, w) = plane_dims("global_max_pool_backward", x.shape())?;
    let (dys, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let plane = h * w;
    let dx = map_planes(xs.len(), plane, |p, dxp| dxp[first_max(0..plane, &xs[p * plane..][..plane]).0] = dys[p]);
    Tensor::from_vec(dx, x.shape())
}

pub(super) fn stripe_avg_pool_forward(x: &Tensor, parts: usize) -> Result<Tensor> {
    let (h, w) = plane_dims("stripe_avg_pool_forward", x.shape())?;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let xs = x.cpu_slice()?;
    let stripe = h / parts * w;
    // One task per image: its output row [parts * C] is contiguous, its planes are too.
    let y = map_planes(n * parts * c, parts * c, |i, yi| {
        for (k, v) in yi.iter_mut().enumerate() {
            let (p, ch) = (k / c, k % c);
            *v = (sum_f64(&xs[(i * c + ch) * h * w + p * stripe..][..stripe]) / stripe as f64) as f32;
        }
    });
    Tensor::from_vec(y, &[n, parts * c])
}

pub(super) fn stripe_avg_pool_backward(dy: &Tensor, x_shape: &[usize], parts: usize) -> Result<Tensor> {
    let (h, w) = plane_dims("stripe_avg_pool_backward", x_shape)?;
    let c = x_shape[1];
    let dys = dy.cpu_slice()?;
    let stripe = h / parts * w;
    let inv = 1.0 / stripe as f32;
    let dx = map_planes(numel(x_shape), h * w, |pl, dxp| {
        let (i, ch) = (pl / c, pl % c);
        for (p, s) in dxp.chunks_mut(stripe).enumerate() {
            s.fill(dys[i * parts * c + p * c + ch] * inv);
        }
    });
    Tensor::from_vec(dx, x_shape)
}
