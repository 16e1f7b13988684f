//! Every op on the GPU against the CPU reference, forward and backward, on random inputs at
//! PLR-OSNet's real shapes and at odd ones. Without a usable GPU each test prints one SKIP line
//! (or fails, under PLR_REQUIRE_GPU=1).
//!
//! Comparison: norm-wise relative error below 1e-5 and per-element relative error below 1e-4 with
//! the tensor's RMS as the floor (fp32 sums in a different order differ by ~1e-7 relative, and
//! elements near zero after cancellation differ by ~1e-6 of the RMS on the H100; a wrong index
//! or formula is off by O(RMS)).
//!
//! bf16 outputs (the `bf16_*` tests: the same ops on bf16 activations, which both devices compute
//! in f32 and round once) may differ by one bf16 rounding where the f32 results before it differ
//! in summation order: per element below one bf16 ulp (2^-7 relative) with the RMS floor, and
//! norm-wise below 1e-3 (such flips are rare). Their f32 outputs keep the f32 tolerance.

use plr_engine::ops::attention as att;
use plr_engine::ops::batchnorm as bn;
use plr_engine::ops::conv::{self, Conv2dCfg};
use plr_engine::ops::elementwise as ew;
use plr_engine::ops::linear;
use plr_engine::ops::loss;
use plr_engine::ops::pool::{self, Pool2dCfg};
use plr_engine::rng::Rng;
use plr_engine::tensor::DType::{self, BF16, F32};
use plr_engine::testing::{cuda_or_skip as gpu, max_rel_err, norm_rel_err};
use plr_engine::{Device, Result, Tape, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, rng)
}

/// Standard normal values rounded to bf16 (the CPU holds them as exact f32 values).
fn randn_bf16(shape: &[usize], rng: &mut Rng) -> Tensor {
    randn(shape, rng).to_dtype(BF16).unwrap()
}

/// (norm-wise, per-element) relative error bounds for outputs of a dtype (see the module doc).
fn tolerance(dtype: DType) -> (f64, f32) {
    match dtype {
        F32 => (1e-5, 1e-4),
        BF16 => (1e-3, 1.0 / 128.0),
    }
}

fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor) {
    assert_eq!(gpu.device(), Device::Cuda, "{what}: result left the GPU");
    assert_eq!(cpu.shape(), gpu.shape(), "{what}: shapes differ");
    assert_eq!(cpu.dtype(), gpu.dtype(), "{what}: dtypes differ");
    let (a, b) = (cpu.to_vec().unwrap(), gpu.to_vec().unwrap());
    assert!(a.iter().chain(&b).all(|v| v.is_finite()), "{what}: non-finite values");
    let rms = (a.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / a.len().max(1) as f64).sqrt() as f32;
    let norm = norm_rel_err(&a, &b);
    let elem = max_rel_err(&a, &b, rms.max(1e-30));
    let (norm_tol, elem_tol) = tolerance(gpu.dtype());
    assert!(
        norm < norm_tol && elem < elem_tol,
        "{what} {:?} {:?}: norm-wise rel err {norm:.2e}, max element rel err {elem:.2e}",
        cpu.shape(),
        gpu.dtype()
    );
}

/// Runs `f` on the CPU inputs and on copies on the GPU, compares every output and returns the
/// GPU's.
fn check(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>) -> Vec<Tensor> {
    let on_cpu = f(inputs).unwrap_or_else(|e| panic!("{what} on the CPU: {e}"));
    let dev: Vec<Tensor> = inputs.iter().map(|t| t.to_device(Device::Cuda).unwrap()).collect();
    let on_gpu = f(&dev).unwrap_or_else(|e| panic!("{what} on the GPU: {e}"));
    assert_eq!(on_cpu.len(), on_gpu.len());
    for (i, (c, g)) in on_cpu.iter().zip(&on_gpu).enumerate() {
        assert_close(&format!("{what} output {i}"), c, g);
    }
    on_gpu
}

/// `check` for ops on bf16 activations, which also asserts the dtype of each output (the
/// contract: activations and their gradients bf16; statistics, BN parameter gradients and conv
/// bias gradients f32).
fn check_bf16(what: &str, inputs: &[Tensor], dtypes: &[DType], f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>) -> Vec<Tensor> {
    let out = check(what, inputs, f);
    let got: Vec<DType> = out.iter().map(Tensor::dtype).collect();
    assert_eq!(got, dtypes, "{what}: output dtypes");
    out
}

#[test]
fn conv2d() {
    if !gpu("conv2d") {
        return;
    }
    let mut rng = Rng::new(1);
    // (input, weight shape, cfg, bias): PLR-OSNet's 1x1 256->384 at 32x16, its depthwise 3x3 on 64
    // channels at 64x32, conv1 7x7/2 on 256x128, and a strided grouped conv with bias.
    let cases = [
        ([4, 256, 32, 16], [384, 256, 1, 1], Conv2dCfg::new(1, 0, 1), false),
        ([2, 64, 64, 32], [64, 1, 3, 3], Conv2dCfg::new(1, 1, 64), false),
        ([2, 3, 256, 128], [64, 3, 7, 7], Conv2dCfg::new(2, 3, 1), false),
        ([3, 8, 11, 9], [12, 2, 3, 3], Conv2dCfg::new(2, 1, 4), true),
    ];
    for (xs, ws, cfg, with_bias) in cases {
        let y_shape = conv::conv2d_output_shape(&xs, &ws, cfg).unwrap();
        let mut inputs = vec![randn(&xs, &mut rng), randn(&ws, &mut rng), randn(&y_shape, &mut rng)];
        if with_bias {
            inputs.push(randn(&[ws[0]], &mut rng));
        }
        check(&format!("conv2d x {xs:?} w {ws:?} {cfg:?}"), &inputs, |t| {
            let (x, w, dy, b) = (&t[0], &t[1], &t[2], t.get(3));
            let mut out = vec![
                conv::conv2d_forward(x, w, b, cfg)?,
                conv::conv2d_backward_data(dy, w, x.shape(), cfg)?,
                conv::conv2d_backward_filter(dy, x, w.shape(), cfg)?,
            ];
            if b.is_some() {
                out.push(conv::conv2d_backward_bias(dy)?);
            }
            Ok(out)
        });
    }
}

