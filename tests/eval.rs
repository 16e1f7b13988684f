//! Evaluation metrics: hand-made rankings with known answers, and features against a naive f64
//! reference of the whole protocol.

use plr_engine::eval::{
    eval_query, evaluate, evaluate_distances, evaluate_reranked, squared_euclidean, Metrics, QueryResult, RerankConfig, Reranker,
};
use plr_engine::rng::Rng;
use plr_engine::testing::{cuda_or_skip, fixture, norm_rel_err};
use plr_engine::{Device, Tensor};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

#[test]
fn spec_toy_case_with_same_camera_removal() {
    // Query pid 7 camera 0. By distance the gallery reads: [same pid same cam (removed), other,
    // match, same pid same cam (removed), other, match] -> relevance after removal [0, 1, 0, 1].
    let dist = [0.0f32, 1.0, 2.0, 2.5, 3.0, 4.0];
    let g_pids = [7, 3, 7, 7, 4, 7];
    let g_cams = [0, 0, 1, 0, 2, 3];
    let r = eval_query(&dist, 7, 0, &g_pids, &g_cams).unwrap();
    assert_eq!(r.first_match, 1);
    assert!(close(r.ap, 0.5), "AP {}", r.ap);
    // Hardest match at rank 4 of 2 matches.
    assert!(close(r.inp, 0.5), "INP {}", r.inp);
    let m = evaluate_distances(&dist, &[7], &[0], &g_pids, &g_cams).unwrap();
    assert_eq!(m.cmc.len(), 6, "max rank capped at the gallery size");
    assert_eq!((m.cmc[0], m.cmc[1]), (0.0, 1.0));
    assert_eq!((m.rank1, m.rank5), (0.0, 1.0));
    assert!(close(m.map, 0.5));

    // Same pid in the same camera counts once it is in another camera; other pids in the query's
    // camera are never removed.
    let r = eval_query(&[0.5, 0.1], 7, 0, &[7, 9], &[1, 0]).unwrap();
    assert_eq!(r.first_match, 1);
    assert!(close(r.ap, 0.5));
}

#[test]
fn minp_and_ap_on_a_hand_ranking() {
    // Relevance [1, 0, 0, 1, 0, 1, 0]: AP = (1/1 + 2/4 + 3/6) / 3; INP = 3 matches / rank 6.
    let rel = [1, 0, 0, 1, 0, 1, 0];
    let dist: Vec<f32> = (0..rel.len()).map(|i| i as f32).collect();
    let g_pids: Vec<usize> = rel.iter().map(|&r| if r == 1 { 5 } else { 6 }).collect();
    let g_cams = vec![1; rel.len()];
    let r = eval_query(&dist, 5, 0, &g_pids, &g_cams).unwrap();
    assert!(close(r.ap, (1.0 + 0.5 + 0.5) / 3.0), "AP {}", r.ap);
    assert!(close(r.inp, 0.5), "INP {}", r.inp);
    assert_eq!(r.first_match, 0);
    // Distances decide the order, not the gallery order.
    let reversed: Vec<f32> = dist.iter().map(|d| 10.0 - d).collect();
    let r = eval_query(&reversed, 5, 0, &g_pids, &g_cams).unwrap();
    assert_eq!(r.first_match, 1);
    assert!(close(r.inp, 3.0 / 7.0));
}

#[test]
fn queries_without_a_valid_match_are_skipped() {
    // Query 0 (pid 1, cam 0) only has a same-camera match: skipped. Query 1 (pid 2) matches at
    // rank 2; query 2 (pid 3) at rank 1.
    let g_pids = [1, 2, 3, 4];
    let g_cams = [0, 1, 1, 1];
    #[rustfmt::skip]
    let dist = [
        0.1f32, 0.2, 0.3, 0.4,
        0.5, 0.2, 0.9, 0.1,
        0.9, 0.8, 0.1, 0.5,
    ];
    let m = evaluate_distances(&dist, &[1, 2, 3], &[0, 0, 0], &g_pids, &g_cams).unwrap();
    assert_eq!((m.num_valid_queries, m.num_skipped_queries), (2, 1));
    assert_eq!(m.cmc, vec![0.5, 1.0, 1.0, 1.0]);
    assert!(close(m.map, (0.5 + 1.0) / 2.0));
    assert!(close(m.minp, (0.5 + 1.0) / 2.0));
    assert_eq!(eval_query(&dist[..4], 1, 0, &g_pids, &g_cams), None);
    // Nothing valid at all is an error; so are mismatched lengths.
    assert!(evaluate_distances(&dist[..4], &[1], &[0], &g_pids, &g_cams).is_err());
    assert!(evaluate_distances(&dist, &[1, 2], &[0, 0], &g_pids, &g_cams).is_err());

    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["num_valid_queries"], 2);
    assert_eq!(json["rank1"], 0.5);
    let table = m.to_string();
    assert!(table.contains("mAP:  75.0%") && table.contains("Rank-1 : 50.0%") && table.contains("1 skipped"), "{table}");
}

