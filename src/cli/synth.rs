//! `plr-engine synth`: writes a synthetic dataset in the Market-1501 layout.

use std::path::PathBuf;

use crate::data::synth::{generate, SynthConfig};
use crate::error::Result;

/// Write a synthetic re-ID dataset (Market-1501 layout, 128x64 JPEGs) for trying the pipeline.
#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Output folder; bounding_box_train, query and bounding_box_test are created in it. Train on
    /// it with `--dataset market1501 --root <out>` (or `custom` for more than 6 cameras).
    #[arg(long)]
    pub out: PathBuf,
    /// Identities, split half for training, half for testing.
    #[arg(long, default_value_t = 60)]
    pub ids: usize,
    /// Cameras (2-9).
    #[arg(long, default_value_t = 4)]
    pub cameras: usize,
    /// Images of each identity, spread over 2 or more cameras.
    #[arg(long, default_value_t = 12)]
    pub images_per_id: usize,
    /// Extra gallery images (pid 0) of people that appear nowhere else.
    #[arg(long, default_value_t = 0)]
    pub distractors: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Delete the .jpg files already in the three output folders instead of refusing.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        ids: args.ids,
        cameras: args.cameras,
        images_per_id: args.images_per_id,
        distractors: args.distractors,
        seed: args.seed,
        ..SynthConfig::default()
    };
    let t0 = std::time::Instant::now();
    let s = generate(&cfg, &args.out, args.force)?;
    println!(
        "wrote {} images to {} in {:.1}s: train {} ids / {} images, query {} ids / {} images, gallery {} ids / {} images",
        s.train_images + s.query_images + s.gallery_images,
        args.out.display(),
        t0.elapsed().as_secs_f64(),
        s.train_ids,
        s.train_images,
        s.query_ids,
        s.query_images,
        s.gallery_ids,
        s.gallery_images
    );
    Ok(())
}
