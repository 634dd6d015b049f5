"""Loaders: coverage per epoch, reproducible order and augmentation, exact pixels, equal augmentation
distributions for kind='gpu' and kind='ffcv', batches that stay intact, and the validation split."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from engine.data.convert import convert, write_beton
from engine.data.loaders import make_loaders, split_train_val
from engine.data.sources import Split, SyntheticSpec, make_synthetic
from engine.errors import ConfigError

SPEC = SyntheticSpec(n_train=1100, n_test=250, classes=10, shape=(3, 16, 16), seed=1)
BATCH, EVAL_BATCH, VAL = 100, 64, 100  # 1000 training images: no drop_last remainder; 250 = 3 * 64 + 58
# One ffcv worker: numba then compiles the pipeline without `parallel`, faster on 2 cores. The threaded path runs
# in tests/test_data.py and in bench/loaders.py.
FFCV_WORKERS = 1


def quiet(message):
    """A log that keeps conversion messages out of the test output."""


@pytest.fixture(scope='module')
def betons(tmp_path_factory):
    return convert('synthetic', str(tmp_path_factory.mktemp('betons')), synthetic=SPEC, log=quiet)


@pytest.fixture(scope='module', params=['gpu', 'ffcv'])
def loaders(request, betons):
    """Augmentation on, as in training. One per kind and module: each ffcv Loader costs seconds of JIT."""
    return make_loaders(*betons, kind=request.param, batch_size=BATCH, eval_batch_size=EVAL_BATCH,
                        val_size=VAL, seed=5, num_workers=FFCV_WORKERS)


def epoch_indices(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return torch.cat([indices for _, _, indices in loader])


def test_batches_have_the_promised_form(loaders):
    loaders.train.set_epoch(0)
    images, labels, indices = next(iter(loaders.train))
    assert images.shape == (BATCH, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert labels.dtype == indices.dtype == torch.int64 and labels.shape == indices.shape == (BATCH,)
    assert [len(b[0]) for b in loaders.test] == [64, 64, 64, 58]
    assert (len(loaders.train), len(loaders.val), len(loaders.test)) == (10, 2, 4)
    assert loaders.num_train_total == 1100 and loaders.image_shape == (3, 16, 16)


def test_every_index_once_per_epoch(loaders):
    for epoch in (0, 1):
        train = epoch_indices(loaders.train, epoch)
        assert sorted(train.tolist()) == loaders.train_indices.tolist()
    assert epoch_indices(loaders.val).tolist() == loaders.val_indices.tolist()
    assert epoch_indices(loaders.test).tolist() == list(range(250))


def test_drop_last_drops_only_the_remainder(betons):
    loaders = make_loaders(*betons, kind='gpu', batch_size=64, val_size=VAL)
    train = epoch_indices(loaders.train, 0)
    assert len(loaders.train) == 1000 // 64 and len(train) == len(set(train.tolist())) == 1000 // 64 * 64
    assert set(train.tolist()) <= set(loaders.train_indices.tolist())


def test_order_is_a_function_of_seed_and_epoch(loaders, betons):
    first = epoch_indices(loaders.train, 3)
    assert torch.equal(first, epoch_indices(loaders.train, 3))
    assert not torch.equal(first, epoch_indices(loaders.train, 4))
    with pytest.raises(RuntimeError, match='set_epoch'):  # each pass needs its own set_epoch
        next(iter(loaders.train))


def test_gpu_batches_are_a_function_of_seed_and_epoch(betons):
    def batches(seed, epoch):
        loader = make_loaders(*betons, kind='gpu', batch_size=BATCH, val_size=VAL, seed=seed).train
        loader.set_epoch(epoch)
        return [torch.cat([images.flatten(1), indices[:, None].float()], 1) for images, _, indices in loader]

    same = batches(5, 2)
    assert all(torch.equal(a, b) for a, b in zip(same, batches(5, 2)))
    assert not torch.equal(same[0], batches(6, 2)[0]) and not torch.equal(same[0], batches(5, 3)[0])


def test_ffcv_batches_are_a_function_of_seed_and_epoch(betons):
    """Images (augmentation included), labels and indices: two loaders of one seed agree epoch by epoch, a fresh
    loader asked for epoch 2 directly (a resumed run) gives epoch 2's batches, and another seed differs."""
    def loader(seed, **augment):
        return make_loaders(*betons, kind='ffcv', batch_size=BATCH, val_size=VAL, seed=seed,
                            num_workers=FFCV_WORKERS, **augment).train

    def batches(train, epoch):
        train.set_epoch(epoch)
        return [torch.cat([images.flatten(1), labels[:, None].float(), indices[:, None].float()], 1)
                for images, labels, indices in train]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    first, second = loader(5), loader(5)
    epochs = {e: batches(first, e) for e in (1, 2)}
    assert all(same(epochs[e], batches(second, e)) for e in (1, 2))
    assert same(epochs[2], batches(loader(5), 2))
    assert not same(epochs[1], epochs[2]) and not same(epochs[1], batches(loader(6), 1))
    # Augmentation is applied: the same epoch without crop and flip has the same order but other images.
    plain = batches(loader(5, crop_padding=0, flip=False), 1)
    assert all(torch.equal(x[:, -1], y[:, -1]) for x, y in zip(epochs[1], plain))
    changed = torch.cat([(x[:, :-2] != y[:, :-2]).any(1) for x, y in zip(epochs[1], plain)])
    assert changed.float().mean() > 0.9  # only an unshifted, unflipped crop (p = 1/162) equals its source


