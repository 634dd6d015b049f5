"""bench/train_step.py --tiny: every row is there and sane, the Markdown lists it, and the FLOP model that MFU rests
on agrees with independent numbers: a hand count of small_cnn's layers, FLOP counted over one real engine step,
and the published ResNet-18 forward. Shape, sanity and FLOP only, never speed: the timings of a 3-step smoke run on
a shared CPU mean nothing."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import train_step
from engine.methods import make_method
from engine.models import build_model
from engine.soft_labels import SoftLabels
from engine.step import make_sgd, train_step as engine_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['reference'] + [c[0] for c in train_step.CONFIGS]
NOT_ON_CPU = {'+bf16', '+cuda_graphs'}
TINY = train_step.PROFILES['tiny']
BATCH, PGD_STEPS = int(TINY['batches']), TINY['pgd_steps']

# small_cnn as the tiny profile builds it (width 8, 3 x 16 x 16 images), counted by hand from
# engine/models/small_cnn.py: unpadded 3x3 convs without bias, 2x2 max-pools, a 4x4 adaptive average pool, then
# Linear(16*4*4, 200), Linear(200, 200), Linear(200, 10). 2 FLOP per multiply-add: a conv is
# 2 * Cin * Cout * k * k * Hout * Wout, a linear 2 * in * out (biases, BatchNorm, ReLU and pooling not counted).
CONV1 = 2 * 3 * 8 * 3 * 3 * 14 * 14         # 3 -> 8 channels, 16x16 -> 14x14
SMALL_CNN_CONVS = (CONV1,
                   2 * 8 * 8 * 3 * 3 * 12 * 12,    # 8 -> 8, 14x14 -> 12x12; max-pool -> 6x6
                   2 * 8 * 16 * 3 * 3 * 4 * 4,     # 8 -> 16, 6x6 -> 4x4
                   2 * 16 * 16 * 3 * 3 * 2 * 2)    # 16 -> 16, 4x4 -> 2x2; max-pool -> 1x1, adaptive pool -> 4x4
SMALL_CNN_LINEARS = (2 * 16 * 4 * 4 * 200, 2 * 200 * 200, 2 * 200 * 10)
SMALL_CNN_FORWARD = sum(SMALL_CNN_CONVS) + sum(SMALL_CNN_LINEARS)  # 492,256 FLOP per image


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bench')
    out, md = tmp / 'results.json', tmp / 'results.md'
    done = subprocess.run([sys.executable, 'bench/train_step.py', '--tiny', '--out', str(out), '--md', str(md),
                           '--data-dir', str(tmp / 'data')], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text(), done.stdout


class _TotalsOnly:
    """Stands in for FlopCounterMode's per-module attribution (its ModuleTracker), which hooks the inputs of every
    module and so makes torch.autograd.grad on a leaf input, PGD's x_adv, fail with "A leaf node was passed to
    _will_engine_execute_node but we are currently running autograd.grad()" (pytorch/pytorch#131753, torch 2.4 to
    at least 2.14). The totals never use it: every count is filed under 'Global'."""
    parents = {'Global'}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def engine_step_flop(method_name):
    """FLOP counted by FlopCounterMode, per aten op, over one real eager engine.step.train_step on the tiny
    profile's model and batch (SGLS with its soft labels active), as {op name: FLOP of the whole batch}."""
    torch.manual_seed(0)
    model = build_model(TINY['archs'], train_step.CLASSES, width=TINY['width'])
    optimizer = make_sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, TINY['image_size'], TINY['image_size'], generator=g)
    y = torch.randint(0, train_step.CLASSES, (BATCH,), generator=g)
    method = make_method('sgls', sgls_start_epoch=1) if method_name == 'sgls' else make_method(method_name)
    assert method.soft_labels is (method_name == 'sgls')
    assert not method.soft_labels or method.phase(1)  # SGLS: soft labels on at epoch 1, its costlier phase
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalsOnly()
    with counter:
        engine_train_step(model, optimizer, (x, y, torch.arange(BATCH)), method=method, epoch=1,
                          attack=dict(eps=train_step.EPS, step_size=train_step.STEP_SIZE, steps=PGD_STEPS,
                                      bn_mode='eval'),
                          soft_labels=SoftLabels(y, train_step.CLASSES) if method.soft_labels else None)
    return {str(op).removeprefix('aten.'): n for op, n in counter.get_flop_counts()['Global'].items()}


