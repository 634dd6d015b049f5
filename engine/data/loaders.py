"""Checked .beton opening and the train/val/test loaders.

Every loader yields (images, labels, indices): images float32 in [0, 1], NCHW; labels and indices int64;
all on the requested device. indices are positions in the beton (== its index field, checked on open).

What a training batch is a function of, so that a resumed run sees the batches an uninterrupted one would:
kind='gpu': the whole beton is decoded once into a uint8 tensor on the device; shuffling, crop and flip run
there, drawn from a torch.Generator seeded by (seed, epoch): order AND augmentation are a pure function of
(seed, epoch) for a given device type (CPU and CUDA generators give different streams).
kind='ffcv': ffcv's JIT pipeline decodes and orders: the order is a pure function of (seed, epoch) (numpy
default_rng(seed + epoch), any number of workers). Crop and flip are NOT ffcv's RandomTranslate/
RandomHorizontalFlip (they draw from numba's per-thread RNG, which cannot be seeded from here): they run in torch
on the device with crop_and_flip, drawn up front for the whole epoch from a torch.Generator seeded by (seed,
epoch) as for 'gpu': order AND augmentation are a pure function of (seed, epoch) here too, for a given device
type. The two kinds shuffle with different generators, so the same seed gives different batches in each.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from ffcv.fields import NDArrayField
from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

from engine.errors import ConfigError, DataError

FIELDS = ['image', 'label', 'index']  # the layout convert.py writes, in this order
KINDS = ('gpu', 'ffcv')
REMAKE = 'Re-create it: python run.py convert -C <your config> --data.force=true'


@dataclass(frozen=True)
class BetonInfo:
    path: str
    n: int          # number of images
    shape: tuple    # (C, H, W)


def _column(reader: Reader, field: str) -> np.ndarray:
    """Per-sample metadata of a field: the value for IntField, the file offset of the data for NDArrayField."""
    return reader.metadata[f'f{reader.field_names.index(field)}']


def _checked_reader(path: str, expect_shape=None) -> tuple[BetonInfo, Reader]:
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such .beton file. Create it: python run.py convert -C <your config>')
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise DataError(f'{path}: {size} bytes, shorter than a .beton header; truncated or not a beton. {REMAKE}')
    try:
        reader = Reader(path)
    except Exception as e:  # ffcv asserts, index and value errors all mean the header is not a beton's
        raise DataError(f'{path}: not a readable .beton ({e!r}). {REMAKE}') from e
    if reader.field_names != FIELDS:
        raise DataError(f'{path}: has fields {reader.field_names}, expected {FIELDS}; not written by '
                        f'engine.data.convert. {REMAKE}')
    image = reader.handlers['image']
    if not isinstance(image, NDArrayField) or image.dtype != np.uint8 or len(image.shape) != 3:
        raise DataError(f'{path}: field image is {type(image).__name__}, expected a uint8 (H, W, C) NDArrayField. '
                        f'{REMAKE}')
    n = int(reader.num_samples)
    # The allocation table is the file's tail and every image has one entry in it, so any truncation shows as
    # a table that starts past the end, has a partial entry, or has fewer entries than images.
    table_start = int(reader.header['alloc_table_ptr'])
    image_ends = _column(reader, 'image').astype(np.int64) + int(image.element_size)
    if (len(reader.metadata) != n or table_start > size or (size - table_start) % ALLOC_TABLE_TYPE.itemsize
            or len(reader.alloc_table) < n or (n and image_ends.max() > table_start)):
        raise DataError(f'{path}: truncated or damaged ({size} bytes; the header promises {n} images and an '
                        f'allocation table from byte {table_start}). {REMAKE}')
    if not np.array_equal(_column(reader, 'index'), np.arange(n)):
        raise DataError(f'{path}: its index field is not 0..{n - 1} in order. {REMAKE}')
    h, w, c = (int(d) for d in image.shape)  # ffcv stores them as numpy uint64
    info = BetonInfo(path, n, (c, h, w))
    if expect_shape is not None and tuple(expect_shape) != info.shape:
        raise DataError(f'{path}: images are {info.shape} (C, H, W), expected {tuple(expect_shape)}; '
                        f'converted from another dataset? {REMAKE}')
    return info, reader


def open_beton(path: str, expect_shape=None) -> BetonInfo:
    """Check that path is a complete beton with fields image/label/index (and images of expect_shape)."""
    return _checked_reader(path, expect_shape)[0]


def read_beton(path: str, expect_shape=None) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, H, W, C) uint8 and labels (N,) int64 of a beton, in index order, straight from the file."""
    info, reader = _checked_reader(path, expect_shape)
    c, h, w = info.shape
    size = h * w * c
    file = np.memmap(path, dtype=np.uint8, mode='r')
    # Row k of this view is the `size` bytes starting at offset k (a view, no copy): fancy-indexing it with the
    # images' offsets copies each image with one memcpy.
    windows = np.lib.stride_tricks.sliding_window_view(file, size)
    images = windows[_column(reader, 'image').astype(np.int64)].reshape(info.n, h, w, c)
    return images, _column(reader, 'label').astype(np.int64)


