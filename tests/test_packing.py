"""Packed seeds compute what each seed computes alone: forwards, state round trips, the optimizer, whole runs.

Why two kinds of run comparison. In float32 a packed step differs from the single step by ~1e-7 relative
(grouped vs plain convolution and batched vs plain matmul sum in other orders). Free-running, such differences do
not stay small: a ReLU input within rounding of zero switches a unit for one image, and PGD's sign() turns a
near-zero input gradient into a full step of the other sign, so float32 trajectories of the same computation
drift apart after a few steps (measured with this file's setup: 0.2 to 0.6 relative weight differences after
20 free-running float32 AT steps). Tolerances are tensor-wise (see assert_close_normwise). So:
- float64 runs are compared free-running over 20 steps: rounding differences are ~1e-16, the chance that one
  lands on a kink or flips a sign is negligible, and every seed's weights, BN statistics, momentum, soft labels,
  metrics and RNG stream must end where its single run ends (rtol 1e-9; losses and soft labels are float64 too,
  engine.precision.upcast; measured: ~1e-14);
- float32 (the production dtype) is compared step by step, both paths starting each step from the same state,
  within rtol 1e-4 (as tests/test_fast_step.py) but for rare discrete events (see that test).
"""
import copy

import pytest
import torch
import torch.nn as nn

from engine.methods import make_method
from engine.models import build_model
from engine.packing import (PackedSeeds, pack_inputs, pack_models, pack_optimizer_state, pack_state,
                            seed_generator, unpack_optimizer_state, unpack_state)
from engine.soft_labels import SoftLabels
from engine.step import train_step
from tests.synthetic import synthetic_batches

STEPS, BATCH, CLASSES = 20, 32, 4
ATTACK = dict(eps=16 / 255, step_size=8 / 255, steps=3, bn_mode='eval')
SEEDS = (3, 7)


def epoch_of(step):
    return 1 + step * 2 // STEPS  # with start_epoch=2, SGLS switches its soft labels on mid-way


# Start epochs set to 2: the methods with a soft-label table switch it on mid-way.
START_EPOCHS = {'sgls': 'sgls_start_epoch', 'sgls_trades': 'sgls_start_epoch', 'trades_sat': 'sat_start_epoch',
                'te': 'te_start_epoch'}


def method(name):
    return make_method(name, **{START_EPOCHS[name]: 2} if name in START_EPOCHS else {})


def packed_step(packed, optimizer, xs, ys, idxs, *, soft_labels, generators, **kw):
    """engine.step.train_step for the packed seeds: [K, 4] statistics."""
    return train_step(packed, optimizer, (xs, ys, idxs), soft_labels=soft_labels,
                      seeds=PackedSeeds(packed.num_seeds, generators), **kw)


def seed_data(seed, dtype):
    """Each seed's own batches (its own data order), as its own loader would give them."""
    x, y, idx, labels = synthetic_batches(100 + seed, steps=STEPS, batch=BATCH, classes=CLASSES)
    return x.to(dtype), y, idx, labels


def seed_model(seed, dtype, arch='small_cnn', **kw):
    """As a Run: seed the global RNG, then build; training goes on drawing from the same stream."""
    torch.manual_seed(seed)
    return build_model(arch, CLASSES, in_channels=3, width=8, **kw).to(dtype)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def assert_close_normwise(got, ref, rtol, atol, what):
    """|got - ref| <= rtol * max|ref| + atol everywhere: rounding differences of a sum scale with its terms, not
    with its result, so a small element of a large gradient may differ more than elementwise rtol allows."""
    error, scale = (got.double() - ref.double()).abs().max().item(), ref.double().abs().max().item()
    assert error <= rtol * scale + atol, f'{what}: max difference {error:.3g} (scale {scale:.3g})'


