use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::tape::Tape;
use crate::testing::{gradcheck, norm_rel_err, GradCheck};

/// (n, c, spatial size) of an [N, C] or [N, C, H, W] shape.
fn dims(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

/// Batch mean and biased variance per channel, by f64 two-pass loops.
fn batch_moments(x: &[f64], shape: &[usize]) -> Vec<(f64, f64)> {
    let (n, c, hw) = dims(shape);
    let values = |ch: usize| (0..n).flat_map(move |i| (0..hw).map(move |j| (i * c + ch) * hw + j));
    (0..c)
        .map(|ch| {
            let m = (n * hw) as f64;
            let mean = values(ch).map(|k| x[k]).sum::<f64>() / m;
            let var = values(ch).map(|k| (x[k] - mean).powi(2)).sum::<f64>() / m;
            (mean, var)
        })
        .collect()
}

/// BatchNorm in f64: training mode normalises with the batch moments, eval mode with `running`.
fn reference_forward(x: &[f64], shape: &[usize], gamma: &[f64], beta: &[f64], running: Option<(&[f64], &[f64])>) -> Vec<f64> {
    let (_, c, hw) = dims(shape);
    let moments = match running {
        Some((rm, rv)) => rm.iter().copied().zip(rv.iter().copied()).collect(),
        None => batch_moments(x, shape),
    };
    let eps = BN_EPS as f64;
    (0..x.len())
        .map(|k| {
            let ch = (k / hw) % c;
            let (mean, var) = moments[ch];
            (x[k] - mean) / (var + eps).sqrt() * gamma[ch] + beta[ch]
        })
        .collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec().unwrap().into_iter().map(f64::from).collect()
}

fn assert_close(got: &Tensor, want: &[f64], tol: f64, what: &str) {
    let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    let err = norm_rel_err(&got.to_vec().unwrap(), &want32);
    assert!(err < tol, "{what}: norm-wise relative error {err:.2e} >= {tol:.0e}");
}

/// Gradients of sum(BN(x, gamma, beta) * r) by f64 central differences of `reference_forward`:
/// an independent, precise check of the backward formulas.
fn reference_grads(x: &[f64], shape: &[usize], gamma: &[f64], beta: &[f64], r: &[f64], running: Option<(&[f64], &[f64])>) -> [Vec<f64>; 3] {
    let phi =
        |x: &[f64], g: &[f64], b: &[f64]| -> f64 { reference_forward(x, shape, g, b, running).iter().zip(r).map(|(y, r)| y * r).sum() };
    let h = 1e-5;
    let diff = |which: usize, len: usize| -> Vec<f64> {
        (0..len)
            .map(|j| {
                let mut args = [x.to_vec(), gamma.to_vec(), beta.to_vec()];
                args[which][j] += h;
                let up = phi(&args[0], &args[1], &args[2]);
                args[which][j] -= 2.0 * h;
                let down = phi(&args[0], &args[1], &args[2]);
                (up - down) / (2.0 * h)
            })
            .collect()
    };
    [diff(0, x.len()), diff(1, gamma.len()), diff(2, beta.len())]
}

struct Inputs {
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// Channels with different offsets and scales, so that a mix-up of channels shows.
fn inputs(shape: &[usize], rng: &mut Rng) -> Inputs {
    let (_, c, hw) = dims(shape);
    let offsets: Vec<f64> = (0..c).map(|_| rng.uniform_range(-3.0, 3.0)).collect();
    let scales: Vec<f64> = (0..c).map(|_| rng.uniform_range(0.5, 2.0)).collect();
    let data = (0..shape.iter().product::<usize>()).map(|k| (offsets[(k / hw) % c] + scales[(k / hw) % c] * rng.normal()) as f32).collect();
    Inputs {
        x: Tensor::from_vec(data, shape).unwrap(),
        gamma: Tensor::rand_uniform(&[c], 0.5, 1.5, rng),
        beta: Tensor::randn(&[c], 1.0, rng),
        running_mean: Tensor::randn(&[c], 1.0, rng),
        running_var: Tensor::rand_uniform(&[c], 0.5, 2.0, rng),
    }
}

// (Not two values per channel: both normalise to ±1 and the input gradient vanishes, leaving only rounding.)
const SHAPES: [&[usize]; 4] = [&[2, 3, 4, 5], &[5, 4, 1, 3], &[6, 5], &[3, 4]];

#[test]
fn train_forward_and_backward_match_f64_reference() {
    let mut rng = Rng::new(1);
    for shape in SHAPES {
        let t = inputs(shape, &mut rng);
        let (y, stats) = batchnorm_forward_train(&t.x, &t.gamma, &t.beta, BN_EPS).unwrap();
        let (x, g, b) = (f64s(&t.x), f64s(&t.gamma), f64s(&t.beta));
        assert_close(&y, &reference_forward(&x, shape, &g, &b, None), 1e-6, &format!("{shape:?} y"));
        let moments = batch_moments(&x, shape);
        let m = (dims(shape).0 * dims(shape).2) as f64;
        let mean: Vec<f64> = moments.iter().map(|&(mu, _)| mu).collect();
        let invstd: Vec<f64> = moments.iter().map(|&(_, v)| 1.0 / (v + BN_EPS as f64).sqrt()).collect();
        let var_unbiased: Vec<f64> = moments.iter().map(|&(_, v)| v * m / (m - 1.0)).collect();
        assert_close(&stats.mean, &mean, 1e-6, &format!("{shape:?} mean"));
        assert_close(&stats.invstd, &invstd, 1e-6, &format!("{shape:?} invstd"));
        assert_close(&stats.var_unbiased, &var_unbiased, 1e-6, &format!("{shape:?} unbiased var"));

        let dy = Tensor::randn(shape, 1.0, &mut rng);
        let (dx, dgamma, dbeta) = batchnorm_backward_train(&dy, &t.x, &t.gamma, &stats).unwrap();
        let [rdx, rdg, rdb] = reference_grads(&x, shape, &g, &b, &f64s(&dy), None);
        assert_close(&dx, &rdx, 1e-5, &format!("{shape:?} dx"));
        assert_close(&dgamma, &rdg, 1e-5, &format!("{shape:?} dgamma"));
        assert_close(&dbeta, &rdb, 1e-5, &format!("{shape:?} dbeta"));
    }
}

#[test]
fn eval_forward_and_backward_match_f64_reference() {
    let mut rng = Rng::new(2);
    for shape in SHAPES {
        let t = inputs(shape, &mut rng);
        let y = batchnorm_forward_eval(&t.x, &t.gamma, &t.beta, &t.running_mean, &t.running_var, BN_EPS).unwrap();
        let (x, g, b) = (f64s(&t.x), f64s(&t.gamma), f64s(&t.beta));
        let (rm, rv) = (f64s(&t.running_mean), f64s(&t.running_var));
        assert_close(&y, &reference_forward(&x, shape, &g, &b, Some((&rm, &rv))), 1e-6, &format!("{shape:?} y"));

        let dy = Tensor::randn(shape, 1.0, &mut rng);
        let (dx, dgamma, dbeta) = batchnorm_backward_eval(&dy, &t.x, &t.gamma, &t.running_mean, &t.running_var, BN_EPS).unwrap();
        let [rdx, rdg, rdb] = reference_grads(&x, shape, &g, &b, &f64s(&dy), Some((&rm, &rv)));
        assert_close(&dx, &rdx, 1e-5, &format!("{shape:?} dx"));
        assert_close(&dgamma, &rdg, 1e-5, &format!("{shape:?} dgamma"));
        assert_close(&dbeta, &rdb, 1e-5, &format!("{shape:?} dbeta"));
    }
}

/// Per channel, the beta that puts the ReLU's kink in the middle of the widest gap between the
/// central values of gamma * xhat, so that finite differences do not cross it and both signs occur.
fn beta_off_the_kink(t: &Inputs, shape: &[usize]) -> Tensor {
    let (n, c, hw) = dims(shape);
    let zero = vec![0.0; c];
    let pre = reference_forward(&f64s(&t.x), shape, &f64s(&t.gamma), &zero, None);
    let beta = (0..c)
        .map(|ch| {
            let mut v: Vec<f64> = (0..n).flat_map(|i| (0..hw).map(move |j| (i * c + ch) * hw + j)).map(|k| pre[k]).collect();
            v.sort_by(f64::total_cmp);
            let (lo, hi) = (v.len() / 5, v.len() - v.len() / 5 - 1);
            let k = (lo..hi.max(lo + 1)).max_by(|&a, &b| (v[a + 1] - v[a]).total_cmp(&(v[b + 1] - v[b]))).expect("at least 3 values");
            -(v[k] + v[k + 1]) as f32 / 2.0
        })
        .collect();
    Tensor::from_vec(beta, &[c]).unwrap()
}

/// relu(batchnorm(x)) fused: the output is max(0, BN(x)), and the gradients of sum(y * r) are those
/// of sum(BN(x) * r') with r' = r where BN(x) > 0, else 0.
#[test]
fn fused_relu_matches_f64_reference() {
    let mut rng = Rng::new(4);
    for shape in SHAPES {
        let mut t = inputs(shape, &mut rng);
        t.beta = beta_off_the_kink(&t, shape);
        let (y, stats) = batchnorm_relu_forward_train(&t.x, &t.gamma, &t.beta, BN_EPS).unwrap();
        let (x, g, b) = (f64s(&t.x), f64s(&t.gamma), f64s(&t.beta));
        let pre = reference_forward(&x, shape, &g, &b, None);
        assert!(pre.iter().any(|&v| v < 0.0) && pre.iter().any(|&v| v > 0.0), "{shape:?}: the mask must matter");
        let want: Vec<f64> = pre.iter().map(|&v| v.max(0.0)).collect();
        assert_close(&y, &want, 1e-6, &format!("{shape:?} y"));
        assert_close(&stats.mean, &batch_moments(&x, shape).iter().map(|&(mu, _)| mu).collect::<Vec<_>>(), 1e-6, "mean");

        let dy = Tensor::randn(shape, 1.0, &mut rng);
        let (dx, dgamma, dbeta) = batchnorm_relu_backward_train(&dy, &y, &t.x, &t.gamma, &stats).unwrap();
        let masked: Vec<f64> = f64s(&dy).iter().zip(&pre).map(|(&d, &p)| if p > 0.0 { d } else { 0.0 }).collect();
        let [rdx, rdg, rdb] = reference_grads(&x, shape, &g, &b, &masked, None);
        assert_close(&dx, &rdx, 1e-5, &format!("{shape:?} dx"));
        assert_close(&dgamma, &rdg, 1e-5, &format!("{shape:?} dgamma"));
        assert_close(&dbeta, &rdb, 1e-5, &format!("{shape:?} dbeta"));

        let leaves = [t.x.clone(), t.gamma.clone(), t.beta.clone()];
        gradcheck(&leaves, |tape: &mut Tape, v| Ok(tape.batchnorm_relu_train(&v[0], &v[1], &v[2], BN_EPS)?.0), GradCheck::default())
            .unwrap_or_else(|e| panic!("fused train {shape:?}: {e}"));
    }
    let t = inputs(&[2, 3, 4, 5], &mut rng);
    let (y, stats) = batchnorm_relu_forward_train(&t.x, &t.gamma, &t.beta, BN_EPS).unwrap();
    let e = batchnorm_relu_backward_train(&y, &y.reshape(&[2, 3, 20]).unwrap(), &t.x, &t.gamma, &stats).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "batchnorm_relu_backward_train", .. }), "{e}");
}

