use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::tensor::numel;
use crate::testing::{gradcheck, max_rel_err, GradCheck};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, &mut Rng::new(seed))
}

/// Random values at least 0.1 away from zero, so ReLU's kink stays out of finite differences.
fn randn_off_zero(shape: &[usize], seed: u64) -> Tensor {
    let v = randn(shape, seed).to_vec().unwrap().into_iter().map(|x| x.signum() * (0.1 + x.abs())).collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// Flat index into b of a's element `i` under NumPy broadcasting, by explicit coordinates.
fn bcast_index(a: &[usize], b: &[usize], mut i: usize) -> usize {
    let pad = a.len() - b.len();
    let (mut off, mut stride) = (0, 1);
    for d in (0..a.len()).rev() {
        let c = i % a[d];
        i /= a[d];
        if d >= pad {
            let bd = b[d - pad];
            if bd != 1 {
                off += c * stride;
            }
            stride *= bd;
        }
    }
    off
}

fn naive_binary(a: &Tensor, b: &Tensor, f: impl Fn(f64, f64) -> f64) -> Vec<f32> {
    let (av, bv) = (a.to_vec().unwrap(), b.to_vec().unwrap());
    (0..av.len()).map(|i| f(av[i] as f64, bv[bcast_index(a.shape(), b.shape(), i)] as f64) as f32).collect()
}

fn naive_sum_to(x: &Tensor, shape: &[usize]) -> Vec<f32> {
    let xv = x.to_vec().unwrap();
    let mut acc = vec![0.0f64; numel(shape)];
    for (i, &v) in xv.iter().enumerate() {
        acc[bcast_index(x.shape(), shape, i)] += v as f64;
    }
    acc.into_iter().map(|v| v as f32).collect()
}

const SMALL_CASES: &[(&[usize], &[usize])] = &[
    (&[2, 3, 4, 5], &[2, 3, 4, 5]),
    (&[2, 3, 4, 5], &[2, 3, 1, 1]),
    (&[2, 3, 4, 5], &[1]),
    (&[2, 3, 4, 5], &[3, 1, 5]),
    (&[2, 3, 4, 5], &[5]),
    (&[2, 3, 4, 5], &[2, 1, 4, 1]),
    (&[2, 3, 4, 5], &[1, 3, 1, 1]),
    (&[2, 1, 4, 5], &[2, 1, 1, 5]),
    (&[4, 6], &[4, 1]),
    (&[7], &[7]),
];

/// Above the parallel threshold (4*64*32*17 = 139,264 elements).
const LARGE_CASES: &[(&[usize], &[usize])] =
    &[(&[4, 64, 32, 17], &[4, 64, 32, 17]), (&[4, 64, 32, 17], &[4, 64, 1, 1]), (&[4, 64, 32, 17], &[1]), (&[4, 64, 32, 17], &[64, 1, 17])];

#[test]
fn add_mul_forward_match_naive() {
    for (seed, &(sa, sb)) in SMALL_CASES.iter().chain(LARGE_CASES).enumerate() {
        let (a, b) = (randn(sa, 2 * seed as u64), randn(sb, 2 * seed as u64 + 1));
        let sum = add(&a, &b).unwrap();
        assert_eq!(sum.shape(), sa);
        assert!(max_rel_err(&sum.to_vec().unwrap(), &naive_binary(&a, &b, |x, y| x + y), 1e-6) < 1e-6, "add {sa:?} {sb:?}");
        let prod = mul(&a, &b).unwrap();
        assert!(max_rel_err(&prod.to_vec().unwrap(), &naive_binary(&a, &b, |x, y| x * y), 1e-6) < 1e-6, "mul {sa:?} {sb:?}");
    }
}

#[test]
fn sum_to_shape_and_broadcast_to_match_naive() {
    for (seed, &(sa, sb)) in SMALL_CASES.iter().chain(LARGE_CASES).enumerate() {
        let x = randn(sa, 100 + seed as u64);
        let s = sum_to_shape(&x, sb).unwrap();
        assert_eq!(s.shape(), sb);
        assert!(max_rel_err(&s.to_vec().unwrap(), &naive_sum_to(&x, sb), 1e-4) < 1e-5, "sum_to_shape {sa:?} -> {sb:?}");
        let small = randn(sb, 200 + seed as u64);
        let big = broadcast_to(&small, sa).unwrap();
        let sv = small.to_vec().unwrap();
        let want: Vec<f32> = (0..numel(sa)).map(|i| sv[bcast_index(sa, sb, i)]).collect();
        assert_eq!(big.shape(), sa);
        assert_eq!(big.to_vec().unwrap(), want, "broadcast_to {sb:?} -> {sa:?}");
    }
}

#[test]
fn mul_backward_matches_naive() {
    for (seed, &(sa, sb)) in SMALL_CASES.iter().chain(LARGE_CASES).enumerate() {
        let (a, b, dy) = (randn(sa, 3 * seed as u64), randn(sb, 3 * seed as u64 + 1), randn(sa, 3 * seed as u64 + 2));
        let (da, db) = mul_backward(&dy, &a, &b).unwrap();
        assert!(max_rel_err(&da.to_vec().unwrap(), &naive_binary(&dy, &b, |x, y| x * y), 1e-6) < 1e-6);
        let dya = Tensor::from_vec(naive_binary(&dy, &a, |x, y| x * y), sa).unwrap();
        assert_eq!(db.shape(), sb);
        assert!(max_rel_err(&db.to_vec().unwrap(), &naive_sum_to(&dya, sb), 1e-4) < 1e-5, "db {sa:?} {sb:?}");
    }
}

#[test]
fn add_mul_gradcheck_every_broadcast() {
    for (seed, &(sa, sb)) in SMALL_CASES.iter().enumerate() {
        let inputs = [randn(sa, 10 + seed as u64), randn(sb, 20 + seed as u64)];
        gradcheck(&inputs, |t, v| t.add(&v[0], &v[1]), GradCheck::default()).unwrap_or_else(|e| panic!("add {sa:?} {sb:?}: {e}"));
        gradcheck(&inputs, |t, v| t.mul(&v[0], &v[1]), GradCheck::default()).unwrap_or_else(|e| panic!("mul {sa:?} {sb:?}: {e}"));
    }
}

#[test]
fn broadcast_mismatch_is_an_error_naming_the_op() {
    let a = randn(&[2, 4], 0);
    for bad in [&[3][..], &[2, 1, 4], &[4, 4], &[2]] {
        let b = randn(bad, 1);
        assert!(matches!(add(&a, &b), Err(Error::Shape { op: "add", .. })), "add {bad:?}");
        assert!(matches!(mul(&a, &b), Err(Error::Shape { op: "mul", .. })), "mul {bad:?}");
    }
    assert!(matches!(sum_to_shape(&a, &[3]), Err(Error::Shape { op: "sum_to_shape", .. })));
    assert!(matches!(broadcast_to(&a, &[2, 5]), Err(Error::Shape { op: "broadcast_to", .. })));
    let e = add(&a, &randn(&[3], 1)).unwrap_err().to_string();
    assert!(e.starts_with("add:") && e.contains("[3]") && e.contains("[2, 4]"), "{e}");
}

#[test]
fn relu_sigmoid_scale_forward_backward() {
    for (seed, shape) in [&[3, 4, 5, 6][..], &[5, 100, 150]].into_iter().enumerate() {
        let x = randn(shape, seed as u64);
        let mut xv = x.to_vec().unwrap();
        xv[0] = 100.0;
        xv[1] = -100.0;
        let x = Tensor::from_vec(xv.clone(), shape).unwrap();
        let dy = randn(shape, 50 + seed as u64);
        let dyv = dy.to_vec().unwrap();

        let relu = relu_forward(&x).unwrap().to_vec().unwrap();
        assert_eq!(relu, xv.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect::<Vec<_>>());
        let drelu = relu_backward(&dy, &relu_forward(&x).unwrap()).unwrap().to_vec().unwrap();
        assert_eq!(drelu, xv.iter().zip(&dyv).map(|(&v, &g)| if v > 0.0 { g } else { 0.0 }).collect::<Vec<_>>());

        let sig = sigmoid_forward(&x).unwrap();
        let want: Vec<f32> = xv.iter().map(|&v| (1.0 / (1.0 + (-(v as f64)).exp())) as f32).collect();
        assert!(max_rel_err(&sig.to_vec().unwrap(), &want, 1e-30) < 1e-6);
        let dsig = sigmoid_backward(&dy, &sig).unwrap().to_vec().unwrap();
        let want: Vec<f32> = want.iter().zip(&dyv).map(|(&s, &g)| (g as f64 * s as f64 * (1.0 - s as f64)) as f32).collect();
        assert!(max_rel_err(&dsig, &want, 1e-30) < 1e-5);

        let sc = scale(&x, -0.37).unwrap().to_vec().unwrap();
        assert!(max_rel_err(&sc, &xv.iter().map(|&v| (-0.37f64 * v as f64) as f32).collect::<Vec<_>>(), 1e-30) < 1e-6);
    }
}

#[test]
fn unary_gradchecks() {
    let x = randn_off_zero(&[2, 3, 4, 5], 7);
    gradcheck(std::slice::from_ref(&x), |t, v| t.relu(&v[0]), GradCheck::default()).unwrap();
    gradcheck(std::slice::from_ref(&x), |t, v| t.sigmoid(&v[0]), GradCheck::default()).unwrap();
    gradcheck(std::slice::from_ref(&x), |t, v| t.scale(&v[0], 1.7), GradCheck::default()).unwrap();
    gradcheck(&[x], |t, v| t.sum_all(&v[0]), GradCheck::default()).unwrap();
}

#[test]
fn sum_all_matches_naive() {
    for (seed, shape) in [&[3, 5][..], &[3, 300, 250]].into_iter().enumerate() {
        let x = Tensor::rand_uniform(shape, 0.0, 1.0, &mut Rng::new(seed as u64));
        let want: f64 = x.to_vec().unwrap().iter().map(|&v| v as f64).sum();
        let got = sum_all(&x).unwrap();
        assert_eq!(got.shape(), [1]);
        assert!((got.item().unwrap() as f64 - want).abs() / want < 1e-6, "{} vs {want}", got.item().unwrap());
    }
}

fn naive_l2(x: &Tensor) -> Vec<f32> {
    let d = x.shape()[1];
    x.to_vec()
        .unwrap()
        .chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
            r.iter().map(move |&v| (v as f64 / n) as f32)
        })
        .collect()
}

