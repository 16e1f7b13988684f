"""PyTorch reference of OSNet, PLR-OSNet and the PLR training loss.

Written from the project specification (shared/spec/plr-osnet.md, sections 1-3 and 7), not from the
official code. Module names reproduce the official state-dict keys exactly (torchreid `osnet_x1_0`:
567 entries; PLR-OSNet: 786 entries at 751 classes), so checkpoints load with strict=True.

`width` scales the channel list [64, 256, 384, 512]; width 1.0 is the official model. The OSNet `fc`
feature size defaults to the last channel count (512 at width 1.0, as torchreid builds it).

Used by tools/make_fixtures.py (golden fixtures for the Rust engine) and by speed comparisons.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

BASE_CHANNELS = (64, 256, 384, 512)


def scaled_channels(width):
    # torchreid's x0.25/x0.5/x0.75 lists are exactly these products; reductions (mid/16, C/8, C/16)
    # use floor division as in the official modules.
    return [int(round(c * width)) for c in BASE_CHANNELS]


# ---------------------------------------------------------------------------------------------
# OSNet building blocks (spec 1.1, 1.2)


class ConvLayer(nn.Module):
    """Conv k x k (no bias) -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Conv1x1(nn.Module):
    """1x1 conv (no bias) -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Conv1x1Linear(nn.Module):
    """1x1 conv (no bias) -> BN, no activation."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class LightConv3x3(nn.Module):
    """1x1 conv (no BN/ReLU) -> depthwise 3x3 -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """Unified aggregation gate: GAP -> 1x1 (bias) -> ReLU -> 1x1 (bias) -> sigmoid -> scale input."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=True)
        self.gate_activation = nn.Sigmoid()

    def forward(self, x):
        g = self.global_avgpool(x)
        g = self.gate_activation(self.fc2(self.relu(self.fc1(g))))
        return x * g


class OSBlock(nn.Module):
    """Omni-scale block: 4 Lite-3x3 streams of depth 1..4 sharing one gate (spec 1.2)."""

    def __init__(self, in_channels, out_channels, bottleneck_reduction=4):
        super().__init__()
        mid = out_channels // bottleneck_reduction
        self.conv1 = Conv1x1(in_channels, mid)
        self.conv2a = LightConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(2)])
        self.conv2c = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(3)])
        self.conv2d = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(4)])
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1Linear(mid, out_channels)
        self.downsample = Conv1x1Linear(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x):
        identity = x
        x1 = self.conv1(x)
        x2 = self.gate(self.conv2a(x1)) + self.gate(self.conv2b(x1)) + self.gate(self.conv2c(x1)) + self.gate(self.conv2d(x1))
        x3 = self.conv3(x2)
        if self.downsample is not None:
            identity = self.downsample(identity)
        return F.relu(x3 + identity)


