//! plr-engine: a training engine for PLR-OSNet person re-identification.
//!
//! Layers of the crate, bottom up: `tensor` (shape, dtype, device buffer), `ops` (forward and
//! backward of every op, CPU reference and CUDA), `tape` (autograd), `params` (named parameters
//! with PyTorch's state-dict keys).

pub mod cli;
pub mod cuda;
pub mod data;
pub mod error;
pub mod eval;
pub mod io;
pub mod log;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod profile;
pub mod rng;
pub mod tape;
pub mod tensor;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
pub use params::{ParamId, ParamStore};
pub use tape::{Grads, Tape, Var};
pub use tensor::{DType, Device, Tensor};

// Activations are large and short-lived: glibc would mmap and page-fault them on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
