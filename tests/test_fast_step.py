"""The fast step computes what the eager step computes, on the CPU in fp32 (AT, SGLS across its start epoch),
and compiles a fixed number of graphs, not one per step.

PGD's sign() makes free-running trajectories chaotic: a float-level difference flips a pixel's step and the two
runs drift apart after a few steps, right or wrong. So each of the many steps starts both paths from the same
state (weights, momentum, soft labels, RNG) and compares that step's results tightly.
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from engine.attacks import pgd
from engine.fast import FastStep
from engine.methods import make_method
from engine.models import build_model
from engine.soft_labels import SoftLabels
from engine.step import train_step
from tests.synthetic import synthetic_batches

STEPS, BATCH, CLASSES = 12, 32, 4
ATTACK = dict(eps=16 / 255, step_size=8 / 255, steps=3, bn_mode='eval')
SGLS_FROM_2 = dict(sgls_start_epoch=2)  # the steps' second half crosses SGLS's start epoch


def batches():
    return synthetic_batches(0, steps=STEPS, batch=BATCH, classes=CLASSES)


def trainee(labels, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model('small_cnn', CLASSES, in_channels=3, width=8).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, SoftLabels(labels, CLASSES, dtype)


def compare_step_by_step(method, compile, precision='fp32', **options):
    """fp32: within 1e-4 (float32 kernels of another memory layout or compiled sum in other orders); fp64: within
    1e-9, which holds on any CPU. options: FastStep's (fold_bn, fused_attack)."""
    dtype, tol = (torch.float64, 1e-9) if precision == 'fp64' else (torch.float32, 1e-4)
    x, y, idx, labels = batches()
    x = x.to(dtype)
    ref_model, ref_opt, ref_soft = trainee(labels, dtype)
    model, opt, soft = trainee(labels, dtype)
    fast = FastStep(model, torch.device('cpu'), precision=precision, compile=compile, **options)
    torch.manual_seed(1)
    for i in range(STEPS):
        model.load_state_dict(ref_model.state_dict())
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # load_state_dict would share the buffers
        soft.table.copy_(ref_soft.table)
        epoch = 1 + i * 2 // STEPS  # the second half crosses SGLS's start epoch (2)
        rng = torch.get_rng_state()
        ref_stats = train_step(ref_model, ref_opt, (x[i], y[i], idx[i]), method=method, attack=ATTACK,
                               soft_labels=ref_soft, epoch=epoch)
        torch.set_rng_state(rng)
        stats = fast(opt, (x[i], y[i], idx[i]), method=method, attack=ATTACK, soft_labels=soft, epoch=epoch)
        torch.testing.assert_close(stats, ref_stats, rtol=tol, atol=tol / 10,
                                   msg=lambda m: f'step {i} metrics: {m}')
        torch.testing.assert_close(soft.table, ref_soft.table, rtol=tol, atol=tol / 100,
                                   msg=lambda m: f'step {i} soft labels: {m}')
        ref_state, state = ref_model.state_dict(), model.state_dict()
        for k in ref_state:
            torch.testing.assert_close(state[k].contiguous(), ref_state[k], rtol=tol, atol=tol / 100,
                                       msg=lambda m: f'step {i} {k}: {m}')
    return ref_soft


@pytest.mark.parametrize('precision', ['fp32', 'fp64'])
@pytest.mark.parametrize('name', ['at', 'sgls'])
def test_channels_last_step_equals_eager(name, precision):
    compare_step_by_step(make_method(name, **SGLS_FROM_2 if name == 'sgls' else {}), compile=False,
                         precision=precision)


@pytest.mark.parametrize('name', ['at', 'trades', 'sgls'])
def test_folded_bn_and_fused_attack_step_equals_eager(name):
    """fold_bn (the attack and clean-accuracy forwards on the folded view) and fused_attack (objective and update
    compiled): the same step as the eager one, in float64. TRADES covers the KL attack's clean prediction."""
    compare_step_by_step(make_method(name, **SGLS_FROM_2 if name == 'sgls' else {}), compile=True,
                         precision='fp64', fold_bn=True, fused_attack=True)


def test_trades_attack_agrees_up_to_float32_resolution():
    """TRADES' KL attack starts at x + 0.001 N(0, 1), where the KL is flat: its first input gradients are ~1e-11,
    below float32 resolution, so a few of its pixels take the other sign with another memory layout (the CE
    attacks above match exactly). Everything else must agree."""
    x, y, _, labels = batches()
    model, _, _ = trainee(labels)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    a = pgd(model, x[0], y[0], loss='kl', start='normal', **ATTACK)
    torch.manual_seed(1)
    b = pgd(model_cl, x[0].contiguous(memory_format=torch.channels_last), y[0], loss='kl', start='normal', **ATTACK)
    same = ((a - b).abs() < 1e-6).float().mean().item()
    assert same > 0.97, same


def test_compiled_step_equals_eager_and_compiles_a_fixed_number_of_graphs():
    torch._dynamo.reset()
    counters.clear()
    soft = compare_step_by_step(make_method('sgls', **SGLS_FROM_2), compile=True)
    assert not torch.equal(soft.table, torch.nn.functional.one_hot(soft.table.argmax(1), CLASSES).float())
    graphs = counters['stats']['unique_graphs']
    # attack (eval, input grad), clean accuracy (eval, no grad), loss (train), SGLS clean pass (train, no grad):
    # a handful of graphs for the whole run, not one per step.
    assert 0 < graphs <= 6, dict(counters['stats'])


def test_compiled_attack_backward_computes_no_weight_gradients():
    """Under torch.compile the attack's backward is an AOT-autograd graph of its own, which computes every
    gradient it was traced for: PGD needs the input gradient only (engine.attacks.input_gradient_only). A
    recording backend lists each compiled backward's convolution_backward output masks (input, weight, bias):
    the training backward computes weight gradients, the attack's none."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    backwards = []

    def forward_compiler(gm, _):
        return make_boxed_func(gm.forward)

    def backward_compiler(gm, _):
        backwards.append([tuple(node.args[-1]) for node in gm.graph.nodes
                          if node.target == torch.ops.aten.convolution_backward.default])
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    x, y, idx, labels = batches()
    model, optimizer, soft = trainee(labels)
    fast = FastStep(model, torch.device('cpu'), precision='fp32', backend=aot_autograd(
        fw_compiler=forward_compiler, bw_compiler=backward_compiler))
    for method in (make_method('at'), make_method('trades')):
        for i in range(2):
            fast(optimizer, (x[i], y[i], idx[i]), method=method, attack=ATTACK, soft_labels=soft, epoch=1)
    assert backwards and all(masks for masks in backwards), backwards  # every backward holds the convolutions
    with_weights = [masks for masks in backwards if any(mask[1] for mask in masks)]
    attacks = [masks for masks in backwards if not any(mask[1] for mask in masks)]
    assert len(with_weights) == 1, backwards  # the training loss's backward (the same graph for AT and TRADES)
    assert attacks and all(all(mask[0] for mask in masks) for masks in attacks), backwards  # input grads only
    assert all(p.requires_grad for p in model.parameters())  # restored after each attack
