"""Conversions that end cleanly (Ctrl-C, a kill, a full disk, a failing worker), stale temp files, labels out of
range, wrong or damaged betons of the real datasets, and convert's progress switch.

The interrupt and failure cases run convert in a child process in its own process group (as a terminal's Ctrl-C
reaches a whole group), bounded by a timeout, so a hang fails the test instead of holding up CI, and every
process of the group is killed at the end whatever happened.
"""
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.data.convert import beton_paths, convert, write_beton
from engine.data.loaders import make_loaders, open_beton
from engine.data.sources import Split, SyntheticSpec
from engine.errors import DataError
from tests.test_data import leftovers, make_fake_cifar, quiet
from writers.atomic import atomic_path, remove_stale_temps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8x8 images: generating them takes well under a second; > 20000 of them: convert starts two writer processes.
BIG = dict(n_train=60000, n_test=100, shape=(3, 8, 8))

# A convert in a child process, with one hook per case; exit codes as run.py's (130 interrupted, 2 user error).
CHILD = r'''
import ast, errno, os, sys, time
sys.path.insert(0, sys.argv[3])
import engine.data.convert as convert_module
from ffcv.memory_allocator import MemoryAllocator
from engine.data.sources import SyntheticSpec
from engine.errors import UserError
case, out = sys.argv[1], sys.argv[2]
item = convert_module._SplitDataset.__getitem__
if case == 'slow':  # about 15 s of writing: a signal lands while the workers write
    def slow(self, i):
        time.sleep(0.0005)
        return item(self, i)
    convert_module._SplitDataset.__getitem__ = slow
elif case == 'no-space':  # the disk fills when a worker writes its first page
    def full(self):
        if self.my_page >= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    MemoryAllocator.flush_page = full
elif case == 'bad-sample':
    def bad(self, i):
        if i == 25000:
            raise ValueError('simulated unreadable sample')
        return item(self, i)
    convert_module._SplitDataset.__getitem__ = bad
try:
    convert_module.convert('synthetic', out, synthetic=SyntheticSpec(**ast.literal_eval(sys.argv[4])))
except KeyboardInterrupt:
    sys.exit(130)
except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
'''


def group_members(pgid):
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != 'Z':
            members.append(int(pid))
    return members


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Child:
    """python -c CHILD in its own session (= process group); always killed with all its processes at exit."""

    def __init__(self, case, out):
        self.out = str(out)
        self.proc = subprocess.Popen([sys.executable, '-c', CHILD, case, self.out, ROOT, repr(BIG)], cwd=ROOT,
                                     start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, 'OMP_WAIT_POLICY': 'PASSIVE'})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.communicate()

    def temps(self):
        return [f for f in os.listdir(self.out) if f.endswith('.tmp')] if os.path.isdir(self.out) else []

    def wait_writing(self):
        """Until the train beton's temp exists and the child has started other processes (its writers, the
        resource tracker of their shared memory); then a moment more, well inside the ~15 s of writing."""
        assert wait_until(lambda: self.temps() and len(group_members(self.proc.pid)) > 1, 60), 'writing never began'
        time.sleep(0.5)

    def finish(self, timeout):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f'convert still running {timeout} s after the event (hung); its group: '
                        f'{group_members(self.proc.pid)}')
        # The group must empty by itself: no writer may outlive the conversion (the resource tracker may take a
        # moment to see its parent gone).
        assert wait_until(lambda: not group_members(self.proc.pid), 10), group_members(self.proc.pid)
        return self.proc.returncode, err.decode(errors='replace')