def assert_seed_equals_single(k, packed, optimizer, soft_labels, sums, single, rtol, atol):
    """Seed k of a packed run against its single run: weights and BN statistics, momentum (tensor-wise), then the
    soft-label table and the summed step statistics (elementwise: an argmax that flips changes a count by one)."""
    model, single_opt, single_soft, single_sums = single
    state, opt_state = unpack_state(packed)[k], unpack_optimizer_state(optimizer.state_dict(), packed.num_seeds)[k]
    for key, ref in model.state_dict().items():
        assert_close_normwise(state[key], ref, rtol, atol, f'seed {k} {key}')
    for i, slot in single_opt.state_dict()['state'].items():
        assert_close_normwise(opt_state['state'][i]['momentum_buffer'], slot['momentum_buffer'], rtol, atol,
                              f'seed {k} momentum {i}')
    torch.testing.assert_close(soft_labels[k].table, single_soft.table, rtol=rtol, atol=atol)
    torch.testing.assert_close(sums[k], single_sums[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize('arch', ['small_cnn', 'resnet18'])
@pytest.mark.parametrize('k', [2, 3])
def test_packed_forward_equals_each_single_forward(arch, k):
    models = [seed_model(s, torch.float32, arch) for s in range(k)]
    packed = pack_models(models)
    xs = torch.rand(k, 8, 3, 16, 16)
    for mode in ('train', 'eval'):  # train first: batch statistics, and running statistics to compare
        for m in [packed, *models]:
            m.train(mode == 'train')
        logits = packed(pack_inputs(xs))
        assert logits.shape == (8, k, CLASSES)
        for s, model in enumerate(models):
            torch.testing.assert_close(logits[:, s], model(xs[s]), rtol=1e-5, atol=1e-5)
            for key, ref in model.state_dict().items():
                torch.testing.assert_close(unpack_state(packed)[s][key], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['preact_resnet18', 'wrn34_10'])
def test_the_other_archs_and_the_normalize_wrapper_pack(arch):
    wrapper = dict(normalize=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    models = [seed_model(s, torch.float32, arch, **wrapper) for s in range(2)]
    xs = torch.rand(2, 4, 3, 16, 16)
    logits = pack_models(models)(pack_inputs(xs))
    for s, model in enumerate(models):
        torch.testing.assert_close(logits[:, s], model(xs[s]), rtol=1e-5, atol=1e-5)


def test_generic_layers_pack():
    """Grouped convolutions, BatchNorm1d after a Linear, a Linear without bias, a flatten of a whole feature map."""
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.Conv2d(4, 6, 3, groups=2, bias=False),
                             nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5),
                             nn.ReLU(), nn.Linear(5, CLASSES, bias=False))
    models = [net(s) for s in range(3)]
    xs = torch.rand(3, 8, 3, 8, 8)
    logits = pack_models(models)(pack_inputs(xs))
    for s, model in enumerate(models):
        torch.testing.assert_close(logits[:, s], model(xs[s]), rtol=1e-5, atol=1e-5)


def test_states_round_trip_exactly():
    models = [seed_model(s, torch.float32) for s in range(3)]
    for m in models:  # non-trivial running statistics and num_batches_tracked
        m(torch.rand(4, 3, 16, 16))
    packed = pack_models(models)
    for model, state in zip(models, unpack_state(packed)):
        ref = model.state_dict()
        assert list(state) == list(ref) and all(torch.equal(state[key], ref[key]) for key in ref)
        model.load_state_dict(state)  # each seed loads into the single architecture
    others = [seed_model(s, torch.float32).state_dict() for s in (10, 11, 12)]
    pack_state(packed, others)
    assert all(torch.equal(a[key], b[key]) for a, b in zip(unpack_state(packed), others) for key in a)

    optimizers = [sgd(m.parameters()) for m in models]
    for model, optimizer in zip(models, optimizers):
        model(torch.rand(4, 3, 16, 16)).sum().backward()
        optimizer.step()
    states = [o.state_dict() for o in optimizers]
    packed_opt = sgd(packed.parameters())
    packed_opt.load_state_dict(pack_optimizer_state(states))
    for got, ref in zip(unpack_optimizer_state(packed_opt.state_dict(), 3), states):
        assert got['param_groups'] == ref['param_groups']
        assert all(torch.equal(got['state'][i]['momentum_buffer'], ref['state'][i]['momentum_buffer'])
                   for i in ref['state'])


def test_one_sgd_over_packed_parameters_is_independent_sgds_per_seed():
    """Momentum, Nesterov and weight decay are elementwise, so one optimizer is K optimizers."""
    models = [seed_model(s, torch.float64) for s in range(2)]
    packed = pack_models(models)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True)
    packed_opt = torch.optim.SGD(packed.parameters(), **kw)
    single_opts = [torch.optim.SGD(m.parameters(), **kw) for m in models]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in packed.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        for k, model in enumerate(models):
            for p, packed_p in zip(model.parameters(), packed.parameters()):
                p.grad = packed_p.grad.chunk(2)[k].clone()
            single_opts[k].step()
        packed_opt.step()
    for model, state in zip(models, unpack_state(packed)):
        for key, ref in model.state_dict().items():
            torch.testing.assert_close(state[key], ref, rtol=1e-12, atol=0)


def test_layers_that_cannot_be_packed_are_refused():
    with pytest.raises(ValueError, match='LayerNorm'):
        pack_models([nn.Sequential(nn.LayerNorm(4)) for _ in range(2)])
    with pytest.raises(ValueError, match='Dropout'):
        pack_models([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)) for _ in range(2)])
    with pytest.raises(ValueError, match='one architecture'):
        pack_models([nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 5))])


