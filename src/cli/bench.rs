//! `plr-engine bench`: training-step and inference throughput of PLR-OSNet on synthetic tensors,
//! peak device memory, and the training step's time split by op family.
//!
//! Order: inference first (only parameters live, as in a deployed model), then training. Every
//! timed iteration ends with a device synchronisation; warm-up iterations (kernel compilation,
//! cuDNN plans, the allocator's cache, Adam's state) are not timed, and the median is reported.
//! The op-family split comes from separate profiled steps (profiling synchronises around each op,
//! so it is never on while throughput is timed).

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use super::device::{resolve_device, DeviceChoice};
use crate::error::{Error, Result};
use crate::models::{channels_for_width, PlrConfig, PlrLoss, PlrLossConfig, PlrOsnet};
use crate::nn::{Ctx, Precision};
use crate::optim::{Adam, AdamConfig};
use crate::params::ParamStore;
use crate::profile::{self, Family, Phase};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::tensor::{Device, Tensor};

/// Measure PLR-OSNet training and inference speed on synthetic data.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// f32, or bf16 mixed precision (f32 master weights).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Identities per training batch.
    #[arg(long, default_value_t = 16)]
    pub batch_ids: usize,
    /// Images per identity (batch = batch-ids x instances).
    #[arg(long, default_value_t = 4)]
    pub instances: usize,
    /// OSNet width multiplier: 1.0, 0.75, 0.5 or 0.25.
    #[arg(long, default_value_t = 1.0)]
    pub width: f32,
    /// Input height in pixels.
    #[arg(long, default_value_t = 256)]
    pub height: usize,
    /// Input width in pixels.
    #[arg(long, default_value_t = 128)]
    pub width_px: usize,
    /// Classifier outputs (Market-1501 has 751 training identities).
    #[arg(long, default_value_t = 751)]
    pub classes: usize,
    /// Untimed iterations before timing [default: 10 on CUDA, 1 on the CPU].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Timed iterations; the median is reported [default: 30 on CUDA, 3 on the CPU].
    #[arg(long)]
    pub iters: Option<usize>,
    /// Inference batch; 0 skips inference [default: 256 on CUDA, 16 on the CPU].
    #[arg(long)]
    pub eval_batch: Option<usize>,
    /// Profiled training steps for the op-family split; 0 skips it [default: 5 on CUDA, 1 on the CPU].
    #[arg(long)]
    pub profile_iters: Option<usize>,
    /// CPU worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also time the training step captured once in a CUDA graph and replayed (GPU only).
    #[arg(long)]
    pub cuda_graph: bool,
}

/// Iteration counts after the device-dependent defaults are filled in.
struct Plan {
    warmup: usize,
    iters: usize,
    eval_batch: usize,
    profile_iters: usize,
}

impl Plan {
    fn new(args: &BenchArgs, device: Device) -> Plan {
        let gpu = device == Device::Cuda;
        Plan {
            warmup: args.warmup.unwrap_or(if gpu { 10 } else { 1 }),
            iters: args.iters.unwrap_or(if gpu { 30 } else { 3 }),
            eval_batch: args.eval_batch.unwrap_or(if gpu { 256 } else { 16 }),
            profile_iters: args.profile_iters.unwrap_or(if gpu { 5 } else { 1 }),
        }
    }
}

/// Median, minimum and maximum of per-iteration times, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Timing {
    /// Summary of a non-empty list of times in seconds.
    pub fn from_secs(mut secs: Vec<f64>) -> Timing {
        secs.sort_by(f64::total_cmp);
        let n = secs.len();
        let median = if n % 2 == 1 { secs[n / 2] } else { 0.5 * (secs[n / 2 - 1] + secs[n / 2]) };
        Timing { median_ms: median * 1e3, min_ms: secs[0] * 1e3, max_ms: secs[n - 1] * 1e3 }
    }

    fn json(&self) -> serde_json::Value {
        json!({ "median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms })
    }
}

/// Runs `f` `warmup` times untimed, then `iters` times timed, each ending in a device sync.
fn time_iters(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
        crate::cuda::synchronize()?;
    }
    let mut secs = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        crate::cuda::synchronize()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    Ok(Timing::from_secs(secs))
}

