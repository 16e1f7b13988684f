//! k-reciprocal re-ranking (Zhong et al., CVPR 2017) as reid-strong-baseline and fast-reid compute
//! it (`TEST.RERANK`: k1 20, k2 6, lambda 0.3); tools/rerank_reference.py is the reference the
//! golden test compares against. Over query + gallery (N items):
//! - d = squared Euclidean distances, each row divided by its maximum;
//! - R(i) = the k-reciprocal neighbours of i: those among its k1 + 1 nearest that have i among
//!   theirs; each member c whose round(k1/2)-reciprocal set shares more than 2/3 of itself with
//!   R(i) adds that set;
//! - V(i, j) = exp(-d(i, j)) normalised over the expanded set (0 elsewhere), then averaged over
//!   i's k2 nearest rows (local query expansion);
//! - Jaccard(i, j) = 1 - s / (2 - s) with s = sum_k min(V(i, k), V(j, k));
//! - final = lambda d + (1 - lambda) Jaccard.
//!
//! The published code holds V, and the N x N distances, as dense arrays (float16 V); here V is
//! sparse (a few hundred entries per row), the distances are computed in blocks on the features'
//! device and only each row's nearest neighbours and maximum are kept, so memory grows with N, not
//! N squared.

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ops::attention::bmm;
use crate::tensor::{Device, Tensor};

/// Re-ranking parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RerankConfig {
    pub k1: usize,
    pub k2: usize,
    pub lambda: f32,
}

impl Default for RerankConfig {
    /// The paper's and fast-reid's values.
    fn default() -> Self {
        RerankConfig { k1: 20, k2: 6, lambda: 0.3 }
    }
}

impl RerankConfig {
    pub fn validate(&self) -> Result<()> {
        if self.k1 == 0 || self.k2 == 0 {
            return Err(Error::msg(format!("re-ranking: k1 ({}) and k2 ({}) must be at least 1", self.k1, self.k2)));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return Err(Error::msg(format!("re-ranking: lambda ({}) must lie in [0, 1]", self.lambda)));
        }
        Ok(())
    }
}

/// A sparse row: (column, value) pairs in increasing column order.
type SparseRow = Vec<(u32, f32)>;

/// What re-ranking needs beyond a query's own distance row, built once for query + gallery.
pub struct Reranker {
    cfg: RerankConfig,
    num_query: usize,
    /// Maximum squared distance of each row of the N x N matrix.
    row_max: Vec<f32>,
    /// V after local query expansion, one sparse row per item.
    v: Vec<SparseRow>,
    /// The columns of `v`: for each item, the rows with a non-zero entry there and its value.
    columns: Vec<SparseRow>,
}

/// Rows of the N x N distance matrix computed at once (bounded like evaluation's blocks).
const BLOCK_VALUES: usize = 16 << 20;

impl Reranker {
    /// Builds the neighbour structure of query features `qf` [nq, D] and gallery features `gf`
    /// [ng, D]. The N x N distances are computed on `gf`'s device, in blocks of rows.
    pub fn new(qf: &Tensor, gf: &Tensor, cfg: RerankConfig) -> Result<Self> {
        Self::build(qf, gf, cfg, BLOCK_VALUES)
    }