/// PLR-OSNet's depthwise 3x3 layers at batch 64 (LightConv mid channels of conv2..conv5 and the
/// part branch's 512 at their feature-map sizes), plus odd shapes: planes narrower than a warp,
/// heights not a multiple of the kernel's 4-row strips, a single pixel.
const DEPTHWISE_SHAPES: [[usize; 4]; 8] =
    [[64, 64, 64, 32], [64, 96, 32, 16], [64, 128, 16, 8], [64, 512, 16, 8], [64, 256, 32, 16], [3, 5, 7, 9], [2, 3, 6, 1], [5, 4, 1, 1]];

#[test]
fn depthwise_3x3_engine_kernels() {
    if !gpu("depthwise_3x3_engine_kernels") {
        return;
    }
    use plr_engine::cuda::dwconv;
    let mut rng = Rng::new(21);
    for xs in DEPTHWISE_SHAPES {
        let c = xs[1];
        let cfg = Conv2dCfg::new(1, 1, c);
        let inputs = [randn(&xs, &mut rng), randn(&[c, 1, 3, 3], &mut rng), randn(&xs, &mut rng)];
        let on_cpu = [
            conv::conv2d_forward(&inputs[0], &inputs[1], None, cfg).unwrap(),
            conv::conv2d_backward_data(&inputs[2], &inputs[1], &xs, cfg).unwrap(),
            conv::conv2d_backward_filter(&inputs[2], &inputs[0], &[c, 1, 3, 3], cfg).unwrap(),
        ];
        let d: Vec<Tensor> = inputs.iter().map(|t| t.to_device(Device::Cuda).unwrap()).collect();
        let on_gpu = [
            dwconv::forward(&d[0], &d[1]).unwrap(),
            dwconv::backward_data(&d[2], &d[1]).unwrap(),
            dwconv::backward_filter(&d[2], &d[0]).unwrap(),
        ];
        for ((what, c), g) in ["forward", "backward data", "backward filter"].iter().zip(&on_cpu).zip(&on_gpu) {
            assert_close(&format!("engine depthwise {what} x {xs:?}"), c, g);
        }
        // No atomics: a second run gives the same bits.
        let again = dwconv::backward_filter(&d[2], &d[0]).unwrap();
        assert_eq!(again.to_vec().unwrap(), on_gpu[2].to_vec().unwrap(), "filter gradient not deterministic at {xs:?}");
    }
    // Shapes these kernels do not handle are refused with an error naming them.
    let x = Tensor::zeros(&[2, 4, 5, 5], Device::Cuda).unwrap();
    let e = dwconv::forward(&x, &Tensor::zeros(&[4, 1, 5, 5], Device::Cuda).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[4, 1, 5, 5]"), "{e}");
}

/// The conv op routes depthwise 3x3 layers to the engine's kernels or to cuDNN as chosen at run
/// time; both agree with the CPU. (Other tests in this binary may run their depthwise case on
/// either implementation meanwhile; both are correct.)
#[test]
fn depthwise_3x3_either_implementation_through_the_conv_op() {
    if !gpu("depthwise_3x3_either_implementation_through_the_conv_op") {
        return;
    }
    use plr_engine::cuda::dwconv::{depthwise_impl, set_depthwise_impl, DepthwiseImpl};
    let mut rng = Rng::new(22);
    let xs = [64, 128, 32, 16];
    let cfg = Conv2dCfg::new(1, 1, 128);
    let inputs = [randn(&xs, &mut rng), randn(&[128, 1, 3, 3], &mut rng), randn(&xs, &mut rng), randn(&[128], &mut rng)];
    for choice in [DepthwiseImpl::Cudnn, DepthwiseImpl::Engine] {
        set_depthwise_impl(choice);
        assert_eq!(depthwise_impl().unwrap(), choice);
        check(&format!("depthwise through conv2d, {choice:?}"), &inputs, |t| {
            Ok(vec![
                conv::conv2d_forward(&t[0], &t[1], Some(&t[3]), cfg)?,
                conv::conv2d_backward_data(&t[2], &t[1], t[0].shape(), cfg)?,
                conv::conv2d_backward_filter(&t[2], &t[0], t[1].shape(), cfg)?,
            ])
        });
    }
}

#[test]
fn batchnorm_train() {
    if !gpu("batchnorm_train") {
        return;
    }
    let mut rng = Rng::new(2);
    for shape in [vec![4, 64, 16, 8], vec![64, 2048], vec![2, 384, 16, 8], vec![3, 5, 7, 1]] {
        let c = shape[1];
        // Shifted, scaled inputs so the mean and variance matter.
        let x = ew::scale(&ew::add(&randn(&shape, &mut rng), &Tensor::full(&[1], 0.5, Device::Cpu).unwrap()).unwrap(), 3.0).unwrap();
        let inputs = [
            x,
            randn(&[c], &mut rng),
            randn(&[c], &mut rng),
            randn(&shape, &mut rng),
            randn(&[c], &mut rng),
            Tensor::rand_uniform(&[c], 0.5, 2.0, &mut rng),
        ];
        check(&format!("batchnorm train {shape:?}"), &inputs, |t| {
            let (y, stats) = bn::batchnorm_forward_train(&t[0], &t[1], &t[2], bn::BN_EPS)?;
            let (dx, dgamma, dbeta) = bn::batchnorm_backward_train(&t[3], &t[0], &t[1], &stats)?;
            let (mut rm, mut rv) = (t[4].clone(), t[5].clone());
            bn::batchnorm_update_running(&mut rm, &mut rv, &stats, bn::BN_MOMENTUM)?;
            Ok(vec![y, stats.mean, stats.invstd, stats.var_unbiased, dx, dgamma, dbeta, rm, rv])
        });
    }
}

/// relu(batchnorm(x)) fused, at PLR-OSNet shapes (the LightConv BN at 64x32 and a 1x1 ConvBn at
/// 16x8) and an odd one.
#[test]
fn batchnorm_relu_train() {
    if !gpu("batchnorm_relu_train") {
        return;
    }
    let mut rng = Rng::new(23);
    for shape in [vec![64, 64, 64, 32], vec![64, 512, 16, 8], vec![3, 5, 7, 1]] {
        let c = shape[1];
        let inputs = [randn(&shape, &mut rng), randn(&[c], &mut rng), randn(&[c], &mut rng), randn(&shape, &mut rng)];
        check(&format!("batchnorm+relu train {shape:?}"), &inputs, |t| {
            let (y, stats) = bn::batchnorm_relu_forward_train(&t[0], &t[1], &t[2], bn::BN_EPS)?;
            let (dx, dgamma, dbeta) = bn::batchnorm_relu_backward_train(&t[3], &y, &t[0], &t[1], &stats)?;
            Ok(vec![y, stats.mean, stats.invstd, stats.var_unbiased, dx, dgamma, dbeta])
        });
    }
}

#[test]
fn batchnorm_eval() {
    if !gpu("batchnorm_eval") {
        return;
    }
    let mut rng = Rng::new(3);
    for shape in [vec![4, 256, 32, 16], vec![64, 512], vec![2, 3, 5, 4]] {
        let c = shape[1];
        let inputs = [
            randn(&shape, &mut rng),
            randn(&[c], &mut rng),
            randn(&[c], &mut rng),
            randn(&[c], &mut rng),
            Tensor::rand_uniform(&[c], 0.5, 2.0, &mut rng),
            randn(&shape, &mut rng),
        ];
        check(&format!("batchnorm eval {shape:?}"), &inputs, |t| {
            let y = bn::batchnorm_forward_eval(&t[0], &t[1], &t[2], &t[3], &t[4], bn::BN_EPS)?;
            let (dx, dgamma, dbeta) = bn::batchnorm_backward_eval(&t[5], &t[0], &t[1], &t[3], &t[4], bn::BN_EPS)?;
            Ok(vec![y, dx, dgamma, dbeta])
        });
    }
}

#[test]
fn relu_and_sigmoid() {
    if !gpu("relu_and_sigmoid") {
        return;
    }
    let mut rng = Rng::new(4);
    for shape in [vec![4, 64, 64, 32], vec![7], vec![3, 5, 1, 2]] {
        let inputs = [ew::scale(&randn(&shape, &mut rng), 4.0).unwrap(), randn(&shape, &mut rng)];
        check(&format!("relu/sigmoid {shape:?}"), &inputs, |t| {
            let r = ew::relu_forward(&t[0])?;
            let s = ew::sigmoid_forward(&t[0])?;
            Ok(vec![ew::relu_backward(&t[1], &r)?, ew::sigmoid_backward(&t[1], &s)?, r, s])
        });
    }
}

#[test]
fn broadcast_add_mul() {
    if !gpu("broadcast_add_mul") {
        return;
    }
    let mut rng = Rng::new(5);
    // The channel gate [N, C, 1, 1], the PAM gamma [1], a same-shape operand, a channel vector
    // broadcast over N and a trailing-axis one.
    let cases: [(&[usize], &[usize]); 6] = [
        (&[4, 64, 32, 16], &[4, 64, 1, 1]),
        (&[4, 256, 32, 16], &[1]),
        (&[2, 3, 4, 5], &[2, 3, 4, 5]),
        (&[2, 3, 4, 5], &[3, 1, 1]),
        (&[6, 10], &[10]),
        (&[2, 3, 4, 5], &[1, 3, 1, 5]),
    ];
    for (a, b) in cases {
        let inputs = [randn(a, &mut rng), randn(b, &mut rng), randn(a, &mut rng)];
        check(&format!("add/mul {a:?} with {b:?}"), &inputs, |t| {
            let (da, db) = ew::mul_backward(&t[2], &t[0], &t[1])?;
            Ok(vec![ew::add(&t[0], &t[1])?, ew::mul(&t[0], &t[1])?, da, db])
        });
    }
}

#[test]
fn reductions_and_broadcast_to() {
    if !gpu("reductions_and_broadcast_to") {
        return;
    }
    let mut rng = Rng::new(6);
    // Short and long reductions (thread and block kernels), leading and inner axes.
    let cases: [(&[usize], &[usize]); 6] = [
        (&[4, 64, 32, 16], &[4, 64, 1, 1]),
        (&[4, 64, 32, 16], &[1, 64, 1, 1]),
        (&[64, 751], &[751]),
        (&[3, 4, 5], &[3, 1, 5]),
        (&[2, 3, 4, 5], &[1]),
        (&[5, 7], &[5, 1]),
    ];
    for (big, small) in cases {
        let inputs = [randn(big, &mut rng), randn(small, &mut rng)];
        check(&format!("sum_to_shape/broadcast_to {big:?} <-> {small:?}"), &inputs, |t| {
            Ok(vec![ew::sum_to_shape(&t[0], small)?, ew::broadcast_to(&t[1], big)?])
        });
    }
    for shape in [vec![64, 2048], vec![4, 256, 32, 16], vec![1]] {
        let inputs = [randn(&shape, &mut rng)];
        check(&format!("sum_all/scale {shape:?}"), &inputs, |t| Ok(vec![ew::sum_all(&t[0])?, ew::scale(&t[0], -0.37)?]));
    }
}

#[test]
fn l2_normalize() {
    if !gpu("l2_normalize") {
        return;
    }
    let mut rng = Rng::new(7);
    for (rows, d, zero_rows) in [(64, 2048, 0), (64, 512, 0), (3, 5, 0), (2, 4, 2)] {
        // All-zero rows take the 1e-12 clamp (their gradient is dy * 1e12, so they get a case of
        // their own rather than swamping the error measure of ordinary rows).
        let mut x = randn(&[rows, d], &mut rng).to_vec().unwrap();
        x[..zero_rows * d].iter_mut().for_each(|v| *v = 0.0);
        let inputs = [Tensor::from_vec(x, &[rows, d]).unwrap(), randn(&[rows, d], &mut rng)];
        check(&format!("l2_normalize [{rows}, {d}]"), &inputs, |t| {
            Ok(vec![ew::l2_normalize_forward(&t[0])?, ew::l2_normalize_backward(&t[1], &t[0])?])
        });
    }
}

#[test]
fn concat_and_narrow() {
    if !gpu("concat_and_narrow") {
        return;
    }
    let mut rng = Rng::new(8);
    // The eval feature [N, 2048] ++ [N, 512], and concatenations along other axes.
    let cases: [(&[usize], &[usize], usize); 4] =
        [(&[64, 2048], &[64, 512], 1), (&[2, 3, 4], &[5, 3, 4], 0), (&[2, 3, 4, 5], &[2, 3, 2, 5], 2), (&[2, 3], &[2, 1], 1)];
    for (a, b, axis) in cases {
        let inputs = [randn(a, &mut rng), randn(b, &mut rng)];
        check(&format!("concat/narrow {a:?} ++ {b:?} on axis {axis}"), &inputs, |t| {
            let y = ew::concat(&[&t[0], &t[1]], axis)?;
            let first = ew::narrow(&y, axis, 0, a[axis])?;
            let last = ew::narrow(&y, axis, a[axis], b[axis])?;
            let middle = ew::narrow(&y, axis, a[axis] / 2, 1)?;
            Ok(vec![y, first, last, middle])
        });
    }
}

#[test]
fn windowed_pools() {
    if !gpu("windowed_pools") {
        return;
    }
    let mut rng = Rng::new(9);
    // OSNet's max pool 3x3/2 pad 1 after conv1 and its transition avg pool 2x2/2, and odd sizes.
    let cases = [
        ([4, 64, 128, 64], Pool2dCfg::new(3, 2, 1)),
        ([4, 256, 64, 32], Pool2dCfg::new(2, 2, 0)),
        ([2, 3, 7, 5], Pool2dCfg::new(3, 2, 1)),
        ([2, 3, 9, 6], Pool2dCfg::new(3, 1, 1)),
    ];
    for (xs, cfg) in cases {
        let y_shape = pool::pool2d_output_shape("test", &xs, cfg).unwrap();
        let inputs = [randn(&xs, &mut rng), randn(&y_shape, &mut rng)];
        check(&format!("max/avg pool {xs:?} {cfg:?}"), &inputs, |t| {
            Ok(vec![
                pool::max_pool2d_forward(&t[0], cfg)?,
                pool::max_pool2d_backward(&t[1], &t[0], cfg)?,
                pool::avg_pool2d_forward(&t[0], cfg)?,
                pool::avg_pool2d_backward(&t[1], &xs, cfg)?,
            ])
        });
    }
}

#[test]
fn global_and_stripe_pools() {
    if !gpu("global_and_stripe_pools") {
        return;
    }
    let mut rng = Rng::new(10);
    for xs in [[64, 512, 16, 8], [4, 64, 64, 32], [2, 3, 4, 5]] {
        let (n, c) = (xs[0], xs[1]);
        let inputs = [randn(&xs, &mut rng), randn(&[n, c, 1, 1], &mut rng), randn(&[n, 4 * c], &mut rng)];
        check(&format!("global/stripe pools {xs:?}"), &inputs, |t| {
            Ok(vec![
                pool::global_avg_pool_forward(&t[0])?,
                pool::global_avg_pool_backward(&t[1], &xs)?,
                pool::global_max_pool_forward(&t[0])?,
                pool::global_max_pool_backward(&t[1], &t[0])?,
                pool::stripe_avg_pool_forward(&t[0], 4)?,
                pool::stripe_avg_pool_backward(&t[2], &xs, 4)?,
            ])
        });
    }
}

/// NaN propagates through max pools as in PyTorch, and the gradient goes to the last NaN.
#[test]
fn max_pools_propagate_nan() {
    if !gpu("max_pools_propagate_nan") {
        return;
    }
    let mut rng = Rng::new(19);
    let xs = [2, 3, 6, 5];
    let mut x = randn(&xs, &mut rng).to_vec().unwrap();
    for i in [7, 8, 33, 95, 96] {
        x[i] = f32::NAN;
    }
    let x = Tensor::from_vec(x, &xs).unwrap();
    let cfg = Pool2dCfg::new(3, 2, 1);
    let y_shape = pool::pool2d_output_shape("test", &xs, cfg).unwrap();
    let (dy, dg) = (randn(&y_shape, &mut rng), randn(&[2, 3, 1, 1], &mut rng));
    let run = |x: &Tensor, dy: &Tensor, dg: &Tensor| -> Vec<Vec<f32>> {
        [
            pool::max_pool2d_forward(x, cfg).unwrap(),
            pool::max_pool2d_backward(dy, x, cfg).unwrap(),
            pool::global_max_pool_forward(x).unwrap(),
            pool::global_max_pool_backward(dg, x).unwrap(),
        ]
        .iter()
        .map(|t| t.to_vec().unwrap())
        .collect()
    };
    let cuda = |t: &Tensor| t.to_device(Device::Cuda).unwrap();
    let (on_cpu, on_gpu) = (run(&x, &dy, &dg), run(&cuda(&x), &cuda(&dy), &cuda(&dg)));
    for (k, (a, b)) in on_cpu.iter().zip(&on_gpu).enumerate() {
        assert!(a.iter().any(|v| v.is_nan()) || k % 2 == 1, "output {k} should hold a NaN");
        for (i, (u, v)) in a.iter().zip(b).enumerate() {
            assert!((u.is_nan() && v.is_nan()) || (u - v).abs() <= 1e-6 * u.abs().max(1.0), "output {k}[{i}]: cpu {u}, gpu {v}");
        }
    }
}

#[test]
fn linear_layer() {
    if !gpu("linear_layer") {
        return;
    }
    let mut rng = Rng::new(11);
    // fc2 512->512 with bias, classifier1 2048->751, and a tiny odd one.
    for (n, fin, fout, bias) in [(64, 512, 512, true), (64, 2048, 751, true), (3, 5, 7, false)] {
        let mut inputs =
            vec![randn(&[n, fin], &mut rng), ew::scale(&randn(&[fout, fin], &mut rng), 0.05).unwrap(), randn(&[n, fout], &mut rng)];
        if bias {
            inputs.push(randn(&[fout], &mut rng));
        }
        check(&format!("linear [{n}, {fin}] -> {fout}"), &inputs, |t| {
            let y = linear::linear_forward(&t[0], &t[1], t.get(3))?;
            let (dx, dw, db) = linear::linear_backward(&t[2], &t[0], &t[1])?;
            Ok(vec![y, dx, dw, db])
        });
    }
}

#[test]
fn bmm() {
    if !gpu("bmm") {
        return;
    }
    let mut rng = Rng::new(12);
    // PAM after conv2 (C = 256, C/8 = 32, N = 512): energy = Q^T K, out = X A^T; and every
    // transpose combination on odd sizes.
    let (b, c, q, n) = (2, 256, 32, 512);
    let cases: Vec<([usize; 3], [usize; 3], bool, bool)> = vec![
        ([b, q, n], [b, q, n], true, false),
        ([b, c, n], [b, n, n], false, true),
        ([3, 4, 5], [3, 5, 6], false, false),
        ([3, 5, 4], [3, 5, 6], true, false),
        ([3, 4, 5], [3, 6, 5], false, true),
        ([3, 5, 4], [3, 6, 5], true, true),
        ([1, 7, 3], [1, 3, 2], false, false),
    ];
    for (a_shape, b_shape, ta, tb) in cases {
        let (batch, m, nn, _) = att::bmm_dims("test", &a_shape, &b_shape, ta, tb).unwrap();
        let inputs = [randn(&a_shape, &mut rng), randn(&b_shape, &mut rng), randn(&[batch, m, nn], &mut rng)];
        check(&format!("bmm {a_shape:?}{} x {b_shape:?}{}", if ta { "^T" } else { "" }, if tb { "^T" } else { "" }), &inputs, |t| {
            let y = att::bmm(&t[0], &t[1], ta, tb)?;
            let (da, db) = att::bmm_backward(&t[2], &t[0], &t[1], ta, tb)?;
            Ok(vec![y, da, db])
        });
    }
}

#[test]
fn softmax() {
    if !gpu("softmax") {
        return;
    }
    let mut rng = Rng::new(13);
    for shape in [vec![2, 512, 512], vec![4, 128, 128], vec![3, 751], vec![5, 1], vec![2, 40]] {
        let inputs = [ew::scale(&randn(&shape, &mut rng), 5.0).unwrap(), randn(&shape, &mut rng)];
        check(&format!("softmax {shape:?}"), &inputs, |t| {
            let y = att::softmax_lastdim_forward(&t[0])?;
            Ok(vec![att::softmax_lastdim_backward(&t[1], &y)?, y])
        });
    }
}

/// A PK batch: `ids` identities (out of `classes`) with `k` images each.
fn pk_labels(ids: usize, k: usize, classes: usize, rng: &mut Rng) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..classes).collect();
    rng.shuffle(&mut pool);
    pool[..ids].iter().flat_map(|&l| std::iter::repeat_n(l, k)).collect()
}

