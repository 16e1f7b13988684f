use rayon::prelude::*;

use crate::error::Result;
use crate::ops::gemm::sgemm;
use crate::tensor::Tensor;

/// The clamp floor of squared distances (triplet and center loss).
const D2_MIN: f64 = 1e-12;
/// The center loss's upper clamp.
const D2_MAX: f64 = 1e12;

fn loss_value(v: f64) -> Result<Tensor> {
    Tensor::from_vec(vec![v as f32], &[1])
}

/// log(1 + e^z) without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// log(sum_k e^{z_k}) of one row of logits, max-subtracted, in f64.
fn logsumexp(z: &[f32]) -> f64 {
    let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    mx + z.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln()
}

pub(super) fn cross_entropy_label_smooth_forward(logits: &Tensor, labels: &[usize], eps: f32) -> Result<Tensor> {
    let (n, k) = logits.dims2("cross_entropy_label_smooth")?;
    let (eps, kf) = (eps as f64, k as f64);
    let total: f64 = logits
        .cpu_slice()?
        .par_chunks(k)
        .zip(labels.par_iter())
        .map(|(z, &y)| {
            let lse = logsumexp(z);
            let sum_logp = z.iter().map(|&v| v as f64).sum::<f64>() - kf * lse;
            -((1.0 - eps) * (z[y] as f64 - lse) + eps / kf * sum_logp)
        })
        .sum();
    loss_value(total / n as f64)
}

pub(super) fn cross_entropy_label_smooth_backward(dloss: &Tensor, logits: &Tensor, labels: &[usize], eps: f32) -> Result<Tensor> {
    let (n, k) = logits.dims2("cross_entropy_label_smooth_backward")?;
    let g = dloss.cpu_slice()?[0] as f64 / n as f64;
    let (eps, kf) = (eps as f64, k as f64);
    let zv = logits.cpu_slice()?;
    let mut dz = vec![0.0; zv.len()];
    dz.par_chunks_mut(k).zip(zv.par_chunks(k).zip(labels.par_iter())).for_each(|(dz, (z, &y))| {
        let lse = logsumexp(z);
        for (j, (d, &v)) in dz.iter_mut().zip(z).enumerate() {
            let q = eps / kf + if j == y { 1.0 - eps } else { 0.0 };
            *d = (g * ((v as f64 - lse).exp() - q)) as f32;
        }
    });
    Tensor::from_vec(dz, logits.shape())
}

/// One anchor's hardest positive and negative: (index, distance, squared distance before the
/// clamp) each.
struct Hardest {
    ap: (usize, f32, f32),
    an: (usize, f32, f32),
}

/// Batch-hard mining on d_ij = sqrt(clamp(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12)). Squared norms are
/// read off the Gram matrix's diagonal so that d_ii clamps exactly (to 1e-6). Ties go to the first
/// index, as torch.max does.
fn hardest(x: &Tensor, labels: &[usize]) -> Result<Vec<Hardest>> {
    let (n, d) = x.dims2("triplet_soft_margin")?;
    let xv = x.cpu_slice()?;
    let mut gram = vec![0.0; n * n];
    sgemm(n, n, d, xv, false, xv, true, &mut gram, false, true);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut ap = (i, f32::NEG_INFINITY, 0.0);
        let mut an = (i, f32::INFINITY, 0.0);
        for j in 0..n {
            let d2 = gram[i * n + i] + gram[j * n + j] - 2.0 * gram[i * n + j];
            let dist = d2.max(D2_MIN as f32).sqrt();
            if labels[j] == labels[i] {
                if dist > ap.1 {
                    ap = (j, dist, d2);
                }
            } else if dist < an.1 {
                an = (j, dist, d2);
            }
        }
        out.push(Hardest { ap, an });
    }
    Ok(out)
}

pub(super) fn triplet_soft_margin_forward(x: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let pairs = hardest(x, labels)?;
    let total: f64 = pairs.iter().map(|h| softplus(h.ap.1 as f64 - h.an.1 as f64)).sum();
    loss_value(total / pairs.len() as f64)
}

