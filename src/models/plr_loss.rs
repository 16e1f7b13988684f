//! PLR-OSNet's training loss (spec section 3):
//! total = 1/2 (CE1 + CE2) + 1/2 (Tri(v1) + Tri(v2)) + 5e-4 * 1/2 (Cen1(v1) + Cen2(v2)),
//! CE label-smoothed (eps 0.1) on the logits, soft-margin batch-hard triplet and center loss on the
//! pre-BN features.
//!
//! The center-loss centers live in the parameter store under `loss.centers1` / `loss.centers2`
//! (outside the model's state dict: export drops them). By default they are frozen N(0, 1) draws
//! (a Buffer, as in the official code, whose optimizer never sees them); `learned_centers` makes
//! them trainable Params instead.

use super::plr_osnet::PlrTrainOutput;
use crate::error::{Error, Result};
use crate::nn::Ctx;
use crate::params::{Kind, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tape::Var;
use crate::tensor::Tensor;

/// The official code sizes both center tables for Market-1501's 751 identities on every dataset.
pub const OFFICIAL_CENTER_CLASSES: usize = 751;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlrLossConfig {
    /// Rows of each center table. The faithful-but-buggy official value is 751 for every dataset;
    /// the sensible default is the number of training identities. Samples whose label has no
    /// center are left out of the center loss.
    pub center_classes: usize,
    /// Train the centers with the model (a deliberate deviation from the official code).
    pub learned_centers: bool,
    pub label_smooth: f32,
    pub center_weight: f32,
}

impl PlrLossConfig {
    /// The official recipe with one center per training identity.
    pub fn new(num_classes: usize) -> Self {
        PlrLossConfig { center_classes: num_classes, learned_centers: false, label_smooth: 0.1, center_weight: 5e-4 }
    }
}

pub struct PlrLoss {
    pub config: PlrLossConfig,
    pub centers1: ParamId,
    pub centers2: ParamId,
}

/// The total loss and its six terms, each a [1] tensor.
pub struct PlrLossTerms {
    pub total: Var,
    pub ce1: Var,
    pub ce2: Var,
    pub tri1: Var,
    pub tri2: Var,
    pub cen1: Var,
    pub cen2: Var,
}

impl PlrLoss {
    /// Registers the two center tables ([center_classes, local_dim] and [center_classes,
    /// global_dim], N(0, 1)) in `store`.
    pub fn new(store: &mut ParamStore, config: PlrLossConfig, local_dim: usize, global_dim: usize, rng: &mut Rng) -> Result<Self> {
        if config.center_classes == 0 {
            return Err(Error::msg("center loss: center_classes must be positive"));
        }
        let kind = if config.learned_centers { Kind::Param } else { Kind::Buffer };
        let centers1 = store.add("loss.centers1", Tensor::randn(&[config.center_classes, local_dim], 1.0, rng), kind)?;
        let centers2 = store.add("loss.centers2", Tensor::randn(&[config.center_classes, global_dim], 1.0, rng), kind)?;
        Ok(PlrLoss { config, centers1, centers2 })
    }

    pub fn forward(&self, ctx: &mut Ctx, out: &PlrTrainOutput, labels: &[usize]) -> Result<PlrLossTerms> {
        let eps = self.config.label_smooth;
        let ce1 = ctx.tape.cross_entropy_label_smooth(&out.logits1, labels, eps)?;
        let ce2 = ctx.tape.cross_entropy_label_smooth(&out.logits2, labels, eps)?;
        let tri1 = ctx.tape.triplet_soft_margin(&out.v1, labels)?;
        let tri2 = ctx.tape.triplet_soft_margin(&out.v2, labels)?;
        let c1 = ctx.param(self.centers1);
        let c2 = ctx.param(self.centers2);
        let cen1 = ctx.tape.center_loss(&out.v1, labels, &c1)?;
        let cen2 = ctx.tape.center_loss(&out.v2, labels, &c2)?;

        let t = &mut *ctx.tape;
        let ce = t.add(&ce1, &ce2)?;
        let tri = t.add(&tri1, &tri2)?;
        let cen = t.add(&cen1, &cen2)?;
        let ce = t.scale(&ce, 0.5)?;
        let tri = t.scale(&tri, 0.5)?;
        let cen = t.scale(&cen, 0.5 * self.config.center_weight)?;
        let total = t.add(&ce, &tri)?;
        let total = t.add(&total, &cen)?;
        Ok(PlrLossTerms { total, ce1, ce2, tri1, tri2, cen1, cen2 })
    }
}
