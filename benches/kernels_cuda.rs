//! GPU kernel throughput at PLR-OSNet's real shapes (batch 64, 256x128 input): every op family,
//! forward and backward, plus a device-to-device copy that measures the bandwidth the
//! memory-bound kernels are judged against.
//!
//! `cargo bench --bench kernels_cuda` (filters work as usual: `-- depthwise`; `-- --test` runs
//! each benchmark once). Without a usable GPU it prints one line and exits 0.
//!
//! Memory-bound ops report criterion "bytes": each input read once plus each output written once,
//! the least any implementation must move, so GB/s divided by the copy's GB/s is the fraction of
//! the achievable bandwidth. Matrix products report "elements" = FLOPs (2 per multiply-add), so
//! elem/s reads as FLOP/s. A summary table with both ratios is printed at the end.
//!
//! Each sample times `iters` back-to-back calls between two stream synchronisations, so the
//! figures include the engine's host-side launch cost (what a training step pays), not one sync
//! per call. The depthwise layers run twice: the engine's kernels and cuDNN's grouped convolution
//! (`set_depthwise_impl`); BatchNorm runs alone, fused with the ReLU after it, and as the two
//! separate ops the fusion replaces.
//!
//! The convolution, depthwise, BatchNorm, pool and elementwise families run twice: on f32 and on
//! bf16 activations (groups named `..._bf16`, so `-- bf16` runs only those). bf16 bytes count 2 per
//! activation element (BatchNorm's f32 per-channel parameters and statistics are left out, as
//! negligible), so the GB/s of the two are comparable and their times show the bandwidth gain.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput};
use plr_engine::cuda::dwconv::{set_depthwise_impl, DepthwiseImpl};
use plr_engine::ops::attention as att;
use plr_engine::ops::batchnorm as bn;
use plr_engine::ops::conv::{self, Conv2dCfg};
use plr_engine::ops::elementwise as ew;
use plr_engine::ops::linear;
use plr_engine::ops::loss;
use plr_engine::ops::pool::{self, Pool2dCfg};
use plr_engine::rng::Rng;
use plr_engine::tensor::{DType, Storage};
use plr_engine::{Device, Tensor};

const BATCH: usize = 64;
/// Market-1501's training identities (classifier width).
const CLASSES: usize = 751;

/// What a benchmark moves or computes per call.
#[derive(Clone, Copy)]
enum Work {
    Bytes(u64),
    Flops(u64),
}

/// (group/function, work, fastest time per call seen) for the summary.
static RESULTS: Mutex<Vec<(String, Work, f64)>> = Mutex::new(Vec::new());

fn sync() {
    plr_engine::cuda::synchronize().expect("synchronize");
}

/// Registers `f` in `g` under `name`, timed on the GPU (see the module comment).
fn gpu_bench<T>(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    group: &str,
    name: &str,
    work: Work,
    mut f: impl FnMut() -> T,
) {
    g.throughput(match work {
        Work::Bytes(b) => Throughput::Bytes(b),
        Work::Flops(n) => Throughput::Elements(n),
    });
    let id = format!("{group}/{name}");
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            sync();
            let t = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            sync();
            let el = t.elapsed();
            let per_call = el.as_secs_f64() / iters.max(1) as f64;
            let mut r = RESULTS.lock().unwrap_or_else(|e| e.into_inner());
            match r.iter_mut().find(|e| e.0 == id) {
                Some(e) => e.2 = e.2.min(per_call),
                None => r.push((id.clone(), work, per_call)),
            }
            el
        })
    });
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    g
}

fn gpu_randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    gpu_randn_as(shape, DType::F32, rng)
}

fn gpu_randn_as(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, rng).to_device(Device::Cuda).and_then(|t| t.to_dtype(dtype)).expect("copy to the GPU")
}