# ------------------------------------------------------------------------------------------------ task 1
def test_ctrl_c_during_convert_ends_everything(tmp_path):
    with Child('slow', tmp_path) as child:
        child.wait_writing()
        os.killpg(child.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code, err = child.finish(timeout=30)
    assert code == 130, err[-2000:]
    assert 'Traceback' not in err, err[-2000:]  # the workers leave the interrupt to the parent
    assert leftovers(tmp_path) == []


def test_killed_convert_leaves_no_writer_and_a_rerun_removes_its_temp(tmp_path):
    messages = []
    with Child('slow', tmp_path) as child:
        child.wait_writing()
        os.kill(child.proc.pid, signal.SIGKILL)  # the parent only: its workers must not run on as orphans
        code, _ = child.finish(timeout=30)
        stale = child.temps()
    assert code == -signal.SIGKILL and len(stale) == 1, stale  # a killed process cannot remove its temp
    assert int(TEMP.match(stale[0])['pid']) == child.proc.pid, stale
    paths = convert('synthetic', str(tmp_path), synthetic=SyntheticSpec(**BIG), progress=False, log=messages.append)
    assert leftovers(tmp_path) == sorted(os.path.basename(p) for p in paths)  # the stale temp is gone
    assert any(stale[0] in m and 'gone' in m for m in messages), messages


def test_full_disk_in_a_worker_is_a_data_error(tmp_path):
    with Child('no-space', tmp_path) as child:
        code, err = child.finish(timeout=60)
    assert code == 2, err[-2000:]
    assert f'error: no space left on {tmp_path}' in err, err[-2000:]
    assert leftovers(tmp_path) == []


def test_full_disk_in_the_parent_is_a_data_error(tmp_path, monkeypatch):
    """The parent writes too (header, metadata, the final fsync): the same error, the same nothing left."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(DataError, match=f'^no space left on {tmp_path}: writing .*-train.beton failed'):
        convert('synthetic', str(tmp_path), synthetic=SyntheticSpec(n_train=50, n_test=20, shape=(3, 8, 8)),
                progress=False, log=quiet)
    assert leftovers(tmp_path) == []


def test_failing_worker_ends_the_conversion(tmp_path):
    with Child('bad-sample', tmp_path) as child:
        code, err = child.finish(timeout=60)
    assert code == 1 and 'simulated unreadable sample' in err, err[-2000:]
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ task 2
TEMP = re.compile(r'^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp$')


def dead_pid():
    p = subprocess.Popen(['true'])
    p.wait()  # reaped: its pid names no process (until the system reuses it, far later)
    return p.pid


def test_temp_names_carry_host_and_pid(tmp_path):
    target = tmp_path / 'run.v1.json'
    with atomic_path(str(target)) as tmp:
        name = os.path.basename(tmp)
        match = TEMP.match(name)
        assert match and match['name'] == 'run.v1.json' and int(match['pid']) == os.getpid(), name
        assert match['host'] == re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())[:64], name  # dot-free
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.isfile(tmp) and not os.path.islink(tmp)
        assert remove_stale_temps(str(tmp_path), log=quiet) == []  # our own live temp stays
        open(tmp, 'w').write('x')
    assert target.read_text() == 'x' and os.listdir(tmp_path) == ['run.v1.json']


def test_remove_stale_temps_only_removes_dead_writers_of_this_host(tmp_path):
    host = TEMP.match(os.path.basename(_a_temp_name(tmp_path)))['host']
    dead = dead_pid()
    names = {
        'stale': f'.ckpt.pt.{host}-{dead}.abcd1234.tmp',
        'stale2': f'.metrics.csv.{host}-{dead}.zz_9yy00.tmp',
        'live': f'.ckpt.pt.{host}-{os.getppid()}.abcd1234.tmp',
        'mine': f'.ckpt.pt.{host}-{os.getpid()}.abcd1234.tmp',
        'other_host': f'.ckpt.pt.elsewhere-{dead}.abcd1234.tmp',
        'old_style': '.ckpt.pt.abcd1234.tmp',
        'not_a_temp': f'ckpt.pt.{host}-{dead}.abcd1234.tmp',
    }
    for name in names.values():
        (tmp_path / name).write_text('partial')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / names['stale']).write_text('partial')  # not recursive
    (tmp_path / f'.dir.{host}-{dead}.abcd1234.tmp').mkdir()  # not a file mkstemp made
    messages = []
    removed = remove_stale_temps(str(tmp_path), log=messages.append)
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in ('stale', 'stale2'))
    assert len(messages) == 2 and all(any(p in m for m in messages) for p in removed)
    kept = set(os.listdir(tmp_path))
    assert {names[k] for k in ('live', 'mine', 'other_host', 'old_style', 'not_a_temp')} <= kept
    assert os.listdir(tmp_path / 'sub') == [names['stale']]
    assert remove_stale_temps(str(tmp_path / 'missing'), log=quiet) == []


def _a_temp_name(folder):
    with atomic_path(str(folder / 'probe')) as tmp:
        pass
    return tmp


# ------------------------------------------------------------------------------------------------ task 3
def test_labels_outside_the_classes_are_a_data_error(tmp_path):
    images = np.zeros((200, 8, 8, 3), np.uint8)
    good, bad = str(tmp_path / 'good.beton'), str(tmp_path / 'bad.beton')
    write_beton(good, Split(images, np.arange(200) % 10), log=quiet, progress=False)
    write_beton(bad, Split(images, np.arange(200) % 12), log=quiet, progress=False)  # 10 and 11: 32 images
    for train, test in ((bad, good), (good, bad)):
        with pytest.raises(DataError, match=rf'{re.escape(bad)}: 32 of 200 images .* 0\.\.9 .*max 11'):
            make_loaders(train, test, batch_size=50, val_size=0, num_classes=10)
    make_loaders(good, good, batch_size=50, val_size=0, num_classes=10)
    make_loaders(bad, bad, batch_size=50, val_size=0, num_classes=12)
    make_loaders(bad, good, batch_size=50, val_size=0)  # unchecked without num_classes, as before


# ------------------------------------------------------------------------------------------------ task 4
def small_beton(path, n, shape=(3, 32, 32)):
    c, h, w = shape
    write_beton(str(path), Split(np.zeros((n, h, w, c), np.uint8), np.zeros(n, np.int64)), log=quiet,
                progress=False)


def test_real_dataset_beton_with_a_wrong_count_and_no_source(tmp_path):
    train, test = beton_paths('cifar10', str(tmp_path))
    small_beton(train, 100)
    small_beton(test, 10000)  # right count: no complaint about it
    with pytest.raises(DataError) as error:
        convert('cifar10', str(tmp_path), log=quiet)
    message = str(error.value)
    assert f'{train}: holds 100 images, expected 50000' in message and test not in message
    assert 'cifar-10-python.tar.gz' in message  # the missing source, too
    fashion_train, _ = beton_paths('fashion-mnist', str(tmp_path))
    small_beton(fashion_train, 100, (1, 28, 28))
    with pytest.raises(DataError, match=f'{fashion_train}: holds 100 images, expected 60000.*no-such-folder'):
        convert('fashion-mnist', str(tmp_path), source=str(tmp_path / 'no-such-folder'), log=quiet)


def test_damaged_beton_without_source_names_both(tmp_path):
    train, _ = beton_paths('cifar100', str(tmp_path))
    small_beton(train, 50)
    open(train, 'r+b').truncate(os.path.getsize(train) - 1)
    with pytest.raises(DataError, match=f'{train}: truncated or damaged.*cannot be rewritten.*cifar-100-python'):
        convert('cifar100', str(tmp_path), log=quiet)
    assert os.path.exists(train)  # not replaced by nothing


def test_invalid_beton_is_rewritten_saying_why(tmp_path):
    tarball, _, _ = make_fake_cifar(tmp_path, 'cifar10', per_file=4)
    out = str(tmp_path / 'out')
    train, test = beton_paths('cifar10', out)
    small_beton(train, 7)
    open(train, 'r+b').truncate(os.path.getsize(train) - 1)
    messages = []
    convert('cifar10', out, source=str(tarball), check_md5=False, progress=False, log=messages.append)
    assert open_beton(train).n == 20 and open_beton(test).n == 4
    assert any(m.startswith(f'{train}: truncated or damaged') and m.endswith(f'rewriting it from {tarball}')
               for m in messages), messages
    assert not any(test in m and 'rewriting' in m for m in messages)  # it was missing, not invalid


# ------------------------------------------------------------------------------------------------ task 5
def test_progress_switch(tmp_path, capfd):
    spec = SyntheticSpec(n_train=50, n_test=20, shape=(3, 8, 8))
    convert('synthetic', str(tmp_path / 'quiet'), synthetic=spec, progress=False, log=quiet)
    assert 'it/s' not in capfd.readouterr().err
    convert('synthetic', str(tmp_path / 'shown'), synthetic=spec, log=quiet)
    assert 'it/s' in capfd.readouterr().err  # the default: a bar per beton
