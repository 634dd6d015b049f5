"""Conversion to .beton: exact round trips (synthetic, fake CIFAR, real Fashion-MNIST) and every bad input."""
import gzip
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from ffcv.fields import IntField, NDArrayField
from ffcv.writer import DatasetWriter

import engine.data.convert as convert_module
from engine.data.convert import beton_paths, convert
from engine.data.loaders import make_loaders, open_beton, read_beton
from engine.data.sources import CIFAR, FASHION_MNIST_DIR, FASHION_MNIST_FILES, SyntheticSpec, make_synthetic
from engine.errors import DataError

SMALL = SyntheticSpec(n_train=300, n_test=100, classes=10, shape=(3, 16, 16), seed=3)


def quiet(message):
    """A log that keeps conversion messages out of the test output."""


def leftovers(folder):
    """Files in folder other than the source data: betons and temp files."""
    return sorted(f for f in os.listdir(folder) if f.endswith('.beton') or f.endswith('.tmp'))


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_round_trip_and_names(tmp_path):
    train_path, test_path = convert('synthetic', str(tmp_path), synthetic=SMALL, log=quiet)
    assert os.path.basename(train_path) == 'synthetic-3x16x16-c10-n300-t100-s3-train.beton'
    assert beton_paths('synthetic', str(tmp_path), SMALL) == (train_path, test_path)
    assert beton_paths('synthetic', 'x', SyntheticSpec(seed=4))[0] != beton_paths('synthetic', 'x', SyntheticSpec())[0]
    assert beton_paths('cifar10', 'd') == (os.path.join('d', 'cifar10-train.beton'), os.path.join('d', 'cifar10-test.beton'))
    for path, split in zip((train_path, test_path), make_synthetic(SMALL)):
        images, labels = read_beton(path, expect_shape=(3, 16, 16))
        assert images.dtype == np.uint8 and images.shape == (len(split.labels), 16, 16, 3)
        np.testing.assert_array_equal(images, split.images)
        np.testing.assert_array_equal(labels, split.labels)
    assert np.bincount(make_synthetic(SMALL)[0].labels).tolist() == [30] * 10


def test_synthetic_is_learnable_and_robustly_separable():
    """Nearest-class-mean already classifies the test set, and most test images keep their class under EVERY
    L-inf perturbation of 8/255 (a certified bound for that linear classifier): adversarial training has signal."""
    train, test = make_synthetic(SyntheticSpec(n_train=2000, n_test=500))
    x_train = train.images.reshape(len(train.labels), -1).astype(np.float64) / 255
    x_test = test.images.reshape(len(test.labels), -1).astype(np.float64) / 255
    means = np.stack([x_train[train.labels == k].mean(0) for k in range(10)])
    scores = 2 * x_test @ means.T - (means ** 2).sum(1)  # -||x - m_k||^2 up to a per-image constant
    assert (scores.argmax(1) == test.labels).mean() > 0.95
    true = scores[np.arange(len(test.labels)), test.labels]
    diff_l1 = np.abs(means[test.labels][:, None, :] - means[None, :, :]).sum(-1)  # ||m_y - m_k||_1
    worst_margin = true[:, None] - scores - 2 * (8 / 255) * diff_l1
    worst_margin[np.arange(len(test.labels)), test.labels] = np.inf
    assert (worst_margin.min(1) > 0).mean() > 0.5