/// Bytes of tensors of these shapes holding `dtype` elements.
fn bytes(dtype: DType, shapes: &[&[usize]]) -> Work {
    Work::Bytes(shapes.iter().map(|s| (dtype.size_in_bytes() * s.iter().product::<usize>()) as u64).sum())
}

/// The group-name suffix of a dtype's benchmarks.
fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "",
        DType::BF16 => "_bf16",
    }
}

fn copy(c: &mut Criterion, rng: &mut Rng) {
    // 256 MiB, far above the L2 cache: a pure HBM read + write.
    let x = gpu_randn(&[64 << 20], rng);
    let Storage::Cuda(buf) = x.storage() else { unreachable!("moved to the GPU above") };
    let mut g = group(c, "copy");
    gpu_bench(&mut g, "copy", "device_to_device_256MiB", bytes(DType::F32, &[x.shape(), x.shape()]), || {
        buf.try_clone().expect("device copy")
    });
    g.finish();
}

fn conv_1x1(c: &mut Criterion, rng: &mut Rng, dt: DType) {
    // OSBlock reduce (256->64), expand (64->256) at 64x32; conv3's transition 256->384 at 32x16;
    // conv4's reduce 512->128 at 16x8.
    for (cin, cout, h, w) in [(256, 64, 64, 32), (64, 256, 64, 32), (256, 384, 32, 16), (512, 128, 16, 8)] {
        let name = format!("conv1x1_{cin}to{cout}_{h}x{w}{}", suffix(dt));
        let cfg = Conv2dCfg::new(1, 0, 1);
        let (x, wt, dy) = (
            gpu_randn_as(&[BATCH, cin, h, w], dt, rng),
            gpu_randn_as(&[cout, cin, 1, 1], dt, rng),
            gpu_randn_as(&[BATCH, cout, h, w], dt, rng),
        );
        let flops = Work::Flops(2 * (BATCH * cin * cout * h * w) as u64);
        let mut g = group(c, &name);
        gpu_bench(&mut g, &name, "forward", flops, || conv::conv2d_forward(&x, &wt, None, cfg).expect("forward"));
        gpu_bench(&mut g, &name, "backward_data", flops, || conv::conv2d_backward_data(&dy, &wt, x.shape(), cfg).expect("backward data"));
        gpu_bench(&mut g, &name, "backward_filter", flops, || {
            conv::conv2d_backward_filter(&dy, &x, wt.shape(), cfg).expect("backward filter")
        });
        g.finish();
    }
}

fn depthwise(c: &mut Criterion, rng: &mut Rng, dt: DType) {
    // LightConv's depthwise 3x3 in conv2, conv3 and conv4 (mid channels = out / 4).
    for (ch, h, w) in [(64, 64, 32), (96, 32, 16), (128, 16, 8)] {
        let name = format!("depthwise3x3_{ch}_{h}x{w}{}", suffix(dt));
        let cfg = Conv2dCfg::new(1, 1, ch);
        let (x, wt, dy) =
            (gpu_randn_as(&[BATCH, ch, h, w], dt, rng), gpu_randn_as(&[ch, 1, 3, 3], dt, rng), gpu_randn_as(&[BATCH, ch, h, w], dt, rng));
        let io = bytes(dt, &[x.shape(), x.shape()]);
        let mut g = group(c, &name);
        for (tag, choice) in [("engine", DepthwiseImpl::Engine), ("cudnn", DepthwiseImpl::Cudnn)] {
            set_depthwise_impl(choice);
            gpu_bench(&mut g, &name, &format!("{tag}_forward"), io, || conv::conv2d_forward(&x, &wt, None, cfg).expect("forward"));
            gpu_bench(&mut g, &name, &format!("{tag}_backward_data"), io, || {
                conv::conv2d_backward_data(&dy, &wt, x.shape(), cfg).expect("backward data")
            });
            gpu_bench(&mut g, &name, &format!("{tag}_backward_filter"), io, || {
                conv::conv2d_backward_filter(&dy, &x, wt.shape(), cfg).expect("backward filter")
            });
        }
        set_depthwise_impl(DepthwiseImpl::Engine);
        g.finish();
    }
}

