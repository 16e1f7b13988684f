//! CPU pooling, parallel over (image, channel) planes.

use std::ops::Range;

use rayon::prelude::*;

use super::Pool2dCfg;
use crate::error::{Error, Result};
use crate::ops::cpu_util::sum_f64;
use crate::tensor::{numel, Tensor};

/// Input rows (or columns) of window `o`: padding is the part of the window outside.
fn window(o: usize, cfg: Pool2dCfg, len: usize) -> Range<usize> {
    let start = o * cfg.stride;
    start.saturating_sub(cfg.padding)..(start + cfg.kernel).saturating_sub(cfg.padding).min(len)
}

/// PyTorch's max-pool scan step: `v` replaces the running maximum `m` if larger or NaN. As a value
/// this is a NaN-propagating maximum, so windows can be reduced in any order.
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

/// The index PyTorch's scan ends on for a window (rows x cols of a plane of width `w`) whose
/// maximum is `m`: the first element equal to it in row-major order, or the last NaN. Windows are
/// never empty: padding is at most half the kernel.
fn pick_max(x: &[f32], w: usize, rows: Range<usize>, cols: Range<usize>, m: f32) -> usize {
    if m.is_nan() {
        let last_nan = rows.rev().find_map(|iy| cols.clone().rev().find(|&ix| x[iy * w + ix].is_nan()).map(|ix| iy * w + ix));
        return last_nan.expect("a NaN maximum comes from a NaN in the window");
    }
    // A minimum over candidates rather than an early exit: which element matches is unpredictable.
    let mut first = usize::MAX;
    for iy in rows {
        for ix in cols.clone() {
            let i = iy * w + ix;
            first = first.min(if x[i] == m { i } else { usize::MAX });
        }
    }
    first
}

/// One plane of a 2-d pool. The kernels are separable: a pass down the window rows, vectorised
/// along the whole input row, then one along each window's columns. Scanning each window
/// element by element instead is bound by the latency of its running maximum or sum.
struct Plane {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    cfg: Pool2dCfg,
}

impl Plane {
    fn new(x_shape: &[usize], y_shape: &[usize], cfg: Pool2dCfg) -> Plane {
        Plane { h: x_shape[2], w: x_shape[3], oh: y_shape[2], ow: y_shape[3], cfg }
    }

    fn rows(&self, oy: usize) -> Range<usize> {
        window(oy, self.cfg, self.h)
    }

    fn cols(&self, ox: usize) -> Range<usize> {
        window(ox, self.cfg, self.w)
    }

    /// `combine` of the input rows of output row `oy`, column by column, into `acc`.
    fn reduce_rows(&self, x: &[f32], oy: usize, acc: &mut [f32], combine: impl Fn(f32, f32) -> f32) {
        let (rows, w) = (self.rows(oy), self.w);
        acc.copy_from_slice(&x[rows.start * w..][..w]);
        for iy in rows.start + 1..rows.end {
            for (a, &v) in acc.iter_mut().zip(&x[iy * w..][..w]) {
                *a = combine(*a, v);
            }
        }
    }

