//! The input pipeline: decode, resize, normalise and augment images on a pool of background
//! threads, handing ready batches to the trainer through a bounded channel.
//!
//! Every random draw comes from an `Rng` seeded from (run seed, epoch, batch, position), so a run
//! is reproducible whatever the number of worker threads. Resized u8 images are cached in memory
//! up to a byte budget, so after the first epoch a dataset that fits is never decoded again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use image::RgbImage;
use rayon::prelude::*;

use super::dataset::Sample;
use super::image::{load_rgb, normalize_chw, resize_bilinear_pil};
use super::sampler::RandomIdentitySampler;
use super::transforms::Augment;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A seed for one random stream, mixed from a run seed and stream coordinates (SplitMix64 steps),
/// so that nearby coordinates give unrelated streams.
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    let mix = |mut x: u64| {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    };
    parts.iter().fold(mix(seed), |h, &p| mix(h ^ mix(p)))
}

// Stream tags, so the sampler and the augmentation of one epoch draw from unrelated streams.
const SAMPLER_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;

/// A ready batch: images [B, 3, H, W] normalised, with each item's label, camera and file.
#[derive(Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    /// Dataset indices of the items.
    pub indices: Vec<usize>,
    /// Training label (train split) or raw pid (query / gallery).
    pub labels: Vec<usize>,
    pub camids: Vec<usize>,
    pub paths: Vec<PathBuf>,
}

impl Batch {
    pub fn tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.images.clone(), &self.shape)
    }

    pub fn into_tensor(self) -> Result<Tensor> {
        Tensor::from_vec(self.images, &self.shape)
    }

    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub height: u32,
    pub width: u32,
    /// Decoding threads.
    pub workers: usize,
    /// Ready batches kept ahead of the consumer.
    pub prefetch: usize,
    /// Memory for cached resized images, in bytes (0 disables the cache).
    pub cache_bytes: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        let workers = std::thread::available_parallelism().map_or(4, |n| n.get()).min(8);
        LoaderConfig { height: 256, width: 128, workers, prefetch: 4, cache_bytes: 2 << 30 }
    }
}

/// Images of one split, decoded and resized on demand, cached within a byte budget.
struct ImageSet {
    samples: Vec<Sample>,
    height: u32,
    width: u32,
    cache: Vec<OnceLock<Arc<RgbImage>>>,
    cache_budget: usize,
    cache_used: AtomicUsize,
}

impl ImageSet {
    fn image(&self, i: usize) -> Result<Arc<RgbImage>> {
        if let Some(img) = self.cache[i].get() {
            return Ok(img.clone());
        }
        let raw = load_rgb(&self.samples[i].path)?;
        let img =
            Arc::new(if raw.dimensions() == (self.width, self.height) { raw } else { resize_bilinear_pil(&raw, self.height, self.width) });
        let bytes = img.as_raw().len();
        if self.cache_used.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.cache_budget {
            if self.cache[i].set(img.clone()).is_err() {
                // Another worker cached the same image first.
                self.cache_used.fetch_sub(bytes, Ordering::Relaxed);
            }
        } else {
            self.cache_used.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(img)
    }

    fn tensor(&self, i: usize, augment: Option<(&Augment, u64)>) -> Result<Vec<f32>> {
        let mut x = normalize_chw(&*self.image(i)?);
        if let Some((aug, seed)) = augment {
            aug.apply(&mut x, 3, self.height as usize, self.width as usize, &mut Rng::new(seed));
        }
        Ok(x)
    }
}

/// Decodes batches of one split on background threads.
pub struct Loader {
    set: Arc<ImageSet>,
    pool: Arc<rayon::ThreadPool>,
    prefetch: usize,
}

impl Loader {
    pub fn new(samples: Vec<Sample>, cfg: &LoaderConfig) -> Result<Loader> {
        if cfg.height == 0 || cfg.width == 0 {
            return Err(Error::msg(format!("loader: image size {}x{} must be positive", cfg.height, cfg.width)));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers.max(1))
            .thread_name(|i| format!("plr-loader-{i}"))
            .build()
            .map_err(|e| Error::msg(format!("loader: cannot start worker threads: {e}")))?;
        let cache = (0..samples.len()).map(|_| OnceLock::new()).collect();
        let set = ImageSet {
            samples,
            height: cfg.height,
            width: cfg.width,
            cache,
            cache_budget: cfg.cache_bytes,
            cache_used: AtomicUsize::new(0),
        };
        Ok(Loader { set: Arc::new(set), pool: Arc::new(pool), prefetch: cfg.prefetch.max(1) })
    }

