//! The GPU training step without host waits: no synchronisation and no allocation in a steady-state
//! step, the multi-tensor Adam against the per-tensor one, and a captured CUDA graph replayed on new
//! batches against the same steps run eagerly. All SKIP without a GPU.

use plr_engine::cuda::graph::TrainGraph;
use plr_engine::cuda::optim::{accumulate_step_stats, adam_hyper, adam_multi, adam_update, AdamSlot};
use plr_engine::models::{channels_for_width, PlrConfig, PlrLoss, PlrLossConfig, PlrOsnet};
use plr_engine::nn::Ctx;
use plr_engine::optim::{Adam, AdamConfig};
use plr_engine::rng::Rng;
use plr_engine::testing::{cuda_or_skip as gpu, max_rel_err};
use plr_engine::{Device, ParamStore, Result, Tape, Tensor, Var};

const CLASSES: usize = 10;

struct Setup {
    model: PlrOsnet,
    loss: PlrLoss,
    store: ParamStore,
    adam: Adam,
    /// Step statistics summed on the device, as the trainer does.
    acc: Tensor,
}

fn setup() -> Setup {
    let mut rng = Rng::new(3);
    let config = PlrConfig { channels: channels_for_width(0.25).unwrap(), num_classes: CLASSES, parts: 4 };
    let mut store = ParamStore::new();
    let model = PlrOsnet::new(&mut store, config, &mut rng).unwrap();
    let loss = PlrLoss::new(&mut store, PlrLossConfig::new(CLASSES), config.local_dim(), config.global_dim(), &mut rng).unwrap();
    store.to_device(Device::Cuda).unwrap();
    let acc = Tensor::zeros(&[8], Device::Cuda).unwrap();
    Setup { model, loss, store, adam: Adam::new(AdamConfig::default()), acc }
}

/// The trainer's step: forward, the PLR loss, statistics accumulated on the device, backward, Adam.
#[allow(clippy::too_many_arguments)]
fn step(
    model: &PlrOsnet,
    loss: &PlrLoss,
    store: &mut ParamStore,
    adam: &mut Adam,
    acc: &mut Tensor,
    x: &Tensor,
    labels: &[usize],
    lr: f64,
) -> Result<()> {
    let mut tape = Tape::new();
    let mut ctx = Ctx::new(&mut tape, store, true);
    let out = model.forward_train(&mut ctx, &Var::constant(x.clone()))?;
    let t = loss.forward(&mut ctx, &out, labels)?;
    let terms = [&t.total, &t.ce1, &t.ce2, &t.tri1, &t.tri2, &t.cen1, &t.cen2].map(Var::value);
    accumulate_step_stats(acc, terms, out.logits1.value(), labels)?;
    drop(out);
    let grads = tape.backward(&t.total)?;
    adam.step(store, &grads, lr)
}

/// Batch `i`: 4 identities x 2 images at 64x32, with labels that change from batch to batch.
fn batch(i: usize) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(100 + i as u64);
    let images = Tensor::randn(&[8, 3, 64, 32], 1.0, &mut rng).to_vec().unwrap();
    let labels = (0..8).map(|k| (k / 2 * 3 + i) % CLASSES).collect();
    (images, labels)
}

/// Checks that replayed and eager values agree: all but a rare few elements (at most n/1000 + 1)
/// within relative error `tol`. cuDNN may pick algorithms that sum with atomics, so two runs of
/// the same step can differ in the last bits; Adam's first updates are ±lr whatever the gradient's
/// size, so an element whose gradient is rounding noise may move the other way. A wrong replay
/// (stale batch, labels, learning rate or step count) moves every element.
fn assert_replay_close(what: &str, eager: &[f32], replayed: &[f32], tol: f32) {
    assert_eq!(eager.len(), replayed.len(), "{what}");
    let off = eager.iter().zip(replayed).filter(|(&a, &b)| (a - b).abs() > tol * a.abs().max(b.abs()).max(1e-3)).count();
    assert!(off <= eager.len() / 1000 + 1, "{what}: {off} of {} values differ by more than {tol} relative", eager.len());
}

fn on_gpu(images: &[f32]) -> Tensor {
    Tensor::from_vec(images.to_vec(), &[8, 3, 64, 32]).unwrap().to_device(Device::Cuda).unwrap()
}

