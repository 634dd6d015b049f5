"""Run folders under hostile or unlucky use: two writers, kills at random points, divergence, path escapes,
resume refusals, failed starts, torn files, provenance (issue 10 of the project)."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from engine import checkpoint, config
from engine.errors import ConfigError, RunFailed, UserError
from engine.sweep import main as sweep
from engine.train.loop import train
from tests.golden.runs import record
from writers.run_lock import RunLock, RunOwned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *_: None)


def args(data_dir, out_dir, *extra, name='run'):
    """The tiny run of tests/test_training.py as command-line arguments (about a second per epoch here)."""
    return ['--data.dataset=synthetic', f'--data.dir={data_dir}', '--data.synthetic_n_train=2112',
            '--data.synthetic_n_test=512', '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16',
            '--data.val_size=64', '--model.arch=small_cnn', '--model.width=8', '--attack.eps=16', '--attack.steps=3',
            '--attack.step_size=8', '--training.epochs=3', '--training.batch_size=64', '--optimizer.lr=0.05',
            '--schedule.milestones=3', '--evaluation.subset=128', '--evaluation.pgd_steps=3',
            '--evaluation.final_pgd_steps=3', '--evaluation.cw_steps=0', '--evaluation.fgsm=false',
            '--evaluation.autoattack=false', f'--output.dir={out_dir}', f'--output.name={name}', *extra]


def sweep_args(data_dir, *extra):
    """args() without the run folder (the sweep names its runs), with `extra`."""
    return [*args(data_dir, data_dir)[:-2], *extra]


def cfg_of(*a, **k):
    return config.load(cli_args=args(*a, **k))


def run_py(*argv, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'})


def start_run_py(*argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'})


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f'{path} never appeared'
        time.sleep(0.05)


def epochs_in(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line)['epoch'] for line in f]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    assert run_py('convert', *args(d, d)[:7]).returncode == 0
    return d


# -- 1. one writer per run folder ------------------------------------------------------------------------------

def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    d = str(tmp_path / 'run')
    lock = RunLock(d).acquire()
    with pytest.raises(RunOwned, match=f'owned by PID {os.getpid()} on host {socket.gethostname()}'):
        RunLock(d).acquire()
    lock.release()
    assert not os.path.exists(d), 'a folder that only ever held the lock is removed with it'

    dead = subprocess.Popen(['true'])
    dead.wait()
    os.makedirs(d)
    with open(os.path.join(d, 'run.lock'), 'w') as f:
        json.dump({'host': socket.gethostname(), 'pid': dead.pid, 'started': time.time()}, f)
    logs = []
    lock = RunLock(d, logs.append).acquire()
    assert lock.owned() and f'taking over the lock of PID {dead.pid}' in logs[0] and 'no longer runs' in logs[0]
    lock.release()

    # another host sharing the file system: live while its heartbeat is fresh, stale after STALE_S
    with open(os.path.join(d, 'run.lock'), 'w') as f:
        json.dump({'host': 'elsewhere', 'pid': 1, 'started': time.time()}, f)
    with pytest.raises(RunOwned, match='host elsewhere'):
        RunLock(d).acquire()
    old = time.time() - 3600
    os.utime(os.path.join(d, 'run.lock'), (old, old))
    RunLock(d, logs.append).acquire().release()
    assert 'host elsewhere' in logs[-1]


def test_a_second_trainer_is_refused_and_a_killed_one_taken_over(data_dir, tmp_path):
    """A `run.py train` on a folder that another one is training is refused naming it; after a SIGKILL of the
    first, a resume takes the stale lock over and the run's epochs stay 1, 2, ... once each."""
    a = args(data_dir, tmp_path, '--training.epochs=40')
    first = start_run_py('train', *a)
    wait_for(tmp_path / 'run' / 'checkpoints' / 'last.pt', first)
    with pytest.raises(RunOwned, match=f'owned by PID {first.pid}'):
        train(config.load(cli_args=[*a, '--training.resume=true']), **QUIET)
    first.send_signal(signal.SIGKILL)
    first.wait()
    logs = []
    train(config.load(cli_args=[*a, '--training.resume=true', '--training.stop_after=1']), log=logs.append)
    assert any(f'taking over the lock of PID {first.pid}' in line for line in logs), logs
    epochs = epochs_in(tmp_path / 'run')
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    assert not os.path.exists(tmp_path / 'run' / 'run.lock')