def test_pixels_and_labels_equal_the_source(betons):
    """Augmentation off: every train, val and test image equals the regenerated synthetic source, in both kinds."""
    train_source, test_source = make_synthetic(SPEC)
    for kind in ('gpu', 'ffcv'):
        loaders = make_loaders(*betons, kind=kind, batch_size=BATCH, eval_batch_size=EVAL_BATCH, val_size=VAL,
                               crop_padding=0, flip=False, num_workers=FFCV_WORKERS)
        loaders.train.set_epoch(0)
        for loader, source in ((loaders.train, train_source), (loaders.val, train_source), (loaders.test, test_source)):
            for images, labels, indices in loader:
                pixels = np.rint(images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
                np.testing.assert_array_equal(pixels, source.images[indices.numpy()])
                np.testing.assert_array_equal(labels.numpy(), source.labels[indices.numpy()])


def test_a_kept_batch_is_not_changed_by_later_batches(loaders):
    for loader in (loaders.train, loaders.test):
        if loader is loaders.train:
            loader.set_epoch(0)
        batches = iter(loader)
        kept = next(batches)
        copies = [t.clone() for t in kept]
        for _ in batches:  # ffcv would refill its buffers here
            pass
        assert all(torch.equal(t, c) for t, c in zip(kept, copies))


# ------------------------------------------------------------------------------------------- augmentation
H = W = 12
PAD = 4


def gradient_image():
    """(H, W, 3) uint8, every value nonzero and each column distinct: value = 1 + 10 * column + channel."""
    return np.broadcast_to((1 + 10 * np.arange(W)[None, :, None] + np.arange(3)), (H, W, 3)).astype(np.uint8)


def recover_crop(image):
    """(dy, dx, flipped) of a padded-and-cropped (and maybe flipped) gradient_image, from its zero rows/columns."""
    nonzero_rows = np.flatnonzero(image[0].any(1))
    dy = PAD - nonzero_rows[0] if nonzero_rows[0] > 0 else PAD + (H - 1 - nonzero_rows[-1])
    cols = np.flatnonzero(image[0].any(0))
    values = image[0, nonzero_rows[0], cols].astype(int)
    flipped = values[1] < values[0]
    source_col = (values[0] - 1) // 10  # the source column shown at output column cols[0]
    dx = source_col + cols[0] + PAD - W + 1 if flipped else source_col - cols[0] + PAD
    return dy, dx, flipped


def reference_crop(image_hwc, dy, dx, flipped):
    """torchvision's RandomCrop(padding=PAD, fill=0) then RandomHorizontalFlip, as (C, H, W)."""
    padded = np.pad(image_hwc, ((PAD, PAD), (PAD, PAD), (0, 0)))
    crop = padded[dy:dy + H, dx:dx + W].transpose(2, 0, 1)
    return crop[:, :, ::-1] if flipped else crop


def test_both_kinds_crop_and_flip_alike(tmp_path):
    """Each augmented image is exactly a zero-padded crop (maybe flipped) of the source; the offsets are uniform
    on 0..2*PAD, flips have probability 1/2, and the two kinds' distributions agree."""
    source = gradient_image()
    n = 600
    beton = str(tmp_path / 'gradient.beton')
    write_beton(beton, Split(np.repeat(source[None], n, 0), np.zeros(n, np.int64)), log=quiet)
    draws = {}
    for kind in ('gpu', 'ffcv'):
        loaders = make_loaders(beton, beton, kind=kind, batch_size=100, val_size=0, crop_padding=PAD, seed=2,
                               num_workers=FFCV_WORKERS)
        found = []
        for epoch in (0, 1):
            loaders.train.set_epoch(epoch)
            for images, _, _ in loaders.train:
                for image in np.rint(images.numpy() * 255).astype(np.uint8):
                    dy, dx, flipped = recover_crop(image)
                    np.testing.assert_array_equal(image, reference_crop(source, dy, dx, flipped))
                    found.append((dy, dx, flipped))
        draws[kind] = np.array(found)
    bins = 2 * PAD + 1
    for kind, found in draws.items():
        for column, k in ((0, bins), (1, bins), (2, 2)):
            counts = np.bincount(found[:, column], minlength=k)
            assert chisquare(counts).pvalue > 1e-4, (kind, column, counts)
    for column, k in ((0, bins), (1, bins), (2, 2)):
        table = [np.bincount(draws[kind][:, column], minlength=k) for kind in draws]
        assert chi2_contingency(table).pvalue > 1e-4, (column, table)


# ---------------------------------------------------------------------------------------- validation split
def test_validation_split(betons):
    train, val = split_train_val(1100, 100, split_seed=0)
    assert len(val) == 100 and len(train) == 1000 and not set(train) & set(val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(1100))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert not np.array_equal(val, split_train_val(1100, 100, split_seed=1)[1])
    limited, same_val = split_train_val(1100, 100, split_seed=0, train_limit=300)
    assert np.array_equal(limited, train[:300]) and np.array_equal(same_val, val)
    by_seed = [make_loaders(*betons, kind='gpu', val_size=100, seed=seed) for seed in (0, 1)]
    assert all(torch.equal(loaders.val_indices, torch.from_numpy(val)) for loaders in by_seed)
    assert all(torch.equal(loaders.train_indices, torch.from_numpy(train)) for loaders in by_seed)
    assert make_loaders(*betons, kind='gpu', val_size=0).val is None
    with pytest.raises(ConfigError, match='val_size'):
        split_train_val(1100, 1100, split_seed=0)
    with pytest.raises(ConfigError, match='batch'):
        make_loaders(*betons, kind='gpu', val_size=100, train_limit=50, batch_size=64)
