//! Layers with named parameters. A layer registers its tensors in a `ParamStore` under PyTorch's
//! state-dict keys when it is built and keeps only their ids; a forward pass borrows the store and
//! a tape through a `Ctx`.

mod layers;

pub use layers::{BatchNorm, Conv2d, ConvInit, Linear};

use crate::params::{ParamId, ParamStore};
use crate::tape::{Tape, Var};

/// What a forward pass needs: the tape that records it, the parameters (BatchNorm updates its
/// running statistics in training mode) and the mode.
pub struct Ctx<'a> {
    pub tape: &'a mut Tape,
    pub params: &'a mut ParamStore,
    pub train: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(tape: &'a mut Tape, params: &'a mut ParamStore, train: bool) -> Self {
        Ctx { tape, params, train }
    }

    /// The parameter as a tape variable (its gradient is collected when the tape records).
    pub fn param(&mut self, id: ParamId) -> Var {
        self.tape.param(self.params, id)
    }
}

/// `prefix.name`, or `name` alone for an empty prefix.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}
