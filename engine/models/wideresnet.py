"""WideResNet-34-10 as in TRADES (their models/wideresnet.py), dropout 0.

Deviation from TRADES: its module also builds a `sub_block1` that forward() never uses; it is left out here
(it only adds ~2.3M dead parameters, and unused parameters break DDP and inflate the count). SGLS's copy,
github.com/devicerxx/SGLS models/wideresnet.py (commit 3e96990), leaves it out too, so this is its layout.

Initialisation as github.com/yaodongyu/TRADES models/wideresnet.py lines 74-82 (commit 6e8e11b; the file last
changed in 9ee26f4), the same code as SGLS models/wideresnet.py lines 72-80: convs He-normal with fan-out,
BN weight 1 / bias 0, Linear bias 0 and Linear weight at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in));
engine.models.init. (Rice et al.'s wideresnet.py, lines 67-74, does the same with kaiming_normal_ fan-out.)

The pool is adaptive so 28x28 inputs work (on 32x32 it equals the original avg_pool2d(out, 8)).
"""
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


def wrn34_10(num_classes: int, in_channels: int = 3, widen_factor: int = 10) -> WideResNet:
    return WideResNet(34, num_classes, widen_factor, in_channels)
