"""Raw dataset sources -> uint8 arrays (N, H, W, C) plus int64 labels, validated before any .beton is written.

Every problem a user can fix (missing file, wrong checksum, truncated or foreign file) raises DataError naming
the file and saying how to get the data. Nothing here writes a .beton; convert.py does.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from engine.errors import DataError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {  # split -> (images, labels), the names of the official gzipped IDX files
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_COUNTS = {'train': 60000, 'test': 10000}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # big-endian int32 at the start of each IDX file


@dataclass(frozen=True)
class CifarLayout:
    tarball: str
    folder: str          # the folder the tarball extracts to
    train_files: tuple
    test_files: tuple
    label_key: str
    classes: int
    tarball_md5: str


CIFAR = {
    'cifar10': CifarLayout('cifar-10-python.tar.gz', 'cifar-10-batches-py',
                           tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',), 'labels', 10,
                           'c58f30108f718f92721af3b95e74349a'),
    'cifar100': CifarLayout('cifar-100-python.tar.gz', 'cifar-100-python', ('train',), ('test',),
                            'fine_labels', 100, 'eb9058c3a382ffc7106e4002c42a8d85'),
}


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class SyntheticSpec:
    """A deterministic, learnable stand-in dataset: each class is a smooth colour-and-stripes pattern."""
    n_train: int = 5000
    n_test: int = 1000
    classes: int = 10
    shape: tuple = (3, 32, 32)  # (C, H, W)
    seed: int = 0


def md5_of(path: str) -> str:
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- CIFAR
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; allow only what a numpy array needs, so a foreign pickle cannot run code.
    (_codecs.encode is how Python 3 writes bytes at protocol 2, as in re-packed or test copies.)"""
    ALLOWED = {('numpy._core.multiarray', '_reconstruct'), ('numpy._core.multiarray', 'scalar'),
               ('numpy._core.numeric', '_frombuffer'), ('numpy', 'ndarray'), ('numpy', 'dtype'),
               ('_codecs', 'encode')}

    def find_class(self, module, name):
        module = module.replace('numpy.core.', 'numpy._core.')  # pickles from numpy<2 name the old module
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name} in a CIFAR batch')
        return super().find_class(module, name)


def _parse_cifar_batch(raw: bytes, label_key: str, classes: int, where: str) -> Split:
    fix = 'Re-download the official python version (cifar-*-python.tar.gz) or pass download=True.'
    try:
        entry = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding='latin1').load()
        entry = {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data, labels = np.asarray(entry['data']), np.asarray(entry[label_key], dtype=np.int64)
    except Exception as e:  # pickle, key and type errors all mean "not an official CIFAR batch"
        raise DataError(f'{where}: not a CIFAR python batch with "data" and "{label_key}" ({e!r}). {fix}') from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f'{where}: expected uint8 data [N, 3072] and N labels, got data {data.dtype} '
                        f'{data.shape} and {len(labels)} labels. {fix}')
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f'{where}: labels outside 0..{classes - 1}. {fix}')
    # Rows are channel-major (R plane, G plane, B plane), as torchvision reads them.
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def _read_cifar_tarball(path: str, layout: CifarLayout, check_md5: bool) -> tuple[Split, Split]:
    if check_md5:
        got = md5_of(path)
        if got != layout.tarball_md5:
            raise DataError(f'{path}: md5 {got} differs from the official {layout.tarball_md5} (incomplete or '
                            f'altered download). Delete it and download {layout.tarball} again, or pass download=True.')
    try:
        with tarfile.open(path, 'r:gz') as tar:
            def batch(name):
                member = f'{layout.folder}/{name}'
                try:
                    raw = tar.extractfile(member).read()
                except KeyError:
                    raise DataError(f'{path}: has no {member}; not the official {layout.tarball}.') from None
                return _parse_cifar_batch(raw, layout.label_key, layout.classes, f'{path}:{member}')
            return tuple(_concat([batch(n) for n in names]) for names in (layout.train_files, layout.test_files))
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f'{path}: not a readable .tar.gz ({e}). Download {layout.tarball} again.') from e


def _read_cifar_folder(folder: str, layout: CifarLayout, check_md5: bool) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10, CIFAR100  # the per-file md5s of the extracted batches
    tv = CIFAR10 if layout.classes == 10 else CIFAR100
    official_md5 = dict(tv.train_list + tv.test_list)
    splits = []
    for names in (layout.train_files, layout.test_files):
        parts = []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise DataError(f'{path}: missing. The folder must hold the extracted {layout.tarball} '
                                f'({", ".join(layout.train_files + layout.test_files)}).')
            if check_md5 and md5_of(path) != official_md5[name]:
                raise DataError(f'{path}: md5 differs from the official {official_md5[name]}. '
                                f'Extract {layout.tarball} again or pass download=True.')
            with open(path, 'rb') as f:
                parts.append(_parse_cifar_batch(f.read(), layout.label_key, layout.classes, path))
        splits.append(_concat(parts))
    return tuple(splits)


def load_cifar(dataset: str, source: str, download: bool, out_dir: str, check_md5: bool) -> tuple[Split, Split]:
    """(train, test) from a tarball, its extracted folder, a folder holding either, or a torchvision download."""
    layout = CIFAR[dataset]
    if not source and download:
        from torchvision.datasets import CIFAR10, CIFAR100
        try:
            (CIFAR10 if layout.classes == 10 else CIFAR100)(root=out_dir, train=True, download=True)
        except Exception as e:  # network or checksum failure inside torchvision
            raise DataError(f'{os.path.join(out_dir, layout.tarball)}: download failed ({e}). Download it by hand '
                            f'and pass its path as source.') from e
    search = source or out_dir
    candidates = [search, os.path.join(search, layout.folder), os.path.join(search, layout.tarball)]
    for path in candidates:
        if os.path.isfile(path):
            return _read_cifar_tarball(path, layout, check_md5)
        if os.path.isfile(os.path.join(path, layout.train_files[0])):
            return _read_cifar_folder(path, layout, check_md5)
    raise DataError(f'{search}: no {dataset} source there (looked for {layout.tarball} and the extracted folder '
                    f'{layout.folder}/). Pass source=<path to either> or download=True.')


