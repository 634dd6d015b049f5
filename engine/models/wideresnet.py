"""Wide ResNets of any depth 6n+4 and widen factor k as the TRADES WideResNet (their models/wideresnet.py),
dropout 0: WRN-34-10 (the TRADES / SGLS model), WRN-28-10 and WRN-70-16 (the RSLAD CIFAR-100 teacher's size) as
named configs (wrn28_10, wrn34_10, wrn70_16; engine.models._BUILDERS), any other size one wide_resnet(depth, k)
line. One class for all, so each named config has the same layers, module names and initialisation: wrn34_10
builds exactly what it built before the depth became a parameter (its golden runs and init are unchanged).

Deviation from TRADES: its module also builds a `sub_block1` that forward() never uses; it is left out here
(dead parameters: 2.1M in WRN-34-10, 12.4M in WRN-70-16; unused parameters break DDP and inflate the count).
SGLS's copy, github.com/devicerxx/SGLS models/wideresnet.py (commit 3e96990), leaves it out too, so this is its
layout. TRADES also names the layers otherwise (NetworkBlock's 'block1.layer.0.', convShortcut): engine.teacher
reads a TRADES state dict (the RSLAD CIFAR-10 teacher is one) by renaming its keys and dropping sub_block1's.

Initialisation as github.com/yaodongyu/TRADES models/wideresnet.py lines 74-82 (commit 6e8e11b; the file last
changed in 9ee26f4), the same code as SGLS models/wideresnet.py lines 72-80: convs He-normal with fan-out,
BN weight 1 / bias 0, Linear bias 0 and Linear weight at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in));
engine.models.init. (Rice et al.'s wideresnet.py, lines 67-74, does the same with kaiming_normal_ fan-out.)

The pool is adaptive so 28x28 inputs work (on 32x32 it equals the original avg_pool2d(out, 8)).

WRN-70-16 here is the TRADES layout at that size (ReLU, symmetric padding, no normalisation inside): for a
teacher trained by this engine. It cannot load the WRN-70-16 checkpoints of DeepMind's adversarial_robustness
release that zibojia/RSLAD uses as its CIFAR-100 teacher (RSLAD cifar100_models/wideresnet.py, commit c40e04f):
that network has Swish activations, TF "SAME" padding (F.pad (0, 1, 0, 1) before each stride-2 conv), the input
normalisation inside, and other module names (init_conv, layer, batchnorm, logits).
"""
from collections.abc import Callable

import torch.nn as nn
import torch.nn.functional as F

from engine.models.init import he_fan_out_init


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # TRADES: a 1x1 projection only when the channel count changes (it always does where the stride
        # does); in that case the shortcut takes the pre-activated input.
        self.conv_shortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = self.conv2(out)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(act)
        return shortcut + out


def _stage(n_blocks: int, in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                          stride if i == 0 else 1) for i in range(n_blocks)])


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, num_classes: int = 10, widen_factor: int = 10, in_channels: int = 3):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0, 'WideResNet depth must be 6n+4'
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = _stage(n, channels[0], channels[1], 1)
        self.block2 = _stage(n, channels[1], channels[2], 2)
        self.block3 = _stage(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        he_fan_out_init(self, zero_linear_bias=True)  # TRADES / SGLS models/wideresnet.py (module docstring)

    def forward(self, x):
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        return self.fc(self.pool(out).flatten(1))


def wide_resnet(depth: int, widen: int) -> Callable[..., WideResNet]:
    """The builder of WRN-depth-widen, (num_classes, in_channels=3, widen_factor=widen) -> WideResNet, in the
    form engine.models._BUILDERS takes (model.width = the widen factor, 0 = `widen`)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f'WideResNet depth must be 6n+4 with n >= 1, got {depth}')

    def build(num_classes: int, in_channels: int = 3, widen_factor: int = widen) -> WideResNet:
        return WideResNet(depth, num_classes, widen_factor, in_channels)
    build.__name__ = build.__qualname__ = f'wrn{depth}_{widen}'
    build.__doc__ = f'WRN-{depth}-k, k = widen_factor (default {widen}): {(depth - 4) // 6} blocks per stage.'
    return build


wrn28_10 = wide_resnet(28, 10)   # Zagoruyko & Komodakis' CIFAR WRN-28-10
wrn34_10 = wide_resnet(34, 10)   # TRADES / SGLS; the RSLAD CIFAR-10 teacher
wrn70_16 = wide_resnet(70, 16)   # the size of the RSLAD CIFAR-100 teacher (see the module docstring)
