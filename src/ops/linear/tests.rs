use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::testing::{gradcheck, max_rel_err, GradCheck};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed))
}

/// y[i, o] = sum_k x[i, k] w[o, k] + b[o], in f64.
fn naive(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Vec<f32> {
    let (n, din) = (x.shape()[0], x.shape()[1]);
    let dout = w.shape()[0];
    let (xv, wv) = (x.to_vec().unwrap(), w.to_vec().unwrap());
    let bv = b.map(|b| b.to_vec().unwrap());
    let mut y = Vec::with_capacity(n * dout);
    for i in 0..n {
        for o in 0..dout {
            let s: f64 = (0..din).map(|k| xv[i * din + k] as f64 * wv[o * din + k] as f64).sum();
            y.push((s + bv.as_ref().map_or(0.0, |b| b[o] as f64)) as f32);
        }
    }
    y
}

/// Error of a length-k dot product of N(0, 1) values relative to its typical size sqrt(k).
fn dot_err(got: &[f32], want: &[f32], k: usize) -> f32 {
    max_rel_err(got, want, (k as f32).sqrt())
}

#[test]
fn forward_matches_naive() {
    for &(n, din, dout) in &[(1, 1, 1), (3, 5, 4), (64, 512, 512), (64, 2048, 751)] {
        let (x, w, b) = (randn(&[n, din], 1), randn(&[dout, din], 2), randn(&[dout], 3));
        let y = linear_forward(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.shape(), [n, dout]);
        assert!(dot_err(&y.to_vec().unwrap(), &naive(&x, &w, Some(&b)), din) < 1e-5, "{n}x{din}->{dout}");
        let y = linear_forward(&x, &w, None).unwrap();
        assert!(dot_err(&y.to_vec().unwrap(), &naive(&x, &w, None), din) < 1e-5, "{n}x{din}->{dout} no bias");
    }
}

#[test]
fn backward_matches_naive() {
    let (n, din, dout) = (33, 70, 45);
    let (x, w, dy) = (randn(&[n, din], 4), randn(&[dout, din], 5), randn(&[n, dout], 6));
    let (dx, dw, db) = linear_backward(&dy, &x, &w).unwrap();
    assert_eq!((dx.shape(), dw.shape(), db.shape()), (&[n, din][..], &[dout, din][..], &[dout][..]));
    let (xv, wv, dyv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), dy.to_vec().unwrap());
    let dx_ref: Vec<f32> = (0..n * din)
        .map(|e| (0..dout).map(|o| dyv[e / din * dout + o] as f64 * wv[o * din + e % din] as f64).sum::<f64>() as f32)
        .collect();
    let dw_ref: Vec<f32> = (0..dout * din)
        .map(|e| (0..n).map(|i| dyv[i * dout + e / din] as f64 * xv[i * din + e % din] as f64).sum::<f64>() as f32)
        .collect();
    let db_ref: Vec<f32> = (0..dout).map(|o| (0..n).map(|i| dyv[i * dout + o] as f64).sum::<f64>() as f32).collect();
    assert!(dot_err(&dx.to_vec().unwrap(), &dx_ref, dout) < 1e-5);
    assert!(dot_err(&dw.to_vec().unwrap(), &dw_ref, n) < 1e-5);
    assert!(dot_err(&db.to_vec().unwrap(), &db_ref, n) < 1e-5);
}

#[test]
fn gradcheck_x_w_b() {
    let inputs = [randn(&[4, 6], 7), randn(&[5, 6], 8), randn(&[5], 9)];
    gradcheck(&inputs, |t, v| t.linear(&v[0], &v[1], Some(&v[2])), GradCheck::default()).unwrap();
    gradcheck(&inputs[..2], |t, v| t.linear(&v[0], &v[1], None), GradCheck::default()).unwrap();
}

#[test]
fn shape_errors_name_the_op() {
    let (x, w) = (randn(&[4, 6], 0), randn(&[5, 7], 1));
    let e = linear_forward(&x, &w, None).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "linear_forward", .. }));
    assert!(e.to_string().contains("6 features") && e.to_string().contains("expects 7"), "{e}");
    let w = randn(&[5, 6], 1);
    assert!(matches!(linear_forward(&x, &w, Some(&randn(&[4], 2))), Err(Error::Shape { op: "linear_forward", .. })));
    assert!(matches!(linear_forward(&randn(&[4, 6, 1], 0), &w, None), Err(Error::Shape { op: "linear_forward", .. })));
    assert!(matches!(linear_backward(&randn(&[4, 4], 3), &x, &w), Err(Error::Shape { op: "linear_backward", .. })));
}

#[test]
fn linear_is_f32_only() {
    use crate::tensor::DType::BF16;
    let (x, w) = (randn(&[3, 4], 72), randn(&[5, 4], 73));
    assert!(matches!(linear_forward(&x.to_dtype(BF16).unwrap(), &w, None), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(linear_forward(&x.to_dtype(BF16).unwrap(), &w.to_dtype(BF16).unwrap(), None), Err(Error::DType { .. })));
}
