//! The training loop: data, model and optimizer set up from a `TrainConfig` (or a checkpoint),
//! epochs of identity-balanced batches through the PLR loss and Adam, evaluation and checkpoints
//! on their schedules, a progress bar per epoch and a JSON-lines log of everything.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::checkpoint::{self, Checkpoint, Snapshot};
use super::config::TrainConfig;
use super::evaluate::{evaluate_model, EvalReport, FeatureRun};
use crate::cli::device::resolve_device;
use crate::cuda::graph::TrainGraph;
use crate::data::dataset::Dataset;
use crate::data::loader::{derive_seed, Batch, Loader, LoaderConfig};
use crate::data::sampler::RandomIdentitySampler;
use crate::data::synth::{generate, SynthConfig};
use crate::data::transforms::{Augment, RandomErasing};
use crate::error::{Error, Result};
use crate::eval::RerankConfig;
use crate::io::weights::init_plr_from_osnet;
use crate::log::JsonLog;
use crate::models::{channels_for_width, PlrConfig, PlrLoss, PlrLossConfig, PlrOsnet};
use crate::nn::{Ctx, Precision};
use crate::optim::{Adam, AdamConfig, LrSchedule};
use crate::params::{Kind, ParamStore};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::tensor::{Device, Storage, Tensor};

// Random streams derived from the run seed: parameter init, and the per-epoch data seeds.
const INIT_STREAM: u64 = 11;
const TRAIN_STREAM: u64 = 12;

/// Means of the loss terms and the accuracy over one epoch.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub epochs: usize,
    pub lr: f64,
    pub iterations: usize,
    pub images: usize,
    pub loss: f64,
    pub ce1: f64,
    pub ce2: f64,
    pub tri1: f64,
    pub tri2: f64,
    pub cen1: f64,
    pub cen2: f64,
    /// Training accuracy of classifier1 (the local branch), as the official logs print it.
    pub acc: f64,
    pub seconds: f64,
    pub images_per_s: f64,
}

impl EpochStats {
    /// Takes the sums of the meter's read steps.
    fn set_sums(&mut self, m: &StepMeter) {
        self.iterations = m.read_steps;
        self.images = m.read_images;
        for (slot, v) in [&mut self.loss, &mut self.ce1, &mut self.ce2, &mut self.tri1, &mut self.tri2, &mut self.cen1, &mut self.cen2]
            .into_iter()
            .zip(&m.sums)
        {
            *slot = *v;
        }
        self.acc = m.sums[7];
    }

    /// Sums turned into means.
    fn averaged(&self) -> EpochStats {
        let n = self.iterations.max(1) as f64;
        let mut s = self.clone();
        for v in [&mut s.loss, &mut s.ce1, &mut s.ce2, &mut s.tri1, &mut s.tri2, &mut s.cen1, &mut s.cen2] {
            *v /= n;
        }
        s.acc = self.acc / self.images.max(1) as f64;
        s.images_per_s = self.images as f64 / self.seconds.max(1e-9);
        s
    }

    fn line(&self) -> String {
        format!(
            "loss {:.4} (ce {:.4} tri {:.4} cen {:.2}) acc {:.1}% lr {:.2e} {:.0} img/s",
            self.loss,
            (self.ce1 + self.ce2) / 2.0,
            (self.tri1 + self.tri2) / 2.0,
            (self.cen1 + self.cen2) / 2.0,
            100.0 * self.acc,
            self.lr,
            self.images_per_s
        )
    }
}

/// Evaluations of a finished run.
#[derive(Debug, Default)]
pub struct TrainSummary {
    /// Of the untrained model, when the configuration asks for it.
    pub before: Option<EvalReport>,
    /// After the last epoch.
    pub after: Option<EvalReport>,
    pub checkpoints: Vec<PathBuf>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    pub model: PlrOsnet,
    pub loss: PlrLoss,
    pub store: ParamStore,
    pub adam: Adam,
    pub schedule: LrSchedule,
    /// Epochs completed.
    pub epoch: usize,
    /// Draws each epoch's data seed (sampler and augmentation).
    pub rng: Rng,
    pub dataset: Dataset,
    train: Loader,
    query: Loader,
    gallery: Loader,
    sampler: RandomIdentitySampler,
    augment: Augment,
    log: JsonLog,
    last_eval: Option<EvalReport>,
    /// Print progress bars and per-epoch lines.
    pub verbose: bool,
    /// Capture the training step in a CUDA graph after the first (eager) step and replay it
    /// (`--cuda-graph`); switched off, with a message, if the capture fails.
    pub cuda_graph: bool,
    graph: Option<TrainGraph>,
    /// Whether this process has run an eager step (kernels compiled, cuDNN plans and the
    /// allocator's blocks made): a resumed run's Adam state alone does not warm anything up.
    warmed_up: bool,
    /// The step statistics of the current epoch; its device buffer keeps its address for the
    /// whole run (a captured step adds into it).
    meter: StepMeter,
}