#[test]
fn steady_state_step_makes_no_host_wait_and_no_allocation() {
    if !gpu("steady_state_step_makes_no_host_wait_and_no_allocation") {
        return;
    }
    let mut s = setup();
    let (images, labels) = batch(0);
    let x = on_gpu(&images);
    for _ in 0..2 {
        step(&s.model, &s.loss, &mut s.store, &mut s.adam, &mut s.acc, &x, &labels, 1e-3).unwrap();
    }
    plr_engine::cuda::synchronize().unwrap();
    let (syncs, allocs) = (plr_engine::cuda::sync_count(), plr_engine::cuda::memory_stats().device_allocations);
    for _ in 0..3 {
        step(&s.model, &s.loss, &mut s.store, &mut s.adam, &mut s.acc, &x, &labels, 1e-3).unwrap();
    }
    assert_eq!(plr_engine::cuda::sync_count(), syncs, "a steady-state training step waited for the GPU");
    assert_eq!(plr_engine::cuda::memory_stats().device_allocations, allocs, "a steady-state training step allocated device memory");
    let sums = s.acc.to_vec().unwrap();
    assert_eq!(plr_engine::cuda::sync_count(), syncs + 1, "a read-back counts as one wait");
    assert!(sums[..7].iter().all(|v| v.is_finite() && *v > 0.0) && sums[7] <= 5.0 * 8.0, "{sums:?}");
}

#[test]
fn multi_tensor_adam_matches_per_tensor_adam() {
    if !gpu("multi_tensor_adam_matches_per_tensor_adam") {
        return;
    }
    let mut rng = Rng::new(9);
    // More tensors than one table holds, sizes from 1 to past a block's grid-stride span.
    let shapes: Vec<Vec<usize>> = (0..130).map(|i| if i % 13 == 0 { vec![257, 300 + i] } else { vec![1 + (i * 37) % 500] }).collect();
    let upload = |t: Tensor| t.to_device(Device::Cuda).unwrap();
    let init: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(s, 1.0, &mut rng)).collect();
    let (lr, b1, b2, eps, wd) = (3.5e-4f32, 0.9f32, 0.999f32, 1e-8f32, 5e-4f32);
    let fresh = || -> Vec<[Tensor; 3]> {
        init.iter()
            .map(|p| [upload(p.clone()), Tensor::zeros(p.shape(), Device::Cuda).unwrap(), Tensor::zeros(p.shape(), Device::Cuda).unwrap()])
            .collect()
    };
    let (mut multi, mut single) = (fresh(), fresh());
    for t in 1..=4u32 {
        let grads: Vec<Tensor> = shapes.iter().map(|s| upload(Tensor::randn(s, 1e-2, &mut rng))).collect();
        let hyper = upload(Tensor::from_vec(adam_hyper(lr, b1, b2, t).to_vec(), &[2]).unwrap());
        let mut slots: Vec<AdamSlot> = multi.iter_mut().zip(&grads).map(|([p, m, v], g)| AdamSlot { param: p, grad: g, m, v }).collect();
        adam_multi(&mut slots, &hyper, b1, b2, eps, wd).unwrap();
        for ([p, m, v], g) in single.iter_mut().zip(&grads) {
            adam_update(p, g, m, v, lr, b1, b2, eps, wd, t).unwrap();
        }
    }
    for (i, (a, b)) in multi.iter().zip(&single).enumerate() {
        for k in 0..3 {
            let (x, y) = (a[k].to_vec().unwrap(), b[k].to_vec().unwrap());
            // Same arithmetic in the same order (equal unless the compiler contracts differently).
            let err = max_rel_err(&x, &y, 1e-30);
            assert!(err < 1e-6, "tensor {i} {:?}, slot {k}: max rel err {err}", shapes[i]);
        }
    }
}

#[test]
fn replayed_graph_matches_eager_steps() {
    if !gpu("replayed_graph_matches_eager_steps") {
        return;
    }
    let (mut eager, mut graphed) = (setup(), setup());
    let lrs = [1e-3, 2e-3, 5e-4, 1e-3, 3e-3];
    let batches: Vec<_> = (0..lrs.len()).map(batch).collect();
    for ((images, labels), &lr) in batches.iter().zip(&lrs) {
        let e = &mut eager;
        step(&e.model, &e.loss, &mut e.store, &mut e.adam, &mut e.acc, &on_gpu(images), labels, lr).unwrap();
    }

    let g = &mut graphed;
    // Warm-up step eagerly, then capture on batch 1 (the capture runs that step), replay the rest.
    step(&g.model, &g.loss, &mut g.store, &mut g.adam, &mut g.acc, &on_gpu(&batches[0].0), &batches[0].1, lrs[0]).unwrap();
    let (model, loss, acc) = (&g.model, &g.loss, &mut g.acc);
    let mut f =
        |store: &mut ParamStore, adam: &mut Adam, x: &Tensor, labels: &[usize], lr: f64| step(model, loss, store, adam, acc, x, labels, lr);
    let mut graph = TrainGraph::capture(&mut g.store, &mut g.adam, &on_gpu(&batches[1].0), &batches[1].1, lrs[1], &mut f).unwrap();
    assert_eq!(graph.captured_uploads, 1, "the backward seed is the step's only upload");
    for ((images, labels), &lr) in batches.iter().zip(&lrs).skip(2) {
        graph.replay(&mut g.store, &mut g.adam, images, labels, lr).unwrap();
    }
    drop(graph);

    let (a, b) = (eager.acc.to_vec().unwrap(), graphed.acc.to_vec().unwrap());
    // Hits may differ by one on a near tie of two logits.
    assert!(
        max_rel_err(&a[..7], &b[..7], 1e-6) < 1e-4 && (a[7] - b[7]).abs() <= 1.0,
        "summed loss terms and hits: eager {a:?}, graph {b:?}"
    );
    for id in 0..eager.store.len() {
        let name = &eager.store.entry(id).name;
        let (x, y) = (eager.store.get(id).to_vec().unwrap(), graphed.store.get(id).to_vec().unwrap());
        assert_replay_close(name, &x, &y, 1e-5);
        if let (Some(s), Some(t)) = (eager.adam.state(id), graphed.adam.state(id)) {
            assert_eq!(s.step, t.step, "{name}: Adam step count");
            assert_replay_close(&format!("{name} exp_avg_sq"), &s.v.to_vec().unwrap(), &t.v.to_vec().unwrap(), 1e-4);
        }
    }
}

