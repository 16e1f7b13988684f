//! Everything between image files and tensors.

pub mod image;