#[test]
fn tape_gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    for shape in SHAPES {
        let t = inputs(shape, &mut rng);
        let leaves = [t.x.clone(), t.gamma.clone(), t.beta.clone()];
        gradcheck(&leaves, |tape: &mut Tape, v| Ok(tape.batchnorm_train(&v[0], &v[1], &v[2], BN_EPS)?.0), GradCheck::default())
            .unwrap_or_else(|e| panic!("train {shape:?}: {e}"));
        let (rm, rv) = (t.running_mean.clone(), t.running_var.clone());
        gradcheck(&leaves, |tape: &mut Tape, v| tape.batchnorm_eval(&v[0], &v[1], &v[2], &rm, &rv, BN_EPS), GradCheck::default())
            .unwrap_or_else(|e| panic!("eval {shape:?}: {e}"));
    }
}

/// Also at sizes where the planes are split over threads in batches.
#[test]
fn running_statistics_follow_the_batch() {
    let mut rng = Rng::new(4);
    for shape in [&[4, 3, 2, 5][..], &[7, 6], &[4, 8, 16, 8], &[16, 600]] {
        let mut t = inputs(shape, &mut rng);
        let (rm0, rv0) = (f64s(&t.running_mean), f64s(&t.running_var));
        let (y, stats) = batchnorm_forward_train(&t.x, &t.gamma, &t.beta, BN_EPS).unwrap();
        let want_y = reference_forward(&f64s(&t.x), shape, &f64s(&t.gamma), &f64s(&t.beta), None);
        assert_close(&y, &want_y, 1e-6, &format!("{shape:?} y"));
        batchnorm_update_running(&mut t.running_mean, &mut t.running_var, &stats, BN_MOMENTUM).unwrap();
        let m = (dims(shape).0 * dims(shape).2) as f64;
        let moments = batch_moments(&f64s(&t.x), shape);
        let want_mean: Vec<f64> = moments.iter().zip(&rm0).map(|(&(mu, _), r)| 0.9 * r + 0.1 * mu).collect();
        let want_var: Vec<f64> = moments.iter().zip(&rv0).map(|(&(_, v), r)| 0.9 * r + 0.1 * v * m / (m - 1.0)).collect();
        assert_close(&t.running_mean, &want_mean, 1e-6, &format!("{shape:?} running mean"));
        assert_close(&t.running_var, &want_var, 1e-6, &format!("{shape:?} running var"));
    }
}

