//! Re-ID evaluation (the Market-1501 protocol of torchreid's `eval_market1501`, plus fast-reid's
//! mINP): squared Euclidean distances between query and gallery features, and per query the
//! ranked gallery without same-pid same-camera items, giving CMC, AP and INP.

mod rerank;

use rayon::prelude::*;
use serde::Serialize;

pub use rerank::{RerankConfig, Reranker};

use crate::error::{Error, Result};
use crate::ops::attention::bmm;
use crate::ops::gemm::sgemm;
use crate::tensor::{Device, Tensor};

/// CMC is kept up to this rank (or the gallery size, if smaller).
pub const MAX_RANK: usize = 50;

/// Bound on the distance block held at once (queries x gallery f32 values).
const BLOCK_VALUES: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metrics {
    /// Fractions in [0, 1].
    pub map: f64,
    pub minp: f64,
    pub rank1: f64,
    pub rank5: f64,
    pub rank10: f64,
    pub rank20: f64,
    /// cmc[k] = fraction of valid queries with a match within the first k+1 results.
    pub cmc: Vec<f64>,
    pub num_valid_queries: usize,
    /// Queries without any gallery match in another camera; not counted in any metric.
    pub num_skipped_queries: usize,
}

/// One query's results over its filtered ranking.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueryResult {
    /// 0-based position of the first match.
    pub first_match: usize,
    /// Non-interpolated average precision.
    pub ap: f64,
    /// Inverse negative penalty: matches / (1-based position of the last match).
    pub inp: f64,
}

/// Ranks the gallery for one query by ascending distance (ties by gallery order), drops items with
/// the query's pid and camera, and scores the rest; None when nothing left matches.
pub fn eval_query(dist: &[f32], q_pid: usize, q_camid: usize, g_pids: &[usize], g_camids: &[usize]) -> Option<QueryResult> {
    let mut order: Vec<usize> = (0..dist.len()).collect();
    order.sort_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
    let (mut matches, mut pos, mut first, mut last, mut precision_sum) = (0usize, 0usize, None, 0usize, 0.0f64);
    for g in order {
        if g_pids[g] == q_pid && g_camids[g] == q_camid {
            continue;
        }
        pos += 1;
        if g_pids[g] == q_pid {
            matches += 1;
            first.get_or_insert(pos - 1);
            last = pos;
            precision_sum += matches as f64 / pos as f64;
        }
    }
    let first_match = first?;
    Some(QueryResult { first_match, ap: precision_sum / matches as f64, inp: matches as f64 / last as f64 })
}

fn check_ids(what: &str, n: usize, pids: &[usize], camids: &[usize]) -> Result<()> {
    if pids.len() != n || camids.len() != n {
        return Err(Error::msg(format!("evaluate: {n} {what} items but {} pids and {} camera ids", pids.len(), camids.len())));
    }
    Ok(())
}

impl Metrics {
    /// Aggregates per-query results (None = skipped query) over a gallery of `num_gallery` items.
    pub fn from_queries(results: &[Option<QueryResult>], num_gallery: usize) -> Result<Metrics> {
        let valid: Vec<&QueryResult> = results.iter().flatten().collect();
        if valid.is_empty() {
            return Err(Error::msg(format!("evaluate: none of the {} queries has a gallery match from another camera", results.len())));
        }
        let n = valid.len() as f64;
        let max_rank = MAX_RANK.min(num_gallery);
        let mut hist = vec![0usize; max_rank];
        for r in &valid {
            if r.first_match < max_rank {
                hist[r.first_match] += 1;
            }
        }
        let cmc: Vec<f64> = hist
            .iter()
            .scan(0usize, |acc, &h| {
                *acc += h;
                Some(*acc as f64 / n)
            })
            .collect();
        let rank = |k: usize| cmc[k.min(max_rank) - 1];
        Ok(Metrics {
            map: valid.iter().map(|r| r.ap).sum::<f64>() / n,
            minp: valid.iter().map(|r| r.inp).sum::<f64>() / n,
            rank1: rank(1),
            rank5: rank(5),
            rank10: rank(10),
            rank20: rank(20),
            num_valid_queries: valid.len(),
            num_skipped_queries: results.len() - valid.len(),
            cmc,
        })
    }
}

