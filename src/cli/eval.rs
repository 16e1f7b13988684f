//! `plr-engine eval`: evaluates a PLR-OSNet weights file or checkpoint on a dataset's query and
//! gallery (Market-1501 protocol): mAP, mINP and CMC ranks 1/5/10/20, printed as a table and
//! written to JSON.

use std::path::{Path, PathBuf};

use super::device::{resolve_device, DeviceChoice};
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderConfig};
use crate::error::{Error, Result};
use crate::eval::RerankConfig;
use crate::io::weights::{load_plr, TensorFile};
use crate::nn::Precision;
use crate::train::config::{dataset_name, parse_dataset, TrainConfig};
use crate::train::{evaluate_model, EvalReport, FeatureRun};

/// Evaluate PLR-OSNet weights on a re-ID dataset.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// PLR-OSNet weights file or training checkpoint (safetensors).
    #[arg(long)]
    pub weights: PathBuf,
    /// Dataset root.
    #[arg(long)]
    pub data: PathBuf,
    /// market1501, dukemtmcreid, cuhk03_labeled, cuhk03_detected or generic.
    #[arg(long)]
    pub dataset: String,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// f32, or bf16 mixed precision (features are f32 either way).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Input height; default: the training input size recorded in a checkpoint, else 256.
    #[arg(long)]
    pub height: Option<u32>,
    /// Input width in pixels; default: from a checkpoint, else 128.
    #[arg(long)]
    pub width_px: Option<u32>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 300)]
    pub batch_size: usize,
    /// Where to write the results; default: <weights>.eval-<dataset>.json beside the weights.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also report the metrics after k-reciprocal re-ranking (Zhong et al. 2017, as fast-reid's
    /// TEST.RERANK). Costs an all-pairs distance pass over query + gallery.
    #[arg(long)]
    pub rerank: bool,
    /// Re-ranking: size of the k-reciprocal neighbourhoods.
    #[arg(long, default_value_t = 20, requires = "rerank")]
    pub rerank_k1: usize,
    /// Re-ranking: neighbours averaged by the local query expansion.
    #[arg(long, default_value_t = 6, requires = "rerank")]
    pub rerank_k2: usize,
    /// Re-ranking: weight of the original distance against the Jaccard distance, in [0, 1].
    #[arg(long, default_value_t = 0.3, requires = "rerank")]
    pub rerank_lambda: f32,
}

/// The input size a checkpoint was trained at, from its recorded configuration.
fn trained_size(weights: &Path) -> Result<Option<(u32, u32)>> {
    let file = TensorFile::read(weights)?;
    Ok(file.metadata().get("config").and_then(|t| TrainConfig::from_toml(t, "config").ok()).map(|c| (c.data.height, c.data.width)))
}

/// Loads the weights and the dataset, evaluates, and returns the report.
pub fn evaluate_weights(args: &EvalArgs) -> Result<EvalReport> {
    if args.batch_size == 0 {
        return Err(Error::msg("--batch-size must be positive"));
    }
    let rerank = args.rerank.then_some(RerankConfig { k1: args.rerank_k1, k2: args.rerank_k2, lambda: args.rerank_lambda });
    if let Some(cfg) = rerank {
        cfg.validate().map_err(|e| Error::msg(format!("--rerank-k1/--rerank-k2/--rerank-lambda: {e}")))?;
    }
    let kind = parse_dataset(&args.dataset)?;
    let dataset = Dataset::load(kind, &args.data)?;
    let (model, mut store) = load_plr(&args.weights)?;
    let (h, w) = trained_size(&args.weights)?.unwrap_or((256, 128));
    let (height, width) = (args.height.unwrap_or(h), args.width_px.unwrap_or(w));
    let device = resolve_device(args.device)?;
    store.to_device(device)?;
    let lc = LoaderConfig { height, width, ..LoaderConfig::default() };
    let query = Loader::new(dataset.query, &lc)?;
    let gallery = Loader::new(dataset.gallery, &lc)?;
    println!(
        "evaluating {} ({}x{} input, {device}, {}) on {}: {} query, {} gallery images",
        args.weights.display(),
        height,
        width,
        args.precision.name(),
        dataset.dir.display(),
        query.samples().len(),
        gallery.samples().len()
    );
    let run = FeatureRun { batch: args.batch_size, device, precision: args.precision };
    evaluate_model(&model, &mut store, dataset_name(kind), &query, &gallery, run, rerank)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let report = evaluate_weights(args)?;
    println!("{}", report.table());
    let json = args.json.clone().unwrap_or_else(|| {
        let mut name = args.weights.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".eval-{}.json", report.dataset));
        args.weights.with_file_name(name)
    });
    report.write_json(&json)?;
    println!("results written to {}", json.display());
    Ok(())
}