fn batchnorm(c: &mut Criterion, rng: &mut Rng, dt: DType) {
    // BN after conv2/conv3/conv4-sized outputs, and BatchNorm1d on the 2048-d global feature.
    for shape in [vec![BATCH, 256, 64, 32], vec![BATCH, 64, 64, 32], vec![BATCH, 384, 32, 16], vec![BATCH, 512, 16, 8], vec![BATCH, 2048]] {
        let name = format!("batchnorm_train_{}{}", shape[1..].iter().map(usize::to_string).collect::<Vec<_>>().join("x"), suffix(dt));
        let ch = shape[1];
        let (x, dy, gamma, beta) =
            (gpu_randn_as(&shape, dt, rng), gpu_randn_as(&shape, dt, rng), gpu_randn(&[ch], rng), gpu_randn(&[ch], rng));
        let (_, stats) = bn::batchnorm_forward_train(&x, &gamma, &beta, bn::BN_EPS).expect("forward");
        let mut g = group(c, &name);
        gpu_bench(&mut g, &name, "forward", bytes(dt, &[&shape, &shape]), || {
            bn::batchnorm_forward_train(&x, &gamma, &beta, bn::BN_EPS).expect("forward")
        });
        gpu_bench(&mut g, &name, "backward", bytes(dt, &[&shape, &shape, &shape]), || {
            bn::batchnorm_backward_train(&dy, &x, &gamma, &stats).expect("backward")
        });
        // BN followed by ReLU: the fused op against the two ops it replaces (same minimal bytes).
        let (y, _) = bn::batchnorm_relu_forward_train(&x, &gamma, &beta, bn::BN_EPS).expect("forward");
        gpu_bench(&mut g, &name, "relu_fused_forward", bytes(dt, &[&shape, &shape]), || {
            bn::batchnorm_relu_forward_train(&x, &gamma, &beta, bn::BN_EPS).expect("forward")
        });
        gpu_bench(&mut g, &name, "relu_unfused_forward", bytes(dt, &[&shape, &shape]), || {
            let (z, s) = bn::batchnorm_forward_train(&x, &gamma, &beta, bn::BN_EPS).expect("forward");
            (ew::relu_forward(&z).expect("relu"), s)
        });
        gpu_bench(&mut g, &name, "relu_fused_backward", bytes(dt, &[&shape, &shape, &shape, &shape]), || {
            bn::batchnorm_relu_backward_train(&dy, &y, &x, &gamma, &stats).expect("backward")
        });
        gpu_bench(&mut g, &name, "relu_unfused_backward", bytes(dt, &[&shape, &shape, &shape, &shape]), || {
            let dz = ew::relu_backward(&dy, &y).expect("relu backward");
            bn::batchnorm_backward_train(&dz, &x, &gamma, &stats).expect("backward")
        });
        g.finish();
    }
}

