use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::testing::{gradcheck, max_rel_err, GradCheck};

/// Distinct values 0.01 apart in random order: finite differences of step 1e-3 never change which
/// element is a window's maximum.
fn distinct(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.01).collect();
    rng.shuffle(&mut v);
    Tensor::from_vec(v, shape).unwrap()
}

/// Small integers: many ties, to pin down which maximum receives the gradient.
fn with_ties(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.below(3) as f32).collect(), shape).unwrap()
}

/// Max or average pooling by direct loops over every window position, padding included, with
/// the gradient of each window's first maximum (row-major scan) or spread over the window.
/// Returns (y, dx) for the seed `dy`.
fn reference_pool2d(x: &Tensor, dy: &[f32], cfg: Pool2dCfg, max: bool) -> (Vec<f32>, Vec<f32>) {
    let (n, c, h, w) = x.dims4("ref").unwrap();
    let xs = x.to_vec().unwrap();
    let oh = (h + 2 * cfg.padding - cfg.kernel) / cfg.stride + 1;
    let ow = (w + 2 * cfg.padding - cfg.kernel) / cfg.stride + 1;
    let mut y = Vec::new();
    let mut dx = vec![0.0f32; xs.len()];
    for p in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let d = dy[y.len()];
                let (mut best, mut best_i, mut sum) = (f32::NEG_INFINITY, None, 0.0f64);
                let mut inside = Vec::new();
                for a in 0..cfg.kernel {
                    for b in 0..cfg.kernel {
                        let iy = (oy * cfg.stride + a) as isize - cfg.padding as isize;
                        let ix = (ox * cfg.stride + b) as isize - cfg.padding as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue; // padding: -inf for max, 0 for the average
                        }
                        let i = (p * h + iy as usize) * w + ix as usize;
                        inside.push(i);
                        sum += xs[i] as f64;
                        if best_i.is_none() || xs[i] > best {
                            (best, best_i) = (xs[i], Some(i));
                        }
                    }
                }
                let count = (cfg.kernel * cfg.kernel) as f64;
                if max {
                    y.push(best);
                    dx[best_i.unwrap()] += d;
                } else {
                    y.push((sum / count) as f32);
                    for i in inside {
                        dx[i] += (d as f64 / count) as f32;
                    }
                }
            }
        }
    }
    (y, dx)
}

fn assert_close(got: &Tensor, want: &[f32], what: &str) {
    let err = max_rel_err(&got.to_vec().unwrap(), want, 1e-3);
    assert!(err < 1e-5, "{what}: max relative error {err:.2e}");
}

const CFGS: [(usize, usize, usize); 5] = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 2, 0), (4, 3, 2)];

#[test]
fn max_and_avg_pool_match_direct_loops() {
    let mut rng = Rng::new(1);
    for (k, s, p) in CFGS {
        let cfg = Pool2dCfg::new(k, s, p);
        for (shape, ties) in [([2, 3, 7, 6], false), ([1, 2, 5, 9], true), ([3, 2, 8, 4], true)] {
            let x = if ties { with_ties(&shape, &mut rng) } else { Tensor::randn(&shape, 1.0, &mut rng) };
            let what = format!("k{k} s{s} p{p} {shape:?}");
            let y = max_pool2d_forward(&x, cfg).unwrap();
            let dy = Tensor::randn(y.shape(), 1.0, &mut rng);
            let (want_y, want_dx) = reference_pool2d(&x, &dy.to_vec().unwrap(), cfg, true);
            assert_close(&y, &want_y, &format!("max {what}"));
            assert_close(&max_pool2d_backward(&dy, &x, cfg).unwrap(), &want_dx, &format!("max backward {what}"));
            let y = avg_pool2d_forward(&x, cfg).unwrap();
            let (want_y, want_dx) = reference_pool2d(&x, &dy.to_vec().unwrap(), cfg, false);
            assert_close(&y, &want_y, &format!("avg {what}"));
            assert_close(&avg_pool2d_backward(&dy, x.shape(), cfg).unwrap(), &want_dx, &format!("avg backward {what}"));
        }
    }
}