pub(super) fn triplet_soft_margin_backward(dloss: &Tensor, x: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let (n, d) = x.dims2("triplet_soft_margin_backward")?;
    let pairs = hardest(x, labels)?;
    let g = dloss.cpu_slice()?[0] as f64 / n as f64;
    // dL/d(d2_ij) per selected pair, symmetrised into s: since d(d2_ij)/dx_i = 2 (x_i - x_j),
    // dx_i = 2 (rowsum(s)_i x_i - (s x)_i).
    let mut s = vec![0.0f32; n * n];
    for (i, h) in pairs.iter().enumerate() {
        let dz = g * sigmoid(h.ap.1 as f64 - h.an.1 as f64);
        for ((j, dist, d2), sign) in [(h.ap, 1.0), (h.an, -1.0)] {
            // sqrt(clamp(d2)): no gradient where the clamp holds.
            if d2 >= D2_MIN as f32 {
                let c = (sign * dz / (2.0 * dist as f64)) as f32;
                s[i * n + j] += c;
                s[j * n + i] += c;
            }
        }
    }
    let xv = x.cpu_slice()?;
    let mut sx = vec![0.0; n * d];
    sgemm(n, d, n, &s, false, xv, false, &mut sx, false, true);
    let mut dx = vec![0.0; n * d];
    for i in 0..n {
        let r: f32 = s[i * n..(i + 1) * n].iter().sum();
        for c in 0..d {
            dx[i * d + c] = 2.0 * (r * xv[i * d + c] - sx[i * d + c]);
        }
    }
    Tensor::from_vec(dx, x.shape())
}

/// Per sample with a center: (index, clamped squared distance, whether the clamp is inactive).
fn center_dists(x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<Vec<(usize, f64, bool)>> {
    let (_, d) = x.dims2("center_loss")?;
    let (k, _) = centers.dims2("center_loss")?;
    let (xv, cv) = (x.cpu_slice()?, centers.cpu_slice()?);
    Ok(labels
        .iter()
        .enumerate()
        .filter(|&(_, &y)| y < k)
        .map(|(i, &y)| {
            let (xi, c) = (&xv[i * d..(i + 1) * d], &cv[y * d..(y + 1) * d]);
            let (mut xx, mut cc, mut xc) = (0.0f64, 0.0f64, 0.0f64);
            for (&a, &b) in xi.iter().zip(c) {
                let (a, b) = (a as f64, b as f64);
                xx += a * a;
                cc += b * b;
                xc += a * b;
            }
            let v = xx + cc - 2.0 * xc;
            (i, v.clamp(D2_MIN, D2_MAX), (D2_MIN..=D2_MAX).contains(&v))
        })
        .collect())
}

pub(super) fn center_loss_forward(x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<Tensor> {
    let rows = center_dists(x, labels, centers)?;
    if rows.is_empty() {
        return loss_value(0.0);
    }
    loss_value(rows.iter().map(|r| r.1).sum::<f64>() / rows.len() as f64)
}

pub(super) fn center_loss_backward(dloss: &Tensor, x: &Tensor, labels: &[usize], centers: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, d) = x.dims2("center_loss_backward")?;
    let rows = center_dists(x, labels, centers)?;
    let (xv, cv) = (x.cpu_slice()?, centers.cpu_slice()?);
    let mut dx = vec![0.0; xv.len()];
    let mut dc = vec![0.0; cv.len()];
    if !rows.is_empty() {
        let g = 2.0 * dloss.cpu_slice()?[0] / rows.len() as f32;
        for &(i, _, _) in rows.iter().filter(|r| r.2) {
            let y = labels[i];
            for t in 0..d {
                let diff = g * (xv[i * d + t] - cv[y * d + t]);
                dx[i * d + t] = diff;
                dc[y * d + t] -= diff;
            }
        }
    }
    Ok((Tensor::from_vec(dx, x.shape())?, Tensor::from_vec(dc, centers.shape())?))
}