/// The whole protocol in f64 with no shared code: distances, ranking, removal, CMC, AP, INP.
fn naive_metrics(q: &[Vec<f64>], g: &[Vec<f64>], qp: &[usize], qc: &[usize], gp: &[usize], gc: &[usize]) -> (f64, f64, Vec<f64>, usize) {
    let max_rank = 50.min(g.len());
    let (mut ap_sum, mut inp_sum, mut cmc, mut valid) = (0.0, 0.0, vec![0.0; max_rank], 0usize);
    for i in 0..q.len() {
        let mut ranked: Vec<(f64, usize)> =
            g.iter().enumerate().map(|(j, gj)| (q[i].iter().zip(gj).map(|(a, b)| (a - b) * (a - b)).sum::<f64>(), j)).collect();
        ranked.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rel: Vec<bool> = ranked.iter().filter(|&&(_, j)| !(gp[j] == qp[i] && gc[j] == qc[i])).map(|&(_, j)| gp[j] == qp[i]).collect();
        let hits: Vec<usize> = rel.iter().enumerate().filter(|(_, &r)| r).map(|(k, _)| k + 1).collect();
        if hits.is_empty() {
            continue;
        }
        valid += 1;
        ap_sum += hits.iter().enumerate().map(|(n, &k)| (n + 1) as f64 / k as f64).sum::<f64>() / hits.len() as f64;
        inp_sum += hits.len() as f64 / *hits.last().unwrap() as f64;
        for (k, c) in cmc.iter_mut().enumerate() {
            if hits[0] <= k + 1 {
                *c += 1.0;
            }
        }
    }
    let n = valid as f64;
    (ap_sum / n, inp_sum / n, cmc.iter().map(|c| c / n).collect(), valid)
}

#[test]
fn features_match_naive_reference() {
    let mut rng = Rng::new(21);
    let (nq, ng, d) = (40, 300, 48);
    // 30 identities in 4 cameras; features = identity centre + noise, so rankings are non-trivial.
    let centres: Vec<Vec<f64>> = (0..30).map(|_| (0..d).map(|_| rng.normal()).collect()).collect();
    let mut make = |n: usize| {
        let pids: Vec<usize> = (0..n).map(|_| rng.below(30)).collect();
        let cams: Vec<usize> = (0..n).map(|_| rng.below(4)).collect();
        let feats: Vec<Vec<f64>> = pids.iter().map(|&p| centres[p].iter().map(|c| c + 1.2 * rng.normal()).collect()).collect();
        (pids, cams, feats)
    };
    let (qp, qc, qf) = make(nq);
    let (gp, gc, gf) = make(ng);
    let flat = |f: &[Vec<f64>]| f.iter().flatten().map(|&v| v as f32).collect::<Vec<f32>>();
    // The reference uses the same f32-rounded features.
    let (qf32, gf32) = (flat(&qf), flat(&gf));
    let round = |f: &[f32]| f.chunks(d).map(|r| r.iter().map(|&v| v as f64).collect()).collect::<Vec<Vec<f64>>>();

    let dist = squared_euclidean(&qf32, &gf32, d);
    let (q64, g64) = (round(&qf32), round(&gf32));
    for i in 0..nq {
        for j in 0..ng {
            let want: f64 = q64[i].iter().zip(&g64[j]).map(|(a, b)| (a - b) * (a - b)).sum();
            let got = dist[i * ng + j] as f64;
            assert!((got - want).abs() <= 1e-5 * want.max(1.0), "distance ({i},{j}): {got} vs {want}");
        }
    }

    let q = Tensor::from_vec(qf32.clone(), &[nq, d]).unwrap();
    let g = Tensor::from_vec(gf32.clone(), &[ng, d]).unwrap();
    let m = evaluate(&q, &g, &qp, &qc, &gp, &gc).unwrap();
    let (map, minp, cmc, valid) = naive_metrics(&q64, &g64, &qp, &qc, &gp, &gc);
    assert_eq!(m.num_valid_queries, valid);
    assert_eq!(m.num_valid_queries + m.num_skipped_queries, nq);
    assert!((m.map - map).abs() < 1e-9, "mAP {} vs {map}", m.map);
    assert!((m.minp - minp).abs() < 1e-9, "mINP {} vs {minp}", m.minp);
    assert_eq!(m.cmc.len(), 50);
    for (k, (a, b)) in m.cmc.iter().zip(&cmc).enumerate() {
        assert!((a - b).abs() < 1e-12, "CMC@{}: {a} vs {b}", k + 1);
    }
    assert_eq!((m.rank1, m.rank5, m.rank10, m.rank20), (cmc[0], cmc[4], cmc[9], cmc[19]));
    // Non-trivial: the metric is neither perfect nor chance.
    assert!(m.map > 0.2 && m.map < 0.99, "mAP {}", m.map);

    assert!(evaluate(&q, &Tensor::from_vec(gf32, &[ng / 2, 2 * d]).unwrap(), &qp, &qc, &gp[..ng / 2], &gc[..ng / 2]).is_err());
    assert!(evaluate(&q, &g, &qp[1..], &qc, &gp, &gc).is_err());

    // Features on the GPU: the products run there, the metrics agree with the naive reference.
    if cuda_or_skip("features_match_naive_reference (cuda)") {
        let on_gpu = |t: &Tensor| t.to_device(Device::Cuda).unwrap();
        let m = evaluate(&on_gpu(&q), &on_gpu(&g), &qp, &qc, &gp, &gc).unwrap();
        assert!((m.map - map).abs() < 1e-6 && (m.minp - minp).abs() < 1e-6, "cuda: mAP {} vs {map}, mINP {} vs {minp}", m.map, m.minp);
        assert_eq!(m.rank1, cmc[0]);
    }
}