/// Hand-checked values: padding counts in the average's divisor, ties go to the first element,
/// -inf padding never wins over negative values, NaNs propagate.
#[test]
fn padding_and_ties_by_hand() {
    let x = Tensor::from_vec(vec![-1.0, -2.0, -3.0, -4.0], &[1, 1, 2, 2]).unwrap();
    let cfg = Pool2dCfg::new(3, 1, 1);
    assert_eq!(max_pool2d_forward(&x, cfg).unwrap().to_vec().unwrap(), vec![-1.0; 4]);
    assert_eq!(avg_pool2d_forward(&x, cfg).unwrap().to_vec().unwrap(), vec![-10.0 / 9.0; 4]);
    let ties = Tensor::from_vec(vec![1.0, 5.0, 5.0, 5.0], &[1, 1, 2, 2]).unwrap();
    let dy = Tensor::ones(&[1, 1, 1, 1], Device::Cpu).unwrap();
    let dx = max_pool2d_backward(&dy, &ties, Pool2dCfg::new(2, 2, 0)).unwrap();
    assert_eq!(dx.to_vec().unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
    assert_eq!(global_max_pool_backward(&dy, &ties).unwrap().to_vec().unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
    // A NaN wins and keeps winning against larger numbers; PyTorch's scan ends on the last NaN.
    let nans = Tensor::from_vec(vec![f32::NAN, 7.0, f32::NAN, 9.0], &[1, 1, 2, 2]).unwrap();
    assert!(max_pool2d_forward(&nans, Pool2dCfg::new(2, 2, 0)).unwrap().item().unwrap().is_nan());
    assert!(global_max_pool_forward(&nans).unwrap().item().unwrap().is_nan());
    assert_eq!(max_pool2d_backward(&dy, &nans, Pool2dCfg::new(2, 2, 0)).unwrap().to_vec().unwrap(), vec![0.0, 0.0, 1.0, 0.0]);
    assert_eq!(global_max_pool_backward(&dy, &nans).unwrap().to_vec().unwrap(), vec![0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn global_and_stripe_pools_match_direct_loops() {
    let mut rng = Rng::new(2);
    let shape = [3, 4, 8, 5];
    let (n, c, h, w) = (3, 4, 8, 5);
    let x = with_ties(&shape, &mut rng);
    let xs = x.to_vec().unwrap();
    let plane = |i: usize, ch: usize| &xs[(i * c + ch) * h * w..][..h * w];

    let avg: Vec<f32> = (0..n * c).map(|p| (plane(p / c, p % c).iter().map(|&v| v as f64).sum::<f64>() / (h * w) as f64) as f32).collect();
    let y = global_avg_pool_forward(&x).unwrap();
    assert_eq!(y.shape(), [n, c, 1, 1]);
    assert_close(&y, &avg, "global avg");
    let max: Vec<f32> = (0..n * c).map(|p| plane(p / c, p % c).iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect();
    assert_close(&global_max_pool_forward(&x).unwrap(), &max, "global max");

    let dy = Tensor::randn(&[n, c, 1, 1], 1.0, &mut rng);
    let dys = dy.to_vec().unwrap();
    let dx = global_max_pool_backward(&dy, &x).unwrap().to_vec().unwrap();
    for p in 0..n * c {
        let first = plane(p / c, p % c).iter().position(|&v| v == max[p]).unwrap();
        for j in 0..h * w {
            assert_eq!(dx[p * h * w + j], if j == first { dys[p] } else { 0.0 }, "global max backward plane {p} index {j}");
        }
    }
    let dx = global_avg_pool_backward(&dy, &shape).unwrap().to_vec().unwrap();
    let want: Vec<f32> = (0..xs.len()).map(|k| dys[k / (h * w)] / (h * w) as f32).collect();
    assert!(max_rel_err(&dx, &want, 1e-6) < 1e-6, "global avg backward");

    for parts in [1, 2, 4, 8] {
        let rows = h / parts;
        let y = stripe_avg_pool_forward(&x, parts).unwrap();
        assert_eq!(y.shape(), [n, parts * c]);
        let mut want = vec![0.0f32; n * parts * c];
        for i in 0..n {
            for ch in 0..c {
                for p in 0..parts {
                    let s: f64 = plane(i, ch)[p * rows * w..(p + 1) * rows * w].iter().map(|&v| v as f64).sum();
                    want[i * parts * c + p * c + ch] = (s / (rows * w) as f64) as f32;
                }
            }
        }
        assert_close(&y, &want, &format!("stripe forward, {parts} parts"));
        let dy = Tensor::randn(&[n, parts * c], 1.0, &mut rng);
        let dys = dy.to_vec().unwrap();
        let want: Vec<f32> = (0..xs.len())
            .map(|k| {
                let (i, ch, row) = (k / (c * h * w), (k / (h * w)) % c, (k % (h * w)) / w);
                dys[i * parts * c + (row / rows) * c + ch] / (rows * w) as f32
            })
            .collect();
        assert_close(&stripe_avg_pool_backward(&dy, &shape, parts).unwrap(), &want, &format!("stripe backward, {parts} parts"));
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    let x = distinct(&[2, 3, 8, 6], &mut rng);
    let check = |name: &str, f: &dyn Fn(&mut Tape, &Var) -> Result<Var>| {
        let leaves = [x.clone()];
        gradcheck(&leaves, |tape: &mut Tape, v| f(tape, &v[0]), GradCheck { max_coords: 288, ..GradCheck::default() })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    };
    for (k, s, p) in CFGS {
        let cfg = Pool2dCfg::new(k, s, p);
        check(&format!("max k{k} s{s} p{p}"), &|t, v| t.max_pool2d(v, cfg));
        check(&format!("avg k{k} s{s} p{p}"), &|t, v| t.avg_pool2d(v, cfg));
    }
    check("global avg", &|t, v| t.global_avg_pool(v));
    check("global max", &|t, v| t.global_max_pool(v));
    check("stripe 4", &|t, v| t.stripe_avg_pool(v, 4));
    check("stripe 2", &|t, v| t.stripe_avg_pool(v, 2));
}

#[test]
fn shape_errors_name_the_op() {
    let mut rng = Rng::new(4);
    let x = Tensor::randn(&[2, 3, 6, 4], 1.0, &mut rng);
    let expect = |r: Result<Tensor>, want_op: &str| match r {
        Err(Error::Shape { op, msg }) => assert_eq!(op, want_op, "{msg}"),
        other => panic!("{want_op}: expected a shape error, got {other:?}"),
    };
    expect(stripe_avg_pool_forward(&x, 4), "stripe_avg_pool_forward");
    let err = stripe_avg_pool_forward(&x, 4).unwrap_err().to_string();
    assert!(err.contains("4 parts do not divide the height"), "{err}");
    expect(stripe_avg_pool_forward(&x, 0), "stripe_avg_pool_forward");
    expect(stripe_avg_pool_backward(&Tensor::randn(&[2, 12], 1.0, &mut rng), x.shape(), 4), "stripe_avg_pool_backward");
    expect(stripe_avg_pool_backward(&Tensor::randn(&[2, 9], 1.0, &mut rng), x.shape(), 2), "stripe_avg_pool_backward");
    expect(max_pool2d_forward(&x, Pool2dCfg::new(3, 2, 2)), "max_pool2d_forward");
    expect(avg_pool2d_forward(&x, Pool2dCfg::new(8, 1, 0)), "avg_pool2d_forward");
    expect(max_pool2d_backward(&Tensor::randn(&[2, 3, 2, 2], 1.0, &mut rng), &x, Pool2dCfg::new(3, 2, 1)), "max_pool2d_backward");
    expect(global_max_pool_forward(&Tensor::randn(&[2, 3], 1.0, &mut rng)), "global_max_pool_forward");
    expect(global_avg_pool_forward(&Tensor::randn(&[2, 3, 0, 4], 1.0, &mut rng)), "global_avg_pool_forward");
    expect(global_avg_pool_backward(&Tensor::randn(&[2, 3, 1, 1], 1.0, &mut rng), &[2, 4, 5, 5]), "global_avg_pool_backward");
}

#[test]
fn bf16_pools_round_the_f32_result_once() {
    use crate::tensor::DType::BF16;
    use crate::testing::check_bf16_op;
    let mut rng = Rng::new(47);
    let x = Tensor::randn(&[2, 3, 8, 6], 1.0, &mut rng);
    let shape = x.shape().to_vec();
    let dy_of = |s: &[usize], rng: &mut Rng| Tensor::randn(s, 1.0, rng);
    for cfg in [Pool2dCfg::new(3, 2, 1), Pool2dCfg::new(2, 2, 0)] {
        let y_shape = pool2d_output_shape("test", &shape, cfg).unwrap();
        let dy = dy_of(&y_shape, &mut rng);
        check_bf16_op("max_pool2d_forward", std::slice::from_ref(&x), &[true], &[BF16], |t| Ok(vec![max_pool2d_forward(&t[0], cfg)?]));
        check_bf16_op("max_pool2d_backward", &[dy.clone(), x.clone()], &[true, true], &[BF16], |t| {
            Ok(vec![max_pool2d_backward(&t[0], &t[1], cfg)?])
        });
        check_bf16_op("avg_pool2d_forward", std::slice::from_ref(&x), &[true], &[BF16], |t| Ok(vec![avg_pool2d_forward(&t[0], cfg)?]));
        check_bf16_op("avg_pool2d_backward", &[dy], &[true], &[BF16], |t| Ok(vec![avg_pool2d_backward(&t[0], &shape, cfg)?]));
    }
    let dy = dy_of(&[2, 3, 1, 1], &mut rng);
    check_bf16_op("global_avg_pool_forward", std::slice::from_ref(&x), &[true], &[BF16], |t| Ok(vec![global_avg_pool_forward(&t[0])?]));
    check_bf16_op("global_avg_pool_backward", std::slice::from_ref(&dy), &[true], &[BF16], |t| {
        Ok(vec![global_avg_pool_backward(&t[0], &shape)?])
    });
    check_bf16_op("global_max_pool_forward", std::slice::from_ref(&x), &[true], &[BF16], |t| Ok(vec![global_max_pool_forward(&t[0])?]));
    check_bf16_op("global_max_pool_backward", &[dy, x.clone()], &[true, true], &[BF16], |t| {
        Ok(vec![global_max_pool_backward(&t[0], &t[1])?])
    });
    let dy = dy_of(&[2, 4 * 3], &mut rng);
    check_bf16_op("stripe_avg_pool_forward", std::slice::from_ref(&x), &[true], &[BF16], |t| Ok(vec![stripe_avg_pool_forward(&t[0], 4)?]));
    check_bf16_op("stripe_avg_pool_backward", &[dy], &[true], &[BF16], |t| Ok(vec![stripe_avg_pool_backward(&t[0], &shape, 4)?]));
}
