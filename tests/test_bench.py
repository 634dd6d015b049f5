"""bench/train_step.py --tiny: every row is there, sane and consistent, and the Markdown lists it. Shape and
sanity only, never speed: the timings of a 3-step smoke run on a shared CPU mean nothing."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from bench import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['reference'] + [c[0] for c in train_step.CONFIGS]
NOT_ON_CPU = {'+bf16', '+cuda_graphs'}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bench')
    out, md = tmp / 'results.json', tmp / 'results.md'
    done = subprocess.run([sys.executable, 'bench/train_step.py', '--tiny', '--out', str(out), '--md', str(md),
                           '--data-dir', str(tmp / 'data')], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text(), done.stdout


def test_every_row_is_there(tiny_run):
    results, _, _ = tiny_run
    args = results['meta']['args']
    assert (args['device'], args['archs'], args['batches'], args['methods']) == ('cpu', ['small_cnn'], [32],
                                                                                  ['at', 'sgls'])
    keys = [(r['arch'], r['batch'], r['method'], r['config']) for r in results['rows']]
    assert keys == list(itertools.product(['small_cnn'], [32], ['at', 'sgls'], CONFIGS))


def test_measured_rows_are_sane(tiny_run):
    results, _, _ = tiny_run
    args = results['meta']['args']
    for r in results['rows']:
        if r['config'] in NOT_ON_CPU:
            assert r['status'] == 'n/a' and r['note'] and r['images_per_s'] is None, r
            continue
        assert r['status'] == 'ok', r
        assert math.isfinite(r['images_per_s']) and r['images_per_s'] > 0, r
        assert r['ms_per_step'] == pytest.approx(1000 * r['batch'] / r['images_per_s'])
        assert r['warmup_s'] >= 0 and r['peak_mem_mib'] > 0 and math.isfinite(r['loss'])
        assert r['precision'] == 'fp32'  # CPU rows stay fp32 (train_step.BF16_CPU_NOTE)
        assert r['tflops'] == pytest.approx(r['images_per_s'] * r['gflop_per_image'] / 1000)
        assert r['mfu'] is None  # no peak for a CPU
        extra = 1 if r['method'] == 'sgls' else 0
        forward = results['meta']['forward_flop'][r['arch']]
        assert r['gflop_per_image'] == pytest.approx(forward * (2 * args['pgd_steps'] + 3 + extra) / 1e9)


def test_ratios_are_engine_over_reference(tiny_run):
    results, _, _ = tiny_run
    for method in ('at', 'sgls'):
        rows = {r['config']: r for r in results['rows'] if r['method'] == method}
        reference = rows['reference']['images_per_s']
        assert rows['reference']['ratio_to_reference'] == pytest.approx(1.0)
        for name in ('engine-eager', '+channels_last', '+compile'):
            assert rows[name]['ratio_to_reference'] == pytest.approx(rows[name]['images_per_s'] / reference)
        for name in NOT_ON_CPU:
            assert rows[name]['ratio_to_reference'] is None


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


def test_flop_formula_gives_the_issues_resnet18_number():
    """The issue: PGD-10 AT of ResNet-18 on CIFAR is about 25.5 GFLOP per image (0.556 GMACs forward)."""
    forward = train_step.forward_flop('resnet18', 0, 32)
    assert forward / 2e9 == pytest.approx(0.556, abs=0.001)
    assert train_step.model_flop_per_image(forward, 'at', 10) / 1e9 == pytest.approx(25.5, abs=0.1)
    assert train_step.model_flop_per_image(forward, 'sgls', 10) == pytest.approx(forward * 24)
