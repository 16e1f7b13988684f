//! Everything between image files and training batches: dataset layouts, the identity sampler,
//! augmentation, the background loader and the synthetic dataset generator.

pub mod dataset;
pub mod image;
pub mod loader;
pub mod sampler;
pub mod synth;
pub mod transforms;
