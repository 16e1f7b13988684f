use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::testing::{gradcheck, max_rel_err, GradCheck};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed))
}

/// Stored shape of an operand whose op() is [rows, cols].
fn stored(batch: usize, rows: usize, cols: usize, trans: bool) -> [usize; 3] {
    if trans {
        [batch, cols, rows]
    } else {
        [batch, rows, cols]
    }
}

/// op(a) op(b) per batch entry, in f64 with explicit indexing.
fn naive_bmm(a: &Tensor, b: &Tensor, ta: bool, tb: bool, (bs, m, n, k): (usize, usize, usize, usize)) -> Vec<f32> {
    let (av, bv) = (a.to_vec().unwrap(), b.to_vec().unwrap());
    let at = |p: usize, i: usize, kk: usize| if ta { av[(p * k + kk) * m + i] } else { av[(p * m + i) * k + kk] };
    let bt = |p: usize, kk: usize, j: usize| if tb { bv[(p * n + j) * k + kk] } else { bv[(p * k + kk) * n + j] };
    let mut y = Vec::new();
    for p in 0..bs {
        for i in 0..m {
            for j in 0..n {
                y.push((0..k).map(|kk| at(p, i, kk) as f64 * bt(p, kk, j) as f64).sum::<f64>() as f32);
            }
        }
    }
    y
}

