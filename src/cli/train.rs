//! `plr-engine train`: trains PLR-OSNet. Without arguments it runs the quick start (a synthetic
//! dataset and a small model, minutes on a CPU); with `--data` the official recipe of the dataset.

use std::path::PathBuf;

use clap::ValueEnum;

use super::device::DeviceChoice;
use crate::error::Result;
use crate::nn::Precision;
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::{PartialConfig, TrainConfig, Trainer};

/// Train PLR-OSNet. Precedence: built-in defaults < --config file < flags (< nothing: a resumed
/// run starts from the checkpoint's configuration instead of the defaults).
#[derive(clap::Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML configuration file (sections data, model, optim, loss, run, synth; see README, Training).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset root. Without it, a synthetic dataset is generated in the output folder and a
    /// quick-start configuration is used.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// market1501, dukemtmcreid, cuhk03_labeled, cuhk03_detected or generic.
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Base learning rate (warm-up start).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Identities per batch (P).
    #[arg(long)]
    pub batch_ids: Option<usize>,
    /// Images per identity in a batch (K).
    #[arg(long)]
    pub instances: Option<usize>,
    /// Backbone width multiplier: 1.0, 0.75, 0.5 or 0.25.
    #[arg(long)]
    pub width: Option<f32>,
    /// Input height in pixels.
    #[arg(long)]
    pub height: Option<u32>,
    /// Input width in pixels.
    #[arg(long)]
    pub width_px: Option<u32>,
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// f32, or bf16 mixed precision (f32 master weights); a resumed run keeps its own unless given.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder: config.toml, log.jsonl, eval.json, checkpoints.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Evaluate every N epochs (0: only at the end).
    #[arg(long)]
    pub eval_freq: Option<usize>,
    /// Save a checkpoint every N epochs (0: only at the end).
    #[arg(long)]
    pub save_freq: Option<usize>,
    /// Report every evaluation with k-reciprocal re-ranking too (as `eval --rerank`).
    #[arg(long)]
    pub eval_rerank: bool,
    /// OSNet ImageNet weights (safetensors) for the backbone.
    #[arg(long)]
    pub init_osnet: Option<PathBuf>,
    /// Continue from a checkpoint (or the latest checkpoint in a folder).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Center tables' rows: ids (one per training identity), official (751) or a number.
    #[arg(long)]
    pub center_classes: Option<String>,
    /// Weight of the center loss.
    #[arg(long)]
    pub center_weight: Option<f32>,
    /// Train the center-loss centers (the official code keeps them frozen).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub learned_centers: Option<bool>,
    #[arg(long)]
    pub random_flip: Option<bool>,
    #[arg(long)]
    pub random_erasing: Option<bool>,
    /// Image decoding threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Capture the training step in a CUDA graph after one eager step and replay it (GPU only;
    /// falls back to eager steps, with a message, if the capture fails).
    #[arg(long)]
    pub cuda_graph: bool,
}

impl TrainArgs {
    /// The keys the flags set.
    pub fn overrides(&self) -> PartialConfig {
        let mut p = PartialConfig::default();
        p.data.root = self.data.clone().map(Some);
        p.data.dataset = self.dataset.clone();
        p.data.height = self.height;
        p.data.width = self.width_px;
        p.data.batch_ids = self.batch_ids;
        p.data.instances = self.instances;
        p.data.random_flip = self.random_flip;
        p.data.random_erasing = self.random_erasing;
        p.data.workers = self.workers;
        p.model.width = self.width;
        p.model.init_osnet = self.init_osnet.clone().map(Some);
        p.optim.epochs = self.epochs;
        p.optim.lr = self.lr;
        p.loss.center_classes = self.center_classes.clone();
        p.loss.center_weight = self.center_weight;
        p.loss.learned_centers = self.learned_centers;
        p.run.output = self.output.clone();
        p.run.seed = self.seed;
        p.run.device = self.device.and_then(|d| d.to_possible_value()).map(|v| v.get_name().to_string());
        p.run.precision = self.precision.map(|p| p.name().to_string());
        p.run.eval_freq = self.eval_freq;
        p.run.save_freq = self.save_freq;
        p.run.eval_rerank = self.eval_rerank.then_some(true);
        p
    }

    /// The resolved configuration and the checkpoint to resume, if any.
    pub fn resolve(&self) -> Result<(TrainConfig, Option<Checkpoint>)> {
        let file = match &self.config {
            Some(p) => PartialConfig::from_file(p)?,
            None => PartialConfig::default(),
        };
        let flags = self.overrides();
        match &self.resume {
            Some(p) => {
                let ckpt = Checkpoint::read(&checkpoint::find(p)?)?;
                Ok((ckpt.meta.config.clone().resolve_on(&file, &flags)?, Some(ckpt)))
            }
            None => Ok((TrainConfig::resolve(&file, &flags)?, None)),
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let (cfg, resume) = args.resolve()?;
    if cfg.data.root.is_none() {
        println!(
            "quick start (no --data): a synthetic dataset of {} identities x {} images, {} cameras; the official recipe applies when --data is given",
            cfg.synth.ids, cfg.synth.images_per_id, cfg.synth.cameras
        );
    }
    if args.cuda_graph && super::device::resolve_device(cfg.device()?)? != crate::tensor::Device::Cuda {
        return Err(crate::error::Error::msg("--cuda-graph needs the GPU, and this run would train on the CPU (see --device)"));
    }
    let mut trainer = Trainer::new(cfg, resume.as_ref())?;
    drop(resume);
    trainer.cuda_graph = args.cuda_graph;
    println!("{}", trainer.describe());
    println!("{}", trainer.dataset.summary().trim_end());
    println!("writing to {}", trainer.cfg.run.output.display());
    let summary = trainer.run()?;
    if let (Some(b), Some(a)) = (&summary.before, &summary.after) {
        println!(
            "before training: mAP {:.1}%, rank-1 {:.1}%; after {} epochs: mAP {:.1}%, rank-1 {:.1}%",
            100.0 * b.metrics.map,
            100.0 * b.metrics.rank1,
            trainer.epoch,
            100.0 * a.metrics.map,
            100.0 * a.metrics.rank1
        );
    }
    if let Some(last) = summary.checkpoints.last() {
        println!("final checkpoint: {}", last.display());
    }
    Ok(())
}