def _make_stage(in_channels, out_channels, num_blocks, reduce_spatial):
    layers = [OSBlock(in_channels, out_channels)]
    layers += [OSBlock(out_channels, out_channels) for _ in range(1, num_blocks)]
    if reduce_spatial:
        layers.append(nn.Sequential(Conv1x1(out_channels, out_channels), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)


class OSNet(nn.Module):
    """torchreid OSNet (channels [64,256,384,512] x width, blocks [2,2,2]).

    Eval returns the `fc` feature (after BN + ReLU); train returns logits.
    """

    def __init__(self, num_classes=1000, width=1.0, feature_dim=None, blocks=(2, 2, 2)):
        super().__init__()
        c = scaled_channels(width)
        self.channels = c
        feature_dim = c[3] if feature_dim is None else feature_dim
        self.feature_dim = feature_dim
        self.conv1 = ConvLayer(3, c[0], 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _make_stage(c[0], c[1], blocks[0], reduce_spatial=True)
        self.conv3 = _make_stage(c[1], c[2], blocks[1], reduce_spatial=True)
        self.conv4 = _make_stage(c[2], c[3], blocks[2], reduce_spatial=False)
        self.conv5 = Conv1x1(c[3], c[3])
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c[3], feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(feature_dim, num_classes)
        self._init_params()

    def _init_params(self):
        # torchreid's OSNet init (spec 1.3).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def featuremaps(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv3(self.conv2(x))
        return self.conv5(self.conv4(x))

    def forward(self, x):
        v = self.global_avgpool(self.featuremaps(x)).flatten(1)
        v = self.fc(v)
        if not self.training:
            return v
        return self.classifier(v)


# ---------------------------------------------------------------------------------------------
# PLR-OSNet attention (spec 2.3)


class PAM_Module(nn.Module):
    """Position attention without value projection; y = BN(gamma * X A^T) + X."""

    def __init__(self, channels):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm2d(channels)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = h * w
        q = self.query_conv(x).view(b, -1, n).permute(0, 2, 1)  # B x N x C/8
        k = self.key_conv(x).view(b, -1, n)  # B x C/8 x N
        attention = self.softmax(torch.bmm(q, k))  # B x N x N, rows = queries
        out = torch.bmm(x.view(b, c, n), attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.bn(self.gamma * out) + x


class SEModule(nn.Module):
    """Pixel-wise gate: the official code comments out the average pool."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(x))))


class Attention_Module(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pam = PAM_Module(channels)
        self.se = SEModule(channels)

    def forward(self, x):
        return self.se(self.pam(x))


# ---------------------------------------------------------------------------------------------
# PLR-OSNet (spec 2.1, 2.2)


class PLR_OSNet(nn.Module):
    """Train: (logits1, logits2, v1, v2) with v1/v2 pre-BN. Eval: cat(L2(bn1(v1)), L2(bn2(v2)))."""

    def __init__(self, num_classes, width=1.0, parts=4, osnet=None):
        super().__init__()
        if osnet is None:
            osnet = OSNet(num_classes=1000, width=width)
        c = osnet.channels
        self.parts = parts
        self.layer0 = nn.Sequential(osnet.conv1, osnet.maxpool)
        self.layer1 = osnet.conv2
        self.attention_module1 = Attention_Module(c[1])
        self.layer2 = osnet.conv3
        self.attention_module2 = Attention_Module(c[2])
        self.layer30 = osnet.conv4
        self.layer31 = nn.Sequential(copy.deepcopy(osnet.conv4))
        self.layer40 = osnet.conv5
        self.layer41 = nn.Sequential(copy.deepcopy(osnet.conv5))
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.global_maxpool = nn.AdaptiveMaxPool2d(1)
        self.fc2 = nn.Linear(c[3], c[3])
        self.bn1 = nn.BatchNorm1d(parts * c[3])
        self.bn2 = nn.BatchNorm1d(c[3])
        self.classifier1 = nn.Linear(parts * c[3], num_classes)
        self.classifier2 = nn.Linear(c[3], num_classes)
        for lin in (self.fc2, self.classifier1, self.classifier2):
            nn.init.normal_(lin.weight, 0, 0.01)
            nn.init.constant_(lin.bias, 0)

    def shared(self, x):
        x = self.layer0(x)
        x = self.attention_module1(self.layer1(x))
        return self.attention_module2(self.layer2(x))

    def forward(self, x):
        x = self.shared(x)
        f1 = self.layer40(self.layer30(x))
        f2 = self.layer41(self.layer31(x))
        h = f1.shape[2]
        stripes = [
            self.global_avgpool(f1[:, :, p * h // self.parts : (p + 1) * h // self.parts, :]).flatten(1) for p in range(self.parts)
        ]
        v1 = torch.cat(stripes, dim=1)
        v2 = self.fc2(self.global_maxpool(f2).flatten(1))
        if not self.training:
            return torch.cat([F.normalize(self.bn1(v1), p=2, dim=1), F.normalize(self.bn2(v2), p=2, dim=1)], dim=1)
        logits1 = self.classifier1(self.bn1(v1))
        logits2 = self.classifier2(self.bn2(v2))
        return logits1, logits2, v1, v2


# ---------------------------------------------------------------------------------------------
# Losses (spec 3)


def cross_entropy_label_smooth(logits, labels, epsilon=0.1):
    """mean_b( -sum_k q_k log softmax(z)_k ), q = (1-eps) onehot + eps/K."""
    num_classes = logits.shape[1]
    log_probs = F.log_softmax(logits, dim=1)
    targets = torch.zeros_like(log_probs).scatter_(1, labels.unsqueeze(1), 1)
    targets = (1 - epsilon) * targets + epsilon / num_classes
    return (-targets * log_probs).mean(0).sum()


def pairwise_distance(x):
    sq = x.pow(2).sum(dim=1, keepdim=True)
    d2 = sq + sq.t() - 2 * x @ x.t()
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet_soft_margin(features, labels):
    """Batch-hard soft-margin triplet: mean softplus(d_ap - d_an); positives include the anchor."""
    dist = pairwise_distance(features)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    d_ap = torch.stack([dist[i][same[i]].max() for i in range(len(labels))])
    d_an = torch.stack([dist[i][~same[i]].min() for i in range(len(labels))])
    # SoftMarginLoss(d_an - d_ap, target 1) = mean log(1 + exp(-(d_an - d_ap))).
    return F.soft_margin_loss(d_an - d_ap, torch.ones_like(d_an))


def center_loss(features, labels, centers):
    """Frozen-center loss: mean over samples with a center of clamp(||x - c_y||^2, 1e-12, 1e12)."""
    num_classes = centers.shape[0]
    distmat = features.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1).unsqueeze(0) - 2 * features @ centers.t()
    mask = labels.unsqueeze(1) == torch.arange(num_classes, device=labels.device).unsqueeze(0)
    # Samples whose label has no center (label >= num_classes) give an empty row and drop out.
    values = torch.cat([distmat[i][mask[i]].clamp(min=1e-12, max=1e12) for i in range(len(labels))])
    return values.mean()


def plr_loss(outputs, labels, centers1, centers2):
    """Total PLR training loss and its parts (spec 3)."""
    logits1, logits2, v1, v2 = outputs
    parts = {
        "ce1": cross_entropy_label_smooth(logits1, labels),
        "ce2": cross_entropy_label_smooth(logits2, labels),
        "tri1": batch_hard_triplet_soft_margin(v1, labels),
        "tri2": batch_hard_triplet_soft_margin(v2, labels),
        "cen1": center_loss(v1, labels, centers1),
        "cen2": center_loss(v2, labels, centers2),
    }
    total = (
        0.5 * (parts["ce1"] + parts["ce2"])
        + 0.5 * (parts["tri1"] + parts["tri2"])
        + 5e-4 * 0.5 * (parts["cen1"] + parts["cen2"])
    )
    return total, parts