def _concat(parts: list[Split]) -> Split:
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


# --------------------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: str, magic: int, dims: tuple) -> np.ndarray:
    how = (f'Get the four Fashion-MNIST IDX .gz files (Debian package dataset-fashion-mnist puts them in '
           f'{FASHION_MNIST_DIR}) or pass download=True.')
    if not os.path.isfile(path):
        raise DataError(f'{path}: missing. {how}')
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or not gzip at all
        raise DataError(f'{path}: not a complete gzip file ({e}). {how}') from e
    header_len = 4 * (1 + len(dims))
    if len(raw) < header_len or int.from_bytes(raw[:4], 'big') != magic:
        raise DataError(f'{path}: not an IDX file with magic number {magic}. {how}')
    shape = tuple(int.from_bytes(raw[4 * i:4 * i + 4], 'big') for i in range(1, 1 + len(dims)))
    if any(want is not None and got != want for got, want in zip(shape, dims)):
        raise DataError(f'{path}: IDX shape {shape}, expected {dims} (None = any). {how}')
    if len(raw) != header_len + int(np.prod(shape)):
        raise DataError(f'{path}: holds {len(raw) - header_len} data bytes, the header says {int(np.prod(shape))}. '
                        f'{how}')
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def load_fashion_mnist(source: str, download: bool, out_dir: str) -> tuple[Split, Split]:
    """(train, test) from a folder with the four IDX .gz files (default the Debian one), or a torchvision download.

    No md5 check: Debian re-compresses the files, so their checksums differ from upstream's; the IDX headers,
    sizes and counts are checked instead.
    """
    if not source and download:
        from torchvision.datasets import FashionMNIST
        try:
            source = FashionMNIST(root=out_dir, train=True, download=True).raw_folder
        except Exception as e:
            raise DataError(f'{out_dir}: Fashion-MNIST download failed ({e}). Install the Debian package '
                            f'dataset-fashion-mnist and use source={FASHION_MNIST_DIR}.') from e
    folder = source or FASHION_MNIST_DIR
    if not os.path.isdir(folder):
        raise DataError(f'{folder}: no such folder. Pass source=<folder with the four Fashion-MNIST IDX .gz files> '
                        f'(apt install dataset-fashion-mnist puts them in {FASHION_MNIST_DIR}) or download=True.')
    splits = []
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        n = FASHION_MNIST_COUNTS[split]
        images = _read_idx(os.path.join(folder, image_file), IDX_IMAGES_MAGIC, (n, 28, 28))
        labels = _read_idx(os.path.join(folder, label_file), IDX_LABELS_MAGIC, (n,)).astype(np.int64)
        if labels.max() > 9:
            raise DataError(f'{os.path.join(folder, label_file)}: labels outside 0..9; not Fashion-MNIST.')
        splits.append(Split(images[..., None].copy(), labels))
    return tuple(splits)


# ------------------------------------------------------------------------------------------- synthetic
def _class_patterns(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """(classes, H, W, C) float32 offsets from mid-grey: a colour per class plus low-frequency stripes.

    Colours are up to +-70 grey levels and stripes +-50, so two classes differ by far more than an 8/255
    perturbation; stripes span a few cycles per image, so a 4-pixel crop shift keeps the class recognisable.
    """
    c, h, w = spec.shape
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing='ij')
    colour = rng.uniform(-70, 70, size=(spec.classes, c))
    angle = rng.uniform(0, np.pi, size=spec.classes)
    cycles = rng.uniform(0.75, 2.5, size=spec.classes)
    phase = rng.uniform(0, 2 * np.pi, size=spec.classes)
    along = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    stripes = 50 * np.sin(2 * np.pi * cycles[:, None, None] * along + phase[:, None, None])
    return (colour[:, None, None, :] + stripes[..., None]).astype(np.float32)


def make_synthetic(spec: SyntheticSpec) -> tuple[Split, Split]:
    """(train, test), a pure function of spec. Per image: its class pattern + one brightness shift + pixel noise."""
    if spec.classes < 2 or spec.n_train < 1 or spec.n_test < 1 or len(spec.shape) != 3 or min(spec.shape) < 1:
        raise DataError(f'synthetic spec {spec}: needs classes >= 2, n_train, n_test >= 1 and shape (C, H, W).')
    pattern_seq, train_seq, test_seq = np.random.SeedSequence(spec.seed).spawn(3)
    patterns = _class_patterns(spec, np.random.default_rng(pattern_seq))
    splits = []
    for n, seq in ((spec.n_train, train_seq), (spec.n_test, test_seq)):
        rng = np.random.default_rng(seq)
        labels = rng.permutation(np.arange(n) % spec.classes).astype(np.int64)  # balanced, shuffled
        images = np.empty((n,) + patterns.shape[1:], dtype=np.uint8)
        for start in range(0, n, 2048):  # chunks bound the float32 working memory
            chunk = labels[start:start + 2048]
            noise = rng.normal(0, 16, size=(len(chunk),) + patterns.shape[1:]).astype(np.float32)
            brightness = rng.normal(0, 8, size=(len(chunk), 1, 1, 1)).astype(np.float32)
            images[start:start + len(chunk)] = np.clip(128 + patterns[chunk] + brightness + noise, 0, 255)
        splits.append(Split(images, labels))
    return tuple(splits)
