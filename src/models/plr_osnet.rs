//! PLR-OSNet as the official code builds it (spec section 2): the OSNet trunk up to conv3 with an
//! attention module after conv2 and after conv3, then two copies of conv4 + conv5: a local branch
//! pooled as horizontal stripes and a global branch max-pooled and projected by `fc2`; BNNeck-style
//! BatchNorm1d on each branch before its classifier.

use super::osnet::{check_channels, ConvBn, Stage, Stem};
use crate::error::{Error, Result};
use crate::nn::{join, BatchNorm, Conv2d, ConvInit, Ctx, Linear};
use crate::ops::conv::Conv2dCfg;
use crate::params::{Kind, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tape::Var;
use crate::tensor::Tensor;

/// Query/key channels of the position attention = C / 8.
const PAM_REDUCTION: usize = 8;
/// Hidden channels of the pixel-wise SE gate = C / 16.
const SE_REDUCTION: usize = 16;

/// PLR-OSNet's shape: backbone stage widths, classes, stripes of the local branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlrConfig {
    pub channels: [usize; 4],
    pub num_classes: usize,
    pub parts: usize,
}

impl PlrConfig {
    /// Width of v1 (the concatenated stripe features).
    pub fn local_dim(&self) -> usize {
        self.parts * self.channels[3]
    }

    /// Width of v2 (the global feature).
    pub fn global_dim(&self) -> usize {
        self.channels[3]
    }

    /// Width of the eval feature.
    pub fn feature_dim(&self) -> usize {
        self.local_dim() + self.global_dim()
    }

    fn check(&self) -> Result<()> {
        check_channels(self.channels)?;
        let (c1, c2) = (self.channels[1], self.channels[2]);
        if c1 / SE_REDUCTION == 0 || c2 / SE_REDUCTION == 0 {
            return Err(Error::msg(format!(
                "PLR-OSNet channels {:?}: the attention modules need at least {SE_REDUCTION} channels",
                self.channels
            )));
        }
        if self.num_classes == 0 || self.parts == 0 {
            return Err(Error::msg(format!("PLR-OSNet needs at least one class and one part, got {self:?}")));
        }
        Ok(())
    }
}

/// Position attention without a value projection: A = softmax_j(q_i . k_j) over positions,
/// out = X A^T, y = BN(gamma * out) + x. Under bf16 the products, the softmax and the gamma scale
/// run in f32 (a softmax over H*W positions of bf16 scores loses the small weights); the result is
/// rounded back to bf16 before the BatchNorm.
struct Pam {
    query: Conv2d,
    key: Conv2d,
    gamma: ParamId,
    bn: BatchNorm,
}

impl Pam {
    fn new(store: &mut ParamStore, p: &str, c: usize, rng: &mut Rng) -> Result<Self> {
        let one = Conv2dCfg::new(1, 0, 1);
        let qk = c / PAM_REDUCTION;
        Ok(Pam {
            query: Conv2d::new(store, &join(p, "query_conv"), c, qk, 1, one, true, ConvInit::PytorchDefault, rng)?,
            key: Conv2d::new(store, &join(p, "key_conv"), c, qk, 1, one, true, ConvInit::PytorchDefault, rng)?,
            gamma: store.add(join(p, "gamma"), Tensor::from_vec(vec![0.0], &[1])?, Kind::Param)?,
            bn: BatchNorm::new(store, &join(p, "bn"), c)?,
        })
    }

    fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let (b, c, h, w) = x.value().dims4("PAM")?;
        let n = h * w;
        let q = self.query.forward(ctx, x)?;
        let k = self.key.forward(ctx, x)?;
        let qk = q.shape()[1];
        let q = ctx.tape.reshape(&q, &[b, qk, n])?;
        let q = ctx.to_f32(&q)?;
        let k = ctx.tape.reshape(&k, &[b, qk, n])?;
        let k = ctx.to_f32(&k)?;
        let energy = ctx.tape.bmm(&q, &k, true, false)?;
        let attention = ctx.tape.softmax_lastdim(&energy)?;
        let xv = ctx.tape.reshape(x, &[b, c, n])?;
        let xv = ctx.to_f32(&xv)?;
        let out = ctx.tape.bmm(&xv, &attention, false, true)?;
        let out = ctx.tape.reshape(&out, &[b, c, h, w])?;
        let gamma = ctx.param(self.gamma);
        let out = ctx.tape.mul(&out, &gamma)?;
        let out = ctx.to_activation(&out)?;
        let out = self.bn.forward(ctx, &out)?;
        ctx.tape.add(&out, x)
    }
}

/// The "channel attention" as coded: a per-pixel bottleneck gate (the SE average pool is commented
/// out in the official code), y * sigmoid(fc2(relu(fc1(y)))).
struct PixelSe {
    fc1: Conv2d,
    fc2: Conv2d,
}

impl PixelSe {
    fn new(store: &mut ParamStore, p: &str, c: usize, rng: &mut Rng) -> Result<Self> {
        let one = Conv2dCfg::new(1, 0, 1);
        let hidden = c / SE_REDUCTION;
        Ok(PixelSe {
            fc1: Conv2d::new(store, &join(p, "fc1"), c, hidden, 1, one, true, ConvInit::PytorchDefault, rng)?,
            fc2: Conv2d::new(store, &join(p, "fc2"), hidden, c, 1, one, true, ConvInit::PytorchDefault, rng)?,
        })
    }

    fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let s = self.fc1.forward(ctx, x)?;
        let s = ctx.tape.relu(&s)?;
        let s = self.fc2.forward(ctx, &s)?;
        let s = ctx.tape.sigmoid(&s)?;
        ctx.tape.mul(x, &s)
    }
}

/// `Attention_Module`: PAM, then the pixel-wise SE gate.
struct AttentionModule {
    pam: Pam,
    se: PixelSe,
}

impl AttentionModule {
    fn new(store: &mut ParamStore, p: &str, c: usize, rng: &mut Rng) -> Result<Self> {
        Ok(AttentionModule { pam: Pam::new(store, &join(p, "pam"), c, rng)?, se: PixelSe::new(store, &join(p, "se"), c, rng)? })
    }

    fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let y = self.pam.forward(ctx, x)?;
        self.se.forward(ctx, &y)
    }
}

pub struct PlrOsnet {
    pub config: PlrConfig,
    layer0: Stem,
    layer1: Stage,
    attention1: AttentionModule,
    layer2: Stage,
    attention2: AttentionModule,
    layer30: Stage,
    layer40: ConvBn,
    layer31: Stage,
    layer41: ConvBn,
    fc2: Linear,
    bn1: BatchNorm,
    bn2: BatchNorm,
    classifier1: Linear,
    classifier2: Linear,
}

/// Training outputs: logits of both classifiers and the pre-BN features the triplet and center
/// losses use (v1 [B, parts * C5] from the stripes, v2 [B, C5] from fc2).
pub struct PlrTrainOutput {
    pub logits1: Var,
    pub logits2: Var,
    pub v1: Var,
    pub v2: Var,
}

