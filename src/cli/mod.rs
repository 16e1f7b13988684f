//! Subcommands of the `plr-engine` binary; `main.rs` only parses and dispatches.

pub mod synth;