/// Metrics from a precomputed [num_query, num_gallery] distance matrix (row-major).
pub fn evaluate_distances(dist: &[f32], q_pids: &[usize], q_camids: &[usize], g_pids: &[usize], g_camids: &[usize]) -> Result<Metrics> {
    let (nq, ng) = (q_pids.len(), g_pids.len());
    check_ids("query", nq, q_pids, q_camids)?;
    check_ids("gallery", ng, g_pids, g_camids)?;
    if dist.len() != nq * ng || ng == 0 {
        return Err(Error::msg(format!("evaluate: distance matrix has {} values, expected {nq} x {ng} (non-empty gallery)", dist.len())));
    }
    let results: Vec<Option<QueryResult>> =
        dist.par_chunks(ng).enumerate().map(|(i, row)| eval_query(row, q_pids[i], q_camids[i], g_pids, g_camids)).collect();
    Metrics::from_queries(&results, ng)
}

/// Squared Euclidean distances ‖q‖² + ‖g‖² − 2 q·g between the rows of `q` ([nq, d]) and `g`
/// ([ng, d]), as a row-major [nq, ng] matrix. `d` must be positive.
pub fn squared_euclidean(q: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let (nq, ng) = (q.len() / d, g.len() / d);
    let mut dots = vec![0.0f32; nq * ng];
    sgemm(nq, ng, d, q, false, g, true, &mut dots, false, true);
    dots_to_squared_distances(dots, &row_norms(q, d), &row_norms(g, d))
}

fn row_norms(x: &[f32], d: usize) -> Vec<f32> {
    x.chunks(d).map(|r| r.iter().map(|v| v * v).sum()).collect()
}

/// Turns the [nq, ng] dot products q·g into ‖q‖² + ‖g‖² − 2 q·g, in place.
fn dots_to_squared_distances(mut dots: Vec<f32>, qn: &[f32], gn: &[f32]) -> Vec<f32> {
    dots.par_chunks_mut(gn.len().max(1)).zip(qn.par_iter()).for_each(|(row, &a)| {
        for (o, &b) in row.iter_mut().zip(gn) {
            *o = a + b - 2.0 * *o;
        }
    });
    dots
}

/// Evaluates query features [nq, D] against gallery features [ng, D]. Distances are computed in
/// blocks of queries so memory stays bounded for large galleries.
pub fn evaluate(qf: &Tensor, gf: &Tensor, q_pids: &[usize], q_camids: &[usize], g_pids: &[usize], g_camids: &[usize]) -> Result<Metrics> {
    Ok(evaluate_blocked(qf, gf, Ids { q_pids, q_camids, g_pids, g_camids }, None, BLOCK_VALUES)?.0)
}

/// `evaluate`, and the same on k-reciprocal re-ranked distances (see `rerank`): (plain,
/// re-ranked), from one pass over the query x gallery distances.
pub fn evaluate_reranked(
    qf: &Tensor,
    gf: &Tensor,
    q_pids: &[usize],
    q_camids: &[usize],
    g_pids: &[usize],
    g_camids: &[usize],
    cfg: RerankConfig,
) -> Result<(Metrics, Metrics)> {
    let (plain, reranked) = evaluate_blocked(qf, gf, Ids { q_pids, q_camids, g_pids, g_camids }, Some(cfg), BLOCK_VALUES)?;
    Ok((plain, reranked.expect("re-ranking was asked for")))
}

/// Person and camera ids of the query and the gallery items.
#[derive(Clone, Copy)]
struct Ids<'a> {
    q_pids: &'a [usize],
    q_camids: &'a [usize],
    g_pids: &'a [usize],
    g_camids: &'a [usize],
}

