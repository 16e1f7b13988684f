use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::testing::{gradcheck, max_rel_err, GradCheck};

fn randn(shape: &[usize], std: f32, seed: u64) -> Tensor {
    Tensor::randn(shape, std, &mut Rng::new(seed))
}

fn one() -> Tensor {
    Tensor::scalar(1.0, Device::Cpu).unwrap()
}

fn softplus(z: f64) -> f64 {
    (1.0 + z.exp()).ln()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn assert_close(got: f32, want: f64, tol: f64) {
    assert!((got as f64 - want).abs() <= tol * want.abs().max(1e-6), "{got} vs {want}");
}

/// Identities 0..ids, `per` samples each: N(0, 3^2) identity centers plus N(0, 1) noise, so
/// distances between identities are well apart from those within one.
fn clustered(ids: usize, per: usize, d: usize, seed: u64) -> (Tensor, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let centers: Vec<f32> = (0..ids * d).map(|_| 3.0 * rng.normal() as f32).collect();
    let labels: Vec<usize> = (0..ids * per).map(|i| i % ids).collect();
    let x = labels.iter().flat_map(|&y| (0..d).map(|c| centers[y * d + c] + rng.normal() as f32).collect::<Vec<_>>()).collect();
    (Tensor::from_vec(x, &[ids * per, d]).unwrap(), labels)
}

// ---------------------------------------------------------------- cross entropy

fn naive_ce(z: &Tensor, labels: &[usize], eps: f32) -> f64 {
    let eps = eps as f64;
    let k = z.shape()[1];
    let zv = z.to_vec().unwrap();
    let mut total = 0.0;
    for (row, &y) in zv.chunks(k).zip(labels) {
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        for (j, &v) in row.iter().enumerate() {
            let q = (1.0 - eps) * (j == y) as u8 as f64 + eps / k as f64;
            total -= q * (v as f64 - lse);
        }
    }
    total / labels.len() as f64
}

#[test]
fn cross_entropy_matches_naive() {
    for (seed, &(n, k)) in [(5, 7), (64, 751)].iter().enumerate() {
        let z = randn(&[n, k], 3.0, seed as u64);
        let labels: Vec<usize> = (0..n).map(|i| (i * 37 + 3) % k).collect();
        for eps in [0.0, 0.1] {
            let got = cross_entropy_label_smooth_forward(&z, &labels, eps).unwrap();
            assert_eq!(got.shape(), [1]);
            assert_close(got.item().unwrap(), naive_ce(&z, &labels, eps), 1e-6);
        }
    }
}

#[test]
fn cross_entropy_hand_values() {
    // K = 2, logits [0, 0]: log softmax = [-ln 2, -ln 2] and q sums to 1, so the loss is ln 2
    // whatever the smoothing.
    let z = Tensor::from_vec(vec![0.0, 0.0], &[1, 2]).unwrap();
    for eps in [0.0, 0.1, 0.5] {
        assert_close(cross_entropy_label_smooth_forward(&z, &[1], eps).unwrap().item().unwrap(), 2f64.ln(), 1e-7);
    }
    // Logits [0, ln 3], label 1, eps 0.2: softmax [1/4, 3/4], q = [0.1, 0.9], so the loss is
    // 0.1 ln 4 + 0.9 ln(4/3). Row 2 (logits [ln 3, 0], label 0) is the same case mirrored.
    let z = Tensor::from_vec(vec![0.0, 3f32.ln(), 3f32.ln(), 0.0], &[2, 2]).unwrap();
    let want = 0.1 * 4f64.ln() + 0.9 * (4.0f64 / 3.0).ln();
    assert_close(cross_entropy_label_smooth_forward(&z, &[1, 0], 0.2).unwrap().item().unwrap(), want, 1e-6);
    // Its gradient: (softmax - q) / N = ([0.25, 0.75] - [0.1, 0.9]) / 2 for row 1.
    let dz = cross_entropy_label_smooth_backward(&one(), &z, &[1, 0], 0.2).unwrap().to_vec().unwrap();
    assert!(max_rel_err(&dz, &[0.075, -0.075, -0.075, 0.075], 1e-6) < 1e-5, "{dz:?}");
}

#[test]
fn cross_entropy_backward() {
    let (z, labels) = (randn(&[4, 6], 2.0, 1), [5, 0, 2, 2]);
    gradcheck(std::slice::from_ref(&z), |t, v| t.cross_entropy_label_smooth(&v[0], &labels, 0.1), GradCheck::default()).unwrap();
    // Against (softmax - q) / N * dloss directly, on the training size.
    let (n, k) = (64, 751);
    let z = randn(&[n, k], 3.0, 2);
    let labels: Vec<usize> = (0..n).map(|i| (i * 13) % k).collect();
    let dz = cross_entropy_label_smooth_backward(&Tensor::scalar(0.5, Device::Cpu).unwrap(), &z, &labels, 0.1).unwrap();
    let zv = z.to_vec().unwrap();
    let mut want = Vec::new();
    for (row, &y) in zv.chunks(k).zip(&labels) {
        let s: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        for (j, &v) in row.iter().enumerate() {
            // eps reaches the op as an f32: 0.1f32 is 0.10000000149.
            let eps = 0.1f32 as f64;
            let q = (1.0 - eps) * (j == y) as u8 as f64 + eps / k as f64;
            want.push((0.5 * ((v as f64).exp() / s - q) / n as f64) as f32);
        }
    }
    assert!(max_rel_err(&dz.to_vec().unwrap(), &want, 1e-9) < 1e-5);
}

#[test]
fn cross_entropy_errors() {
    let z = randn(&[3, 4], 1.0, 0);
    let e = cross_entropy_label_smooth_forward(&z, &[0, 4, 1], 0.1).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "cross_entropy_label_smooth", .. }));
    assert!(e.to_string().contains("label 4"), "{e}");
    let e = cross_entropy_label_smooth_forward(&z, &[0, 1], 0.1).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "cross_entropy_label_smooth", .. }));
    assert!(e.to_string().contains("2 labels"), "{e}");
    assert!(cross_entropy_label_smooth_backward(&one(), &z, &[0], 0.1).is_err());
    let bad_seed = Tensor::zeros(&[2], Device::Cpu).unwrap();
    assert!(matches!(
        cross_entropy_label_smooth_backward(&bad_seed, &z, &[0, 1, 2], 0.1),
        Err(Error::Shape { op: "cross_entropy_label_smooth_backward", .. })
    ));
}