def test_two_identical_sweeps_share_the_runs(data_dir, tmp_path):
    """Each run of a sweep started twice at once on one folder is trained by exactly one of the two."""
    a = ['sweep', *sweep_args(data_dir, '--training.epochs=2'), '--methods=at,sgls', '--seeds=0-1',
         f'--out={tmp_path / "sweep"}']
    procs = [start_run_py(*a) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    owners = []
    for name in ('at-s0', 'at-s1', 'sgls-s0', 'sgls-s1'):
        run_dir = tmp_path / 'sweep' / name
        assert epochs_in(run_dir) == [1, 2] and os.path.exists(run_dir / 'final.json')
        with open(run_dir / 'provenance.json') as f:
            sessions = json.load(f)
        assert len(sessions) == 1, (name, sessions)  # trained once, by one process
        owners.append(sessions[0]['pid'])
    assert set(owners) <= {p.pid for p in procs}


# -- crash consistency: SIGKILL at random points, resume bitwise --------------------------------------------------

def kill_and_resume(argv, run_dirs, rng, kills):
    """Run argv in a subprocess, SIGKILL it at `kills` random moments (each rerun resumes), then let it finish."""
    for _ in range(kills):
        proc = start_run_py(*argv)
        wait_for(os.path.join(run_dirs[0], 'run.lock'), proc)
        time.sleep(rng.uniform(0.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = run_py(*argv)
    assert done.returncode == 0, done.stderr
    return done


def test_sigkill_at_random_points_then_resume_is_bitwise_the_uninterrupted_run(data_dir, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    assert run_py('train', *args(data_dir, tmp_path, name='whole')).returncode == 0
    kill_and_resume(['train', *args(data_dir, tmp_path, '--training.resume=true', name='killed')],
                    [tmp_path / 'killed'], rng, kills=2)
    assert record(tmp_path / 'killed') == record(tmp_path / 'whole'), f'kill times drawn with seed {seed}'


def test_sigkill_of_a_packed_sweep_then_resume_is_bitwise_the_uninterrupted_sweep(data_dir, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    common = ['sweep', *sweep_args(data_dir), '--methods=sgls', '--seeds=0-1',
              '--method.sgls_start_epoch=2', '--pack=2']
    assert run_py(*common, f'--out={tmp_path / "whole"}').returncode == 0
    kill_and_resume([*common, f'--out={tmp_path / "killed"}'], [tmp_path / 'killed' / 'sgls-s0'], rng, kills=1)
    for name in ('sgls-s0', 'sgls-s1'):
        assert record(tmp_path / 'killed' / name) == record(tmp_path / 'whole' / name), f'seed {seed}'


class Kill(BaseException):
    """Stands for a SIGKILL at an exact point (in-process, so the point is certain)."""


@pytest.mark.parametrize('phase', [1, 2])
def test_a_packed_group_killed_while_checkpointing_resumes_as_a_group(data_dir, tmp_path, monkeypatch, phase):
    """Phase 1 (seed 0's epoch-2 checkpoint written as pending, seed 1's not): both resume from epoch 1.
    Phase 2 (seed 0's pending renamed onto last.pt, seed 1's not yet): seed 1's is completed. Either way the
    group resumes packed, together, and ends bitwise as the uninterrupted packed sweep."""
    from engine.train import run_state
    common = [*sweep_args(data_dir), '--methods=sgls', '--seeds=0-1',
              '--method.sgls_start_epoch=2', '--pack=2']
    sweep([], [*common, f'--out={tmp_path / "whole"}'], **QUIET)
    save, commit = checkpoint.save, run_state.Run.commit

    def save_then_die(path, parts, params):
        if phase == 1 and str(path).endswith(os.path.join('sgls-s1', 'checkpoints', 'pending.pt')) and \
                parts['progress'].epoch == 2:
            raise Kill
        save(path, parts, params)

    def commit_then_die(self):
        if phase == 2 and self.run_dir.endswith('sgls-s1') and self.progress.epoch == 2:
            raise Kill
        commit(self)
    monkeypatch.setattr(checkpoint, 'save', save_then_die)
    monkeypatch.setattr(run_state.Run, 'commit', commit_then_die)
    with pytest.raises(Kill):
        sweep([], [*common, f'--out={tmp_path / "killed"}'], **QUIET)
    last = [checkpoint.epoch_of(str(tmp_path / 'killed' / f'sgls-s{s}' / 'checkpoints' / 'last.pt')) for s in (0, 1)]
    assert last == ([1, 1] if phase == 1 else [2, 1])
    monkeypatch.undo()
    logs = []
    sweep([], [*common, f'--out={tmp_path / "killed"}'], log=logs.append)
    assert any(('resumes from the epoch before' if phase == 1 else 'completed the checkpoint of epoch 2') in line
               for line in logs), logs
    assert any('packed 2 seeds' in line for line in logs)
    for name in ('sgls-s0', 'sgls-s1'):
        assert record(tmp_path / 'killed' / name) == record(tmp_path / 'whole' / name)


# -- 2. no path escapes, overwrite removes only what the engine wrote ----------------------------------------------

@pytest.mark.parametrize('name', ['.', '..', '../../victim', '/tmp/x', 'a/b'])
def test_a_run_name_is_one_path_component(data_dir, tmp_path, name):
    with pytest.raises(ConfigError, match='output.name'):
        cfg_of(data_dir, tmp_path, '--output.overwrite=true', name=name)


def test_overwrite_removes_only_what_the_engine_wrote(data_dir, tmp_path):
    out = tmp_path / 'runs'
    train(cfg_of(data_dir, out, '--training.epochs=1', name='sibling'), **QUIET)
    train(cfg_of(data_dir, out, '--training.epochs=1', name='mine'), **QUIET)
    (out / 'mine' / 'notes.txt').write_text('my notes')
    (out / 'mine' / 'checkpoints' / 'keep.pt').write_text('not ours')
    logs = []
    train(cfg_of(data_dir, out, '--training.epochs=1', '--output.overwrite=true', name='mine'), log=logs.append)
    assert (out / 'mine' / 'notes.txt').read_text() == 'my notes' and (out / 'mine' / 'checkpoints' / 'keep.pt').exists()
    assert any('not written by the engine: notes.txt, checkpoints/keep.pt' in line for line in logs), logs
    assert os.path.exists(out / 'sibling' / 'final.json') and epochs_in(out / 'mine') == [1]
    # a folder that is not a run of this engine is neither written into nor cleared
    (out / 'photos').mkdir()
    (out / 'photos' / 'cat.jpg').write_text('cat')
    for extra in ([], ['--output.overwrite=true']):
        with pytest.raises(UserError, match='not a run folder of this engine'):
            train(cfg_of(data_dir, out, '--training.epochs=1', *extra, name='photos'), **QUIET)
    assert sorted(os.listdir(out / 'photos')) == ['cat.jpg']


# -- 3. divergence stops the run ----------------------------------------------------------------------------------

DIVERGE = ['--schedule.milestones=2', '--schedule.gamma=1e6']  # lr 0.05 in epoch 1, 5e4 from epoch 2


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    with pytest.raises(RunFailed, match='diverged at epoch 2: non-finite'):
        train(cfg_of(data_dir, tmp_path, *DIVERGE), **QUIET)
    run_dir = tmp_path / 'run'
    failed = json.load(open(run_dir / 'failed.json'))
    assert failed['epoch'] == 2 and failed['reason'].startswith('non-finite') and failed['value']
    assert epochs_in(run_dir) == [1] and 'null' not in open(run_dir / 'metrics.jsonl').read()
    assert checkpoint.epoch_of(str(run_dir / 'checkpoints' / 'last.pt')) == 1
    best = checkpoint.load(str(run_dir / 'checkpoints' / 'best.pt'))['model']
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
    assert not os.path.exists(run_dir / 'final.json')
    with pytest.raises(UserError, match='failed at epoch 2'):
        train(cfg_of(data_dir, tmp_path, *DIVERGE, '--training.resume=true'), **QUIET)
    proc = run_py('train', *args(data_dir, tmp_path, *DIVERGE, '--output.overwrite=true'))
    assert proc.returncode == 3 and 'diverged at epoch 2' in proc.stderr, proc.stderr


def test_a_sweep_reports_failed_runs_and_leaves_them_out_of_the_comparison(data_dir, tmp_path):
    out = tmp_path / 'sweep'
    logs = []
    with pytest.raises(RunFailed, match=r'1 run\(s\) failed.*at-gamma1e6-s0'):
        sweep([], [*sweep_args(data_dir, '--training.epochs=2'), '--methods=at', '--seeds=0',
                   '--grid', 'schedule.gamma=0.1,1e6', '--schedule.milestones=2', f'--out={out}', '--compare'],
              log=logs.append)
    assert os.path.exists(out / 'at-gamma0.1-s0' / 'final.json')
    summary = json.load(open(out / 'compare' / 'summary.json'))
    assert 'at-gamma1e6-s0' in json.dumps(summary.get('failed'))
    assert 'at-gamma1e6-s0' in open(out / 'compare' / 'report.md').read()


# -- 5. resume refuses what changes results ----------------------------------------------------------------------

def test_resume_refuses_what_changes_results(data_dir, tmp_path):
    cosine = ['--schedule.kind=cosine', '--training.stop_after=1']
    train(cfg_of(data_dir, tmp_path, *cosine, name='cos'), **QUIET)
    with pytest.raises(UserError, match='training.epochs 3 -> 6'):
        train(cfg_of(data_dir, tmp_path, *cosine, '--training.epochs=6', '--training.resume=true', name='cos'),
              **QUIET)
    # another beton under the same name in another data.dir: same config, other images and labels
    other = tmp_path / 'other-data'
    other_args = args(other, other)[:7] + ['--data.synthetic_seed=1']
    assert run_py('convert', *other_args).returncode == 0
    for split in ('train', 'test'):
        os.replace(next(other.glob(f'*s1-{split}.beton')), other / next(data_dir.glob(f'*-{split}.beton')).name)
    with pytest.raises(UserError, match='the data differs'):
        train(cfg_of(other, tmp_path, *cosine, '--training.resume=true', name='cos'), **QUIET)
    # a last.pt copied from a run with another lr, and one with NaN weights
    train(cfg_of(data_dir, tmp_path, '--training.stop_after=1', '--optimizer.lr=0.01', name='other-lr'), **QUIET)
    train(cfg_of(data_dir, tmp_path, '--training.stop_after=1', name='target'), **QUIET)
    target_last = tmp_path / 'target' / 'checkpoints' / 'last.pt'
    good = target_last.read_bytes()
    target_last.write_bytes((tmp_path / 'other-lr' / 'checkpoints' / 'last.pt').read_bytes())
    with pytest.raises(UserError, match='another config: optimizer.lr 0.01 -> 0.05'):
        train(cfg_of(data_dir, tmp_path, '--training.resume=true', name='target'), **QUIET)
    state = torch.load(io_bytes(good), weights_only=True)
    next(v for v in state['model'].values() if v.is_floating_point()).fill_(float('nan'))
    torch.save(state, target_last)
    with pytest.raises(UserError, match='non-finite weights'):
        train(cfg_of(data_dir, tmp_path, '--training.resume=true', name='target'), **QUIET)


def io_bytes(data):
    import io
    return io.BytesIO(data)


# -- 7. failed starts leave nothing; torn metrics repaired; 9. provenance ------------------------------------------

def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_rerun(data_dir, tmp_path):
    for bad in (['--data.val_size=5000'], ['--training.batch_size=4096']):
        with pytest.raises(UserError):
            train(cfg_of(data_dir, tmp_path, *bad), **QUIET)
        assert not os.path.exists(tmp_path / 'run')
    train(cfg_of(data_dir, tmp_path, '--training.epochs=1'), **QUIET)


def test_a_torn_metrics_line_is_repaired_on_resume(data_dir, tmp_path):
    train(cfg_of(data_dir, tmp_path, '--training.stop_after=1'), **QUIET)
    with open(tmp_path / 'run' / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": 2, "lr": 0.0')  # a kill in the middle of the append
    logs = []
    train(cfg_of(data_dir, tmp_path, '--training.resume=true'), log=logs.append)
    assert any('dropped a torn last line' in line for line in logs)
    assert epochs_in(tmp_path / 'run') == [1, 2, 3]


def test_provenance_and_console_log_in_the_run_folder(data_dir, tmp_path):
    logs = []
    run_dir = train(cfg_of(data_dir, tmp_path, '--training.epochs=1'), log=logs.append)
    (session,) = json.load(open(os.path.join(run_dir, 'provenance.json')))
    commit = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert session['git_commit'] == (commit or None) and isinstance(session['git_dirty'], (bool, type(None)))
    assert session['torch'] == torch.__version__ and session['host'] == socket.gethostname()
    assert session['device'] == 'cpu' and session['device_name'] and session['start']
    text = open(os.path.join(run_dir, 'log.txt')).read()
    assert all(line in text for line in logs if 'epoch' in line) and 'final.md' in text


@pytest.mark.parametrize('extra,error', [
    (['--methods', 'at,at'], 'repeats a method'),
    (['--grid', 'output.name=a,b'], 'set by the sweep itself'),
    (['--grid', 'training.seed=1,2'], 'set by the sweep itself'),
    (['--grid', 'attack.eps=4,4.0'], 'repeats a value'),
])
def test_bad_sweep_grids(tmp_path, extra, error):
    with pytest.raises(UserError, match=error):
        sweep([], [*sweep_args(tmp_path), f'--out={tmp_path / "s"}', *extra], **QUIET)
    assert not os.path.exists(tmp_path / 's')
