//! CPU convolution, three paths:
//! - depthwise (one input and one output channel per group): direct loops per plane, with dedicated
//!   code for 3x3 stride 1 pad 1 (OSNet's Lite 3x3);
//! - pointwise (1x1, stride 1, no padding): each group's input already is the GEMM operand;
//! - everything else: im2col per image and group, then GEMM.
//!
//! Images are spread over the rayon threads, single-threaded GEMMs inside, when there are at least
//! as many images as threads; otherwise images run in turn and each GEMM uses every thread.

use rayon::prelude::*;

use super::Conv2dCfg;
use crate::error::Result;
use crate::ops::cpu_util::{assume_written, avx2_dispatch, dot_f32, sum_f64, written_vec};
use crate::ops::gemm::sgemm;
use crate::tensor::{numel, Tensor};

/// Sizes of one convolution; shapes were validated by `conv2d_output_shape`.
#[derive(Clone, Copy)]
struct Geom {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    groups: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], cfg: Conv2dCfg) -> Geom {
        let (k, s, p) = (w[2], cfg.stride, cfg.padding);
        Geom {
            n: x[0],
            c_in: x[1],
            h: x[2],
            w: x[3],
            c_out: w[0],
            k,
            stride: s,
            pad: p,
            groups: cfg.groups,
            oh: (x[2] + 2 * p - k) / s + 1,
            ow: (x[3] + 2 * p - k) / s + 1,
        }
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    fn cin_g(&self) -> usize {
        self.c_in / self.groups
    }
    fn cout_g(&self) -> usize {
        self.c_out / self.groups
    }
    fn kk(&self) -> usize {
        self.k * self.k
    }
    /// Rows of the im2col matrix (columns of a group's weight matrix).
    fn kdim(&self) -> usize {
        self.cin_g() * self.kk()
    }
    fn depthwise(&self) -> bool {
        self.cin_g() == 1 && self.cout_g() == 1
    }
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    fn is_3x3_same(&self) -> bool {
        self.k == 3 && self.stride == 1 && self.pad == 1
    }
    /// Length of the im2col scratch buffer (none for pointwise convolutions).
    fn col_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.kdim() * self.ohw()
        }
    }
}

/// Output indices o in [lo, hi) whose input index o * stride + off - pad lies in [0, len).
fn valid_range(off: usize, pad: usize, stride: usize, len: usize, out_len: usize) -> (usize, usize) {
    let lo = if pad > off { (pad - off).div_ceil(stride) } else { 0 }.min(out_len);
    let hi = if len + pad > off { ((len + pad - off - 1) / stride + 1).min(out_len) } else { 0 };
    (lo, hi.max(lo))
}

/// Input row of output row `o` at kernel row `a`, if inside the input.
fn input_index(o: usize, a: usize, g: &Geom, len: usize) -> Option<usize> {
    (o * g.stride + a).checked_sub(g.pad).filter(|&i| i < len)
}