/// The quick-start dataset in `dir`: reused when `synth.json` there records the same settings,
/// generated (replacing any older one) otherwise.
pub fn prepare_synthetic(dir: &Path, cfg: &SynthConfig) -> Result<bool> {
    let want = serde_json::to_value(cfg).map_err(|e| Error::msg(format!("synth: {e}")))?;
    let recorded = std::fs::read_to_string(dir.join("synth.json")).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if recorded.as_ref().is_some_and(|r| r["config"] == want) {
        return Ok(false);
    }
    generate(cfg, dir, true)?;
    Ok(true)
}

fn synth_config(cfg: &TrainConfig) -> SynthConfig {
    let s = &cfg.synth;
    SynthConfig { ids: s.ids, cameras: s.cameras, images_per_id: s.images_per_id, seed: cfg.run.seed, ..SynthConfig::default() }
}

/// How often the GPU's running sums are read back during an epoch (each read waits for the GPU).
const READ_EVERY: Duration = Duration::from_secs(1);

/// Whether the step statistics should be read now: on the CPU after every step (free), on the GPU
/// at the epoch's last step and otherwise once `READ_EVERY` has passed since the last read.
fn read_due(device: Device, since_read: Duration, last_step: bool) -> bool {
    last_step || device == Device::Cpu || since_read >= READ_EVERY
}

/// Sums over an epoch of the seven loss terms and the classifier1 hits. On the GPU they stay on the
/// device (one small kernel per step adds them up) and are read back only when `read_due` says,
/// so a step never waits for the GPU; on the CPU they are added on the host at once.
struct StepMeter {
    device: Device,
    /// GPU: [8] running sums (loss terms, then hits).
    acc: Option<Tensor>,
    /// CPU: the running sums.
    live: [f64; 8],
    /// The sums as of the last read.
    sums: [f64; 8],
    steps: usize,
    images: usize,
    read_steps: usize,
    read_images: usize,
    last_read: Instant,
}

/// A read that found a non-finite loss: the iterations (1-based) since the previous read, and
/// the sums of each term over them.
#[derive(Debug)]
struct NonFinite {
    window: RangeInclusive<usize>,
    terms: [f64; 7],
}

impl StepMeter {
    fn new(device: Device) -> Result<StepMeter> {
        let acc = match device {
            Device::Cuda => Some(Tensor::zeros(&[8], Device::Cuda)?),
            Device::Cpu => None,
        };
        Ok(StepMeter {
            device,
            acc,
            live: [0.0; 8],
            sums: [0.0; 8],
            steps: 0,
            images: 0,
            read_steps: 0,
            read_images: 0,
            last_read: Instant::now(),
        })
    }

    /// Zeroes the sums for a new epoch (the device buffer in place, without waiting).
    fn reset(&mut self) -> Result<()> {
        if let Some(acc) = &self.acc {
            match acc.storage() {
                Storage::Cuda(b) => b.write(&[0f32; 8])?,
                Storage::Cpu(_) => return Err(Error::Cuda("the step statistics are not on the GPU".into())),
            }
        }
        self.live = [0.0; 8];
        self.sums = [0.0; 8];
        (self.steps, self.images, self.read_steps, self.read_images) = (0, 0, 0, 0);
        self.last_read = Instant::now();
        Ok(())
    }

    /// Counts a step whose statistics a replayed graph added on the device.
    fn count_step(&mut self, images: usize) {
        self.steps += 1;
        self.images += images;
    }

