"""The one way this project writes a file that a reader or a crash must never see half-written.

atomic_path(path) hands out a temporary path in the target's own folder, created exclusively (mkstemp: a random
name, O_EXCL, so no file or symlink placed there beforehand is followed or overwritten); whatever the body writes
there is flushed to disk and renamed onto `path` in one step (os.replace), or removed if the body fails.
Checkpoints (torch.save), run files, reports and betons (ffcv's writer) all go through it.

A killed process cannot remove its temp file, so the name says who wrote it: `.<name>.<host>-<pid>.<random>.tmp`.
remove_stale_temps(folder) removes the ones whose writer was on this host and is gone; a temp of a live process, of
another host (a shared file system) or in the old `.<name>.<random>.tmp` form (no owner to check) is left alone.
"""
import contextlib
import json
import math
import os
import re
import socket
import stat
import tempfile

# The host part is made dot-free (see _host), and mkstemp's random part is [a-z0-9_]: so the last three
# dot-separated parts before .tmp are always <host>-<pid>, <random>, and a name with dots of its own still parses.
TEMP_NAME = re.compile(r'^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)\.[a-z0-9_]+\.tmp$')


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host():
    """This host's name as it appears in temp names: only [A-Za-z0-9_-] (so it parses back), at most 64 chars."""
    return re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())[:64] or 'localhost'


@contextlib.contextmanager
def atomic_path(path):
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    # os.getpid() at call time, not import time: a forked writer gets its own pid in the name.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.{_host()}-{os.getpid()}.',
                               suffix='.tmp')
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would have given it
        os.close(fd)
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def process_alive(pid):
    """Whether process `pid` exists on this host (a PID of another user's process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_temps(folder, log=print):
    """Remove the temp files of atomic_path in `folder` (not its subfolders) whose writer ran on this host and is
    no longer alive; log one line per file and return their paths. A pid that was reused since keeps its temp
    (it looks alive): the safe side, as removing a live writer's temp would break its rename."""
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, removed = _host(), []
    for name in names:
        match = TEMP_NAME.match(name)
        if not match or match['host'] != host or process_alive(int(match['pid'])):
            continue
        path = os.path.join(folder, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # mkstemp only makes regular files: not ours
                continue
            os.remove(path)
        except FileNotFoundError:  # another process cleaned it up first
            continue
        log(f'removed {path}: a temp file left by process {match["pid"]} on {host}, which is gone')
        removed.append(path)
    return removed


def write_text_atomic(path, text):
    with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8', newline='') as f:
        f.write(text)


def json_safe(value):
    """JSON has no NaN or infinity: a metric that was not measured (or is not finite) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + '\n')


def temp_target(path):
    """The file an atomic_path temp at `path` was to become (for messages), or path itself for any other name."""
    folder, base = os.path.split(path)
    match = TEMP_NAME.match(base) or re.fullmatch(r'\.(?P<name>.+)\.[^.]+\.tmp', base)  # this form, or the old
    return os.path.join(folder, match['name']) if match else path