#[test]
fn l2_normalize_forward_matches_naive() {
    for (seed, shape) in [&[5, 7][..], &[130, 600]].into_iter().enumerate() {
        let mut xv = randn(shape, seed as u64).to_vec().unwrap();
        xv[..shape[1]].fill(0.0); // a zero row stays zero (the norm clamps to 1e-12)
        let x = Tensor::from_vec(xv, shape).unwrap();
        let y = l2_normalize_forward(&x).unwrap().to_vec().unwrap();
        assert!(y[..shape[1]].iter().all(|&v| v == 0.0));
        assert!(max_rel_err(&y, &naive_l2(&x), 1e-6) < 1e-5);
        for r in y.chunks(shape[1]).skip(1) {
            let n: f64 = r.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn l2_normalize_gradcheck() {
    gradcheck(&[randn(&[4, 9], 3)], |t, v| t.l2_normalize(&v[0]), GradCheck::default()).unwrap();
    // With the clamp active (a row of norm < 1e-12) y = x / 1e-12, so dx = dy / 1e-12.
    let x = Tensor::from_vec(vec![1e-14, -2e-14, 0.0, 3.0, 4.0, 0.0], &[2, 3]).unwrap();
    let dy = Tensor::from_vec(vec![1.0, 2.0, 3.0, 1.0, 1.0, 1.0], &[2, 3]).unwrap();
    let dx = l2_normalize_backward(&dy, &x).unwrap().to_vec().unwrap();
    assert!(max_rel_err(&dx[..3], &[1e12, 2e12, 3e12], 1e-6) < 1e-6);
    // Row (3, 4, 0): n = 5, y = (0.6, 0.8, 0), y.dy = 1.4; dx = (dy - 1.4 y) / 5.
    assert!(max_rel_err(&dx[3..], &[(1.0 - 0.84) / 5.0, (1.0 - 1.12) / 5.0, 0.2], 1e-6) < 1e-5);
}

/// Concatenation by explicit coordinates: output element (o, j, r) comes from the input whose
/// axis range holds j.
fn naive_concat(xs: &[&Tensor], axis: usize) -> Vec<f32> {
    let s = xs[0].shape();
    let outer: usize = s[..axis].iter().product();
    let inner: usize = s[axis + 1..].iter().product();
    let total: usize = xs.iter().map(|x| x.shape()[axis]).sum();
    let mut out = Vec::new();
    for o in 0..outer {
        for j in 0..total {
            let (mut k, mut jj) = (0, j);
            while jj >= xs[k].shape()[axis] {
                jj -= xs[k].shape()[axis];
                k += 1;
            }
            let len = xs[k].shape()[axis];
            let v = xs[k].to_vec().unwrap();
            for r in 0..inner {
                out.push(v[(o * len + jj) * inner + r]);
            }
        }
    }
    out
}

#[test]
fn concat_narrow_match_naive_on_every_axis() {
    let base = [2, 3, 4, 5];
    for axis in 0..4 {
        let shapes: Vec<Vec<usize>> = [1, 3, 2]
            .iter()
            .map(|&l| {
                let mut s = base.to_vec();
                s[axis] = l;
                s
            })
            .collect();
        let xs: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| randn(s, 10 * axis as u64 + i as u64)).collect();
        let refs: Vec<&Tensor> = xs.iter().collect();
        let y = concat(&refs, axis).unwrap();
        assert_eq!(y.shape()[axis], 6);
        assert_eq!(y.to_vec().unwrap(), naive_concat(&refs, axis), "axis {axis}");
        // Narrowing the concatenation gives back each part.
        let mut start = 0;
        for x in &xs {
            let len = x.shape()[axis];
            let part = narrow(&y, axis, start, len).unwrap();
            assert_eq!(part.shape(), x.shape());
            assert_eq!(part.to_vec().unwrap(), x.to_vec().unwrap(), "axis {axis} start {start}");
            start += len;
        }
    }
    // Large enough for the parallel path: [64, 512] x 4 stripes -> [64, 2048].
    let xs: Vec<Tensor> = (0..4).map(|i| randn(&[64, 512], 90 + i)).collect();
    let refs: Vec<&Tensor> = xs.iter().collect();
    let y = concat(&refs, 1).unwrap();
    assert_eq!(y.to_vec().unwrap(), naive_concat(&refs, 1));
    assert_eq!(narrow(&y, 1, 1024, 512).unwrap().to_vec().unwrap(), xs[2].to_vec().unwrap());
}

#[test]
fn concat_gradcheck() {
    let inputs = [randn(&[2, 3, 2, 2], 1), randn(&[2, 1, 2, 2], 2), randn(&[2, 2, 2, 2], 3)];
    gradcheck(&inputs, |t, v| t.concat(&[&v[0], &v[1], &v[2]], 1), GradCheck::default()).unwrap();
    let inputs = [randn(&[3, 4], 4), randn(&[3, 2], 5)];
    gradcheck(&inputs, |t, v| t.concat(&[&v[0], &v[1]], 1), GradCheck::default()).unwrap();
}

#[test]
fn concat_narrow_errors() {
    let (a, b) = (randn(&[2, 3], 0), randn(&[3, 3], 1));
    assert!(matches!(concat(&[&a, &b], 1), Err(Error::Shape { op: "concat", .. })));
    assert!(matches!(concat(&[&a, &b], 2), Err(Error::Shape { op: "concat", .. })));
    assert!(concat(&[&a, &b], 0).is_ok());
    assert!(matches!(narrow(&a, 1, 2, 2), Err(Error::Shape { op: "narrow", .. })));
    assert!(matches!(narrow(&a, 2, 0, 1), Err(Error::Shape { op: "narrow", .. })));
}

#[test]
fn bf16_elementwise_ops_round_the_f32_result_once() {
    use crate::tensor::DType::BF16;
    use crate::testing::check_bf16_op;
    let x = randn(&[2, 3, 4, 5], 61);
    let dy = randn(&[2, 3, 4, 5], 62);
    let unary = |t: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![relu_forward(&t[0])?, sigmoid_forward(&t[0])?, scale(&t[0], 0.3)?]) };
    check_bf16_op("relu/sigmoid/scale", std::slice::from_ref(&x), &[true], &[BF16; 3], unary);
    // The backward ops take the forward outputs as inputs.
    let (relu_y, sigmoid_y) = (relu_forward(&x).unwrap(), sigmoid_forward(&x).unwrap());
    check_bf16_op("relu_backward/sigmoid_backward", &[dy.clone(), relu_y, sigmoid_y], &[true, true, true], &[BF16; 2], |t| {
        Ok(vec![relu_backward(&t[0], &t[1])?, sigmoid_backward(&t[0], &t[2])?])
    });
    // The gate [N, C, 1, 1] of the channel attention, a full-size gate, a broadcast row.
    for b_shape in [&[2, 3, 1, 1][..], &[2, 3, 4, 5], &[5]] {
        let b = randn(b_shape, 63);
        check_bf16_op("add/mul", &[x.clone(), b.clone()], &[true, true], &[BF16; 2], |t| Ok(vec![add(&t[0], &t[1])?, mul(&t[0], &t[1])?]));
        check_bf16_op("mul_backward", &[dy.clone(), x.clone(), b.clone()], &[true, true, true], &[BF16; 2], |t| {
            let (da, db) = mul_backward(&t[0], &t[1], &t[2])?;
            Ok(vec![da, db])
        });
        check_bf16_op("sum_to_shape", std::slice::from_ref(&x), &[true], &[BF16], |t| Ok(vec![sum_to_shape(&t[0], b_shape)?]));
        check_bf16_op("broadcast_to", &[b], &[true], &[BF16], |t| Ok(vec![broadcast_to(&t[0], x.shape())?]));
    }
    let y = randn(&[2, 2, 4, 5], 64);
    check_bf16_op("concat/narrow", &[x.clone(), y], &[true, true], &[BF16; 2], |t| {
        Ok(vec![concat(&[&t[0], &t[1]], 1)?, narrow(&t[0], 1, 1, 2)?])
    });
    // The reductions that feed the losses and the eval features stay f32.
    let xb = x.reshape(&[6, 20]).unwrap().to_dtype(BF16).unwrap();
    assert!(matches!(sum_all(&xb), Err(Error::DType { .. })));
    assert!(matches!(l2_normalize_forward(&xb), Err(Error::DType { .. })));
}
