//! CPU reference of the elementwise family.
//!
//! Broadcasting is planned once per call (`Bcast`): b's dims are right-aligned to a's and adjacent
//! dims that are both broadcast (or both not) are merged. The hot cases then reduce to long runs:
//! same shape or [1] is one run over everything, the gate [N,C,1,1] on [N,C,H,W] is N*C runs of
//! H*W elements that each read one b value.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::error::Result;
use crate::ops::cpu_util::{sum_dot_f64, sum_f64, write_copy, written_vec};
use crate::tensor::{numel, Tensor};

/// Below this many elements a loop runs as one task.
const PAR_MIN: usize = 1 << 16;
/// Elements per parallel task.
const CHUNK: usize = 1 << 13;

/// Rows per parallel task for row-wise loops over rows of `d` values.
fn rows_per_task(d: usize) -> usize {
    (PAR_MIN / d.max(1)).max(1)
}

/// Uninitialised output the kernels below write in full.
type Out = [MaybeUninit<f32>];

/// A buffer of `len` values written chunk by chunk by `f(start, chunk)`, which must write every
/// element of its chunk.
fn fill(len: usize, f: impl Fn(usize, &mut Out) + Sync) -> Vec<f32> {
    // SAFETY: the chunks cover the buffer and every `f` in this module writes its whole chunk.
    unsafe {
        written_vec(len, |y| {
            if len >= PAR_MIN {
                y.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| f(i * CHUNK, c));
            } else {
                f(0, y);
            }
        })
    }
}

/// Per row of `d` values in parallel: `f(row index, output row)`, which must write the whole row.
fn fill_rows(len: usize, d: usize, f: impl Fn(usize, &mut Out) + Sync) -> Vec<f32> {
    // SAFETY: the rows cover the buffer (d divides len, or len is 0) and `f` writes each in full.
    unsafe {
        written_vec(len, |y| {
            if d > 0 {
                y.par_chunks_mut(d).enumerate().with_min_len(rows_per_task(d)).for_each(|(r, o)| f(r, o));
            }
        })
    }
}

