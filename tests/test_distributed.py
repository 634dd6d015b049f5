"""Many processes under torchrun (issue 13 of the project), on CPUs with gloo and 2 ranks: a seed-parallel sweep
writes what one process writes, survives a killed rank, a data-parallel run equals the one-process run of the
same global batch, and what a user gets wrong stops every rank with a message and exit code 2."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import run
from engine import config
from engine.data.loaders import make_loaders
from engine.data_parallel import check_data_parallel
from engine.distributed import rank_device
from engine.errors import ConfigError, UserError
from engine.sweep import claim, rank_order
from engine.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('epoch_time_s', 'images_per_s')
# 4 steps of 64 per epoch, SGLS on from epoch 2 of 3; float64 so that kernels summing in another order (another
# thread count, another batch split) differ by rounding only (tests/golden/runs.py).
TINY = ['--data.dataset=synthetic', '--data.synthetic_n_train=320', '--data.synthetic_n_test=64',
        '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16', '--data.val_size=64',
        '--model.arch=small_cnn', '--model.width=8', '--attack.eps=16', '--attack.step_size=8', '--attack.steps=2',
        '--training.epochs=3', '--training.batch_size=64', '--training.precision=fp64', '--schedule.milestones=3',
        '--method.sgls_start_epoch=2', '--evaluation.subset=64', '--evaluation.pgd_steps=2',
        '--evaluation.final_pgd_steps=2', '--evaluation.cw_steps=0', '--evaluation.fgsm=false',
        '--evaluation.autoattack=false', '--training.progress=off']
RUNS = ('at-s0', 'at-s1', 'sgls-s0', 'sgls-s1')
# One thread per process, as torchrun gives each rank, so that the one-process reference runs the same kernels.
ENV = {**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE', 'OMP_NUM_THREADS': '1'}


def torchrun(*argv):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
            os.path.join(ROOT, 'run.py'), *argv]


def finish(argv, timeout=240, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def as_two_nodes(argvs, cwds):
    """Two ranks started as torchrun starts them (RANK, WORLD_SIZE, ... in the environment), each as the only
    rank of its own "node" (its own working directory), each with its own command line; their outcomes."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), *argv], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**ENV, 'RANK': str(rank), 'WORLD_SIZE': '2', 'LOCAL_RANK': '0',
                                   'LOCAL_WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)})
             for rank, (argv, cwd) in enumerate(zip(argvs, cwds))]
    return [(p.returncode, out[1]) for p, out in ((p, p.communicate(timeout=120)) for p in procs)]


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def sessions(run_dir):
    with open(os.path.join(run_dir, 'provenance.json')) as f:
        return json.load(f)


def checkpoint(run_dir, which='last'):
    return torch.load(os.path.join(run_dir, 'checkpoints', f'{which}.pt'), weights_only=True)


def assert_same_run(got, want, rtol=0.0):
    """Two run folders hold the same run: weights of both checkpoints, metrics and final table, bitwise or
    within rtol (with an absolute 1e-12 for values near 0)."""
    for which in ('last', 'best'):
        a, b = checkpoint(got, which)['model'], checkpoint(want, which)['model']
        for key, value in b.items():
            torch.testing.assert_close(a[key], value, rtol=rtol, atol=rtol and 1e-12, msg=f'{got} {which} {key}')
    with open(os.path.join(got, 'final.json')) as f, open(os.path.join(want, 'final.json')) as g:
        final = json.load(f)['rows'], json.load(g)['rows']
    for got_values, want_values in ((metrics(got), metrics(want)), final):
        assert close(got_values, want_values, rtol), got