/// The metrics, and with `rerank` the metrics after re-ranking the same distance blocks.
fn evaluate_blocked(
    qf: &Tensor,
    gf: &Tensor,
    ids: Ids,
    rerank: Option<RerankConfig>,
    block_values: usize,
) -> Result<(Metrics, Option<Metrics>)> {
    let Ids { q_pids, q_camids, g_pids, g_camids } = ids;
    let (nq, d) = qf.dims2("evaluate (query features)")?;
    let (ng, dg) = gf.dims2("evaluate (gallery features)")?;
    if d != dg {
        return Err(Error::shape("evaluate", format!("query features are {d}-d, gallery features {dg}-d")));
    }
    check_ids("query", nq, q_pids, q_camids)?;
    check_ids("gallery", ng, g_pids, g_camids)?;
    if ng == 0 || d == 0 {
        return Err(Error::msg(format!("evaluate: empty gallery ({ng} items) or features ({d} values)")));
    }
    let reranker = rerank.map(|cfg| Reranker::new(qf, gf, cfg)).transpose()?;
    // The dot products run where the features are (cuBLAS on a GPU); norms and ranking on the host.
    let device = gf.device();
    let (q_host, g_host) = (qf.to_device(Device::Cpu)?, gf.to_device(Device::Cpu)?);
    let q = q_host.cpu_slice()?;
    let (qn, gn) = (row_norms(q, d), row_norms(g_host.cpu_slice()?, d));
    let g3 = gf.reshape(&[1, ng, d])?;
    let rows = (block_values / ng).max(1);
    let score = |dist: &[f32], start: usize, results: &mut Vec<Option<QueryResult>>| {
        results.par_extend(
            dist.par_chunks(ng).enumerate().map(|(i, row)| eval_query(row, q_pids[start + i], q_camids[start + i], g_pids, g_camids)),
        )
    };
    let (mut plain, mut reranked) = (Vec::with_capacity(nq), Vec::new());
    for start in (0..nq).step_by(rows) {
        let end = (start + rows).min(nq);
        let q3 = Tensor::from_vec(q[start * d..end * d].to_vec(), &[1, end - start, d])?.to_device(device)?;
        let dots = bmm(&q3, &g3, false, true)?.to_vec()?;
        let mut dist = dots_to_squared_distances(dots, &qn[start..end], &gn);
        score(&dist, start, &mut plain);
        if let Some(r) = &reranker {
            r.apply(start, &mut dist);
            score(&dist, start, &mut reranked);
        }
    }
    let reranked = if reranker.is_some() { Some(Metrics::from_queries(&reranked, ng)?) } else { None };
    Ok((Metrics::from_queries(&plain, ng)?, reranked))
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "** Results **")?;
        writeln!(f, "mAP:  {:.1}%", 100.0 * self.map)?;
        writeln!(f, "mINP: {:.1}%", 100.0 * self.minp)?;
        writeln!(f, "CMC curve")?;
        for (k, v) in [(1, self.rank1), (5, self.rank5), (10, self.rank10), (20, self.rank20)] {
            writeln!(f, "Rank-{k:<2}: {:.1}%", 100.0 * v)?;
        }
        write!(f, "({} valid queries, {} skipped: no match in another camera)", self.num_valid_queries, self.num_skipped_queries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn blocked_distances_give_the_same_metrics() {
        let mut rng = Rng::new(8);
        let (nq, ng, d) = (23, 57, 8);
        let q = Tensor::randn(&[nq, d], 1.0, &mut rng);
        let g = Tensor::randn(&[ng, d], 1.0, &mut rng);
        let ids = |n: usize, k: usize, rng: &mut Rng| (0..n).map(|_| rng.below(k)).collect::<Vec<usize>>();
        let (qp, qc, gp, gc) = (ids(nq, 6, &mut rng), ids(nq, 3, &mut rng), ids(ng, 6, &mut rng), ids(ng, 3, &mut rng));
        let whole = evaluate(&q, &g, &qp, &qc, &gp, &gc).unwrap();
        let cfg = RerankConfig { k1: 8, k2: 3, lambda: 0.3 };
        let (plain, reranked) = evaluate_reranked(&q, &g, &qp, &qc, &gp, &gc, cfg).unwrap();
        assert_eq!(plain, whole);
        assert_ne!(reranked, whole);
        // 2 query rows per block (12 blocks, the last one partial), and 1 row per block.
        let ids = Ids { q_pids: &qp, q_camids: &qc, g_pids: &gp, g_camids: &gc };
        for block in [2 * ng, 1] {
            assert_eq!(evaluate_blocked(&q, &g, ids, None, block).unwrap(), (whole.clone(), None));
            assert_eq!(evaluate_blocked(&q, &g, ids, Some(cfg), block).unwrap(), (whole.clone(), Some(reranked.clone())));
        }
    }
}