struct Bench {
    model: PlrOsnet,
    loss: PlrLoss,
    store: ParamStore,
    adam: Adam,
    precision: Precision,
}

/// Peak learning rate of the official schedule.
const LR: f64 = 3.5e-4;

/// Forward, loss, backward and Adam on one batch; returns the total loss (left on the device).
fn train_step(
    (model, loss, precision): (&PlrOsnet, &PlrLoss, Precision),
    store: &mut ParamStore,
    adam: &mut Adam,
    x: &Var,
    labels: &[usize],
    lr: f64,
) -> Result<Tensor> {
    let mut tape = Tape::new();
    let total = {
        let mut ctx = Ctx::new(&mut tape, store, true).with_precision(precision);
        let out = model.forward_train(&mut ctx, x)?;
        loss.forward(&mut ctx, &out, labels)?.total
    };
    let grads = tape.backward(&total)?;
    let _p = profile::scope(Family::Optim);
    adam.step(store, &grads, lr)?;
    Ok(total.into_value())
}

impl Bench {
    fn train_step(&mut self, x: &Var, labels: &[usize]) -> Result<Tensor> {
        train_step((&self.model, &self.loss, self.precision), &mut self.store, &mut self.adam, x, labels, LR)
    }

    fn eval_forward(&mut self, x: &Var) -> Result<Tensor> {
        let mut tape = Tape::no_grad();
        let mut ctx = Ctx::new(&mut tape, &mut self.store, false).with_precision(self.precision);
        Ok(self.model.forward_eval(&mut ctx, x)?.into_value())
    }
}

/// Labels of a P x K batch: `ids` identities spread over the classes, `instances` images each.
fn pk_labels(ids: usize, instances: usize, classes: usize) -> Vec<usize> {
    (0..ids).flat_map(|i| std::iter::repeat_n(i * classes / ids, instances)).collect()
}