    pub fn samples(&self) -> &[Sample] {
        &self.set.samples
    }

    /// Bytes of resized images held in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.set.cache.iter().filter_map(|c| c.get()).map(|img| img.as_raw().len()).sum()
    }

    /// One training epoch: identity-balanced batches from `sampler`, augmented. The same (seed,
    /// epoch) always gives the same batches, bit for bit.
    pub fn train_epoch(&self, sampler: &RandomIdentitySampler, augment: &Augment, seed: u64, epoch: usize) -> Result<BatchIter> {
        let plan = sampler.epoch(&mut Rng::new(derive_seed(seed, &[SAMPLER_STREAM, epoch as u64])));
        self.batches(plan, Some((augment.clone(), derive_seed(seed, &[AUGMENT_STREAM, epoch as u64]))))
    }

    /// Every image once, in dataset order, without augmentation (feature extraction).
    pub fn in_order(&self, batch_size: usize) -> Result<BatchIter> {
        let idx: Vec<usize> = (0..self.set.samples.len()).collect();
        self.batches(idx.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect(), None)
    }

    /// Produces the given batches of dataset indices in order; with `augment`, item j of batch b
    /// is augmented with an Rng seeded from (seed, b, j).
    pub fn batches(&self, plan: Vec<Vec<usize>>, augment: Option<(Augment, u64)>) -> Result<BatchIter> {
        if let Some(&bad) = plan.iter().flatten().find(|&&i| i >= self.set.samples.len()) {
            return Err(Error::msg(format!("loader: index {bad} out of range for {} images", self.set.samples.len())));
        }
        let (tx, rx) = sync_channel(self.prefetch);
        let (set, pool) = (self.set.clone(), self.pool.clone());
        let remaining = plan.len();
        let handle = std::thread::Builder::new()
            .name("plr-loader".into())
            .spawn(move || {
                for (b, idx) in plan.into_iter().enumerate() {
                    let batch = pool.install(|| make_batch(&set, idx, b, augment.as_ref()));
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::msg(format!("loader: cannot start the loader thread: {e}")))?;
        Ok(BatchIter { rx: Some(rx), handle: Some(handle), remaining })
    }
}

fn make_batch(set: &ImageSet, indices: Vec<usize>, b: usize, augment: Option<&(Augment, u64)>) -> Result<Batch> {
    let (h, w) = (set.height as usize, set.width as usize);
    let per = 3 * h * w;
    let mut images = vec![0.0f32; indices.len() * per];
    images.par_chunks_mut(per).zip(indices.par_iter()).enumerate().try_for_each(|(j, (dst, &i))| -> Result<()> {
        let aug = augment.map(|(a, seed)| (a, derive_seed(*seed, &[b as u64, j as u64])));
        dst.copy_from_slice(&set.tensor(i, aug)?);
        Ok(())
    })?;
    let s = &set.samples;
    Ok(Batch {
        images,
        shape: [indices.len(), 3, h, w],
        labels: indices.iter().map(|&i| s[i].pid).collect(),
        camids: indices.iter().map(|&i| s[i].camid).collect(),
        paths: indices.iter().map(|&i| s[i].path.clone()).collect(),
        indices,
    })
}

/// Ready batches in order. Dropping it stops the producer.
pub struct BatchIter {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.remaining == 0 {
            return None;
        }
        let batch = match self.rx.as_ref()?.recv() {
            Ok(b) => b,
            Err(_) => Err(Error::msg("loader: the loader thread stopped early")),
        };
        self.remaining = if batch.is_ok() { self.remaining - 1 } else { 0 };
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining))
    }
}

impl BatchIter {
    /// Batches still to come.
    pub fn remaining(&self) -> usize {
        self.remaining
    }
}

impl Drop for BatchIter {
    fn drop(&mut self) {
        // Disconnect first so a producer blocked on a full channel wakes up and exits.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
