"""A small CNN for CPU demos, after the TRADES MNIST SmallCNN (conv32-conv32-pool-conv64-conv64-pool-
fc200-fc200-fc), with BatchNorm after each conv (faster, steadier training) and an adaptive 4x4 pool
before the classifier so both 28x28 and 32x32 inputs work. Convs are unpadded as in TRADES: on 28x28
the feature map is already 4x4 (the pool is then the identity), on 32x32 it is 5x5.

Initialisation: PyTorch's defaults (conv and Linear weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), Linear bias
likewise, BN 1 / 0). This is our own CPU test model, not a model of the paper, and the golden runs
(tests/golden) are recorded with it, so its init stays as it is. Known difference: TRADES' SmallCNN
(github.com/yaodongyu/TRADES models/small_cnn.py lines 36-45, commit 6e8e11b) uses kaiming_normal_ (fan-in)
convs with zero bias and a zero-initialised last Linear; that init is not followed here.
"""
import torch.nn as nn


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm that follows has its own shift.
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 200):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width)