fn map(x: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Result<Tensor> {
    let xs = x.cpu_slice()?;
    let y = fill(xs.len(), |s, out| out.iter_mut().zip(&xs[s..]).for_each(|(o, &v)| _ = o.write(f(v))));
    Tensor::from_vec(y, x.shape())
}

fn zip_map(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    let (av, bv) = (a.cpu_slice()?, b.cpu_slice()?);
    let y = fill(av.len(), |s, out| out.iter_mut().zip(&av[s..]).zip(&bv[s..]).for_each(|((o, &x), &y)| _ = o.write(f(x, y))));
    Tensor::from_vec(y, a.shape())
}

/// b's values along one run of a: one per element, or one for the whole run.
enum BRun<'a> {
    Each(&'a [f32]),
    One(f32),
}

/// How b (broadcast) lines up with a: a is cut into rows of `row` contiguous elements; within a
/// row b is either contiguous too or one value.
struct Bcast {
    row: usize,
    b_contig: bool,
    /// The merged dims outside the row, outermost first: (size, b's stride, 0 where broadcast).
    outer: Vec<(usize, usize)>,
}

impl Bcast {
    fn new(a: &[usize], b: &[usize]) -> Bcast {
        let pad = a.len() - b.len();
        let mut segs: Vec<(usize, bool)> = Vec::new();
        for (d, &ad) in a.iter().enumerate() {
            if ad == 1 {
                continue;
            }
            let broadcast = d < pad || b[d - pad] == 1;
            match segs.last_mut() {
                Some((size, prev)) if *prev == broadcast => *size *= ad,
                _ => segs.push((ad, broadcast)),
            }
        }
        let (row, row_broadcast) = segs.pop().unwrap_or((1, false));
        let mut stride = if row_broadcast { 1 } else { row };
        let mut outer: Vec<(usize, usize)> = segs
            .iter()
            .rev()
            .map(|&(size, broadcast)| {
                if broadcast {
                    (size, 0)
                } else {
                    let s = stride;
                    stride *= size;
                    (size, s)
                }
            })
            .collect();
        outer.reverse();
        Bcast { row, b_contig: !row_broadcast, outer }
    }

    fn b_row_offset(&self, mut r: usize) -> usize {
        let mut off = 0;
        for &(size, stride) in self.outer.iter().rev() {
            off += (r % size) * stride;
            r /= size;
        }
        off
    }

    /// Calls `f(a_offset, len, b_offset)` for the runs that cover a's [start, start + len), each
    /// inside one row; `b_offset` is where b's values for the run start.
    fn runs(&self, start: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        let end = start + len;
        let mut pos = start;
        while pos < end {
            let (r, within) = (pos / self.row, pos % self.row);
            let n = (self.row - within).min(end - pos);
            f(pos, n, self.b_row_offset(r) + if self.b_contig { within } else { 0 });
            pos += n;
        }
    }

    /// A buffer laid out like a, written run by run by `f(out_run, a_offset, b's values for the run)`.
    fn gather(&self, len: usize, b: &[f32], f: impl Fn(&mut Out, usize, BRun) + Sync) -> Vec<f32> {
        fill(len, |s, out| {
            self.runs(s, out.len(), |off, n, bo| {
                let run = if self.b_contig { BRun::Each(&b[bo..bo + n]) } else { BRun::One(b[bo]) };
                f(&mut out[off - s..off - s + n], off, run)
            })
        })
    }

    /// r[j] = sum over the elements of a that read b[j] of x (times w, if given), in f64; x and
    /// w are laid out like a.
    fn reduce(&self, b_len: usize, x: &[f32], w: Option<&[f32]>) -> Vec<f32> {
        let len = x.len();
        let add_range = |acc: &mut Vec<f64>, start: usize, n: usize| {
            self.runs(start, n, |off, n, bo| {
                let xr = &x[off..off + n];
                match (self.b_contig, w) {
                    (true, Some(w)) => {
                        acc[bo..bo + n].iter_mut().zip(xr.iter().zip(&w[off..off + n])).for_each(|(a, (&x, &w))| *a += x as f64 * w as f64)
                    }
                    (true, None) => acc[bo..bo + n].iter_mut().zip(xr).for_each(|(a, &x)| *a += x as f64),
                    // A run that reads one b value (the gate's H x W plane): a vectorised reduction.
                    (false, Some(w)) => acc[bo] += sum_dot_f64(xr, &w[off..off + n]).1,
                    (false, None) => acc[bo] += sum_f64(xr),
                }
            })
        };
        let acc = if len >= PAR_MIN {
            (0..len.div_ceil(CHUNK))
                .into_par_iter()
                .fold(
                    || vec![0.0f64; b_len],
                    |mut acc, c| {
                        let s = c * CHUNK;
                        add_range(&mut acc, s, CHUNK.min(len - s));
                        acc
                    },
                )
                .reduce(
                    || vec![0.0f64; b_len],
                    |mut x, y| {
                        x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
                        x
                    },
                )
        } else {
            let mut acc = vec![0.0f64; b_len];
            add_range(&mut acc, 0, len);
            acc
        };
        acc.into_iter().map(|v| v as f32).collect()
    }
}

pub(super) fn relu_forward(x: &Tensor) -> Result<Tensor> {
    map(x, |v| v.max(0.0))
}

pub(super) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    zip_map(dy, y, |d, y| if y > 0.0 { d } else { 0.0 })
}

pub(super) fn sigmoid_forward(x: &Tensor) -> Result<Tensor> {
    // exp(-x) overflows to inf for x < -88, giving exactly 0: no special case needed.
    map(x, |v| 1.0 / (1.0 + (-v).exp()))
}

pub(super) fn sigmoid_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    zip_map(dy, y, |d, y| d * y * (1.0 - y))
}

fn broadcast_binary(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    if a.shape() == b.shape() {
        return zip_map(a, b, f);
    }
    let (av, bv) = (a.cpu_slice()?, b.cpu_slice()?);
    let y = Bcast::new(a.shape(), b.shape()).gather(av.len(), bv, |out, off, run| {
        let a = &av[off..off + out.len()];
        match run {
            BRun::Each(b) => out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| _ = o.write(f(x, y))),
            BRun::One(y) => out.iter_mut().zip(a).for_each(|(o, &x)| _ = o.write(f(x, y))),
        }
    });
    Tensor::from_vec(y, a.shape())
}

pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast_binary(a, b, |x, y| x + y)
}

pub(super) fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    broadcast_binary(a, b, |x, y| x * y)
}

