//! OSNet (torchreid's `osnet_x1_0` and its narrower widths), built from the blocks PLR-OSNet
//! reuses. Every block takes the state-dict prefix it lives under, so the same code builds
//! `conv2.0.conv1.conv.weight` in OSNet and `layer1.0.conv1.conv.weight` in PLR-OSNet.

use crate::error::{Error, Result};
use crate::nn::{join, BatchNorm, Conv2d, ConvInit, Ctx, Linear};
use crate::ops::conv::Conv2dCfg;
use crate::ops::pool::Pool2dCfg;
use crate::params::ParamStore;
use crate::rng::Rng;
use crate::tape::Var;

/// OSBlock bottleneck: mid channels = out channels / 4.
const BOTTLENECK_REDUCTION: usize = 4;
/// ChannelGate hidden channels = mid channels / 16.
const GATE_REDUCTION: usize = 16;

/// Channels of conv1 and of the conv2, conv3, conv4 stages at torchreid's widths.
pub fn channels_for_width(width: f32) -> Result<[usize; 4]> {
    const WIDTHS: [(f32, [usize; 4]); 4] =
        [(1.0, [64, 256, 384, 512]), (0.75, [48, 192, 288, 384]), (0.5, [32, 128, 192, 256]), (0.25, [16, 64, 96, 128])];
    WIDTHS
        .iter()
        .find(|(w, _)| *w == width)
        .map(|(_, c)| *c)
        .ok_or_else(|| Error::msg(format!("OSNet width {width} is not one of 1.0, 0.75, 0.5, 0.25")))
}

/// Checks that every block built from `channels` has at least one channel everywhere.
pub fn check_channels(channels: [usize; 4]) -> Result<()> {
    let ok = channels[0] > 0 && channels[1..].iter().all(|&c| c / BOTTLENECK_REDUCTION / GATE_REDUCTION >= 1);
    if !ok {
        return Err(Error::msg(format!(
            "OSNet channels {channels:?}: the stage widths must be at least {} (mid channels / {GATE_REDUCTION} >= 1)",
            BOTTLENECK_REDUCTION * GATE_REDUCTION
        )));
    }
    Ok(())
}

fn kaiming(store: &mut ParamStore, name: &str, cin: usize, cout: usize, k: usize, cfg: Conv2dCfg, rng: &mut Rng) -> Result<Conv2d> {
    Conv2d::new(store, name, cin, cout, k, cfg, false, ConvInit::KaimingNormalFanOut, rng)
}

/// Conv (no bias) -> BN -> optional ReLU, parameters `p.conv.weight` and `p.bn.*`: torchreid's
/// ConvLayer and Conv1x1 (with ReLU) and Conv1x1Linear (without).
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    relu: bool,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        p: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        relu: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        let conv = kaiming(store, &join(p, "conv"), cin, cout, k, Conv2dCfg::new(stride, k / 2, 1), rng)?;
        Ok(ConvBn { conv, bn: BatchNorm::new(store, &join(p, "bn"), cout)?, relu })
    }

    /// 1x1, stride 1, with ReLU.
    pub fn conv1x1(store: &mut ParamStore, p: &str, cin: usize, cout: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(store, p, cin, cout, 1, 1, true, rng)
    }

    /// 1x1, stride 1, no ReLU.
    pub fn conv1x1_linear(store: &mut ParamStore, p: &str, cin: usize, cout: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(store, p, cin, cout, 1, 1, false, rng)
    }

    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let y = self.conv.forward(ctx, x)?;
        if self.relu {
            self.bn.forward_relu(ctx, &y)
        } else {
            self.bn.forward(ctx, &y)
        }
    }
}

/// Lite 3x3: 1x1 conv (no BN/ReLU) -> depthwise 3x3 -> BN -> ReLU.
struct LightConv3x3 {
    conv1: Conv2d,
    conv2: Conv2d,
    bn: BatchNorm,
}

impl LightConv3x3 {
    fn new(store: &mut ParamStore, p: &str, cin: usize, cout: usize, rng: &mut Rng) -> Result<Self> {
        Ok(LightConv3x3 {
            conv1: kaiming(store, &join(p, "conv1"), cin, cout, 1, Conv2dCfg::new(1, 0, 1), rng)?,
            conv2: kaiming(store, &join(p, "conv2"), cout, cout, 3, Conv2dCfg::new(1, 1, cout), rng)?,
            bn: BatchNorm::new(store, &join(p, "bn"), cout)?,
        })
    }

    fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let y = self.conv1.forward(ctx, x)?;
        let y = self.conv2.forward(ctx, &y)?;
        self.bn.forward_relu(ctx, &y)
    }
}