#[derive(clap::Parser)]
struct TrainCmd {
    #[command(flatten)]
    args: plr_engine::cli::train::TrainArgs,
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("plr-graph-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn cuda_graph_flag_on_the_cpu_is_a_clear_error() {
    use clap::Parser;
    let dir = temp_dir("cpu-flag");
    let out = dir.join("out");
    let argv = ["train", "--cuda-graph", "--device", "cpu", "--output", out.to_str().unwrap()];
    let args = TrainCmd::try_parse_from(argv).unwrap().args;
    let e = plr_engine::cli::train::run(&args).unwrap_err().to_string();
    assert!(e.contains("--cuda-graph") && e.contains("CPU"), "{e}");
    assert!(!out.exists(), "nothing should be written before the flag is checked");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two epochs of the trainer on a tiny synthetic dataset, with or without the graph.
fn train_two_epochs(dir: &std::path::Path, graph: bool) -> (Vec<plr_engine::train::EpochStats>, plr_engine::train::Trainer) {
    let mut c = plr_engine::train::TrainConfig::quickstart();
    c.data.root = Some(dir.join("data"));
    (c.data.height, c.data.width, c.data.batch_ids, c.data.instances, c.data.workers) = (64, 32, 4, 2, 2);
    c.optim.epochs = 2;
    c.run.output = dir.join(if graph { "graph" } else { "eager" });
    c.run.device = "cuda".into();
    (c.run.eval_freq, c.run.save_freq, c.run.eval_before_training, c.run.seed) = (0, 0, false, 5);
    let mut t = plr_engine::train::Trainer::new(c, None).unwrap();
    t.verbose = false;
    t.cuda_graph = graph;
    let stats = (0..2).map(|_| t.train_epoch().unwrap()).collect();
    (stats, t)
}

#[test]
fn trainer_with_cuda_graph_matches_eager_training() {
    if !gpu("trainer_with_cuda_graph_matches_eager_training") {
        return;
    }
    let dir = temp_dir("trainer");
    let synth = plr_engine::data::synth::SynthConfig {
        ids: 16,
        cameras: 3,
        images_per_id: 6,
        seed: 2,
        height: 64,
        width: 32,
        ..Default::default()
    };
    plr_engine::data::synth::generate(&synth, &dir.join("data"), false).unwrap();
    let (eager_stats, eager) = train_two_epochs(&dir, false);
    let (graph_stats, graphed) = train_two_epochs(&dir, true);
    let log = std::fs::read_to_string(dir.join("graph").join("log.jsonl")).unwrap();
    assert!(log.contains(r#""captured":true"#), "the capture failed and the trainer fell back to eager steps:\n{log}");
    assert!(graphed.cuda_graph);
    for (a, b) in eager_stats.iter().zip(&graph_stats) {
        assert_eq!((a.iterations, a.images), (b.iterations, b.images));
        let (x, y) = ([a.loss, a.ce1, a.tri1, a.cen1], [b.loss, b.ce1, b.tri1, b.cen1]);
        for (u, v) in x.iter().zip(&y) {
            assert!((u - v).abs() <= 1e-4 * u.abs().max(1e-3), "epoch {}: eager {x:?}, graph {y:?}", a.epoch);
        }
        // Accuracy: one hit may flip on a near tie of two logits.
        assert!((a.acc - b.acc).abs() * a.images as f64 <= 1.0 + 1e-9, "epoch {}: accuracy {} vs {}", a.epoch, a.acc, b.acc);
    }
    for id in 0..eager.store.len() {
        let name = &eager.store.entry(id).name;
        let (x, y) = (eager.store.get(id).to_vec().unwrap(), graphed.store.get(id).to_vec().unwrap());
        assert_replay_close(name, &x, &y, 1e-4);
        if let (Some(s), Some(t)) = (eager.adam.state(id), graphed.adam.state(id)) {
            assert_eq!(s.step, t.step, "{name}: Adam step count");
        }
    }
    drop((eager, graphed));
    std::fs::remove_dir_all(&dir).unwrap();
}