@pytest.mark.parametrize('name', ['at', 'sgls', 'trades', 'sgls_trades', 'at_ls', 'trades_sat', 'te', 'mart'])
def test_packed_run_matches_each_seeds_single_run_float64(name):
    """Every packable method (engine.methods: all but the distilling ones and AWP)."""
    method_, data = method(name), [seed_data(s, torch.float64) for s in SEEDS]
    assert method_.packable
    singles, single_streams = [], []
    for seed, (x, y, idx, labels) in zip(SEEDS, data):
        model = seed_model(seed, torch.float64)
        optimizer, soft, sums = sgd(model.parameters()), method_.table_class(labels, CLASSES, torch.float64), 0
        for i in range(STEPS):
            sums = sums + train_step(model, optimizer, (x[i], y[i], idx[i]), method=method_, attack=ATTACK,
                                     soft_labels=soft, epoch=epoch_of(i))
        singles.append((model, optimizer, soft, sums))
        single_streams.append(torch.get_rng_state())

    models, streams = [], []
    for seed in SEEDS:
        models.append(seed_model(seed, torch.float64))
        streams.append(seed_generator('cpu'))
    packed = pack_models(models)
    optimizer, sums = sgd(packed.parameters()), 0
    soft_labels = [method_.table_class(labels, CLASSES, torch.float64) for *_, labels in data]
    xs, ys, idxs = (torch.stack([d[j] for d in data], 1) for j in range(3))  # [STEPS, K, ...]
    torch.manual_seed(12345)
    outer = torch.get_rng_state()
    for i in range(STEPS):
        sums = sums + packed_step(packed, optimizer, xs[i], ys[i], idxs[i], method=method_, attack=ATTACK,
                                  soft_labels=soft_labels, epoch=epoch_of(i), generators=streams)
    assert torch.equal(torch.get_rng_state(), outer), 'the packed step must not move the global stream'
    for k, single in enumerate(singles):
        assert torch.equal(streams[k].get_state(), single_streams[k]), f'seed {k} drew other random numbers than alone'
        assert_seed_equals_single(k, packed, optimizer, soft_labels, sums, single, rtol=1e-9, atol=1e-12)
    if name.startswith('sgls') or name == 'trades_sat':
        assert soft_labels[0].table.max(1).values.min() < 0.99, 'the soft labels never softened'
    if name == 'te':
        assert soft_labels[0].table.abs().sum() > 0, 'the ensemble never filled'


@pytest.mark.parametrize('name', ['at', 'sgls'])
def test_packed_step_matches_single_step_float32(name):
    """Each of 20 steps starts both paths from the same state (weights, momentum, soft labels, RNG stream) and
    must agree within rtol 1e-4 (tensor-wise), but for rare discrete events: float32 is ill-conditioned at a few
    points, where a ReLU input within rounding of zero switches a unit on or off for one image, or an input
    gradient within rounding of zero gives a PGD step the other sign. In this tiny network, whose units are often
    active for a few images only, one such event moved a gradient by up to 17% (the single path as often as the
    packed one, each measured against float64). Measured on this CPU: no event in 400 seed-steps with two seeds
    (whose grouped forward is bitwise the plain one here; another CPU or a GPU need not repeat that), about 1 in
    50 with three. So at most a tenth of the seed-steps may miss 1e-4; a bug would miss every one."""
    method_, data = method(name), [seed_data(s, torch.float32) for s in SEEDS]
    singles = [(m, sgd(m.parameters()), SoftLabels(labels, CLASSES))
               for m, (*_, labels) in zip([seed_model(s, torch.float32) for s in SEEDS], data)]
    single_streams = [torch.Generator().manual_seed(s).get_state() for s in SEEDS]  # any distinct streams do
    packed = pack_models([m for m, *_ in singles])
    optimizer = sgd(packed.parameters())
    soft_labels = [SoftLabels(labels, CLASSES) for *_, labels in data]
    xs, ys, idxs = (torch.stack([d[j] for d in data], 1) for j in range(3))
    events = []
    for i in range(STEPS):
        pack_state(packed, [m.state_dict() for m, *_ in singles])
        optimizer.load_state_dict(pack_optimizer_state([copy.deepcopy(o.state_dict()) for _, o, *_ in singles]))
        for table, (_, _, soft) in zip(soft_labels, singles):
            table.table.copy_(soft.table)
        streams = [torch.Generator() for _ in single_streams]
        for generator, state in zip(streams, single_streams):
            generator.set_state(state)
        sums = packed_step(packed, optimizer, xs[i], ys[i], idxs[i], method=method_, attack=ATTACK,
                           soft_labels=soft_labels, epoch=epoch_of(i), generators=streams)
        for k, (model, single_opt, soft) in enumerate(singles):
            torch.set_rng_state(single_streams[k])
            single_sums = train_step(model, single_opt, (xs[i, k], ys[i, k], idxs[i, k]), method=method_,
                                     attack=ATTACK, soft_labels=soft, epoch=epoch_of(i))
            single_streams[k] = torch.get_rng_state()
            assert torch.equal(streams[k].get_state(), single_streams[k]), f'step {i}: seed {k} drew other random numbers'
            try:
                assert_seed_equals_single(k, packed, optimizer, soft_labels, sums,
                                          (model, single_opt, soft, single_sums), rtol=1e-4, atol=1e-6)
            except AssertionError as e:
                events.append(f'step {i}: {e}')
    assert len(events) <= STEPS * len(SEEDS) // 10, events