// ---------------------------------------------------------------- triplet

/// Distances computed directly as |x_i - x_j| in f64, clamped like the op; ties to the first index.
fn naive_triplet(x: &Tensor, labels: &[usize]) -> f64 {
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let xv = x.to_vec().unwrap();
    let dist = |i: usize, j: usize| (0..d).map(|c| (xv[i * d + c] as f64 - xv[j * d + c] as f64).powi(2)).sum::<f64>().max(1e-12).sqrt();
    let mut total = 0.0;
    for i in 0..n {
        let (mut ap, mut an) = (f64::NEG_INFINITY, f64::INFINITY);
        for j in 0..n {
            if labels[j] == labels[i] {
                ap = ap.max(dist(i, j));
            } else {
                an = an.min(dist(i, j));
            }
        }
        total += softplus(ap - an);
    }
    total / n as f64
}

#[test]
fn triplet_matches_naive() {
    // 16 identities x 4 images of 2048-d features is the training batch of v1.
    for (seed, &(ids, per, d)) in [(3, 2, 5), (4, 4, 64), (16, 4, 2048)].iter().enumerate() {
        let (x, labels) = clustered(ids, per, d, seed as u64);
        let got = triplet_soft_margin_forward(&x, &labels).unwrap();
        assert_eq!(got.shape(), [1]);
        assert_close(got.item().unwrap(), naive_triplet(&x, &labels), 1e-5);
    }
    // Random (not clustered) features: hard negatives can be closer than hard positives.
    let x = randn(&[12, 10], 1.0, 9);
    let labels: Vec<usize> = (0..12).map(|i| i % 3).collect();
    assert_close(triplet_soft_margin_forward(&x, &labels).unwrap().item().unwrap(), naive_triplet(&x, &labels), 1e-5);
}

