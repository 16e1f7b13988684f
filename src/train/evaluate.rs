//! Evaluation of a model on a dataset's query and gallery: batched no-grad eval-mode features,
//! then the Market-1501 protocol of `crate::eval` (squared Euclidean distances, same-pid
//! same-camera removal), reported as a table and as JSON.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::data::dataset::Sample;
use crate::data::loader::Loader;
use crate::error::{Error, Result};
use crate::eval::{evaluate, evaluate_reranked, Metrics, RerankConfig};
use crate::models::PlrOsnet;
use crate::nn::{Ctx, Precision};
use crate::params::ParamStore;
use crate::tape::{Tape, Var};
use crate::tensor::{Device, Tensor};

/// How features are computed: images per forward, device and precision.
#[derive(Clone, Copy, Debug)]
pub struct FeatureRun {
    pub batch: usize,
    pub device: Device,
    pub precision: Precision,
}

/// Eval-mode features of every image of `loader`, in order: a CPU f32 tensor [N, D].
pub fn extract_features(model: &PlrOsnet, store: &mut ParamStore, loader: &Loader, run: FeatureRun) -> Result<Tensor> {
    let FeatureRun { batch, device, precision } = run;
    let dim = model.config.feature_dim();
    let mut features = Vec::with_capacity(loader.samples().len() * dim);
    let pb = crate::log::image_bar(loader.samples().len(), "features");
    for b in loader.in_order(batch)? {
        let b = b.map_err(|e| {
            Error::msg(format!("feature extraction: {e} (an unreadable query or gallery image is fatal: remove or replace it)"))
        })?;
        let count = b.len();
        let x = b.into_tensor()?.to_device(device)?;
        let mut tape = Tape::no_grad();
        let mut ctx = Ctx::new(&mut tape, store, false).with_precision(precision);
        features.extend(model.forward_eval(&mut ctx, &Var::constant(x))?.value().to_vec()?);
        pb.inc(count as u64);
    }
    pb.finish_and_clear();
    Tensor::from_vec(features, &[loader.samples().len(), dim])
}

/// What an evaluation produced, as written to JSON.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub dataset: String,
    pub num_query: usize,
    pub num_gallery: usize,
    pub feature_dim: usize,
    pub seconds: f64,
    pub metrics: Metrics,
    /// With k-reciprocal re-ranking, when asked for: its parameters and metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rerank: Option<RerankConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_reranked: Option<Metrics>,
}

fn ids(samples: &[Sample]) -> (Vec<usize>, Vec<usize>) {
    samples.iter().map(|s| (s.pid, s.camid)).unzip()
}

/// Features of query and gallery, then the metrics, and with `rerank` the metrics after
/// k-reciprocal re-ranking too.
pub fn evaluate_model(
    model: &PlrOsnet,
    store: &mut ParamStore,
    dataset: &str,
    query: &Loader,
    gallery: &Loader,
    run: FeatureRun,
    rerank: Option<RerankConfig>,
) -> Result<EvalReport> {
    let t0 = Instant::now();
    let qf = extract_features(model, store, query, run)?;
    let gf = extract_features(model, store, gallery, run)?;
    let (qp, qc) = ids(query.samples());
    let (gp, gc) = ids(gallery.samples());
    // Distances on the model's device: the gallery goes up once, query blocks follow.
    let gf = gf.to_device(run.device)?;
    let (metrics, metrics_reranked) = match rerank {
        Some(cfg) => evaluate_reranked(&qf, &gf, &qp, &qc, &gp, &gc, cfg).map(|(m, r)| (m, Some(r)))?,
        None => (evaluate(&qf, &gf, &qp, &qc, &gp, &gc)?, None),
    };
    Ok(EvalReport {
        dataset: dataset.to_string(),
        num_query: qp.len(),
        num_gallery: gp.len(),
        feature_dim: model.config.feature_dim(),
        seconds: t0.elapsed().as_secs_f64(),
        metrics,
        rerank,
        metrics_reranked,
    })
}

impl EvalReport {
    /// The results as a table: mAP, mINP and CMC ranks 1/5/10/20 in percent; a second row with
    /// re-ranking when it was asked for.
    pub fn table(&self) -> String {
        let pct = |v: f64| format!("{:.1}", 100.0 * v);
        let heads = ["mAP", "mINP", "Rank-1", "Rank-5", "Rank-10", "Rank-20"];
        let cells = |m: &Metrics| [m.map, m.minp, m.rank1, m.rank5, m.rank10, m.rank20].map(pct);
        let mut rows = vec![(self.dataset.clone(), cells(&self.metrics))];
        if let (Some(cfg), Some(m)) = (self.rerank, &self.metrics_reranked) {
            rows.push((format!("{} + re-ranking (k1 {}, k2 {}, lambda {})", self.dataset, cfg.k1, cfg.k2, cfg.lambda), cells(m)));
        }
        let name_w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max("dataset".len());
        let widths: Vec<usize> =
            heads.iter().enumerate().map(|(c, h)| rows.iter().map(|(_, v)| v[c].len()).max().unwrap_or(0).max(h.len())).collect();
        let mut head = format!("| {:<name_w$} |", "dataset");
        let mut rule = format!("|{}|", "-".repeat(name_w + 2));
        for (h, &w) in heads.iter().zip(&widths) {
            head += &format!(" {h:>w$} |");
            rule += &format!("{}|", "-".repeat(w + 2));
        }
        let mut out = format!("{head}\n{rule}\n");
        for (name, vals) in &rows {
            out += &format!("| {name:<name_w$} |");
            for (v, &w) in vals.iter().zip(&widths) {
                out += &format!(" {v:>w$} |");
            }
            out += "\n";
        }
        let m = &self.metrics;
        out + &format!(
            "{} queries ({} skipped: no match in another camera), {} gallery images, {}-d features, {:.1}s",
            self.num_query, m.num_skipped_queries, self.num_gallery, self.feature_dim, self.seconds
        )
    }

    /// Writes the report as pretty JSON, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::msg(format!("{}: cannot encode the results: {e}", path.display())))?;
        crate::io::write_atomic(path, text.as_bytes())
    }
}
