//! Subcommands of the `plr-engine` binary; `main.rs` only parses and dispatches.

pub mod bench;
pub mod device;
pub mod embed;
pub mod eval;
pub mod export;
pub mod synth;
pub mod train;