/// One channel holding 1, 2, 3, 4: mean 2.5, biased variance 1.25, unbiased 5/3.
#[test]
fn hand_computed_example() {
    for shape in [&[4, 1][..], &[1, 1, 2, 2], &[2, 1, 1, 2]] {
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], shape).unwrap();
        let (gamma, beta) = (Tensor::from_vec(vec![2.0], &[1]).unwrap(), Tensor::from_vec(vec![0.5], &[1]).unwrap());
        let (y, stats) = batchnorm_forward_train(&x, &gamma, &beta, BN_EPS).unwrap();
        let close = |a: f32, b: f64, what: &str| assert!((a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0), "{shape:?} {what}: {a} vs {b}");
        close(stats.mean.item().unwrap(), 2.5, "mean");
        close(stats.var_unbiased.item().unwrap(), 5.0 / 3.0, "unbiased variance");
        let invstd = 1.0 / (1.25f64 + 1e-5).sqrt();
        close(stats.invstd.item().unwrap(), invstd, "invstd");
        for (v, want) in y.to_vec().unwrap().into_iter().zip([-1.5, -0.5, 0.5, 1.5]) {
            close(v, 2.0 * want * invstd + 0.5, "y");
        }
        let mut rm = Tensor::zeros(&[1], Device::Cpu).unwrap();
        let mut rv = Tensor::ones(&[1], Device::Cpu).unwrap();
        batchnorm_update_running(&mut rm, &mut rv, &stats, BN_MOMENTUM).unwrap();
        close(rm.item().unwrap(), 0.25, "running mean");
        close(rv.item().unwrap(), 0.9 + 0.1 * 5.0 / 3.0, "running var");
    }
}

