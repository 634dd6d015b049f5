"""The L2 threat model (issue 15 item 2): PGD-L2's ball, step and projection against formulas written out here, its
strength next to pyautoattack's APGD-CE (L2), AutoAttack L2, training with --attack.norm=l2 (eager and fast engine),
and the config's unit checks."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import run
from engine import attacks as atk
from engine.attacks_l2 import GRAD_EPS
from engine.errors import ConfigError
from engine.fast import FastStep
from engine.methods import make_method
from engine.models import build_model
from engine.step import train_step
from tests.synthetic import synthetic_batches


def l2_norms(t):
    return t.flatten(1).norm(dim=1)


def assert_in_l2_ball(x_adv, x, eps):
    assert l2_norms(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def small_cnn(dtype=torch.float32, classes=4, seed=0):
    torch.manual_seed(seed)
    return build_model('small_cnn', classes, in_channels=3, width=4).to(dtype)


def test_names_and_errors():
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match='norm'):
        atk.pgd(small_cnn(), x, y, eps=0.5, step_size=0.1, steps=1, norm='l1')
    # A start written for L-inf only (as packed seeds' before L2) is refused, not silently used for the L2 ball.
    with pytest.raises(ConfigError, match='attack.norm=l2'):
        atk.pgd(small_cnn(), x, y, eps=0.5, step_size=0.1, steps=1, norm='l2', start=lambda x, eps: x.clone())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('start', ['uniform', 'none', 'normal'])
@pytest.mark.parametrize('loss', ['ce', 'kl', 'cw'])
def test_pgd_l2_stays_in_ball_and_image_range(dtype, start, loss):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 4, (16,), generator=g)
    for eps in (0.05, 0.5, 2.0):  # 2.0: most points of the ball leave [0, 1], so the clipping is exercised
        x_adv = atk.pgd(small_cnn(dtype), x, y, eps=eps, step_size=eps / 2, steps=4, loss=loss, start=start,
                        norm='l2')
        assert x_adv.dtype == dtype and x_adv.shape == x.shape
        assert_in_l2_ball(x_adv, x, eps)
        # 4 steps of eps / 2 reach the sphere where the image range allows: the attack moves, it is not a no-op
        # (except the KL attack from x itself, where the KL is flat and its gradient ~0: why TRADES starts nearby)
        if not (loss == 'kl' and start == 'none'):
            assert l2_norms(x_adv - x).max() > 0.9 * eps
    fast = atk.fgsm(small_cnn(dtype), x, y, eps=0.5, norm='l2')
    assert_in_l2_ball(fast, x, 0.5)


def test_random_start_in_ball_per_seed_generator_and_radius():
    """The uniform L2 start: a point of the ball (before clipping: radius r * eps with r ~ U(0, 1)), the same from
    the same seeded CPU generator, in x's dtype; without clipping its radii spread over [0, eps]."""
    x = torch.full((400, 3, 8, 8), 0.5, dtype=torch.float64)
    start = atk.random_start(x, 0.5, 'uniform', clamp=False, norm='l2',
                             generator=torch.Generator().manual_seed(3))
    radii = l2_norms(start - x)
    assert start.dtype == torch.float64 and radii.max() <= 0.5 + 1e-12
    assert radii.min() < 0.05 and radii.max() > 0.45 and abs(radii.mean().item() - 0.25) < 0.03  # U(0, eps)
    again = atk.random_start(x, 0.5, 'uniform', clamp=False, norm='l2', generator=torch.Generator().manual_seed(3))
    assert torch.equal(start, again)
    clipped = atk.random_start(x * 1.9, 2.0, 'uniform', norm='l2', generator=torch.Generator().manual_seed(3))
    assert_in_l2_ball(clipped, x * 1.9, 2.0)  # clipping to [0, 1] moves each pixel towards the center
    torch.manual_seed(0)
    a = atk.random_start(x, 0.5, 'uniform', norm='l2')
    torch.manual_seed(0)
    assert torch.equal(a, atk.random_start(x, 0.5, 'uniform', norm='l2'))  # from the default generator's state


