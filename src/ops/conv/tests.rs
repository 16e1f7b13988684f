use super::*;
use crate::error::Error;
use crate::rng::Rng;
use crate::tape::Tape;
use crate::testing::{gradcheck, norm_rel_err, GradCheck};

/// y, dx, dw and db of a convolution by direct f64 loops over every (output, tap) pair.
struct Reference {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor, cfg: Conv2dCfg) -> Reference {
    let (n, cin, h, wd) = x.dims4("ref").unwrap();
    let (cout, cin_g, k, _) = w.dims4("ref").unwrap();
    let (_, _, oh, ow) = dy.dims4("ref").unwrap();
    let (xs, ws, dys) = (x.to_vec().unwrap(), w.to_vec().unwrap(), dy.to_vec().unwrap());
    let cout_g = cout / cfg.groups;
    let mut r = Reference { y: vec![0.0; n * cout * oh * ow], dx: vec![0.0; xs.len()], dw: vec![0.0; ws.len()], db: vec![0.0; cout] };
    for i in 0..n {
        for co in 0..cout {
            let grp = co / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((i * cout + co) * oh + oy) * ow + ox;
                    let d = dys[yi] as f64;
                    let mut acc = b.map_or(0.0, |b| b.to_vec().unwrap()[co] as f64);
                    r.db[co] += d;
                    for cg in 0..cin_g {
                        let ci = grp * cin_g + cg;
                        for a in 0..k {
                            for bb in 0..k {
                                let iy = (oy * cfg.stride + a) as isize - cfg.padding as isize;
                                let ix = (ox * cfg.stride + bb) as isize - cfg.padding as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((i * cin + ci) * h + iy as usize) * wd + ix as usize;
                                let wi = ((co * cin_g + cg) * k + a) * k + bb;
                                acc += xs[xi] as f64 * ws[wi] as f64;
                                r.dx[xi] += d * ws[wi] as f64;
                                r.dw[wi] += d * xs[xi] as f64;
                            }
                        }
                    }
                    r.y[yi] = acc;
                }
            }
        }
    }
    r
}

/// Norm-wise and element-wise (relative to the largest value) agreement with an f64 reference.
fn assert_close(got: &Tensor, want: &[f64], what: &str) {
    let got = got.to_vec().unwrap();
    let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    let norm_err = norm_rel_err(&got, &want32);
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_err = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / scale;
    assert!(norm_err < 2e-6 && max_err < 1e-5, "{what}: norm-wise error {norm_err:.2e}, max error / max value {max_err:.2e}");
}

struct Case {
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    k: usize,
    cfg: Conv2dCfg,
    bias: bool,
}

/// `spg`: (stride, padding, groups).
fn case(name: &'static str, x: [usize; 4], cout: usize, k: usize, spg: (usize, usize, usize), bias: bool) -> Case {
    Case { name, x, cout, k, cfg: Conv2dCfg::new(spg.0, spg.1, spg.2), bias }
}

/// Every code path: pointwise (with and without groups, 1x1 on 1x1 maps as in the gates),
/// im2col (conv1-like 7x7/2, 3x3, strided, grouped), depthwise 3x3 same (the fast path) and
/// depthwise with stride or another kernel (the generic direct loops).
fn cases() -> Vec<Case> {
    vec![
        case("1x1", [2, 5, 6, 7], 4, 1, (1, 0, 1), false),
        case("1x1 bias", [3, 6, 5, 3], 7, 1, (1, 0, 1), true),
        case("1x1 on 1x1 maps, bias", [4, 8, 1, 1], 3, 1, (1, 0, 1), true),
        case("1x1 groups 2", [2, 6, 4, 5], 4, 1, (1, 0, 2), false),
        case("1x1 stride 2", [2, 3, 7, 6], 4, 1, (2, 0, 1), true),
        case("3x3 pad 1", [2, 3, 6, 5], 4, 3, (1, 1, 1), false),
        case("3x3 pad 1 bias", [3, 4, 5, 7], 5, 3, (1, 1, 1), true),
        case("7x7 stride 2 pad 3", [2, 3, 12, 9], 4, 7, (2, 3, 1), false),
        case("3x3 stride 2 pad 1", [2, 4, 7, 6], 3, 3, (2, 1, 1), true),
        case("3x3 groups 2", [2, 4, 5, 6], 6, 3, (1, 1, 2), true),
        case("5x5 no pad", [1, 2, 7, 8], 3, 5, (1, 0, 1), false),
        case("depthwise 3x3", [2, 4, 6, 5], 4, 3, (1, 1, 4), false),
        case("depthwise 3x3 bias", [3, 3, 4, 7], 3, 3, (1, 1, 3), true),
        case("depthwise 3x3 one row", [2, 2, 1, 4], 2, 3, (1, 1, 2), false),
        case("depthwise 3x3 one column", [2, 2, 5, 1], 2, 3, (1, 1, 2), false),
        case("depthwise 3x3 stride 2", [2, 3, 7, 6], 3, 3, (2, 1, 3), true),
        case("depthwise 5x5 pad 2", [1, 2, 6, 7], 2, 5, (1, 2, 2), false),
    ]
}

