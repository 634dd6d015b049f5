"""Named PGD presets (evaluation.presets): the papers' evaluation settings, their columns in the final table, and the
attack against each official loop re-typed in its own form."""
import json
import os

import pytest
import torch
import torch.nn as nn

import run
from engine import checkpoint, config
from engine.attacks import PRESETS, pgd, random_start
from engine.evaluate import evaluate, in_worst
from engine.models import build_model
from engine.train import final
from engine.train.build import model_of
from writers.run_files import write_final
from writers.tables import format_table

EPS = 8 / 255
# As published (sources in engine/attacks.py): (eps, step, steps, start, start clipped to [0, 1]).
PUBLISHED = {
    'pgd20_sgls': (0.031, 0.003, 20, 'uniform', False),
    'pgd20_trades': (0.031, 0.003, 20, 'uniform', False),
    'pgd20_rslad': (8 / 255, 0.003, 20, 'uniform', True),
}
PRINTED = {
    'pgd20_sgls': 'pgd20_sgls: eps 0.031, step 0.003, 20 steps, uniform start unclamped, CE loss, BN eval '
                  '(devicerxx/SGLS pgd_attack.py',
    'pgd20_trades': 'pgd20_trades: eps 0.031, step 0.003, 20 steps, uniform start unclamped, CE loss, BN eval '
                    '(yaodongyu/TRADES pgd_attack_cifar10.py',
    'pgd20_rslad': 'pgd20_rslad: eps 8/255, step 0.003, 20 steps, uniform start clamped to [0, 1], CE loss, BN eval '
                   '(zibojia/RSLAD',
}


def official_sgls_trades(model, X, y, epsilon, num_steps, step_size, noise):
    """devicerxx/SGLS pgd_attack.py _pgd_whitebox (= yaodongyu/TRADES pgd_attack_cifar10.py), re-typed without
    Variable: an unclipped uniform start, then sign step, eta clipped to the eps-ball, image clipped to [0, 1]."""
    X_pgd = X.data + noise   # random_noise = FloatTensor(*X_pgd.shape).uniform_(-epsilon, epsilon)
    for _ in range(num_steps):
        X_pgd = X_pgd.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = nn.CrossEntropyLoss()(model(X_pgd), y)
        loss.backward()
        eta = step_size * X_pgd.grad.data.sign()
        X_pgd = X_pgd.data + eta
        eta = torch.clamp(X_pgd.data - X.data, -epsilon, epsilon)
        X_pgd = X.data + eta
        X_pgd = torch.clamp(X_pgd, 0, 1.0)
    return X_pgd.detach()


def official_rslad(model, x, y, attack_iters, step_size, epsilon, noise):
    """zibojia/RSLAD rslad_loss.py attack_pgd, re-typed: a clipped uniform start, then sign step, clipped to
    [0, 1], then the perturbation clipped to the eps-ball."""
    data = torch.clamp(x.detach() + noise, 0, 1)
    for _ in range(attack_iters):
        data.requires_grad_()
        loss = torch.nn.CrossEntropyLoss()(model(data), y)
        loss.backward()
        data = data + step_size * torch.sign(data.grad.detach())
        data = torch.clamp(data.detach(), 0, 1)
        data = (x + torch.clamp(data - x, -epsilon, epsilon)).detach()
    return data


@pytest.fixture(scope='module')
def model_and_batch():
    torch.manual_seed(0)
    model = build_model('small_cnn', 4, in_channels=1, width=4).double()
    with torch.no_grad():   # train-mode passes give BN real statistics
        for _ in range(2):
            model(torch.rand(32, 1, 28, 28, dtype=torch.float64))
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64)
    x[0], x[1] = 0.0, 1.0   # where clipping the start to [0, 1] changes it
    return model, x, torch.randint(0, 4, (6,), generator=g)


def test_presets_are_the_published_settings():
    assert set(PRESETS) == set(PUBLISHED)
    for name, (eps, step, steps, start, clamp) in PUBLISHED.items():
        p = PRESETS[name]
        assert (p.eps, p.step_size, p.steps, p.start, p.clamp_start, p.loss, p.bn_mode) == \
            (eps, step, steps, start, clamp, 'ce', 'eval'), name
    # counted in 'worst' only at the run's eps: 0.031 is not 8/255
    assert [in_worst(PRESETS[n], EPS) for n in PUBLISHED] == [False, False, True]