def test_l2_step_and_projection_equal_the_formula_on_a_linear_model():
    """f(x) = W x + b: the gradient of the summed CE w.r.t. x is (softmax(f(x)) - onehot(y)) W in closed form.
    One step from x itself: x + s * g / (||g|| + 1e-10), then delta * min(1, eps / ||delta||), clipped to [0, 1]."""
    torch.manual_seed(0)
    d, classes = 3 * 4 * 4, 5
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()
    x = 0.3 + 0.4 * torch.rand(6, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, classes, (6,))
    w, b = model[1].weight.detach(), model[1].bias.detach()
    for eps, step in ((0.5, 0.2), (0.5, 3.0), (0.05, 1.0)):  # inside the ball; projected back; both, and clipped
        p = F.softmax(x.flatten(1) @ w.T + b, dim=1)
        g = (p - F.one_hot(y, classes).double()) @ w
        moved = x.flatten(1) + step * g / (g.norm(dim=1, keepdim=True) + GRAD_EPS)
        delta = moved - x.flatten(1)
        delta = delta * torch.minimum(torch.ones(6, 1, dtype=torch.float64), eps / delta.norm(dim=1, keepdim=True))
        expected = (x.flatten(1) + delta).clamp(0, 1).reshape(x.shape)
        got = atk.pgd(model, x, y, eps=eps, step_size=step, steps=1, start='none', norm='l2')
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        fast = atk.fgsm(model, x, y, eps=eps, norm='l2')  # the fast gradient method: one step of length eps
        unit = g / (g.norm(dim=1, keepdim=True) + GRAD_EPS)
        torch.testing.assert_close(fast, (x.flatten(1) + eps * unit).clamp(0, 1).reshape(x.shape), rtol=0, atol=1e-12)


def test_packed_seeds_take_one_norm_per_seed():
    """x [B, K*C, H, W] with labels [B, K]: each seed's step and projection is its own, as if unpacked."""
    g = torch.Generator().manual_seed(0)
    x_adv, grad, x = (torch.rand(4, 6, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    packed = atk.pgd_l2_update(x_adv, grad, x, 0.3, 0.2, 2)
    for k in range(2):
        part = slice(3 * k, 3 * (k + 1))
        torch.testing.assert_close(packed[:, part], atk.pgd_l2_update(x_adv[:, part], grad[:, part], x[:, part], 0.3,
                                                                     0.2), rtol=0, atol=1e-15)
    cl = atk.pgd_l2_update(*(t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x)), 0.3, 0.2, 2)
    torch.testing.assert_close(cl, packed, rtol=0, atol=1e-15)  # the same on channels-last tensors (fast engine)


def blobs(n, generator, classes=10, shape=(1, 16, 16)):
    """Noisy class centers: a task a small MLP learns in a second whose L2 robustness falls off around eps 1."""
    centers = 0.3 + 0.4 * torch.rand(classes, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, classes, (n,), generator=generator)
    return (centers[y] + 0.3 * torch.randn(n, *shape, generator=generator)).clamp(0, 1), y


@pytest.fixture(scope='module')
def trained():
    """A small MLP adversarially trained with our PGD-L2 (eps 0.5) for about a second."""
    g = torch.Generator().manual_seed(1)
    x, y = blobs(2000, g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(6):
        for i in range(0, 2000, 100):
            xb = atk.pgd(model, x[i:i + 100], y[i:i + 100], eps=0.5, step_size=0.25, steps=3, norm='l2')
            loss = F.cross_entropy(model(xb), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), blobs(200, g)


def accuracy(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def test_pgd_l2_is_not_weaker_than_apgd_ce_l2(trained):
    """pyautoattack's APGD-CE in the L2 ball (5 restarts of 100 iterations) is the reference: our PGD-L2 (50 steps
    of eps / 4, one uniform start) leaves at most 5 points more robust accuracy. eps 1 is where the model's
    robustness falls off, so the comparison is informative (neither attack at 0 or at the clean accuracy)."""
    model, (x, y) = trained
    eps = 1.0
    clean = accuracy(model, x, y)
    ours = accuracy(model, atk.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=50, norm='l2'), y)
    x_apgd = atk.autoattack(model, x, y, eps=eps, version='custom', attacks_to_run=('apgd-ce',), norm='l2')
    assert_in_l2_ball(x_apgd, x, eps)
    apgd = accuracy(model, x_apgd, y)
    assert 10 < apgd < clean - 20, (clean, apgd)
    assert ours - apgd <= 5, (ours, apgd)


def test_autoattack_l2_runs_and_stays_in_ball(trained):
    """AutoAttack L2 through engine.attacks.autoattack. On this CPU the 'standard' version takes ~25 s for 8 images
    (Square's 5,000 queries, FAB-T's 9 targets), so here its two gradient attacks run ('custom': APGD-CE then
    APGD-T, 9 target classes); test_autoattack_l2_standard_on_gpu runs the whole standard version."""
    model, (x, y) = trained
    x, y = x[:32], y[:32]
    x_adv = atk.autoattack(model, x, y, eps=1.0, version='custom', attacks_to_run=('apgd-ce', 'apgd-t'), norm='l2')
    assert_in_l2_ball(x_adv, x, 1.0)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='AutoAttack standard (L2) takes minutes on a CPU')
def test_autoattack_l2_standard_on_gpu(trained):
    model, (x, y) = trained
    model, x, y = copy.deepcopy(model).cuda(), x.cuda(), y.cuda()
    x_adv = atk.autoattack(model, x, y, eps=1.0, version='standard', norm='l2')
    assert_in_l2_ball(x_adv, x, 1.0)
    x_apgd = atk.autoattack(model, x, y, eps=1.0, version='custom', attacks_to_run=('apgd-ce',), norm='l2')
    assert accuracy(model, x_adv, y) <= accuracy(model, x_apgd, y)  # standard starts with APGD-CE


L2_ATTACK = dict(norm='l2', eps=0.5, step_size=0.2, steps=3, bn_mode='eval')


@pytest.mark.parametrize('name', ['at', 'trades'])
def test_fast_step_equals_eager_under_l2(name):
    """The fast engine (channels-last, torch.compile'd model and, with fused_attack, the compiled L2 update) computes
    the eager step, in float64, step by step from the same state (as tests/test_fast_step.py). The 'eager' dynamo
    backend traces what inductor would compile, without its compile time on this CPU."""
    x, y, idx, _ = synthetic_batches(0, steps=3, batch=16, classes=4)
    x = x.double()
    method = make_method(name)
    ref, model = small_cnn(torch.float64), small_cnn(torch.float64)
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, model))
    fast = FastStep(model, torch.device('cpu'), precision='fp64', backend='eager', fused_attack=True)
    assert fast.attack_kernels['l2']['update'] is not fast.attack_kernels['linf']['update']
    for i in range(3):
        model.load_state_dict(ref.state_dict())
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # load_state_dict would share the buffers
        torch.manual_seed(i)
        expected = train_step(ref, ref_opt, (x[i], y[i], idx[i]), method=method, attack=L2_ATTACK, soft_labels=None,
                              epoch=1)
        torch.manual_seed(i)
        got = fast(opt, (x[i], y[i], idx[i]), method=method, attack=L2_ATTACK, soft_labels=None, epoch=1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key].contiguous(), value, rtol=1e-9, atol=1e-11)