    fn record(&mut self, terms: [&Tensor; 7], logits: &Tensor, labels: &[usize]) -> Result<()> {
        match &mut self.acc {
            Some(acc) => crate::cuda::optim::accumulate_step_stats(acc, terms, logits, labels)?,
            None => {
                for (slot, t) in self.live.iter_mut().zip(terms) {
                    *slot += t.item()? as f64;
                }
                self.live[7] += argmax_hits(logits, labels)? as f64;
            }
        }
        self.count_step(labels.len());
        Ok(())
    }

    fn due(&self, last_step: bool) -> bool {
        read_due(self.device, self.last_read.elapsed(), last_step)
    }

    /// Brings `sums` up to the last recorded step; an error if the loss became non-finite in the
    /// steps read now.
    fn read(&mut self) -> Result<std::result::Result<(), NonFinite>> {
        let before = self.sums;
        match &self.acc {
            Some(acc) => {
                for (slot, v) in self.sums.iter_mut().zip(acc.to_vec()?) {
                    *slot = v as f64;
                }
            }
            None => self.sums = self.live,
        }
        let window = self.read_steps + 1..=self.steps;
        self.read_steps = self.steps;
        self.read_images = self.images;
        self.last_read = Instant::now();
        if self.sums[0].is_finite() {
            return Ok(Ok(()));
        }
        let mut terms = [0.0; 7];
        for (i, t) in terms.iter_mut().enumerate() {
            *t = self.sums[i] - before[i];
        }
        Ok(Err(NonFinite { window, terms }))
    }
}

fn argmax_hits(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    let k = logits.shape()[1];
    let v = logits.to_vec()?;
    Ok(v.chunks(k)
        .zip(labels)
        .filter(|(row, &y)| {
            row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 == y
        })
        .count())
}