@pytest.fixture(scope='module')
def measured():
    return {m: engine_step_flop(m) for m in ('at', 'sgls')}


def test_forward_flop_matches_a_hand_count_of_small_cnn():
    assert (TINY['archs'], TINY['width'], TINY['image_size']) == ('small_cnn', 8, 16)  # the hand-counted model
    assert train_step.forward_flop('small_cnn', 8, 16) == SMALL_CNN_FORWARD == 492_256


def test_flop_model_matches_a_real_engine_step(measured):
    """The bench's model_flop_per_image against FLOP counted over one real engine step (torch's per-op formulas,
    on the ops the step actually runs). Found (torch 2.14, K = 2, batch 32, per image; F = 492,256):
        AT   measured 3,853,376 = 7F (the formula, 3,445,792) + F - conv1 (84,672)
        SGLS measured 4,345,632 = 8F (the formula, 3,938,048) + F - conv1
    The two differences, both deliberate or negligible:
    - + F: the engine's no-grad, eval-mode clean-accuracy forward, which the formula leaves out on purpose (the
      reference loop has none; every row of a method is credited with the same useful work);
    - - conv1: the update's backward computes no input gradient for the first conv (the images do not require
      grad), which the formula's 'full backward ~2F' includes: 2.2% of this tiny AT step, 3.5 MFLOP of 25.5 GFLOP
      (0.014%) for ResNet-18 PGD-10.
    The attack's input-only backward (torch.autograd.grad w.r.t. x_adv) costs F, as the formula says: autograd
    asks convolution_backward for the input gradient only, and FlopCounterMode counts only the gradients asked for,
    so no weight gradient is counted there (checked per op below)."""
    conv, linear = sum(SMALL_CNN_CONVS), sum(SMALL_CNN_LINEARS)
    for method, extra_forwards in (('at', 0), ('sgls', 1)):  # SGLS: one more (clean, no-grad) forward
        ops = measured[method]
        total = sum(ops.values())
        formula = train_step.model_flop_per_image(SMALL_CNN_FORWARD, method, PGD_STEPS) * BATCH
        # stated tolerance: with the left-out clean forward added, the formula is within 2.5% of the count ...
        assert abs(formula + BATCH * SMALL_CNN_FORWARD - total) <= 0.025 * total, (method, formula, total)
        # ... and exact once the first conv's skipped input gradient is taken off too.
        assert total == formula + BATCH * (SMALL_CNN_FORWARD - CONV1), (method, formula, total)
        # Where it goes. Forwards: clean accuracy, K attack steps, the update (+ SGLS's clean forward).
        forwards = 1 + PGD_STEPS + 1 + extra_forwards
        assert ops['convolution'] == BATCH * forwards * conv and ops['addmm'] == BATCH * forwards * linear
        # Conv backward: input gradients only in each attack step (K x conv); weight gradients (conv) plus input
        # gradients but the first conv's (conv - CONV1) in the update. Had the attack's backward been counted
        # with weight gradients, this would be (2K + 2) x conv - CONV1.
        assert ops['convolution_backward'] == BATCH * ((PGD_STEPS + 2) * conv - CONV1), ops
        # Linear backward (mm): the input gradient in each attack step, input and weight gradients in the update.
        assert ops['mm'] == BATCH * (PGD_STEPS + 2) * linear, ops
        assert set(ops) == {'convolution', 'convolution_backward', 'addmm', 'mm'}, ops


def test_every_row_is_there(tiny_run):
    results, _, _ = tiny_run
    args = results['meta']['args']
    assert (args['device'], args['archs'], args['batches'], args['methods']) == ('cpu', ['small_cnn'], [32],
                                                                                  ['at', 'sgls'])
    keys = [(r['arch'], r['batch'], r['method'], r['config']) for r in results['rows']]
    assert keys == list(itertools.product(['small_cnn'], [32], ['at', 'sgls'], CONFIGS))