#[test]
fn cross_entropy() {
    if !gpu("cross_entropy") {
        return;
    }
    let mut rng = Rng::new(14);
    for (n, k) in [(64, 751), (64, 702), (5, 3)] {
        let labels: Vec<usize> = (0..n).map(|_| rng.below(k)).collect();
        let inputs = [ew::scale(&randn(&[n, k], &mut rng), 3.0).unwrap(), Tensor::scalar(0.7, Device::Cpu).unwrap()];
        check(&format!("cross entropy [{n}, {k}]"), &inputs, |t| {
            let l = loss::cross_entropy_label_smooth_forward(&t[0], &labels, 0.1)?;
            Ok(vec![l, loss::cross_entropy_label_smooth_backward(&t[1], &t[0], &labels, 0.1)?])
        });
    }
}

#[test]
fn triplet() {
    if !gpu("triplet") {
        return;
    }
    let mut rng = Rng::new(15);
    for (ids, k, d) in [(16, 4, 2048), (16, 4, 512), (3, 2, 7)] {
        let labels = pk_labels(ids, k, 751, &mut rng);
        let inputs = [randn(&[ids * k, d], &mut rng), Tensor::scalar(1.3, Device::Cpu).unwrap()];
        check(&format!("triplet [{}, {d}]", ids * k), &inputs, |t| {
            let l = loss::triplet_soft_margin_forward(&t[0], &labels)?;
            Ok(vec![l, loss::triplet_soft_margin_backward(&t[1], &t[0], &labels)?])
        });
    }
}

