"""The datasets this engine knows, each defined once: classes, image shape, channel statistics, default
augmentation and where its images come from. The config's `data.dataset` choices are this registry's names.

Adding a dataset is one record here (and a reader in engine.data.sources if it is a new format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engine.data.sources import (FASHION_MNIST_COUNTS, FASHION_MNIST_DIR, SyntheticSpec, load_cifar,
                                 load_fashion_mnist, make_synthetic)
from engine.errors import DataError


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: int      # 0: given by the synthetic spec
    shape: tuple      # (C, H, W); () = the synthetic spec's
    mean: tuple       # per-channel statistics for the optional in-model normalization; () = 0.5 per channel
    std: tuple        # () = 0.25 per channel
    augment: str      # data.augment=auto: crop_flip, crop, flip or none
    read: Callable    # (source, download, out_dir, check_md5, synthetic) -> (train Split, test Split)
    counts: tuple     # (train, test) images of the official splits; () = the synthetic spec's
    default_source: str = ''  # where read() looks without a source; '' = out_dir (or the download into it)

    def num_classes(self, synthetic: SyntheticSpec) -> int:
        return self.classes or synthetic.classes

    def image_shape(self, synthetic: SyntheticSpec) -> tuple:
        return self.shape or tuple(synthetic.shape)

    def split_counts(self, synthetic: SyntheticSpec) -> tuple[int, int]:
        return self.counts or (synthetic.n_train, synthetic.n_test)

    def source_name(self, source: str, download: bool, out_dir: str) -> str:
        """Where read() takes the images from, for messages."""
        if self.name == 'synthetic':
            return 'the synthetic generator'
        if source:
            return source
        return f'a download into {out_dir}' if download else (self.default_source or out_dir)

    def statistics(self, channels: int) -> tuple[tuple, tuple]:
        return (self.mean or (0.5,) * channels), (self.std or (0.25,) * channels)


def _cifar(name):
    return lambda source, download, out_dir, check_md5, synthetic: load_cifar(name, source, download, out_dir,
                                                                              check_md5)


DATASETS = {d.name: d for d in (
    # As the official SGLS code: random crop with 4 pixels of padding and horizontal flips.
    Dataset('cifar10', 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 'crop_flip',
            _cifar('cifar10'), (50000, 10000)),
    Dataset('cifar100', 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 'crop_flip',
            _cifar('cifar100'), (50000, 10000)),
    Dataset('fashion-mnist', 10, (1, 28, 28), (0.2860,), (0.3530,), 'none',
            lambda source, download, out_dir, check_md5, synthetic: load_fashion_mnist(source, download, out_dir),
            (FASHION_MNIST_COUNTS['train'], FASHION_MNIST_COUNTS['test']), FASHION_MNIST_DIR),
    Dataset('synthetic', 0, (), (), (), 'crop_flip',
            lambda source, download, out_dir, check_md5, synthetic: make_synthetic(synthetic), ()),
)}


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}: no source or .beton file is known for it. '
                        f'Choose one of {", ".join(DATASETS)}.')
    return DATASETS[name]