# -------------------------------------------------------------------------------------------------- CIFAR
def make_fake_cifar(folder, dataset, per_file=20):
    """The official python layout with small random batches; returns (tarball, extracted folder, expected data)."""
    layout = CIFAR[dataset]
    extracted = folder / 'src' / layout.folder
    extracted.mkdir(parents=True)
    rng = np.random.default_rng(7)
    expected = {}
    for name in layout.train_files + layout.test_files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, layout.classes, per_file).tolist()
        with open(extracted / name, 'wb') as f:
            pickle.dump({b'batch_label': name.encode(), b'data': data, layout.label_key.encode(): labels,
                         b'filenames': [b'x.png'] * per_file}, f, protocol=2)
        expected[name] = (data, labels)
    tarball = folder / 'src' / layout.tarball
    with tarfile.open(tarball, 'w:gz') as tar:
        tar.add(extracted, arcname=layout.folder)
    return tarball, extracted, expected


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_fake_cifar_tarball_and_folder_round_trip(tmp_path, dataset):
    tarball, extracted, expected = make_fake_cifar(tmp_path, dataset)
    layout = CIFAR[dataset]
    with pytest.raises(DataError, match=str(tarball)):  # the fake differs from the official md5
        convert(dataset, str(tmp_path / 'out'), source=str(tarball), log=quiet)
    assert leftovers(tmp_path / 'out') == []
    for source in (tarball, extracted):
        out = tmp_path / f'out-{source.name}'
        paths = convert(dataset, str(out), source=str(source), check_md5=False, log=quiet)
        for path, names in zip(paths, (layout.train_files, layout.test_files)):
            images, labels = read_beton(path, expect_shape=(3, 32, 32))
            data = np.concatenate([expected[n][0] for n in names])
            assert labels.tolist() == sum((expected[n][1] for n in names), [])
            # Official rows are 1024 R, then 1024 G, then 1024 B values, each plane row-major.
            k, y, x, c = 5, 3, 17, 2
            assert images[k, y, x, c] == data[k, c * 1024 + y * 32 + x]
            np.testing.assert_array_equal(images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_bad_sources(tmp_path):
    with pytest.raises(DataError, match='cifar-10-python.tar.gz'):  # nothing in out_dir, no download
        convert('cifar10', str(tmp_path / 'empty'), log=quiet)
    not_tar = tmp_path / 'cifar-10-python.tar.gz'
    not_tar.write_text('this is not a tarball')
    with pytest.raises(DataError, match=str(not_tar)):
        convert('cifar10', str(tmp_path / 'out'), source=str(not_tar), check_md5=False, log=quiet)
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    for name in CIFAR['cifar10'].train_files + CIFAR['cifar10'].test_files:
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': [1, 2, 3], 'labels': [0]}, f)  # a pickle, but not a CIFAR batch
    with pytest.raises(DataError, match='data_batch_1'):
        convert('cifar10', str(tmp_path / 'out'), source=str(folder), check_md5=False, log=quiet)
    with pytest.raises(DataError, match='md5'):  # folder sources are checked file by file
        convert('cifar10', str(tmp_path / 'out'), source=str(folder), log=quiet)
    assert leftovers(tmp_path / 'out') == []


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def parse_idx(path):
    """Independent reader of a gzipped IDX file (big-endian header: magic with ndim in its low byte, dims)."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype='>u4', count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope='module')
def fashion(tmp_path_factory):
    out = tmp_path_factory.mktemp('fashion')
    paths = convert('fashion-mnist', str(out), log=quiet)
    source = {split: (parse_idx(os.path.join(FASHION_MNIST_DIR, images)),
                      parse_idx(os.path.join(FASHION_MNIST_DIR, labels)))
              for split, (images, labels) in FASHION_MNIST_FILES.items()}
    return paths, source


def test_fashion_mnist_beton_equals_idx_files(fashion):
    (train_path, test_path), source = fashion
    for path, split, n in ((train_path, 'train', 60000), (test_path, 'test', 10000)):
        images, labels = read_beton(path, expect_shape=(1, 28, 28))
        assert images.shape == (n, 28, 28, 1)
        np.testing.assert_array_equal(images[..., 0], source[split][0])
        np.testing.assert_array_equal(labels, source[split][1])


@pytest.mark.parametrize('kind', ['gpu', 'ffcv'])
def test_fashion_mnist_through_loaders(fashion, kind):
    """Random train, val and test images come out of the loaders (augmentation off) exactly as in the IDX files."""
    (train_path, test_path), source = fashion
    loaders = make_loaders(train_path, test_path, kind=kind, batch_size=1000, eval_batch_size=1000,
                           crop_padding=0, flip=False, val_size=1000, num_workers=2)
    assert loaders.image_shape == (1, 28, 28) and loaders.num_train_total == 60000
    rng = np.random.default_rng(0)
    loaders.train.set_epoch(0)
    for loader, split, pool in ((loaders.train, 'train', loaders.train_indices), (loaders.val, 'train',
                                loaders.val_indices), (loaders.test, 'test', torch.arange(10000))):
        wanted = torch.from_numpy(rng.choice(pool.numpy(), 300, replace=False))
        seen = 0
        for images, labels, indices in loader:
            keep = torch.isin(indices, wanted)
            pixels = np.rint(images[keep, 0].numpy() * 255).astype(np.uint8)
            np.testing.assert_array_equal(pixels, source[split][0][indices[keep].numpy()])
            np.testing.assert_array_equal(labels[keep].numpy(), source[split][1][indices[keep].numpy()])
            seen += int(keep.sum())
        assert seen == 300  # sizes are multiples of 1000, so drop_last drops nothing


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def fashion_copy(tmp_path):
    folder = tmp_path / 'fashion-src'
    shutil.copytree(FASHION_MNIST_DIR, folder)
    return folder


def test_fashion_mnist_bad_sources(tmp_path, fashion_copy):
    out = tmp_path / 'out'
    missing = tmp_path / 'no-such-folder'
    with pytest.raises(DataError, match=str(missing)):
        convert('fashion-mnist', str(out), source=str(missing), log=quiet)
    labels = fashion_copy / 't10k-labels-idx1-ubyte.gz'
    os.rename(labels, tmp_path / 'moved.gz')
    with pytest.raises(DataError, match=str(labels)):
        convert('fashion-mnist', str(out), source=str(fashion_copy), log=quiet)
    os.rename(tmp_path / 'moved.gz', labels)
    images = fashion_copy / 'train-images-idx3-ubyte.gz'
    whole = images.read_bytes()
    images.write_bytes(whole[:len(whole) // 2])  # truncated gzip stream
    with pytest.raises(DataError, match=str(images)):
        convert('fashion-mnist', str(out), source=str(fashion_copy), log=quiet)
    images.write_bytes(gzip.compress(b'\x00\x00\x08\x01' + bytes(8)))  # a labels header in the images file
    with pytest.raises(DataError, match=f'{images}.*magic'):
        convert('fashion-mnist', str(out), source=str(fashion_copy), log=quiet)
    assert leftovers(out) == []


def test_unknown_dataset():
    with pytest.raises(DataError, match='imagenet'):
        convert('imagenet', '/tmp', log=quiet)


def test_bad_beton_files(tmp_path):
    train_path, _ = convert('synthetic', str(tmp_path), synthetic=SMALL, log=quiet)
    with pytest.raises(DataError, match=train_path):
        open_beton(train_path, expect_shape=(1, 28, 28))
    missing = str(tmp_path / 'missing.beton')
    with pytest.raises(DataError, match=missing):
        open_beton(missing)
    text = tmp_path / 'text.beton'
    text.write_text('not a beton at all, but long enough to hold a header' * 10)
    with pytest.raises(DataError, match=str(text)):
        open_beton(str(text))
    whole = open(train_path, 'rb').read()
    for cut in (len(whole) - 1, len(whole) - 24, len(whole) // 2, 100, 10):
        truncated = tmp_path / f'cut{cut}.beton'
        truncated.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=str(truncated)):
            open_beton(str(truncated))
    no_index = str(tmp_path / 'no-index.beton')
    writer = DatasetWriter(no_index, {'image': NDArrayField(np.dtype('uint8'), (4, 4, 3)), 'label': IntField()},
                           num_workers=1, page_size=1 << 21)
    writer.from_indexed_dataset([(np.zeros((4, 4, 3), np.uint8), 1)] * 10)
    with pytest.raises(DataError, match=f'{no_index}.*index'):
        open_beton(no_index)


def test_rerun_skips_valid_betons_unless_forced(tmp_path):
    messages = []
    paths = convert('synthetic', str(tmp_path), synthetic=SMALL, log=messages.append)
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    messages.clear()
    assert convert('synthetic', str(tmp_path), synthetic=SMALL, log=messages.append) == paths
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps
    assert len(messages) == 2 and all('skipping' in m for m in messages)
    open(paths[1], 'r+b').truncate(1000)  # a damaged beton is rewritten, the valid one kept
    convert('synthetic', str(tmp_path), synthetic=SMALL, log=messages.append)
    assert os.stat(paths[0]).st_mtime_ns == stamps[0] and open_beton(paths[1]).n == SMALL.n_test
    convert('synthetic', str(tmp_path), synthetic=SMALL, force=True, log=quiet)
    assert all(os.stat(p).st_mtime_ns != s for p, s in zip(paths, stamps))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail_check(path, expect_shape=None):
        assert os.path.exists(path) and path.endswith('.tmp')  # the temp file was written...
        raise DataError(f'{path}: simulated failure')
    monkeypatch.setattr(convert_module, 'open_beton', fail_check)
    with pytest.raises(DataError, match='simulated'):
        convert('synthetic', str(tmp_path), synthetic=SMALL, force=True, log=quiet)
    assert leftovers(tmp_path) == []  # ...and removed, with no beton in its place