#[test]
fn triplet_hand_value_points_on_a_line() {
    // Points t = 0, 1, 3, 7 on a line (second coordinate fixed at 5), labels [0, 0, 1, 1].
    // Anchor 0: d_ap = d01 = 1, d_an = min(d02, d03) = 3  -> softplus(-2)
    // Anchor 1: d_ap = d10 = 1, d_an = min(d12, d13) = 2  -> softplus(-1)
    // Anchor 2: d_ap = d23 = 4, d_an = min(d20, d21) = 2  -> softplus(2)
    // Anchor 3: d_ap = d32 = 4, d_an = min(d30, d31) = 6  -> softplus(-2)
    let x = Tensor::from_vec(vec![0.0, 5.0, 1.0, 5.0, 3.0, 5.0, 7.0, 5.0], &[4, 2]).unwrap();
    let labels = [0, 0, 1, 1];
    let want = (2.0 * softplus(-2.0) + softplus(-1.0) + softplus(2.0)) / 4.0;
    assert_close(triplet_soft_margin_forward(&x, &labels).unwrap().item().unwrap(), want, 1e-6);
    // dL/dt: anchor i adds s_i (d_ap - d_an)' with s_i = sigmoid(d_ap - d_an) / 4, where
    // d|t_i - t_j|/dt_i = sign(t_i - t_j):
    //   anchor 0 (d01 - d02): t1 += s0, t2 -= s0 (t0: -1 + 1 = 0)
    //   anchor 1 (d10 - d12): t1 += 2 s1, t0 -= s1, t2 -= s1
    //   anchor 2 (d23 - d21): t2 -= 2 s2, t3 += s2, t1 += s2
    //   anchor 3 (d32 - d31): t2 -= s3, t1 += s3 (t3: 1 - 1 = 0)
    let (s0, s1, s2, s3) = (sigmoid(-2.0) / 4.0, sigmoid(-1.0) / 4.0, sigmoid(2.0) / 4.0, sigmoid(-2.0) / 4.0);
    let dt = [-s1, s0 + 2.0 * s1 + s2 + s3, -s0 - s1 - 2.0 * s2 - s3, s2];
    let dx = triplet_soft_margin_backward(&one(), &x, &labels).unwrap().to_vec().unwrap();
    let want: Vec<f32> = dt.iter().flat_map(|&g| [g as f32, 0.0]).collect();
    assert!(max_rel_err(&dx, &want, 1e-6) < 1e-5, "{dx:?} vs {want:?}");
}

#[test]
fn triplet_clamped_and_tied_pairs_pass_no_gradient() {
    // Rows 0 and 1 coincide: d01 = d00 = sqrt(1e-12) with the clamp active, so anchor 0's (and 1's)
    // hardest positive is itself (first index on the tie) and carries no gradient. Anchor 2 is
    // alone in its class (positive = itself, clamped) and ties between negatives 0 and 1 at
    // distance 5; the first, row 0, is taken. With s = sigmoid(1e-6 - 5) / 3 and u = (0.8, 0.6)
    // the unit vector from rows 0/1 to row 2, each selected negative pair (i, j) adds s u to the
    // row nearer the origin: dx0 = 2 s u (anchors 0, 2), dx1 = s u, dx2 = -3 s u.
    let x = Tensor::from_vec(vec![1.0, 2.0, 1.0, 2.0, 5.0, 5.0], &[3, 2]).unwrap();
    let labels = [0, 0, 1];
    let loss = triplet_soft_margin_forward(&x, &labels).unwrap().item().unwrap();
    assert_close(loss, softplus(1e-6 - 5.0), 1e-5);
    let s = (sigmoid(1e-6 - 5.0) / 3.0) as f32;
    let dx = triplet_soft_margin_backward(&one(), &x, &labels).unwrap().to_vec().unwrap();
    let want = [2.0 * s * 0.8, 2.0 * s * 0.6, s * 0.8, s * 0.6, -3.0 * s * 0.8, -3.0 * s * 0.6];
    assert!(max_rel_err(&dx, &want, 1e-9) < 1e-5, "{dx:?} vs {want:?}");
}

#[test]
fn triplet_gradcheck() {
    let (x, labels) = clustered(4, 3, 8, 21);
    gradcheck(&[x], |t, v| t.triplet_soft_margin(&v[0], &labels), GradCheck::default()).unwrap();
    // A singleton class: its anchor's positive is itself (clamped, constant under perturbation).
    let (x, mut labels) = clustered(3, 3, 6, 22);
    labels[0] = 7;
    gradcheck(&[x], |t, v| t.triplet_soft_margin(&v[0], &labels), GradCheck::default()).unwrap();
}

#[test]
fn triplet_errors() {
    let x = randn(&[4, 3], 1.0, 0);
    assert!(matches!(triplet_soft_margin_forward(&x, &[0, 1, 0]), Err(Error::Shape { op: "triplet_soft_margin", .. })));
    assert!(matches!(triplet_soft_margin_forward(&x, &[2, 2, 2, 2]), Err(Error::Shape { op: "triplet_soft_margin", .. })));
    assert!(matches!(triplet_soft_margin_backward(&one(), &x, &[0, 1]), Err(Error::Shape { op: "triplet_soft_margin_backward", .. })));
}

// ---------------------------------------------------------------- center loss

