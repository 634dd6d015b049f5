"""MobileNetV2 for 32x32 inputs, the student of RSLAD (Zi et al., ICCV 2021).

The network is github.com/zibojia/RSLAD cifar10_models/mobilenet_v2.py (commit c40e04f, the file unchanged
since 9c40f52; cifar100_models/mobilenet_v2.py is the same file with num_classes=100), itself the kuangliu
pytorch-cifar MobileNetV2: a 3x3 stride-1 stem of 32 channels (ImageNet's is stride 2) and the first two stages
at stride 1, so a 32x32 input reaches the last stage at 4x4; cfg (expansion, out_planes, blocks, stride) =
(1,16,1,1), (6,24,2,1), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1); then a 1x1 conv to 1280
channels, BN, ReLU, the pool, Linear. Each block is expand 1x1 -> depthwise 3x3 (the block's stride) -> project
1x1, each conv followed by BN (ReLU after the first two; no ReLU after the projection, as in MobileNetV2). As in
the source, a stride-1 block always adds a shortcut: the identity when the channel count stays, else a 1x1 conv
+ BN (kuangliu's choice; the paper's network adds none there); stride-2 blocks add none. 2,296,922 parameters
for 10 classes, 2,412,212 for 100 (the source's figures, counted from its file).

Deviations, neither changing what a 32x32 RGB model computes: the pool is adaptive (on 32x32 it equals the
source's avg_pool2d(out, 4); 28x28 inputs give 4x4 there too), and the stem takes `in_channels`.
`width` (model.width) is the stem's channel count, 32 by default as in the source; it only changes the stem and
the first block's input (the stages keep the source's widths). MobileNetV2's width multiplier is not offered: the
RSLAD rows use the network as it is.

Initialisation: PyTorch's defaults, as in the source, which has no init code and whose training scripts
(mobilenet_v2_rslad_cifar10.py) build mobilenet_v2() and train it as is.
"""
import torch.nn as nn
import torch.nn.functional as F

# (expansion, out_planes, num_blocks, stride), RSLAD cifar10_models/mobilenet_v2.py MobileNetV2.cfg
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class Block(nn.Module):
    """Inverted residual: expand (1x1), depthwise (3x3, stride), project (1x1); module names as the source's."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # Empty Sequential = identity, as the source (so state_dict keys match its checkpoints).
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, in_planes = [], stem
        for expansion, out_planes, num_blocks, stride in CFG:
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(Block(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(self.pool(out).flatten(1))


def mobilenet_v2(num_classes: int, in_channels: int = 3, width: int = 32) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width)
