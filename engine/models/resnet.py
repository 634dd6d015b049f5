"""ResNet-18 for small images, as in the official SGLS code (the kuangliu CIFAR ResNet).

3x3 stem (stride 1, no max-pool) so 32x32 inputs keep their resolution; the final pool is adaptive so
28x28 Fashion-MNIST works too (on 32x32 it equals the original avg_pool2d(out, 4)).

Initialisation as github.com/devicerxx/SGLS models/resnet.py lines 73-79 (commit 3e96990, unchanged since
30f9605), at the end of ResNet.__init__: every conv (stem, blocks, 1x1 shortcuts) He-normal with fan-out,
BN weight 1 / bias 0, and the Linear classifier left at PyTorch's default (weight and bias both
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the official loop has no Linear branch); engine.models.init. The modules are
built and registered in the official order, so the random stream is consumed as there: PyTorch's default draws
at construction, then the conv re-draws in modules() order.
"""
import torch.nn as nn
import torch.nn.functional as F

from engine.models.init import he_fan_out_init


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Projection shortcut only where the shape changes; identity otherwise (empty Sequential).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        in_planes = width
        for i, n_blocks in enumerate(blocks_per_stage):
            planes = width * 2 ** i
            strides = [1 if i == 0 else 2] + [1] * (n_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        he_fan_out_init(self)  # SGLS models/resnet.py lines 73-79 (see the module docstring)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


def resnet18(num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)