def test_measured_rows_are_sane(tiny_run, measured):
    results, _, _ = tiny_run
    args = results['meta']['args']
    assert (args['width'], args['image_size'], args['pgd_steps']) == (8, 16, PGD_STEPS)
    assert results['meta']['forward_flop'] == {'small_cnn': SMALL_CNN_FORWARD}  # the hand count
    for r in results['rows']:
        # GFLOP/image against the FLOP counted over a real engine step of the same model, batch and method, less
        # the clean-accuracy forward the model leaves out, plus the first conv's input gradient autograd skips
        # (see test_flop_model_matches_a_real_engine_step).
        counted = sum(measured[r['method']].values()) / BATCH
        assert r['gflop_per_image'] * 1e9 == pytest.approx(counted - SMALL_CNN_FORWARD + CONV1, rel=1e-9), r
        if r['config'] in NOT_ON_CPU:
            assert r['status'] == 'n/a' and r['note'] and r['images_per_s'] is None, r
            continue
        assert r['status'] == 'ok', r
        assert math.isfinite(r['images_per_s']) and r['images_per_s'] > 0, r
        assert r['warmup_s'] >= 0 and r['peak_mem_mib'] > 0 and math.isfinite(r['loss'])
        assert 0 < r['loss'] < 2 * math.log(10), r  # cross entropy of a barely trained 10-class model: ~log 10
        assert r['precision'] == 'fp32'  # CPU rows stay fp32 (train_step.BF16_CPU_NOTE)
        assert r['mfu'] is None  # no peak for a CPU
        # Consistency of the derived columns (definitions, not evidence).
        assert r['ms_per_step'] == pytest.approx(1000 * r['batch'] / r['images_per_s'])
        assert r['tflops'] == pytest.approx(r['images_per_s'] * r['gflop_per_image'] / 1000)


def test_ratios_are_engine_over_reference(tiny_run):
    """Definitional (ratio = images/s over the reference's): a consistency check of the column only."""
    rows = {(r['method'], r['config']): r for r in tiny_run[0]['rows']}
    for (method, config), r in rows.items():
        if config in NOT_ON_CPU:
            assert r['ratio_to_reference'] is None, (method, config)
        else:
            reference = rows[method, 'reference']['images_per_s']
            assert r['ratio_to_reference'] == pytest.approx(r['images_per_s'] / reference), (method, config)


def test_engine_rows_train_on_the_same_batches(tiny_run):
    """Same weights, batches and random starts for every engine row; fp32 on CPU, so the same mean loss up to
    float differences: a config that trained on other data, or not at all, would show here."""
    results, _, _ = tiny_run
    for method in ('at', 'sgls'):
        losses = [r['loss'] for r in results['rows'] if r['method'] == method and r['status'] == 'ok'
                  and r['config'] != 'reference']
        assert len(losses) == 3 and max(losses) - min(losses) < 1e-2 * abs(losses[0]), losses


def test_markdown_lists_every_row(tiny_run):
    results, md, stdout = tiny_run
    assert md == stdout.strip() + '\n'  # the table printed is the table written
    for r in results['rows']:
        suffix = ' (n/a)' if r['status'] == 'n/a' else ''
        assert f"| {r['arch']} | {r['batch']} | {r['method']} | {r['config']}{suffix} |" in md
    assert train_step.FLOP_FORMULA in md and 'MFU' in md


def test_meta_records_the_run(tiny_run):
    meta = tiny_run[0]['meta']
    assert meta['device'] == 'cpu' and meta['torch'] and meta['date'] and meta['device_name']
    assert 'bench/train_step.py --tiny' in meta['command']
    assert meta['memory_kind'] == 'max RSS'


def test_resnet18_forward_is_the_published_number():
    """ResNet-18 (CIFAR variant, 32x32) forward: 0.556 GMACs per image, the commonly published figure; and the
    issue's ~25.5 GFLOP per PGD-10 AT training image."""
    forward = train_step.forward_flop('resnet18', 0, 32)
    assert forward / 2e9 == pytest.approx(0.556, abs=0.001)
    assert train_step.model_flop_per_image(forward, 'at', 10) / 1e9 == pytest.approx(25.5, abs=0.1)