impl Trainer {
    /// Sets up a run from `cfg`, continuing from the checkpoint `resume` if given (whose
    /// parameters, optimizer state, epoch and generator replace the fresh ones).
    pub fn new(cfg: TrainConfig, resume: Option<&Checkpoint>) -> Result<Trainer> {
        cfg.validate()?;
        let out = cfg.run.output.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let device = resolve_device(cfg.device()?)?;

        let root = match &cfg.data.root {
            Some(r) => r.clone(),
            None => {
                let dir = out.join("synth");
                let made = prepare_synthetic(&dir, &synth_config(&cfg))?;
                println!("{} synthetic dataset in {}", if made { "generated a" } else { "reusing the" }, dir.display());
                dir
            }
        };
        let kind = cfg.dataset()?;
        let dataset = Dataset::load(kind, &root)?;
        let labels: Vec<usize> = dataset.train.iter().map(|s| s.pid).collect();
        if labels.is_empty() {
            return Err(Error::msg(format!(
                "{}: no training images in {}",
                kind.name(),
                dataset.dir.join(crate::data::dataset::TRAIN_DIR).display()
            )));
        }
        let sampler = RandomIdentitySampler::new(&labels, cfg.data.batch_ids, cfg.data.instances)?;
        let lc =
            LoaderConfig { height: cfg.data.height, width: cfg.data.width, workers: cfg.data.workers.max(1), ..LoaderConfig::default() };
        let train = Loader::new(dataset.train.clone(), &lc)?;
        let query = Loader::new(dataset.query.clone(), &lc)?;
        let gallery = Loader::new(dataset.gallery.clone(), &lc)?;
        let augment =
            Augment { flip_p: if cfg.data.random_flip { 0.5 } else { 0.0 }, erasing: cfg.data.random_erasing.then(RandomErasing::default) };

        let mut store = ParamStore::new();
        let mut init = Rng::new(derive_seed(cfg.run.seed, &[INIT_STREAM]));
        let pc = PlrConfig { channels: channels_for_width(cfg.model.width)?, num_classes: dataset.num_train_pids, parts: cfg.model.parts };
        let model = PlrOsnet::new(&mut store, pc, &mut init)?;
        let lcfg = PlrLossConfig {
            center_classes: cfg.center_classes(dataset.num_train_pids)?,
            learned_centers: cfg.loss.learned_centers,
            label_smooth: cfg.loss.label_smooth,
            center_weight: cfg.loss.center_weight,
        };
        let loss = PlrLoss::new(&mut store, lcfg, pc.local_dim(), pc.global_dim(), &mut init)?;
        check_input_size(&model, &mut store, cfg.data.height, cfg.data.width)?;
        store.to_device(device)?;

        let (adam, epoch, rng) = match resume {
            Some(ckpt) => {
                let path = ckpt.file.path();
                if ckpt.meta.train_pids != dataset.train_pids {
                    return Err(Error::msg(format!(
                        "--resume {}: the checkpoint was trained on {} identities, the dataset in {} has {} (or different ones)",
                        path.display(),
                        ckpt.meta.train_pids.len(),
                        dataset.dir.display(),
                        dataset.train_pids.len()
                    )));
                }
                (ckpt.restore(&mut store)?, ckpt.meta.epoch, ckpt.meta.rng.clone())
            }
            None => {
                if let Some(p) = &cfg.model.init_osnet {
                    let r = init_plr_from_osnet(&mut store, p)?;
                    // BatchNorm's scalar num_batches_tracked fits any width: count weights only.
                    let weights =
                        r.copied.iter().filter(|(_, to)| store.id(to).ok().is_some_and(|id| store.entry(id).kind == Kind::Param)).count();
                    if weights == 0 {
                        return Err(Error::msg(format!(
                            "--init-osnet {}: no weight fits this model (is it an OSNet of width {}?{})",
                            p.display(),
                            cfg.model.width,
                            r.skipped
                                .iter()
                                .find(|(_, why)| why.contains("shape"))
                                .map_or(String::new(), |(n, why)| format!(" {n}: {why}"))
                        )));
                    }
                    println!(
                        "initialised {} tensors ({weights} weights) from {} ({} skipped)",
                        r.copied.len(),
                        p.display(),
                        r.skipped.len()
                    );
                }
                let adam = Adam::new(AdamConfig { weight_decay: cfg.optim.weight_decay, ..AdamConfig::default() });
                (adam, 0, Rng::new(derive_seed(cfg.run.seed, &[TRAIN_STREAM])))
            }
        };

        let config_path = out.join("config.toml");
        crate::io::write_atomic(&config_path, cfg.to_toml()?.as_bytes())?;
        let mut log = JsonLog::open(&out.join("log.jsonl"))?;
        log.write(
            "start",
            &serde_json::json!({
                "config": serde_json::to_value(&cfg).map_err(|e| Error::msg(format!("config: {e}")))?,
                "device": device.to_string(),
                "dataset_dir": dataset.dir,
                "train_images": dataset.train.len(),
                "train_ids": dataset.num_train_pids,
                "query_images": dataset.query.len(),
                "gallery_images": dataset.gallery.len(),
                "parameters": store.count_params(|n| !n.starts_with("loss.")),
                "resumed_from": resume.map(|c| c.file.path()),
                "epoch": epoch,
            }),
        )?;
        let schedule = cfg.schedule();
        Ok(Trainer {
            cfg,
            device,
            model,
            loss,
            store,
            adam,
            schedule,
            epoch,
            rng,
            dataset,
            train,
            query,
            gallery,
            sampler,
            augment,
            log,
            last_eval: None,
            verbose: true,
            cuda_graph: false,
            graph: None,
            warmed_up: false,
            meter: StepMeter::new(device)?,
        })
    }

    /// One line describing the run.
    pub fn describe(&self) -> String {
        let c = &self.cfg;
        format!(
            "PLR-OSNet x{} ({} parameters, {} classes), input {}x{}, batches {}x{}, epochs {}..{} of {}, lr {:.2e} (x{} warm-up over {} epochs), {} on {}, {}",
            c.model.width,
            self.store.count_params(|n| !n.starts_with("loss.")),
            self.dataset.num_train_pids,
            c.data.height,
            c.data.width,
            c.data.batch_ids,
            c.data.instances,
            self.epoch + 1,
            c.optim.epochs,
            c.optim.epochs,
            c.optim.lr,
            c.optim.warmup_multiplier,
            c.optim.warmup_epochs + 1,
            self.dataset.kind.name(),
            self.device,
            c.run.precision
        )
    }