#[test]
fn metrics_aggregate_per_query_results() {
    let r = |first_match, ap, inp| Some(QueryResult { first_match, ap, inp });
    let m = Metrics::from_queries(&[r(0, 1.0, 1.0), None, r(7, 0.2, 0.1), r(25, 0.05, 0.02)], 100).unwrap();
    assert_eq!((m.num_valid_queries, m.num_skipped_queries), (3, 1));
    assert!(close(m.rank1, 1.0 / 3.0) && close(m.rank5, 1.0 / 3.0) && close(m.rank10, 2.0 / 3.0) && close(m.rank20, 2.0 / 3.0));
    assert!(close(m.cmc[25], 1.0) && close(m.cmc[24], 2.0 / 3.0));
    assert!(close(m.map, 1.25 / 3.0) && close(m.minp, 1.12 / 3.0));
    assert!(Metrics::from_queries(&[None, None], 10).is_err());
}

/// k-reciprocal re-ranking against tools/rerank_reference.py (float64, dense, the published
/// algorithm) on 24 query and 90 gallery features of 12 identities, at fast-reid's setting and at
/// an odd k1 with other k2 and lambda. The fixture's rank cuts are at least 1e-4 (relative) apart,
/// and no two re-ranked distances of a query within 1e-6 of a tie, so an f32 computation picks the same
/// neighbour sets and the same ranking.
fn ids(f: &plr_engine::io::weights::TensorFile, name: &str) -> Vec<usize> {
    f.get(name).unwrap().as_i64().unwrap().iter().map(|&v| v as usize).collect()
}

#[test]
fn rerank_matches_the_reference() {
    let f = fixture("rerank_small.safetensors");
    let (qf, gf) = (f.tensor("qf").unwrap(), f.tensor("gf").unwrap());
    let (nq, ng) = (qf.shape()[0], gf.shape()[0]);
    let d = qf.shape()[1];
    let mut devices = vec![Device::Cpu];
    if cuda_or_skip("rerank_matches_the_reference (cuda)") {
        devices.push(Device::Cuda);
    }
    for (k1, k2, lambda) in [(20, 6, 0.3), (5, 3, 0.5)] {
        let want = f.tensor(&format!("dist.{k1}_{k2}_{lambda}")).unwrap().to_vec().unwrap();
        let cfg = RerankConfig { k1, k2, lambda };
        for &device in &devices {
            let on = |t: &Tensor| t.to_device(device).unwrap();
            let mut dist = squared_euclidean(qf.cpu_slice().unwrap(), gf.cpu_slice().unwrap(), d);
            Reranker::new(&on(&qf), &on(&gf), cfg).unwrap().apply(0, &mut dist);
            let err = norm_rel_err(&dist, &want);
            assert!(err < 1e-6, "k1 {k1} k2 {k2} lambda {lambda} on {device}: norm-wise relative error {err:.2e}");
            let (qp, gp): (Vec<usize>, Vec<usize>) = (ids(&f, "q_pids"), ids(&f, "g_pids"));
            // One camera for the queries, another for the gallery: every gallery item counts.
            let (qc, gc) = (vec![0; nq], vec![1; ng]);
            let (plain_too, m) = evaluate_reranked(&on(&qf), &on(&gf), &qp, &qc, &gp, &gc, cfg).unwrap();
            let plain = evaluate(&on(&qf), &on(&gf), &qp, &qc, &gp, &gc).unwrap();
            assert_eq!(plain_too, plain, "the plain metrics beside the re-ranked ones");
            println!("k1 {k1} k2 {k2} lambda {lambda} on {device}: distances within {err:.1e}; mAP {:.4} (plain {:.4})", m.map, plain.map);
            assert_eq!(m, evaluate_distances(&want, &qp, &qc, &gp, &gc).unwrap(), "metrics from re-ranked distances");
            assert_ne!(m, plain, "re-ranking changed nothing");
        }
    }
}