    fn build(qf: &Tensor, gf: &Tensor, cfg: RerankConfig, block_values: usize) -> Result<Self> {
        cfg.validate()?;
        let (nq, d) = qf.dims2("re-ranking (query features)")?;
        let (ng, dg) = gf.dims2("re-ranking (gallery features)")?;
        if d != dg || d == 0 || ng == 0 {
            return Err(Error::shape("re-ranking", format!("query features are {d}-d, gallery features {dg}-d ({ng} items)")));
        }
        let n = nq + ng;
        let mut feat = qf.to_device(Device::Cpu)?.cpu_slice()?.to_vec();
        feat.extend_from_slice(gf.to_device(Device::Cpu)?.cpu_slice()?);
        let all_host = Tensor::from_vec(feat, &[1, n, d])?;
        let feat = all_host.cpu_slice()?;
        let norms: Vec<f32> = feat.chunks(d).map(|r| r.iter().map(|v| v * v).sum()).collect();
        let all = all_host.to_device(gf.device())?;

        // Each row's maximum and its nearest (k1 + 1 for the reciprocal sets, k2 for the query
        // expansion), by (distance, index) like a stable argsort.
        let keep = (cfg.k1 + 1).max(cfg.k2).min(n);
        let mut row_max = vec![0f32; n];
        let mut nearest = vec![0u32; n * keep];
        let rows = (block_values / n).max(1);
        for start in (0..n).step_by(rows) {
            let end = (start + rows).min(n);
            let block = Tensor::from_vec(feat[start * d..end * d].to_vec(), &[1, end - start, d])?.to_device(gf.device())?;
            let dots = bmm(&block, &all, false, true)?.to_vec()?;
            dots.par_chunks(n)
                .zip(row_max[start..end].par_iter_mut())
                .zip(nearest[start * keep..end * keep].par_chunks_mut(keep))
                .enumerate()
                .for_each(|(r, ((dot, max), near))| {
                    let ni = norms[start + r];
                    let dist: Vec<f32> = dot.iter().zip(&norms).map(|(&p, &nj)| ni + nj - 2.0 * p).collect();
                    // All features equal would make every distance 0: keep the division finite.
                    *max = dist.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
                    let by_distance = |&a: &u32, &b: &u32| dist[a as usize].total_cmp(&dist[b as usize]).then(a.cmp(&b));
                    let mut order: Vec<u32> = (0..n as u32).collect();
                    if keep < n {
                        order.select_nth_unstable_by(keep - 1, by_distance);
                        order.truncate(keep);
                    }
                    order.sort_unstable_by(by_distance);
                    near.copy_from_slice(&order);
                });
        }
        let near = |i: usize, k: usize| &nearest[i * keep..i * keep + k.min(keep)];
        // The k-reciprocal neighbours of i, in i's order (k + 1 nearest, i itself included).
        let reciprocal = |i: usize, k: usize| -> Vec<u32> {
            near(i, k + 1).iter().copied().filter(|&c| near(c as usize, k + 1).contains(&(i as u32))).collect()
        };
        let dist = |i: usize, j: usize| -> f32 {
            let dot: f32 = feat[i * d..(i + 1) * d].iter().zip(&feat[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
            (norms[i] + norms[j] - 2.0 * dot) / row_max[i]
        };
        // numpy's around(k1 / 2): halves to even.
        let half = (cfg.k1 as f64 / 2.0).round_ties_even() as usize;
        let v: Vec<SparseRow> = (0..n)
            .into_par_iter()
            .map(|i| {
                let recip = reciprocal(i, cfg.k1);
                let mut expansion = recip.clone();
                for &c in &recip {
                    let cand = reciprocal(c as usize, half);
                    let shared = cand.iter().filter(|x| recip.contains(x)).count();
                    if 3 * shared > 2 * cand.len() {
                        expansion.extend_from_slice(&cand);
                    }
                }
                expansion.sort_unstable();
                expansion.dedup();
                let weights: Vec<f32> = expansion.iter().map(|&j| (-dist(i, j as usize)).exp()).collect();
                let total: f32 = weights.iter().sum();
                expansion.into_iter().zip(weights).map(|(j, w)| (j, w / total)).collect()
            })
            .collect();
        let v = if cfg.k2 > 1 { query_expansion(&v, |i| near(i, cfg.k2), n) } else { v };
        let mut columns: Vec<SparseRow> = vec![Vec::new(); n];
        for (i, row) in v.iter().enumerate() {
            for &(j, x) in row {
                columns[j as usize].push((i as u32, x));
            }
        }
        Ok(Reranker { cfg, num_query: nq, row_max, v, columns })
    }

    /// Turns `dist`, the squared distances of queries `first..` to the whole gallery (row-major,
    /// `ng` per row), into re-ranked distances, in place.
    pub fn apply(&self, first: usize, dist: &mut [f32]) {
        let (nq, lambda) = (self.num_query, self.cfg.lambda);
        let ng = self.columns.len() - nq;
        dist.par_chunks_mut(ng).enumerate().for_each(|(r, row)| {
            let i = first + r;
            let mut shared = vec![0f32; ng];
            for &(k, x) in &self.v[i] {
                for &(j, y) in &self.columns[k as usize] {
                    if let Some(s) = (j as usize).checked_sub(nq) {
                        shared[s] += x.min(y);
                    }
                }
            }
            for (o, s) in row.iter_mut().zip(shared) {
                let jaccard = 1.0 - s / (2.0 - s);
                *o = lambda * *o / self.row_max[i] + (1.0 - lambda) * jaccard;
            }
        });
    }
}

/// Local query expansion: row i becomes the mean of the rows of its k2 nearest (`nearest(i)`).
fn query_expansion<'a>(v: &[SparseRow], nearest: impl Fn(usize) -> &'a [u32] + Sync, n: usize) -> Vec<SparseRow> {
    (0..n)
        .into_par_iter()
        .map_init(
            || (vec![0f32; n], Vec::new()),
            |(sum, touched), i| {
                let rows = nearest(i);
                for &r in rows {
                    for &(j, x) in &v[r as usize] {
                        if sum[j as usize] == 0.0 {
                            touched.push(j);
                        }
                        sum[j as usize] += x;
                    }
                }
                touched.sort_unstable();
                let scale = 1.0 / rows.len() as f32;
                let row = touched.iter().map(|&j| (j, std::mem::take(&mut sum[j as usize]) * scale)).collect();
                touched.clear();
                row
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_expansion_averages_the_rows_of_the_nearest() {
        let v: Vec<SparseRow> = vec![vec![(0, 0.5), (2, 0.5)], vec![(1, 1.0)], vec![(0, 0.25), (1, 0.75)]];
        let nearest: [&[u32]; 3] = [&[0, 2], &[1, 0], &[2, 1]];
        let qe = query_expansion(&v, |i| nearest[i], 3);
        assert_eq!(qe[0], vec![(0, 0.375), (1, 0.375), (2, 0.25)]);
        assert_eq!(qe[1], vec![(0, 0.25), (1, 0.5), (2, 0.25)]);
        assert_eq!(qe[2], vec![(0, 0.125), (1, 0.875)]);
    }

    #[test]
    fn distance_blocks_do_not_change_the_result() {
        let mut rng = crate::rng::Rng::new(3);
        let (nq, ng, d) = (7, 30, 5);
        let q = Tensor::randn(&[nq, d], 1.0, &mut rng);
        let g = Tensor::randn(&[ng, d], 1.0, &mut rng);
        let cfg = RerankConfig { k1: 6, k2: 3, lambda: 0.3 };
        let plain = crate::eval::squared_euclidean(q.cpu_slice().unwrap(), g.cpu_slice().unwrap(), d);
        let rerank = |block| {
            let mut dist = plain.clone();
            Reranker::build(&q, &g, cfg, block).unwrap().apply(0, &mut dist);
            dist
        };
        let whole = rerank(BLOCK_VALUES);
        assert_ne!(whole, plain);
        // One row per block, and 4 rows (the last block partial): the same up to the products'
        // summation order, which the GEMM picks by block shape.
        for block in [1, 4 * (nq + ng)] {
            let err = crate::testing::norm_rel_err(&rerank(block), &whole);
            assert!(err < 1e-6, "block {block}: {err:.1e}");
        }
        // Queries re-ranked from an offset: the rows of the whole.
        let mut tail = plain[3 * ng..].to_vec();
        Reranker::new(&q, &g, cfg).unwrap().apply(3, &mut tail);
        assert_eq!(tail, whole[3 * ng..]);
    }

    #[test]
    fn bad_parameters_are_errors_naming_them() {
        for (cfg, word) in [
            (RerankConfig { k1: 0, ..Default::default() }, "k1"),
            (RerankConfig { k2: 0, ..Default::default() }, "k2"),
            (RerankConfig { lambda: 1.5, ..Default::default() }, "lambda"),
            (RerankConfig { lambda: f32::NAN, ..Default::default() }, "lambda"),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