/// col[(ci k + a) k + b][oy ow + ox] = x[ci][oy s + a - p][ox s + b - p], zero outside the input.
fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
    let (k, hw, ohw, ow) = (g.k, g.hw(), g.ohw(), g.ow);
    for ci in 0..g.cin_g() {
        for a in 0..k {
            for b in 0..k {
                let row = &mut col[((ci * k + a) * k + b) * ohw..][..ohw];
                let (lo, hi) = valid_range(b, g.pad, g.stride, g.w, ow);
                for oy in 0..g.oh {
                    let r = &mut row[oy * ow..][..ow];
                    let Some(iy) = input_index(oy, a, g, g.h) else {
                        r.fill(0.0);
                        continue;
                    };
                    let xr = &x[ci * hw + iy * g.w..][..g.w];
                    r[..lo].fill(0.0);
                    r[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    let src = &xr[lo * g.stride + b - g.pad..];
                    if g.stride == 1 {
                        r[lo..hi].copy_from_slice(&src[..hi - lo]);
                    } else {
                        for (v, &s) in r[lo..hi].iter_mut().zip(src.iter().step_by(g.stride)) {
                            *v = s;
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col`: adds every column entry into the input position it was copied from.
fn col2im(g: &Geom, col: &[f32], dx: &mut [f32]) {
    let (k, hw, ohw, ow) = (g.k, g.hw(), g.ohw(), g.ow);
    for ci in 0..g.cin_g() {
        for a in 0..k {
            for b in 0..k {
                let row = &col[((ci * k + a) * k + b) * ohw..][..ohw];
                let (lo, hi) = valid_range(b, g.pad, g.stride, g.w, ow);
                for oy in 0..g.oh {
                    let Some(iy) = input_index(oy, a, g, g.h) else { continue };
                    let r = &row[oy * ow..][..ow];
                    let dxr = &mut dx[ci * hw + iy * g.w..][..g.w];
                    if lo == hi {
                        continue;
                    }
                    let dst = &mut dxr[lo * g.stride + b - g.pad..];
                    if g.stride == 1 {
                        for (d, &v) in dst.iter_mut().zip(&r[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for (d, &v) in dst.iter_mut().step_by(g.stride).zip(&r[lo..hi]) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// Runs `f(image, out_chunk, col_scratch, parallel_gemm)` for every image; each writes its own
/// `chunk` of `out`.
fn for_each_image(out: &mut [f32], chunk: usize, col_len: usize, f: impl Fn(usize, &mut [f32], &mut [f32], bool) + Sync) {
    if chunk == 0 {
        return;
    }
    if out.len() / chunk >= rayon::current_num_threads() {
        out.par_chunks_mut(chunk).enumerate().for_each_init(|| vec![0f32; col_len], |col, (i, o)| f(i, o, col, false));
    } else {
        let mut col = vec![0f32; col_len];
        for (i, o) in out.chunks_mut(chunk).enumerate() {
            f(i, o, &mut col, true);
        }
    }
}

/// Scratch of the 3x3 stride-1 pad-1 depthwise kernels: two zero-bordered (h + 2) x (w + 2)
/// planes. With the border in memory every tap is a constant offset in the flattened plane, so a
/// kernel is one long vectorisable loop per plane rather than short loops per row (OSNet's rows
/// are 8 to 32 wide). An instance serves one kernel: `convolve` (`a` padded input, `b` output) or
/// `filter_grad` (`a` and `b` padded x and dy), which only writes interiors, so borders stay zero.
struct Padded3x3 {
    h: usize,
    w: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Padded3x3 {
    fn for_geom(g: &Geom) -> Option<Padded3x3> {
        let len = (g.h + 2) * (g.w + 2);
        g.is_3x3_same().then(|| Padded3x3 { h: g.h, w: g.w, a: vec![0.0; len], b: vec![0.0; len] })
    }

    /// Flattened positions [q0, q1) cover every interior element (and the borders between rows).
    fn range(&self) -> (usize, usize) {
        let w2 = self.w + 2;
        (w2 + 1, (self.h + 1) * w2 - 1)
    }

    /// Start of tap (a, b) (row-major) for output position q0: q0 + (a - 1)(w + 2) + (b - 1).
    fn tap_starts(&self) -> [usize; 9] {
        std::array::from_fn(|t| (t / 3) * (self.w + 2) + t % 3)
    }

    fn load(buf: &mut [f32], src: &[f32], h: usize, w: usize) {
        for i in 0..h {
            buf[(i + 1) * (w + 2) + 1..][..w].copy_from_slice(&src[i * w..][..w]);
        }
    }

    /// y = bias + x (*) wt for one plane.
    fn convolve(&mut self, x: &[f32], wt: &[f32], bias: f32, y: &mut [f32]) {
        let (h, w) = (self.h, self.w);
        let (q0, q1) = self.range();
        Self::load(&mut self.a, x, h, w);
        let starts = self.tap_starts();
        let out = &mut self.b[..q1 - q0];
        taps3x3(&self.a, starts, wt, out);
        // Output (i, j) sits at padded position q0 + i (w + 2) + j.
        for i in 0..h {
            for (o, &v) in y[i * w..][..w].iter_mut().zip(&out[i * (w + 2)..]) {
                *o = v + bias;
            }
        }
    }

    /// dwt[t] += sum over the plane of dy times x shifted by tap t.
    fn filter_grad(&mut self, dy: &[f32], x: &[f32], dwt: &mut [f32]) {
        let (h, w) = (self.h, self.w);
        let (q0, q1) = self.range();
        Self::load(&mut self.a, x, h, w);
        Self::load(&mut self.b, dy, h, w);
        // dy's zero border cancels the products that fall outside the input.
        for (d, o) in dwt.iter_mut().zip(self.tap_starts()) {
            *d += dot_f32(&self.b[q0..q1], &self.a[o..o + (q1 - q0)]);
        }
    }
}

avx2_dispatch! {
    /// out[q] = sum over taps t of wt[t] src[starts[t] + q].
    fn taps3x3(src: &[f32], starts: [usize; 9], wt: &[f32], out: &mut [f32]) {
        let n = out.len();
        let [s0, s1, s2, s3, s4, s5, s6, s7, s8] = starts.map(|o| &src[o..o + n]);
        for q in 0..n {
            out[q] = (wt[0] * s0[q] + wt[1] * s1[q] + wt[2] * s2[q])
                + (wt[3] * s3[q] + wt[4] * s4[q] + wt[5] * s5[q])
                + (wt[6] * s6[q] + wt[7] * s7[q] + wt[8] * s8[q]);
        }
    }
}

/// Depthwise forward of one plane, any kernel, stride and padding: y = bias + x (*) wt.
fn depthwise_forward_plane(g: &Geom, x: &[f32], wt: &[f32], bias: f32, y: &mut [f32]) {
    y.fill(bias);
    for oy in 0..g.oh {
        let yr = &mut y[oy * g.ow..][..g.ow];
        for a in 0..g.k {
            let Some(iy) = input_index(oy, a, g, g.h) else { continue };
            let xr = &x[iy * g.w..][..g.w];
            for b in 0..g.k {
                let wv = wt[a * g.k + b];
                let (lo, hi) = valid_range(b, g.pad, g.stride, g.w, g.ow);
                for (ox, v) in yr.iter_mut().enumerate().take(hi).skip(lo) {
                    *v += wv * xr[ox * g.stride + b - g.pad];
                }
            }
        }
    }
}

/// Depthwise input gradient of one plane, any kernel, stride and padding.
fn depthwise_backward_data_plane(g: &Geom, dy: &[f32], wt: &[f32], dx: &mut [f32]) {
    dx.fill(0.0);
    for oy in 0..g.oh {
        let dyr = &dy[oy * g.ow..][..g.ow];
        for a in 0..g.k {
            let Some(iy) = input_index(oy, a, g, g.h) else { continue };
            let dxr = &mut dx[iy * g.w..][..g.w];
            for b in 0..g.k {
                let wv = wt[a * g.k + b];
                let (lo, hi) = valid_range(b, g.pad, g.stride, g.w, g.ow);
                for (ox, &d) in dyr.iter().enumerate().take(hi).skip(lo) {
                    dxr[ox * g.stride + b - g.pad] += wv * d;
                }
            }
        }
    }
}

/// Adds one plane's contribution to a depthwise kernel's gradient: dwt[a][b] += sum dy[o] x[o + (a, b) - pad].
fn depthwise_backward_filter_plane(g: &Geom, dy: &[f32], x: &[f32], dwt: &mut [f32]) {
    for oy in 0..g.oh {
        let dyr = &dy[oy * g.ow..][..g.ow];
        for a in 0..g.k {
            let Some(iy) = input_index(oy, a, g, g.h) else { continue };
            let xr = &x[iy * g.w..][..g.w];
            for b in 0..g.k {
                let (lo, hi) = valid_range(b, g.pad, g.stride, g.w, g.ow);
                let s: f32 = (lo..hi).map(|ox| dyr[ox] * xr[ox * g.stride + b - g.pad]).sum();
                dwt[a * g.k + b] += s;
            }
        }
    }
}

pub(super) fn conv2d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2dCfg, y_shape: &[usize; 4]) -> Result<Tensor> {
    let g = Geom::new(x.shape(), w.shape(), cfg);
    let (xs, ws) = (x.cpu_slice()?, w.cpu_slice()?);
    let bs = bias.map(Tensor::cpu_slice).transpose()?;
    // SAFETY: every path writes each output element before reading it: the depthwise kernels
    // assign whole planes (the generic one fills its plane first), and each group's GEMM either
    // accumulates onto the bias it was filled with or does not read C (`accumulate` false).
    let y = unsafe { written_vec(numel(y_shape), |y| conv_forward_into(&g, xs, ws, bs, assume_written(y))) };
    Tensor::from_vec(y, y_shape)
}

fn conv_forward_into(g: &Geom, xs: &[f32], ws: &[f32], bs: Option<&[f32]>, y: &mut [f32]) {
    let g = *g;
    let (hw, ohw, kk, kdim) = (g.hw(), g.ohw(), g.kk(), g.kdim());
    if g.depthwise() {
        y.par_chunks_mut(ohw).enumerate().for_each_init(
            || Padded3x3::for_geom(&g),
            |pad, (p, yp)| {
                let c = p % g.c_out;
                let (xp, wt, b) = (&xs[p * hw..][..hw], &ws[c * kk..][..kk], bs.map_or(0.0, |b| b[c]));
                match pad {
                    Some(pad) => pad.convolve(xp, wt, b, yp),
                    None => depthwise_forward_plane(&g, xp, wt, b, yp),
                }
            },
        );
    } else {
        let (cin_g, cout_g) = (g.cin_g(), g.cout_g());
        for_each_image(y, g.c_out * ohw, g.col_len(), |i, yi, col, par| {
            if let Some(b) = bs {
                for (row, &bv) in yi.chunks_mut(ohw).zip(b) {
                    row.fill(bv);
                }
            }
            for grp in 0..g.groups {
                let xg = &xs[(i * g.c_in + grp * cin_g) * hw..][..cin_g * hw];
                let a: &[f32] = if g.pointwise() {
                    xg
                } else {
                    im2col(&g, xg, col);
                    col
                };
                let wg = &ws[grp * cout_g * kdim..][..cout_g * kdim];
                sgemm(cout_g, ohw, kdim, wg, false, a, false, &mut yi[grp * cout_g * ohw..][..cout_g * ohw], bs.is_some(), par);
            }
        });
    }
}

pub(super) fn conv2d_backward_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    let g = Geom::new(x_shape, w.shape(), cfg);
    let (dys, ws) = (dy.cpu_slice()?, w.cpu_slice()?);
    // SAFETY: every path writes each element before reading it: the depthwise kernels assign whole
    // planes (the generic one zeroes its plane first), the pointwise GEMMs do not read C
    // (`accumulate` false), and the im2col path, whose col2im adds, zeroes the buffer first.
    let dx = unsafe {
        written_vec(numel(x_shape), |dx| {
            let dx = assume_written(dx);
            if !(g.depthwise() || g.pointwise()) {
                dx.fill(0.0);
            }
            conv_backward_data_into(&g, dys, ws, dx)
        })
    };
    Tensor::from_vec(dx, x_shape)
}

fn conv_backward_data_into(g: &Geom, dys: &[f32], ws: &[f32], dx: &mut [f32]) {
    let g = *g;
    let (hw, ohw, kk, kdim) = (g.hw(), g.ohw(), g.kk(), g.kdim());
    if hw == 0 {
        return;
    }
    if g.depthwise() {
        dx.par_chunks_mut(hw).enumerate().for_each_init(
            || Padded3x3::for_geom(&g),
            |pad, (p, dxp)| {
                let c = p % g.c_in;
                let (dyp, wt) = (&dys[p * ohw..][..ohw], &ws[c * kk..][..kk]);
                match pad {
                    // Stride 1, pad 1: the input gradient is the same convolution with the kernel
                    // rotated by 180 degrees.
                    Some(pad) => pad.convolve(dyp, &std::array::from_fn::<f32, 9, _>(|t| wt[8 - t]), 0.0, dxp),
                    None => depthwise_backward_data_plane(&g, dyp, wt, dxp),
                }
            },
        );
    } else {
        let (cin_g, cout_g) = (g.cin_g(), g.cout_g());
        for_each_image(dx, g.c_in * hw, g.col_len(), |i, dxi, col, par| {
            for grp in 0..g.groups {
                let wg = &ws[grp * cout_g * kdim..][..cout_g * kdim];
                let dyg = &dys[(i * g.c_out + grp * cout_g) * ohw..][..cout_g * ohw];
                let dxg = &mut dxi[grp * cin_g * hw..][..cin_g * hw];
                if g.pointwise() {
                    sgemm(cin_g, hw, cout_g, wg, true, dyg, false, dxg, false, par);
                } else {
                    sgemm(kdim, ohw, cout_g, wg, true, dyg, false, col, false, par);
                    col2im(&g, col, dxg);
                }
            }
        });
    }
}

pub(super) fn conv2d_backward_filter(dy: &Tensor, x: &Tensor, w_shape: &[usize], cfg: Conv2dCfg) -> Result<Tensor> {
    let g = Geom::new(x.shape(), w_shape, cfg);
    let (dys, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let (hw, ohw, kk, kdim) = (g.hw(), g.ohw(), g.kk(), g.kdim());
    if g.depthwise() {
        // One task per channel, summing over images in order: deterministic without partial sums.
        let mut dw = vec![0f32; numel(w_shape)];
        // (max(1): a 0x0 kernel has no taps and an empty gradient.)
        dw.par_chunks_mut(kk.max(1)).enumerate().for_each_init(
            || Padded3x3::for_geom(&g),
            |pad, (c, dwc)| {
                for i in 0..g.n {
                    let p = i * g.c_out + c;
                    let (dyp, xp) = (&dys[p * ohw..][..ohw], &xs[p * hw..][..hw]);
                    match pad {
                        Some(pad) => pad.filter_grad(dyp, xp, dwc),
                        None => depthwise_backward_filter_plane(&g, dyp, xp, dwc),
                    }
                }
            },
        );
        return Tensor::from_vec(dw, w_shape);
    }
    // Contiguous runs of images, one partial gradient each, summed in a fixed order: deterministic
    // for a given thread count.
    let (cin_g, cout_g) = (g.cin_g(), g.cout_g());
    let runs = g.n.min(rayon::current_num_threads()).max(1);
    let per_run = g.n.div_ceil(runs);
    let wlen = numel(w_shape);
    let partials: Vec<Vec<f32>> = (0..runs)
        .into_par_iter()
        .map(|r| {
            let mut dw = vec![0f32; wlen];
            let mut col = vec![0f32; g.col_len()];
            for i in r * per_run..((r + 1) * per_run).min(g.n) {
                for grp in 0..g.groups {
                    let xg = &xs[(i * g.c_in + grp * cin_g) * hw..][..cin_g * hw];
                    let dyg = &dys[(i * g.c_out + grp * cout_g) * ohw..][..cout_g * ohw];
                    let b: &[f32] = if g.pointwise() {
                        xg
                    } else {
                        im2col(&g, xg, &mut col);
                        &col
                    };
                    let dwg = &mut dw[grp * cout_g * kdim..][..cout_g * kdim];
                    sgemm(cout_g, kdim, ohw, dyg, false, b, true, dwg, true, runs == 1);
                }
            }
            dw
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut dw = parts.next().unwrap_or_else(|| vec![0f32; wlen]);
    for p in parts {
        for (a, b) in dw.iter_mut().zip(&p) {
            *a += b;
        }
    }
    Tensor::from_vec(dw, w_shape)
}

pub(super) fn conv2d_backward_bias(dy: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = dy.dims4("conv2d_backward_bias")?;
    let dys = dy.cpu_slice()?;
    let hw = h * w;
    let db: Vec<f32> =
        (0..c).into_par_iter().map(|ch| (0..n).map(|i| sum_f64(&dys[(i * c + ch) * hw..][..hw])).sum::<f64>() as f32).collect();
    Tensor::from_vec(db, &[c])
}
