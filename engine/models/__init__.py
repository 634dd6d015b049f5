"""Model zoo: build_model(arch, ...) -> nn.Module taking images in [0, 1] (NCHW, any memory format).

The registry _BUILDERS is the one list of architectures: the config's `model.arch` choices are its names.
Adding an arch is its module and one entry here.
"""
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from engine.errors import ConfigError
from engine.models.mobilenet_v2 import mobilenet_v2
from engine.models.preact_resnet import preact_resnet18
from engine.models.resnet import resnet18
from engine.models.small_cnn import small_cnn
from engine.models.wideresnet import wrn28_10, wrn34_10, wrn70_16

# What `width` means per family and its default (used when width == 0).
_BUILDERS = {
    'resnet18': (resnet18, 64),          # base width of the first stage (stages: w, 2w, 4w, 8w)
    'preact_resnet18': (preact_resnet18, 64),
    # Wide ResNets, named by depth and default widen factor; width = the widen factor k (stages 16k, 32k, 64k),
    # so wrn28_10 with width 4 is WRN-28-4. Another depth (6n+4) is one wide_resnet(depth, k) entry.
    'wrn28_10': (wrn28_10, 10),
    'wrn34_10': (wrn34_10, 10),
    'wrn70_16': (wrn70_16, 16),
    'small_cnn': (small_cnn, 32),        # channels of the first convs (then 2w)
    # width = the stem's channels only (the source's 32); the stages keep their widths. No width multiplier.
    'mobilenet_v2': (mobilenet_v2, 32),
}
ARCHS = tuple(_BUILDERS)


class Normalize(nn.Module):
    """(x - mean) / std per channel. Kept as buffers so they move with .to() and are saved with the model;
    attacks then work in [0, 1] pixel space, where eps is defined."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def default_width(arch: str) -> int:
    """The width `arch` is built with when model.width is 0."""
    return _BUILDERS[arch][1]


def build_model(arch: str, num_classes: int, in_channels: int = 3, width: int = 0, normalize: bool = False,
                mean: Sequence[float] = (), std: Sequence[float] = ()) -> nn.Module:
    """The network for `arch`; with normalize=True an nn.Sequential(normalize=Normalize, net=network)."""
    if arch not in _BUILDERS:
        raise ConfigError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if width < 0:
        raise ConfigError(f'model width must be >= 0 (0 = default), got {width}')
    builder, default_width = _BUILDERS[arch]
    net = builder(num_classes, in_channels, width or default_width)
    if not normalize:
        return net
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f'normalize needs one mean and one std per input channel ({in_channels}); '
                          f'got mean {tuple(mean)} and std {tuple(std)}')
    if any(s <= 0 for s in std):
        raise ConfigError(f'normalize std values must be > 0, got {tuple(std)}')
    # Named children so state_dict keys read 'normalize.mean', 'net.conv1.weight'.
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))