TRAIN = ['--data.dataset=synthetic', '--data.synthetic_n_train=576', '--data.synthetic_n_test=128',
         '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16', '--data.val_size=64',
         '--model.arch=small_cnn', '--model.width=8', '--attack.norm=l2', '--attack.eps=0.5',
         '--attack.step_size=0.2', '--attack.steps=2', '--training.epochs=1', '--training.batch_size=64',
         '--schedule.milestones=1', '--evaluation.subset=64', '--evaluation.pgd_steps=2',
         '--evaluation.final_pgd_steps=2', '--evaluation.cw_steps=2', '--evaluation.autoattack=false',
         '--training.progress=off']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('data')


@pytest.mark.parametrize('name', ['at', 'trades'])
def test_training_with_l2_attack_ends_with_finite_metrics(tmp_path, data_dir, name):
    """run.py train --attack.norm=l2 (the CE attack from the uniform L2 start; TRADES' KL attack from its tiny
    Gaussian): the run ends, saves norm and eps as given, and every metric is finite."""
    assert run.cli(['train', *TRAIN, f'--method.name={name}', f'--data.dir={data_dir}',
                    f'--output.dir={tmp_path}', '--output.name=run']) == 0
    params = json.loads((tmp_path / 'run' / 'params.json').read_text())
    assert (params['attack.norm'], params['attack.eps']) == ('l2', 0.5)
    last = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()][-1]
    numbers = [v for v in last.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers), last
    rows = json.loads((tmp_path / 'run' / 'final.json').read_text())['rows']
    assert all(math.isfinite(v) for row in rows.values() for v in row.values() if isinstance(v, float)), rows


@pytest.mark.parametrize('args,needle', [
    (['--attack.eps=0.03'], "'attack.eps' 0.03 with attack.norm=linf is in units of 1/255 (8 means 8/255)"),
    (['--attack.norm=l2', '--attack.eps=8', '--attack.step_size=1'], "'attack.eps' 8 with attack.norm=l2 is in "
                                                                     'pixel units'),
    (['--attack.norm=l2', '--attack.eps=0.5'], "'attack.step_size' 2 with attack.norm=l2"),  # the linf default step
    (['--attack.norm=l2', '--attack.eps=60', '--attack.confirm_eps=true'], 'larger than the L2 diameter of 3x32x32'),
])
def test_eps_in_the_wrong_unit_stops_with_exit_code_2(args, needle, capsys):
    assert run.cli(['train', *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and needle in err, err
    if 'diameter' not in needle:
        assert "'attack.confirm_eps' true" in err, err


def test_confirmed_eps_is_accepted():
    from engine import config
    cfg = config.load(cli_args=['--attack.eps=0.03', '--attack.confirm_eps=true'])
    assert (cfg.attack.norm, cfg.attack.eps) == ('linf', 0.03)
    cfg = config.load(cli_args=['--attack.norm=l2', '--attack.eps=8', '--attack.step_size=1',
                                '--attack.confirm_eps=true'])
    assert (cfg.attack.norm, cfg.attack.eps) == ('l2', 8.0)
    assert config.load(cli_args=['--attack.norm=l2', '--attack.eps=0.5', '--attack.step_size=0.1']).attack.eps == 0.5