#[test]
fn center_loss() {
    if !gpu("center_loss") {
        return;
    }
    let mut rng = Rng::new(16);
    // Market-sized centers, and a center table smaller than the label range (labels >= K are left
    // out, as for CUHK03 with 751 centers).
    for (n, d, classes, k) in [(64, 2048, 751, 751), (64, 512, 751, 751), (8, 5, 6, 4)] {
        let labels: Vec<usize> = (0..n).map(|_| rng.below(classes)).collect();
        let inputs = [randn(&[n, d], &mut rng), randn(&[k, d], &mut rng), Tensor::scalar(0.9, Device::Cpu).unwrap()];
        check(&format!("center loss [{n}, {d}], {k} centers"), &inputs, |t| {
            let l = loss::center_loss_forward(&t[0], &labels, &t[1])?;
            let (dx, dc) = loss::center_loss_backward(&t[2], &t[0], &labels, &t[1])?;
            Ok(vec![l, dx, dc])
        });
    }
}

#[test]
fn adam_matches_torch_formula() {
    if !gpu("adam_matches_torch_formula") {
        return;
    }
    let mut rng = Rng::new(17);
    let n = 100_003;
    let (lr, b1, b2, eps, wd) = (3.5e-4f32, 0.9f32, 0.999f32, 1e-8f32, 5e-4f32);
    let p0 = randn(&[n], &mut rng);
    let grads: Vec<Tensor> = (0..3).map(|_| randn(&[n], &mut rng)).collect();
    let mut p = p0.to_device(Device::Cuda).unwrap();
    let mut m = Tensor::zeros(&[n], Device::Cuda).unwrap();
    let mut v = m.clone(); // shares m's buffer: the update must copy before writing
    for (t, g) in grads.iter().enumerate() {
        let g = g.to_device(Device::Cuda).unwrap();
        plr_engine::cuda::optim::adam_update(&mut p, &g, &mut m, &mut v, lr, b1, b2, eps, wd, t as u32 + 1).unwrap();
    }
    // f64 reference of torch.optim.Adam.
    let (mut pr, mut mr, mut vr) = (p0.to_vec().unwrap().iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0f64; n], vec![0f64; n]);
    for (t, g) in grads.iter().enumerate() {
        let step = t as i32 + 1;
        for (i, &gi) in g.to_vec().unwrap().iter().enumerate() {
            let gi = gi as f64 + wd as f64 * pr[i];
            mr[i] = b1 as f64 * mr[i] + (1.0 - b1 as f64) * gi;
            vr[i] = b2 as f64 * vr[i] + (1.0 - b2 as f64) * gi * gi;
            let mh = mr[i] / (1.0 - (b1 as f64).powi(step));
            let vh = vr[i] / (1.0 - (b2 as f64).powi(step));
            pr[i] -= lr as f64 * mh / (vh.sqrt() + eps as f64);
        }
    }
    let to32 = |v: &[f64]| Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), &[n]).unwrap();
    assert_close("adam param", &to32(&pr), &p);
    assert_close("adam m", &to32(&mr), &m);
    assert_close("adam v", &to32(&vr), &v);
    // The step must have moved the parameters by about lr each (Adam's normalised step).
    let moved = norm_rel_err(&p0.to_vec().unwrap(), &p.to_vec().unwrap());
    assert!(moved > 1e-5, "parameters did not move ({moved:.1e})");
}

