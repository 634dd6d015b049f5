"""PreAct ResNet-18 as in Rice et al., "Overfitting in adversarially robust deep learning" (their
preactresnet.py): pre-activation blocks, no BN/ReLU after the stem, a final BN + ReLU before the pool.

The pool is adaptive so 28x28 inputs work (on 32x32 it equals the original avg_pool2d(out, 4)).

Initialisation: PyTorch's defaults, as in the source. github.com/locuslab/robust_overfitting preactresnet.py
(commit c47a25c, unchanged since 263b826; PreActResNet.__init__ is lines 66-76) has no init code at all, and
train_cifar.py (lines 208-216) builds PreActResNet18() and trains it as is; SGLS's own copy,
github.com/devicerxx/SGLS models/pre.py (commit 3e96990), is the same file. So convs and the Linear weight
are kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_channels*k*k,
the Linear bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BN weight 1 / bias 0.
"""
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        # The projection shortcut takes the pre-activated input, the identity one the raw input
        # (as the original code). None = identity; decided at build time, not per call.
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = width
        for i, n_blocks in enumerate(blocks_per_stage):
            planes = width * 2 ** i
            strides = [1 if i == 0 else 2] + [1] * (n_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(self.pool(out).flatten(1))


def preact_resnet18(num_classes: int, in_channels: int = 3, width: int = 64) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width)