pub(super) fn mul_backward(dy: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let da = mul(dy, b)?;
    let (dyv, av) = (dy.cpu_slice()?, a.cpu_slice()?);
    let db = if a.shape() == b.shape() {
        mul(dy, a)?
    } else {
        let r = Bcast::new(a.shape(), b.shape()).reduce(b.numel(), dyv, Some(av));
        Tensor::from_vec(r, b.shape())?
    };
    Ok((da, db))
}

pub(super) fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let xv = x.cpu_slice()?;
    Tensor::from_vec(Bcast::new(x.shape(), shape).reduce(numel(shape), xv, None), shape)
}

pub(super) fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let y = Bcast::new(shape, x.shape()).gather(numel(shape), x.cpu_slice()?, |out, _, run| match run {
        BRun::Each(b) => write_copy(out, b),
        BRun::One(v) => out.iter_mut().for_each(|o| _ = o.write(v)),
    });
    Tensor::from_vec(y, shape)
}

pub(super) fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    map(x, |v| alpha * v)
}

pub(super) fn sum_all(x: &Tensor) -> Result<Tensor> {
    let s: f64 = x.cpu_slice()?.par_chunks(CHUNK).with_min_len(PAR_MIN / CHUNK).map(|c| c.iter().map(|&v| v as f64).sum::<f64>()).sum();
    Tensor::from_vec(vec![s as f32], &[1])
}

/// The clamped norm max(||x||, 1e-12) of one row, and whether the clamp is inactive.
fn row_norm(x: &[f32]) -> (f32, bool) {
    let n = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
    if n > 1e-12 {
        (n, true)
    } else {
        (1e-12, false)
    }
}

pub(super) fn l2_normalize_forward(x: &Tensor) -> Result<Tensor> {
    let (_, d) = x.dims2("l2_normalize_forward")?;
    let xv = x.cpu_slice()?;
    let y = fill_rows(xv.len(), d, |r, y| {
        let x = &xv[r * d..][..d];
        let (n, _) = row_norm(x);
        y.iter_mut().zip(x).for_each(|(y, &x)| _ = y.write(x / n));
    });
    Tensor::from_vec(y, x.shape())
}

pub(super) fn l2_normalize_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (_, d) = x.dims2("l2_normalize_backward")?;
    let (xv, dyv) = (x.cpu_slice()?, dy.cpu_slice()?);
    let dx = fill_rows(xv.len(), d, |r, dx| {
        let (x, dy) = (&xv[r * d..][..d], &dyv[r * d..][..d]);
        let (n, active) = row_norm(x);
        // y = x / n: dx = (dy - y (y . dy)) / n; with the clamp active n is a constant.
        let proj = if active { x.iter().zip(dy).map(|(&x, &g)| x as f64 * g as f64).sum::<f64>() as f32 / (n * n) } else { 0.0 };
        dx.iter_mut().zip(x.iter().zip(dy)).for_each(|(dx, (&x, &g))| _ = dx.write((g - x * proj) / n));
    });
    Tensor::from_vec(dx, x.shape())
}

/// (product of dims before `axis`, product of dims after it).
fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[..axis].iter().product(), shape[axis + 1..].iter().product())
}

pub(super) fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let mut shape = xs[0].shape().to_vec();
    shape[axis] = xs.iter().map(|x| x.shape()[axis]).sum();
    let (_, inner) = outer_inner(&shape, axis);
    let block = shape[axis] * inner;
    let parts: Vec<(&[f32], usize)> = xs.iter().map(|x| Ok((x.cpu_slice()?, x.shape()[axis] * inner))).collect::<Result<_>>()?;
    // The parts' lengths along `axis` add up to the block, so each block is written in full.
    let y = fill_rows(numel(&shape), block, |o, out| {
        let mut at = 0;
        for &(src, len) in &parts {
            write_copy(&mut out[at..at + len], &src[o * len..(o + 1) * len]);
            at += len;
        }
    });
    Tensor::from_vec(y, &shape)
}

pub(super) fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    let (_, inner) = outer_inner(&shape, axis);
    let src_block = shape[axis] * inner;
    shape[axis] = len;
    let block = len * inner;
    let xv = x.cpu_slice()?;
    let y = fill_rows(numel(&shape), block, |o, out| {
        let from = o * src_block + start * inner;
        write_copy(out, &xv[from..from + block]);
    });
    Tensor::from_vec(y, &shape)
}