/// The unified aggregation gate: GAP -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid,
/// multiplying its input channel-wise. One gate serves all four streams of a block.
struct ChannelGate {
    fc1: Conv2d,
    fc2: Conv2d,
}

/// A gate's parameters fetched once per block forward and applied to each stream.
struct GateVars {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl ChannelGate {
    fn new(store: &mut ParamStore, p: &str, c: usize, rng: &mut Rng) -> Result<Self> {
        let hidden = c / GATE_REDUCTION;
        let one = Conv2dCfg::new(1, 0, 1);
        Ok(ChannelGate {
            fc1: Conv2d::new(store, &join(p, "fc1"), c, hidden, 1, one, true, ConvInit::KaimingNormalFanOut, rng)?,
            fc2: Conv2d::new(store, &join(p, "fc2"), hidden, c, 1, one, true, ConvInit::KaimingNormalFanOut, rng)?,
        })
    }

    /// Fetched (and under bf16 cast) once per block, not once per stream.
    fn vars(&self, ctx: &mut Ctx) -> Result<GateVars> {
        let bias = |ctx: &mut Ctx, conv: &Conv2d| ctx.param(conv.bias.expect("gate convs have a bias"));
        Ok(GateVars {
            w1: ctx.conv_weight(self.fc1.weight)?,
            b1: bias(ctx, &self.fc1),
            w2: ctx.conv_weight(self.fc2.weight)?,
            b2: bias(ctx, &self.fc2),
        })
    }

    fn apply(&self, ctx: &mut Ctx, g: &GateVars, x: &Var) -> Result<Var> {
        let s = ctx.tape.global_avg_pool(x)?;
        let s = ctx.tape.conv2d(&s, &g.w1, Some(&g.b1), self.fc1.cfg)?;
        let s = ctx.tape.relu(&s)?;
        let s = ctx.tape.conv2d(&s, &g.w2, Some(&g.b2), self.fc2.cfg)?;
        let s = ctx.tape.sigmoid(&s)?;
        ctx.tape.mul(x, &s)
    }
}

/// Omni-scale block: 1x1 reduction, four Lite-3x3 streams of depth 1-4 gated by one shared
/// ChannelGate and summed, 1x1 expansion, residual (projected when the width changes), ReLU.
pub struct OsBlock {
    conv1: ConvBn,
    streams: [Vec<LightConv3x3>; 4],
    gate: ChannelGate,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
}

impl OsBlock {
    pub fn new(store: &mut ParamStore, p: &str, cin: usize, cout: usize, rng: &mut Rng) -> Result<Self> {
        let mid = cout / BOTTLENECK_REDUCTION;
        let conv1 = ConvBn::conv1x1(store, &join(p, "conv1"), cin, mid, rng)?;
        // conv2a is a single module; conv2b..conv2d are Sequentials with numbered children.
        let conv2a = vec![LightConv3x3::new(store, &join(p, "conv2a"), mid, mid, rng)?];
        let mut stream = |name: &str, depth: usize| -> Result<Vec<LightConv3x3>> {
            (0..depth).map(|j| LightConv3x3::new(store, &format!("{p}.{name}.{j}"), mid, mid, rng)).collect()
        };
        let streams = [conv2a, stream("conv2b", 2)?, stream("conv2c", 3)?, stream("conv2d", 4)?];
        let gate = ChannelGate::new(store, &join(p, "gate"), mid, rng)?;
        let conv3 = ConvBn::conv1x1_linear(store, &join(p, "conv3"), mid, cout, rng)?;
        let downsample = if cin != cout { Some(ConvBn::conv1x1_linear(store, &join(p, "downsample"), cin, cout, rng)?) } else { None };
        Ok(OsBlock { conv1, streams, gate, conv3, downsample })
    }

    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let x1 = self.conv1.forward(ctx, x)?;
        let gate = self.gate.vars(ctx)?;
        let mut x2: Option<Var> = None;
        for stream in &self.streams {
            let mut y = x1.clone();
            for layer in stream {
                y = layer.forward(ctx, &y)?;
            }
            let y = self.gate.apply(ctx, &gate, &y)?;
            x2 = Some(match x2 {
                Some(acc) => ctx.tape.add(&acc, &y)?,
                None => y,
            });
        }
        let x3 = self.conv3.forward(ctx, &x2.expect("four streams"))?;
        let shortcut = match &self.downsample {
            Some(d) => d.forward(ctx, x)?,
            None => x.clone(),
        };
        let y = ctx.tape.add(&x3, &shortcut)?;
        ctx.tape.relu(&y)
    }
}