    /// One optimisation step on a batch; its statistics go to the meter. Nothing here waits for
    /// the GPU. With `cuda_graph`, the first step runs eagerly, the second is captured (and run),
    /// later ones replay the graph.
    fn step(&mut self, batch: Batch, lr: f64) -> Result<()> {
        let labels = batch.labels.clone();
        let x = batch.into_tensor()?;
        let net = (&self.model, &self.loss, self.cfg.precision()?);
        if self.cuda_graph && self.device == Device::Cuda {
            if let Some(g) = &mut self.graph {
                if g.fits(x.numel(), labels.len()) {
                    g.replay(&mut self.store, &mut self.adam, x.cpu_slice()?, &labels, lr)?;
                    self.meter.count_step(labels.len());
                    return Ok(());
                }
                let x = x.to_device(self.device)?;
                return g.run_eager(|| train_step(net, &mut self.meter, &mut self.store, &mut self.adam, &x, &labels, lr));
            }
            if self.warmed_up && self.adam.uniform_step().is_some() {
                let x = x.to_device(self.device)?;
                let meter = &mut self.meter;
                let counted = (meter.steps, meter.images);
                let mut f = |store: &mut ParamStore, adam: &mut Adam, x: &Tensor, labels: &[usize], lr: f64| {
                    train_step(net, meter, store, adam, x, labels, lr)
                };
                match TrainGraph::capture(&mut self.store, &mut self.adam, &x, &labels, lr, &mut f) {
                    Ok(g) => {
                        self.log.write("cuda_graph", &serde_json::json!({ "captured": true, "captured_uploads": g.captured_uploads }))?;
                        self.graph = Some(g);
                        return Ok(());
                    }
                    Err(e) => {
                        // Nothing ran: uncount the captured step and run it eagerly from now on.
                        (self.meter.steps, self.meter.images) = counted;
                        eprintln!("--cuda-graph: {e}; training goes on without the graph");
                        self.log.write("cuda_graph", &serde_json::json!({ "captured": false, "error": e.to_string() }))?;
                        self.cuda_graph = false;
                    }
                }
            }
        }
        let x = x.to_device(self.device)?;
        train_step(net, &mut self.meter, &mut self.store, &mut self.adam, &x, &labels, lr)?;
        self.warmed_up = true;
        Ok(())
    }