@pytest.mark.parametrize('name', PUBLISHED)
def test_preset_equals_the_official_loop(model_and_batch, name):
    model, x, y = model_and_batch
    p = PRESETS[name]
    got = p.attack(model, x, y, generator=torch.Generator().manual_seed(5))
    noise = torch.empty(x.shape, dtype=torch.float64).uniform_(-p.eps, p.eps, generator=torch.Generator().manual_seed(5))
    if name == 'pgd20_rslad':
        expected = official_rslad(model, x, y, p.steps, p.step_size, p.eps, noise)
    else:
        expected = official_sgls_trades(model, x, y, p.eps, p.steps, p.step_size, noise)
    # ulp-level differences only: the projection is min/max here and x + clamp(delta) there
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - x).abs().max() <= p.eps + 1e-12 and got.min() >= 0 and got.max() <= 1
    if not p.clamp_start:   # the unclipped start matters on this batch: a clipped one ends elsewhere
        clipped = pgd(model, x, y, eps=p.eps, step_size=p.step_size, steps=p.steps,
                      generator=torch.Generator().manual_seed(5))
        assert not torch.allclose(clipped, expected, rtol=0, atol=1e-6)
    # without a generator: torch's default one, as the official scripts' torch.FloatTensor(...).uniform_
    torch.manual_seed(9)
    default = p.attack(model, x, y)
    torch.manual_seed(9)
    noise = torch.empty(x.shape, dtype=torch.float64).uniform_(-p.eps, p.eps)
    again = (official_rslad(model, x, y, p.steps, p.step_size, p.eps, noise) if p.clamp_start
             else official_sgls_trades(model, x, y, p.eps, p.steps, p.step_size, noise))
    torch.testing.assert_close(default, again, rtol=0, atol=1e-12)


def test_training_starts_are_bitwise_unchanged():
    """The default starts (training, the golden runs) are the same draws and arithmetic as before presets."""
    x = torch.rand(4, 3, 8, 8)
    for start, formula in (('uniform', lambda: (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)),
                           ('normal', lambda: x + 0.001 * torch.randn_like(x))):
        torch.manual_seed(3)
        expected = formula()
        torch.manual_seed(3)
        assert torch.equal(random_start(x, EPS, start), expected), start