    fn max(&self, x: &[f32], y: &mut [f32]) {
        let mut acc = vec![0f32; self.w];
        for oy in 0..self.oh {
            self.reduce_rows(x, oy, &mut acc, nan_max);
            for (ox, v) in y[oy * self.ow..][..self.ow].iter_mut().enumerate() {
                *v = acc[self.cols(ox)].iter().fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v));
            }
        }
    }

    /// Adds each dy to the input element PyTorch's scan picks in its window.
    fn max_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let mut m = vec![0f32; self.oh * self.ow];
        self.max(x, &mut m);
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                let o = oy * self.ow + ox;
                dx[pick_max(x, self.w, self.rows(oy), self.cols(ox), m[o])] += dy[o];
            }
        }
    }

    /// count_include_pad: padding counts as zeros, so every window divides by kernel^2.
    fn inv_count(&self) -> f32 {
        1.0 / (self.cfg.kernel * self.cfg.kernel) as f32
    }

    fn avg(&self, x: &[f32], y: &mut [f32]) {
        let (mut acc, inv) = (vec![0f32; self.w], self.inv_count());
        for oy in 0..self.oh {
            self.reduce_rows(x, oy, &mut acc, |a, v| a + v);
            for (ox, v) in y[oy * self.ow..][..self.ow].iter_mut().enumerate() {
                *v = acc[self.cols(ox)].iter().sum::<f32>() * inv;
            }
        }
    }

    fn avg_backward(&self, dy: &[f32], dx: &mut [f32]) {
        let (mut acc, inv, w) = (vec![0f32; self.w], self.inv_count(), self.w);
        for oy in 0..self.oh {
            // The gradient one output row sends to each input column, then to every row of its windows.
            acc.fill(0.0);
            for ox in 0..self.ow {
                let d = dy[oy * self.ow + ox] * inv;
                acc[self.cols(ox)].iter_mut().for_each(|a| *a += d);
            }
            for iy in self.rows(oy) {
                for (g, &a) in dx[iy * w..][..w].iter_mut().zip(&acc) {
                    *g += a;
                }
            }
        }
    }
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
    plane_dims("max_pool2d_forward", x.shape())?;
    let xs = x.cpu_slice()?;
    let pl = Plane::new(x.shape(), y_shape, cfg);
    let (x_len, y_len) = (pl.h * pl.w, pl.oh * pl.ow);
    let y = map_planes(numel(y_shape), y_len, |p, yp| pl.max(&xs[p * x_len..][..x_len], yp));
    Tensor::from_vec(y, y_shape)
}

pub(super) fn max_pool2d_backward(dy: &Tensor, x: &Tensor, cfg: Pool2dCfg) -> Result<Tensor> {
    plane_dims("max_pool2d_backward", x.shape())?;
    let (dys, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let pl = Plane::new(x.shape(), dy.shape(), cfg);
    let (x_len, y_len) = (pl.h * pl.w, pl.oh * pl.ow);
    let dx = map_planes(xs.len(), x_len, |p, dxp| pl.max_backward(&xs[p * x_len..][..x_len], &dys[p * y_len..][..y_len], dxp));
    Tensor::from_vec(dx, x.shape())
}

pub(super) fn avg_pool2d_forward(x: &Tensor, cfg: Pool2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    plane_dims("avg_pool2d_forward", x.shape())?;
    let xs = x.cpu_slice()?;
    let pl = Plane::new(x.shape(), y_shape, cfg);
    let (x_len, y_len) = (pl.h * pl.w, pl.oh * pl.ow);
    let y = map_planes(numel(y_shape), y_len, |p, yp| pl.avg(&xs[p * x_len..][..x_len], yp));
    Tensor::from_vec(y, y_shape)
}

pub(super) fn avg_pool2d_backward(dy: &Tensor, x_shape: &[usize], cfg: Pool2dCfg) -> Result<Tensor> {
    plane_dims("avg_pool2d_backward", x_shape)?;
    let dys = dy.cpu_slice()?;
    let pl = Plane::new(x_shape, dy.shape(), cfg);
    let (x_len, y_len) = (pl.h * pl.w, pl.oh * pl.ow);
    let dx = map_planes(numel(x_shape), x_len, |p, dxp| pl.avg_backward(&dys[p * y_len..][..y_len], dxp));
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
    let y: Vec<f32> = xs.par_chunks(h * w).map(|p| p.iter().fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v))).collect();
    Tensor::from_vec(y, &[x.shape()[0], x.shape()[1], 1, 1])
}

pub(super) fn global_max_pool_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (h, w) = plane_dims("global_max_pool_backward", x.shape())?;
    let (dys, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let plane = h * w;
    let dx = map_planes(xs.len(), plane, |p, dxp| {
        let xp = &xs[p * plane..][..plane];
        dxp[pick_max(xp, w, 0..h, 0..w, xp.iter().fold(f32::NEG_INFINITY, |m, &v| nan_max(m, v)))] = dys[p];
    });
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
