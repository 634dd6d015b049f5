"""The one way this project writes a file that a reader or a crash must never see half-written.

atomic_path(path) hands out a temporary path in the target's own folder, created exclusively (mkstemp: a random
name, O_EXCL, so no file or symlink placed there beforehand is followed or overwritten); whatever the body writes
there is flushed to disk and renamed onto `path` in one step (os.replace), or removed if the body fails.
Checkpoints (torch.save), run files, reports and betons (ffcv's writer) all go through it.
"""
import contextlib
import json
import math
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
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