def labels_by_index(path: str) -> torch.Tensor:
    """int64 [N]: the label of every image of a beton, by its index (soft-label initialization, label noise)."""
    _, reader = _checked_reader(path)
    return torch.from_numpy(_column(reader, 'label').astype(np.int64))  # index == row, checked on open


def check_labels(path: str, num_classes: int) -> None:
    """DataError unless every label of the beton is in 0..num_classes-1: caught here, a wrong beton names itself,
    instead of failing later in the loss (an IndexError on CPU, a device-side assert on CUDA)."""
    labels = labels_by_index(path).numpy()
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = np.unique(labels[bad])
        shown = ', '.join(str(v) for v in values[:8]) + (', ...' if len(values) > 8 else '')
        raise DataError(f'{path}: {int(bad.sum())} of {len(labels)} images have labels outside 0..{num_classes - 1} '
                        f'(min {labels.min()}, max {labels.max()}; bad values {shown}), but the dataset has '
                        f'{num_classes} classes. Written for another dataset or class count? {REMAKE}')


def split_train_val(n: int, val_size: int, split_seed: int, train_limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted int64 beton indices. Depends on (n, val_size, split_seed) only, never on the training
    seed, so every method and seed is validated on the same images. train_limit > 0 keeps the first train_limit."""
    if not 0 <= val_size < n:
        raise ConfigError(f'val_size={val_size}: must be in 0..{n - 1} (the train beton has {n} images).')
    perm = np.random.default_rng(split_seed).permutation(n)
    train, val = np.sort(perm[val_size:]), np.sort(perm[:val_size])
    return (train[:train_limit] if train_limit > 0 else train), val


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def crop_and_flip(images: torch.Tensor, shifts, flips, padding: int) -> torch.Tensor:
    """Random crop with `padding` zero pixels per side, then horizontal flip, as ONE gather (no per-image loop).

    images (B, C, H, W); shifts (B, 2) crop offsets in 0..2*padding into the padded image, or None (no crop);
    flips (B,) bool, or None. Flipping a crop = reading its columns in reverse, so it folds into the index.
    A gather over flattened images is ~3x faster on CPU than 4-tensor advanced indexing.
    """
    n, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if shifts is not None:
        images = F.pad(images, (padding,) * 4)
        rows, cols = rows + shifts[:, :1], cols + shifts[:, 1:]
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    padded_h, padded_w = images.shape[2:]
    source = (rows[:, :, None] * padded_w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, padded_h * padded_w).gather(2, source).view(n, c, h, w)


class _EpochGate:
    """set_epoch(e) allows one pass. Iterating without it raises, so a trainer cannot silently repeat an order."""
    _epoch = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def _take_epoch(self) -> int:
        if self._epoch is None:
            raise RuntimeError('call train.set_epoch(epoch) before iterating each epoch: order and augmentation '
                               'depend on (seed, epoch) so that a resumed run sees the same batches')
        epoch, self._epoch = self._epoch, None
        return epoch


class _Shards:
    """Data-parallel runs (engine.data_parallel): after shard(rank, world) a train loader yields the rank-th of
    `world` equal slices of each batch, so the ranks' batches i together are the one-process batch i, in order,
    with the same augmentation draws (the epoch's draws are indexed by position in the epoch)."""
    rank, world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        last = self._images_per_epoch() % self.batch_size
        if self.batch_size % world or last % world:
            what = (f'training.batch_size={self.batch_size}' if self.batch_size % world else
                    f'the last partial batch ({last} images, data.drop_last=false)')
            raise ConfigError(f'{what} does not split evenly over {world} ranks (each takes an equal slice of '
                              'every batch); choose a batch size (or data.train_limit, data.drop_last) that does')
        self.rank, self.world = rank, world

    def _part(self, start: int, n: int) -> slice:
        """This rank's epoch positions in the batch of the n images from epoch position `start`."""
        size = n // self.world
        return slice(start + self.rank * size, start + (self.rank + 1) * size)


class GpuTrainLoader(_EpochGate, _Shards):
    """Shuffled, augmented batches of `positions` from images (N, C, H, W) uint8 already on device; the last
    partial batch dropped (drop_last) or kept (the official SGLS / TRADES loaders keep it)."""

    def __init__(self, images, labels, positions, *, batch_size: int, seed: int, crop_padding: int, flip: bool,
                 dtype=torch.float32, drop_last: bool = True):
        self.images, self.labels, self.positions, self.dtype = images, labels, positions, dtype
        self.batch_size, self.seed, self.crop_padding, self.flip = batch_size, seed, crop_padding, flip
        self.drop_last = drop_last

    def __len__(self):
        return (len(self.positions) // self.batch_size if self.drop_last
                else math.ceil(len(self.positions) / self.batch_size))

    def __iter__(self):
        return self._batches(self._take_epoch())

    def _images_per_epoch(self) -> int:
        return images_per_epoch(len(self.positions), self.batch_size, self.drop_last)

    def _batches(self, epoch: int):
        dev, size, pad = self.images.device, self.batch_size, self.crop_padding
        gen = torch.Generator(device=dev)
        gen.manual_seed(_epoch_seed(self.seed, epoch))
        order = self.positions[torch.randperm(len(self.positions), generator=gen, device=dev)]
        used = images_per_epoch(len(self.positions), size, self.drop_last)
        # The whole epoch's draws up front: they depend on (seed, epoch) only, not on how far a pass got.
        shifts = torch.randint(0, 2 * pad + 1, (used, 2), generator=gen, device=dev) if pad else None
        flips = torch.rand(used, generator=gen, device=dev) < 0.5 if self.flip else None
        for start in range(0, used, size):
            part = self._part(start, min(size, used - start))
            batch = order[part]
            images = self.images[batch]
            if shifts is not None or flips is not None:
                images = crop_and_flip(images, None if shifts is None else shifts[part],
                                       None if flips is None else flips[part], pad)
            yield images.to(self.dtype).div_(255), self.labels[batch], batch


class GpuEvalLoader:
    """Sequential batches of `positions`, no augmentation, last batch kept even if partial."""

    def __init__(self, images, labels, positions, *, batch_size: int, dtype=torch.float32):
        self.images, self.labels, self.positions, self.batch_size = images, labels, positions, batch_size
        self.dtype = dtype

    def __len__(self):
        return math.ceil(len(self.positions) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.positions), self.batch_size):
            batch = self.positions[start:start + self.batch_size]
            yield self.images[batch].to(self.dtype).div_(255), self.labels[batch], batch


class FfcvEvalLoader:
    """An ffcv Loader whose batches are converted and copied out of ffcv's buffers."""

    def __init__(self, loader: Loader, dtype=torch.float32):
        self.loader, self.dtype = loader, dtype

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self._batches(iter(self.loader))

    def _batches(self, ffcv_batches):
        # ffcv refills the same buffers a few batches later: every tensor handed out must be a fresh copy
        # (the float conversion copies the images).
        for images, labels, indices in ffcv_batches:
            yield (images.to(self.dtype).div_(255), labels.reshape(-1).to(torch.int64, copy=True),
                   indices.reshape(-1).to(torch.int64, copy=True))


class FfcvTrainLoader(_EpochGate, _Shards, FfcvEvalLoader):
    """ffcv's shuffled drop_last batches (unaugmented uint8), cropped and flipped in torch as GpuTrainLoader does."""

    def __init__(self, loader: Loader, *, batch_size: int, seed: int, crop_padding: int, flip: bool,
                 device: torch.device, dtype=torch.float32, drop_last: bool = True):
        super().__init__(loader, dtype)
        self.batch_size, self.seed, self.crop_padding, self.flip = batch_size, seed, crop_padding, flip
        self.device, self.drop_last = torch.device(device), drop_last

    def __iter__(self):
        epoch = self._take_epoch()
        self.loader.next_epoch = epoch  # ffcv orders epoch e by default_rng(seed + e)
        return self._batches(self._augmented(iter(self.loader), epoch))

    def _images_per_epoch(self) -> int:
        return images_per_epoch(len(self.loader.indices), self.batch_size, self.drop_last)

    def _augmented(self, ffcv_batches, epoch: int):
        dev, size, pad = self.device, self.batch_size, self.crop_padding
        used = images_per_epoch(len(self.loader.indices), size, self.drop_last)
        gen = torch.Generator(device=dev)
        gen.manual_seed(_epoch_seed(self.seed, epoch))
        # The whole epoch's draws up front: the k-th image of the epoch gets draw k, however far a pass got.
        shifts = torch.randint(0, 2 * pad + 1, (used, 2), generator=gen, device=dev) if pad else None
        flips = torch.rand(used, generator=gen, device=dev) < 0.5 if self.flip else None
        for k, (images, labels, indices) in enumerate(ffcv_batches):
            part = self._part(k * size, len(images))  # every batch is full but a kept last one
            mine = slice(part.start - k * size, part.stop - k * size)  # ffcv decodes the whole batch on every rank
            images, labels, indices = images[mine], labels[mine], indices[mine]
            if shifts is not None or flips is not None:
                images = crop_and_flip(images, None if shifts is None else shifts[part],
                                       None if flips is None else flips[part], pad)
            yield images, labels, indices


def images_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n - n % batch_size if drop_last else n


def _ffcv_loader(info: BetonInfo, indices, *, train: bool, batch_size: int, seed: int, device: torch.device,
                 num_workers: int, drop_last: bool = True) -> Loader:
    # No augmentation in ffcv's pipeline (see the module docstring): FfcvTrainLoader crops and flips.
    image = [NDArrayDecoder(), ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=False)]
    pipelines = {'image': image, 'label': [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)],
                 'index': [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]}
    return Loader(info.path, batch_size=batch_size, num_workers=num_workers, seed=seed, indices=indices,
                  order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, drop_last=train and drop_last, pipelines=pipelines)


