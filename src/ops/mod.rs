//! Ops, one module per family. Each family's `mod.rs` holds the public forward and backward
//! functions: they validate shapes (the same errors on every device) and dispatch to `cpu.rs`
//! (the numerical reference) or to `cuda.rs` (the launchers of `kernels/<family>.cu`).
//!
//! Gradient arguments and results start with `d` (`dy`, `dx`, `dw`).

pub mod attention;
pub mod batchnorm;
pub mod conv;
pub(crate) mod cpu_util;
pub mod elementwise;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod pool;
