//! CPU convolution throughput at PLR-OSNet's layer shapes, batch 16: forward, backward data and
//! backward filter, reported in FLOP/s (criterion's "elements" are FLOPs here: 2 per MAC).
//!
//! `cargo bench --bench conv_cpu`; `-- --test` runs each benchmark once as a smoke test.
//!
//! Outputs come from the crate's global allocator (mimalloc), which reuses freed blocks between
//! iterations, so the timings are of the kernels, not of page faults.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use plr_engine::ops::conv::{conv2d_backward_data, conv2d_backward_filter, conv2d_forward, conv2d_output_shape, Conv2dCfg};
use plr_engine::rng::Rng;
use plr_engine::Tensor;

const BATCH: usize = 16;

struct Layer {
    name: &'static str,
    c_in: usize,
    c_out: usize,
    k: usize,
    hw: (usize, usize),
    cfg: Conv2dCfg,
}

/// `spg`: (stride, padding, groups).
const fn layer(name: &'static str, (c_in, c_out): (usize, usize), k: usize, hw: (usize, usize), spg: (usize, usize, usize)) -> Layer {
    Layer { name, c_in, c_out, k, hw, cfg: Conv2dCfg { stride: spg.0, padding: spg.1, groups: spg.2 } }
}

const LAYERS: [Layer; 6] = [
    layer("conv1_7x7s2_3to64_256x128", (3, 64), 7, (256, 128), (2, 3, 1)),
    layer("1x1_64to256_64x32", (64, 256), 1, (64, 32), (1, 0, 1)),
    layer("dw3x3_64_64x32", (64, 64), 3, (64, 32), (1, 1, 64)),
    layer("1x1_256to384_32x16", (256, 384), 1, (32, 16), (1, 0, 1)),
    layer("dw3x3_128_16x8", (128, 128), 3, (16, 8), (1, 1, 128)),
    layer("1x1_384to512_16x8", (384, 512), 1, (16, 8), (1, 0, 1)),
];

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    for l in &LAYERS {
        let x = Tensor::randn(&[BATCH, l.c_in, l.hw.0, l.hw.1], 1.0, &mut rng);
        let w = Tensor::randn(&[l.c_out, l.c_in / l.cfg.groups, l.k, l.k], 0.1, &mut rng);
        let y_shape = conv2d_output_shape(x.shape(), w.shape(), l.cfg).expect("valid layer");
        let dy = Tensor::randn(&y_shape, 1.0, &mut rng);
        let macs = y_shape.iter().product::<usize>() * (l.c_in / l.cfg.groups) * l.k * l.k;

        let mut g = c.benchmark_group(l.name);
        g.throughput(Throughput::Elements(2 * macs as u64));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        g.bench_function("forward", |b| b.iter(|| conv2d_forward(black_box(&x), &w, None, l.cfg).expect("forward")));
        g.bench_function("backward_data", |b| {
            b.iter(|| conv2d_backward_data(black_box(&dy), &w, x.shape(), l.cfg).expect("backward data"))
        });
        g.bench_function("backward_filter", |b| {
            b.iter(|| conv2d_backward_filter(black_box(&dy), &x, w.shape(), l.cfg).expect("backward filter"))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