    /// Trains one epoch (the next one).
    pub fn train_epoch(&mut self) -> Result<EpochStats> {
        let epoch = self.epoch + 1;
        let lr = self.schedule.lr_at(epoch);
        let seed = self.rng.next_u64();
        let batches = self.train.train_epoch(&self.sampler, &self.augment, seed, epoch)?;
        let total = batches.remaining();
        if total == 0 {
            return Err(Error::msg("the sampler produced no batch: too few identities for --batch-ids"));
        }
        let pb = if self.verbose { ProgressBar::new(total as u64) } else { ProgressBar::hidden() };
        pb.set_style(
            ProgressStyle::with_template("{prefix} {bar:24} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        pb.set_prefix(format!("epoch {epoch}/{}", self.cfg.optim.epochs));
        let t0 = Instant::now();
        let mut sums = EpochStats { epoch, epochs: self.cfg.optim.epochs, lr, ..EpochStats::default() };
        self.meter.reset()?;
        for (i, batch) in batches.enumerate() {
            let batch = batch.map_err(|e| {
                Error::msg(format!("epoch {epoch}, iteration {}: {e} (an unreadable image is fatal: remove or replace it)", i + 1))
            })?;
            self.step(batch, lr)?;
            pb.inc(1);
            if self.meter.due(i + 1 == total) {
                if let Err(bad) = self.meter.read()? {
                    return Err(non_finite_error(&bad, epoch, lr));
                }
                sums.set_sums(&self.meter);
                sums.seconds = t0.elapsed().as_secs_f64();
                pb.set_message(sums.averaged().line());
            }
        }
        pb.finish_and_clear();
        self.epoch = epoch;
        let stats = sums.averaged();
        if self.verbose {
            println!("epoch {epoch}/{}: {} ({:.1}s)", stats.epochs, stats.line(), stats.seconds);
        }
        self.log.write("epoch", &stats)?;
        Ok(stats)
    }

    /// Evaluates the current model on query and gallery; logs and prints the table.
    pub fn evaluate(&mut self) -> Result<EvalReport> {
        let name = super::config::dataset_name(self.dataset.kind);
        let run = FeatureRun { batch: self.cfg.data.test_batch, device: self.device, precision: self.cfg.precision()? };
        let rerank = self.cfg.run.eval_rerank.then(RerankConfig::default);
        let report = evaluate_model(&self.model, &mut self.store, name, &self.query, &self.gallery, run, rerank)?;
        if self.verbose {
            println!("evaluation after epoch {}:\n{}", self.epoch, report.table());
        }
        self.log.write("eval", &serde_json::json!({ "epoch": self.epoch, "report": &report }))?;
        report.write_json(&self.cfg.run.output.join("eval.json"))?;
        self.last_eval = Some(report.clone());
        Ok(report)
    }

    /// Writes the checkpoint of the current epoch; returns its path.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let path = checkpoint::path_for(&self.cfg.run.output, self.epoch);
        let snap = Snapshot {
            store: &self.store,
            adam: &self.adam,
            schedule: &self.schedule,
            epoch: self.epoch,
            rng: &self.rng,
            config: &self.cfg,
            train_pids: &self.dataset.train_pids,
            metrics: self.last_eval.as_ref().map(|r| &r.metrics),
        };
        checkpoint::save(&path, &snap)?;
        self.log.write("checkpoint", &serde_json::json!({ "epoch": self.epoch, "path": &path }))?;
        Ok(path)
    }

    /// Runs the remaining epochs with evaluations and checkpoints on their schedules (and both
    /// after the last epoch). An error is logged before it is returned.
    pub fn run(&mut self) -> Result<TrainSummary> {
        let result = self.run_inner();
        if let Err(e) = &result {
            // The original error matters more than a failure to log it.
            let _ = self.log.write("stopped", &serde_json::json!({ "epoch": self.epoch, "error": e.to_string() }));
        }
        result
    }

    fn run_inner(&mut self) -> Result<TrainSummary> {
        let t0 = Instant::now();
        let mut summary = TrainSummary::default();
        if self.cfg.run.eval_before_training && self.epoch == 0 {
            summary.before = Some(self.evaluate()?);
        }
        let (epochs, eval_freq, save_freq) = (self.cfg.optim.epochs, self.cfg.run.eval_freq, self.cfg.run.save_freq);
        let due = |freq: usize, e: usize| e == epochs || (freq > 0 && e.is_multiple_of(freq));
        while self.epoch < epochs {
            self.train_epoch()?;
            if due(eval_freq, self.epoch) {
                summary.after = Some(self.evaluate()?);
            }
            if due(save_freq, self.epoch) {
                let p = self.save_checkpoint()?;
                if self.verbose {
                    println!("saved {}", p.display());
                }
                summary.checkpoints.push(p);
            }
        }
        self.log.write("end", &serde_json::json!({ "epoch": self.epoch, "seconds": t0.elapsed().as_secs_f64() }))?;
        Ok(summary)
    }
}

/// Forward, the PLR loss, statistics into `meter`, backward and Adam on one batch already on the
/// training device.
fn train_step(
    (model, loss, precision): (&PlrOsnet, &PlrLoss, Precision),
    meter: &mut StepMeter,
    store: &mut ParamStore,
    adam: &mut Adam,
    x: &Tensor,
    labels: &[usize],
    lr: f64,
) -> Result<()> {
    let mut tape = Tape::new();
    let mut ctx = Ctx::new(&mut tape, store, true).with_precision(precision);
    let out = model.forward_train(&mut ctx, &Var::constant(x.clone()))?;
    let terms = loss.forward(&mut ctx, &out, labels)?;
    let values = [&terms.total, &terms.ce1, &terms.ce2, &terms.tri1, &terms.tri2, &terms.cen1, &terms.cen2].map(Var::value);
    meter.record(values, out.logits1.value(), labels)?;
    drop(out);
    let grads = tape.backward(&terms.total)?;
    drop(terms);
    adam.step(store, &grads, lr)
}

/// The error that stops training on a non-finite loss. On the GPU the loss is checked when the
/// sums are read (about once a second and at the end of every epoch, so always before the next
/// checkpoint), so it names the iterations since the previous read.
fn non_finite_error(bad: &NonFinite, epoch: usize, lr: f64) -> Error {
    let (a, b) = (*bad.window.start(), *bad.window.end());
    let at = if a == b { format!("iteration {a}") } else { format!("one of iterations {a}..={b} (checked together on the GPU)") };
    let t = &bad.terms;
    Error::msg(format!(
        "non-finite loss at epoch {epoch}, {at} (sums there: loss {}, ce {} / {}, triplet {} / {}, center {} / {}; lr {lr:.2e}); training stopped, checkpoints already written are untouched",
        t[0], t[1], t[2], t[3], t[4], t[5], t[6]
    ))
}

/// Runs the model once on a blank image, so that an input size the stripes cannot split fails
/// here, naming the flags, instead of at the first batch.
fn check_input_size(model: &PlrOsnet, store: &mut ParamStore, height: u32, width: u32) -> Result<()> {
    let x = Tensor::zeros(&[1, 3, height as usize, width as usize], Device::Cpu)?;
    let mut tape = Tape::no_grad();
    let mut ctx = Ctx::new(&mut tape, store, false);
    model.forward_eval(&mut ctx, &Var::constant(x)).map(drop).map_err(|e| {
        Error::msg(format!(
            "input size {height}x{width} (--height/--width-px) does not fit the model with {} stripes: {e}",
            model.config.parts
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_reads_once_a_second_and_at_the_epoch_end() {
        let (soon, late) = (Duration::from_millis(300), READ_EVERY + Duration::from_millis(1));
        assert!(!read_due(Device::Cuda, soon, false));
        assert!(read_due(Device::Cuda, soon, true));
        assert!(read_due(Device::Cuda, late, false));
        assert!(read_due(Device::Cpu, soon, false), "the CPU reads every step");
    }

    /// Records steps of random terms into a CPU meter, reading only where `reads` says.
    fn run_meter(terms: &[[f32; 7]], reads: &[usize]) -> (StepMeter, Vec<std::result::Result<(), NonFinite>>) {
        let mut m = StepMeter::new(Device::Cpu).unwrap();
        // Three rows, four classes: rows 0 and 2 have their maximum at the label.
        let logits = Tensor::from_vec(vec![5.0, 1.0, 0.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 2.0], &[3, 4]).unwrap();
        let labels = [0, 1, 3];
        let mut results = Vec::new();
        for (i, t) in terms.iter().enumerate() {
            let ts: Vec<Tensor> = t.iter().map(|&v| Tensor::from_vec(vec![v], &[1]).unwrap()).collect();
            m.record(std::array::from_fn(|k| &ts[k]), &logits, &labels).unwrap();
            if reads.contains(&(i + 1)) {
                results.push(m.read().unwrap());
            }
        }
        (m, results)
    }

    #[test]
    fn meter_sums_terms_and_hits_over_the_read_steps() {
        let mut rng = Rng::new(5);
        let terms: Vec<[f32; 7]> = (0..5).map(|_| std::array::from_fn(|_| rng.uniform_range(0.0, 3.0) as f32)).collect();
        let (m, results) = run_meter(&terms, &[2, 5]);
        assert!(results.iter().all(|r| r.is_ok()));
        assert_eq!((m.read_steps, m.read_images), (5, 15));
        for k in 0..7 {
            let want: f64 = terms.iter().map(|t| t[k] as f64).sum();
            assert!((m.sums[k] - want).abs() <= 1e-12 * want.abs().max(1.0), "term {k}: {} vs {want}", m.sums[k]);
        }
        assert_eq!(m.sums[7], 10.0, "two hits per step");
        let mut stats = EpochStats::default();
        stats.set_sums(&m);
        let avg = stats.averaged();
        assert_eq!(avg.iterations, 5);
        assert!((avg.acc - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn non_finite_loss_names_the_window_read() {
        let mut terms = vec![[1.0f32; 7]; 6];
        terms[3][0] = f32::NAN; // iteration 4
        terms[3][4] = f32::INFINITY;
        let (_, results) = run_meter(&terms, &[2, 6]);
        assert!(results[0].is_ok());
        let bad = results[1].as_ref().unwrap_err();
        assert_eq!(bad.window, 3..=6);
        assert!(bad.terms[0].is_nan() && bad.terms[4].is_infinite());
        assert_eq!(bad.terms[1], 4.0, "finite terms are summed over the window");
        let e = non_finite_error(bad, 7, 3.5e-4).to_string();
        assert!(e.contains("epoch 7, one of iterations 3..=6"), "{e}");
        let one = NonFinite { window: 4..=4, terms: bad.terms };
        assert!(non_finite_error(&one, 7, 3.5e-4).to_string().contains("epoch 7, iteration 4 "));
    }
}
