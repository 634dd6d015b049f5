"""The files of one run folder: params.json, metrics.jsonl, final.json and final.md. Writes are atomic where
a reader could otherwise see half a file; metrics.jsonl is appended a line at a time and flushed."""
import json
import math
import os


def write_text_atomic(path, text):
    """Write to a temporary name beside `path`, then rename: a reader or a crash never sees half a file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8', newline='') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _clean(value):
    """JSON has no NaN: a metric that was not measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(_clean(obj), indent=2, allow_nan=False) + '\n')


class MetricsLog:
    """metrics.jsonl: one JSON object per finished epoch."""

    def __init__(self, path):
        self.path = path

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch):
        """On resume: keep only epochs the checkpoint has (a kill can land between the two writes)."""
        kept = [r for r in self.read() if r['epoch'] <= epoch]
        write_text_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

    def append(self, record):
        with open(self.path, 'a') as f:
            f.write(json.dumps(_clean(record)) + '\n')
            f.flush()
            os.fsync(f.fileno())


def write_final(run_dir, final, table_md):
    write_json_atomic(os.path.join(run_dir, 'final.json'), final)
    write_text_atomic(os.path.join(run_dir, 'final.md'), table_md + '\n')