/// Error of a length-k dot product of N(0, 1) values relative to its typical size sqrt(k).
fn dot_err(got: &[f32], want: &[f32], k: usize) -> f32 {
    max_rel_err(got, want, (k as f32).sqrt())
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

#[test]
fn bmm_matches_naive_for_each_transpose() {
    // The PAM shapes (energy = Q^T K: 128 positions, 48 = 384/8 channels), small odd ones, and a
    // single batch entry (one multithreaded GEMM instead of one GEMM per thread).
    for &(bs, m, n, k) in &[(3, 5, 7, 4), (2, 128, 128, 48), (20, 6, 9, 11), (1, 33, 65, 17)] {
        for (s, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
            let a = randn(&stored(bs, m, k, ta), 2 * s as u64);
            let b = randn(&stored(bs, k, n, tb), 2 * s as u64 + 1);
            let y = bmm(&a, &b, ta, tb).unwrap();
            assert_eq!(y.shape(), [bs, m, n]);
            assert!(dot_err(&y.to_vec().unwrap(), &naive_bmm(&a, &b, ta, tb, (bs, m, n, k)), k) < 1e-5, "{bs}x{m}x{n}x{k} {ta} {tb}");
        }
    }
}

#[test]
fn bmm_backward_matches_naive() {
    // dA = dY op(B)^T and dB = op(A)^T dY, transposed back into each operand's stored layout.
    let (m, n, k) = (4, 5, 6);
    for (s, (bs, &(ta, tb))) in [1, 3].into_iter().flat_map(|bs| TRANSPOSES.iter().map(move |t| (bs, t))).enumerate() {
        let a = randn(&stored(bs, m, k, ta), 10 + s as u64);
        let b = randn(&stored(bs, k, n, tb), 20 + s as u64);
        let dy = randn(&[bs, m, n], 30 + s as u64);
        let (da, db) = bmm_backward(&dy, &a, &b, ta, tb).unwrap();
        assert_eq!(da.shape(), a.shape());
        assert_eq!(db.shape(), b.shape());
        // dY op(B)^T is bmm(dY, B, false, !tb) : [m, k]; stored transposed when ta.
        let da_ref = if ta { naive_bmm(&b, &dy, tb, true, (bs, k, m, n)) } else { naive_bmm(&dy, &b, false, !tb, (bs, m, k, n)) };
        let db_ref = if tb { naive_bmm(&dy, &a, true, ta, (bs, n, k, m)) } else { naive_bmm(&a, &dy, !ta, false, (bs, k, n, m)) };
        assert!(dot_err(&da.to_vec().unwrap(), &da_ref, n) < 1e-5, "da {ta} {tb}");
        assert!(dot_err(&db.to_vec().unwrap(), &db_ref, m) < 1e-5, "db {ta} {tb}");
    }
}

#[test]
fn bmm_gradcheck_each_transpose() {
    let (bs, m, n, k) = (2, 3, 4, 5);
    for (s, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        let inputs = [randn(&stored(bs, m, k, ta), 40 + s as u64), randn(&stored(bs, k, n, tb), 50 + s as u64)];
        gradcheck(&inputs, |t, v| t.bmm(&v[0], &v[1], ta, tb), GradCheck::default()).unwrap_or_else(|e| panic!("{ta} {tb}: {e}"));
    }
}

#[test]
fn bmm_shape_errors() {
    let (a, b) = (randn(&[2, 3, 4], 0), randn(&[2, 5, 6], 1));
    assert!(matches!(bmm(&a, &b, false, false), Err(Error::Shape { op: "bmm", .. })));
    assert!(matches!(bmm(&a, &randn(&[3, 4, 6], 1), false, false), Err(Error::Shape { op: "bmm", .. })));
    assert!(matches!(bmm(&randn(&[3, 4], 1), &b, false, false), Err(Error::Shape { op: "bmm", .. })));
    assert!(bmm(&a, &randn(&[2, 6, 3], 2), true, true).is_ok());
}

fn naive_softmax(x: &Tensor) -> Vec<f32> {
    let d = *x.shape().last().unwrap();
    x.to_vec()
        .unwrap()
        .chunks(d)
        .flat_map(|r| {
            let mx = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let s: f64 = r.iter().map(|&v| (v as f64 - mx).exp()).sum();
            r.iter().map(move |&v| ((v as f64 - mx).exp() / s) as f32)
        })
        .collect()
}

#[test]
fn softmax_matches_naive() {
    // [2, 512, 512] is the PAM energy after conv2 for two images: the parallel path.
    for (seed, shape) in [&[7][..], &[3, 4, 9], &[2, 512, 512]].into_iter().enumerate() {
        let x = Tensor::randn(shape, 5.0, &mut Rng::new(seed as u64));
        let y = softmax_lastdim_forward(&x).unwrap();
        assert!(max_rel_err(&y.to_vec().unwrap(), &naive_softmax(&x), 1e-30) < 1e-5, "{shape:?}");
    }
    // Logits this large overflow exp() unless the row max is subtracted first.
    let x = Tensor::from_vec(vec![1000.0, 1000.0 + 2f32.ln(), -1000.0], &[1, 3]).unwrap();
    let y = softmax_lastdim_forward(&x).unwrap().to_vec().unwrap();
    assert!(max_rel_err(&y, &[1.0 / 3.0, 2.0 / 3.0, 0.0], 1e-20) < 1e-4, "{y:?}");
}

#[test]
fn softmax_backward() {
    gradcheck(&[randn(&[3, 2, 6], 8)], |t, v| t.softmax_lastdim(&v[0]), GradCheck::default()).unwrap();
    let (x, dy) = (randn(&[64, 300], 9), randn(&[64, 300], 10));
    let y = softmax_lastdim_forward(&x).unwrap();
    let dx = softmax_lastdim_backward(&dy, &y).unwrap().to_vec().unwrap();
    let (yv, dyv) = (y.to_vec().unwrap(), dy.to_vec().unwrap());
    let want: Vec<f32> = yv
        .chunks(300)
        .zip(dyv.chunks(300))
        .flat_map(|(y, g)| {
            let dot: f64 = y.iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum();
            y.iter().zip(g).map(move |(&a, &b)| (a as f64 * (b as f64 - dot)) as f32)
        })
        .collect();
    assert!(max_rel_err(&dx, &want, 1e-6) < 1e-5);
}

#[test]
fn attention_ops_are_f32_only() {
    // The model runs the position attention in f32 and casts around it.
    let a = randn(&[2, 3, 4], 71).to_dtype(crate::tensor::DType::BF16).unwrap();
    assert!(matches!(bmm(&a, &a, true, false), Err(Error::DType { op: "bmm", .. })));
    assert!(matches!(softmax_lastdim_forward(&a), Err(Error::DType { .. })));
}