/// A small network through the tape: conv -> BN -> ReLU -> max pool -> gate (sigmoid, mul) ->
/// stripes -> linear -> CE + triplet; loss and every leaf gradient must agree between devices.
#[test]
fn tape_end_to_end() {
    if !gpu("tape_end_to_end") {
        return;
    }
    let mut rng = Rng::new(18);
    let labels = pk_labels(4, 2, 10, &mut rng);
    let inputs = [
        randn(&[8, 3, 16, 8], &mut rng),
        ew::scale(&randn(&[16, 3, 3, 3], &mut rng), 0.3).unwrap(),
        Tensor::ones(&[16], Device::Cpu).unwrap(),
        Tensor::zeros(&[16], Device::Cpu).unwrap(),
        ew::scale(&randn(&[10, 64], &mut rng), 0.1).unwrap(),
        Tensor::zeros(&[10], Device::Cpu).unwrap(),
    ];
    check("tape end to end", &inputs, |t| {
        let mut tape = Tape::new();
        let v: Vec<_> = t.iter().map(|x| tape.leaf(x.clone())).collect();
        let h = tape.conv2d(&v[0], &v[1], None, Conv2dCfg::new(1, 1, 1))?;
        let (h, _) = tape.batchnorm_train(&h, &v[2], &v[3], bn::BN_EPS)?;
        let h = tape.relu(&h)?;
        let h = tape.max_pool2d(&h, Pool2dCfg::new(3, 2, 1))?;
        let g = tape.global_avg_pool(&h)?;
        let g = tape.sigmoid(&g)?;
        let h = tape.mul(&h, &g)?;
        let f = tape.stripe_avg_pool(&h, 4)?;
        let logits = tape.linear(&f, &v[4], Some(&v[5]))?;
        let ce = tape.cross_entropy_label_smooth(&logits, &labels, 0.1)?;
        let tri = tape.triplet_soft_margin(&f, &labels)?;
        let total = tape.add(&ce, &tri)?;
        let loss = total.value().clone();
        let grads = tape.backward(&total)?;
        let mut out = vec![loss];
        out.extend(v.iter().map(|x| grads.of(x).expect("every leaf gets a gradient").clone()));
        Ok(out)
    });
}

