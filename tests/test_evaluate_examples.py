"""evaluate() of issue 15: (x, y) batches, the evaluation seed (one stream per attack, global RNG untouched),
per-example columns, calibration, progress bars and AutoAttack's log. References are recomputed here by hand."""
import copy
import hashlib

import pytest
import torch

from engine import attacks as atk
from engine import calibration as calib
from engine.attacks import PRESETS
from engine.evaluate import evaluate
from engine.models import build_model

EPS, STEP = 8 / 255, 2 / 255
# Small and fast: 3-step PGD, 2-step CW; AutoAttack as APGD-CE only on 12 examples, in batches of 2 (so chunks of 8:
# two chunks, the second partial).
KW = dict(eps=EPS, step_size=STEP, pgd_steps=3, cw_steps=2)
AA = dict(autoattack_version='custom', autoattack_attacks=('apgd-ce',), autoattack_batch=2, max_examples=12)


def seed_of(seed, name):
    """The documented stream seed, written out: the first 63 bits of sha256('<seed>/<name>')."""
    return int.from_bytes(hashlib.sha256(f'{seed}/{name}'.encode()).digest()[:8], 'little') >> 1


@pytest.fixture(scope='module')
def model_and_batches():
    """A float64 model (so two code paths agree to rounding on any CPU) and three batches of 10 with arbitrary
    indices; every third label is wrong, so every accuracy lies strictly between 0 and 100."""
    torch.manual_seed(0)
    model = build_model('small_cnn', 10, in_channels=1, width=4).double()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(64, 1, 28, 28, dtype=torch.float64))
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in range(3):
        x = torch.rand(10, 1, 28, 28, generator=g, dtype=torch.float64)
        with torch.no_grad():
            y = model(x).argmax(dim=1)
        y[::3] = (y[::3] + 1) % 10
        batches.append((x, y, 1000 + torch.arange(7 * b, 7 * b + 10)))   # not positions: the index is taken as given
    return model, batches


@pytest.fixture(scope='module')
def float_model_and_batches(model_and_batches):
    """The same in float32, for AutoAttack (pyautoattack makes float32 tensors of its own)."""
    model, batches = model_and_batches
    return copy.deepcopy(model).float(), [(x.float(), y, i) for x, y, i in batches]


def columns_equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_xy_batches_equal_indexed_batches(model_and_batches):
    model, batches = model_and_batches
    kwargs = dict(attacks=('clean', 'fgsm', 'pgd', 'cw'), per_example=True, seed=3, **KW)
    indexed = evaluate(model, batches, **kwargs)
    plain = evaluate(model, [(x, y) for x, y, _ in batches], **kwargs)
    none_index = evaluate(model, [(x, y, None) for x, y, _ in batches], **kwargs)
    assert torch.equal(indexed['examples']['index'], torch.cat([i for _, _, i in batches]))
    assert torch.equal(plain['examples']['index'], torch.arange(30))   # positions in the stream
    for result in (plain, none_index):
        assert {k: v for k, v in result.items() if k != 'examples'} == \
            {k: v for k, v in indexed.items() if k != 'examples'}
        assert columns_equal({k: v for k, v in result['examples'].items() if k != 'index'},
                             {k: v for k, v in indexed['examples'].items() if k != 'index'})
    cut = evaluate(model, [(x, y) for x, y, _ in batches], max_examples=15, **kwargs)
    assert torch.equal(cut['examples']['index'], torch.arange(15))
    with pytest.raises(ValueError):
        evaluate(model, [(x, y, None, None) for x, y, _ in batches], **kwargs)


def test_seed_reproduces_and_leaves_global_rng_alone(model_and_batches):
    model, batches = model_and_batches
    kwargs = dict(attacks=('clean', 'fgsm', 'pgd', 'cw'), presets=(PRESETS['pgd20_rslad'],), per_example=True, **KW)
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    first = evaluate(model, batches, seed=3, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)   # no draw from torch's global generator
    second = evaluate(model, batches, seed=3, **kwargs)
    assert {k: v for k, v in first.items() if k != 'examples'} == {k: v for k, v in second.items() if k != 'examples'}
    assert columns_equal(first['examples'], second['examples'])
    other = evaluate(model, batches, seed=4, **kwargs)
    assert not torch.equal(other['examples']['pgd_confidence'], first['examples']['pgd_confidence'])
    # by hand: PGD and the preset each from a CPU generator seeded from (seed, name), batch after batch
    g_pgd = torch.Generator().manual_seed(seed_of(3, 'pgd'))
    g_rslad = torch.Generator().manual_seed(seed_of(3, 'pgd20_rslad'))
    pgd_conf, rslad = [], []
    for x, y, _ in batches:
        with torch.no_grad():
            x_pgd = atk.pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, generator=g_pgd)
            pgd_conf.append(model(x_pgd).softmax(1).amax(1))
            rslad.append(model(PRESETS['pgd20_rslad'].attack(model, x, y, g_rslad)).argmax(1) == y)
    assert torch.allclose(first['examples']['pgd_confidence'], torch.cat(pgd_conf), rtol=1e-12, atol=0)
    assert torch.equal(first['examples']['pgd20_rslad'], torch.cat(rslad))