fn pools(c: &mut Criterion, rng: &mut Rng, dt: DType) {
    let name = format!("pool{}", suffix(dt));
    let mut g = group(c, &name);
    // The stem's 3x3/2 max pool on conv1's 128x64 output.
    let x = gpu_randn_as(&[BATCH, 64, 128, 64], dt, rng);
    let cfg = Pool2dCfg::new(3, 2, 1);
    let y = pool::max_pool2d_forward(&x, cfg).expect("max pool");
    let dy = gpu_randn_as(y.shape(), dt, rng);
    gpu_bench(&mut g, &name, "maxpool3x3s2_64_128x64_forward", bytes(dt, &[x.shape(), y.shape()]), || {
        pool::max_pool2d_forward(&x, cfg).expect("fwd")
    });
    gpu_bench(&mut g, &name, "maxpool3x3s2_64_128x64_backward", bytes(dt, &[x.shape(), dy.shape(), x.shape()]), || {
        pool::max_pool2d_backward(&dy, &x, cfg).expect("bwd")
    });
    // The conv2 -> conv3 transition's 2x2 average pool.
    let x = gpu_randn_as(&[BATCH, 256, 64, 32], dt, rng);
    let cfg = Pool2dCfg::new(2, 2, 0);
    let y = pool::avg_pool2d_forward(&x, cfg).expect("avg pool");
    let dy = gpu_randn_as(y.shape(), dt, rng);
    gpu_bench(&mut g, &name, "avgpool2x2_256_64x32_forward", bytes(dt, &[x.shape(), y.shape()]), || {
        pool::avg_pool2d_forward(&x, cfg).expect("fwd")
    });
    gpu_bench(&mut g, &name, "avgpool2x2_256_64x32_backward", bytes(dt, &[dy.shape(), x.shape()]), || {
        pool::avg_pool2d_backward(&dy, x.shape(), cfg).expect("bwd")
    });
    // The heads: global max pool and 4-stripe average pool of conv5's 2048-channel 16x8 map, and
    // the channel gate's global average pool.
    let x = gpu_randn_as(&[BATCH, 2048, 16, 8], dt, rng);
    let y = pool::global_max_pool_forward(&x).expect("global max");
    let dy = gpu_randn_as(y.shape(), dt, rng);
    gpu_bench(&mut g, &name, "global_max_2048_16x8_forward", bytes(dt, &[x.shape(), y.shape()]), || {
        pool::global_max_pool_forward(&x).expect("fwd")
    });
    gpu_bench(&mut g, &name, "global_max_2048_16x8_backward", bytes(dt, &[x.shape(), dy.shape(), x.shape()]), || {
        pool::global_max_pool_backward(&dy, &x).expect("bwd")
    });
    let y = pool::stripe_avg_pool_forward(&x, 4).expect("stripe");
    let dy = gpu_randn_as(y.shape(), dt, rng);
    gpu_bench(&mut g, &name, "stripe4_avg_2048_16x8_forward", bytes(dt, &[x.shape(), y.shape()]), || {
        pool::stripe_avg_pool_forward(&x, 4).expect("fwd")
    });
    gpu_bench(&mut g, &name, "stripe4_avg_2048_16x8_backward", bytes(dt, &[dy.shape(), x.shape()]), || {
        pool::stripe_avg_pool_backward(&dy, x.shape(), 4).expect("bwd")
    });
    let x = gpu_randn_as(&[BATCH, 256, 64, 32], dt, rng);
    gpu_bench(&mut g, &name, "global_avg_256_64x32_forward", bytes(dt, &[x.shape()]), || pool::global_avg_pool_forward(&x).expect("fwd"));
    g.finish();
}

fn elementwise(c: &mut Criterion, rng: &mut Rng, dt: DType) {
    let name = format!("elementwise{}", suffix(dt));
    let mut g = group(c, &name);
    let s = [BATCH, 256, 64, 32];
    let (x, y2) = (gpu_randn_as(&s, dt, rng), gpu_randn_as(&s, dt, rng));
    let y = ew::relu_forward(&x).expect("relu");
    let gate = gpu_randn_as(&[BATCH, 256, 1, 1], dt, rng);
    gpu_bench(&mut g, &name, "relu_256_64x32_forward", bytes(dt, &[&s, &s]), || ew::relu_forward(&x).expect("fwd"));
    gpu_bench(&mut g, &name, "relu_256_64x32_backward", bytes(dt, &[&s, &s, &s]), || ew::relu_backward(&y2, &y).expect("bwd"));
    gpu_bench(&mut g, &name, "add_256_64x32", bytes(dt, &[&s, &s, &s]), || ew::add(&x, &y2).expect("add"));
    gpu_bench(&mut g, &name, "channel_gate_mul_256_64x32", bytes(dt, &[&s, &s]), || ew::mul(&x, &gate).expect("mul"));
    gpu_bench(&mut g, &name, "channel_gate_mul_256_64x32_backward", bytes(dt, &[&s, &s, &s]), || {
        ew::mul_backward(&y2, &x, &gate).expect("mul backward")
    });
    if dt == DType::F32 {
        // f32 only (the embedding's normalisation).
        let f = gpu_randn(&[BATCH, 2048], rng);
        gpu_bench(&mut g, &name, "l2_normalize_64x2048", bytes(dt, &[f.shape(), f.shape()]), || ew::l2_normalize_forward(&f).expect("l2"));
    }
    g.finish();
}