/// cuDNN handles are per thread; several threads using the GPU at once must all get right answers.
#[test]
fn concurrent_threads() {
    if !gpu("concurrent_threads") {
        return;
    }
    let results: Vec<std::thread::JoinHandle<()>> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + i);
                let cfg = Conv2dCfg::new(1, 1, 1);
                let inputs = [randn(&[2, 16, 12, 10], &mut rng), randn(&[24, 16, 3, 3], &mut rng)];
                for _ in 0..5 {
                    check(&format!("thread {i} conv + softmax"), &inputs, |t| {
                        let y = conv::conv2d_forward(&t[0], &t[1], None, cfg)?;
                        let s = att::softmax_lastdim_forward(&y)?;
                        Ok(vec![y, s])
                    });
                }
            })
        })
        .collect();
    for r in results {
        r.join().expect("a GPU thread failed");
    }
}

#[test]
fn bf16_cast_and_transfer() {
    if !gpu("bf16_cast_and_transfer") {
        return;
    }
    use plr_engine::tensor::DType;
    let mut rng = Rng::new(31);
    // Values spread over many binades, plus ties and specials.
    let mut v = Tensor::randn(&[4099], 50.0, &mut rng).to_vec().unwrap();
    v.extend([1.0 + 2f32.powi(-8), -(1.0 + 3.0 * 2f32.powi(-8)), 0.0, -0.0, f32::INFINITY, 3.4e38, 1e-40]);
    let x = Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
    let want = x.to_dtype(DType::BF16).unwrap();
    let on_gpu = x.to_device(Device::Cuda).unwrap().to_dtype(DType::BF16).unwrap();
    assert_eq!(on_gpu.dtype(), DType::BF16);
    // The GPU rounds exactly as the CPU does, both ways, and transfers keep bf16 values exact.
    assert_eq!(on_gpu.to_vec().unwrap(), want.to_vec().unwrap());
    assert_eq!(on_gpu.to_device(Device::Cpu).unwrap().to_vec().unwrap(), want.to_vec().unwrap());
    assert_eq!(want.to_device(Device::Cuda).unwrap().to_vec().unwrap(), want.to_vec().unwrap());
    let back = on_gpu.to_dtype(DType::F32).unwrap();
    assert_eq!((back.dtype(), back.to_vec().unwrap()), (DType::F32, want.to_vec().unwrap()));
    let nan = Tensor::from_vec(vec![f32::NAN], &[1]).unwrap().to_device(Device::Cuda).unwrap().to_dtype(DType::BF16).unwrap();
    assert!(nan.to_vec().unwrap()[0].is_nan());
}