def test_adding_an_attack_changes_no_other_column(model_and_batches):
    model, batches = model_and_batches
    base = evaluate(model, batches, attacks=('clean', 'pgd'), per_example=True, seed=5, **KW)['examples']
    more = evaluate(model, batches, attacks=('cw', 'fgsm', 'clean', 'pgd'), per_example=True, seed=5,
                    presets=(PRESETS['pgd20_sgls'],), **KW)['examples']
    cw_alone = evaluate(model, batches, attacks=('cw',), per_example=True, seed=5, **KW)['examples']
    preset_alone = evaluate(model, batches, attacks=('clean',), per_example=True, seed=5,
                            presets=(PRESETS['pgd20_rslad'], PRESETS['pgd20_sgls']), **KW)['examples']
    for name in ('pgd', 'pgd_confidence', 'pgd_nll', 'clean', 'clean_margin'):
        assert torch.equal(base[name], more[name]), name
    assert torch.equal(cw_alone['cw'], more['cw'])
    assert torch.equal(preset_alone['pgd20_sgls'], more['pgd20_sgls'])


def test_per_example_columns(model_and_batches):
    model, batches = model_and_batches
    presets = (PRESETS['pgd20_sgls'], PRESETS['pgd20_rslad'])   # at 8/255 only pgd20_rslad counts in worst
    result = evaluate(model, batches, attacks=('pgd', 'clean', 'cw', 'fgsm'), presets=presets, per_example=True,
                      seed=0, **KW)
    ex = result['examples']
    assert list(ex) == ['index', 'label', 'clean_margin', 'clean_confidence', 'clean_nll', 'pgd_confidence',
                        'pgd_nll', 'clean', 'fgsm', 'pgd', 'cw', 'pgd20_sgls', 'pgd20_rslad', 'worst']
    assert all(v.shape == (30,) and v.device.type == 'cpu' for v in ex.values())
    assert ex['index'].dtype == ex['label'].dtype == torch.int64 and ex['worst'].dtype == torch.bool
    assert torch.equal(ex['index'], torch.cat([i for _, _, i in batches]))
    assert torch.equal(ex['label'], torch.cat([y for _, y, _ in batches]))
    for name in ('clean', 'fgsm', 'pgd', 'cw', 'pgd20_sgls', 'pgd20_rslad', 'worst'):
        assert 100 * int(ex[name].sum()) / 30 == result[name], name
    assert 0 < result['clean'] < 100
    worst = ex['clean'] & ex['fgsm'] & ex['pgd'] & ex['cw'] & ex['pgd20_rslad']
    assert torch.equal(ex['worst'], worst)
    assert torch.equal(ex['clean_margin'] > 0, ex['clean'])
    # clean statistics by hand
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    p = logits.softmax(1)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float('-inf')).amax(1)
    assert torch.allclose(ex['clean_margin'], true - others, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ex['clean_confidence'], p.amax(1), rtol=1e-12, atol=0)
    assert torch.allclose(ex['clean_nll'], -p.gather(1, y[:, None]).squeeze(1).log(), rtol=1e-10, atol=0)
    # PGD statistics on the attack's own inputs (its stream seeded from (0, 'pgd'))
    g = torch.Generator().manual_seed(seed_of(0, 'pgd'))
    x_pgd = torch.cat([atk.pgd(model, xb, yb, eps=EPS, step_size=STEP, steps=3, generator=g) for xb, yb, _ in batches])
    with torch.no_grad():
        p_pgd = model(x_pgd).softmax(1)
    assert torch.allclose(ex['pgd_confidence'], p_pgd.amax(1), rtol=1e-12, atol=0)
    assert torch.allclose(ex['pgd_nll'], -p_pgd.gather(1, y[:, None]).squeeze(1).log(), rtol=1e-10, atol=0)
    assert torch.equal(ex['pgd'], p_pgd.argmax(1) == y)
    assert 'examples' not in evaluate(model, batches, attacks=('clean',), **KW)