struct Inputs {
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
}

fn inputs(c: &Case, rng: &mut Rng) -> Inputs {
    let w_shape = [c.cout, c.x[1] / c.cfg.groups, c.k, c.k];
    Inputs { x: Tensor::randn(&c.x, 1.0, rng), w: Tensor::randn(&w_shape, 1.0, rng), b: c.bias.then(|| Tensor::randn(&[c.cout], 1.0, rng)) }
}

#[test]
fn forward_and_backward_match_direct_loops() {
    let mut rng = Rng::new(1);
    for c in cases() {
        check_against_reference(&c, &mut rng);
    }
}

/// Forward and the three backward passes of case `c` on random inputs against the direct loops.
fn check_against_reference(c: &Case, rng: &mut Rng) {
    let t = inputs(c, rng);
    let y = conv2d_forward(&t.x, &t.w, t.b.as_ref(), c.cfg).unwrap();
    let dy = Tensor::randn(y.shape(), 1.0, rng);
    let r = reference(&t.x, &t.w, t.b.as_ref(), &dy, c.cfg);
    assert_close(&y, &r.y, &format!("{}: forward", c.name));
    assert_close(&conv2d_backward_data(&dy, &t.w, t.x.shape(), c.cfg).unwrap(), &r.dx, &format!("{}: backward data", c.name));
    assert_close(&conv2d_backward_filter(&dy, &t.x, t.w.shape(), c.cfg).unwrap(), &r.dw, &format!("{}: backward filter", c.name));
    assert_close(&conv2d_backward_bias(&dy).unwrap(), &r.db, &format!("{}: backward bias", c.name));
}