fn linear_layers(c: &mut Criterion, rng: &mut Rng) {
    let mut g = group(c, "linear");
    // The global branch's classifier (2048 -> 751) and the part branch's fc (2048 -> 512).
    for (fin, fout) in [(2048, CLASSES), (2048, 512)] {
        let (x, w, b, dy) =
            (gpu_randn(&[BATCH, fin], rng), gpu_randn(&[fout, fin], rng), gpu_randn(&[fout], rng), gpu_randn(&[BATCH, fout], rng));
        let flops = 2 * (BATCH * fin * fout) as u64;
        gpu_bench(&mut g, "linear", &format!("{fin}to{fout}_forward"), Work::Flops(flops), || {
            linear::linear_forward(&x, &w, Some(&b)).expect("fwd")
        });
        gpu_bench(&mut g, "linear", &format!("{fin}to{fout}_backward"), Work::Flops(2 * flops), || {
            linear::linear_backward(&dy, &x, &w).expect("bwd")
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion, rng: &mut Rng) {
    // Position attention after conv2 (256 channels, 64x32 = 2048 positions) and conv3 (384, 512):
    // energy = q^T k with q, k of C/8 channels, softmax over positions, out = x A^T.
    for (ch, pos) in [(256, 2048), (384, 512)] {
        let name = format!("attention_{ch}_{pos}pos");
        let qk = ch / 8;
        let (q, k, xv) = (gpu_randn(&[BATCH, qk, pos], rng), gpu_randn(&[BATCH, qk, pos], rng), gpu_randn(&[BATCH, ch, pos], rng));
        let energy = att::bmm(&q, &k, true, false).expect("energy");
        let a = att::softmax_lastdim_forward(&energy).expect("softmax");
        let dy_out = gpu_randn(&[BATCH, ch, pos], rng);
        let e = energy.shape().to_vec();
        let mut g = group(c, &name);
        let energy_flops = Work::Flops(2 * (BATCH * qk * pos * pos) as u64);
        let out_flops = 2 * (BATCH * ch * pos * pos) as u64;
        gpu_bench(&mut g, &name, "energy_bmm_forward", energy_flops, || att::bmm(&q, &k, true, false).expect("bmm"));
        gpu_bench(&mut g, &name, "softmax_forward", bytes(DType::F32, &[&e, &e]), || {
            att::softmax_lastdim_forward(&energy).expect("softmax")
        });
        gpu_bench(&mut g, &name, "softmax_backward", bytes(DType::F32, &[&e, &e, &e]), || {
            att::softmax_lastdim_backward(&a, &a).expect("softmax bwd")
        });
        gpu_bench(&mut g, &name, "out_bmm_forward", Work::Flops(out_flops), || att::bmm(&xv, &a, false, true).expect("bmm"));
        gpu_bench(&mut g, &name, "out_bmm_backward", Work::Flops(2 * out_flops), || {
            att::bmm_backward(&dy_out, &xv, &a, false, true).expect("bmm bwd")
        });
        g.finish();
    }
}

fn losses(c: &mut Criterion, rng: &mut Rng) {
    let mut g = group(c, "loss");
    // 16 identities x 4 images.
    let labels: Vec<usize> = (0..BATCH).map(|i| (i / 4) * 37 % CLASSES).collect();
    let logits = gpu_randn(&[BATCH, CLASSES], rng);
    let feat = gpu_randn(&[BATCH, 2048], rng);
    let centers = gpu_randn(&[CLASSES, 2048], rng);
    let one = Tensor::scalar(1.0, Device::Cuda).expect("scalar");
    let eps = 0.1;
    gpu_bench(&mut g, "loss", "cross_entropy_751_forward", bytes(DType::F32, &[logits.shape()]), || {
        loss::cross_entropy_label_smooth_forward(&logits, &labels, eps).expect("ce")
    });
    gpu_bench(&mut g, "loss", "cross_entropy_751_backward", bytes(DType::F32, &[logits.shape(), logits.shape()]), || {
        loss::cross_entropy_label_smooth_backward(&one, &logits, &labels, eps).expect("ce bwd")
    });
    gpu_bench(&mut g, "loss", "triplet_2048_forward", bytes(DType::F32, &[feat.shape()]), || {
        loss::triplet_soft_margin_forward(&feat, &labels).expect("triplet")
    });
    gpu_bench(&mut g, "loss", "triplet_2048_backward", bytes(DType::F32, &[feat.shape(), feat.shape()]), || {
        loss::triplet_soft_margin_backward(&one, &feat, &labels).expect("triplet bwd")
    });
    gpu_bench(&mut g, "loss", "center_2048_forward", bytes(DType::F32, &[feat.shape(), feat.shape()]), || {
        loss::center_loss_forward(&feat, &labels, &centers).expect("center")
    });
    gpu_bench(&mut g, "loss", "center_2048_backward", bytes(DType::F32, &[feat.shape(), feat.shape(), feat.shape(), feat.shape()]), || {
        loss::center_loss_backward(&one, &feat, &labels, &centers).expect("center bwd")
    });
    g.finish();
}

/// The fastest time of every benchmark, its GB/s or TFLOP/s, and for memory-bound ones the
/// fraction of the measured copy bandwidth.
fn summary() {
    let r = RESULTS.lock().unwrap_or_else(|e| e.into_inner());
    let copy_gbs = r.iter().find(|e| e.0.starts_with("copy/")).and_then(|e| match e.1 {
        Work::Bytes(b) => Some(b as f64 / e.2 / 1e9),
        Work::Flops(_) => None,
    });
    println!(
        "\nsummary on {} (fastest sample per call; bytes = each input read and each output written once)",
        plr_engine::cuda::device_name().unwrap_or_default()
    );
    println!("{:<64} {:>11} {:>14} {:>9}", "benchmark", "time (us)", "throughput", "of copy");
    for (id, work, secs) in r.iter() {
        let (rate, frac) = match *work {
            Work::Bytes(b) => {
                let gbs = b as f64 / secs / 1e9;
                (format!("{gbs:.0} GB/s"), copy_gbs.map_or(String::new(), |c| format!("{:.0}%", 100.0 * gbs / c)))
            }
            Work::Flops(f) => (format!("{:.2} TFLOP/s", f as f64 / secs / 1e12), String::new()),
        };
        println!("{id:<64} {:>11.1} {rate:>14} {frac:>9}", secs * 1e6);
    }
}

fn main() {
    if let Err(why) = plr_engine::cuda::probe() {
        println!("kernels_cuda: this benchmark needs CUDA, which is unavailable here ({why}); nothing measured");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut rng = Rng::new(0);
    copy(&mut c, &mut rng);
    for dt in [DType::F32, DType::BF16] {
        conv_1x1(&mut c, &mut rng, dt);
        depthwise(&mut c, &mut rng, dt);
        batchnorm(&mut c, &mut rng, dt);
        pools(&mut c, &mut rng, dt);
        elementwise(&mut c, &mut rng, dt);
    }
    linear_layers(&mut c, &mut rng);
    attention(&mut c, &mut rng);
    losses(&mut c, &mut rng);
    c.final_summary();
    summary();
}