#[test]
fn bf16_conv2d() {
    if !gpu("bf16_conv2d") {
        return;
    }
    use plr_engine::cuda::dwconv::{set_depthwise_impl, DepthwiseImpl};
    let mut rng = Rng::new(41);
    // cuDNN: PLR-OSNet's 1x1 256->384 at 32x16, conv1 7x7/2, a channel gate's 1x1 with bias on
    // [N, C, 1, 1] and a strided grouped conv with bias. Then its depthwise 3x3 (128 channels at
    // 32x16) through both implementations.
    let cases = [
        ([4, 256, 32, 16], [384, 256, 1, 1], Conv2dCfg::new(1, 0, 1), false),
        ([2, 3, 256, 128], [64, 3, 7, 7], Conv2dCfg::new(2, 3, 1), false),
        ([64, 256, 1, 1], [16, 256, 1, 1], Conv2dCfg::new(1, 0, 1), true),
        ([3, 8, 11, 9], [12, 2, 3, 3], Conv2dCfg::new(2, 1, 4), true),
        ([16, 128, 32, 16], [128, 1, 3, 3], Conv2dCfg::new(1, 1, 128), false),
    ];
    for (xs, ws, cfg, with_bias) in cases {
        let y_shape = conv::conv2d_output_shape(&xs, &ws, cfg).unwrap();
        let mut inputs = vec![randn_bf16(&xs, &mut rng), randn_bf16(&ws, &mut rng), randn_bf16(&y_shape, &mut rng)];
        let mut dtypes = vec![BF16, BF16, BF16];
        if with_bias {
            inputs.push(randn(&[ws[0]], &mut rng));
            dtypes.push(F32);
        }
        let impls: &[DepthwiseImpl] =
            if cfg.groups == xs[1] && ws[2] == 3 { &[DepthwiseImpl::Cudnn, DepthwiseImpl::Engine] } else { &[DepthwiseImpl::Engine] };
        for &choice in impls {
            set_depthwise_impl(choice);
            check_bf16(&format!("bf16 conv2d x {xs:?} w {ws:?} {cfg:?} depthwise {choice:?}"), &inputs, &dtypes, |t| {
                let (x, w, dy, b) = (&t[0], &t[1], &t[2], t.get(3));
                let mut out = vec![
                    conv::conv2d_forward(x, w, b, cfg)?,
                    conv::conv2d_backward_data(dy, w, x.shape(), cfg)?,
                    conv::conv2d_backward_filter(dy, x, w.shape(), cfg)?,
                ];
                if b.is_some() {
                    out.push(conv::conv2d_backward_bias(dy)?);
                }
                Ok(out)
            });
        }
    }
}

#[test]
fn bf16_depthwise_3x3_engine_kernels() {
    if !gpu("bf16_depthwise_3x3_engine_kernels") {
        return;
    }
    use plr_engine::cuda::dwconv;
    let mut rng = Rng::new(42);
    for xs in DEPTHWISE_SHAPES {
        let c = xs[1];
        let cfg = Conv2dCfg::new(1, 1, c);
        let inputs = [randn_bf16(&xs, &mut rng), randn_bf16(&[c, 1, 3, 3], &mut rng), randn_bf16(&xs, &mut rng)];
        let what = format!("bf16 engine depthwise x {xs:?}");
        let on_cpu = [
            conv::conv2d_forward(&inputs[0], &inputs[1], None, cfg).unwrap(),
            conv::conv2d_backward_data(&inputs[2], &inputs[1], &xs, cfg).unwrap(),
            conv::conv2d_backward_filter(&inputs[2], &inputs[0], &[c, 1, 3, 3], cfg).unwrap(),
        ];
        let d: Vec<Tensor> = inputs.iter().map(|t| t.to_device(Device::Cuda).unwrap()).collect();
        let on_gpu = [
            dwconv::forward(&d[0], &d[1]).unwrap(),
            dwconv::backward_data(&d[2], &d[1]).unwrap(),
            dwconv::backward_filter(&d[2], &d[0]).unwrap(),
        ];
        for ((out, c), g) in ["forward", "backward data", "backward filter"].iter().zip(&on_cpu).zip(&on_gpu) {
            assert_eq!(g.dtype(), BF16, "{what} {out}");
            assert_close(&format!("{what} {out}"), c, g);
        }
        let again = dwconv::backward_filter(&d[2], &d[0]).unwrap();
        assert_eq!(again.to_vec().unwrap(), on_gpu[2].to_vec().unwrap(), "{what}: filter gradient not deterministic");
    }
    // Mixed dtypes are refused, naming the kernel.
    let x = Tensor::zeros(&[2, 4, 5, 5], Device::Cuda).unwrap();
    let w = Tensor::zeros(&[4, 1, 3, 3], Device::Cuda).unwrap().to_dtype(BF16).unwrap();
    let e = dwconv::forward(&x, &w).unwrap_err().to_string();
    assert!(e.contains("dwconv3x3_forward"), "{e}");
}

#[test]
fn bf16_batchnorm() {
    if !gpu("bf16_batchnorm") {
        return;
    }
    let mut rng = Rng::new(43);
    // The LightConv BN at 64x32, a 1x1 ConvBn at 16x8, the BatchNorm1d of the 2048-d feature and
    // an odd shape.
    for shape in [vec![16, 64, 64, 32], vec![64, 512, 16, 8], vec![64, 2048], vec![3, 5, 7, 1]] {
        let c = shape[1];
        // Shifted, scaled inputs so the mean and variance matter.
        let x = ew::scale(&ew::add(&randn(&shape, &mut rng), &Tensor::full(&[1], 0.5, Device::Cpu).unwrap()).unwrap(), 3.0).unwrap();
        let inputs = [
            x.to_dtype(BF16).unwrap(),
            randn(&[c], &mut rng),
            randn(&[c], &mut rng),
            randn_bf16(&shape, &mut rng),
            randn(&[c], &mut rng),
            Tensor::rand_uniform(&[c], 0.5, 2.0, &mut rng),
        ];
        let [a, f] = [BF16, F32];
        check_bf16(&format!("bf16 batchnorm train {shape:?}"), &inputs, &[a, f, f, f, a, f, f, f, f], |t| {
            let (y, stats) = bn::batchnorm_forward_train(&t[0], &t[1], &t[2], bn::BN_EPS)?;
            let (dx, dgamma, dbeta) = bn::batchnorm_backward_train(&t[3], &t[0], &t[1], &stats)?;
            let (mut rm, mut rv) = (t[4].clone(), t[5].clone());
            bn::batchnorm_update_running(&mut rm, &mut rv, &stats, bn::BN_MOMENTUM)?;
            Ok(vec![y, stats.mean, stats.invstd, stats.var_unbiased, dx, dgamma, dbeta, rm, rv])
        });
        check_bf16(&format!("bf16 batchnorm+relu train {shape:?}"), &inputs, &[a, a, f, f], |t| {
            let (y, stats) = bn::batchnorm_relu_forward_train(&t[0], &t[1], &t[2], bn::BN_EPS)?;
            let (dx, dgamma, dbeta) = bn::batchnorm_relu_backward_train(&t[3], &y, &t[0], &t[1], &stats)?;
            Ok(vec![y, dx, dgamma, dbeta])
        });
        check_bf16(&format!("bf16 batchnorm eval {shape:?}"), &inputs, &[a, a, f, f], |t| {
            let y = bn::batchnorm_forward_eval(&t[0], &t[1], &t[2], &t[4], &t[5], bn::BN_EPS)?;
            let (dx, dgamma, dbeta) = bn::batchnorm_backward_eval(&t[3], &t[0], &t[1], &t[4], &t[5], bn::BN_EPS)?;
            Ok(vec![y, dx, dgamma, dbeta])
        });
    }
}