def close(a, b, rtol):
    """Equal JSON values, floats within rtol (absolute 1e-12 near 0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= max(rtol * abs(b), rtol and 1e-12)
    return a == b


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    done = finish([sys.executable, os.path.join(ROOT, 'run.py'), 'convert', *TINY[:5], f'--data.dir={d}'])
    assert done.returncode == 0, done.stderr
    return d


def sweep_argv(data_dir, out, *extra):
    return ['sweep', *TINY, f'--data.dir={data_dir}', '--methods=at,sgls', '--seeds=0-1', f'--out={out}', *extra]


@pytest.fixture(scope='module')
def one_process_sweep(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('sweep') / 'one'
    done = finish([sys.executable, os.path.join(ROOT, 'run.py'), *sweep_argv(data_dir, out)])
    assert done.returncode == 0, done.stderr
    return out


# -- seed-parallel sweeps -----------------------------------------------------------------------------------------

def test_a_two_rank_sweep_writes_the_runs_of_one_process(data_dir, one_process_sweep, tmp_path):
    out = tmp_path / 'two'
    done = finish(torchrun(*sweep_argv(data_dir, out, '--compare')))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted([*RUNS, 'compare'])  # no token, lock or claim left
    owners = set()
    for name in RUNS:
        assert_same_run(out / name, one_process_sweep / name)
        (session,) = sessions(out / name)  # trained once, by one process
        owners.add(session['pid'])
    assert len(owners) == 2, 'both ranks trained runs'
    assert done.stdout.count('comparison: ') == 1 and '[rank 0/2] comparison: ' in done.stdout
    assert os.path.exists(out / 'compare' / 'report.md')


def test_a_killed_rank_then_a_restart_finishes_every_run_once(data_dir, one_process_sweep, tmp_path):
    """Seeds packed by two within each rank (one group per rank); SIGKILL one rank once a run has its first
    checkpoint (torchrun then stops the other rank). The restarted sweep takes the dead ranks' locks and claims
    over and resumes their groups, each from its last checkpoint, packed as before. A packed seed equals its
    single run in float64 to rounding (README; tests/test_golden.py: 1e-9), hence the tolerance."""
    out = tmp_path / 'killed'
    argv = torchrun(*sweep_argv(data_dir, out, '--pack=2'))
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not any(os.path.exists(out / n / 'checkpoints' / 'last.pt') for n in RUNS):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.02)
    victim = next(n for n in RUNS if os.path.exists(out / n / 'checkpoints' / 'last.pt'))
    with open(out / victim / 'run.lock') as f:
        os.kill(json.load(f)['pid'], signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode != 0 and not os.path.exists(out / victim / 'final.json'), 'killed in the middle of a run'
    done = finish(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'taking over the lock' in done.stdout and done.stdout.count('packed 2 seeds') == 2  # once per group
    for name in RUNS:
        assert_same_run(out / name, one_process_sweep / name, rtol=1e-9)  # metrics: each epoch once
        starts = [s['resumed_after_epoch'] for s in sessions(out / name)]
        assert starts == sorted(starts), (name, starts)  # each session went on from the last checkpoint
        assert len({s['pid'] for s in sessions(out / name)}) == len(starts)  # one owner per session
    assert [s['resumed_after_epoch'] for s in sessions(out / victim)][-1] >= 1
    assert sorted(os.listdir(out)) == sorted(RUNS) and not any(os.path.exists(out / n / 'run.lock') for n in RUNS)


# -- data-parallel runs --------------------------------------------------------------------------------------------

def test_a_two_rank_run_equals_the_one_process_run_of_the_global_batch(data_dir, tmp_path):
    """SGLS with global BatchNorm statistics in float64: 2 ranks of 32 images against one process of 64, the
    2-rank run stopped after epoch 1 and resumed (every rank restoring last.pt). Tolerance: relative 1e-9 (with
    1e-12 absolute), as tests/test_golden.py: splitting a batch changes only the order of sums (observed ~1e-13
    here), while one different PGD sign or batch moves the weights by far more."""
    common = [*TINY, f'--data.dir={data_dir}', f'--output.dir={tmp_path}', '--method.name=sgls',
              '--distributed.sync_bn=true']
    train(config.load(cli_args=[*common, '--output.name=one']), log=lambda *_: None)
    for extra in ('--training.stop_after=1', '--training.resume=true'):
        done = finish(torchrun('train', *common, '--output.name=two', extra))
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = checkpoint(tmp_path / 'one'), checkpoint(tmp_path / 'two')
    for part in ('model', 'soft_labels'):
        for key, want in one[part].items():
            torch.testing.assert_close(two[part][key], want, rtol=1e-9, atol=1e-12, msg=f'{part}.{key}')
    assert close(metrics(tmp_path / 'two'), metrics(tmp_path / 'one'), 1e-9)
    records = sessions(tmp_path / 'two')  # rank 0 alone wrote the folder: one record per launch
    assert [(r['data_parallel_ranks'], r['resumed_after_epoch']) for r in records] == [(2, 0), (2, 1)]


def test_sharded_batches_together_are_the_one_process_batches(data_dir):
    """Both loader kinds, augmentation on, the last partial batch kept: rank r's batch i is the r-th half of the
    one-process batch i, images included; an uneven split is refused naming what does not split."""
    train_path, test_path = (str(data_dir / f'synthetic-3x16x16-c4-n320-t64-s0-{s}.beton') for s in ('train', 'test'))
    for kind in ('gpu', 'ffcv'):
        def epoch(shard=None):
            loader = make_loaders(train_path, test_path, kind=kind, batch_size=64, val_size=36, seed=3,
                                  drop_last=False, crop_padding=2, flip=True, num_workers=1).train
            if shard:
                loader.shard(*shard)
            loader.set_epoch(2)
            return [(x, y, idx) for x, y, idx in loader]
        whole, halves = epoch(), [epoch((r, 2)) for r in range(2)]
        assert len(whole) == 5 and whole[-1][0].shape[0] == 28  # 284 images: 4 batches and a kept 28
        for i, batch in enumerate(whole):
            for part, one in zip(batch, (torch.cat([halves[r][i][j] for r in range(2)]) for j in range(3))):
                assert torch.equal(part, one), (kind, i)
        with pytest.raises(ConfigError, match=r'the last partial batch \(28 images, data.drop_last=false\) does '
                                              'not split evenly over 8 ranks'):
            epoch((0, 8))


# -- what a user gets wrong ------------------------------------------------------------------------------------------

def test_ranks_started_with_different_configs_stop(data_dir, tmp_path):
    common = ['train', *TINY, f'--data.dir={data_dir}', f'--output.dir={tmp_path}']
    outcomes = as_two_nodes([common, [*common, '--optimizer.lr=0.2']], [tmp_path, tmp_path])
    for code, stderr in outcomes:
        assert code == 2 and 'error: ranks started with different configs: rank 1 differs from rank 0 in ' \
            'optimizer.lr 0.1 vs 0.2' in stderr, stderr
    assert os.listdir(tmp_path) == [], 'nothing trained'


def test_an_output_folder_the_other_node_cannot_see_stops(data_dir, tmp_path):
    """Each "node" has its own working directory, so the relative output folder `runs` is two folders."""
    nodes = [tmp_path / 'node0', tmp_path / 'node1']
    for node in nodes:
        node.mkdir()
    argv = ['sweep', *TINY, f'--data.dir={data_dir}', '--methods=at', '--out=runs']
    for code, stderr in as_two_nodes([argv, argv], nodes):
        assert code == 2, stderr
        assert f'error: runs: rank 1 on {socket.gethostname()} ({nodes[1] / "runs"}) cannot see the file that ' \
            f'rank 0' in stderr and 'must be one folder that every node shares' in stderr, stderr
    assert os.listdir(nodes[0] / 'runs') == [], 'the token is removed, nothing trained'


def test_an_uneven_global_batch_stops_every_rank_under_torchrun(data_dir, tmp_path):
    done = finish(torchrun('train', *TINY, f'--data.dir={data_dir}', f'--output.dir={tmp_path}',
                           '--training.batch_size=63'), timeout=120)
    message = 'error: training.batch_size=63 is the global batch, split evenly over the ranks'
    # Each rank refuses on its own, before any collective. The first to exit makes torchrun SIGTERM the other,
    # which under load may not have printed yet: at least one message, exit 2, and nobody left waiting (the
    # timeout) is what "every rank stops" can promise.
    assert done.stderr.count(message) >= 1 and 'exitcode  : 2' in done.stderr, done.stderr[-3000:]
    assert done.returncode != 0


def test_more_ranks_per_node_than_gpus_stop(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(UserError, match=f'--nproc_per_node=4 but host {socket.gethostname()} has 2 visible GPU'):
        rank_device('auto', 3, 4)
    with pytest.raises(UserError, match='each rank uses its own GPU'):
        rank_device('cuda:1', 0, 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda i: None)
    assert rank_device('cuda', 1, 2) == torch.device('cuda', 1) and rank_device('cpu', 1, 8).type == 'cpu'
    for key, value in {'WORLD_SIZE': '4', 'RANK': '3', 'LOCAL_RANK': '3', 'LOCAL_WORLD_SIZE': '4'}.items():
        monkeypatch.setenv(key, value)
    assert run.cli(['train', *TINY, '--training.device=cuda']) == 2  # before any process group
    assert '--nproc_per_node=4 but host' in capsys.readouterr().err


@pytest.mark.parametrize('extra,error', [
    (['--training.batch_size=66'], 'training.batch_size=66 is the global batch'),
    (['--training.engine=fast', '--training.precision=fp16', '--training.cuda_graphs=false'], 'fp16 under torchrun'),
    (['--data.force=true'], 'every rank would rewrite the betons'),
    (['--training.engine=fast'], 'cuda_graphs under torchrun: a captured step cannot hold the gradient all-reduce'),
    (['--training.engine=fast', '--training.cuda_graphs=false', '--training.fold_bn=true',
      '--distributed.sync_bn=true'], 'training.fold_bn with distributed.sync_bn'),
])
def test_configs_a_data_parallel_run_refuses(extra, error, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # CUDA graphs are refused on a GPU node
    with pytest.raises(ConfigError, match=error):
        check_data_parallel(config.load(cli_args=[*TINY, *extra]), 4)


def test_pack_is_a_sweep_option(capsys):
    assert run.cli(['train', *TINY, '--pack', '2']) == 2
    assert '--pack is an option of run.py sweep' in capsys.readouterr().err


def test_the_one_process_commands_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert run.cli(['compare', str(tmp_path)]) == 2
    assert 'run.py compare runs in one process' in capsys.readouterr().err


def test_a_packed_group_is_claimed_whole_and_each_rank_walks_every_batch(tmp_path):
    group = [('sgls-s0', None), ('sgls-s1', None)]
    with claim(group, tmp_path, log=lambda *_: None) as first:
        logs = []
        with claim(group, tmp_path, log=logs.append) as second:
            assert first and not second and 'skipping the group of sgls-s0' in logs[0]
    assert os.listdir(tmp_path) == [], 'the claim is removed with its folder'
    assert rank_order(5, 1, 2) == [1, 3, 4, 2, 0] and rank_order(5, 0, 2) == [0, 2, 4, 3, 1]
