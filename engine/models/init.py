"""The initialisation the official SGLS / TRADES models share (their resnet.py and wideresnet.py end __init__ so).

Every Conv2d He-normal with fan-out, N(0, sqrt(2 / (k*k*out_channels))); every BatchNorm2d weight 1, bias 0;
Linear layers keep PyTorch's default, except that the WideResNet zeroes their bias. Applied in modules() order
after construction, as there, so a seed consumes the random stream as the official code does.
"""
import math

import torch.nn as nn


def he_fan_out_init(model: nn.Module, zero_linear_bias: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            m.bias.data.zero_()
