"""The files of one run folder: params.json, metrics.jsonl / metrics.csv / tensorboard/, final.json and
final.md. Writes are atomic where a reader could otherwise see half a file; metrics.jsonl is appended a line at
a time and flushed."""
import csv
import io
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
    """A run's per-epoch metrics, one record per finished epoch, in three forms:
    - metrics.jsonl: one JSON object per line, appended and flushed (the record of truth; compare reads it);
    - metrics.csv: the same records as a table, rewritten atomically each epoch (columns in order of first
      appearance; a metric not measured in an epoch is empty);
    - tensorboard/: TensorBoard scalars (one tag per numeric metric, step = epoch), when `tensorboard` is true and
      the tensorboard package is installed."""

    def __init__(self, run_dir, tensorboard=True):
        self.path = os.path.join(run_dir, 'metrics.jsonl')
        self.csv_path = os.path.join(run_dir, 'metrics.csv')
        self.tensorboard_dir = os.path.join(run_dir, 'tensorboard') if tensorboard else None
        self._board = None

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch):
        """Start or resume: keep only the epochs the checkpoint has (a kill can land between the two writes)."""
        kept = [r for r in self.read() if r['epoch'] <= epoch]
        write_text_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
        self._write_csv(kept)
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the package is optional
                self.tensorboard_dir = None
            else:  # purge_step: a resumed run's events replace those written after its checkpoint
                self._board = SummaryWriter(self.tensorboard_dir, purge_step=epoch + 1)

    def append(self, record):
        record = _clean(record)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
        self._write_csv(self.read())
        if self._board is not None:
            for key, value in record.items():
                if key != 'epoch' and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(key, value, global_step=record['epoch'])
            self._board.flush()

    def close(self):
        """Stop the TensorBoard writer's thread and close its file (a sweep runs many runs in one process)."""
        if self._board is not None:
            self._board.close()
            self._board = None

    def _write_csv(self, records):
        columns = list(dict.fromkeys(key for r in records for key in r))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator='\n')
        writer.writerow(columns)
        writer.writerows([['' if r.get(c) is None else r[c] for c in columns] for r in records])
        write_text_atomic(self.csv_path, buffer.getvalue())


def write_final(run_dir, final, table_md):
    write_json_atomic(os.path.join(run_dir, 'final.json'), final)
    write_text_atomic(os.path.join(run_dir, 'final.md'), table_md + '\n')
