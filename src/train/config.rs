//! The training configuration: built-in defaults, a TOML file (`--config`) and command-line flags,
//! in that order of precedence (a later source overrides an earlier one, key by key).
//!
//! The defaults depend on the run: with a dataset (`--data`) they are the official PLR-OSNet recipe
//! for that dataset (spec section 4); without one they are the quick-start run, a narrow model
//! trained briefly on a small synthetic dataset. The resolved configuration is saved as
//! `config.toml` in the output folder and inside every checkpoint, and that file is itself a valid
//! `--config`.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::cli::device::DeviceChoice;

use crate::data::dataset::DatasetKind;
use crate::error::{Error, Result};
use crate::nn::Precision;
use crate::optim::LrSchedule;

/// Declares a config section twice: the resolved struct, and a `Partial` twin whose every field is
/// optional (what a TOML file or the flags set). `apply` copies the set fields over.
macro_rules! section {
    ($(#[$m:meta])* $name:ident, $partial:ident { $($(#[$fm:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
        }

        #[derive(Clone, Debug, Default, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $partial {
            $(pub $field: Option<$ty>,)*
        }

        impl $name {
            fn apply(&mut self, p: &$partial) {
                $(if let Some(v) = &p.$field {
                    self.$field = v.clone();
                })*
            }
        }
    };
}

section!(
    /// Where the images come from and how batches are formed.
    DataConfig, PartialData {
        /// Dataset root (`--data`); absent means the quick-start synthetic dataset.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<PathBuf>,
        /// market1501, dukemtmcreid, cuhk03_labeled, cuhk03_detected or generic.
        dataset: String,
        /// Input height in pixels.
        height: u32,
        /// Input width in pixels.
        width: u32,
        /// Identities per batch (P).
        batch_ids: usize,
        /// Images per identity in a batch (K).
        instances: usize,
        random_flip: bool,
        random_erasing: bool,
        /// Image decoding threads.
        workers: usize,
        /// Batch size of feature extraction.
        test_batch: usize,
    }
);

section!(
    /// The network.
    ModelConfig, PartialModel {
        /// Backbone width multiplier: 1.0, 0.75, 0.5 or 0.25.
        width: f32,
        /// Horizontal stripes of the local branch.
        parts: usize,
        /// OSNet ImageNet weights (safetensors) to initialise the backbone from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init_osnet: Option<PathBuf>,
    }
);

section!(
    /// Adam and the learning-rate schedule (GradualWarmupScheduler then MultiStepLR, per epoch).
    OptimConfig, PartialOptim {
        epochs: usize,
        /// Base learning rate (the warm-up starts here).
        lr: f64,
        /// Coupled L2 weight decay.
        weight_decay: f64,
        /// Warm-up ends at lr * warmup_multiplier.
        warmup_multiplier: f64,
        /// GradualWarmupScheduler's total_epoch: the warm-up reaches its peak at epoch warmup_epochs + 1.
        warmup_epochs: usize,
        /// MultiStepLR milestones, counted from the end of the warm-up.
        milestones: Vec<usize>,
        gamma: f64,
    }
);

section!(
    /// The loss terms' options (spec section 3).
    LossConfig, PartialLoss {
        label_smooth: f32,
        center_weight: f32,
        /// Rows of the center tables: "ids" (one per training identity), "official" (751, as the
        /// official code on every dataset) or a number.
        center_classes: String,
        /// Train the centers (the official code leaves them at their random init).
        learned_centers: bool,
    }
);

section!(
    /// Where the run writes and how often it evaluates and saves.
    RunConfig, PartialRun {
        output: PathBuf,
        seed: u64,
        /// cpu, cuda or auto.
        device: String,
        /// f32, or bf16 mixed precision (bf16 activations and convolution weights, f32 master
        /// weights; docs/DECISIONS.md). Configurations written before it existed mean f32.
        #[serde(default = "default_precision")]
        precision: String,
        /// Evaluate every this many epochs (0: only at the end).
        eval_freq: usize,
        /// Save a checkpoint every this many epochs (0: only at the end).
        save_freq: usize,
        /// Evaluate the untrained model before the first epoch.
        eval_before_training: bool,
        /// Report every evaluation with k-reciprocal re-ranking too (k1 20, k2 6, lambda 0.3).
        /// Configurations written before it existed mean false.
        #[serde(default)]
        eval_rerank: bool,
    }
);