/// The image-parallel and the GEMM-parallel schedules (more images than threads, and fewer)
/// both agree with the direct loops, at shapes big enough for the GEMM to split.
#[test]
fn larger_batches_match_direct_loops() {
    let mut rng = Rng::new(2);
    for c in [
        case("1x1 batch 5", [5, 16, 12, 8], 24, 1, (1, 0, 1), false),
        case("1x1 batch 1", [1, 32, 16, 8], 48, 1, (1, 0, 1), true),
        case("7x7/2 batch 1", [1, 3, 24, 16], 8, 7, (2, 3, 1), false),
        case("depthwise batch 5", [5, 8, 16, 8], 8, 3, (1, 1, 8), false),
    ] {
        check_against_reference(&c, &mut rng);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    for c in cases() {
        let t = inputs(&c, &mut rng);
        let cfg = c.cfg;
        let mut all = vec![t.x.clone(), t.w.clone()];
        all.extend(t.b.clone());
        let check =
            gradcheck(&all, |tape: &mut Tape, v| tape.conv2d(&v[0], &v[1], v.get(2), cfg), GradCheck { tol: 5e-3, ..GradCheck::default() });
        check.unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
}

#[test]
fn shape_errors_name_the_op() {
    let mut rng = Rng::new(4);
    let x = Tensor::randn(&[1, 4, 5, 5], 1.0, &mut rng);
    let cfg = Conv2dCfg::new(1, 1, 1);
    let expect_shape_error = |r: Result<Tensor>, what: &str| match r {
        Err(Error::Shape { op, .. }) => assert!(op.starts_with("conv2d"), "{what}: op {op}"),
        other => panic!("{what}: expected a shape error, got {other:?}"),
    };
    // Weight expects 3 input channels, input has 4.
    let w = Tensor::randn(&[2, 3, 3, 3], 1.0, &mut rng);
    expect_shape_error(conv2d_forward(&x, &w, None, cfg), "channels");
    let err = conv2d_forward(&x, &w, None, cfg).unwrap_err().to_string();
    assert!(err.contains("conv2d") && err.contains("4 channels"), "{err}");
    // Groups that do not divide the output channels.
    let w = Tensor::randn(&[3, 2, 3, 3], 1.0, &mut rng);
    expect_shape_error(conv2d_forward(&x, &w, None, Conv2dCfg::new(1, 1, 2)), "groups");
    // Bias of the wrong length, non-square kernel, kernel larger than the padded input.
    let w = Tensor::randn(&[2, 4, 3, 3], 1.0, &mut rng);
    expect_shape_error(conv2d_forward(&x, &w, Some(&Tensor::randn(&[3], 1.0, &mut rng)), cfg), "bias");
    expect_shape_error(conv2d_forward(&x, &Tensor::randn(&[2, 4, 3, 1], 1.0, &mut rng), None, cfg), "square");
    expect_shape_error(conv2d_forward(&x, &Tensor::randn(&[2, 4, 9, 9], 1.0, &mut rng), None, Conv2dCfg::new(1, 1, 1)), "kernel size");
    // Gradients with a dy of the wrong shape.
    let dy = Tensor::randn(&[1, 2, 4, 4], 1.0, &mut rng);
    expect_shape_error(conv2d_backward_data(&dy, &w, x.shape(), cfg), "backward data dy");
    expect_shape_error(conv2d_backward_filter(&dy, &x, w.shape(), cfg), "backward filter dy");
    expect_shape_error(conv2d_backward_bias(&Tensor::randn(&[2, 4], 1.0, &mut rng)), "backward bias rank");
}

#[test]
fn bf16_conv_rounds_the_f32_result_once_and_keeps_bias_f32() {
    use crate::tensor::DType::{BF16, F32};
    use crate::testing::check_bf16_op;
    let mut rng = Rng::new(41);
    // Dense 3x3 stride 2, grouped, depthwise (the engine's dwconv path) and 1x1.
    for (cin, cout, k, cfg) in [
        (4, 6, 3, Conv2dCfg::new(2, 1, 1)),
        (4, 6, 3, Conv2dCfg::new(1, 1, 2)),
        (6, 6, 3, Conv2dCfg::new(1, 1, 6)),
        (5, 3, 1, Conv2dCfg::new(1, 0, 1)),
    ] {
        let x = Tensor::randn(&[2, cin, 7, 6], 1.0, &mut rng);
        let w = Tensor::randn(&[cout, cin / cfg.groups, k, k], 0.5, &mut rng);
        let b = Tensor::randn(&[cout], 1.0, &mut rng);
        let y_shape = conv2d_output_shape(x.shape(), w.shape(), cfg).unwrap();
        let dy = Tensor::randn(&y_shape, 1.0, &mut rng);
        let name = format!("conv2d {cfg:?}");
        check_bf16_op(&name, &[x.clone(), w.clone(), b], &[true, true, false], &[BF16], |t| {
            Ok(vec![conv2d_forward(&t[0], &t[1], Some(&t[2]), cfg)?])
        });
        check_bf16_op(&name, &[dy.clone(), w.clone()], &[true, true], &[BF16], |t| {
            Ok(vec![conv2d_backward_data(&t[0], &t[1], x.shape(), cfg)?])
        });
        check_bf16_op(&name, &[dy.clone(), x.clone()], &[true, true], &[BF16], |t| {
            Ok(vec![conv2d_backward_filter(&t[0], &t[1], w.shape(), cfg)?])
        });
        check_bf16_op(&name, &[dy], &[true], &[F32], |t| Ok(vec![conv2d_backward_bias(&t[0])?]));
    }
}