#[test]
fn shape_errors_name_the_op() {
    let mut rng = Rng::new(5);
    let t = inputs(&[2, 3, 2, 2], &mut rng);
    let wrong = Tensor::randn(&[4], 1.0, &mut rng);
    let expect = |r: std::result::Result<(), Error>, want_op: &str| match r {
        Err(Error::Shape { op, msg }) => assert_eq!(op, want_op, "{msg}"),
        other => panic!("{want_op}: expected a shape error, got {other:?}"),
    };
    expect(batchnorm_forward_train(&t.x, &wrong, &t.beta, BN_EPS).map(drop), "batchnorm_forward_train");
    expect(batchnorm_forward_train(&t.x, &t.gamma, &wrong, BN_EPS).map(drop), "batchnorm_forward_train");
    let err = batchnorm_forward_train(&t.x, &wrong, &t.beta, BN_EPS).unwrap_err().to_string();
    assert!(err.contains("[4]") && err.contains("3 channels"), "{err}");
    expect(batchnorm_forward_eval(&t.x, &wrong, &t.beta, &t.running_mean, &t.running_var, BN_EPS).map(drop), "batchnorm_forward_eval");
    expect(batchnorm_forward_eval(&t.x, &t.gamma, &t.beta, &t.running_mean, &wrong, BN_EPS).map(drop), "batchnorm_forward_eval");
    let (_, stats) = batchnorm_forward_train(&t.x, &t.gamma, &t.beta, BN_EPS).unwrap();
    expect(batchnorm_backward_train(&t.x, &t.x, &wrong, &stats).map(drop), "batchnorm_backward_train");
    expect(batchnorm_backward_train(&wrong, &t.x, &t.gamma, &stats).map(drop), "batchnorm_backward_train");
    let x3 = Tensor::randn(&[2, 3, 4], 1.0, &mut rng);
    expect(batchnorm_forward_train(&x3, &t.gamma, &t.beta, BN_EPS).map(drop), "batchnorm_forward_train");
    // A single value per channel has no batch variance.
    let x1 = Tensor::randn(&[1, 3], 1.0, &mut rng);
    expect(batchnorm_forward_train(&x1, &t.gamma, &t.beta, BN_EPS).map(drop), "batchnorm_forward_train");
    let (mut rm, mut rv) = (wrong.clone(), t.running_var.clone());
    expect(batchnorm_update_running(&mut rm, &mut rv, &stats, BN_MOMENTUM), "batchnorm_update_running");
}

