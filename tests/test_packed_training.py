"""run.py sweep --pack: seeds trained as one packed model write what each seed's single run writes."""
import os

import pytest

from engine.errors import UserError
from engine.sweep import main as sweep
from tests.golden.runs import mismatches, record
from tests.test_sweep import TINY

SEEDS = ['0', '1']
ARGS = TINY + ['--methods', 'sgls', '--seeds', ','.join(SEEDS)]


def run_sweep(tmp_path, out, *extra):
    logs = []
    sweep([], ARGS + [f'--data.dir={tmp_path / "data"}', '--out', str(tmp_path / out), *extra], log=logs.append)
    return logs


def records(tmp_path, out):
    """What each seed's run wrote (metrics without timings, final rows, checkpoint fingerprints, RNG hash)."""
    return {seed: record(tmp_path / out / f'sgls-s{seed}') for seed in SEEDS}


def test_packed_sweep_equals_single_runs_and_resumes(tmp_path):
    """In float64 (training.precision=fp64) a packed seed computes what its single run computes up to rounding
    (~1e-12 here), whatever the CPU's kernels: every metric, final-table entry, weight, BN statistic, momentum
    and soft label within 1e-9, the random stream exactly. (In float32 the grouped convolution rounds otherwise
    than the plain one, and PGD's sign() and the ReLUs turn that into different trajectories: no tolerance of a
    float32 run comparison holds on every CPU; tests/test_packing.py compares float32 step by step.)"""
    run_sweep(tmp_path, 'single', '--training.precision=fp64')
    logs = run_sweep(tmp_path, 'packed', '--training.precision=fp64', '--pack', '2')
    assert any('packed 2 seeds (0, 1) as one model' in line for line in logs)
    single, packed = records(tmp_path, 'single'), records(tmp_path, 'packed')
    problems = mismatches(packed, single)
    assert not problems, '\n'.join(problems[:20])
    # SGLS really ran: the soft labels left one-hot after start_epoch, and the two seeds differ
    assert packed['0']['metrics'][-1]['soft_label_max_mean'] < 1
    assert mismatches(packed['0'], packed['1'])

    # float32, as trained: a killed and resumed packed sweep is bitwise the uninterrupted one
    run_sweep(tmp_path, 'packed32', '--pack', '2')
    run_sweep(tmp_path, 'killed', '--pack', '2', '--training.stop_after=1')  # as if killed after one epoch
    assert not os.path.exists(tmp_path / 'killed' / 'sgls-s0' / 'final.json')
    logs = run_sweep(tmp_path, 'killed', '--pack', '2')
    assert sum('resuming after epoch 1' in line for line in logs) == 2
    assert any('packed 2 seeds' in line for line in logs)
    assert records(tmp_path, 'killed') == records(tmp_path, 'packed32')


def test_packed_fast_sweep_equals_single_fast_runs(tmp_path):
    """Packed seeds on the fast path (compiled, channels-last, with the attack's BN folded and its objective and
    update compiled): each seed computes what its single fast run computes, in float64 within 1e-9 as above. On a
    GPU the same step runs in bf16 and is captured as CUDA graphs (tests/test_cuda.py)."""
    fast = ('--training.engine=fast', '--training.precision=fp64', '--training.fold_bn=true',
            '--training.fused_attack=true')
    run_sweep(tmp_path, 'single', *fast)
    logs = run_sweep(tmp_path, 'packed', *fast, '--pack', '2')
    assert any('packed 2 seeds (0, 1) as one model' in line for line in logs)
    assert any('fast engine: precision fp64' in line and 'fold_bn True' in line for line in logs)
    problems = mismatches(records(tmp_path, 'packed'), records(tmp_path, 'single'))
    assert not problems, '\n'.join(problems[:20])


@pytest.mark.parametrize('extra,error', [
    (['--pack', '0'], '--pack: expected a number of seeds >= 1'),
    (['--pack', 'two'], '--pack: expected a number of seeds >= 1'),
    (['--pack', '2', '--training.seed=5', '--grid', 'training.seed=1,2'], 'set by the sweep itself'),
])
def test_bad_pack_arguments(tmp_path, extra, error):
    with pytest.raises(UserError, match=error):
        run_sweep(tmp_path, 'bad', *extra)
    assert not os.path.exists(tmp_path / 'bad'), 'nothing may be written before the arguments are checked'


def test_seeds_are_packed_by_group_in_the_sweeps_order(tmp_path):
    """The same lists on every rerun: a killed packed group resumes as that group (runs at another epoch than
    their group's, which group checkpoints prevent, are split apart by train_group; tests/test_reliability.py)."""
    from engine.sweep import batches
    todo = [(f'{m}-s{s}', f'cfg-{m}{s}', (m,)) for m in ('at', 'sgls') for s in range(5)]
    got = [[cfg for _, cfg in together] for together in batches(todo, 2)]
    assert got == [['cfg-at0', 'cfg-at1'], ['cfg-at2', 'cfg-at3'], ['cfg-at4'],
                   ['cfg-sgls0', 'cfg-sgls1'], ['cfg-sgls2', 'cfg-sgls3'], ['cfg-sgls4']]
    assert [[cfg for _, cfg in together] for together in batches(todo[:3], 1)] == [['cfg-at0'], ['cfg-at1'],
                                                                                  ['cfg-at2']]


@pytest.mark.parametrize('pack', ['1', '2'])
def test_progress_bar_shows_loss_and_throughput(tmp_path, capsys, pack):
    run_sweep(tmp_path, 'bar', '--pack', pack, '--training.progress=on', '--training.batch_size=32',
              '--training.epochs=1', '--evaluation.final_n=64')  # 32 steps: the bar updates at step 20
    err = capsys.readouterr().err
    assert 'epoch 1' in err and 'loss=' in err and 'img_s=' in err
