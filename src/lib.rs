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

/// Index of `mi_option_purge_delay` in `mi_option_t` of the mimalloc v3 that libmimalloc-sys 0.1.49
/// bundles (c_src/mimalloc/v3/include/mimalloc.h); the crate exports the enum only with its
/// `extended` feature, which would pull in another dependency. A test checks it.
const MI_OPTION_PURGE_DELAY: i32 = 15;

extern "C" {
    fn mi_option_set(option: i32, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: i32) -> std::ffi::c_long;
}

/// Makes the allocator keep freed memory instead of returning it to the OS after a delay.
///
/// A training step frees and reallocates its activations (hundreds of MiB) every step; with
/// mimalloc's default 1 s purge delay the next step page-faults all of them afresh, a third of a
/// CPU step on 2 cores. Kept, the process holds its peak working set, as PyTorch's caching
/// allocators do. Called by the binary's `main`; the library leaves the defaults alone.
pub fn keep_freed_memory() {
    // SAFETY: mi_option_set only stores an integer option; -1 means "never purge".
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[cfg(test)]
mod allocator_tests {
    use super::*;

    #[test]
    fn keep_freed_memory_sets_the_purge_delay() {
        // mimalloc's default purge delay is 1000 ms (src/options.c); an index naming another
        // option would read that option's default instead.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        }
        keep_freed_memory();
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, -1);
    }
}