fn naive_center(x: &Tensor, labels: &[usize], c: &Tensor) -> f64 {
    let (d, k) = (x.shape()[1], c.shape()[0]);
    let (xv, cv) = (x.to_vec().unwrap(), c.to_vec().unwrap());
    let vals: Vec<f64> = labels
        .iter()
        .enumerate()
        .filter(|&(_, &y)| y < k)
        .map(|(i, &y)| (0..d).map(|t| (xv[i * d + t] as f64 - cv[y * d + t] as f64).powi(2)).sum::<f64>().clamp(1e-12, 1e12))
        .collect();
    vals.iter().sum::<f64>() / vals.len() as f64
}

#[test]
fn center_matches_naive() {
    // Labels 3 and 6 have no center (K = 3) and are dropped from the mean.
    let (x, c) = (randn(&[8, 16], 1.0, 1), randn(&[3, 16], 1.0, 2));
    let labels = [0, 1, 2, 3, 0, 6, 2, 2];
    let got = center_loss_forward(&x, &labels, &c).unwrap();
    assert_eq!(got.shape(), [1]);
    assert_close(got.item().unwrap(), naive_center(&x, &labels, &c), 1e-6);
    let (x, c) = (randn(&[64, 2048], 1.0, 3), randn(&[751, 2048], 1.0, 4));
    let labels: Vec<usize> = (0..64).map(|i| (i / 4) * 50).collect();
    assert_close(center_loss_forward(&x, &labels, &c).unwrap().item().unwrap(), naive_center(&x, &labels, &c), 1e-6);
}

#[test]
fn center_hand_values() {
    // Centers c0 = (0, 0), c1 = (1, 1). Samples: (1, 0) label 0 -> 1; (0, 2) label 1 -> 1 + 1 = 2;
    // (3, 3) label 5 -> dropped; (1, 1) label 1 -> 0, clamped to 1e-12. Mean over 3: 1.
    let x = Tensor::from_vec(vec![1.0, 0.0, 0.0, 2.0, 3.0, 3.0, 1.0, 1.0], &[4, 2]).unwrap();
    let c = Tensor::from_vec(vec![0.0, 0.0, 1.0, 1.0], &[2, 2]).unwrap();
    let labels = [0, 1, 5, 1];
    assert_close(center_loss_forward(&x, &labels, &c).unwrap().item().unwrap(), (3.0 + 1e-12) / 3.0, 1e-7);
    // dx_i = 2 (x_i - c_y) / 3 where the sample counts and the clamp is inactive; dc is its negative
    // summed per class.
    let (dx, dc) = center_loss_backward(&one(), &x, &labels, &c).unwrap();
    let t = 2.0 / 3.0;
    assert!(max_rel_err(&dx.to_vec().unwrap(), &[t, 0.0, -t, t, 0.0, 0.0, 0.0, 0.0], 1e-9) < 1e-6);
    assert!(max_rel_err(&dc.to_vec().unwrap(), &[-t, 0.0, t, -t], 1e-9) < 1e-6);
    // No sample has a center: the loss is 0 and nothing gets a gradient.
    assert_eq!(center_loss_forward(&x, &[2, 3, 4, 5], &c).unwrap().item().unwrap(), 0.0);
    let (dx, dc) = center_loss_backward(&one(), &x, &[2, 3, 4, 5], &c).unwrap();
    assert!(dx.to_vec().unwrap().iter().chain(&dc.to_vec().unwrap()).all(|&v| v == 0.0));
}

#[test]
fn center_gradcheck() {
    let labels = [0, 2, 2, 9, 1];
    let inputs = [randn(&[5, 6], 1.0, 5), randn(&[3, 6], 1.0, 6)];
    gradcheck(&inputs, |t, v| t.center_loss(&v[0], &labels, &v[1]), GradCheck::default()).unwrap();
}

#[test]
fn center_errors() {
    let (x, c) = (randn(&[4, 3], 1.0, 0), randn(&[5, 3], 1.0, 1));
    assert!(matches!(center_loss_forward(&x, &[0, 1, 2], &c), Err(Error::Shape { op: "center_loss", .. })));
    assert!(matches!(center_loss_forward(&x, &[0, 1, 2, 3], &randn(&[5, 4], 1.0, 2)), Err(Error::Shape { op: "center_loss", .. })));
    assert!(matches!(center_loss_backward(&one(), &x, &[0], &c), Err(Error::Shape { op: "center_loss_backward", .. })));
}

#[test]
fn losses_are_f32_only() {
    let x = randn(&[4, 6], 1.0, 74).to_dtype(crate::tensor::DType::BF16).unwrap();
    assert!(matches!(cross_entropy_label_smooth_forward(&x, &[0, 1, 2, 3], 0.1), Err(Error::DType { .. })));
    assert!(matches!(triplet_soft_margin_forward(&x, &[0, 0, 1, 1]), Err(Error::DType { .. })));
}
