"""Dataset sources -> .beton files with fields image (raw uint8 HWC), label, index.

Layout of a beton written here:
  image  NDArrayField uint8 (H, W, C): the exact source pixels (no JPEG); Fashion-MNIST keeps its 1 channel.
  label  IntField
  index  IntField: the image's position in its source split, 0..N-1 (equal to its row in the beton), so a
         per-image table (soft labels) can be indexed by it.

File names: <out_dir>/<dataset>-{train,test}.beton; synthetic data carries its spec in the name,
<out_dir>/synthetic-<C>x<H>x<W>-c<classes>-n<n_train>-t<n_test>-s<seed>-{train,test}.beton,
so betons of different specs never collide.
"""
from __future__ import annotations

import os
import time
from multiprocessing import cpu_count

import numpy as np
from ffcv.fields import IntField, NDArrayField
from ffcv.writer import DatasetWriter

from engine.data.loaders import open_beton
from engine.data.sources import CIFAR, Split, SyntheticSpec, load_cifar, load_fashion_mnist, make_synthetic
from engine.errors import DataError

DATASETS = ('cifar10', 'cifar100', 'fashion-mnist', 'synthetic')
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'fashion-mnist': 10}
SOURCE_SHAPES = {'cifar10': (3, 32, 32), 'cifar100': (3, 32, 32), 'fashion-mnist': (1, 28, 28)}  # (C, H, W)
PAGE_SIZE = 1 << 21  # ffcv's smallest page (2 MiB): each writer process fills at least one, so small betons stay small

__all__ = ['DATASETS', 'NUM_CLASSES', 'SyntheticSpec', 'beton_paths', 'convert', 'write_beton']


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f'unknown dataset {dataset!r}: no source or .beton file is known for it. '
                        f'Choose one of {", ".join(DATASETS)}.')


def beton_paths(dataset: str, out_dir: str, synthetic: SyntheticSpec = SyntheticSpec()) -> tuple[str, str]:
    """(train_path, test_path) that convert() writes for this dataset (synthetic: for this spec)."""
    _check_dataset(dataset)
    stem = dataset
    if dataset == 'synthetic':
        c, h, w = synthetic.shape
        stem = (f'synthetic-{c}x{h}x{w}-c{synthetic.classes}-n{synthetic.n_train}-t{synthetic.n_test}'
                f'-s{synthetic.seed}')
    return tuple(os.path.join(out_dir, f'{stem}-{split}.beton') for split in ('train', 'test'))


class _SplitDataset:
    """Indexable view that ffcv's writer reads: (image HWC uint8, label, index)."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        return self.split.images[i], int(self.split.labels[i]), i


def write_beton(path: str, split: Split, log=print) -> None:
    """Write split to path atomically: a temp file in the same folder, checked, then renamed into place.

    On any error (or interrupt) the temp file is removed and nothing is left at path.
    """
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    if images.ndim != 4 or len(images) != len(split.labels) or len(images) == 0:
        raise DataError(f'{path}: cannot write images {images.shape} with {len(split.labels)} labels.')
    fields = {'image': NDArrayField(np.dtype('uint8'), images.shape[1:]), 'label': IntField(), 'index': IntField()}
    tmp = os.path.join(os.path.dirname(path) or '.', f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    start = time.perf_counter()
    try:
        # Forked workers: a small beton needs only one (each worker costs a process start and a 2 MiB page).
        workers = max(1, min(cpu_count(), len(images) // 20000 + 1))
        writer = DatasetWriter(tmp, fields, page_size=PAGE_SIZE, num_workers=workers)
        writer.from_indexed_dataset(_SplitDataset(Split(images, split.labels)), chunksize=1000)
        h, w, c = images.shape[1:]
        open_beton(tmp, expect_shape=(c, h, w))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log(f'wrote {path}: {len(images)} images {images.shape[1:]} HWC in {time.perf_counter() - start:.1f}s')


def _is_valid_beton(path: str, shape: tuple, n: int | None) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        info = open_beton(path, expect_shape=shape)
    except DataError:
        return False
    return n is None or info.n == n


def convert(dataset: str, out_dir: str, *, source: str = '', download: bool = False, force: bool = False,
            synthetic: SyntheticSpec = SyntheticSpec(), check_md5: bool = True, log=print) -> tuple[str, str]:
    """Write <dataset>-train.beton and -test.beton into out_dir and return their paths.

    source: cifar10/cifar100: the official python tarball, its extracted folder, or a folder holding either
    (default: out_dir); fashion-mnist: the folder with the four IDX .gz files (default: the Debian package's).
    download: fetch with torchvision into out_dir when no source is given. A beton that already exists and opens
    as a valid beton of the right image shape (synthetic: and size) is kept unless force. check_md5=False skips
    the CIFAR checksums (only for tests with small fake tarballs).
    """
    paths = beton_paths(dataset, out_dir, synthetic)
    if dataset == 'synthetic':
        shape, counts = tuple(synthetic.shape), (synthetic.n_train, synthetic.n_test)
    else:
        shape, counts = SOURCE_SHAPES[dataset], (None, None)
    todo = [i for i, (path, n) in enumerate(zip(paths, counts)) if force or not _is_valid_beton(path, shape, n)]
    for i in set(range(2)) - set(todo):
        log(f'{paths[i]} exists and is valid; skipping (force=True rewrites it)')
    if not todo:
        return paths

    os.makedirs(out_dir, exist_ok=True)
    if dataset in CIFAR:
        splits = load_cifar(dataset, source, download, out_dir, check_md5)
    elif dataset == 'fashion-mnist':
        splits = load_fashion_mnist(source, download, out_dir)
    else:
        splits = make_synthetic(synthetic)
    for i in todo:
        write_beton(paths[i], splits[i], log)
    return paths