@dataclass
class Loaders:
    train: object            # GpuTrainLoader | FfcvTrainLoader: call train.set_epoch(e) before each pass
    val: object              # GpuEvalLoader | FfcvEvalLoader | None (val_size == 0)
    test: object
    num_train_total: int     # images in the train beton: the size of a per-image (soft-label) table
    image_shape: tuple       # (C, H, W)
    train_indices: torch.Tensor  # int64, CPU, sorted beton indices trained on
    val_indices: torch.Tensor    # int64, CPU, sorted beton indices held out


def _on_device(path: str, shape: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_beton(path, shape)
    # Moved as stored (HWC) and made NCHW on the device, where the permute is cheap.
    images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels).to(device)


def make_loaders(train_path: str, test_path: str, *, kind: str = 'gpu', batch_size: int = 128,
                 eval_batch_size: int = 512, device='cpu', seed: int = 0, val_size: int = 1000, split_seed: int = 0,
                 train_limit: int = 0, crop_padding: int = 4, flip: bool = True, num_workers: int = 2,
                 dtype=torch.float32, num_classes: int | None = None, drop_last: bool = True) -> Loaders:
    """Train (shuffled, augmented; the last partial batch dropped unless drop_last=False), val (held out of the
    train beton) and test loaders.
    num_classes: if given, every label of both betons must be in 0..num_classes-1 (else a DataError)."""
    if kind not in KINDS:
        raise ConfigError(f'loader kind {kind!r}: choose one of {", ".join(KINDS)}.')
    if batch_size < 1 or eval_batch_size < 1 or crop_padding < 0:
        raise ConfigError(f'batch_size={batch_size}, eval_batch_size={eval_batch_size}, crop_padding={crop_padding}: '
                          'batch sizes must be >= 1 and crop_padding >= 0.')
    train_info = open_beton(train_path)
    test_info = open_beton(test_path, expect_shape=train_info.shape)
    if num_classes is not None:
        for path in (train_path, test_path):
            check_labels(path, num_classes)
    train_idx, val_idx = split_train_val(train_info.n, val_size, split_seed, train_limit)
    if len(train_idx) < batch_size:
        raise ConfigError(f'{len(train_idx)} training images (after val_size={val_size}, train_limit={train_limit}) '
                          f'do not fill one batch of batch_size={batch_size}.')
    device = torch.device(device)
    if kind == 'gpu':
        train_images, train_labels = _on_device(train_path, train_info.shape, device)
        test_images, test_labels = _on_device(test_path, train_info.shape, device)
        train = GpuTrainLoader(train_images, train_labels, torch.from_numpy(train_idx).to(device),
                               batch_size=batch_size, seed=seed, crop_padding=crop_padding, flip=flip, dtype=dtype,
                               drop_last=drop_last)
        val = GpuEvalLoader(train_images, train_labels, torch.from_numpy(val_idx).to(device),
                            batch_size=eval_batch_size, dtype=dtype) if val_size else None
        test = GpuEvalLoader(test_images, test_labels, torch.arange(test_info.n, device=device),
                             batch_size=eval_batch_size, dtype=dtype)
    else:
        common = dict(seed=seed, device=device, num_workers=num_workers)
        train = FfcvTrainLoader(_ffcv_loader(train_info, train_idx, train=True, batch_size=batch_size,
                                             drop_last=drop_last, **common),
                                batch_size=batch_size, seed=seed, crop_padding=crop_padding, flip=flip,
                                device=device, dtype=dtype, drop_last=drop_last)
        val = FfcvEvalLoader(_ffcv_loader(train_info, val_idx, train=False, batch_size=eval_batch_size,
                                          **common), dtype) if val_size else None
        test = FfcvEvalLoader(_ffcv_loader(test_info, None, train=False, batch_size=eval_batch_size, **common),
                              dtype)
    return Loaders(train, val, test, train_info.n, train_info.shape,
                   torch.from_numpy(train_idx), torch.from_numpy(val_idx))