section!(
    /// The synthetic dataset of the quick-start run (used only without a dataset root).
    SynthSettings, PartialSynth {
        ids: usize,
        cameras: usize,
        images_per_id: usize,
    }
);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub loss: LossConfig,
    pub run: RunConfig,
    pub synth: SynthSettings,
}

/// A configuration with any subset of keys set: a TOML file or the command-line flags.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    #[serde(default)]
    pub data: PartialData,
    #[serde(default)]
    pub model: PartialModel,
    #[serde(default)]
    pub optim: PartialOptim,
    #[serde(default)]
    pub loss: PartialLoss,
    #[serde(default)]
    pub run: PartialRun,
    #[serde(default)]
    pub synth: PartialSynth,
}

impl PartialConfig {
    /// Parses TOML text; `origin` (a file name) prefixes any error, which names the offending key.
    pub fn from_toml(text: &str, origin: &str) -> Result<PartialConfig> {
        toml::from_str(text).map_err(|e| Error::msg(format!("{origin}: {}", e.to_string().trim_end())))
    }

    pub fn from_file(path: &Path) -> Result<PartialConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The dataset root this source sets, if any.
    fn root(&self) -> Option<&PathBuf> {
        self.data.root.as_ref().and_then(Option::as_ref)
    }
}

/// `generic` is the name the CLI documents for a user's own data (the loader calls it `custom`).
pub fn parse_dataset(name: &str) -> Result<DatasetKind> {
    match name {
        "generic" => Ok(DatasetKind::Custom),
        other => other.parse(),
    }
}

/// The name written back into configs and results.
pub fn dataset_name(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Custom => "generic",
        other => other.name(),
    }
}

impl TrainConfig {
    /// The official recipe for `dataset` (spec section 4): 256x128, 16 x 4 batches, Adam at 3.5e-5
    /// warming up x10, 120 epochs (150 for CUHK03), evaluation and checkpoint every 10 epochs.
    pub fn official(dataset: DatasetKind, root: Option<PathBuf>) -> TrainConfig {
        let (schedule, epochs) = match dataset {
            DatasetKind::Cuhk03Labeled | DatasetKind::Cuhk03Detected => (LrSchedule::cuhk03(), 150),
            _ => (LrSchedule::market(), 120),
        };
        TrainConfig {
            data: DataConfig {
                root,
                dataset: dataset_name(dataset).into(),
                height: 256,
                width: 128,
                batch_ids: 16,
                instances: 4,
                random_flip: true,
                random_erasing: true,
                workers: default_workers(),
                test_batch: 300,
            },
            model: ModelConfig { width: 1.0, parts: 4, init_osnet: None },
            optim: OptimConfig {
                epochs,
                lr: schedule.base_lr,
                weight_decay: 5e-4,
                warmup_multiplier: schedule.multiplier,
                warmup_epochs: schedule.total_epoch,
                milestones: schedule.milestones,
                gamma: schedule.gamma,
            },
            loss: LossConfig { label_smooth: 0.1, center_weight: 5e-4, center_classes: "ids".into(), learned_centers: false },
            run: RunConfig {
                output: PathBuf::from("runs").join(dataset_name(dataset)),
                seed: 1,
                device: "auto".into(),
                precision: default_precision(),
                eval_freq: 10,
                save_freq: 10,
                eval_before_training: false,
                eval_rerank: false,
            },
            synth: SynthSettings { ids: 60, cameras: 4, images_per_id: 12 },
        }
    }

    /// The zero-configuration run: OSNet x0.25 at 128x64 on a synthetic dataset of 100 identities
    /// (50 train), 8 x 4 batches, 30 epochs with the official schedule's shape (warm-up x10, then
    /// two x0.1 decays) compressed, at 3e-4 rising to 3e-3: a small model trained from scratch
    /// learns far faster at ~9x the official rate (made for ImageNet-initialised x1.0) than at 3x
    /// (mAP 73% vs 32% after 10 epochs); evaluated before training and every 10 epochs. About 3
    /// minutes on 2 CPU cores (README, Quick start).
    pub fn quickstart() -> TrainConfig {
        let mut c = TrainConfig::official(DatasetKind::Market1501, None);
        c.data.height = 128;
        c.data.width = 64;
        c.data.batch_ids = 8;
        c.data.test_batch = 128;
        c.model.width = 0.25;
        c.optim.epochs = 30;
        c.optim.lr = 3e-4;
        c.optim.warmup_epochs = 5;
        c.optim.milestones = vec![14, 22];
        c.run.output = PathBuf::from("runs/quickstart");
        c.run.eval_before_training = true;
        c.synth.ids = 100;
        c
    }