fn random_images(batch: usize, h: usize, w: usize, rng: &mut Rng, device: Device) -> Result<Var> {
    Ok(Var::constant(Tensor::randn(&[batch, 3, h, w], 1.0, rng).to_device(device)?))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn check_args(args: &BenchArgs) -> Result<()> {
    if args.batch_ids < 2 || args.instances < 2 {
        return Err(Error::msg(format!(
            "--batch-ids {} --instances {}: the triplet loss needs at least 2 identities of at least 2 images",
            args.batch_ids, args.instances
        )));
    }
    if args.batch_ids > args.classes {
        return Err(Error::msg(format!("--batch-ids {} exceeds --classes {}", args.batch_ids, args.classes)));
    }
    if args.height < 32 || args.width_px < 32 {
        return Err(Error::msg(format!("--height {} --width-px {}: both must be at least 32", args.height, args.width_px)));
    }
    if args.iters == Some(0) {
        return Err(Error::msg("--iters must be positive"));
    }
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    check_args(args)?;
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .map_err(|e| Error::msg(format!("--threads {}: {e}", args.threads)))?;
    }
    let device = resolve_device(args.device)?;
    if args.cuda_graph && device != Device::Cuda {
        return Err(Error::msg("--cuda-graph needs the GPU, and this benchmark would run on the CPU (see --device)"));
    }
    let plan = Plan::new(args, device);
    let device_desc = match device {
        Device::Cuda => crate::cuda::device_name().unwrap_or_else(|| "unknown GPU".into()),
        Device::Cpu => format!("{} threads", rayon::current_num_threads()),
    };
    let batch = args.batch_ids * args.instances;
    println!("device: {device} ({device_desc})");
    if device == Device::Cpu && args.iters.is_none() {
        println!("(CPU: small default iteration counts; pass --warmup/--iters for more)");
    }

    let mut rng = Rng::new(args.seed);
    let config = PlrConfig { channels: channels_for_width(args.width)?, num_classes: args.classes, parts: 4 };
    let mut store = ParamStore::new();
    let model = PlrOsnet::new(&mut store, config, &mut rng)?;
    let params = store.count_params(|_| true);
    let loss = PlrLoss::new(&mut store, PlrLossConfig::new(args.classes), config.local_dim(), config.global_dim(), &mut rng)?;
    store.to_device(device)?;
    let mut bench = Bench { model, loss, store, adam: Adam::new(AdamConfig::default()), precision: args.precision };
    println!(
        "model: PLR-OSNet x{} ({:.2} M parameters, {} classes), input 3x{}x{}, {}",
        args.width,
        params as f64 / 1e6,
        args.classes,
        args.height,
        args.width_px,
        args.precision.name()
    );
    if device == Device::Cuda {
        let trainable = bench.store.trainable().count();
        println!(
            "Adam on the GPU: {trainable} trainable tensors, {} multi-tensor launches per step (one per tensor before)",
            trainable.div_ceil(crate::cuda::TABLE_TENSORS)
        );
    }

    // Inference first, so that its peak holds only the parameters and the activations.
    let infer = if plan.eval_batch > 0 {
        let x = random_images(plan.eval_batch, args.height, args.width_px, &mut rng, device)?;
        crate::cuda::reset_peak_memory();
        let t = time_iters(plan.warmup, plan.iters, || bench.eval_forward(&x).map(drop))?;
        let peak = crate::cuda::peak_memory_bytes();
        let ips = plan.eval_batch as f64 / (t.median_ms / 1e3);
        println!(
            "inference (batch {}): median {:.2} ms (min {:.2}, max {:.2}) -> {ips:.0} img/s",
            plan.eval_batch, t.median_ms, t.min_ms, t.max_ms
        );
        Some((t, ips, peak))
    } else {
        None
    };

    let x = random_images(batch, args.height, args.width_px, &mut rng, device)?;
    let labels = pk_labels(args.batch_ids, args.instances, args.classes);
    for _ in 0..plan.warmup {
        bench.train_step(&x, &labels)?;
    }
    crate::cuda::synchronize()?;
    crate::cuda::reset_peak_memory();
    let mut last_loss = None;
    let train = time_iters(0, plan.iters, || {
        last_loss = Some(bench.train_step(&x, &labels)?);
        Ok(())
    })?;
    let train_peak = crate::cuda::peak_memory_bytes();
    let train_ips = batch as f64 / (train.median_ms / 1e3);
    let loss_value = last_loss.map(|l| l.item()).transpose()?.unwrap_or(f32::NAN);
    println!(
        "training step (batch {batch} = {} x {}, forward + loss + backward + Adam): median {:.2} ms (min {:.2}, max {:.2}) over {} \
         iterations after {} warm-up -> {train_ips:.0} img/s (last loss {loss_value:.4})",
        args.batch_ids, args.instances, train.median_ms, train.min_ms, train.max_ms, plan.iters, plan.warmup
    );
    if !loss_value.is_finite() {
        eprintln!("warning: the loss is not finite ({loss_value}); the timings may not be representative");
    }
    if device == Device::Cuda {
        println!("peak device memory: training {:.0} MiB, inference {:.0} MiB", mib(train_peak), infer.as_ref().map_or(0.0, |i| mib(i.2)));
    }

    let host = if device == Device::Cuda { Some(host_cost(&mut bench, &x, &labels)?) } else { None };
    if let Some(h) = &host {
        println!(
            "per eager step: {:.1} host waits for the GPU, {:.1} device allocations, {:.0} engine kernel launches (plus cuDNN/cuBLAS calls)",
            h.syncs, h.allocations, h.launches
        );
    }
    let graph = if args.cuda_graph { Some(graph_bench(&mut bench, &x, &labels, &plan)?) } else { None };
    if let Some(Ok(g)) = &graph {
        println!(
            "training step in a CUDA graph (images copied in from the host each step): median {:.2} ms (min {:.2}, max {:.2}) -> {:.0} img/s; \
             {:.1} host waits and {:.1} device allocations per replayed step; {} constant uploads captured",
            g.step.median_ms,
            g.step.min_ms,
            g.step.max_ms,
            batch as f64 / (g.step.median_ms / 1e3),
            g.syncs,
            g.allocations,
            g.captured_uploads
        );
    }

    let split = if plan.profile_iters > 0 { Some(profile_split(&mut bench, &x, &labels, plan.profile_iters)?) } else { None };
    if let Some(s) = &split {
        print_split(s, plan.profile_iters);
    }

    if let Some(path) = &args.json {
        let report = json!({
            "engine": "plr-engine",
            "version": env!("CARGO_PKG_VERSION"),
            "device": device.to_string(),
            "device_name": device_desc,
            "threads": rayon::current_num_threads(),
            "model": { "width": args.width, "params": params, "classes": args.classes, "height": args.height, "width_px": args.width_px },
            "precision": args.precision.name(),
            "warmup": plan.warmup,
            "iters": plan.iters,
            "train": {
                "batch": batch,
                "batch_ids": args.batch_ids,
                "instances": args.instances,
                "step": train.json(),
                "img_per_s": train_ips,
                "peak_memory_bytes": (device == Device::Cuda).then_some(train_peak),
                "last_loss": loss_value,
            },
            "infer": infer.as_ref().map(|(t, ips, peak)| json!({
                "batch": plan.eval_batch,
                "forward": t.json(),
                "img_per_s": ips,
                "peak_memory_bytes": (device == Device::Cuda).then_some(*peak),
            })),
            "profile": split.as_ref().map(|s| split_json(s, plan.profile_iters)),
            "host": host.as_ref().map(|h| json!({ "syncs_per_step": h.syncs, "allocations_per_step": h.allocations, "kernel_launches_per_step": h.launches })),
            "cuda_graph": graph.as_ref().map(|g| match g {
                Ok(g) => json!({
                    "step": g.step.json(),
                    "img_per_s": batch as f64 / (g.step.median_ms / 1e3),
                    "syncs_per_step": g.syncs,
                    "allocations_per_step": g.allocations,
                    "captured_uploads": g.captured_uploads,
                }),
                Err(e) => json!({ "error": e }),
            }),
        });
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::msg(format!("encoding the JSON report: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Host waits and device allocations per steady-state step.
struct HostCost {
    syncs: f64,
    allocations: f64,
    /// Engine kernel launches (cuDNN and cuBLAS calls not included).
    launches: f64,
}

/// Steps run back to back between two counter readings (no synchronisation in between).
const COUNTED_STEPS: usize = 5;

fn count_host_cost(mut step: impl FnMut() -> Result<()>) -> Result<HostCost> {
    let counters = || (crate::cuda::sync_count(), crate::cuda::memory_stats().device_allocations, crate::cuda::launch_count());
    let (s0, a0, l0) = counters();
    for _ in 0..COUNTED_STEPS {
        step()?;
    }
    let (s1, a1, l1) = counters();
    crate::cuda::synchronize()?;
    let n = COUNTED_STEPS as f64;
    Ok(HostCost { syncs: (s1 - s0) as f64 / n, allocations: (a1 - a0) as f64 / n, launches: (l1 - l0) as f64 / n })
}

fn host_cost(bench: &mut Bench, x: &Var, labels: &[usize]) -> Result<HostCost> {
    count_host_cost(|| bench.train_step(x, labels).map(drop))
}

struct GraphResult {
    step: Timing,
    syncs: f64,
    allocations: f64,
    captured_uploads: usize,
}

/// Captures the training step (after the eager warm-up above) and times its replays, each with
/// the images and labels copied into the graph's inputs. A failed capture is reported, not fatal.
fn graph_bench(bench: &mut Bench, x: &Var, labels: &[usize], plan: &Plan) -> Result<std::result::Result<GraphResult, String>> {
    let host_images = x.value().to_vec()?;
    let (model, loss, precision) = (&bench.model, &bench.loss, bench.precision);
    let mut step = |store: &mut ParamStore, adam: &mut Adam, images: &Tensor, labels: &[usize], lr: f64| {
        train_step((model, loss, precision), store, adam, &Var::constant(images.clone()), labels, lr).map(drop)
    };
    let mut graph = match crate::cuda::graph::TrainGraph::capture(&mut bench.store, &mut bench.adam, x.value(), labels, LR, &mut step) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("--cuda-graph: {e}; timings without the graph only");
            return Ok(Err(e.to_string()));
        }
    };
    let (store, adam) = (&mut bench.store, &mut bench.adam);
    let mut replay = || graph.replay(store, adam, &host_images, labels, LR);
    let cost = count_host_cost(&mut replay)?;
    let step = time_iters(plan.warmup.min(2), plan.iters, &mut replay)?;
    Ok(Ok(GraphResult { step, syncs: cost.syncs, allocations: cost.allocations, captured_uploads: graph.captured_uploads }))
}

/// Profile totals over `iters` steps and the wall time of those steps.
struct Split {
    profile: profile::Profile,
    wall_secs: f64,
}

fn profile_split(bench: &mut Bench, x: &Var, labels: &[usize], iters: usize) -> Result<Split> {
    profile::reset();
    profile::set_enabled(true);
    let t = Instant::now();
    let run = (0..iters).try_for_each(|_| bench.train_step(x, labels).map(drop)).and_then(|_| crate::cuda::synchronize());
    let wall_secs = t.elapsed().as_secs_f64();
    profile::set_enabled(false);
    run?;
    Ok(Split { profile: profile::snapshot(), wall_secs })
}

fn ms_per_step(d: std::time::Duration, iters: usize) -> f64 {
    d.as_secs_f64() * 1e3 / iters as f64
}

fn print_split(s: &Split, iters: usize) {
    let wall = s.wall_secs * 1e3 / iters as f64;
    println!("time by op family, per training step ({iters} profiled steps, synchronised around every op: {wall:.2} ms/step):");
    println!("  {:<12} {:>11} {:>12} {:>9} {:>6} {:>7}", "family", "forward ms", "backward ms", "total ms", "share", "calls");
    for f in Family::ALL {
        let (fw, bw) = (s.profile.get(f, Phase::Forward), s.profile.get(f, Phase::Backward));
        let (fms, bms) = (ms_per_step(fw.time, iters), ms_per_step(bw.time, iters));
        let calls = (fw.calls + bw.calls) / iters as u64;
        println!("  {:<12} {fms:>11.2} {bms:>12.2} {:>9.2} {:>5.1}% {calls:>7}", f.name(), fms + bms, 100.0 * (fms + bms) / wall);
    }
    let other = wall - ms_per_step(s.profile.total(), iters);
    println!("  {:<12} {:>11} {:>12} {other:>9.2} {:>5.1}%", "other", "", "", 100.0 * other / wall);
}

fn split_json(s: &Split, iters: usize) -> serde_json::Value {
    let wall = s.wall_secs * 1e3 / iters as f64;
    let families: Vec<serde_json::Value> = Family::ALL
        .iter()
        .map(|&f| {
            let (fw, bw) = (s.profile.get(f, Phase::Forward), s.profile.get(f, Phase::Backward));
            json!({
                "family": f.name(),
                "forward_ms": ms_per_step(fw.time, iters),
                "backward_ms": ms_per_step(bw.time, iters),
                "forward_calls": fw.calls / iters as u64,
                "backward_calls": bw.calls / iters as u64,
            })
        })
        .collect();
    json!({
        "steps": iters,
        "step_ms": wall,
        "families": families,
        "other_ms": wall - ms_per_step(s.profile.total(), iters),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let t = Timing::from_secs(vec![0.003, 0.001, 0.002]);
        assert_eq!((t.median_ms, t.min_ms, t.max_ms), (2.0, 1.0, 3.0));
        let t = Timing::from_secs(vec![0.004, 0.001, 0.002, 0.010]);
        assert!((t.median_ms - 3.0).abs() < 1e-12);
    }

    #[test]
    fn pk_labels_group_instances_of_distinct_ids() {
        let l = pk_labels(4, 3, 751);
        assert_eq!(l.len(), 12);
        for (i, chunk) in l.chunks(3).enumerate() {
            assert!(chunk.iter().all(|&c| c == chunk[0]));
            assert!(chunk[0] < 751);
            if i > 0 {
                assert!(chunk[0] > l[(i - 1) * 3]);
            }
        }
    }

    #[test]
    fn cuda_graph_on_the_cpu_is_a_clear_error() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            args: BenchArgs,
        }
        let args = Cmd::try_parse_from(["bench", "--device", "cpu", "--cuda-graph"]).unwrap().args;
        let e = run(&args).unwrap_err().to_string();
        assert!(e.contains("--cuda-graph") && e.contains("CPU"), "{e}");
    }
}
