//! `plr-engine export`: a training checkpoint (or a weights file) to a plain weights file holding
//! exactly the model's state dict, under PyTorch's names, loadable with
//! `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::io::weights::{load_any_model, save_state_dict, ModelKind};

/// Write the model weights of a checkpoint as a plain safetensors state dict.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Training checkpoint or weights file (safetensors, PLR-OSNet or OSNet).
    #[arg(long)]
    pub weights: PathBuf,
    /// Output file; written atomically.
    #[arg(long)]
    pub out: PathBuf,
}

/// What was exported.
#[derive(Debug)]
pub struct ExportSummary {
    pub model: ModelKind,
    pub tensors: usize,
    pub parameters: usize,
}

/// Loads `weights` strictly (optimizer and loss state dropped, `module.` stripped, half floats
/// widened) and writes the model's state dict to `out`.
pub fn export(weights: &Path, out: &Path) -> Result<ExportSummary> {
    let (model, store) = load_any_model(weights)?;
    let (name, channels, classes) = match model {
        ModelKind::PlrOsnet(c) => ("plr_osnet", c.channels, c.num_classes),
        ModelKind::Osnet(c) => ("osnet", c.channels, c.num_classes),
    };
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), name.to_string()),
        ("channels".to_string(), channels.map(|c| c.to_string()).join(",")),
        ("num_classes".to_string(), classes.to_string()),
    ]);
    if let ModelKind::PlrOsnet(c) = model {
        meta.insert("parts".into(), c.parts.to_string());
    }
    save_state_dict(&store, out, meta)?;
    Ok(ExportSummary { model, tensors: store.len(), parameters: store.count_params(|_| true) })
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let s = export(&args.weights, &args.out)?;
    println!("exported {}: {} tensors, {} parameters -> {}", s.model, s.tensors, s.parameters, args.out.display());
    Ok(())
}
