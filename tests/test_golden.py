"""The golden runs (tests/golden/runs.py) reproduce: every method, single and packed, eager and fast, in float64.

They were recorded before the re-layout of the step, the loop and the checkpoints, with the command in the
file's meta; any change to what a run computes, writes or draws from its random stream shows here. The trades and
sgls_trades cases were re-recorded on 2026-12-02 when TRADES took the official forward order (meta.rerecorded says
why and what was checked first).
"""
import json

import pytest

from tests.golden import runs

with open(runs.GOLDEN) as f:
    GOLDEN = json.load(f)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('golden-data')


@pytest.mark.parametrize('case', runs.cases())
def test_golden_run_reproduces(case, data_dir, tmp_path):
    got = runs.run_case(case, data_dir, tmp_path / case)
    problems = runs.mismatches(got, GOLDEN['cases'][case], case)
    assert not problems, '\n'.join(problems[:20])


def test_the_comparison_sees_a_change():
    """A changed weight, a permuted tensor or a changed count must fail; rounding-level differences must not."""
    want = GOLDEN['cases']['sgls-eager']['sgls-s0']
    assert runs.mismatches(json.loads(json.dumps(want)), want) == []
    weight = 'features.0.weight'  # the first convolution
    assert weight in want['last']['model']
    for mutate in (lambda r: r['last']['model'][weight].__setitem__(0, r['last']['model'][weight][0] * (1 + 1e-6)),
                   lambda r: r['last']['soft_labels'].__setitem__(2, r['last']['soft_labels'][2] + 1e-4),
                   lambda r: r['metrics'][1].__setitem__('train_robust_acc', r['metrics'][1]['train_robust_acc'] + 0.1),
                   lambda r: r['final_rows']['final'].__setitem__('n', 191),
                   lambda r: r['last'].__setitem__('rng_sha256', '0' * 64)):
        changed = json.loads(json.dumps(want))
        mutate(changed)
        assert runs.mismatches(changed, want), mutate
