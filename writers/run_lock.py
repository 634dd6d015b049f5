"""One writer per run folder: `<run>/run.lock`.

The lock file is created with O_EXCL (exactly one process can create it) and holds the owner's host, PID, the
process's start time (so a recycled PID is not mistaken for the owner) and a token; its mtime is the heartbeat,
touched every HEARTBEAT_S seconds by a daemon thread while the lock is held. A lock is live while its process runs
(same host: the PID exists with the recorded start time) or, for a lock of another host sharing the file system,
while its heartbeat is younger than STALE_S. A live lock is refused (RunOwned, exit code 2, naming the owner); a
stale one (its process died: SIGKILL, power loss) is taken over with a message. Creation and takeover run under
flock on the folder, so two processes on one host that find the same stale lock cannot both take it over.

train, sweep (which skips runs owned by another live process) and any future seed-parallel launcher claim runs
with this one class.
"""
import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from engine.errors import UserError
from writers.atomic import process_alive

LOCK_NAME = 'run.lock'
HEARTBEAT_S = 30.0
STALE_S = 300.0  # another host's lock without a heartbeat for this long is taken over


class RunOwned(UserError):
    """The run folder is owned by another live process."""


def _process_start(pid):
    """The start time of a process in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def describe(owner):
    """'PID 123 on host h (since 2026-12-02 10:00:00, heartbeat 4 s ago)'."""
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))
    beat = owner.get('heartbeat_age_s')
    return (f"PID {owner.get('pid')} on host {owner.get('host')} (since {since}"
            + (f', heartbeat {beat:.0f} s ago)' if beat is not None else ')'))


def read_owner(run_dir):
    """The lock's content with 'heartbeat_age_s' added, {} for an unreadable lock, None when there is none."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        with open(path, encoding='utf-8') as f:
            owner = json.load(f)
    except (OSError, ValueError):  # removed meanwhile, or torn while being written
        owner = None
    owner = dict(owner) if isinstance(owner, dict) else {}
    owner['heartbeat_age_s'] = age
    return owner


def is_live(owner):
    """Whether the lock described by `owner` (read_owner) belongs to a process that still runs."""
    if owner is None:
        return False
    age = owner.get('heartbeat_age_s', float('inf'))
    if owner.get('host') != socket.gethostname() or 'pid' not in owner:
        return age < STALE_S  # another host, or a lock torn while it was being written: trust the heartbeat
    pid = int(owner['pid'])
    if not process_alive(pid):
        return False
    start = _process_start(pid)
    return start is None or owner.get('process_start') in (None, start)


class RunLock:
    """`with RunLock(run_dir, log):` owns run_dir (created if missing) for the body. acquire() raises RunOwned
    when another live process owns it. release() removes the lock (only if still ours) and the folder if the
    lock was all that was in it, so a start that failed early leaves nothing behind."""

    def __init__(self, run_dir, log=print):
        self.run_dir, self.log = run_dir, log
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None
        self._created_dir = False

    def acquire(self):
        self._created_dir = not os.path.isdir(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        folder = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            self._create_or_take_over()
        except BaseException:
            self._remove_dir_if_empty()
            raise
        finally:
            os.close(folder)  # closing releases the flock
        self._thread = threading.Thread(target=self._heartbeat, name=f'heartbeat {self.run_dir}', daemon=True)
        self._thread.start()
        return self

    def _create_or_take_over(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                owner = read_owner(self.run_dir)
                if is_live(owner):
                    raise RunOwned(f'{self.run_dir}: owned by {describe(owner)}; one process writes a run folder '
                                   f'at a time (wait for it, or stop it)') from None
                if owner is not None:
                    self.log(f'{self.run_dir}: taking over the lock of {describe(owner)}, which no longer runs')
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'process_start':
                           _process_start(os.getpid()), 'started': time.time(), 'token': self.token}, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise RunOwned(f'{self.run_dir}: could not create {LOCK_NAME} (another process keeps taking it)')

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def owned(self):
        owner = read_owner(self.run_dir)
        return bool(owner) and owner.get('token') == self.token

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owned():
            os.remove(self.path)
        self._remove_dir_if_empty()

    def _remove_dir_if_empty(self):
        if self._created_dir:
            with contextlib.suppress(OSError):  # not empty: something was written there, keep it
                os.rmdir(self.run_dir)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