#[test]
fn bf16_batchnorm_keeps_parameters_and_statistics_f32() {
    use crate::tensor::DType::{BF16, F32};
    use crate::testing::check_bf16_op;
    let mut rng = Rng::new(43);
    for shape in [vec![4, 3, 5, 6], vec![8, 5]] {
        let c = shape[1];
        let x = Tensor::randn(&shape, 2.0, &mut rng);
        let dy = Tensor::randn(&shape, 1.0, &mut rng);
        let gamma = Tensor::rand_uniform(&[c], 0.5, 1.5, &mut rng);
        let beta = Tensor::randn(&[c], 1.0, &mut rng);
        let mean = Tensor::randn(&[c], 1.0, &mut rng);
        let var = Tensor::rand_uniform(&[c], 0.5, 2.0, &mut rng);
        let stats_out = |y: Tensor, s: BnBatchStats| vec![y, s.mean, s.invstd, s.var_unbiased];
        let train = [BF16, F32, F32, F32];
        check_bf16_op("batchnorm_forward_train", &[x.clone(), gamma.clone(), beta.clone()], &[true, false, false], &train, |t| {
            let (y, s) = batchnorm_forward_train(&t[0], &t[1], &t[2], BN_EPS)?;
            Ok(stats_out(y, s))
        });
        check_bf16_op("batchnorm_relu_forward_train", &[x.clone(), gamma.clone(), beta.clone()], &[true, false, false], &train, |t| {
            let (y, s) = batchnorm_relu_forward_train(&t[0], &t[1], &t[2], BN_EPS)?;
            Ok(stats_out(y, s))
        });
        let grads = [BF16, F32, F32];
        let inputs = [dy.clone(), x.clone(), gamma.clone(), beta.clone()];
        check_bf16_op("batchnorm_backward_train", &inputs, &[true, true, false, false], &grads, |t| {
            let (_, s) = batchnorm_forward_train(&t[1], &t[2], &t[3], BN_EPS)?;
            let (dx, dg, db) = batchnorm_backward_train(&t[0], &t[1], &t[2], &s)?;
            Ok(vec![dx, dg, db])
        });
        check_bf16_op("batchnorm_relu_backward_train", &inputs, &[true, true, false, false], &grads, |t| {
            let (y, s) = batchnorm_relu_forward_train(&t[1], &t[2], &t[3], BN_EPS)?;
            let (dx, dg, db) = batchnorm_relu_backward_train(&t[0], &y, &t[1], &t[2], &s)?;
            Ok(vec![dx, dg, db])
        });
        let eval_inputs = [x.clone(), gamma.clone(), beta.clone(), mean.clone(), var.clone()];
        check_bf16_op("batchnorm_forward_eval", &eval_inputs, &[true, false, false, false, false], &[BF16], |t| {
            Ok(vec![batchnorm_forward_eval(&t[0], &t[1], &t[2], &t[3], &t[4], BN_EPS)?])
        });
        let inputs = [dy.clone(), x.clone(), gamma.clone(), mean.clone(), var.clone()];
        check_bf16_op("batchnorm_backward_eval", &inputs, &[true, true, false, false, false], &grads, |t| {
            let (dx, dg, db) = batchnorm_backward_eval(&t[0], &t[1], &t[2], &t[3], &t[4], BN_EPS)?;
            Ok(vec![dx, dg, db])
        });
    }
}
