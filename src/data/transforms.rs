//! Training augmentation on normalised [3, H, W] images: random horizontal flip and torchreid's
//! RandomErasing. Flipping after normalisation equals flipping the u8 image before it, so both
//! run on the tensor.

use crate::rng::Rng;

/// torchreid's RandomErasing defaults (spec section 4).
#[derive(Clone, Debug, PartialEq)]
pub struct RandomErasing {
    pub probability: f64,
    pub area_min: f64,
    pub area_max: f64,
    /// Aspect ratios are drawn from U(r1, 1/r1).
    pub r1: f64,
    /// Per-channel fill written into the normalised tensor (CIFAR means, as in torchreid).
    pub fill: [f32; 3],
    pub attempts: usize,
}

impl Default for RandomErasing {
    fn default() -> Self {
        RandomErasing { probability: 0.5, area_min: 0.02, area_max: 0.4, r1: 0.3, fill: [0.4914, 0.4822, 0.4465], attempts: 100 }
    }
}

/// An erased rectangle: rows top..top+h, columns left..left+w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

impl RandomErasing {
    /// Erases one rectangle of `img` ([C, H, W]) with probability `probability`; returns it.
    pub fn apply(&self, img: &mut [f32], channels: usize, height: usize, width: usize, rng: &mut Rng) -> Option<Rect> {
        if rng.uniform() > self.probability {
            return None;
        }
        let area = (height * width) as f64;
        for _ in 0..self.attempts {
            let target = rng.uniform_range(self.area_min, self.area_max) * area;
            let aspect = rng.uniform_range(self.r1, 1.0 / self.r1);
            // Python's round() rounds half to even.
            let h = (target * aspect).sqrt().round_ties_even() as usize;
            let w = (target / aspect).sqrt().round_ties_even() as usize;
            if h < height && w < width {
                let top = rng.below(height - h + 1);
                let left = rng.below(width - w + 1);
                for c in 0..channels {
                    let fill = self.fill[c.min(2)];
                    for y in top..top + h {
                        img[(c * height + y) * width + left..][..w].fill(fill);
                    }
                }
                return Some(Rect { top, left, h, w });
            }
        }
        None
    }
}

/// Mirrors every row of a [C, H, W] image.
pub fn hflip(img: &mut [f32], width: usize) {
    for row in img.chunks_exact_mut(width) {
        row.reverse();
    }
}

/// The training augmentation: flip with probability `flip_p`, then optional random erasing.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    pub flip_p: f64,
    pub erasing: Option<RandomErasing>,
}

impl Default for Augment {
    /// PLR-OSNet's training transforms (random_flip random_erase).
    fn default() -> Self {
        Augment { flip_p: 0.5, erasing: Some(RandomErasing::default()) }
    }
}

impl Augment {
    pub fn apply(&self, img: &mut [f32], channels: usize, height: usize, width: usize, rng: &mut Rng) {
        if rng.uniform() < self.flip_p {
            hflip(img, width);
        }
        if let Some(e) = &self.erasing {
            e.apply(img, channels, height, width, rng);
        }
    }
}
