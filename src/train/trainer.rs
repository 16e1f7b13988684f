//! The training loop: data, model and optimizer set up from a `TrainConfig` (or a checkpoint),
//! epochs of identity-balanced batches through the PLR loss and Adam, evaluation and checkpoints
//! on their schedules, a progress bar per epoch and a JSON-lines log of everything.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::checkpoint::{self, Checkpoint, Snapshot};
use super::config::TrainConfig;
use super::evaluate::{evaluate_model, EvalReport, FeatureRun};
use crate::cli::device::resolve_device;
use crate::data::dataset::Dataset;
use crate::data::loader::{derive_seed, Batch, Loader, LoaderConfig};
use crate::data::sampler::RandomIdentitySampler;
use crate::data::synth::{generate, SynthConfig};
use crate::data::transforms::{Augment, RandomErasing};
use crate::error::{Error, Result};
use crate::io::weights::init_plr_from_osnet;
use crate::log::JsonLog;
use crate::models::{channels_for_width, PlrConfig, PlrLoss, PlrLossConfig, PlrOsnet};
use crate::nn::Ctx;
use crate::optim::{Adam, AdamConfig, LrSchedule};
use crate::params::{Kind, ParamStore};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::tensor::{Device, Tensor};

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
    fn add(&mut self, t: &[f64; 7], correct: usize, images: usize) {
        self.iterations += 1;
        self.images += images;
        for (acc, v) in [&mut self.loss, &mut self.ce1, &mut self.ce2, &mut self.tri1, &mut self.tri2, &mut self.cen1, &mut self.cen2]
            .into_iter()
            .zip(t)
        {
            *acc += v;
        }
        self.acc += correct as f64;
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

    /// One optimisation step on a batch; returns the loss terms and the classifier1 hits.
    fn step(&mut self, batch: Batch, lr: f64, epoch: usize, iteration: usize) -> Result<([f64; 7], usize)> {
        let labels = batch.labels.clone();
        let x = batch.into_tensor()?.to_device(self.device)?;
        let mut tape = Tape::new();
        let mut ctx = Ctx::new(&mut tape, &mut self.store, true).with_precision(self.cfg.precision()?);
        let out = self.model.forward_train(&mut ctx, &Var::constant(x))?;
        let terms = self.loss.forward(&mut ctx, &out, &labels)?;
        let mut t = [0.0; 7];
        for (slot, v) in t.iter_mut().zip([&terms.total, &terms.ce1, &terms.ce2, &terms.tri1, &terms.tri2, &terms.cen1, &terms.cen2]) {
            *slot = v.value().item()? as f64;
        }
        if !t[0].is_finite() {
            return Err(Error::msg(format!(
                "non-finite loss {} at epoch {epoch}, iteration {iteration} (ce {} / {}, triplet {} / {}, center {} / {}, lr {lr:.2e}); training stopped, checkpoints already written are untouched",
                t[0], t[1], t[2], t[3], t[4], t[5], t[6]
            )));
        }
        let hits = argmax_hits(out.logits1.value(), &labels)?;
        let grads = tape.backward(&terms.total)?;
        self.adam.step(&mut self.store, &grads, lr)?;
        Ok((t, hits))
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
        for (i, batch) in batches.enumerate() {
            let batch = batch.map_err(|e| {
                Error::msg(format!("epoch {epoch}, iteration {}: {e} (an unreadable image is fatal: remove or replace it)", i + 1))
            })?;
            let n = batch.len();
            let (t, hits) = self.step(batch, lr, epoch, i + 1)?;
            sums.add(&t, hits, n);
            sums.seconds = t0.elapsed().as_secs_f64();
            pb.set_message(sums.averaged().line());
            pb.inc(1);
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
        let report = evaluate_model(&self.model, &mut self.store, name, &self.query, &self.gallery, run)?;
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