/// A stage: OSBlock(cin -> cout), OSBlock(cout -> cout), and for conv2/conv3 a transition
/// (`p.2.0` Conv1x1 + `p.2.1` AvgPool 2x2/2).
pub struct Stage {
    blocks: Vec<OsBlock>,
    transition: Option<ConvBn>,
}

impl Stage {
    pub fn new(store: &mut ParamStore, p: &str, cin: usize, cout: usize, transition: bool, rng: &mut Rng) -> Result<Self> {
        let blocks = vec![OsBlock::new(store, &join(p, "0"), cin, cout, rng)?, OsBlock::new(store, &join(p, "1"), cout, cout, rng)?];
        let transition = if transition { Some(ConvBn::conv1x1(store, &join(p, "2.0"), cout, cout, rng)?) } else { None };
        Ok(Stage { blocks, transition })
    }

    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let mut y = x.clone();
        for b in &self.blocks {
            y = b.forward(ctx, &y)?;
        }
        if let Some(t) = &self.transition {
            y = t.forward(ctx, &y)?;
            y = ctx.tape.avg_pool2d(&y, Pool2dCfg::new(2, 2, 0))?;
        }
        Ok(y)
    }
}

/// conv1: 7x7/2 conv -> BN -> ReLU (state-dict prefix `p`), then MaxPool 3x3/2 pad 1.
pub struct Stem {
    conv: ConvBn,
}

impl Stem {
    pub fn new(store: &mut ParamStore, p: &str, cout: usize, rng: &mut Rng) -> Result<Self> {
        Ok(Stem { conv: ConvBn::new(store, p, 3, cout, 7, 2, true, rng)? })
    }

    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let y = self.conv.forward(ctx, x)?;
        ctx.tape.max_pool2d(&y, Pool2dCfg::new(3, 2, 1))
    }
}

/// OSNet's shape: stage widths and classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsnetConfig {
    pub channels: [usize; 4],
    pub num_classes: usize,
}

/// OSNet as torchreid builds it (the ImageNet checkpoint's layout): conv1, maxpool, conv2-4
/// stages, conv5, global average pool, fc (Linear + BN1d + ReLU), classifier.
pub struct Osnet {
    pub config: OsnetConfig,
    conv1: Stem,
    stages: [Stage; 3],
    conv5: ConvBn,
    fc: Linear,
    fc_bn: BatchNorm,
    classifier: Linear,
}

/// Outputs of an OSNet forward: the fc feature (what eval mode returns) and the logits.
pub struct OsnetOutput {
    pub feature: Var,
    pub logits: Var,
}

impl Osnet {
    /// Registers every parameter in `store` (which should be empty: names are global) with
    /// OSNet's default init.
    pub fn new(store: &mut ParamStore, config: OsnetConfig, rng: &mut Rng) -> Result<Self> {
        check_channels(config.channels)?;
        let c = config.channels;
        let conv1 = Stem::new(store, "conv1", c[0], rng)?;
        let stages = [
            Stage::new(store, "conv2", c[0], c[1], true, rng)?,
            Stage::new(store, "conv3", c[1], c[2], true, rng)?,
            Stage::new(store, "conv4", c[2], c[3], false, rng)?,
        ];
        let conv5 = ConvBn::conv1x1(store, "conv5", c[3], c[3], rng)?;
        let fc = Linear::new(store, "fc.0", c[3], c[3], true, 0.01, rng)?;
        let fc_bn = BatchNorm::new(store, "fc.1", c[3])?;
        let classifier = Linear::new(store, "classifier", c[3], config.num_classes, true, 0.01, rng)?;
        Ok(Osnet { config, conv1, stages, conv5, fc, fc_bn, classifier })
    }

    /// The final feature map [B, C5, H/16, W/16], in the activation dtype.
    pub fn feature_map(&self, ctx: &mut Ctx, x: &Var) -> Result<Var> {
        let x = ctx.to_activation(x)?;
        let mut y = self.conv1.forward(ctx, &x)?;
        for s in &self.stages {
            y = s.forward(ctx, &y)?;
        }
        self.conv5.forward(ctx, &y)
    }

    pub fn forward(&self, ctx: &mut Ctx, x: &Var) -> Result<OsnetOutput> {
        let f = self.feature_map(ctx, x)?;
        let v = ctx.tape.global_avg_pool(&f)?;
        let v = ctx.tape.reshape(&v, &[v.shape()[0], v.shape()[1]])?;
        let v = ctx.to_f32(&v)?;
        let v = self.fc.forward(ctx, &v)?;
        let v = self.fc_bn.forward(ctx, &v)?;
        let feature = ctx.tape.relu(&v)?;
        let logits = self.classifier.forward(ctx, &feature)?;
        Ok(OsnetOutput { feature, logits })
    }
}
