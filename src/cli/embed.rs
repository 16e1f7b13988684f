//! `plr-engine embed`: the eval features of every image in a folder, written as a safetensors file
//! (`features` [N, D] f32; metadata `files`, a JSON array of the file names in row order).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::device::{resolve_device, DeviceChoice};
use crate::data::image::load_test_image;
use crate::error::{Error, Result};
use crate::io::weights::{load_plr, write_safetensors, OutTensor};
use crate::nn::{Ctx, Precision};
use crate::tape::{Tape, Var};
use crate::tensor::{Device, Tensor};

/// Compute PLR-OSNet features (the 2560-d eval output at x1.0) of every image in a folder.
#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    /// PLR-OSNet weights file or training checkpoint (safetensors).
    #[arg(long)]
    pub weights: PathBuf,
    /// Folder of .jpg/.jpeg/.png images (not searched recursively), embedded in file-name order.
    #[arg(long)]
    pub images: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// f32, or bf16 mixed precision (features are written as f32 either way).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Input height the images are resized to.
    #[arg(long, default_value_t = 256)]
    pub height: u32,
    /// Input width the images are resized to.
    #[arg(long, default_value_t = 128)]
    pub width: u32,
}

/// The images of `dir`, sorted by file name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if path.is_file() && matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::msg(format!("{}: no .jpg, .jpeg or .png images in this folder", dir.display())));
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Height of the final feature map for an input of height `h` (conv1 /2, maxpool /2, two
/// transitions /2, with PyTorch's floor rounding).
fn final_height(h: usize) -> usize {
    let conv1 = (h + 2 * 3 - 7) / 2 + 1;
    let pool = (conv1 + 2 - 3) / 2 + 1;
    pool / 2 / 2
}

/// Embeds the images (in order) and returns the features, [N, D] row-major, and D.
pub fn embed_files(
    weights: &Path,
    files: &[PathBuf],
    device: Device,
    precision: Precision,
    batch_size: usize,
    height: u32,
    width: u32,
) -> Result<(Vec<f32>, usize)> {
    if batch_size == 0 {
        return Err(Error::msg("--batch-size must be positive"));
    }
    if height < 16 || width < 16 {
        return Err(Error::msg(format!("--height {height} and --width {width}: both must be at least 16")));
    }
    let (model, mut store) = load_plr(weights)?;
    let parts = model.config.parts;
    if !final_height(height as usize).is_multiple_of(parts) {
        return Err(Error::msg(format!(
            "--height {height}: the final feature map is {} rows high, which {parts} stripes do not divide",
            final_height(height as usize)
        )));
    }
    store.to_device(device)?;
    let dim = model.config.feature_dim();
    let (h, w) = (height as usize, width as usize);
    let mut features = Vec::with_capacity(files.len() * dim);
    let pb = crate::log::image_bar(files.len(), "embed");
    for chunk in files.chunks(batch_size) {
        let images: Vec<Vec<f32>> = chunk.par_iter().map(|p| load_test_image(p, height, width)).collect::<Result<_>>()?;
        let x = Tensor::from_vec(images.concat(), &[chunk.len(), 3, h, w])?.to_device(device)?;
        let mut tape = Tape::no_grad();
        let mut ctx = Ctx::new(&mut tape, &mut store, false).with_precision(precision);
        let f = model.forward_eval(&mut ctx, &Var::constant(x))?;
        features.extend(f.value().to_vec()?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok((features, dim))
}

pub fn run(args: &EmbedArgs) -> Result<()> {
    let files = list_images(&args.images)?;
    let device = resolve_device(args.device)?;
    let (features, dim) = embed_files(&args.weights, &files, device, args.precision, args.batch_size, args.height, args.width)?;
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let files_json = serde_json::to_string(&names).map_err(|e| Error::msg(format!("cannot encode the file names: {e}")))?;
    let meta = HashMap::from([("files".to_string(), files_json)]);
    write_safetensors(&args.out, &[OutTensor::f32("features", &[files.len(), dim], &features)], meta)?;
    println!(
        "embedded {} images on {device} ({}): features [{}, {dim}] -> {}",
        files.len(),
        args.precision.name(),
        files.len(),
        args.out.display()
    );
    Ok(())
}