#[test]
fn bf16_elementwise() {
    if !gpu("bf16_elementwise") {
        return;
    }
    let mut rng = Rng::new(44);
    for shape in [vec![4, 64, 64, 32], vec![3, 5, 1, 2]] {
        // The sigmoid's backward gets its own y: a one-ulp difference between the devices' forward
        // outputs near 1 would change 1 - y by far more than one bf16 ulp of the gradient.
        let inputs = [
            ew::scale(&randn(&shape, &mut rng), 4.0).unwrap().to_dtype(BF16).unwrap(),
            randn_bf16(&shape, &mut rng),
            Tensor::rand_uniform(&shape, 0.0, 1.0, &mut rng).to_dtype(BF16).unwrap(),
        ];
        check_bf16(&format!("bf16 relu/sigmoid/scale {shape:?}"), &inputs, &[BF16; 5], |t| {
            let r = ew::relu_forward(&t[0])?;
            let s = ew::sigmoid_forward(&t[0])?;
            Ok(vec![ew::relu_backward(&t[1], &r)?, ew::sigmoid_backward(&t[1], &t[2])?, ew::scale(&t[0], -0.37)?, r, s])
        });
    }
    // The channel gate [N, C, 1, 1] (mul_backward reduces dy * a over H*W), the residual add, a
    // channel vector broadcast over N and an odd one.
    let cases: [(&[usize], &[usize]); 4] = [
        (&[16, 256, 32, 16], &[16, 256, 1, 1]),
        (&[4, 64, 32, 16], &[4, 64, 32, 16]),
        (&[2, 3, 4, 5], &[3, 1, 1]),
        (&[2, 3, 4, 5], &[1, 3, 1, 5]),
    ];
    for (a, b) in cases {
        let inputs = [randn_bf16(a, &mut rng), randn_bf16(b, &mut rng), randn_bf16(a, &mut rng)];
        check_bf16(&format!("bf16 add/mul/sum_to_shape/broadcast_to {a:?} with {b:?}"), &inputs, &[BF16; 6], |t| {
            let (da, db) = ew::mul_backward(&t[2], &t[0], &t[1])?;
            Ok(vec![ew::add(&t[0], &t[1])?, ew::mul(&t[0], &t[1])?, da, db, ew::sum_to_shape(&t[2], b)?, ew::broadcast_to(&t[1], a)?])
        });
    }
    // The part branch's concat of stripe features, and one along an inner axis.
    let cases: [(&[usize], &[usize], usize); 2] = [(&[64, 2048], &[64, 512], 1), (&[2, 3, 4, 5], &[2, 3, 2, 5], 2)];
    for (a, b, axis) in cases {
        let inputs = [randn_bf16(a, &mut rng), randn_bf16(b, &mut rng)];
        let out = check_bf16(&format!("bf16 concat/narrow {a:?} ++ {b:?} on axis {axis}"), &inputs, &[BF16; 2], |t| {
            let y = ew::concat(&[&t[0], &t[1]], axis)?;
            Ok(vec![ew::narrow(&y, axis, a[axis], b[axis])?, y])
        });
        // Copies: bit-exact.
        assert_eq!(out[0].to_vec().unwrap(), inputs[1].to_vec().unwrap(), "bf16 narrow of a concat");
    }
}

#[test]
fn bf16_pools() {
    if !gpu("bf16_pools") {
        return;
    }
    let mut rng = Rng::new(45);
    // OSNet's max pool 3x3/2 pad 1 after conv1, its transition avg pool 2x2/2, and an odd size.
    let cases =
        [([4, 64, 128, 64], Pool2dCfg::new(3, 2, 1)), ([4, 256, 64, 32], Pool2dCfg::new(2, 2, 0)), ([2, 3, 7, 5], Pool2dCfg::new(3, 2, 1))];
    for (xs, cfg) in cases {
        let y_shape = pool::pool2d_output_shape("test", &xs, cfg).unwrap();
        let inputs = [randn_bf16(&xs, &mut rng), randn_bf16(&y_shape, &mut rng)];
        check_bf16(&format!("bf16 max/avg pool {xs:?} {cfg:?}"), &inputs, &[BF16; 4], |t| {
            Ok(vec![
                pool::max_pool2d_forward(&t[0], cfg)?,
                pool::max_pool2d_backward(&t[1], &t[0], cfg)?,
                pool::avg_pool2d_forward(&t[0], cfg)?,
                pool::avg_pool2d_backward(&t[1], &xs, cfg)?,
            ])
        });
    }
    for xs in [[64, 512, 16, 8], [2, 3, 4, 5]] {
        let (n, c) = (xs[0], xs[1]);
        let inputs = [randn_bf16(&xs, &mut rng), randn_bf16(&[n, c, 1, 1], &mut rng), randn_bf16(&[n, 4 * c], &mut rng)];
        check_bf16(&format!("bf16 global/stripe pools {xs:?}"), &inputs, &[BF16; 6], |t| {
            Ok(vec![
                pool::global_avg_pool_forward(&t[0])?,
                pool::global_avg_pool_backward(&t[1], &xs)?,
                pool::global_max_pool_forward(&t[0])?,
                pool::global_max_pool_backward(&t[1], &t[0])?,
                pool::stripe_avg_pool_forward(&t[0], 4)?,
                pool::stripe_avg_pool_backward(&t[2], &xs, 4)?,
            ])
        });
    }
}