impl PlrOsnet {
    /// Registers every parameter in `store` (which should be empty: names are global). The
    /// backbone gets OSNet's init; the global branch's conv4/conv5 start as copies of the local
    /// branch's, as the official code deep-copies them.
    pub fn new(store: &mut ParamStore, config: PlrConfig, rng: &mut Rng) -> Result<Self> {
        config.check()?;
        let c = config.channels;
        let layer0 = Stem::new(store, "layer0.0", c[0], rng)?;
        let layer1 = Stage::new(store, "layer1", c[0], c[1], true, rng)?;
        let attention1 = AttentionModule::new(store, "attention_module1", c[1], rng)?;
        let layer2 = Stage::new(store, "layer2", c[1], c[2], true, rng)?;
        let attention2 = AttentionModule::new(store, "attention_module2", c[2], rng)?;
        let mut copy_rng = rng.clone();
        let layer30 = Stage::new(store, "layer30", c[2], c[3], false, rng)?;
        let layer40 = ConvBn::conv1x1(store, "layer40", c[3], c[3], rng)?;
        let layer31 = Stage::new(store, "layer31.0", c[2], c[3], false, &mut copy_rng)?;
        let layer41 = ConvBn::conv1x1(store, "layer41.0", c[3], c[3], &mut copy_rng)?;
        let fc2 = Linear::new(store, "fc2", c[3], c[3], true, 0.01, rng)?;
        let bn1 = BatchNorm::new(store, "bn1", config.local_dim())?;
        let bn2 = BatchNorm::new(store, "bn2", config.global_dim())?;
        let classifier1 = Linear::new(store, "classifier1", config.local_dim(), config.num_classes, true, 0.01, rng)?;
        let classifier2 = Linear::new(store, "classifier2", config.global_dim(), config.num_classes, true, 0.01, rng)?;
        Ok(PlrOsnet {
            config,
            layer0,
            layer1,
            attention1,
            layer2,
            attention2,
            layer30,
            layer40,
            layer31,
            layer41,
            fc2,
            bn1,
            bn2,
            classifier1,
            classifier2,
        })
    }

    /// v1 and v2 (pre-BN, f32). The input height must give a final map whose height `parts`
    /// divides. The backbone runs in the activation dtype; the pooled features go back to f32.
    fn branches(&self, ctx: &mut Ctx, x: &Var) -> Result<(Var, Var)> {
        let x = ctx.to_activation(x)?;
        let y = self.layer0.forward(ctx, &x)?;
        let y = self.layer1.forward(ctx, &y)?;
        let y = self.attention1.forward(ctx, &y)?;
        let y = self.layer2.forward(ctx, &y)?;
        let shared = self.attention2.forward(ctx, &y)?;

        let f1 = self.layer30.forward(ctx, &shared)?;
        let f1 = self.layer40.forward(ctx, &f1)?;
        let v1 = ctx.tape.stripe_avg_pool(&f1, self.config.parts)?;
        let v1 = ctx.to_f32(&v1)?;

        let f2 = self.layer31.forward(ctx, &shared)?;
        let f2 = self.layer41.forward(ctx, &f2)?;
        let g = ctx.tape.global_max_pool(&f2)?;
        let g = ctx.tape.reshape(&g, &[g.shape()[0], g.shape()[1]])?;
        let g = ctx.to_f32(&g)?;
        let v2 = self.fc2.forward(ctx, &g)?;
        Ok((v1, v2))
    }

    /// The training forward (BatchNorm in the mode `ctx.train` says, normally training).
    pub fn forward_train(&self, ctx: &mut Ctx, x: &Var) -> Result<PlrTrainOutput> {
        let (v1, v2) = self.branches(ctx, x)?;
        let b1 = self.bn1.forward(ctx, &v1)?;
        let b2 = self.bn2.forward(ctx, &v2)?;
        let logits1 = self.classifier1.forward(ctx, &b1)?;
        let logits2 = self.classifier2.forward(ctx, &b2)?;
        Ok(PlrTrainOutput { logits1, logits2, v1, v2 })
    }

    /// The test feature concat(L2norm(bn1(v1)), L2norm(bn2(v2))), [B, (parts + 1) * C5] (BatchNorm
    /// in the mode `ctx.train` says, normally eval).
    pub fn forward_eval(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let (v1, v2) = self.branches(ctx, x)?;
        let b1 = self.bn1.forward(ctx, &v1)?;
        let b2 = self.bn2.forward(ctx, &v2)?;
        let n1 = ctx.tape.l2_normalize(&b1)?;
        let n2 = ctx.tape.l2_normalize(&b2)?;
        ctx.tape.concat(&[&n1, &n2], 1)
    }
}