def margin_model_and_batches():
    """Two classes, z0 - z1 = 2 a ||w||_1 at x = 0.5 + a sign(w): an L-inf attack of radius eps flips exactly the
    examples with |a| < eps, so the accuracy under 20-step presets is known (8 of 12 survive 0.031 and 8/255)."""
    w = 0.01 * torch.sign(torch.randn(784, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    linear = nn.Linear(784, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.stack([w, -w]))
        linear.bias.copy_(torch.stack([-w.sum() / 2, w.sum() / 2]))
    a = torch.tensor([0.01, -0.02, 0.05, -0.08, 0.1, -0.2] * 2, dtype=torch.float64)
    x = (0.5 + a[:, None] * torch.sign(w)).reshape(12, 1, 28, 28)
    y = (a < 0).long()
    return nn.Sequential(nn.Flatten(), linear).eval(), [(x[:6], y[:6], None), (x[6:], y[6:], None)]


def test_evaluate_adds_a_column_per_preset_and_changes_no_other():
    model, batches = margin_model_and_batches()
    presets = (PRESETS['pgd20_sgls'], PRESETS['pgd20_rslad'])
    # a weak PGD (one step of 1e-4) that every example survives, at the run's eps of 8/255
    kwargs = dict(attacks=('clean', 'pgd'), eps=EPS, step_size=1e-4, pgd_steps=1)
    torch.manual_seed(4)
    plain = evaluate(model, batches, **kwargs)
    after_plain = torch.get_rng_state()
    torch.manual_seed(4)
    both = evaluate(model, batches, presets=presets, preset_seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), after_plain)   # presets draw from their own generator
    assert list(both) == ['n', 'clean', 'pgd', 'pgd20_sgls', 'pgd20_rslad', 'worst']
    assert (both['clean'], both['pgd']) == (plain['clean'], plain['pgd']) == (100.0, 100.0)
    assert both['pgd20_sgls'] == both['pgd20_rslad'] == pytest.approx(100 * 8 / 12)
    # by hand: one CPU generator seeded preset_seed, batch after batch, preset after preset
    g, hits = torch.Generator().manual_seed(7), {p.name: 0 for p in presets}
    for xb, yb, _ in batches:
        for p in presets:
            with torch.no_grad():
                hits[p.name] += int((model(p.attack(model, xb, yb, generator=g)).argmax(1) == yb).sum())
    assert {p.name: both[p.name] for p in presets} == {p.name: 100 * hits[p.name] / 12 for p in presets}
    # 'worst' takes pgd20_rslad (8/255, the run's eps) and leaves pgd20_sgls (0.031) out; at a run's eps of 0.031
    # it is the other way round
    assert (plain['worst'], both['worst']) == (100.0, pytest.approx(100 * 8 / 12))
    assert evaluate(model, batches, presets=presets[:1], **kwargs)['worst'] == 100.0
    at_0031 = evaluate(model, batches, presets=presets, **{**kwargs, 'eps': 0.031})
    assert at_0031['worst'] == pytest.approx(100 * 8 / 12)
    assert evaluate(model, batches, presets=presets[1:], **{**kwargs, 'eps': 0.031})['worst'] == 100.0


def test_settings_printed_in_table_and_final_json(tmp_path):
    cfg = config.load(cli_args=['--evaluation.presets=pgd20_sgls,pgd20_trades,pgd20_rslad',
                                '--evaluation.autoattack=false'])
    settings = final.final_settings(cfg, 100)
    rows = {'final': {'epoch': 200, 'clean': 80.0, 'pgd': 50.0, 'cw': 49.0, 'pgd20_sgls': 52.0,
                      'pgd20_trades': 52.5, 'pgd20_rslad': 51.0, 'worst': 48.0, 'n': 100}}
    write_final(str(tmp_path), rows, settings, method='sgls', seed=0)
    saved = json.loads((tmp_path / 'final.json').read_text())
    table = (tmp_path / 'final.md').read_text()
    lines = table.splitlines()
    assert lines[0] == '| checkpoint | epoch | clean | pgd | cw | pgd20_sgls | pgd20_trades | pgd20_rslad | worst |'
    assert lines[2] == '| final | 200 | 80.00 | 50.00 | 49.00 | 52.00 | 52.50 | 51.00 | 48.00 |'
    for name, (eps, step, steps, start, clamp) in PUBLISHED.items():
        p = saved['settings']['presets'][name]
        assert (p['eps'], p['step_size'], p['steps'], p['start'], p['clamp_start']) == (eps, step, steps, start, clamp)
        assert p['in_worst'] == (name == 'pgd20_rslad') and p['source'] == PRESETS[name].source
        line = next(line for line in lines if line.startswith(f'- {name}:'))
        assert line.startswith(f'- {PRINTED[name]}'), line
        assert line.endswith('counted in worst' if name == 'pgd20_rslad' else "not counted in worst (not the run's eps)")
    assert list(saved['settings']['presets']) == ['pgd20_sgls', 'pgd20_trades', 'pgd20_rslad']   # the given order


def test_without_presets_the_final_table_is_unchanged():
    cfg = config.load(cli_args=['--evaluation.autoattack=false'])
    assert cfg.evaluation.presets == ()
    settings = final.final_settings(cfg, 1000)
    assert settings == {'norm': 'linf', 'eps': EPS, 'step_size': 2 / 255, 'pgd_steps': 20, 'n': 1000, 'cw_steps': 30,
                        'seed': 0}
    rows = {'final': {'epoch': 200, 'clean': 82.0, 'fgsm': 60.0, 'pgd': 48.111, 'cw': 47.0, 'worst': 44.0, 'n': 1000}}
    assert format_table(rows, settings) == (
        '| checkpoint | epoch | clean | fgsm | pgd | cw | worst |\n'
        '|---|---:|---:|---:|---:|---:|---:|\n'
        '| final | 200 | 82.00 | 60.00 | 48.11 | 47.00 | 44.00 |\n'
        '\n'
        'L-inf eps = 8/255, step size = 2/255, PGD steps = 20, CW steps = 30, n = 1000 examples, evaluation seed = 0\n')


TINY = ['--data.dataset=synthetic', '--data.synthetic_n_train=32', '--data.synthetic_n_test=16',
        '--data.synthetic_classes=3', '--data.synthetic_shape=1,16,16', '--data.val_size=8',
        '--model.arch=small_cnn', '--model.width=4', '--training.epochs=1', '--training.batch_size=16',
        '--evaluation.final_n=16', '--evaluation.final_pgd_steps=1', '--evaluation.cw_steps=0',
        '--evaluation.fgsm=false', '--evaluation.autoattack=false', '--evaluation.batch_size=16']


def test_run_py_eval_with_a_preset(tmp_path):
    """`run.py eval --checkpoint X --evaluation.presets=pgd20_sgls` on a checkpoint saved before presets existed."""
    cfg = config.load(cli_args=[*TINY, f'--data.dir={tmp_path / "data"}', f'--output.dir={tmp_path}'])
    torch.manual_seed(0)
    params = {k: v for k, v in config.flat(cfg).items() if k not in ('evaluation.presets', 'data.drop_last')}
    path = str(tmp_path / 'last.pt')
    checkpoint.save(path, {'model': model_of(cfg, 1, torch.device('cpu')), 'progress': checkpoint.Progress()}, params)
    assert run.main(['eval', '--checkpoint', path, '--evaluation.presets=pgd20_sgls']) == 0
    saved = json.loads((tmp_path / 'last-eval' / 'eval.json').read_text())
    assert set(saved['row']) == {'epoch', 'n', 'clean', 'pgd', 'pgd20_sgls', 'worst', 'ece_clean', 'nll_clean',
                                 'ece_pgd', 'nll_pgd'}
    assert saved['settings']['presets']['pgd20_sgls']['eps'] == 0.031
    table = (tmp_path / 'last-eval' / 'eval.md').read_text()
    assert '| pgd20_sgls | worst |' in table and f'- {PRINTED["pgd20_sgls"]}' in table
    assert os.path.exists(path)
