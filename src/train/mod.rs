//! Training and evaluation of PLR-OSNet: configuration, the training loop, checkpoints, and
//! model evaluation on a dataset.

pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod trainer;

pub use config::{PartialConfig, TrainConfig};
pub use evaluate::{evaluate_model, extract_features, EvalReport, FeatureRun};
pub use trainer::{EpochStats, TrainSummary, Trainer};
