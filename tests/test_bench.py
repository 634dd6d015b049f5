"""bench/train_step.py --tiny: every row is there and sane, the Markdown lists it, and the FLOP model that MFU rests
on agrees with independent numbers: a hand count of small_cnn's layers, FLOP counted over one real engine step,
and the published ResNet-18 forward; the executed-FLOP formula ("MFU executed", bench/flops.py) against FLOP counted
over real eager and compiled steps of each ladder variant. bench/packing_forms.py --tiny: the grouped form computes
what K separate convolutions compute. configs/bench_sgls_200.yaml loads as the 200-epoch benchmark it claims to be.
Shape, sanity and FLOP only, never speed: the timings of a 3-step smoke run on a shared CPU mean nothing."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import engine.attacks
from bench import flops, packing_forms, train_step
from engine import config
from engine.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['reference'] + [c[0] for c in train_step.CONFIGS]
NOT_ON_CPU = {'+bf16', '+cuda_graphs (attack weight grads)', '+cuda_graphs'}
ENGINE_ROWS_ON_CPU = [c for c in CONFIGS if c not in NOT_ON_CPU and c != 'reference']
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


def engine_step_flop(method_name, **variant):
    """FLOP counted by FlopCounterMode, per aten op, over one real training step on the tiny profile's model and
    batch (SGLS with its soft labels active), as {op name: FLOP of the whole batch}: engine.step.train_step eagerly,
    or with variant compiled=True engine.fast.FastStep compiled with bench.flops.counting_backend (its forward and
    backward graphs as AOT autograd gives them to inductor, counted as they run)."""
    return flops.count_step(TINY['archs'], TINY['width'], TINY['image_size'], BATCH, method_name, PGD_STEPS,
                            warmup=0 if not variant.get('compiled') else 1, **variant)


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
        assert len(losses) == len(ENGINE_ROWS_ON_CPU) and max(losses) - min(losses) < 1e-2 * abs(losses[0]), losses


def test_markdown_lists_every_row(tiny_run):
    results, md, stdout = tiny_run
    assert md == stdout.strip() + '\n'  # the table printed is the table written
    for r in results['rows']:
        suffix = ' (n/a)' if r['status'] == 'n/a' else ''
        assert f"| {r['arch']} | {r['batch']} | {r['method']} | {r['config']}{suffix} |" in md
    assert train_step.FLOP_FORMULA in md and flops.EXECUTED_FORMULA in md and 'MFU executed' in md


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


# The ladder's FLOP-distinct variants: (count_step keywords, executed_flop_per_image keywords, the ladder rows).
VARIANTS = {
    'compiled': (dict(compiled=True), {}, ('+compile', '+cuda_graphs')),
    'attack weight grads': (dict(compiled=True, attack_wgrad=True), dict(attack_weight_grads=True),
                            ('+cuda_graphs (attack weight grads)',)),
    'fold_bn + fused_attack': (dict(compiled=True, fast_options=dict(fold_bn=True, fused_attack=True)), {},
                               ('+fold_bn', '+fused_attack')),
    '-clean_acc': (dict(compiled=True, clean_acc=False, fast_options=dict(fold_bn=True, fused_attack=True)),
                   dict(clean_acc=False), ('-clean_acc',)),
}


@pytest.fixture(scope='module')
def executed():
    """{(method, variant): FLOP per image counted over a real step}: AT in every variant, SGLS eagerly (its term, one
    more forward, is the same F in every variant: bench/flops.py counts SGLS in every variant on ResNet-18)."""
    assert {'fold_bn', 'fused_attack'} <= flops.fast_step_options() and flops.accepts_clean_acc(), \
        'engine.fast.FastStep / engine.step.train_step lack the issue-12 options the ladder rows use'
    counts = {}
    for method, name in [('at', 'eager'), ('sgls', 'eager'), *(('at', v) for v in VARIANTS)]:
        counted = engine_step_flop(method, **(VARIANTS[name][0] if name != 'eager' else {}))
        counts[method, name] = sum(counted.values()) / BATCH
    assert engine.attacks.input_gradient_only.__module__ == 'engine.attacks'  # the patch was undone
    return counts


def test_executed_flop_formula_matches_counted_steps(executed):
    """bench.flops.executed_flop_per_image, exactly, against FLOP counted over real steps. Found (torch 2.14, K = 2,
    per image, F = 492,256, C1 = 84,672): eager and compiled 8F - C1 (AT; SGLS eager 9F - C1); with the attack's
    weight gradients (the step before issue 12 item 1) 10F - C1: each attack step 3F instead of 2F, so the
    compiled attack backward did compute every weight gradient and the patch reproduces it; clean_acc=False 7F - C1.
    A FlopCounterMode around a compiled call would not see this (dynamo runs eagerly under a dispatch mode, which
    prunes), hence the counting backend."""
    forward, first = flops.forward_and_first_layer_flop(TINY['archs'], TINY['width'], TINY['image_size'])
    assert (forward, first) == (SMALL_CNN_FORWARD, CONV1)  # the hand count
    for (method, name), counted in executed.items():
        formula_kw = VARIANTS[name][1] if name != 'eager' else {}
        assert counted * BATCH == flops.executed_flop_per_image(forward, first, method, PGD_STEPS, **formula_kw) * BATCH
    # What the formula's terms are, from the counts alone: weight gradients add F per attack step; the clean-accuracy
    # forward is F; SGLS adds F; folding and the fused attack change no convolution or matmul.
    assert executed['at', 'attack weight grads'] - executed['at', 'compiled'] == PGD_STEPS * SMALL_CNN_FORWARD
    assert executed['at', 'compiled'] - executed['at', '-clean_acc'] == SMALL_CNN_FORWARD
    assert executed['sgls', 'eager'] - executed['at', 'eager'] == SMALL_CNN_FORWARD
    assert executed['at', 'eager'] == executed['at', 'compiled'] == executed['at', 'fold_bn + fused_attack']


def test_rows_state_the_executed_flop_of_their_variant(tiny_run, executed):
    """Each row's executed GFLOP/image is what was counted over a real step of its variant (the reference: the
    eager count less the clean-accuracy forward it does not run; SGLS: the AT count of the variant plus F)."""
    variant_of = {row: name for name, (_, _, rows) in VARIANTS.items() for row in rows}
    for r in tiny_run[0]['rows']:
        name = variant_of.get(r['config'], 'eager')
        counted = executed.get((r['method'], name), executed['at', name] + SMALL_CNN_FORWARD * (r['method'] == 'sgls'))
        if r['config'] == 'reference':
            counted -= SMALL_CNN_FORWARD
        assert r['executed_gflop_per_image'] * 1e9 == pytest.approx(counted, rel=1e-12), r
        assert r['mfu_executed'] is None  # no peak for a CPU


def test_attack_weight_grads_patch_is_scoped():
    """Inside the patch the attack leaves the parameters requiring grad (as before item 1); outside, and after, the
    attack freezes them again."""
    model = build_model('small_cnn', 10, width=4)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).requires_grad))
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    with flops.attack_weight_grads():
        engine.attacks.pgd(model, x, y, eps=0.1, step_size=0.05, steps=1)
    engine.attacks.pgd(model, x, y, eps=0.1, step_size=0.05, steps=1)
    assert seen == [True, False]


@pytest.fixture(scope='module')
def forms_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('forms') / 'forms.json'
    done = subprocess.run([sys.executable, 'bench/packing_forms.py', '--tiny', '--out', str(out), '--md',
                           str(out.with_suffix('.md'))], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix('.md').read_text()


def test_packing_forms_grouped_equals_separate(forms_run):
    """float64: one grouped convolution (K*C channels, groups=K, seed-major blocks as engine.packing packs them)
    gives each seed exactly its own convolution's output, input gradient and weight gradient, on every ResNet-18
    shape; and the check sees a wrong packing (the seeds' weights in reverse order)."""
    results, md = forms_run
    check = results['meta']['check']
    assert check['dtype'] == 'torch.float64' and check['k'] >= 2
    assert check['max_abs_diff'] <= 1e-12 and check['reversed_seed_order_max_abs_diff'] > 1e-3, check
    direct = packing_forms.check_grouped(k=2, batch=3, width=2, image_size=8)  # another K and size, directly
    assert direct['max_abs_diff'] <= 1e-12 and direct['reversed_seed_order_max_abs_diff'] > 1e-3, direct
    assert 'Check (float64' in md


def test_packing_forms_covers_resnet18(forms_run):
    """The tiny run times every ResNet-18 convolution shape (20 convolutions per forward: the stem, 16 3x3 in the
    blocks, 3 1x1 shortcuts) in every form but streams (CUDA only), for each K, and sums them per form."""
    results, md = forms_run
    assert sum(results['meta']['shapes'].values()) == 20
    ks = results['meta']['args']['ks']
    assert {(r['shape'], r['k'], r['form']) for r in results['rows']} == set(itertools.product(
        results['meta']['shapes'], ks, packing_forms.FORMS))
    for r in results['rows']:
        timed = [r[f'{p}_ms'] for p in packing_forms.PASSES]
        if r['form'] == 'streams':
            assert timed == [None] * 3 and r['note'], r
        else:
            assert all(t > 0 and math.isfinite(t) for t in timed), r
    for t in results['totals']:
        if t['form'] != 'streams':
            assert t['step'] == pytest.approx(sum(packing_forms.STEP_WEIGHTS[p] * t[p] for p in packing_forms.PASSES))
            mine = [r for r in results['rows'] if r['k'] == t['k'] and r['form'] == t['form']]
            assert t['forward'] == pytest.approx(sum(r['count'] * r['forward_ms'] for r in mine))
    assert '| 2 | grouped |' in md


def test_bench_sgls_200_config_is_the_200_epoch_sgls_run():
    """configs/bench_sgls_200.yaml: engine.config accepts it and it is what bench/RESULTS.md says it is: SGLS
    ResNet-18, 200 epochs, fast engine, PGD-10, on CIFAR-shaped synthetic data with 49,000 training images after
    the 1,000 held out, per-epoch evaluation, no AutoAttack."""
    path = os.path.join(ROOT, 'configs', 'bench_sgls_200.yaml')
    cfg = config.load([path])
    d = cfg.data
    assert (d.dataset, d.synthetic_shape, d.synthetic_classes) == ('synthetic', (3, 32, 32), 10)
    assert d.synthetic_n_train - d.val_size == 49_000 and d.val_size == 1000
    assert (cfg.model.arch, cfg.method.name, cfg.training.epochs, cfg.training.engine) == ('resnet18', 'sgls', 200,
                                                                                           'fast')
    assert (cfg.attack.steps, cfg.attack.eps, cfg.attack.step_size, cfg.training.batch_size) == (10, 8, 2, 128)
    assert cfg.evaluation.every == 1 and not cfg.evaluation.autoattack
    # The resumable form bench/RESULTS.md gives loads too (stop_after and resume may change between invocations).
    assert config.load([path], ['--training.stop_after=100', '--training.resume=true']).training.stop_after == 100
    with open(os.path.join(ROOT, 'bench', 'RESULTS.md')) as f:
        results = f.read()
    for form in ('', ' --training.stop_after=100', ' --training.resume=true'):  # the commands it gives
        assert f'/usr/bin/time -v python3 run.py train -C configs/bench_sgls_200.yaml{form}\n' in results, form