    /// Defaults (official recipe when some source names a dataset root, else quick start), then
    /// `file`, then `flags`.
    pub fn resolve(file: &PartialConfig, flags: &PartialConfig) -> Result<TrainConfig> {
        let root = flags.root().or(file.root()).cloned();
        let cfg = match root {
            Some(root) => {
                let name = flags.data.dataset.as_ref().or(file.data.dataset.as_ref()).map_or("market1501", String::as_str);
                TrainConfig::official(parse_dataset(name)?, Some(root))
            }
            None => TrainConfig::quickstart(),
        };
        cfg.resolve_on(file, flags)
    }

    /// `self` (a resumed checkpoint's configuration), then `file`, then `flags`.
    pub fn resolve_on(mut self, file: &PartialConfig, flags: &PartialConfig) -> Result<TrainConfig> {
        self.apply(file);
        self.apply(flags);
        self.validate()?;
        Ok(self)
    }

    /// Overrides every key `p` sets.
    pub fn apply(&mut self, p: &PartialConfig) {
        self.data.apply(&p.data);
        self.model.apply(&p.model);
        self.optim.apply(&p.optim);
        self.loss.apply(&p.loss);
        self.run.apply(&p.run);
        self.synth.apply(&p.synth);
    }

    /// Checks values no file or flag may set; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::msg(format!("config: {key}: {why}")));
        parse_dataset(&self.data.dataset)?;
        if self.data.batch_ids < 2 {
            return bad(
                "data.batch_ids (--batch-ids)",
                format!("{} identities per batch; the triplet loss needs at least 2", self.data.batch_ids),
            );
        }
        if self.data.instances < 1 {
            return bad("data.instances (--instances)", "must be at least 1".into());
        }
        if self.data.height < 32 || self.data.width < 16 {
            return bad("data.height/data.width", format!("{}x{} is too small (at least 32x16)", self.data.height, self.data.width));
        }
        if self.data.test_batch == 0 {
            return bad("data.test_batch", "must be positive".into());
        }
        crate::models::channels_for_width(self.model.width).map_err(|e| Error::msg(format!("config: model.width (--width): {e}")))?;
        if self.model.parts == 0 {
            return bad("model.parts", "must be positive".into());
        }
        if self.optim.epochs == 0 {
            return bad("optim.epochs (--epochs)", "must be positive".into());
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return bad("optim.lr (--lr)", format!("{} is not a positive number", self.optim.lr));
        }
        if self.optim.warmup_multiplier.is_nan() || self.optim.warmup_multiplier < 1.0 {
            return bad("optim.warmup_multiplier", format!("{} must be at least 1", self.optim.warmup_multiplier));
        }
        self.center_classes(1)?;
        self.device()?;
        self.precision()?;
        Ok(())
    }

    pub fn precision(&self) -> Result<Precision> {
        Precision::parse(&self.run.precision, "config: run.precision (--precision)")
    }

    pub fn device(&self) -> Result<DeviceChoice> {
        DeviceChoice::from_str(&self.run.device, true)
            .map_err(|_| Error::msg(format!("config: run.device (--device): {:?} is not cpu, cuda or auto", self.run.device)))
    }

    pub fn dataset(&self) -> Result<DatasetKind> {
        parse_dataset(&self.data.dataset)
    }

    pub fn schedule(&self) -> LrSchedule {
        let o = &self.optim;
        LrSchedule {
            base_lr: o.lr,
            multiplier: o.warmup_multiplier,
            total_epoch: o.warmup_epochs,
            milestones: o.milestones.clone(),
            gamma: o.gamma,
        }
    }

    /// Rows of each center table for a training set of `num_ids` identities.
    pub fn center_classes(&self, num_ids: usize) -> Result<usize> {
        match self.loss.center_classes.as_str() {
            "ids" => Ok(num_ids),
            "official" => Ok(crate::models::OFFICIAL_CENTER_CLASSES),
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(Error::msg(format!(
                    "config: loss.center_classes (--center-classes): {n:?} is not \"ids\", \"official\" or a positive number"
                ))),
            },
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::msg(format!("cannot write the configuration as TOML: {e}")))
    }

    /// A complete configuration (a saved `config.toml` or a checkpoint's copy).
    pub fn from_toml(text: &str, origin: &str) -> Result<TrainConfig> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| Error::msg(format!("{origin}: {}", e.to_string().trim_end())))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

fn default_precision() -> String {
    Precision::F32.name().into()
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get()).min(8)
}