def test_autoattack_column_chunks_and_subset(float_model_and_batches):
    model, batches = float_model_and_batches
    result = evaluate(model, batches, attacks=('clean', 'autoattack'), per_example=True, seed=0, **KW, **AA)
    ex = result['examples']
    assert list(ex) == ['index', 'label', 'clean_margin', 'clean_confidence', 'clean_nll', 'clean', 'autoattack',
                        'worst']
    assert result['n'] == 12 and 100 * int(ex['autoattack'].sum()) / 12 == result['autoattack'] < result['clean']
    assert torch.equal(ex['worst'], ex['clean'] & ex['autoattack'])
    x, y = torch.cat([b[0] for b in batches])[:12], torch.cat([b[1] for b in batches])[:12]
    # by hand: chunks of 4 batches (8 examples), each one call seeded from (0, 'autoattack')
    aa = [atk.autoattack(model, x[s:s + 8], y[s:s + 8], eps=EPS, version='custom', attacks_to_run=('apgd-ce',),
                         batch_size=2, seed=seed_of(0, 'autoattack')) for s in (0, 8)]
    with torch.no_grad():
        assert torch.equal(ex['autoattack'], model(torch.cat(aa)).argmax(1) == y)
    # the caller's merge of AutoAttack on a subset: the index column of both calls pairs the rows
    subset = evaluate(model, batches, attacks=('autoattack',), per_example=True, seed=0, **KW,
                      **{**AA, 'max_examples': 8})
    assert torch.equal(subset['examples']['index'], ex['index'][:8])
    assert torch.equal(subset['examples']['autoattack'], ex['autoattack'][:8])   # the same first chunk
    assert subset['worst'] == 100 * int((ex['clean'] & ex['autoattack'])[:8].sum()) / 8


def test_calibration_in_the_result(model_and_batches):
    model, batches = model_and_batches
    result = evaluate(model, batches, attacks=('clean', 'pgd'), calibration=True, per_example=True, seed=1, **KW)
    ex = result['examples']
    assert list(result) == ['n', 'clean', 'pgd', 'worst', 'ece_clean', 'nll_clean', 'ece_pgd', 'nll_pgd',
                            'examples']
    assert result['ece_clean'] == 100 * calib.ece(ex['clean_confidence'], ex['clean'])
    assert result['ece_pgd'] == 100 * calib.ece(ex['pgd_confidence'], ex['pgd'])
    assert result['nll_clean'] == pytest.approx(ex['clean_nll'].mean().item(), rel=1e-12)
    assert result['nll_pgd'] == pytest.approx(ex['pgd_nll'].mean().item(), rel=1e-12)
    assert 0 < result['ece_clean'] <= 100 and result['nll_pgd'] > result['nll_clean'] > 0
    alone = evaluate(model, batches, attacks=('clean', 'pgd'), calibration=True, seed=1, **KW)
    assert 'examples' not in alone and {k: alone[k] for k in alone} == {k: result[k] for k in alone}
    # clean calibration needs no 'clean' column; PGD's needs PGD
    no_clean = evaluate(model, batches, attacks=('fgsm',), calibration=True, **KW)
    assert no_clean['ece_clean'] == result['ece_clean'] and 'ece_pgd' not in no_clean


def test_progress_bars_and_autoattack_log(float_model_and_batches, tmp_path, capsys):
    model, batches = float_model_and_batches
    log = tmp_path / 'autoattack.log'
    quiet = evaluate(model, batches, attacks=('clean', 'pgd'), seed=2, max_examples=12, **KW)
    assert capsys.readouterr().err == ''
    shown = evaluate(model, batches, attacks=('clean', 'pgd', 'autoattack'), seed=2, progress=True,
                     autoattack_log=str(log), **KW, **AA)
    err = capsys.readouterr().err
    assert 'evaluation' in err and 'AutoAttack' in err and '12/12' in err
    assert (shown['clean'], shown['pgd']) == (quiet['clean'], quiet['pgd'])   # the bar changes no number
    text = log.read_text()
    assert text.count('robust accuracy:') == 2   # one AutoAttack call per chunk of 8, appended
