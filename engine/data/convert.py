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

from engine.data.datasets import dataset as dataset_record
from engine.data.loaders import open_beton
from engine.data.sources import Split, SyntheticSpec
from engine.errors import DataError
from writers.atomic import atomic_path

PAGE_SIZE = 1 << 21  # ffcv's smallest page (2 MiB): each writer process fills at least one, so small betons stay small

__all__ = ['SyntheticSpec', 'beton_paths', 'convert', 'write_beton']


def beton_paths(dataset: str, out_dir: str, synthetic: SyntheticSpec = SyntheticSpec()) -> tuple[str, str]:
    """(train_path, test_path) that convert() writes for this dataset (synthetic: for this spec)."""
    dataset_record(dataset)
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
    """Write split to path atomically (writers.atomic): a temp file in the same folder, checked, then renamed
    into place. On any error (or interrupt) the temp file is removed and nothing is left at path.
    """
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    if images.ndim != 4 or len(images) != len(split.labels) or len(images) == 0:
        raise DataError(f'{path}: cannot write images {images.shape} with {len(split.labels)} labels.')
    fields = {'image': NDArrayField(np.dtype('uint8'), images.shape[1:]), 'label': IntField(), 'index': IntField()}
    start = time.perf_counter()
    with atomic_path(path) as tmp:
        # Forked workers: a small beton needs only one (each worker costs a process start and a 2 MiB page).
        workers = max(1, min(cpu_count(), len(images) // 20000 + 1))
        writer = DatasetWriter(tmp, fields, page_size=PAGE_SIZE, num_workers=workers)
        writer.from_indexed_dataset(_SplitDataset(Split(images, split.labels)), chunksize=1000)
        h, w, c = images.shape[1:]
        open_beton(tmp, expect_shape=(c, h, w))
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
    record = dataset_record(dataset)
    shape = record.image_shape(synthetic)
    counts = (synthetic.n_train, synthetic.n_test) if dataset == 'synthetic' else (None, None)
    todo = [i for i, (path, n) in enumerate(zip(paths, counts)) if force or not _is_valid_beton(path, shape, n)]
    for i in set(range(2)) - set(todo):
        log(f'{paths[i]} exists and is valid; skipping (force=True rewrites it)')
    if not todo:
        return paths

    os.makedirs(out_dir, exist_ok=True)
    splits = record.read(source, download, out_dir, check_md5, synthetic)
    for i in todo:
        write_beton(paths[i], splits[i], log)
    return paths
