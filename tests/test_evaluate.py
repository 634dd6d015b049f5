"""evaluate(): accuracies equal a hand count, worst-case logic, max_examples, AutoAttack path, report table."""
import pytest
import torch

from engine.attacks import autoattack, cw_inf, fgsm, pgd
from engine.errors import ConfigError
from engine.evaluate import evaluate
from writers.tables import format_table
from engine.models import build_model

EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(scope='module')
def model_and_batches():
    torch.manual_seed(0)
    model = build_model('small_cnn', 10, in_channels=1, width=4)
    with torch.no_grad():   # a few train-mode passes give BN real statistics, so predictions vary
        for _ in range(3):
            model(torch.rand(64, 1, 28, 28))
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in range(3):
        x = torch.rand(10, 1, 28, 28, generator=g)
        with torch.no_grad():
            y = model(x).argmax(dim=1)
        y[::3] = (y[::3] + 1) % 10   # every third label wrong: clean accuracy strictly between 0 and 100
        batches.append((x, y, torch.arange(10 * b, 10 * b + 10)))
    return model, batches


def hand_count(model, batches, seed, pgd_steps, cw_steps):
    """The same attacks, in evaluate's order (clean, fgsm, pgd, cw per batch), counted by hand."""
    torch.manual_seed(seed)
    counts = dict(clean=0, fgsm=0, pgd=0, cw=0, worst=0)
    for x, y, _ in batches:
        per_attack = {
            'clean': x,
            'fgsm': fgsm(model, x, y, eps=EPS),
            'pgd': pgd(model, x, y, eps=EPS, step_size=STEP, steps=pgd_steps),
            'cw': cw_inf(model, x, y, eps=EPS, step_size=STEP, steps=cw_steps),
        }
        all_correct = [True] * len(y)
        for name, x_eval in per_attack.items():
            with torch.no_grad():
                predictions = model(x_eval).argmax(dim=1).tolist()
            for i, (p, label) in enumerate(zip(predictions, y.tolist())):
                counts[name] += p == label
                all_correct[i] = all_correct[i] and p == label
        counts['worst'] += sum(all_correct)
    return counts


def test_accuracies_equal_hand_count(model_and_batches):
    model, batches = model_and_batches
    model.train()   # evaluate must switch to eval mode and restore this afterwards
    bn_before = model.features[1].running_mean.clone()
    torch.manual_seed(7)
    result = evaluate(model, batches, attacks=('clean', 'fgsm', 'pgd', 'cw'), eps=EPS, step_size=STEP,
                      pgd_steps=3, cw_steps=2)
    assert model.training and torch.equal(model.features[1].running_mean, bn_before)
    model.eval()
    counts = hand_count(model, batches, seed=7, pgd_steps=3, cw_steps=2)
    assert set(result) == {'n', 'clean', 'fgsm', 'pgd', 'cw', 'worst'}
    assert result['n'] == 30
    for name, count in counts.items():
        assert result[name] == pytest.approx(100 * count / 30), name
    assert 0 < result['clean'] < 100
    assert all(result['worst'] <= result[name] for name in ('clean', 'fgsm', 'pgd', 'cw'))
    # 'worst' counts clean mistakes even when clean accuracy is not asked for.
    pgd_only = evaluate(model, batches, attacks=('pgd',), eps=EPS, step_size=STEP, pgd_steps=3)
    assert set(pgd_only) == {'n', 'pgd', 'worst'}
    assert pgd_only['worst'] <= min(pgd_only['pgd'], result['clean'])


def test_only_asked_keys_and_max_examples(model_and_batches):
    model, batches = model_and_batches
    fetched = []

    def loader():
        for b in batches:
            fetched.append(b)
            yield b

    result = evaluate(model, loader(), attacks=('clean',), eps=EPS, step_size=STEP, max_examples=15)
    assert set(result) == {'n', 'clean', 'worst'}
    assert result['n'] == 15 and len(fetched) == 2   # the third batch is never loaded
    x = torch.cat([b[0] for b in batches])[:15]
    y = torch.cat([b[1] for b in batches])[:15]
    with torch.no_grad():
        expected = (model(x).argmax(dim=1) == y).sum().item()
    assert result['clean'] == pytest.approx(100 * expected / 15)
    assert result['worst'] == result['clean']


def test_autoattack_path(model_and_batches):
    model, batches = model_and_batches
    rng_before = torch.get_rng_state()
    result = evaluate(model, batches, attacks=('clean', 'autoattack'), eps=EPS, step_size=STEP, max_examples=10,
                      autoattack_version='custom', autoattack_attacks=('apgd-ce',), autoattack_batch=8)
    assert result['n'] == 10
    assert result['autoattack'] <= result['clean']
    assert result['worst'] <= result['autoattack']
    # AutoAttack reseeds torch's generator internally; evaluation must not shift the training RNG stream.
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_autoattack_standard_version_and_log(model_and_batches, tmp_path):
    # 'standard' runs APGD-CE, APGD-T, FAB-T and Square, each only on points still robust. At 8/255 this
    # untrained model has no robust points left after APGD-CE, so the test stays fast (robust points would
    # cost minutes on CPU) while exercising the standard configuration.
    model, batches = model_and_batches
    x, y, _ = batches[0]
    log = tmp_path / 'autoattack.log'
    x_adv = autoattack(model, x[:6], y[:6], eps=EPS, version='standard', batch_size=8, log_path=str(log))
    assert (x_adv - x[:6]).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        assert (model(x_adv).argmax(dim=1) == y[:6]).sum() <= (model(x[:6]).argmax(dim=1) == y[:6]).sum()
    assert 'robust accuracy' in log.read_text()


def test_unknown_attack(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ConfigError):
        evaluate(model, batches, attacks=('clean', 'deepfool'), eps=EPS, step_size=STEP)


def test_format_table():
    rows = {'best': {'epoch': 12, 'clean': 81.234, 'pgd': 50.0, 'worst': 49.5, 'n': 1000},
            'final': {'epoch': 20, 'clean': 82.0, 'pgd': 48.111, 'autoattack': 45.0, 'worst': 44.0, 'n': 1000}}
    settings = {'eps': 8 / 255, 'step_size': 2 / 255, 'pgd_steps': 20, 'cw_steps': 30,
                'autoattack_version': 'standard', 'n': 1000}
    table = format_table(rows, settings)
    lines = table.splitlines()
    assert lines[0] == '| checkpoint | epoch | clean | pgd | autoattack | worst |'
    assert lines[2] == '| best | 12 | 81.23 | 50.00 | - | 49.50 |'
    assert lines[3] == '| final | 20 | 82.00 | 48.11 | 45.00 | 44.00 |'
    settings_line = lines[-1]
    for text in ('8/255', '2/255', 'PGD steps = 20', 'CW steps = 30', 'standard', '1000'):
        assert text in settings_line
